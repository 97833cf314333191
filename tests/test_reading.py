"""Images into network input (apply/reading.py): paths, PIL images and tensors of any dtype or
channel count give the same embeddings."""

from __future__ import annotations

import numpy as np
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
