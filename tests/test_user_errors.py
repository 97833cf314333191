"""Every mistake a user can make ends in one line on stderr, exit status 2 and no traceback.

Each test runs the ``paws`` command (in this process, through ``paws.cli.main``) on a tiny image
folder or config with one thing wrong, and checks the exact line.
"""

from __future__ import annotations

import errno
import math
import os
import pickle
import re
import shutil
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import (
    ANIMALS,
    error_line,
    run_cli,
    tiny_config,
    write_config,
    write_evil_checkpoint,
    write_folder,
)

import paws.files
import paws.pretrain.step
from paws import cli
from paws.config import load_config
from paws.data import load_cifar
from paws.errors import UserError

DISK = ["data.in_memory=no", "data.workers=2"]


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    return write_folder(tmp_path / "labeled", names=ANIMALS, channels=3)


def paws_train(tmp_path, capsys, monkeypatch, cfg: dict, *extra: str, quiet: bool = True):
    """``paws [--quiet] train --config CFG --out RUN EXTRA``: (exit code, stdout, stderr)."""
    path = write_config(tmp_path / "cfg.yaml", cfg)
    argv = ["train", "--config", str(path), "--out", str(tmp_path / "run"), *extra]
    return run_cli(["--quiet", *argv] if quiet else argv, capsys, monkeypatch)


def expect_error(result: tuple[int, str, str]) -> str:
    code, _, err = result
    assert code == 2, err
    return error_line(err)


# --------------------------------------------------------------------------------------------
# Data.


def test_missing_data_folder(tmp_path, capsys, monkeypatch):
    cfg = tiny_config(tmp_path / "nowhere")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line == f"labelled folder not found: {tmp_path / 'nowhere'}"


def test_empty_data_folder(tmp_path, capsys, monkeypatch):
    (tmp_path / "empty").mkdir()
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, tiny_config(tmp_path / "empty")))
    assert line == (
        f"{tmp_path / 'empty'} has no class sub-folders: arrange labelled images as <class>/<image>"
    )


def test_empty_unlabelled_folder(folder, tmp_path, capsys, monkeypatch):
    (tmp_path / "unl").mkdir()
    cfg = tiny_config(folder, f"data.unlabeled={tmp_path / 'unl'}")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line.startswith(f"no images found in {tmp_path / 'unl'} (looked for .jpg, .jpeg,")


def test_empty_class_folder(folder, tmp_path, capsys, monkeypatch):
    (folder / "emu").mkdir()
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, tiny_config(folder)))
    assert line == f"class folder {folder / 'emu'} holds no images; add images or remove the folder"


def _truncated_jpeg(folder: Path) -> Path:
    path = folder / "cat" / "cut.jpg"
    from PIL import Image

    Image.open(folder / "cat" / "cat_0.png").save(path, quality=95)
    path.write_bytes(path.read_bytes()[:300])
    return path


def _text_as_jpeg(folder: Path) -> Path:
    path = folder / "dog" / "notes.jpg"
    path.write_text("shopping list: milk, eggs\n")
    return path


@pytest.mark.parametrize("storage", ["memory", "disk"])
@pytest.mark.parametrize("bad", [_truncated_jpeg, _text_as_jpeg], ids=["truncated", "text"])
def test_unreadable_image_names_the_file(bad, storage, folder, tmp_path, capsys, monkeypatch):
    # On disk the file is read in a data-loader worker process, which wraps the error.
    path = bad(folder)
    cfg = tiny_config(folder, *(DISK if storage == "disk" else []))
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line.startswith(f"cannot read image {path}: ")
    assert line.endswith("; fix or remove it, or set data.on_bad_image: skip")


def test_unreadable_images_skipped_in_memory_are_counted(folder, tmp_path, capfd, monkeypatch):
    bad = [_truncated_jpeg(folder), _text_as_jpeg(folder)]
    cfg = tiny_config(folder, "data.on_bad_image=skip", "optim.steps=2")
    code, out, err = paws_train(tmp_path, capfd, monkeypatch, cfg, quiet=False)
    assert code == 0, err
    listing = tmp_path / "run" / "skipped_images.txt"
    assert f"skipped 2 unreadable images (listed in {listing})" in out
    assert (out + err).count("unreadable images") == 1  # said once
    assert sorted(listing.read_text().split()) == sorted(map(str, bad))
    assert "data: 18 unlabelled, 18 labelled (3 classes)" in err
    assert (tmp_path / "run" / "final.pt").is_file()


