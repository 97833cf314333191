"""Data that loads but looks unintended (data/checks.py): a test set of the labelled images, one
class, a class named unknown, names that differ only in case or Unicode form; each one line,
none for a clean folder, and said by every command that loads the data."""

from __future__ import annotations

import shutil
import unicodedata

import numpy as np
import torch
from tiny import write_folder

from paws.config import load_config
from paws.data import load_datasets
from paws.data.checks import OVERLAP_SHARE, suspicious
from paws.data.images import ImageSet


def _in_memory(images: torch.Tensor) -> ImageSet:
    return ImageSet(labels=np.zeros(len(images), dtype=np.int64), names=[], images=images)


def _pixels(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)


def test_a_clean_set_says_nothing():
    lab, test = _in_memory(_pixels(20, 0)), _in_memory(_pixels(200, 1))
    assert suspicious(["cat", "dog"], lab, test) == []
    assert suspicious(["cat", "dog"], lab, None) == []


def test_test_images_that_are_labelled_images_are_counted_by_pixels_or_by_file(tmp_path):
    lab = _pixels(20, 0)
    test = torch.cat([lab[:3], _pixels(97, 1)])  # 3 of 100: above the 1% share
    [line] = suspicious(["a", "b"], _in_memory(lab), _in_memory(test))
    assert line.startswith("warning: 3 of 100 test images are labelled images too")
    few = torch.cat([lab[:1], _pixels(199, 1)])  # 1 of 200: a duplicate, below the share
    assert 1 < OVERLAP_SHARE * 200
    assert suspicious(["a", "b"], _in_memory(lab), _in_memory(few)) == []
    files = [tmp_path / f"{i}.png" for i in range(4)]
    other = ImageSet(labels=np.zeros(2), names=[], files=[tmp_path / "." / "0.png", files[3]])
    [line] = suspicious(["a", "b"], ImageSet(np.zeros(3), [], files=files[:3]), other)
    assert "1 of 2 test images" in line  # the same file, spelt another way


def test_one_class_unknown_and_names_that_differ_only_in_case_or_form():
    lab = _in_memory(_pixels(4, 0))
    [one] = suspicious(["cat"], lab, None)
    assert one.startswith("warning: only one labelled class ('cat')")
    [unknown] = suspicious(["cat", "Unknown"], lab, None)
    assert "a labelled class is named 'Unknown'" in unknown
    [case] = suspicious(["Zero", "one", "zero"], lab, None)
    assert "'Zero' and 'zero' differ only in case or Unicode form" in case
    nfc, nfd = (unicodedata.normalize(f, "café") for f in ("NFC", "NFD"))
    assert nfc != nfd and len(suspicious([nfc, nfd], lab, None)) == 1


def test_loading_a_folder_whose_test_set_is_its_labelled_set_says_so(tmp_path, capsys):
    labeled = write_folder(tmp_path / "labeled", per_class=3, size=8)
    shutil.copytree(labeled, tmp_path / "copy")  # a copy of the folder: the same pixels
    for test in (labeled, tmp_path / "copy"):
        where = ["data.dataset=folder", f"data.labeled={labeled}", f"data.test={test}"]
        data = load_datasets(load_config(None, where))
        lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("warning")]
        assert lines == [
            f"warning: {len(data.test)} of {len(data.test)} test images are labelled images too: "
            "their accuracy is that of the supports, not of new images; give a test folder of "
            "other images"
        ]
