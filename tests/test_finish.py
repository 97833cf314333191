"""The end of a run (pretrain/finish.py): the final checkpoint, tightening, the choice of the
model the run means on its labels alone, and eval.json with every candidate's test accuracy."""

from __future__ import annotations

import json

import torch
from tiny import logged_steps, tiny_overrides, train_tiny

from paws import rundir
from paws.pretrain.finish import DEFAULT_ORDER
from paws.report import build_report
from paws.rundir import checkpoint


def _json(path):
    return json.loads(path.read_text())


def test_a_finished_run_means_the_model_its_labels_choose_and_records_every_candidate(
    image_folders, tmp_path
):
    run = train_tiny(tmp_path / "run", tiny_overrides(image_folders, "eval.choice_folds=2"))
    last, final = checkpoint.load(run / "last.pt"), checkpoint.load(run / "final.pt")
    assert last["step"] == final["step"] == 4
    assert all(torch.equal(last["model"][k], final["model"][k]) for k in last["model"])
    choice, ev = _json(run / "choice.json"), _json(run / "eval.json")
    tightened = _json(run / "tighten.json")
    assert choice["folds"] == 2 and set(choice["candidates"]) == {"final.pt", "tighten.pt"}
    assert all(len(c["held_out_top1"]) == 2 for c in choice["candidates"].values())
    # eval.json is the chosen model's, with the other candidate's accuracy beside it.
    assert ev["model"] == choice["model"] and rundir.model_file(run) == run / choice["model"]
    assert ev["choice"] == {"reason": choice["reason"], "folds": 2}
    cands = ev["candidates"]
    assert set(cands) == {"final.pt", "tighten.pt"}
    assert ev["top1"] == cands[choice["model"]]["top1"]
    assert ev["pretrained"]["top1"] == cands["final.pt"]["top1"]
    assert tightened["paws_nn_before"]["top1"] == cands["final.pt"]["top1"]
    assert tightened["paws_nn_after"]["top1"] == cands["tighten.pt"]["top1"]
    assert ev["tighten"]["steps"] == 3 and ev["num_query"] == 12
    assert logged_steps(run / rundir.EVALS) == [4]  # the pre-trained model's test accuracy
    predictions = _json(run / "predictions.json")
    assert len(predictions["predictions"]) == len(predictions["labels"]) == 12


def test_without_folds_the_run_means_the_default_and_says_so(image_folders, tmp_path):
    run = train_tiny(tmp_path / "run", tiny_overrides(image_folders, "eval.choice_folds=0"))
    choice = _json(run / "choice.json")
    assert DEFAULT_ORDER[0] == "tighten.pt" and choice["model"] == "tighten.pt"
    assert "eval.choice_folds is 0" in choice["reason"] and choice["folds"] == 0
    assert all(c["held_out_top1"] == [] for c in choice["candidates"].values())
    assert _json(run / "eval.json")["model"] == "tighten.pt"


def test_a_run_with_one_model_and_no_test_set_writes_no_results(image_folders, tmp_path):
    changes = ["data.test=null", "tighten.after_training=false", "optim.steps=2"]
    run = train_tiny(tmp_path / "run", tiny_overrides(image_folders, *changes))
    choice = _json(run / "choice.json")
    assert choice["model"] == "final.pt" and choice["reason"] == "the run's only model (final.pt)"
    assert not (run / "eval.json").exists() and not (run / "tighten.pt").exists()
    assert not (run / "predictions.json").exists()
    assert rundir.model_file(run) == run / "final.pt"


def test_a_run_that_distils_offers_its_student_to_the_choice(image_folders, tmp_path):
    changes = [
        "eval.choice_folds=2",
        "distill.after_training=true",
        "distill.epochs=2",
        "distill.batch_size=8",
        "distill.labeled_batch=4",
    ]
    run = train_tiny(tmp_path / "run", tiny_overrides(image_folders, *changes))
    assert checkpoint.load(run / "distill.pt")["kind"] == "distill"
    report = _json(run / "distill.json")
    assert report["teacher"] == "tighten.pt" and report["steps"] == 2 * (report["kept"] // 8)
    choice, ev = _json(run / "choice.json"), _json(run / "eval.json")
    assert set(choice["candidates"]) == {"final.pt", "tighten.pt", "distill.pt"}
    assert len(choice["candidates"]["distill.pt"]["held_out_top1"]) == 2
    assert ev["candidates"]["distill.pt"]["top1"] == report["test"]["top1"]
    assert ev["top1"] == ev["candidates"][choice["model"]]["top1"]


def test_a_run_that_means_its_student_is_reported_like_any_other(image_folders, tmp_path):
    changes = ["distill.after_training=true", "distill.epochs=2", "distill.batch_size=8"]
    run = train_tiny(
        tmp_path / "run", tiny_overrides(image_folders, "eval.choice_folds=0", *changes)
    )
    # A run whose labels chose its student: what the report draws comes from the classifier.
    choice = _json(run / "choice.json")
    rundir.write_json(run / "choice.json", dict(choice, model="distill.pt"))
    assert rundir.model_file(run) == run / "distill.pt"
    paths = build_report([run], tmp_path / "report", tsne_points=8, grid_images=4)
    page = paths["html"].read_text()
    assert "not a pre-trained model" not in page and "no predictions.json" not in page
    assert 'alt="t-SNE map of test embeddings"' in page and "distill.pt" in page
    assert 'alt="Test images: predicted and true labels"' in page