def test_unreadable_images_skipped_on_disk_are_counted(folder, tmp_path, capfd, monkeypatch):
    # Left out of every set before the data-loader workers start: a labelled image is never
    # read as a blank image of its class.
    bad = [_truncated_jpeg(folder), _text_as_jpeg(folder)]
    cfg = tiny_config(folder, "data.on_bad_image=skip", "optim.steps=4", *DISK)
    code, out, err = paws_train(tmp_path, capfd, monkeypatch, cfg, quiet=False)
    assert code == 0, err
    listing = tmp_path / "run" / "skipped_images.txt"
    assert f"skipped 2 unreadable images (listed in {listing})" in out
    assert sorted(listing.read_text().split()) == sorted(map(str, bad))
    assert "data: 18 unlabelled, 18 labelled (3 classes)" in err
    assert "Traceback" not in err
    assert (tmp_path / "run" / "final.pt").is_file()


def test_split_file_naming_missing_images(folder, tmp_path, capsys, monkeypatch):
    split = tmp_path / "split.txt"
    split.write_text("cat_0.png\ndog_1.png\nfox_9.png\n")
    line = expect_error(
        paws_train(tmp_path, capsys, monkeypatch, tiny_config(folder, f"data.split_file={split}"))
    )
    assert line == (
        f"split file {split} names 1 image(s) not in the dataset, e.g. 'fox_9.png'; fix the "
        "names or the data folder"
    )


def test_class_with_fewer_than_k_labelled_images_trains_and_says_so(
    folder, tmp_path, capsys, monkeypatch
):
    for p in sorted((folder / "dog").iterdir())[1:]:
        p.unlink()  # one labelled dog
    cfg = tiny_config(folder, "support.images_per_class=4")
    code, out, err = paws_train(tmp_path, capsys, monkeypatch, cfg, quiet=False)
    assert code == 0, err
    assert "1 labelled class has fewer images than support.images_per_class (4): 'dog' (1)" in err
    assert "run saved in" in out


def test_more_support_classes_than_classes(folder, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(folder, "support.classes=5")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line == (
        "support.classes is 5 but the labelled set has only 3 classes; set support.classes "
        "to at most 3"
    )


# --------------------------------------------------------------------------------------------
# Config.


@pytest.mark.parametrize(
    "section, key, value, message",
    [
        ("optim", "bach_size", 6, "unknown config key 'optim.bach_size'; did you mean "
         "'optim.batch_size'?"),
        ("optim", "steps", "ten", "optim.steps must be int or null, got 'ten'"),
        ("optim", "momentum", 2, "optim.momentum must be in [0.0, 0.9999], got 2.0"),
        ("data", "on_bad_image", "skipp", "data.on_bad_image must be one of error, skip; got "
         "'skipp' (did you mean 'skip'?)"),
        ("optim", "ref_lr", float("nan"), "optim.ref_lr must be a finite number, got nan"),
    ],
)  # fmt: skip
def test_bad_config_value(section, key, value, message, folder, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(folder)
    cfg[section][key] = value
    assert expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg)) == message


