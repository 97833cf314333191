"""Checkpoints: atomic writes that survive a full disk or an interrupt part-way, RNG states that
round-trip, and loading that refuses anything but tensors and plain values."""

from __future__ import annotations

import errno
import io
import os
import pickle
import random
import re
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import write_evil_checkpoint

import paws
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
