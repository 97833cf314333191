"""Shared fixtures: tiny synthetic image folders and configs that train in seconds."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

# Settings that make a run tiny: 12-pixel views, a 4-channel CNN, a handful of steps.
TINY = [
    "views.large_size=12",
    "views.small_size=8",
    "views.small_crops=2",
    "model.width=4",
    "model.proj_hidden=16",
    "model.proj_out=8",
    "optim.batch_size=8",
    "optim.steps=4",
    "optim.warmup_epochs=0",
    "support.classes=3",
    "support.images_per_class=2",
    "run.log_every=1",
    "run.checkpoint_every=2",
    "run.monitor_every=2",
    "run.threads=1",
    "eval.batch_size=16",
    "data.workers=0",
]


def pattern(label: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """A grey image whose stripe orientation and position depend on the class, plus noise."""
    img = rng.integers(0, 40, (size, size)).astype(np.uint8)
    k = label % 4
    if k == 0:
        img[:, (label // 4) % size :: 3] += 180
    elif k == 1:
        img[(label // 4) % size :: 3, :] += 180
    elif k == 2:
        np.fill_diagonal(img, 220)
        img[: size // 2, : size // 2] += 100
    else:
        img[size // 3 : 2 * size // 3, size // 3 : 2 * size // 3] = 230
    return img


def write_folder(
    root: Path,
    classes: int = 3,
    per_class: int = 6,
    size: int = 14,
    mode: str = "L",
    seed: int = 0,
    names: list[str] | None = None,
) -> Path:
    """Write ``root/<class>/<i>.png`` images of class-dependent patterns; returns root."""
    rng = np.random.default_rng(seed)
    names = names or [f"class_{c}" for c in range(classes)]
    for c, name in enumerate(names):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            im = Image.fromarray(pattern(c, size, rng))
            if mode != "L":
                im = im.convert(mode)
            im.save(d / f"{name}_{i}.png")
    return root


@pytest.fixture
def image_folders(tmp_path: Path) -> dict[str, Path]:
    """Labelled, unlabelled (nested, any layout) and test folders of 3 classes."""
    labeled = write_folder(tmp_path / "labeled", per_class=4, seed=1)
    test = write_folder(tmp_path / "test", per_class=4, seed=2)
    unl = tmp_path / "unlabeled"
    write_folder(unl / "batch_a", per_class=4, seed=3)
    write_folder(unl / "batch_b" / "deeper", per_class=4, seed=4)
    return {"labeled": labeled, "unlabeled": unl, "test": test, "root": tmp_path}


def folder_overrides(folders: dict[str, Path], *extra: str) -> list[str]:
    """--set values for a tiny run on the ``image_folders`` fixture."""
    return [
        "data.dataset=folder",
        f"data.labeled={folders['labeled']}",
        f"data.unlabeled={folders['unlabeled']}",
        f"data.test={folders['test']}",
        *TINY,
        *extra,
    ]
