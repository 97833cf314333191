"""Prediction and embedding files (apply/outputs.py): the CSV of top-k classes with the known
score, and embeddings as .npy or .safetensors with the file names beside them."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tiny import error_line

from paws.apply.load import from_checkpoint
from paws.cli import main
from paws.data.images import expand_images


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


def test_embed_refuses_a_file_name_with_a_line_break_for_npy(shared_run, tmp_path, capsys):
    _, run_dir = shared_run
    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("plain.png", "two\nlines.png"):
        Image.fromarray(np.full((16, 16), 90, np.uint8)).save(folder / name)
    npy = tmp_path / "emb.npy"
    assert main(["embed", str(run_dir), str(folder), "--out", str(npy)]) == 2
    line = error_line(capsys.readouterr().err)
    assert "line break" in line and ".safetensors" in line
    assert not npy.exists() and not npy.with_suffix(".txt").exists()
    # .safetensors holds the names as JSON: every name comes back whole.
    st = tmp_path / "emb.safetensors"
    assert main(["--quiet", "embed", str(run_dir), str(folder), "--out", str(st)]) == 0
    from safetensors import safe_open

    with safe_open(str(st), "pt") as f:
        names = json.loads(f.metadata()["files"])
        assert [Path(n).name for n in names] == ["plain.png", "two\nlines.png"]
        assert f.get_tensor("embeddings").shape[0] == 2
