"""Exact resume: a run killed at an arbitrary step (SIGKILL), or stopped by SIGINT or SIGTERM,
and resumed with ``--resume`` ends with the weights of a run that was never interrupted."""

from __future__ import annotations

import csv
import os
import re
import signal
import time
from pathlib import Path

import pytest
import torch
from tiny import (
    ANIMALS,
    copy_run,
    error_line,
    logged_steps,
    popen,
    run_cli,
    tiny_config,
    torch_state,
    write_config,
    write_folder,
)

from paws import cli

STEPS = 16  # tiny_config's optim.steps; checkpoints every 4 steps
STORAGE = {
    "memory": ["data.in_memory=yes"],
    "disk": ["data.in_memory=no", "data.workers=2"],
}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_folder(tmp_path_factory.mktemp("data") / "labeled", names=ANIMALS, channels=3)


@pytest.fixture(scope="module")
def reference(folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """The run directory of an uninterrupted run, per storage mode, made once."""
    runs: dict[str, Path] = {}

    def get(storage: str) -> Path:
        if storage not in runs:
            base = tmp_path_factory.mktemp(f"reference-{storage}")
            cfg = write_config(base / "cfg.yaml", tiny_config(folder, *STORAGE[storage]))
            with torch_state():
                argv = ["--quiet", "train", "--config", str(cfg), "--out", str(base / "run")]
                assert cli.main(argv) == 0
            runs[storage] = base / "run"
        return runs[storage]

    return get


def _rows(run: Path) -> list[dict[str, str]]:
    try:
        with open(run / "metrics.csv", newline="") as f:
            return list(csv.DictReader(f))
    except (FileNotFoundError, StopIteration):
        return []


def _start_and_wait(argv: list[str], run: Path, steps: int):
    """Start ``paws ARGV`` and return once it has logged ``steps`` steps."""
    p = popen(argv)
    deadline = time.monotonic() + 300
    while len(_rows(run)) < steps:
        if p.poll() is not None:
            pytest.fail(f"the run ended before step {steps}: {p.communicate()}")
        if time.monotonic() > deadline:
            os.killpg(p.pid, signal.SIGKILL)
            pytest.fail(f"the run did not reach step {steps} in 300 s")
        time.sleep(0.05)
    return p


def _assert_same_run(run: Path, ref: Path) -> None:
    """Bit-identical final weights and optimiser state, and the same loss at every step."""
    got = torch.load(run / "final.pt", map_location="cpu", weights_only=True)
    want = torch.load(ref / "final.pt", map_location="cpu", weights_only=True)
    assert got["step"] == want["step"] == STEPS
    assert got["model"].keys() == want["model"].keys()
    for k in want["model"]:
        assert torch.equal(got["model"][k], want["model"][k]), k
    momentum = [s["momentum_buffer"] for s in want["optimizer"]["state"].values()]
    assert momentum and all(
        torch.equal(s["momentum_buffer"], m)
        for s, m in zip(got["optimizer"]["state"].values(), momentum)
    )
    rows, ref_rows = _rows(run), _rows(ref)
    assert [r["step"] for r in rows] == [str(s) for s in range(1, STEPS + 1)]
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


@pytest.mark.slow
@pytest.mark.parametrize("storage", ["memory", "disk"])
def test_sigkill_then_resume_is_bit_identical(
    storage, folder, reference, tmp_path, capsys, monkeypatch
):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(folder, *STORAGE[storage]))
    run = tmp_path / "run"
    p = _start_and_wait(["--quiet", "train", "--config", str(cfg), "--out", str(run)], run, 7)
    os.kill(p.pid, signal.SIGKILL)
    p.communicate(timeout=60)
    try:
        os.killpg(p.pid, signal.SIGKILL)  # data-loader workers, as on a lost machine
    except ProcessLookupError:
        pass
    assert p.returncode == -signal.SIGKILL
    assert not (run / "final.pt").exists()
    saved = torch.load(run / "last.pt", weights_only=True)["step"]
    logged = len(_rows(run))
    assert 4 <= saved <= logged < STEPS  # killed mid-run, after a checkpoint

    # Workers may change on resume: each image's augmentation is seeded by (seed, step, index).
    resume = ["--quiet", "train", "--resume", str(run), "--set", "data.workers=0"]
    code, _, err = run_cli(resume, capsys, monkeypatch)
    assert code == 0, err
    _assert_same_run(run, reference(storage))


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_saves_a_checkpoint_and_exits_cleanly(
    sig, folder, reference, tmp_path, capsys, monkeypatch
):
    # Sent to the whole process group, as a terminal's Ctrl-C or a scheduler does, with
    # data-loader workers running.
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(folder, *STORAGE["disk"]))
    run = tmp_path / "run"
    p = _start_and_wait(["train", "--config", str(cfg), "--out", str(run)], run, 5)
    os.killpg(p.pid, sig)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 128 + sig, err
    assert "Traceback" not in err and "Error" not in err, err
    stopped = int(re.search(r"stopped at step (\d+)", err).group(1))
    assert f"paws train --resume {run}" in err
    assert 5 <= stopped < STEPS
    assert torch.load(run / "last.pt", weights_only=True)["step"] == stopped
    assert not (run / "final.pt").exists()

    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, monkeypatch)
    assert code == 0, err
    _assert_same_run(run, reference("disk"))


