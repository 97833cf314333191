"""Fixtures: tiny image folders, a colour folder to break, a pool of unlabelled images, a tiny
pre-trained run shared by all tests, and a run with its export to damage (helpers are in
``tiny.py``)."""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import (
    ANIMALS,
    RESUMABLE,
    tiny_config,
    tiny_overrides,
    torch_state,
    train_tiny,
    write_config,
    write_folder,
)

from paws import cli


@pytest.fixture
def image_folders(tmp_path: Path) -> dict[str, Path]:
    """Labelled, unlabelled (nested, any layout) and test folders of 3 classes, 14-pixel grey
    images, 4 a class in each."""
    images = {"per_class": 4, "size": 14}
    unlabeled = tmp_path / "unlabeled"
    write_folder(unlabeled / "batch_a", **images, seed=3)
    write_folder(unlabeled / "batch_b" / "deeper", **images, seed=4)
    return {
        "labeled": write_folder(tmp_path / "labeled", **images, seed=1),
        "unlabeled": unlabeled,
        "test": write_folder(tmp_path / "test", **images, seed=2),
        "root": tmp_path,
    }


@pytest.fixture(scope="session")
def labeled_and_test(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Labelled (8 a class) and test (10 a class) folders of 3 classes of 14-pixel grey images,
    shared by the tests that only read them."""
    root = tmp_path_factory.mktemp("labeled_and_test")
    return {
        "labeled": write_folder(root / "labeled", per_class=8, size=14, seed=0),
        "test": write_folder(root / "test", per_class=10, size=14, seed=1),
    }


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], Path]:
    """One tiny run shared by all tests, pre-trained with labels of classes 0-3 only while the
    unlabelled images hold classes 0-5 (classes 4 and 5 are new to the labels).

    Returns the folders (``labeled``: 8 a class of 0-3, ``unlabeled``: 24 a class of 0-5,
    ``test``: 12 a class of 0-3, ``support``: 6 a class of 0-5, ``test_all``: 12 a class of 0-5;
    16-pixel grey images) and the run directory.
    """
    root = tmp_path_factory.mktemp("shared_run")
    old, every = [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]
    data = root / "data"
    paths = {
        "labeled": write_folder(data / "labeled", old, 8, size=16, seed=1),
        "unlabeled": write_folder(data / "unlabeled", every, 24, size=16, seed=2),
        "test": write_folder(data / "test", old, 12, size=16, seed=3),
        "support": write_folder(data / "support", every, 6, size=16, seed=4),
        "test_all": write_folder(data / "test_all", every, 12, size=16, seed=5),
    }
    # Larger than the other tiny runs, so that the encoder separates the classes well enough for
    # PAWS-NN, fine-tuning and new classes to beat chance clearly.
    settings = [
        "data.image_size=16",
        "views.large_size=16",
        "views.small_crops=1",
        "model.width=6",
        "model.proj_hidden=32",
        "model.proj_out=16",
        "support.classes=4",
        "support.images_per_class=4",
        "optim.batch_size=32",
        "optim.steps=16",
        "optim.warmup_epochs=0",
        "optim.ref_lr=0.6",
        "optim.start_lr=0.6",
        "eval.batch_size=32",
    ]
    return paths, train_tiny(root / "run", tiny_overrides(paths, *settings))


@pytest.fixture
def pool(tmp_path: Path) -> dict[str, Path]:
    """An unlabelled folder of classes 0-2 (8 each), a labelled one (3 each), a test one."""
    return {
        "unlabeled": write_folder(tmp_path / "unl", 3, 8, seed=2),
        "labeled": write_folder(tmp_path / "lab", 3, 3, seed=1),
        "test": write_folder(tmp_path / "test", 3, 3, seed=3),
    }


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A labelled colour folder of cat, dog and fox (6 images a class), for a test to break."""
    return write_folder(tmp_path / "labeled", names=ANIMALS, channels=3)


@pytest.fixture(scope="session")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny run with a test set (4 steps), its export and a query image, made once for the
    tests that damage copies of their files (``tiny.Cases``), never the files themselves."""
    root = tmp_path_factory.mktemp("bad_inputs")
    labeled = write_folder(root / "labeled", names=ANIMALS, channels=3)
    test = write_folder(root / "test", names=ANIMALS, channels=3, per_class=2, seed=3)
    settings = [*RESUMABLE, "optim.steps=4", "run.checkpoint_every=4"]
    run = train_tiny(root / "run", tiny_overrides({"labeled": labeled, "test": test}, *settings))
    with torch_state():
        assert cli.main(["--quiet", "export", str(run), "--out", str(root / "export")]) == 0
    config = write_config(root / "cfg.yaml", tiny_config(labeled, "optim.steps=2"))
    return {
        "root": root,
        "labeled": labeled,
        "test": test,
        "run": run,
        "export": root / "export",
        "config": config,
        "image": test / "cat" / "cat_0.png",
    }