def test_misspelt_section_and_override(folder, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(folder)
    cfg["optm"] = cfg.pop("optim")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line == "unknown config key 'optm'; did you mean 'optim'?"
    line = expect_error(
        paws_train(tmp_path, capsys, monkeypatch, tiny_config(folder), "--set", "run.sed=1")
    )
    assert line == "unknown config key 'run.sed'; did you mean 'run.seed'?"


def test_values_as_users_write_them_in_yaml(tmp_path):
    # YAML 1.1 reads `no` and `off` as booleans and 1e-4 as a string.
    path = tmp_path / "cfg.yaml"
    path.write_text(
        "data:\n  in_memory: no\noptim:\n  weight_decay: 1e-4\n  steps: 2e3\nrun:\n  amp: off\n"
    )
    cfg = load_config(path)
    assert cfg.data.in_memory is False and cfg.run.amp == "off"
    assert cfg.optim.weight_decay == 1e-4 and cfg.optim.steps == 2000
    assert load_config(None, ["data.in_memory=yes", "optim.ref_lr=3e-1"]).optim.ref_lr == 0.3


def test_debug_shows_the_traceback(tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(tmp_path / "nowhere"))
    with pytest.raises(UserError, match="labelled folder not found"):
        cli.main(["--debug", "--quiet", "train", "--config", str(cfg), "--out", str(tmp_path)])


# --------------------------------------------------------------------------------------------
# Training.


def _finite_checkpoint(path: Path) -> int:
    state = torch.load(path, weights_only=True)
    tensors = list(state["model"].values())
    tensors += [v for s in state["optimizer"]["state"].values() for v in s.values()]
    assert all(torch.isfinite(t).all() for t in tensors if t.is_floating_point())
    return state["step"]


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(
    folder, tmp_path, capsys, monkeypatch
):
    calls, real_loss = [], paws.pretrain.step.paws_loss

    def loss_nan_at_step_7(*args, **kwargs):
        calls.append(1)
        ce, me = real_loss(*args, **kwargs)
        return (ce * math.nan, me) if len(calls) == 7 else (ce, me)

    monkeypatch.setattr(paws.pretrain.step, "paws_loss", loss_nan_at_step_7)
    cfg = tiny_config(folder, "run.checkpoint_every=3")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    run = tmp_path / "run"
    assert line == (
        f"the loss became nan by step 7; the last good checkpoint is {run / 'last.pt'} (step 6); "
        "lower optim.ref_lr or check the data"
    )
    assert _finite_checkpoint(run / "last.pt") == 6


def test_divergence_never_names_a_corrupt_checkpoint(folder, tmp_path, capsys, monkeypatch):
    # An absurd learning rate sends weights and batch-norm statistics to infinity a step or
    # more before the loss itself turns NaN; checkpoints are written every step.
    cfg = tiny_config(folder, "run.checkpoint_every=1")
    cfg["optim"].update(start_lr=1e6, ref_lr=1e6, final_lr=1e6)
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    run = tmp_path / "run"
    m = re.fullmatch(
        r"the (?:loss became nan|weights became infinite or NaN) by step (\d+); the last "
        rf"good checkpoint is {re.escape(str(run / 'last.pt'))} \(step (\d+)\); lower "
        r"optim.ref_lr or check the data",
        line,
    )
    assert m, line
    assert _finite_checkpoint(run / "last.pt") == int(m.group(2)) < int(m.group(1))


def test_disk_full_while_checkpointing(folder, tmp_path, capsys, monkeypatch):
    real_fdopen, opened = os.fdopen, []

    def full_after_first(fd, mode="r", *args, **kwargs):
        f = real_fdopen(fd, mode, *args, **kwargs)
        if ".last.pt." not in os.readlink(f"/proc/self/fd/{fd}"):
            return f  # only checkpoints fill the disk
        opened.append(f)
        if len(opened) == 1:
            return f
        f.write(b"PK\x03\x04 the first bytes")
        f.close()
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    fake_os = types.SimpleNamespace(
        **{k: getattr(os, k) for k in dir(os) if not k.startswith("__")}
    )
    fake_os.fdopen = full_after_first
    monkeypatch.setattr(paws.files, "os", fake_os)
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, tiny_config(folder)))
    run = tmp_path / "run"
    assert re.fullmatch(
        re.escape(f"could not write checkpoint {run / 'last.pt'}: no space left on the disk ")
        + r"mounted at /\S*, [\d,.]+ MB free; the previous checkpoint is intact",
        line,
    ), line
    assert _finite_checkpoint(run / "last.pt") == 4
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.pt", "metrics.csv"]
    monkeypatch.setattr(paws.files, "os", os)  # space freed: the run resumes
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, monkeypatch)
    assert code == 0, err
    assert torch.load(run / "final.pt", weights_only=True)["step"] == 16


# --------------------------------------------------------------------------------------------
# Files crafted to run code.


