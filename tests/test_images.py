"""Reading image files: what a viewer shows is what the model sees."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paws.apply.reading import ImageReader, Preprocessing
from paws.data.images import decode_images, read_image


def _stored(size=(20, 12)) -> np.ndarray:
    """A grey picture that is not the same turned: a gradient with a bright corner."""
    w, h = size
    arr = np.add.outer(np.arange(h) * 9, np.arange(w) * 4).astype(np.uint8)
    arr[:3, :3] = 255
    return arr


def _rotated_file(tmp_path: Path, suffix: str) -> tuple[Path, np.ndarray]:
    """An image stored as the sensor saw it with EXIF orientation 6 (turn 90 degrees clockwise
    to view); returns the file and the pixels a viewer shows."""
    arr = _stored()
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / f"phone{suffix}"
    Image.fromarray(arr).save(path, exif=exif, **({"quality": 100} if suffix == ".jpg" else {}))
    return path, np.array(Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270))


@pytest.mark.parametrize("suffix", [".png", ".jpg"])
def test_an_exif_rotated_image_is_read_upright(tmp_path, suffix):
    path, shown = _rotated_file(tmp_path, suffix)
    read = np.asarray(read_image(path, channels=1), dtype=np.int16)
    assert read.shape == shown.shape == (20, 12)
    assert np.abs(read - shown).mean() < (0.01 if suffix == ".png" else 3.0)


def test_training_and_prediction_read_the_rotated_image_alike(tmp_path):
    path, shown = _rotated_file(tmp_path, ".png")
    # Training decodes the file into memory ...
    images, _, _ = decode_images([path], 12, 1)
    assert torch.equal(images[0, 0], torch.from_numpy(shown[4:16]))
    # ... prediction reads it, or the PIL image a Python user opened, through one rule.
    prep = Preprocessing(12, 1.0, (0.0,), (1.0,), 1)
    reader = ImageReader(prep)
    from_file = next(reader.batches([path], torch.device("cpu"))).x
    from_pil = next(reader.batches([Image.open(path)], torch.device("cpu"))).x
    assert torch.equal(from_file, from_pil)
    assert torch.allclose(from_file[0, 0], torch.from_numpy(shown[4:16]).float() / 255, atol=1e-6)


def test_a_float_tiff_in_0_1_is_scaled_to_8_bits(tmp_path):
    arr = np.linspace(0, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    path = tmp_path / "float.tif"
    Image.fromarray(arr, mode="F").save(path)
    assert Image.open(path).mode == "F"
    read = np.asarray(read_image(path, channels=1), dtype=np.int16)
    assert np.abs(read - np.rint(arr * 255)).max() <= 1
    # On the 0..255 scale already, a float image is taken as it is.
    Image.fromarray(arr * 200 + 20, mode="F").save(tmp_path / "wide.tif")
    wide = np.asarray(read_image(tmp_path / "wide.tif", channels=1), dtype=np.int16)
    assert np.abs(wide - np.rint(arr * 200 + 20)).max() <= 1


def _png(path: Path, value: int = 90) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def test_a_linked_folder_is_followed_once_and_a_loop_is_skipped(tmp_path, capsys):
    from paws.data.images import scan_images

    elsewhere = tmp_path / "elsewhere"
    for i in range(3):
        _png(elsewhere / f"e{i}.png")
    unl = tmp_path / "unlabeled"
    _png(unl / "own" / "a.png")
    (unl / "linked").symlink_to(elsewhere, target_is_directory=True)
    (unl / "again").symlink_to(elsewhere, target_is_directory=True)  # the same images twice
    (unl / "own" / "up").symlink_to(unl, target_is_directory=True)  # a loop
    _png(unl / ".ipynb_checkpoints" / "a-checkpoint.png")
    files = scan_images(unl)
    assert [f.relative_to(unl).as_posix() for f in files] == [
        "again/e0.png",
        "again/e1.png",
        "again/e2.png",
        "own/a.png",
    ]
    err = capsys.readouterr().err
    assert "own/up" in err and "leads back" in err and "read already" in err


def test_a_link_to_the_labelled_folder_inside_it_is_not_a_class(tmp_path, capsys):
    from paws.data.images import scan_labeled_folder

    lab = tmp_path / "labeled"
    _png(lab / "cat" / "c.png")
    _png(lab / "dog" / "d.png")
    (lab / "all").symlink_to(lab, target_is_directory=True)
    (lab / "dog" / "more").symlink_to(lab, target_is_directory=True)
    files, labels, classes = scan_labeled_folder(lab)
    assert classes == ["cat", "dog"]
    assert [f.name for f in files] == ["c.png", "d.png"] and labels.tolist() == [0, 1]
    assert capsys.readouterr().err.count("leads back") == 2


def test_two_class_folders_that_are_one_folder_are_refused(tmp_path):
    from paws.data.images import scan_labeled_folder
    from paws.errors import UserError

    lab = tmp_path / "labeled"
    _png(lab / "cat" / "c.png")
    (lab / "kitten").symlink_to(lab / "cat", target_is_directory=True)
    with pytest.raises(UserError, match="'cat' and 'kitten'.*one folder"):
        scan_labeled_folder(lab)
