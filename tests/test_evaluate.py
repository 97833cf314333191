"""Accuracy and unknown detection of a model (after/evaluate.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from paws.after.evaluate import accuracy, balanced_accuracy, scores
from paws.cli import main


def test_eval_reports_auroc_against_a_folder_of_unknown_images(shared_run, tmp_path, capsys):
    paths, run_dir = shared_run
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    for name in ("class4", "class5"):  # classes without labels in the run
        for f in (paths["test_all"] / name).glob("*.png"):
            (unknown / f"{name}_{f.name}").write_bytes(f.read_bytes())
    assert main(["--quiet", "eval", str(run_dir), "--unknown", str(unknown), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    u = out["unknown"]
    assert u["num_unknown"] == 24 and u["num_known"] == out["num_query"] == 48
    assert 0.0 <= u["auroc"] <= 1.0 and 0.0 <= u["fpr_at_95_tpr"] <= 1.0
    assert 0.0 <= out["balanced_top1"] <= 100.0


# Five queries of classes 0 and 1 (none of class 2): right, wrong twice, right, right.
PROBS = torch.tensor(
    [
        [0.7, 0.2, 0.1],  # class 0: right
        [0.1, 0.6, 0.3],  # class 0: wrong, and not in the top 2 either
        [0.1, 0.3, 0.6],  # class 1: wrong, second
        [0.2, 0.5, 0.3],  # class 1: right
        [0.1, 0.8, 0.1],  # class 1: right
    ]
)
LABELS = torch.tensor([0, 0, 1, 1, 1])


def test_top_k_accuracy_by_hand():
    assert accuracy(PROBS, LABELS, 1) == pytest.approx(60.0)  # 3 of 5
    assert accuracy(PROBS, LABELS, 2) == pytest.approx(80.0)  # the second query misses
    assert accuracy(PROBS, LABELS, 5) == pytest.approx(100.0)  # k beyond 3 classes is 3


def test_balanced_accuracy_averages_the_recall_of_the_classes_present():
    # Recall 3/4 for class 0; class 1 has no test images and does not count as 0.
    assert balanced_accuracy(np.array([[3, 1], [0, 0]])) == pytest.approx(75.0)
    assert balanced_accuracy(np.array([[1, 0], [3, 1]])) == pytest.approx(62.5)  # (1 + 1/4) / 2


def test_scores_by_hand():
    s = scores(PROBS, LABELS)
    assert s["predictions"] == [0, 1, 2, 1, 1]
    assert s["confusion"] == [[1, 1, 0], [0, 2, 1], [0, 0, 0]]  # true classes in rows
    assert s["top1"] == pytest.approx(60.0) and s["top5"] == pytest.approx(100.0)
    # Recall 1/2 for class 0 and 2/3 for class 1; class 2 has no queries.
    assert s["balanced_top1"] == pytest.approx(100 * (1 / 2 + 2 / 3) / 2)
