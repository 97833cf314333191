"""paws export --format onnx: ONNX Runtime classifies new images as the PyTorch model does."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from tiny import error_line, write_folder

from paws.after.finetune import finetune_checkpoint
from paws.apply.load import from_checkpoint
from paws.cli import main
from paws.data.images import expand_images

ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


def _preprocess(files: list[Path], prep: dict) -> np.ndarray:
    """Images as onnx.json's steps describe them, with Pillow and numpy only: for images of
    the model's size (no resize, no crop)."""
    rows = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("L" if prep["channels"] == 1 else "RGB")
        assert im.size == (prep["resize"], prep["resize"]) == (prep["size"], prep["size"])
        x = np.asarray(im, dtype=np.float32) / 255
        x = x[None] if x.ndim == 2 else x.transpose(2, 0, 1)
        mean, std = (
            np.asarray(prep[k], dtype=np.float32).reshape(-1, 1, 1) for k in ("mean", "std")
        )
        rows.append((x - mean) / std)
    return np.stack(rows).astype(np.float32)


def _torch(files: list[Path], prep: dict) -> np.ndarray:
    """Images through onnx.json's torch recipe, built from its values."""
    rows = []
    for f in files:
        with Image.open(f) as im:
            im = im.convert("L" if prep["channels"] == 1 else "RGB")
        x = torch.from_numpy(np.asarray(im, dtype=np.float32) / 255)
        x = x[None] if x.dim() == 2 else x.permute(2, 0, 1)
        h, w = x.shape[-2:]
        r, s = prep["resize"], prep["size"]
        if min(h, w) != r:
            new = (round(h * r / min(h, w)), round(w * r / min(h, w)))
            x = F.interpolate(x[None], new, mode="bilinear", antialias=True, align_corners=False)
            x = x[0]
        h, w = x.shape[-2:]
        top, left = (h - s) // 2, (w - s) // 2
        x = x[:, top : top + s, left : left + s].clamp(0, 1)
        mean, std = (torch.tensor(prep[k]).view(-1, 1, 1) for k in ("mean", "std"))
        rows.append((x - mean) / std)
    return torch.stack(rows).numpy()


def _session(folder: Path, description: dict, which: str) -> ort.InferenceSession:
    """An ONNX Runtime session of one graph, its inputs and outputs checked against onnx.json."""
    model = description["models"][which]
    session = ort.InferenceSession(str(folder / model["file"]), providers=["CPUExecutionProvider"])
    for got, want in (
        (session.get_inputs(), model["inputs"]),
        (session.get_outputs(), model["outputs"]),
    ):
        assert [a.name for a in got] == [w["name"] for w in want]
        assert [list(a.shape) for a in got] == [w["shape"] for w in want]
    return session