def test_resume_before_the_first_checkpoint_starts_over(
    folder, reference, tmp_path, capsys, monkeypatch
):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(folder, *STORAGE["memory"]))
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(cfg.read_text())  # as a run killed while loading data
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, monkeypatch)
    assert code == 0, err
    _assert_same_run(run, reference("memory"))


def test_resume_refuses_a_config_that_changes_the_run(folder, tmp_path, capsys, monkeypatch):
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(folder, "optim.steps=4"))
    run = tmp_path / "run"
    code, _, err = run_cli(
        ["--quiet", "train", "--config", str(cfg), "--out", str(run)], capsys, monkeypatch
    )
    assert code == 0, err
    before = (run / "last.pt").read_bytes()
    code, _, err = run_cli(
        [
            "--quiet",
            "train",
            "--resume",
            str(run),
            "--set",
            "optim.batch_size=3",
            "--set",
            "model.width=8",
            "--set",
            "run.log_every=2",  # safe to change: not named
        ],
        capsys,
        monkeypatch,
    )
    assert code == 2
    line = error_line(err)
    assert line.startswith("cannot resume: the config changes the run's shape")
    assert "optim.batch_size (6 -> 3)" in line and "model.width (4 -> 8)" in line
    assert "log_every" not in line
    assert (run / "last.pt").read_bytes() == before


def test_batches_end_quietly_when_workers_stop_after_a_signal():
    from paws.runtime import StopSignals, until_stopped

    def batches():
        yield 1
        yield 2
        raise RuntimeError("DataLoader worker (pid 1234) exited unexpectedly")

    stop = StopSignals()
    with pytest.raises(RuntimeError, match="exited unexpectedly"):
        list(until_stopped(batches(), stop))  # no signal: a real failure
    stop.signum = signal.SIGTERM
    assert list(until_stopped(batches(), stop)) == [1, 2]


def test_a_crash_then_resume_is_exact_with_ropaws_and_an_estimated_prior(
    folder, tmp_path, capsys, monkeypatch
):
    """The estimated ME-MAX prior is training state: a resumed run restores it."""
    import paws.pretrain.loop

    options = ["loss.ropaws=true", "loss.me_max_prior=estimated", "loss.me_max_prior_momentum=0.5"]
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(folder, "data.in_memory=yes", *options))
    ref, run = tmp_path / "ref", tmp_path / "run"
    with torch_state():
        assert cli.main(["--quiet", "train", "--config", str(cfg), "--out", str(ref)]) == 0
    state = torch.load(ref / "final.pt", weights_only=True)["prior"]["probs"]
    assert not torch.allclose(state, torch.full_like(state, 1 / len(state)))  # it moved

    real_step, calls = paws.pretrain.loop.train_step, []

    def crash_at_step_10(*args, **kwargs):
        calls.append(1)
        if len(calls) == 10:
            raise KeyboardInterrupt  # as a machine lost mid-run, after the step-8 checkpoint
        return real_step(*args, **kwargs)

    monkeypatch.setattr(paws.pretrain.loop, "train_step", crash_at_step_10)
    code, _, _ = run_cli(
        ["--quiet", "train", "--config", str(cfg), "--out", str(run)], capsys, monkeypatch
    )
    assert code == 130 and torch.load(run / "last.pt", weights_only=True)["step"] == 8
    monkeypatch.setattr(paws.pretrain.loop, "train_step", real_step)
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, monkeypatch)
    assert code == 0, err
    _assert_same_run(run, ref)
    got = torch.load(run / "final.pt", weights_only=True)["prior"]["probs"]
    assert torch.equal(got, state)


def test_a_resume_after_a_kill_before_the_first_checkpoint_logs_each_step_once(
    made, tmp_path, capsys
):
    run = copy_run(made, tmp_path / "run")
    for name in ("last.pt", "final.pt", "tighten.pt", "eval.json", "evals.csv"):
        (run / name).unlink()
    assert logged_steps(run / "metrics.csv") == [1, 2, 3, 4]  # rows no checkpoint kept
    code, _, err = run_cli(["--quiet", "train", "--resume", str(run)], capsys, None)
    assert code == 0, err
    assert logged_steps(run / "metrics.csv") == [1, 2, 3, 4]
    assert torch.load(run / "final.pt", weights_only=True)["step"] == 4


def test_a_new_run_over_one_that_died_before_its_first_checkpoint_starts_new_logs(
    folder, tmp_path, capsys, monkeypatch
):
    import csv

    run = tmp_path / "run"
    run.mkdir()
    # What a run killed after 2 steps and before its first checkpoint leaves.
    (run / "metrics.csv").write_text("step,loss,old_column\n1,0.5,x\n2,0.4,x\n")
    (run / "evals.csv").write_text("step,top1\n2,33.3\n")
    cfg = write_config(tmp_path / "cfg.yaml", tiny_config(folder))
    argv = ["train", "--config", str(cfg), "--out", str(run)]
    code, _, err = run_cli(argv, capsys, monkeypatch)
    assert code == 0, err
    assert "stopped before its first checkpoint" in err
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert "old_column" not in rows[0]
    steps = [int(r[0]) for r in rows[1:]]
    assert steps == sorted(set(steps)) and steps[0] == 1  # one run's rows, once each