@pytest.mark.parametrize("fmt", ["pickle", "torch zip"])
def test_eval_and_resume_refuse_a_checkpoint_that_runs_code(
    fmt, folder, tmp_path, capsys, monkeypatch
):
    marker = tmp_path / "pwned"
    run = tmp_path / "run"
    run.mkdir()
    write_config(run / "config.yaml", tiny_config(folder))
    evil = write_evil_checkpoint(run / "last.pt", marker, fmt)
    refused = (
        f"cannot load checkpoint {evil}: it holds objects other than tensors and plain values, "
        "refused for safety"
    )
    assert expect_error(run_cli(["eval", str(evil)], capsys, monkeypatch)) == refused
    assert expect_error(run_cli(["eval", str(run)], capsys, monkeypatch)) == refused
    resume = ["--quiet", "train", "--resume", str(run)]
    assert expect_error(run_cli(resume, capsys, monkeypatch)) == refused
    assert not marker.exists()


def _cifar10_folder(root: Path, batch: bytes | None = None) -> Path:
    """A CIFAR-10 python-batch folder with 2 images per file (as Python 3 pickles them)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = {"data": rng.integers(0, 255, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(batch or pickle.dumps(data, protocol=2))
    meta = {"label_names": ["airplane", "automobile"]}
    (folder / "batches.meta").write_bytes(batch or pickle.dumps(meta, protocol=2))
    return root


def test_cifar_batches_load_with_the_restricted_unpickler(tmp_path):
    train, test, classes = load_cifar(str(_cifar10_folder(tmp_path)), "cifar10")
    assert train.images.shape == (10, 3, 32, 32) and test.images.shape == (2, 3, 32, 32)
    assert classes == ["airplane", "automobile"] and train.labels.tolist() == [0, 1] * 5


def test_cifar_batch_that_runs_code_is_refused(tmp_path, capsys, monkeypatch):
    marker = tmp_path / "pwned"
    root = _cifar10_folder(tmp_path / "cifar")
    evil = root / "cifar-10-batches-py" / "data_batch_3"
    evil.write_bytes(pickle.dumps({"data": _Shell(f"touch {marker}"), "labels": [0]}))
    cfg = {"data": {"dataset": "cifar10", "root": str(root)}, "run": {"device": "cpu"}}
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line == f"cannot read CIFAR batch {evil}: refusing to load {os.system.__module__}.system"
    assert not marker.exists()


class _Shell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def test_a_me_max_prior_of_the_wrong_length_or_negative_is_one_line(
    folder, tmp_path, capsys, monkeypatch
):
    cfg = tiny_config(folder, "loss.me_max_prior=[0.5,0.5]")  # the folder has 3 classes
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line.startswith("loss.me_max_prior has 2 numbers but there are 3 classes")
    cfg = tiny_config(folder, "loss.me_max_prior=[0.5,-0.2,0.7]")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert "non-negative" in line and "-0.2" in line
    cfg = tiny_config(folder, "loss.me_max_prior=estimatd")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert "did you mean 'estimated'" in line


def test_no_output_may_overwrite_an_input_or_land_in_the_data(shared_run, tmp_path, capsys):
    from tiny import error_line

    from paws.cli import main

    paths, run_dir = shared_run
    photo = tmp_path / "photo.png"
    shutil.copy(next((paths["test"] / "class0").iterdir()), photo)
    before = photo.read_bytes()
    cases = [
        (["predict", str(run_dir), str(photo), "--out", str(photo)], "is one of the inputs"),
        (
            ["embed", str(run_dir), str(photo), "--out", str(tmp_path / "photo.npy")],
            None,  # photo.npy and photo.txt are not inputs: allowed
        ),
        (
            ["export", str(run_dir), "--out", str(paths["labeled"] / "class0")],
            "lies inside the data folder",
        ),
        (
            [
                "suggest",
                str(run_dir),
                "-n",
                "2",
                "--out",
                str(tmp_path / "s.csv"),
                "--html",
                str(tmp_path / "s.csv"),
            ],
            "--html",
        ),
    ]
    for argv, message in cases:
        code = main(["--quiet", *argv])
        err = capsys.readouterr().err
        if message is None:
            assert code == 0, err
            continue
        assert code == 2, (argv, err)
        assert message in error_line(err), err
    assert photo.read_bytes() == before
    assert not any(p.suffix == ".json" for p in (paths["labeled"] / "class0").iterdir())
    assert not (tmp_path / "s.csv").exists()
