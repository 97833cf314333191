"""Output paths and atomic writes (files.py): an --out that cannot be written is refused in one
line before any work, for every command, and a full disk keeps the previous file intact."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from tiny import (
    Cases,
    copy_run,
    error_line,
    run_cli,
)

from paws.errors import UserError
from paws.files import write_with


def _bad_output_paths(tmp: Path) -> Iterator[tuple[str, Path, bool]]:
    """``(kind, path, is a folder wanted)`` of outputs that cannot be written."""
    (tmp / "a_file").write_text("keep me\n")
    (tmp / "a_dir.npy").mkdir()
    if os.geteuid() == 0:  # the superuser writes anywhere but in /sys
        locked = Path("/sys/paws-out")
    else:
        (tmp / "locked").mkdir(mode=0o500)
        locked = tmp / "locked" / "out"
    yield "an existing file", tmp / "a_file", True
    yield "a path below a file", tmp / "a_file" / "out", True
    yield "a path below a file, deeper", tmp / "a_file" / "x" / "y", True
    yield "an unwritable folder", locked, True
    yield "an existing folder", tmp / "a_dir.npy", False
    yield "a file below a file", tmp / "a_file" / "out.csv", False
    yield "a file in an unwritable folder", locked / "out.csv", False


def test_output_paths_that_cannot_be_written(made, tmp_path, capsys):
    cases = Cases(capsys)
    run, export, image = made["run"], made["export"], str(made["image"])
    overrides = ["--set", f"data.labeled={made['labeled']}", "--set", f"data.test={made['test']}"]
    for kind, path, folder in _bad_output_paths(tmp_path):
        out = str(path)
        if folder:
            commands = {
                "train": ["train", "--config", str(made["config"]), "--out", out],
                "export": ["export", str(run), "--out", out],
                "baseline": ["baseline", "--config", str(made["config"]), *overrides, "--out", out],
                "report": ["report", str(run), "--out", out],
                "finetune": ["finetune", str(run), "--out", out],
                "tighten": ["tighten", str(run), "--out", out],
            }
        else:
            npy = str(path.with_suffix(".npy")) if path.suffix else out
            commands = {
                "predict": ["predict", str(export), image, "--out", out],
                "embed": ["embed", str(export), image, "--out", npy],
            }
        for command, argv in commands.items():
            target = argv[argv.index("--out") + 1]
            cases.refused(f"{command} --out {kind}", argv, [tmp_path, run, export], target)
    cases.check()
    assert (tmp_path / "a_file").read_text() == "keep me\n"


def test_a_full_disk_while_writing_the_config_keeps_the_old_one(
    made, tmp_path, capsys, monkeypatch
):
    import paws.files

    run = copy_run(made, tmp_path / "run")
    old = (run / "config.yaml").read_bytes()
    real = os.fsync

    def full(fd: int) -> None:
        if os.path.realpath(f"/proc/self/fd/{fd}").startswith(str(run / ".config.yaml.")):
            raise OSError(28, "No space left on device")
        real(fd)

    monkeypatch.setattr(paws.files.os, "fsync", full)
    line = error_line(run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)[2])
    assert re.fullmatch(
        re.escape(f"could not write {run / 'config.yaml'}: no space left on the disk mounted at ")
        + r"/\S*, [\d,.]+ MB free; the previous file is intact",
        line,
    ), line
    assert (run / "config.yaml").read_bytes() == old
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    monkeypatch.setattr(paws.files.os, "fsync", real)  # space freed: the resume finishes
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)
    assert code == 0, err


def test_numpys_short_write_on_a_full_disk_names_the_disk(tmp_path):
    path = tmp_path / "emb.npy"
    path.write_bytes(b"old")

    def short(f):
        f.write(b"part")
        raise OSError("172416 requested and 131040 written")  # np.save's words, no errno

    with pytest.raises(UserError) as e:
        write_with(path, short)
    line = str(e.value)
    assert line.startswith(f"could not write {path}: no space left on the disk mounted at ")
    assert line.endswith("MB free; the previous file is intact")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["emb.npy"]
