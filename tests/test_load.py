"""``paws.load`` (apply/load.py): a checkpoint, run directory or export as a predictor, built
whole, with a new support set if asked."""

from __future__ import annotations

import torch

import paws
from paws.cli import main


def test_export_then_new_support_in_python(shared_run, tmp_path):
    paths, run_dir = shared_run
    assert main(["--quiet", "export", str(run_dir), "--out", str(tmp_path / "exp")]) == 0
    model = paws.load(tmp_path / "exp", support=paths["support"], device="cpu")
    assert model.classes == [f"class{i}" for i in range(6)] and len(model.support.labels) == 36
    probs = model.predict_proba(paths["test_all"])
    assert probs.shape == (72, 6) and torch.allclose(probs.sum(1), torch.ones(72), atol=1e-5)
