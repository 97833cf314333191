"""Choosing the model a run means on its labelled images alone (paws.after.choose)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from paws import rundir
from paws.after.choose import Candidate, Choice, decide, label_folds, write_choice
from paws.errors import UserError


def _never(train, held) -> float:  # a candidate whose scores are given, not computed
    raise AssertionError("not called")


CANDIDATES = [
    Candidate("final.pt", "after pre-training", _never),
    Candidate("tighten.pt", "after tightening", _never),
]


@pytest.mark.parametrize("k", [2, 5])
def test_folds_are_stratified_disjoint_and_never_take_a_whole_class(k):
    labels = np.array([0] * 10 + [1] * 3 + [2] * 1 + [3] * 2)
    folds = label_folds(labels, k, seed=0)
    held = np.concatenate(folds)
    assert len(held) == len(set(held.tolist()))  # disjoint
    assert 13 not in held  # the only image of class 2 is never held out
    for fold in folds:
        for c in (0, 1, 3):
            assert (labels[fold] == c).sum() < (labels == c).sum()  # support keeps the class
        # about the same share of the large class in every fold
        assert abs((labels[fold] == 0).sum() - 10 / k) < 1
    # every image of a class with two or more images is held out once
    assert sorted(held.tolist()) == [i for i in range(len(labels)) if i != 13]
    assert [f.tolist() for f in label_folds(labels, k, 0)] == [f.tolist() for f in folds]
    assert [f.tolist() for f in label_folds(labels, k, 1)] != [f.tolist() for f in folds]


def test_no_folds_when_every_class_has_one_image():
    assert label_folds(np.arange(6), 5, seed=0) == []
    choice = decide(CANDIDATES, {"final.pt": [], "tighten.pt": []}, 0, "tighten.pt")
    assert choice.file == "tighten.pt" and "cannot tell" in choice.reason


def test_the_best_is_chosen_when_it_beats_the_default_beyond_the_spread():
    scores = {"final.pt": [80, 85, 90, 85, 80], "tighten.pt": [70, 75, 80, 75, 70]}
    choice = decide(CANDIDATES, scores, 5, "tighten.pt")
    assert choice.file == "final.pt"
    assert "84.0% against 74.0%" in choice.reason and "+10.0 ± 0.0" in choice.reason


def test_the_default_stays_when_the_gain_is_within_the_spread():
    # final is better by 1 point on the mean, but the per-fold differences (+5, -4, +1, -2,
    # +5) have a standard error above that
    scores = {"final.pt": [80, 71, 76, 73, 80], "tighten.pt": [75, 75, 75, 75, 75]}
    choice = decide(CANDIDATES, scores, 5, "tighten.pt")
    diff = np.subtract(scores["final.pt"], scores["tighten.pt"])
    assert diff.mean() < diff.std(ddof=1) / np.sqrt(5)
    assert choice.file == "tighten.pt" and "not beyond two standard errors" in choice.reason


def test_a_gain_between_one_and_two_standard_errors_keeps_the_default():
    # differences +5, -1, +5, -1, +2: mean 2, sd 3, standard error 3 / sqrt(5) = 1.34
    scores = {"final.pt": [80, 74, 80, 74, 77], "tighten.pt": [75, 75, 75, 75, 75]}
    assert decide(CANDIDATES, scores, 5, "tighten.pt").file == "tighten.pt"
    # the same mean with differences +4, 0, +4, 0, +2: standard error 0.89, gain beyond two
    clear = {"final.pt": [79, 75, 79, 75, 77], "tighten.pt": [75, 75, 75, 75, 75]}
    assert decide(CANDIDATES, clear, 5, "tighten.pt").file == "final.pt"


def test_a_default_that_is_best_is_kept_and_ties_go_to_it():
    tie = {"final.pt": [75, 80], "tighten.pt": [80, 75]}
    assert decide(CANDIDATES, tie, 2, "tighten.pt").file == "tighten.pt"
    better = {"final.pt": [70, 70], "tighten.pt": [75, 80]}
    choice = decide(CANDIDATES, better, 2, "tighten.pt")
    assert choice.file == "tighten.pt" and "the best on 2 folds" in choice.reason


def test_choice_json_records_every_candidate_and_the_run_means_it(tmp_path):
    for name in ("last.pt", "final.pt", "tighten.pt"):
        (tmp_path / name).write_bytes(b"x")
    assert rundir.model_file(tmp_path) == tmp_path / "tighten.pt"  # no choice yet
    scores = {"final.pt": [90.0, 90.0], "tighten.pt": [70.0, 80.0]}
    choice = Choice("final.pt", "because", scores, 2)
    record = write_choice(tmp_path, choice, CANDIDATES)
    saved = json.loads((tmp_path / "choice.json").read_text())
    assert saved == record and saved["model"] == "final.pt" and saved["folds"] == 2
    t = saved["candidates"]["tighten.pt"]
    assert t["mean"] == 75.0 and t["standard_error"] == pytest.approx(5.0)
    assert t["held_out_top1"] == [70.0, 80.0] and t["what"] == "after tightening"
    assert rundir.model_file(tmp_path) == tmp_path / "final.pt"
    assert rundir.model_file(tmp_path, pretrained=True) == tmp_path / "last.pt"


@pytest.mark.parametrize(
    "content",
    ['{"model": "missing.pt"}', '{"model": "../x.pt"}', '{"model": 3}', "[]", "{"],
)
def test_a_damaged_choice_is_one_line(tmp_path, content):
    (tmp_path / "last.pt").write_bytes(b"x")
    (tmp_path / "choice.json").write_text(content)
    with pytest.raises(UserError) as e:
        rundir.model_file(tmp_path)
    assert "choice.json" in str(e.value) and "\n" not in str(e.value)
