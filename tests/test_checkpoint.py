"""Checkpoints: atomic writes that survive a full disk or an interrupt part-way, RNG states that
round-trip, and loading that refuses anything but tensors and plain values; through the paws
command, every damaged entry, tensor or truncated file refused in one line."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import re
import shutil
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tiny import (
    WRONG,
    Cases,
    copy_run,
    expect_error,
    finite_checkpoint,
    paws_train,
    run_cli,
    tiny_config,
    weight_damage,
    write_config,
    write_evil_checkpoint,
)

import paws
import paws.files
import paws.pretrain.step
from paws.errors import UserError
from paws.rundir import checkpoint

SRC = Path(paws.__file__).parent


def _state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(64, 64, generator=g), "b": torch.randn(64, generator=g)},
        "config": {"run": {"seed": seed}},
        "step": seed,
    }


def _assert_state(loaded: dict, want: dict) -> None:
    assert loaded["step"] == want["step"] and loaded["config"] == want["config"]
    for k in want["model"]:
        assert torch.equal(loaded["model"][k], want["model"][k])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


class _FillingFile(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full disk does."""

    def __init__(self, f: io.BufferedWriter, room: int):
        self.f, self.room = f, room

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        b = bytes(b)
        if len(b) > self.room:
            self.f.write(b[: self.room])
            self.room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(b)
        return self.f.write(b)

    def flush(self) -> None:
        self.f.flush()

    def fileno(self) -> int:
        return self.f.fileno()

    def close(self) -> None:
        super().close()
        self.f.close()


def _disk_fills_after(monkeypatch: pytest.MonkeyPatch, room: int) -> None:
    """Make checkpoint writes fail with ENOSPC after ``room`` bytes (only in
    paws.rundir.checkpoint)."""
    names = [k for k in dir(os) if not k.startswith("__")]
    fake_os = types.SimpleNamespace(**{k: getattr(os, k) for k in names})
    fake_os.fdopen = lambda fd, mode="r", *a, **kw: _FillingFile(os.fdopen(fd, mode), room)
    monkeypatch.setattr(paws.files, "os", fake_os)


