"""The predictors (apply/predictor.py) on a tiny pre-trained run: predictions agree with
``paws eval``, a new support folder adds classes, and the known score flags unknown images."""

from __future__ import annotations

import json
import os

import pytest

import paws
from paws.cli import main
from paws.method.known_score import KnownScore


def _accuracy(rows: list[dict]) -> float:
    hits = [r["top"][0]["class"] == os.path.basename(os.path.dirname(r["file"])) for r in rows]
    return 100.0 * sum(hits) / len(hits)


def test_predict_on_test_images_matches_paws_eval(shared_run, tmp_path, capsys):
    paths, run_dir = shared_run
    assert main(["--quiet", "eval", str(run_dir), "--json"]) == 0
    ev = json.loads(capsys.readouterr().out)
    out = tmp_path / "pred.json"
    assert main(["--quiet", "predict", str(run_dir), str(paths["test"]), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == ev["num_query"] == 48
    assert _accuracy(rows) == pytest.approx(ev["top1"], abs=1e-4)
    saved = json.loads((run_dir / "predictions.json").read_text())
    classes = saved["classes"]
    assert [classes.index(r["top"][0]["class"]) for r in rows] == saved["predictions"]


def test_new_classes_are_recognised_from_a_support_folder(shared_run, tmp_path):
    """Classes 4 and 5 had no labels in pre-training; a support folder with a few labelled
    images of all six classes is enough to classify them (chance: 1/6)."""
    paths, run_dir = shared_run
    out = tmp_path / "new.json"
    args = ["predict", str(run_dir), str(paths["test_all"]), "--support", str(paths["support"])]
    assert main(["--quiet", *args, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    new = [r for r in rows if os.path.basename(os.path.dirname(r["file"])) in ("class4", "class5")]
    assert len(new) == 24
    assert {c["class"] for r in rows for c in r["top"]} <= {f"class{i}" for i in range(6)}
    assert _accuracy(new) >= 50.0


def test_predictions_say_which_images_are_unknown(shared_run):
    paths, run_dir = shared_run
    model = paws.load(run_dir, device="cpu")
    files = sorted(paths["test_all"].rglob("*.png"))
    preds = model.predictions(files, top_k=2)
    scores = model.known_scores(files)
    assert scores.shape == (len(files),)
    assert [p.score for p in preds] == pytest.approx(scores.tolist(), abs=1e-6)
    assert [p.unknown for p in preds] == (scores < model.unknown_threshold).tolist()
    assert all(p.label == ("unknown" if p.unknown else p.top[0][0]) for p in preds)
    assert [p.top for p in preds] == model.predict(files, top_k=2)
    assert model.known_score.features == "trunk" and model.support.known is not None
    # A labelled image is its own nearest support: its nearest score is 1.
    own = sorted(paths["labeled"].rglob("*.png"))[:2]
    model.known_score = KnownScore(kind="nearest")
    model._threshold = None
    assert model.known_scores(own).tolist() == pytest.approx([1.0, 1.0], abs=1e-5)


def test_no_readable_image_gives_empty_answers_not_an_error(shared_run, tmp_path):
    _, run = shared_run
    model = paws.load(run, device="cpu")
    width = model.embed(sorted(run.parent.rglob("*.png"))[:1]).shape[1]
    assert model.predictions([]) == [] and model.predict([]) == []
    assert tuple(model.predict_proba([]).shape) == (0, len(model.classes))
    assert tuple(model.embed([]).shape) == (0, width)
