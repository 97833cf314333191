"""Accuracy and unknown detection of a model (after/evaluate.py)."""

from __future__ import annotations

import json

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
