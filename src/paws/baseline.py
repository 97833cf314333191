"""Supervised-only baseline: the same encoder trained with cross-entropy on the labelled images.

It sees exactly what PAWS sees of the labels (the same labelled subset, the same augmentations
as PAWS's large views) and nothing of the unlabelled images, for the same number of steps as
the PAWS run (or a number of epochs, or a wall-clock budget). Its test accuracy is the number a
user compares PAWS-NN with to decide whether semi-supervised pre-training helps on their data.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from paws.config import Config, save_config
from paws.data import Datasets, augmented_batches, eval_batches, load_datasets
from paws.errors import UserError
from paws.evaluate import accuracy
from paws.models import build_encoder
from paws.optim import LARS, WarmupCosine, param_groups, set_lr
from paws.progress import Progress, info
from paws.sampling import UnlabeledSampler
from paws.train import setup_runtime, total_steps

__all__ = ["Classifier", "train_baseline", "classifier_accuracy"]


class Classifier(nn.Module):
    """Encoder trunk followed by a linear layer: (N, C, H, W) to (N, K) logits."""

    def __init__(self, encoder: nn.Module, num_classes: int):
        super().__init__()
        self.encoder = encoder
        self.fc = nn.Linear(encoder.num_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.encoder(x))


@torch.no_grad()
def classifier_accuracy(
    model: nn.Module, data: Datasets, cfg: Config, device: torch.device
) -> dict[str, Any]:
    """Top-1/top-5 test accuracy (percent) of a classifier on centre-cropped test images."""
    model.eval()
    probs = []
    for x, _ in eval_batches(data.test, cfg, data.channels, data.mean, data.std, device):
        probs.append(model(x).float().softmax(dim=1).cpu())
    p = torch.cat(probs)
    y = torch.from_numpy(data.test.labels)
    return {"top1": accuracy(p, y, 1), "top5": accuracy(p, y, 5), "num_query": len(y)}


def _epoch_batches(n: int, batch_size: int, seed: int):
    """Index batches over epochs of fresh permutations: a function of the step."""
    per_epoch = max(1, n // batch_size)
    cache: dict[int, np.ndarray] = {}

    def fn(step: int) -> np.ndarray:
        epoch, i = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, epoch, 3]).permutation(n)
        return cache[epoch][i * batch_size : (i + 1) * batch_size]

    return fn, per_epoch


def train_baseline(
    cfg: Config, out_dir: str | Path | None = None, data: Datasets | None = None
) -> dict[str, Any]:
    """Train the supervised-only baseline and return its test accuracy.

    Returns:
        ``{"top1", "top5", "num_query", "num_labeled", "steps", "seconds"}``; also written to
        ``out_dir/baseline.json`` when ``out_dir`` is given.
    """
    device = setup_runtime(cfg)
    data = data or load_datasets(cfg)
    if data.test is None:
        raise UserError("the baseline needs a test set (data.test for image folders)")
    b = cfg.baseline
    model = Classifier(build_encoder(cfg, data.channels), len(data.classes)).to(device)
    n = len(data.labeled)
    batch_size = min(b.batch_size, n)
    index_fn, per_epoch = _epoch_batches(n, batch_size, cfg.run.seed)
    if b.epochs is not None:
        steps = max(1, int(round(b.epochs * per_epoch)))
    else:
        unl = UnlabeledSampler(len(data.unlabeled), cfg.optim.batch_size, cfg.run.seed)
        steps = total_steps(cfg, unl.steps_per_epoch)
    optimizer = LARS(param_groups(model, b.weight_decay), lr=b.lr, momentum=0.9, nesterov=True)
    for g in optimizer.param_groups:
        g["lars"] = False
    schedule = WarmupCosine(b.lr, b.lr, 0.0, 0, steps)
    labels = torch.from_numpy(data.labeled.labels).to(device)
    info(f"baseline: {n} labelled images, {steps} steps of {batch_size}")
    progress = Progress(steps, "baseline")
    start, done = time.time(), 0
    model.train()
    for step, (x,), _ in augmented_batches(
        data.labeled, index_fn, 0, steps, cfg.views, data, cfg, device, multicrop=False, stream=3
    ):
        set_lr(optimizer, schedule(step))
        loss = F.cross_entropy(model(x), labels[torch.from_numpy(index_fn(step)).to(device)])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        progress.update(1, loss=loss.item())
        if b.time_limit is not None and time.time() - start > b.time_limit:
            break
    progress.close()
    result = classifier_accuracy(model, data, cfg, device)
    result.update(num_labeled=n, steps=done, seconds=round(time.time() - start, 1))
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "baseline_config.yaml")
        (out / "baseline.json").write_text(json.dumps(result, indent=2) + "\n")
    return result