def test_save_then_load_round_trip_and_replace(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(_state(1), path)
    _assert_state(checkpoint.load(path), _state(1))
    checkpoint.save(_state(2), path)
    _assert_state(checkpoint.load(path), _state(2))
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("how", ["file write", "torch.save"])
def test_write_failing_part_way_keeps_the_previous_checkpoint(how, tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(_state(1), path)
    if how == "file write":
        _disk_fills_after(monkeypatch, room=4096)  # the new file is ~17 kB
    else:
        real_save = torch.save

        def half_save(obj, f, *args, **kwargs):
            buf = io.BytesIO()
            real_save(obj, buf)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(torch, "save", half_save)
    with pytest.raises(UserError) as e:
        checkpoint.save(_state(2), path)
    msg = str(e.value)
    assert "\n" not in msg
    assert re.fullmatch(
        re.escape(f"could not write checkpoint {path}: no space left on the disk mounted at ")
        + r"/\S*, [\d,.]+ MB free; the previous checkpoint is intact",
        msg,
    ), msg
    monkeypatch.undo()
    _assert_state(checkpoint.load(path), _state(1))
    assert _leftovers(tmp_path) == []


def test_first_checkpoint_on_a_full_disk_says_there_is_none(tmp_path, monkeypatch):
    _disk_fills_after(monkeypatch, room=100)
    with pytest.raises(UserError, match="no earlier checkpoint exists"):
        checkpoint.save(_state(1), tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


def test_interrupt_during_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    checkpoint.save(_state(1), path)

    def interrupted(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 partial")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(_state(2), path)
    monkeypatch.undo()
    _assert_state(checkpoint.load(path), _state(1))
    assert _leftovers(tmp_path) == []


def test_rng_states_round_trip_through_a_checkpoint(tmp_path):
    random.seed(3)
    np.random.seed(4)
    torch.manual_seed(5)
    random.random(), np.random.rand(), torch.randn(2)  # not at the seeds' start
    np.random.randn()  # leaves a cached Gaussian in NumPy's state
    checkpoint.save({"model": {}, "config": {}, "rng": checkpoint.rng_state()}, tmp_path / "c.pt")
    want = (random.random(), np.random.randn(3), torch.randn(3))
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    checkpoint.set_rng_state(checkpoint.load(tmp_path / "c.pt")["rng"])
    got = (random.random(), np.random.randn(3), torch.randn(3))
    assert got[0] == want[0]
    assert np.array_equal(got[1], want[1])
    assert torch.equal(got[2], want[2])


@pytest.mark.parametrize("fmt", ["pickle", "torch zip"])
def test_the_crafted_file_runs_code_when_unpickled_carelessly(fmt, tmp_path):
    marker = tmp_path / "pwned"
    path = write_evil_checkpoint(tmp_path / "evil.pt", marker, fmt)
    # What the tests below show paws never does:
    if fmt == "pickle":
        pickle.loads(path.read_bytes())
    else:
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("fmt", ["pickle", "torch zip"])
def test_load_refuses_a_file_that_runs_code(fmt, tmp_path):
    marker = tmp_path / "pwned"
    path = write_evil_checkpoint(tmp_path / "evil.pt", marker, fmt)
    with pytest.raises(UserError) as e:
        checkpoint.load(path)
    assert str(e.value) == (
        f"cannot load checkpoint {path}: it holds objects other than tensors and plain "
        "values, refused for safety"
    )
    assert not marker.exists()


def test_load_of_a_truncated_or_foreign_file_is_one_line(tmp_path):
    path = tmp_path / "last.pt"
    checkpoint.save(_state(1), path)
    (tmp_path / "cut.pt").write_bytes(path.read_bytes()[:5000])
    with pytest.raises(UserError) as e:
        checkpoint.load(tmp_path / "cut.pt")
    assert str(e.value).startswith(f"cannot load checkpoint {tmp_path / 'cut.pt'}: ")
    assert "\n" not in str(e.value)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="is not a paws checkpoint"):
        checkpoint.load(tmp_path / "other.pt")
    with pytest.raises(UserError, match="checkpoint not found"):
        checkpoint.load(tmp_path / "missing.pt")


def test_the_code_never_unpickles_arbitrary_objects():
    loads = unpicklers = 0
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            loads += 1
            assert "weights_only=True" in call, f"{path.name}: {call}"
        assert not re.search(r"pickle\.loads?\(|\.Unpickler\(", text), path.name
        unpicklers += len(re.findall(r"class \w+\(pickle\.Unpickler\)", text))
    assert loads >= 2 and unpicklers == 1  # checkpoints, encoder weights; CIFAR batches


def test_partial_writes_of_a_killed_process_are_removed(tmp_path):
    checkpoint.save(_state(1), tmp_path / "last.pt")
    stale = tmp_path / ".last.pt.k3j2x9.tmp"  # as save names them
    stale.write_bytes(b"PK\x03\x04 cut short")
    (tmp_path / "notes.tmp").write_text("not ours")
    assert checkpoint.remove_partial_writes(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "notes.tmp"]
    _assert_state(checkpoint.load(tmp_path / "last.pt"), _state(1))


# --------------------------------------------------------------------------------------------
# Through the paws command: a full disk, files crafted to run code.


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
    assert finite_checkpoint(run / "last.pt") == 4
    assert sorted(p.name for p in run.iterdir()) == ["config.yaml", "last.pt", "metrics.csv"]
    monkeypatch.setattr(paws.files, "os", os)  # space freed: the run resumes
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, monkeypatch)
    assert code == 0, err
    assert torch.load(run / "final.pt", weights_only=True)["step"] == 16


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


# --------------------------------------------------------------------------------------------
# Damaged checkpoints, generated systematically (tiny.Cases).


# Replacements that are valid for an entry (it may be null, or any number, ...) and so are not
# damage; every other kind must be refused.
CHECKPOINT_VALID = {
    "step": {"int", "none"},
    "epoch": {"int", "float"},
    "channels": {"none"},
    "architecture": {"none"},  # checkpoints before architectures were recorded
    "scaler": {"none", "dict"},  # a CPU run has no gradient scaler to restore
    "prior": {"none"},
    "classes": {"list"},
    "mean": {"list"},
    "std": {"list"},
}


# The entries each command needs: removing one must be refused.
NEEDED = {"eval": ("model", "config"), "resume": ("model", "config", "optimizer", "step", "rng")}


TRAINING_STATE = ("optimizer", "rng", "scaler", "prior", "step", "epoch")


def damaged_checkpoints(state: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    """``(name, command, state)``: each top-level entry replaced by each wrong kind, then each
    needed entry removed; ``command`` is ``eval``, or ``resume`` for the training state."""
    for key in state:
        for kind, value in WRONG.items():
            if kind in CHECKPOINT_VALID.get(key, ()):
                continue
            for command in ("eval", "resume") if key in TRAINING_STATE else ("eval",):
                yield f"{command} {key}={kind}", command, {**state, key: value}
    for command, keys in NEEDED.items():
        for key in keys:
            yield f"{command} without {key}", command, {k: v for k, v in state.items() if k != key}


@pytest.mark.slow
def test_every_checkpoint_entry_of_a_wrong_kind_or_missing(made, tmp_path, capsys):
    cases = Cases(capsys)
    state = torch.load(made["run"] / "last.pt", weights_only=True)
    assert {"model", "config", "optimizer", "rng", "architecture"} <= set(state)
    for i, (name, command, bad) in enumerate(damaged_checkpoints(state)):
        if command == "eval":
            path = tmp_path / f"bad{i}.pt"
            torch.save(bad, path)
            cases.refused(name, ["eval", str(path)], path)
        else:
            run = copy_run(made, tmp_path / f"run{i}")
            torch.save(bad, run / "last.pt")
            cases.refused(name, ["train", "--resume", str(run)], run)
    cases.check()
    assert cases.count > 100


def test_checkpoint_tensors_of_wrong_shape_dtype_or_value(made, tmp_path, capsys):
    cases = Cases(capsys)
    state = torch.load(made["run"] / "last.pt", weights_only=True)
    for i, (name, weights) in enumerate(weight_damage(state["model"])):
        path = tmp_path / f"bad{i}.pt"
        torch.save({**state, "model": weights}, path)
        cases.refused(f"eval: {name}", ["eval", str(path)], path, str(path))
        cases.refused(f"predict: {name}", ["predict", str(path), str(made["image"])], path)
        run = copy_run(made, tmp_path / f"run{i}")
        torch.save({**state, "model": weights}, run / "last.pt")
        cases.refused(f"resume: {name}", ["train", "--resume", str(run)], run)
    cases.check()


CUTS = (0, 1, 10, 100, 1000, 0.5, -2)


def _cuts(data: bytes) -> Iterator[tuple[float, bytes]]:
    """The file cut at each of :data:`CUTS` (a fraction, a length, or from the end) shorter
    than it."""
    for at in CUTS:
        n = int(len(data) * at) if isinstance(at, float) else at if at >= 0 else len(data) + at
        if n < len(data):
            yield at, data[:n]


def test_truncated_files(made, tmp_path, capsys):
    cases = Cases(capsys)
    for at, cut in _cuts((made["run"] / "last.pt").read_bytes()):
        path = tmp_path / f"cut{at}.pt"
        path.write_bytes(cut)
        cases.refused(f"last.pt cut at {at}", ["eval", str(path)], path)
    for name in ("model.json", "model.safetensors", "support.safetensors"):
        for at, cut in _cuts((made["export"] / name).read_bytes()):
            export = Path(shutil.copytree(made["export"], tmp_path / f"{name}{at}"))
            (export / name).write_bytes(cut)
            cases.refused(
                f"{name} cut at {at}", ["predict", str(export), str(made["image"])], export
            )
    cases.check()
