"""Tiny synthetic image folders and pre-training runs shared by the tests after pre-training.

Each class is a texture (stripes of one orientation, a checkerboard, a blob...) at its own
brightness, with a random phase and noise: easy enough that a few pre-training steps of a tiny
CNN separate the classes, new ones included, without every setting reaching 100%.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from paws.config import load_config
from paws.train import train

SIZE = 16


def pattern(c: int, rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A (size, size) uint8 image of class ``c`` (0..5)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    phase = rng.uniform(0, 2 * np.pi)
    if c == 0:
        img = np.sin(y * np.pi / 2 + phase)
    elif c == 1:
        img = np.sin(x * np.pi / 2 + phase)
    elif c == 2:
        img = np.sin(x * np.pi / 2 + phase) * np.sin(y * np.pi / 2 + phase)
    elif c == 3:
        r2 = (x - size / 2 + rng.uniform(-2, 2)) ** 2 + (y - size / 2 + rng.uniform(-2, 2)) ** 2
        img = 2 * np.exp(-r2 / (size / 3) ** 2) - 1
    elif c == 4:
        img = np.sin((x + y) * np.pi / 3 + phase)
    else:
        img = np.sign(np.sin(x * np.pi / 8 + phase)) * 0.8
    # Each class also has its own brightness, so that even new classes separate easily.
    level = 40 + 30 * c
    img = level + 40 * img + rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_folder(root: Path, classes: list[int], per_class: int, seed: int) -> Path:
    """``root/<class>/<i>.png`` images; returns ``root``."""
    rng = np.random.default_rng(seed)
    for c in classes:
        d = root / f"class{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(pattern(c, rng)).save(d / f"{i}.png")
    return root


def make_data(root: Path, labeled_classes: list[int], all_classes: list[int]) -> dict[str, Path]:
    """Labelled (8 per class of ``labeled_classes``), unlabelled (24 per class of
    ``all_classes``), test (12 per labelled class) and a support folder (6 per class of
    ``all_classes``) plus test images of every class (``test_all``)."""
    return {
        "labeled": write_folder(root / "labeled", labeled_classes, 8, 1),
        "unlabeled": write_folder(root / "unlabeled", all_classes, 24, 2),
        "test": write_folder(root / "test", labeled_classes, 12, 3),
        "support": write_folder(root / "support", all_classes, 6, 4),
        "test_all": write_folder(root / "test_all", all_classes, 12, 5),
    }


def tiny_overrides(paths: dict[str, Path], steps: int = 16) -> list[str]:
    """A small, fast config for a folder dataset."""
    return [
        "data.dataset=folder",
        f"data.labeled={paths['labeled']}",
        f"data.unlabeled={paths['unlabeled']}",
        f"data.test={paths['test']}",
        f"data.image_size={SIZE}",
        "data.workers=0",
        f"views.large_size={SIZE}",
        "views.small_size=8",
        "views.small_crops=1",
        "model.encoder=cnn_small",
        "model.width=6",
        "model.proj_hidden=32",
        "model.proj_out=16",
        "support.classes=4",
        "support.images_per_class=4",
        "optim.batch_size=32",
        f"optim.steps={steps}",
        "optim.warmup_epochs=0",
        "optim.ref_lr=0.6",
        "optim.start_lr=0.6",
        "eval.batch_size=32",
        "run.device=cpu",
        "run.monitor_every=0",
    ]


def pretrain(root: Path, labeled_classes: list[int], all_classes: list[int], steps: int = 16):
    """Write the folders and pre-train a tiny run in ``root/run``; returns (paths, run dir)."""
    paths = make_data(root / "data", labeled_classes, all_classes)
    cfg = load_config(None, tiny_overrides(paths, steps))
    run = root / "run"
    train(cfg, run)
    return paths, run


_SHARED: dict[str, tuple[dict[str, Path], Path]] = {}


def shared_run(tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """One tiny run shared by all tests of a pytest run, pre-trained with labels of classes 0-3
    only while the unlabelled images hold classes 0-5 (classes 4 and 5 are new to the labels)."""
    if "run" not in _SHARED:
        root = tmp_path_factory.mktemp("shared_run")
        _SHARED["run"] = pretrain(root, [0, 1, 2, 3], [0, 1, 2, 3, 4, 5])
    return _SHARED["run"]