def _compare(folder: Path, x: np.ndarray, expected: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest differences of ONNX Runtime's outputs from ``expected``, run on the images in
    batches of 1 and 7."""
    description = json.loads((folder / "onnx.json").read_text())
    classifier = _session(folder, description, "classifier")
    encoder = _session(folder, description, "encoder")
    assert len(x) == 8
    worst = {k: 0.0 for k in expected}
    for part in (slice(0, 1), slice(1, 8)):
        probs, emb = classifier.run(None, {"images": x[part]})
        (features,) = encoder.run(None, {"images": x[part]})
        got = {"probabilities": probs, "embeddings": emb, "features": features}
        for k, v in expected.items():
            assert got[k].shape == v[part].shape, k
            worst[k] = max(worst[k], float(np.abs(got[k] - v[part]).max()))
    return worst


def _expected(model, files: list[Path]) -> dict[str, np.ndarray]:
    features = model.classify_features
    return {
        "probabilities": model.predict_proba(files).numpy(),
        "embeddings": model.embed(files, features).numpy(),
        "features": model.embed(files, "trunk").numpy(),
    }


@pytest.mark.slow
def test_onnx_runtime_classifies_new_images_as_pytorch(shared_run, tmp_path, capsys):
    paths, run_dir = shared_run
    out = tmp_path / "onnx"
    assert main(["--quiet", "export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    assert "ONNX Runtime matches PyTorch" in capsys.readouterr().out
    description = json.loads((out / "onnx.json").read_text())
    assert description["classes"] == [f"class{i}" for i in range(4)]
    assert description["classify"]["method"] == "snn" and description["classify"]["tau"] == 0.1
    assert description["classify"]["num_support"] == 32
    prep = description["preprocessing"]
    assert (prep["size"], prep["channels"]) == (16, 1)
    # Images the model never saw: four of the test folder and four of the support folder.
    files = expand_images([paths["test"]])[::12] + expand_images([paths["support"]])[:4]
    model = from_checkpoint(run_dir, device="cpu")
    x = _preprocess(files, prep)
    read = torch.cat([b.x for b in model.reader.batches(files, model.device)])
    assert np.abs(x - read.numpy()).max() < 1e-6
    expected = _expected(model, files)
    assert expected["probabilities"].shape == (8, 4) and expected["embeddings"].shape == (8, 16)
    worst = _compare(out, x, expected)
    assert all(v < 1e-4 for v in worst.values()), worst


@pytest.mark.slow
def test_onnx_export_of_a_fine_tuned_classifier(shared_run, tmp_path):
    paths, run_dir = shared_run
    finetune_checkpoint(run_dir, ["finetune.lrs=[0.05]", "finetune.epochs=[2]"], tmp_path)
    out = tmp_path / "onnx"
    args = ["--quiet", "export", str(tmp_path / "finetune.pt"), "--format", "onnx"]
    assert main([*args, "--out", str(out)]) == 0
    description = json.loads((out / "onnx.json").read_text())
    assert description["classify"]["method"] == "linear" and description["kind"] == "finetune"
    files = expand_images([paths["test"]])[1::6][:8]
    model = from_checkpoint(tmp_path / "finetune.pt", device="cpu")
    expected = _expected(model, files)
    worst = _compare(out, _preprocess(files, description["preprocessing"]), expected)
    assert all(v < 1e-4 for v in worst.values()), worst
    assert np.allclose(expected["probabilities"].sum(axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_onnx_with_a_new_support_resize_crop_and_colour(shared_run, tmp_path):
    """New classes baked in from a support folder; 21-px colour images resized to 20 and
    centre-cropped to 16 as onnx.json's torch recipe says."""
    paths, run_dir = shared_run
    images = write_folder(tmp_path / "colour", 6, 2, size=21, channels=3, seed=9)
    files = expand_images([images])[:8]
    out = tmp_path / "onnx"
    args = ["export", str(run_dir / "final.pt"), "--support", str(paths["support"])]
    settings = ["--set", "views.eval_crop=0.8"]
    assert main(["--quiet", *args, *settings, "--format", "onnx", "--out", str(out)]) == 0
    description = json.loads((out / "onnx.json").read_text())
    prep = description["preprocessing"]
    assert (prep["resize"], prep["size"], description["kind"]) == (20, 16, "pretrain")
    assert description["classes"] == [f"class{i}" for i in range(6)]
    model = from_checkpoint(run_dir / "final.pt", ["views.eval_crop=0.8"], device="cpu")
    model.set_support(paths["support"])
    worst = _compare(out, _torch(files, prep), _expected(model, files))
    assert all(v < 1e-4 for v in worst.values()), worst


def test_onnx_export_without_onnxscript_is_one_line(shared_run, tmp_path, capsys, monkeypatch):
    _, run_dir = shared_run
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import machinery: "not installed"
    args = ["--quiet", "export", str(run_dir), "--format", "onnx", "--out", str(tmp_path / "x")]
    assert main(args) == 2
    line = error_line(capsys.readouterr().err)
    assert "onnxscript" in line and "pip install 'paws-ssl[onnx]'" in line
    assert not (tmp_path / "x").exists()


def test_a_full_disk_during_onnx_export_leaves_the_earlier_model(
    shared_run, tmp_path, capsys, monkeypatch
):
    import errno

    _, run_dir = shared_run
    out = tmp_path / "onnx"
    argv = ["--quiet", "export", str(run_dir), "--format", "onnx", "--out", str(out)]
    assert main(argv) == 0
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    capsys.readouterr()

    def full_disk(module, args, path, **kwargs):
        with open(path, "wb") as f:  # the exporter's own write, cut short
            f.write(b"\x08\x07partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(torch.onnx, "export", full_disk)
    assert main(argv) == 2
    line = error_line(capsys.readouterr().err)
    assert line.startswith(f"could not write {out / 'model.onnx'}: no space left on the disk ")
    assert "mounted at" in line and "MB free" in line
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before  # nothing half-written


def test_the_onnx_files_carry_classes_and_preprocessing_in_their_metadata(shared_run, tmp_path):
    import onnx

    _, run_dir = shared_run
    out = tmp_path / "onnx"
    assert main(["--quiet", "export", str(run_dir), "--format", "onnx", "--out", str(out)]) == 0
    description = json.loads((out / "onnx.json").read_text())
    for name in ("model.onnx", "encoder.onnx"):
        props = {p.key: p.value for p in onnx.load(str(out / name)).metadata_props}
        assert json.loads(props["paws.classes"]) == description["classes"]
        assert json.loads(props["paws.preprocessing"]) == description["preprocessing"]
        assert json.loads(props["paws.classify"])["method"] == "snn"
        assert props["paws.kind"] == description["kind"]
        meta = ort.InferenceSession(str(out / name)).get_modelmeta().custom_metadata_map
        assert json.loads(meta["paws.classes"]) == [f"class{i}" for i in range(4)]
    # The rewritten graph still answers as before (paws export checked it against PyTorch).
    x = np.zeros((2, 1, 16, 16), np.float32)
    probs, _ = ort.InferenceSession(str(out / "model.onnx")).run(None, {"images": x})
    assert probs.shape == (2, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
