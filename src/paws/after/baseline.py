"""Supervised-only baseline: the same encoder trained with cross-entropy on the labelled images.

It sees exactly what PAWS sees of the labels (the same labelled subset, the same augmentations
as PAWS's large views) and nothing of the unlabelled images. By default it trains as many steps
as the PAWS run, and at least ``baseline.min_epochs`` epochs over the labelled images, so that a
small labelled set is fitted rather than stopped early (or ``baseline.epochs`` epochs, or a
wall-clock budget); it reports how long it trained and its final training loss. Its test
accuracy is the number a user compares PAWS-NN with to decide whether semi-supervised
pre-training helps on their data.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from paws import rundir, runtime
from paws.after.evaluate import classifier_accuracy
from paws.config import Config, save_config
from paws.config.adapt import check_length, fit_to_data, total_steps
from paws.data.loaders import Loading, view_batches
from paws.data.sources import Datasets, load_datasets
from paws.errors import UserError
from paws.files import check_out_dir
from paws.method.optim import LARS, WarmupCosine, param_groups, set_lr
from paws.method.sampling import EpochSampler, Stream, UnlabeledSampler
from paws.models import Architecture, build_network, check_encoder
from paws.progress import Progress, info

__all__ = ["train_baseline"]


def _length(cfg: Config, data: Datasets, steps_per_epoch: int) -> int:
    """Steps of the baseline: ``baseline.epochs`` epochs, or the PAWS run's steps (fitted to
    the data) and at least ``baseline.min_epochs`` epochs over the labelled images."""
    b = cfg.baseline
    if b.epochs is not None:
        steps = max(1, int(round(b.epochs * steps_per_epoch)))
        return check_length(steps, "baseline.epochs", steps_per_epoch)
    paws_cfg = fit_to_data(cfg, len(data.unlabeled), data.labeled.labels)
    unl = UnlabeledSampler(len(data.unlabeled), paws_cfg.optim.batch_size, cfg.run.seed)
    steps = total_steps(paws_cfg, unl.steps_per_epoch)
    least = int(math.ceil(b.min_epochs * steps_per_epoch))
    return max(steps, check_length(least, "baseline.min_epochs", steps_per_epoch))


def train_baseline(
    cfg: Config,
    out_dir: str | Path | None = None,
    data: Datasets | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Train the supervised-only baseline and return its test accuracy.

    Args:
        cfg: the config (its ``baseline`` section, and the model and views of the PAWS run).
        out_dir: where ``baseline.json`` and ``baseline_config.yaml`` go (None: nowhere).
        data: preloaded datasets (tests), else loaded from the config.
        device: compute device (default: from ``run.device``).

    Returns:
        ``{"top1", "top5", "num_query", "num_labeled", "steps", "epochs", "train_loss" (mean
        of the last steps), "seconds"}``; also written to
        ``out_dir/baseline.json`` when ``out_dir`` is given.
    """
    check_encoder(cfg.model.encoder)
    if out_dir is not None:  # before the training, not after it
        check_out_dir(out_dir)
    device = device or runtime.device_for(cfg.run.device)
    data = data or load_datasets(cfg)
    if data.test is None:
        raise UserError("the baseline needs a test set (data.test for image folders)")
    b = cfg.baseline
    arch = Architecture.from_config(cfg, data.channels, len(data.classes), classifier_on="trunk")
    model = build_network(arch, cfg.run.seed, cfg.model.weights).to(device)
    n = len(data.labeled)
    batch_size = min(b.batch_size, n)
    order = EpochSampler(n, batch_size, cfg.run.seed, Stream.BASELINE)
    steps = _length(cfg, data, order.steps_per_epoch)
    groups = param_groups(model, b.weight_decay, lars=False)
    optimizer = LARS(groups, lr=b.lr, momentum=0.9, nesterov=True)
    schedule = WarmupCosine(b.lr, b.lr, 0.0, 0, steps)
    labels = torch.from_numpy(data.labeled.labels).to(device)
    info(f"baseline: {n} labelled images, {steps} steps of {batch_size}")
    progress = Progress(steps, "baseline")
    start, done, losses = time.time(), 0, []
    model.train()
    batches = view_batches(
        data.labeled,
        order.local_batch,
        range(steps),
        cfg.views,
        1,
        Loading.of(cfg, data),
        cfg.run.seed,
        Stream.BASELINE,
        device,
    )
    for step, x, _ in batches:
        set_lr(optimizer, schedule(step))
        loss = F.cross_entropy(
            model(x), labels[torch.from_numpy(order.local_batch(step)).to(device)]
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        done = step + 1
        losses.append(loss.item())
        progress.update(1, loss=losses[-1])
        if b.time_limit is not None and time.time() - start > b.time_limit:
            break
    progress.close()
    result = classifier_accuracy(model, data, cfg, device)
    window = max(1, min(50, done // 10))
    result.update(
        num_labeled=n,
        steps=done,
        epochs=round(done / order.steps_per_epoch, 2),
        train_loss=float(np.mean(losses[-window:])) if losses else None,
        seconds=round(time.time() - start, 1),
    )
    if out_dir is not None:
        _write(Path(out_dir), cfg, result)
    return result


def _write(out: Path, cfg: Config, result: dict[str, Any]) -> None:
    """The baseline's files: its config and its result."""
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "baseline_config.yaml")
    rundir.write_json(out / "baseline.json", result)
