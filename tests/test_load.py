"""``paws.load`` (apply/load.py): a checkpoint, run directory or export as a predictor, built
whole, with a new support set if asked."""

from __future__ import annotations

from pathlib import Path

import pytest
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


def test_a_run_directory_opens_its_export_of_the_chosen_model_while_it_is_that_model(
    shared_run, tmp_path, monkeypatch
):
    import shutil

    import paws.apply.load as loading
    from paws import rundir
    from paws.apply.export import made_from

    paths, shared = shared_run
    # paws train ends by exporting the model the run means (run.export).
    assert made_from(shared / "export", rundir.model_file(shared))
    run = Path(shutil.copytree(shared, tmp_path / "run"))  # a copy to change
    assert main(["--quiet", "export", str(run)]) == 0  # paws export RUN writes it again
    assert made_from(run / "export", rundir.model_file(run))
    files = sorted(paths["test_all"].rglob("*.png"))
    rebuilt = loading.from_checkpoint(run, None, "cpu").predictions(files)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("rebuilt from the checkpoint")

    with monkeypatch.context() as m:
        m.setattr(loading, "from_checkpoint", no_rebuild)
        opened = paws.load(run, device="cpu").predictions(files)  # the export: same answers
    assert [p.label for p in opened] == [p.label for p in rebuilt]
    assert [p.top[0][1] for p in opened] == pytest.approx([p.top[0][1] for p in rebuilt], abs=1e-5)
    assert [p.score for p in opened] == pytest.approx([p.score for p in rebuilt], abs=1e-4)
    # Not when asked for another support or other settings, nor once the model has changed.
    calls = []
    monkeypatch.setattr(loading, "from_checkpoint", lambda *a, **k: calls.append(a) or no_rebuild())
    for kwargs in ({"support": paths["support"]}, {"overrides": ["eval.tau=0.2"]}):
        with pytest.raises(AssertionError):
            loading.load(run, device="cpu", **kwargs)
    model = rundir.model_file(run)
    model.write_bytes(model.read_bytes())  # the same bytes, a new time: no longer the export's
    with pytest.raises(AssertionError):
        paws.load(run, device="cpu")
    assert len(calls) == 3


def test_an_export_with_another_support_is_not_the_run_s_own(shared_run, tmp_path):
    import json

    paths, run = shared_run
    out = tmp_path / "exp"
    assert main(["--quiet", "export", str(run), "--out", str(out)]) == 0
    assert json.loads((out / "model.json").read_text())["source"]["checkpoint"].endswith(".pt")
    argv = ["--quiet", "export", str(run), "--out", str(out), "--support", str(paths["support"])]
    assert main(argv) == 0
    assert "source" not in json.loads((out / "model.json").read_text())
