"""End to end under torchrun on the CPU: ``torchrun --nproc_per_node 2 -m paws train ...``.

Runs are interrupted (SIGTERM, as a cluster pre-empting a job does) and resumed with the other
number of processes: a checkpoint of 2 processes continues in 1 and the other way round. Only
rank 0 writes files and prints results.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from tiny import set_args, tiny_overrides, write_folder

# Every test here starts torchrun and paws processes: -m "not slow" leaves them out.
pytestmark = pytest.mark.slow

STEPS = 30


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes of 12x12 grey images: 6 labelled and 3 test images a class."""
    root = tmp_path_factory.mktemp("images")
    write_folder(root / "labeled", per_class=6, seed=0)
    write_folder(root / "test", per_class=3, seed=1)
    return root


def _args(folder: Path) -> list[str]:
    folders = {"labeled": folder / "labeled", "test": folder / "test"}
    changes = [
        "optim.batch_size=6",
        f"optim.steps={STEPS}",
        "optim.start_lr=0.05",
        "optim.ref_lr=0.1",
        "optim.final_lr=0.01",
        "run.checkpoint_every=1000",
    ]
    return set_args(tiny_overrides(folders, *changes))


def _command(processes: int, *args: str) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "paws", *args]
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "paws",
        *args,
    ]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _logged_steps(run: Path) -> list[int]:
    path = run / "metrics.csv"
    if not path.is_file():
        return []
    with open(path) as f:
        try:
            return [int(row["step"]) for row in csv.DictReader(f)]
        except (KeyError, ValueError):  # a row being written
            return []


