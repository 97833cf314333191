"""The student (paws.after.distill): its targets and loss against hand-computed values, and a
student of the tiny shared run that every command reads as a model, resumed exactly."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from tiny import run_cli

import paws.after.distill as distill_module
from paws.after.distill import (
    PARTIAL,
    distill_checkpoint,
    distill_loss,
    sharpen_targets,
)
from paws.after.evaluate import classifier_probs
from paws.apply.load import from_checkpoint, load
from paws.apply.predictor import ClassifierPredictor
from paws.data import load_datasets
from paws.rundir import checkpoint, restore

# Four epochs over the tiny run's unlabelled images, batches of 32.
# lr 0.2: at the default 0.05 the 20 steps of a tiny student leave it near chance on some CPUs
SMALL = ["distill.epochs=4", "distill.lr=0.2", "distill.batch_size=32", "distill.labeled_batch=8"]


def test_sharpened_targets_by_hand():
    probs = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    targets, kept = sharpen_targets(probs, temperature=0.5)
    # p^2 renormalised: (0.25, 0.09, 0.04) / 0.38 and (0.01, 0.01, 0.64) / 0.66
    assert torch.allclose(targets[0], torch.tensor([0.25, 0.09, 0.04]) / 0.38, atol=1e-6)
    assert torch.allclose(targets[1], torch.tensor([0.01, 0.01, 0.64]) / 0.66, atol=1e-6)
    assert kept.tolist() == [True, True]
    same, _ = sharpen_targets(probs, temperature=1.0)
    assert torch.allclose(same, probs, atol=1e-6)
    hard, kept = sharpen_targets(probs, kind="hard", threshold=0.6)
    assert hard.tolist() == [[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]
    assert kept.tolist() == [False, True]


def test_sharpening_a_tiny_temperature_stays_finite():
    targets, _ = sharpen_targets(torch.tensor([[0.6, 0.4, 0.0]]), temperature=1e-3)
    assert torch.isfinite(targets).all() and targets[0, 0] == pytest.approx(1.0)


def test_distill_loss_is_the_loop_cross_entropy():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 4, generator=g)
    targets = torch.softmax(torch.randn(5, 4, generator=g), dim=1)
    expected = 0.0
    for row, t in zip(logits, targets):
        log_p = row - torch.log(torch.exp(row).sum())
        expected += -float((t * log_p).sum())
    assert float(distill_loss(logits, targets)) == pytest.approx(expected / 5, rel=1e-6)
    # with one-hot targets it is plain cross-entropy
    hard = F.one_hot(targets.argmax(1), 4).float()
    assert float(distill_loss(logits, hard)) == pytest.approx(
        float(F.cross_entropy(logits, targets.argmax(1))), rel=1e-6
    )


@pytest.fixture(scope="module")
def student(shared_run, tmp_path_factory):
    """A student of the shared run, in a folder of its own: ``(folders, out, report)``."""
    paths, run_dir = shared_run
    out = tmp_path_factory.mktemp("student")
    report = distill_checkpoint(run_dir, SMALL, out)
    return paths, out, report


def test_student_is_saved_as_a_classifier_and_beats_chance(student):
    _, out, report = student
    assert (out / "distill.pt").is_file() and not (out / PARTIAL).exists()
    saved = json.loads((out / "distill.json").read_text())
    n = saved["num_unlabeled"]  # the unlabelled folder and the labelled images
    assert n == 6 * 24 + 4 * 8 and saved["kept"] == n  # no threshold: every image
    assert saved["steps"] == report["steps"] == 4 * (n // 32)
    assert saved["teacher"] == "tighten.pt"
    assert checkpoint.load(out / "distill.pt")["kind"] == "distill"
    assert report["test"]["top1"] > 40.0  # 4 classes: chance is 25%


def test_student_predict_eval_and_export_agree(student, capsys, monkeypatch, tmp_path):
    paths, out, _ = student
    model = from_checkpoint(out / "distill.pt")
    assert isinstance(model, ClassifierPredictor) and model.classes == [
        f"class{c}" for c in range(4)
    ]
    files = sorted(paths["test"].rglob("*.png"))
    predictions = model.predictions(files)
    assert all(p.score is not None for p in predictions)  # the known score of its support
    cfg = restore(out / "distill.pt").cfg
    data = load_datasets(cfg)
    probs = classifier_probs(model.net, data.test, cfg, data, torch.device("cpu"))
    # the test set as training reads it, in its own order, against the files one by one
    by_name = dict(zip(data.test.names, probs.argmax(1).tolist()))
    names = [str(f.relative_to(paths["test"])) for f in files]
    assert sorted(by_name) == sorted(names)
    assert [model.classes.index(p.top[0][0]) for p in predictions] == [by_name[n] for n in names]
    code, text, _ = run_cli(["eval", str(out / "distill.pt"), "--json"], capsys, monkeypatch)
    assert code == 0
    accuracy = json.loads(text)["top1"]
    labels = [model.classes.index(f.parent.name) for f in files]
    hits = sum(model.classes.index(p.top[0][0]) == y for p, y in zip(predictions, labels))
    assert accuracy == pytest.approx(100.0 * hits / len(files))
    exported = load(model.export(tmp_path / "export"))
    again = exported.predictions(files)
    assert [p.top for p in again] == [p.top for p in predictions]
    assert [p.score for p in again] == pytest.approx([p.score for p in predictions])


def test_student_resumes_exactly_after_an_interruption(shared_run, student, tmp_path, monkeypatch):
    _, run_dir = shared_run
    _, out, _ = student
    calls = {"n": 0}
    real = distill_module.distill_loss

    def interrupted(logits, targets):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt
        return real(logits, targets)

    monkeypatch.setattr(distill_module, "distill_loss", interrupted)
    every = [*SMALL, "distill.checkpoint_every=3"]
    with pytest.raises(KeyboardInterrupt):
        distill_checkpoint(run_dir, every, tmp_path)
    assert checkpoint.load(tmp_path / PARTIAL)["step"] == 6
    monkeypatch.setattr(distill_module, "distill_loss", real)
    report = distill_checkpoint(run_dir, every, tmp_path)
    assert report["resumed_from"] == 6
    whole = checkpoint.load(out / "distill.pt")["model"]
    resumed = checkpoint.load(tmp_path / "distill.pt")["model"]
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_paws_distill_command_and_a_classifier_refused_as_teacher(student, capsys, monkeypatch):
    _, out, _ = student
    code, _, err = run_cli(["distill", str(out / "distill.pt")], capsys, monkeypatch)
    assert code != 0 and "student classifier, not a pre-trained model" in err
