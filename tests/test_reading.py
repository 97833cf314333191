"""Images into network input (apply/reading.py): paths, PIL images and tensors of any dtype or
channel count give the same embeddings."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from PIL import Image

import paws


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