def _interrupt(processes: int, run: Path, folder: Path, after: int = 2) -> tuple[int, str]:
    """Start a run, send SIGTERM once ``after`` steps are logged; (exit status, stderr)."""
    p = subprocess.Popen(
        _command(processes, "train", "--out", str(run), *_args(folder)),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 300
    while len(_logged_steps(run)) < after:
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the run ended before it was interrupted:\n{p.communicate()[1]}")
        time.sleep(0.05)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    return p.returncode, err


def _completed(processes: int, *args: str) -> subprocess.CompletedProcess:
    """``paws ARGS`` in ``processes`` processes, run to its end."""
    return subprocess.run(
        _command(processes, *args), capture_output=True, text=True, env=_env(), timeout=300
    )


def _resume(processes: int, run: Path) -> subprocess.CompletedProcess:
    r = _completed(processes, "train", "--resume", str(run))
    assert r.returncode == 0, r.stderr
    return r


def _checkpoint_step(path: Path) -> int:
    return int(torch.load(path, weights_only=True)["step"])


@pytest.fixture(scope="module")
def two_then_one(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("two_then_one") / "run"
    code, err = _interrupt(2, run, folder)
    stopped = {"code": code, "err": err, "files": sorted(p.name for p in run.iterdir())}
    stopped["step"] = _checkpoint_step(run / "last.pt")
    stopped["logged"] = _logged_steps(run)
    return {"run": run, "stopped": stopped, "resumed": _resume(1, run)}


@pytest.fixture(scope="module")
def one_then_two(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    run = tmp_path_factory.mktemp("one_then_two") / "run"
    code, err = _interrupt(1, run, folder)
    stopped = {"code": code, "err": err, "step": _checkpoint_step(run / "last.pt")}
    return {"run": run, "stopped": stopped, "resumed": _resume(2, run)}


@pytest.mark.parametrize("case", ["two_then_one", "one_then_two"])
def test_interrupted_run_resumes_with_another_number_of_processes(
    case: str, request: pytest.FixtureRequest
):
    r = request.getfixturevalue(case)
    run, stopped = r["run"], r["stopped"]
    # The checkpoint of the step every rank stopped at (the signal may land on one rank first).
    assert 2 <= stopped["step"] < STEPS, stopped["err"]
    assert "stopped at step" in stopped["err"]
    # The resumed run continued from there to the end, logging each step once.
    assert _logged_steps(run) == list(range(1, STEPS + 1))
    assert _checkpoint_step(run / "final.pt") == STEPS
    out = r["resumed"].stdout
    assert out.count("test accuracy of the chosen model") == 1, out
    assert out.count("run saved in") == 1, out
    assert f"resuming {run} at step {stopped['step']}/{STEPS}" in r["resumed"].stderr


def test_two_processes_write_from_rank_0_only(two_then_one: dict):
    stopped = two_then_one["stopped"]
    assert stopped["code"] != 0  # torchrun reports the signal
    # No second writer: no temporary or duplicate files, one row per step.
    assert stopped["files"] == ["config.yaml", "last.pt", "metrics.csv"]
    assert stopped["logged"] == list(range(1, stopped["step"] + 1))
    assert stopped["err"].count("stopped at step") == 1
    run = two_then_one["run"]
    assert sorted(p.name for p in run.iterdir()) == [
        "choice.json",
        "config.yaml",
        "eval.json",
        "evals.csv",
        "export",
        "final.pt",
        "last.pt",
        "metrics.csv",
        "predictions.json",
        "tighten.json",
        "tighten.pt",
    ]


def test_two_processes_train_like_one(two_then_one: dict, one_then_two: dict):
    """The first steps of the 2-process run match those of the 1-process run: same batches, same
    views, same loss. (Later steps drift apart by float32 rounding, which this tiny network
    amplifies, as it does when one process changes its number of threads.)"""

    def losses(run: Path) -> list[float]:
        with open(run / "metrics.csv") as f:
            return [float(row["loss"]) for row in csv.DictReader(f)][:2]

    two, one = losses(two_then_one["run"]), losses(one_then_two["run"])
    assert two == pytest.approx(one, abs=1e-4)
    assert two[0] != pytest.approx(two[1], abs=1e-3)  # the steps do differ


def _rank_process(run: Path, rank: int) -> int:
    """The pid of the process of ``rank`` training into ``run`` (read from /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if str(run).encode() in cmdline and f"RANK={rank}".encode() in environ:
            return int(proc.name)
    raise AssertionError(f"no process of rank {rank} found")


@pytest.mark.skipif(not Path("/proc/self/environ").is_file(), reason="finds ranks in /proc")
def test_a_rank_that_dies_leaves_one_line_and_a_run_that_resumes(folder: Path, tmp_path: Path):
    run = tmp_path / "run"
    args = [*_args(folder), "--set", "optim.steps=150", "--set", "run.checkpoint_every=2"]
    p = subprocess.Popen(
        _command(2, "train", "--out", str(run), *args),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    deadline = time.monotonic() + 300
    while len(_logged_steps(run)) < 4 or not (run / "last.pt").is_file():
        if p.poll() is not None or time.monotonic() > deadline:
            p.kill()
            pytest.fail(f"the run ended before a rank was killed:\n{p.communicate()[1]}")
        time.sleep(0.05)
    os.kill(_rank_process(run, 1), signal.SIGKILL)
    _, err = p.communicate(timeout=300)
    assert p.returncode != 0
    assert "[rank0]: Traceback" not in err and "[rank0]:" not in err  # no gloo wall of text
    said = [line for line in err.splitlines() if line.startswith("paws: ")]
    # Rank 0 either hit the lost connection (one line naming rank 1 and the resume) or was
    # stopped by torchrun's SIGTERM first (it saved a checkpoint and said how to continue).
    lost = "paws: error: rank 0 of 2: rank 1 of this run stopped; resume from its last "
    assert said == [f"{lost}checkpoint with: paws train --resume {run}"] or (
        not said and f"continue with: paws train --resume {run}" in err
    ), err
    _resume(1, run)


def test_the_default_support_and_batch_sizes_fit_two_processes(folder: Path, tmp_path: Path):
    # The default support.images_per_class (5) and a batch of 9 cannot be shared by 2
    # processes: both adapt, each said in a line, and the run trains.
    run = tmp_path / "run"
    sizes = ["--set", "support.images_per_class=5", "--set", "optim.batch_size=9"]
    args = [*_args(folder), *sizes, "--set", "optim.steps=2"]
    r = _completed(2, "train", "--out", str(run), *args)
    assert r.returncode == 0, r.stderr
    assert "support.images_per_class (5) is not divisible by the 2 processes: 6 images" in r.stderr
    assert "optim.batch_size (9) is not divisible by the 2 processes: batches of 8" in r.stderr
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["support"]["images_per_class"] == 6 and saved["optim"]["batch_size"] == 8


def test_the_student_trains_on_global_batches_under_two_processes(folder: Path, tmp_path: Path):
    # A run of 2 processes that ends with the student: every process trains it, rank 0's
    # choice trains its copies on folds alone (a global batch norm there would wait for
    # rank 1), and the files are written once.
    run = tmp_path / "run"
    student = ["distill.epochs=2", "distill.batch_size=8", "distill.labeled_batch=4"]
    args = [*_args(folder), "--set", "optim.steps=4"]
    args += ["--set", "distill.after_training=true", *set_args(student)]
    r = _completed(2, "train", "--out", str(run), *args)
    assert r.returncode == 0, r.stderr
    assert (run / "distill.pt").is_file() and (run / "distill.json").is_file()
    choice = json.loads((run / "choice.json").read_text())
    assert "distill.pt" in choice["candidates"]
    # `paws distill` of that run in 1 and in 2 processes: the same global batches, so the same
    # steps and the same first loss (later ones drift by float32 rounding, as in pre-training).
    reports = {}
    for processes in (1, 2):
        out = tmp_path / f"student{processes}"
        done = _completed(
            processes, "distill", str(run), "--out", str(out), "--json", *set_args(student)
        )
        assert done.returncode == 0, done.stderr
        reports[processes] = json.loads(done.stdout)
        assert sorted(p.name for p in out.iterdir()) == ["distill.json", "distill.pt"]
    one, two = reports[1], reports[2]
    assert one["steps"] == two["steps"] == 4 and one["kept"] == two["kept"] == 18
    assert two["loss_first"] == pytest.approx(one["loss_first"], abs=1e-4)
    assert two["test"]["num_query"] == one["test"]["num_query"] == 9
