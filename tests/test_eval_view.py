"""The evaluation view: one rule for paws eval, paws predict and the batches between them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from paws.after.evaluate import paws_nn
from paws.apply.load import from_checkpoint
from paws.cli import main
from paws.data.eval_view import Preprocessing, read_batches
from paws.data.images import scan_labeled_folder
from paws.data.loaders import Loading, eval_batches
from paws.data.sources import load_datasets
from paws.rundir import restore_model


def _resized_copy(source: Path, out: Path) -> Path:
    """The ``<class>/<image>`` folder ``source`` with every image enlarged to a size the model
    must resize (and, for some, crop): 23 x 23, 30 x 19 and 19 x 27 in turn."""
    sizes = [(23, 23), (30, 19), (19, 27)]
    files, _, _ = scan_labeled_folder(source)
    for k, f in enumerate(files):
        target = out / f.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        with Image.open(f) as im:
            im.convert("L").resize(sizes[k % 3], Image.BICUBIC).save(target)
    return out


def test_eval_and_predict_agree_image_for_image(shared_run, tmp_path, capsys):
    paths, run_dir = shared_run
    folder = _resized_copy(paths["test"], tmp_path / "test")
    overrides = [f"data.test={folder}"]
    cfg, model, _ = restore_model(run_dir, overrides)
    data = load_datasets(cfg)
    assert data.test.in_memory  # held at data.image_size for training, evaluated from its files
    device = torch.device("cpu")
    ev = paws_nn(model.to(device), data, cfg, device)

    predictor = from_checkpoint(run_dir, overrides, device="cpu")
    files, labels, classes = scan_labeled_folder(folder, data.classes)
    answers = [p.top[0][0] for p in predictor.predictions(files)]
    assert answers == [data.classes[i] for i in ev["predictions"]]
    correct = np.mean([a == classes[y] for a, y in zip(answers, labels)])
    assert ev["top1"] == pytest.approx(100 * correct)

    # The inputs themselves are equal, not only the answers.
    loading = Loading.of(cfg, data)
    evaluated = torch.cat([x for x, _ in eval_batches(data.test, cfg.views, loading, device, 7)])
    read = torch.cat([b.x for b in predictor.reader.batches(files, device)])
    assert torch.equal(evaluated, read)

    assert main(["--quiet", "eval", str(run_dir), "--set", *overrides, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["top1"] == pytest.approx(ev["top1"])


def test_one_rule_for_files_pil_images_and_tensors(tmp_path):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, (19, 30, 3), dtype=np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    prep = Preprocessing(8, 0.8, (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), 3)
    tensor = torch.from_numpy(arr).permute(2, 0, 1)
    items = [tmp_path / "a.png", Image.fromarray(arr), tensor, tensor.float() / 255]
    (r,) = read_batches(items, [range(4)], prep)
    assert r.x.shape == (4, 3, 8, 8) and r.positions == [0, 1, 2, 3]
    assert torch.equal(r.x[0], r.x[1]) and torch.equal(r.x[0], r.x[2])
    assert torch.allclose(r.x[0], r.x[3], atol=1e-6)
    assert torch.equal(prep(Image.fromarray(arr)), r.x[0])
    # 19 x 30 -> shorter side round(8 / 0.8) = 10, then the centre 8 x 8; by hand for one pixel
    x = torch.nn.functional.interpolate(
        tensor[None].float() / 255, (10, 16), mode="bilinear", antialias=True
    )[0, :, 1:9, 4:12]
    mean, std = torch.tensor(prep.mean).view(3, 1, 1), torch.tensor(prep.std).view(3, 1, 1)
    assert torch.allclose(r.x[0], (x - mean) / std, atol=1e-6)


def test_read_batches_keeps_order_skips_bad_files_and_stays_bounded(tmp_path):
    good = []
    for i in range(10):
        Image.fromarray(np.full((12, 12), 20 * i, dtype=np.uint8)).save(tmp_path / f"{i}.png")
        good.append(tmp_path / f"{i}.png")
    (tmp_path / "bad.png").write_bytes(b"not an image")
    files = good[:4] + [tmp_path / "bad.png"] + good[4:]
    prep = Preprocessing(12, 1.0, (0.0,), (1.0,), 1)
    reads = read_batches(files, [range(s, min(11, s + 3)) for s in range(0, 11, 3)], prep, "skip")
    reads = list(reads)
    assert [r.positions for r in reads] == [[0, 1, 2], [3, 5], [6, 7, 8], [9, 10]]
    assert reads[1].skipped == [(4, str(tmp_path / "bad.png"))]
    means = torch.cat([r.x.mean(dim=(1, 2, 3)) for r in reads])
    assert torch.allclose(means, torch.arange(10) * 20 / 255, atol=1e-6)
    with pytest.raises(Exception, match="bad.png"):
        list(read_batches(files, [range(11)], prep))

    # A consumer holding one batch: at most ``depth`` batches were decoded ahead of it.
    started = []
    items = list(range(100))

    class Counting(list):
        def __getitem__(self, i):
            started.append(i)
            return torch.zeros(1, 4, 4, dtype=torch.uint8)

    it = read_batches(Counting(items), [[i] for i in items], prep, workers=2, depth=3)
    next(it)
    assert len(started) <= 4
    it.close()


def test_predict_with_a_batch_size_and_jpeg_draft(shared_run, tmp_path, capsys):
    paths, run_dir = shared_run
    files, _, _ = scan_labeled_folder(paths["test"])
    for f in files[:6]:  # JPEGs large enough for a 1/2 draft of the 16-px model
        with Image.open(f) as im:
            im.convert("L").resize((40, 40)).save(tmp_path / f"{f.stem}.jpg", quality=90)
    args = ["--quiet", "predict", str(run_dir), str(tmp_path), "--format", "json"]
    outputs = []
    for extra in ([], ["--batch-size", "4", "--jpeg-draft"]):
        assert main([*args, *extra]) == 0
        outputs.append(json.loads(capsys.readouterr().out))
    assert len(outputs[0]) == len(outputs[1]) == 6
    full = [r["probabilities"] if "probabilities" in r else r for r in outputs[0]]
    draft = [r["probabilities"] if "probabilities" in r else r for r in outputs[1]]
    assert full != draft  # the draft's pixels are not the full decode's
