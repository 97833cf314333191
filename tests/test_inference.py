"""predict, embed, export and paws.load on a tiny pre-trained run."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import error_line

import paws
from paws.after.finetune import finetune_checkpoint
from paws.apply.load import from_checkpoint
from paws.cli import main
from paws.data.images import expand_images


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


def test_predict_csv_top_k_probabilities(shared_run, capsys):
    paths, run_dir = shared_run
    files = sorted(paths["test"].rglob("*.png"))[:3]
    args = ["--quiet", "predict", str(run_dir), *map(str, files), "--top-k", "3"]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0] == (
        "file,class_1,probability_1,class_2,probability_2,class_3,probability_3,score,unknown"
    )
    assert len(lines) == 4
    for line, f in zip(lines[1:], files):
        cells = line.split(",")
        assert cells[0] == str(f)
        probs = [float(p) for p in cells[2:7:2]]
        assert probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6
        assert len(set(cells[1:7:2])) == 3
        assert math.isfinite(float(cells[7])) and cells[8] in ("true", "false")


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


def test_embed_npy_and_safetensors(shared_run, tmp_path):
    from safetensors import safe_open

    paths, run_dir = shared_run
    files = expand_images([paths["test"]])
    expected = from_checkpoint(run_dir, device="cpu").embed(files, "trunk")
    npy = tmp_path / "emb.npy"
    base = ["--quiet", "embed", str(run_dir), str(paths["test"]), "--features", "trunk"]
    assert main([*base, "--out", str(npy)]) == 0
    assert np.allclose(np.load(npy), expected.numpy(), atol=1e-6)
    assert (tmp_path / "emb.txt").read_text().splitlines() == [str(f) for f in files]
    st = tmp_path / "emb.safetensors"
    assert main([*base, "--out", str(st)]) == 0
    with safe_open(str(st), "pt") as f:
        assert json.loads(f.metadata()["files"]) == [str(p) for p in files]
        assert f.metadata()["features"] == "trunk"
        assert torch.allclose(f.get_tensor("embeddings"), expected, atol=1e-6)
    assert expected.shape == (48, 24)


def test_paths_pil_images_and_tensors_give_the_same_embeddings(shared_run):
    paths, run_dir = shared_run
    model = paws.load(run_dir, device="cpu")
    files = sorted(paths["test"].rglob("*.png"))[:5]
    pil = [Image.open(f) for f in files]
    x = torch.stack([torch.from_numpy(np.array(im)).unsqueeze(0) for im in pil])
    from_paths = model.embed(files)
    assert torch.allclose(model.embed(pil), from_paths, atol=1e-6)
    assert torch.allclose(model.embed(x), from_paths, atol=1e-6)  # uint8
    assert torch.allclose(model.embed(x.float() / 255), from_paths, atol=1e-5)
    rgb = x.expand(-1, 3, -1, -1)  # colour input is converted to the model's grey
    assert torch.allclose(model.embed(rgb), from_paths, atol=1e-5)
    top = model.predict(pil, top_k=2)
    assert len(top) == 5 and all(len(t) == 2 and t[0][1] >= t[1][1] for t in top)


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


def test_export_then_new_support_in_python(shared_run, tmp_path):
    paths, run_dir = shared_run
    assert main(["--quiet", "export", str(run_dir), "--out", str(tmp_path / "exp")]) == 0
    model = paws.load(tmp_path / "exp", support=paths["support"], device="cpu")
    assert model.classes == [f"class{i}" for i in range(6)] and len(model.support.labels) == 36
    probs = model.predict_proba(paths["test_all"])
    assert probs.shape == (72, 6) and torch.allclose(probs.sum(1), torch.ones(72), atol=1e-5)


def test_user_errors_are_one_line(shared_run, tmp_path, capsys):
    paths, run_dir = shared_run
    finetune_checkpoint(run_dir, ["finetune.lrs=[0.05]", "finetune.epochs=[1]"], tmp_path)
    capsys.readouterr()
    cases = [
        ["predict", str(run_dir), str(tmp_path / "missing.png")],
        ["predict", str(tmp_path / "finetune.pt"), str(paths["test"]), "--support", "x"],
        ["embed", str(run_dir), str(paths["test"]), "--out", str(tmp_path / "e.csv")],
        ["predict", str(tmp_path), str(paths["test"])],
    ]
    (tmp_path / "bad.png").write_bytes(b"not an image")
    cases.append(["predict", str(run_dir), str(tmp_path / "bad.png")])
    for args in cases:
        assert main(["--quiet", *args]) == 2, args
        error_line(capsys.readouterr().err)


def test_numpy_images_are_read_as_the_files_they_come_from(shared_run):
    from paws.errors import UserError

    paths, run_dir = shared_run
    model = paws.load(run_dir, device="cpu")
    files = sorted(paths["test"].rglob("*.png"))[:3]
    grey = [np.asarray(Image.open(f)) for f in files]  # (H, W) uint8
    from_files = model.embed(files)
    assert grey[0].shape == (16, 16) and grey[0].dtype == np.uint8
    assert torch.equal(model.embed(grey), from_files)
    assert torch.equal(model.embed([g[..., None] for g in grey]), from_files)  # (H, W, 1)
    assert torch.equal(model.embed(np.stack([g[..., None] for g in grey])), from_files)
    # Colour (H, W, 3) of another size, converted to the model's grey and resized: as the PIL
    # image it is; a float array in [0, 1] as the same (C, H, W) float tensor.
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (20, 26, 3), dtype=np.uint8)
    assert torch.equal(model.embed(rgb), model.embed(Image.fromarray(rgb)))
    unit = rgb.astype(np.float64) / 255
    as_tensor = torch.from_numpy(unit).float().permute(2, 0, 1)
    assert torch.allclose(model.embed(unit), model.embed(as_tensor), atol=1e-6)
    rgba = np.concatenate([rgb, np.full((20, 26, 1), 255, np.uint8)], axis=2)
    assert torch.allclose(model.embed(rgba), model.embed(rgb), atol=1e-6)
    # Each answer names its input: the file, or the position of an in-memory image.
    assert [p.source for p in model.predictions(files)] == [str(f) for f in files]
    assert [p.source for p in model.predictions(grey)] == [0, 1, 2]
    for bad, words in [
        (rgb.astype(np.float32), "values in [0, 1]"),
        (rgb.astype(np.int32), "uint8 or float"),
        (np.zeros((3, 16, 16), np.uint8), "(H, W) or (H, W, C)"),
    ]:
        with pytest.raises(UserError, match=re.escape(words)):
            model.embed(bad)
