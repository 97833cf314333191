"""End to end through the command line on tiny image folders: train, resume, evaluate."""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import torch
from conftest import folder_overrides

from paws.checkpoint import load


def paws(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, "-m", "paws", *args], capture_output=True, text=True, timeout=300
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"paws {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def sets(overrides: list[str]) -> list[str]:
    return [x for o in overrides for x in ("--set", o)]


def test_train_checkpoint_resume_eval(image_folders, tmp_path):
    run = tmp_path / "run"
    first = paws("--quiet", "train", "--out", str(run), *sets(folder_overrides(image_folders)))
    assert "PAWS-NN test accuracy" in first.stdout
    for name in ("config.yaml", "metrics.csv", "last.pt", "final.pt", "eval.json"):
        assert (run / name).is_file(), name
    result = json.loads((run / "eval.json").read_text())
    assert result["num_query"] == 12 and result["num_support"] == 12
    assert 0 <= result["top1"] <= result["top5"] <= 100
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]
    assert all(r["loss"] and r["lr"] and r["images_per_s"] for r in rows)
    assert rows[0]["target_confidence"]  # monitor metrics every 2 steps, from step 0
    assert load(run / "final.pt")["step"] == 4

    # A different length changes the schedule: resuming with it is refused, naming the key.
    refused = paws("train", "--resume", str(run), "--set", "optim.steps=6", check=False)
    assert refused.returncode == 2
    assert "optim.steps" in refused.stderr and "Traceback" not in refused.stderr

    evaluated = paws("--quiet", "eval", str(run), "--json")
    again = json.loads(evaluated.stdout)
    assert again["top1"] == result["top1"] and again["num_query"] == 12


def test_resuming_a_finished_run_only_evaluates_again(image_folders, tmp_path):
    run = tmp_path / "run"
    paws("--quiet", "train", "--out", str(run), *sets(folder_overrides(image_folders)))
    before = load(run / "final.pt")["model"]
    again = paws("--quiet", "train", "--resume", str(run))
    assert "PAWS-NN test accuracy" in again.stdout
    after = load(run / "final.pt")
    assert after["step"] == 4
    assert all(torch.equal(before[k], after["model"][k]) for k in before)
    started = paws(
        "--quiet", "train", "--out", str(run), *sets(folder_overrides(image_folders)), check=False
    )
    assert started.returncode == 2 and "--resume" in started.stderr


def test_folder_run_with_unlabelled_and_labelled_folders_and_baseline(image_folders, tmp_path):
    run = tmp_path / "run"
    over = folder_overrides(image_folders, "data.test=null", "optim.steps=2")
    out = paws("--quiet", "train", "--out", str(run), *sets(over))
    assert "run saved" in out.stdout and not (run / "eval.json").exists()  # no test set
    base = paws(
        "--quiet", "baseline", "--json", *sets(folder_overrides(image_folders, "optim.steps=3"))
    )
    result = json.loads(base.stdout)
    assert result["steps"] == 3 and result["num_labeled"] == 12 and 0 <= result["top1"] <= 100
