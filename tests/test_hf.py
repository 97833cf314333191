"""data.dataset: hf: Hugging Face datasets saved to disk, and image folders, train and evaluate."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tiny import TINY, error_line, pattern, run_cli, set_args, train_tiny, write_folder

from paws.config import load_config
from paws.data.sources import load_datasets

datasets = pytest.importorskip("datasets")

CLASSES = ["stripes", "bars", "checks"]


@pytest.fixture(autouse=True)
def _private_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The imagefolder builder writes its cache here, not in the user's home."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf-cache"))


def _split(per_class: int, seed: int, labels: bool = True) -> datasets.Dataset:
    """A split of 14-px colour pictures of 3 classes, with a ClassLabel column."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(pattern(c, 14, rng, 3)) for c in range(3) for _ in range(per_class)]
    columns = {"img": images, "kind": [c for c in range(3) for _ in range(per_class)]}
    features = {"img": datasets.Image(), "kind": datasets.ClassLabel(names=CLASSES)}
    if not labels:
        del columns["kind"], features["kind"]
    return datasets.Dataset.from_dict(columns, features=datasets.Features(features))


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A DatasetDict saved to disk: train (8 a class), test (4 a class) and an unlabelled
    split without labels (2 a class), image column 'img', label column 'kind'."""
    splits = {"train": _split(8, 0), "test": _split(4, 1), "extra": _split(2, 2, labels=False)}
    datasets.DatasetDict(splits).save_to_disk(str(tmp_path / "saved"))
    return tmp_path / "saved"


HF = ["data.dataset=hf", "data.image_column=img", "data.label_column=kind"]


def _settings(root: Path, *changes: str) -> list[str]:
    return [*HF, f"data.root={root}", *TINY, "data.labels_per_class=4", *changes]


def test_a_saved_dataset_dict_trains_and_evaluates(saved, tmp_path, capsys, monkeypatch):
    settings = _settings(saved, "data.unlabeled_split=extra")
    data = load_datasets(load_config(None, settings))
    assert data.classes == CLASSES and data.channels == 3
    assert (len(data.labeled), len(data.unlabeled), len(data.test)) == (12, 24 + 6, 12)
    assert np.bincount(data.labeled.labels).tolist() == [4, 4, 4]
    assert (data.unlabeled.labels == -1).all() and data.test.labels.tolist() == [0] * 4 + [
        1
    ] * 4 + [2] * 4
    assert data.unlabeled.images.shape[1:] == (3, 14, 14)  # 12 * 8/7
    run = train_tiny(tmp_path / "run", settings)
    ev = json.loads((run / "eval.json").read_text())
    assert (ev["num_query"], ev["num_support"]) == (12, 12) and 0 <= ev["top1"] <= 100
    assert json.loads((run / "predictions.json").read_text())["classes"] == CLASSES
    code, out, _ = run_cli(["--quiet", "eval", str(run), "--json"], capsys, monkeypatch)
    assert code == 0 and json.loads(out)["top1"] == pytest.approx(ev["top1"])


def test_a_single_saved_dataset_is_the_train_split(tmp_path):
    _split(6, 3).save_to_disk(str(tmp_path / "one"))
    (tmp_path / "split.txt").write_text("0\n7\n13\n")
    settings = _settings(tmp_path / "one", f"data.split_file={tmp_path / 'split.txt'}")
    data = load_datasets(load_config(None, [*settings, "data.channels=1"]))
    assert data.test is None and data.channels == 1 and len(data.unlabeled) == 18
    assert data.labeled.names == ["0", "7", "13"] and data.labeled.labels.tolist() == [0, 1, 2]


def test_an_image_folder_trains_with_file_names_in_the_split_file(tmp_path):
    root = tmp_path / "images"
    write_folder(root / "train", 3, 6, size=14, seed=0)
    write_folder(root / "test", 3, 3, size=14, seed=1)
    (tmp_path / "split.txt").write_text("class0_0.png\nclass1/class1_2.png\nclass2_5.png\n")
    settings = [
        "data.dataset=hf",
        f"data.root={root}",
        *TINY,
        f"data.split_file={tmp_path / 'split.txt'}",
        "support.images_per_class=1",
    ]
    data = load_datasets(load_config(None, settings))
    assert data.classes == ["class0", "class1", "class2"] and data.channels == 1
    assert data.labeled.names == [
        "class0/class0_0.png",
        "class1/class1_2.png",
        "class2/class2_5.png",
    ]
    assert (len(data.unlabeled), len(data.test)) == (18, 9)
    run = train_tiny(tmp_path / "run", settings)
    assert json.loads((run / "eval.json").read_text())["num_query"] == 9


@pytest.mark.parametrize(
    "change, words",
    [
        ("data.label_column=label", ["data.label_column", "'label'", "img, kind"]),
        ("data.image_column=image", ["data.image_column", "'image'", "img, kind"]),
        ("data.test_split=validation", ["data.test_split", "'validation'", "train, test, extra"]),
        ("data.unlabeled_split=unlabelled", ["data.unlabeled_split", "train, test, extra"]),
        ("data.image_column=kind", ["column 'kind'", "not images"]),
    ],
)
def test_a_wrong_column_or_split_is_one_line(saved, tmp_path, capsys, monkeypatch, change, words):
    args = ["--quiet", "train", "--out", str(tmp_path / "run"), *set_args(_settings(saved, change))]
    code, _, err = run_cli(args, capsys, monkeypatch)
    line = error_line(err)
    assert code == 2 and all(w in line for w in words), line


def test_without_the_datasets_package_is_one_line(saved, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import machinery: "not installed"
    args = ["--quiet", "train", "--out", str(tmp_path / "run"), *set_args(_settings(saved))]
    code, _, err = run_cli(args, capsys, monkeypatch)
    assert code == 2 and "pip install 'paws-ssl[hf]'" in error_line(err)


def test_unlabelled_rows_in_the_train_split_are_one_line(tmp_path, capsys, monkeypatch):
    ds = _split(3, 4)
    labels = ds["kind"]
    ds = ds.remove_columns("kind").add_column(
        "kind", [-1, *labels[1:]], feature=ds.features["kind"]
    )
    ds.save_to_disk(str(tmp_path / "one"))
    capsys.readouterr()
    args = [
        "--quiet",
        "train",
        "--out",
        str(tmp_path / "run"),
        *set_args(_settings(tmp_path / "one")),
    ]
    code, _, err = run_cli(args, capsys, monkeypatch)
    line = error_line(err)
    assert code == 2 and "1 of the 9 images of split 'train' have no label" in line, line


def test_the_labelling_loop_reads_back_what_suggest_proposes_from_an_unlabelled_split(
    saved, tmp_path, capsys, monkeypatch
):
    """README's loop on an hf dataset: train, ``paws suggest RUN``, fill in the CSV, train
    again from it with ``--init``; the names of the unlabelled split's images resolve to
    those very images, and what is labelled is not suggested again."""
    import csv

    import torch

    first = _settings(saved, "data.unlabeled_split=extra", "data.labels_per_class=2")
    run1 = train_tiny(tmp_path / "round1", first)
    out = tmp_path / "round2.csv"
    code, _, err = run_cli(
        ["--quiet", "suggest", str(run1), "-n", "30", "--out", str(out)], capsys, monkeypatch
    )
    assert code == 0, err
    rows = list(csv.DictReader(out.open()))
    extra = [r["path"] for r in rows if r["path"].startswith("extra/")]
    assert len(rows) == 18 + 6 and len(extra) == 6  # every candidate; the split's own names
    for r in rows:  # a person labels them: the train split is 8 a class, extra 2 a class
        split_row = int(r["path"].split("/")[-1])
        r["label"] = CLASSES[split_row // (2 if r["path"] in extra else 8)]
    with out.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    second = [*_settings(saved, "data.unlabeled_split=extra"), f"data.labels_file={out}"]
    data1 = load_datasets(load_config(None, first))
    data2 = load_datasets(load_config(None, second))
    assert sorted(data2.labeled.names) == sorted(r["path"] for r in rows)
    image = dict(zip(data1.unlabeled.names, data1.unlabeled.images))
    for name, x, y in zip(data2.labeled.names, data2.labeled.images, data2.labeled.labels):
        assert torch.equal(x, image[name]), name  # the image the CSV named
        assert CLASSES[y] == next(r["label"] for r in rows if r["path"] == name)
    assert len(data2.unlabeled) == 24 + 6  # the unlabelled images as before
    args = ["--quiet", "train", "--init", str(run1), "--out", str(tmp_path / "round2")]
    code, _, err = run_cli([*args, *set_args(second)], capsys, monkeypatch)
    assert code == 0, err
    code, _, err = run_cli(
        [
            "--quiet",
            "suggest",
            str(tmp_path / "round2"),
            "-n",
            "2",
            "--out",
            str(tmp_path / "3.csv"),
        ],
        capsys,
        monkeypatch,
    )
    # Round 2 labelled every candidate but the 6 train images round 1 labelled and the file
    # left out: nothing else is suggested.
    assert code == 0, err
    again = {r["path"] for r in csv.DictReader((tmp_path / "3.csv").open())}
    assert again and not again & {r["path"] for r in rows}
