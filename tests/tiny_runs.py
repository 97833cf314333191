"""Tiny image folders and PAWS runs on them, for tests that need a whole run directory."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from paws.config import load_config
from paws.train import train

CLASSES = ("disc", "stripes", "square")


def picture(kind: int, rng: np.random.Generator, size: int = 14) -> np.ndarray:
    """A grey image whose class is visible: a disc, vertical stripes or a square."""
    y, x = np.mgrid[:size, :size]
    cy, cx = rng.uniform(size * 0.35, size * 0.65, 2)
    if kind == 0:
        mask = (y - cy) ** 2 + (x - cx) ** 2 < (size / 4) ** 2
    elif kind == 1:
        mask = (x // 2) % 2 == 0
    else:
        mask = (abs(y - cy) < size / 4) & (abs(x - cx) < size / 4)
    img = np.where(mask, 220, 30) + rng.normal(0, 12, (size, size))
    return np.clip(img, 0, 255).astype(np.uint8)


def image_folder(root: Path, per_class: int, seed: int) -> Path:
    """A ``<class>/<image>.png`` folder of ``per_class`` pictures of each class."""
    rng = np.random.default_rng(seed)
    for c, name in enumerate(CLASSES):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(picture(c, rng)).save(root / name / f"{i}.png")
    return root


def image_folders(root: Path) -> tuple[Path, Path]:
    """Labelled (8 a class) and test (10 a class) folders below ``root``."""
    return image_folder(root / "labeled", 8, 0), image_folder(root / "test", 10, 1)


def tiny_overrides(folders: tuple[Path, Path]) -> list[str]:
    """Config overrides of a run that takes about a second a step on one CPU core."""
    return [
        "data.dataset=folder",
        f"data.labeled={folders[0]}",
        f"data.test={folders[1]}",
        "data.workers=0",
        "views.large_size=12",
        "views.small_size=8",
        "views.small_crops=1",
        "model.width=4",
        "model.proj_hidden=16",
        "model.proj_out=8",
        "support.classes=3",
        "support.images_per_class=2",
        "optim.batch_size=8",
        "optim.steps=6",
        "run.device=cpu",
        "run.log_every=1",
        "run.monitor_every=2",
        "run.eval_every=3",
        "run.checkpoint_every=100",
    ]


def tiny_run(out: Path, folders: tuple[Path, Path], extra: list[str] | None = None) -> Path:
    """Train a tiny run into ``out`` (6 steps; monitor every 2, evaluate every 3)."""
    cfg = load_config(None, tiny_overrides(folders) + list(extra or []))
    result = train(cfg, out)
    assert result["status"] == "done"
    return out
