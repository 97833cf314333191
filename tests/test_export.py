"""The export format (apply/export.py): safetensors weights and a JSON description that stand
alone, and every damaged part refused in one line."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np

import paws
from paws.after.finetune import finetune_checkpoint
from paws.apply.load import from_checkpoint
from paws.cli import main

_FRESH = textwrap.dedent(
    """
    import sys, numpy as np, paws
    folder, images = sys.argv[1], sys.argv[2:]
    for name in ("pre", "fine"):
        model = paws.load(f"{folder}/{name}", device="cpu")
        np.savez(f"{folder}/{name}.npz", probs=model.predict_proba(images).numpy(),
                 head=model.embed(images, features="head").numpy(),
                 trunk=model.embed(images, features="trunk").numpy(),
                 classes=np.array(model.classes))
    """
)


def test_export_reproduces_the_model_in_a_fresh_process(shared_run, tmp_path):
    paths, run_dir = shared_run
    # Copy the run so that it can disappear before the export is loaded.
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy)
    finetune_checkpoint(copy, ["finetune.lrs=[0.05]", "finetune.epochs=[2]"], copy)
    files = [str(f) for f in sorted(paths["test_all"].rglob("*.png"))]
    expected = {}
    for name, ckpt in (("pre", copy / "last.pt"), ("fine", copy / "finetune.pt")):
        model = from_checkpoint(ckpt, device="cpu")
        expected[name] = {
            "probs": model.predict_proba(files).numpy(),
            "head": model.embed(files, "head").numpy(),
            "trunk": model.embed(files, "trunk").numpy(),
            "classes": model.classes,
        }
        assert main(["--quiet", "export", str(ckpt), "--out", str(tmp_path / name)]) == 0
    shutil.rmtree(copy)  # no checkpoint, no config.yaml: the export must stand alone
    manifest = json.loads((tmp_path / "pre" / "model.json").read_text())
    assert manifest["classify"]["method"] == "snn" and manifest["classify"]["num_support"] == 32
    assert manifest["preprocessing"]["size"] == 16 and manifest["preprocessing"]["channels"] == 1
    assert json.loads((tmp_path / "fine" / "model.json").read_text())["classify"] == {
        "method": "linear"
    }
    assert not (tmp_path / "fine" / "support.safetensors").exists()
    # The fresh process imports this same paws, from any working directory.
    src = str(Path(paws.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    subprocess.run(
        [sys.executable, "-c", _FRESH, str(tmp_path), *files], check=True, cwd=tmp_path, env=env
    )
    for name in ("pre", "fine"):
        got = np.load(tmp_path / f"{name}.npz")
        assert list(got["classes"]) == expected[name]["classes"]
        for key in ("probs", "head", "trunk"):
            assert got[key].shape == expected[name][key].shape
            assert np.abs(got[key] - expected[name][key]).max() < 1e-5, (name, key)
