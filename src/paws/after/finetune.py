"""Fine-tuning after pre-training (paper Appendix A): the BYOL / SimCLR evaluation protocol.

A linear classifier, initialised to zero, is put on the first layer of the pre-trained projection
head (trunk -> fc1 -> bn1 -> relu -> linear: :class:`paws.models.Classifier`); encoder
and classifier are fine-tuned together with supervised cross-entropy on the labelled images only,
by SGD with Nesterov momentum 0.9 (classical momentum, :class:`paws.method.optim.LARS` with
adaptation off), no weight decay, a cosine learning-rate decay, and random crop (the
pre-training's large crops: ``views.large_size``, ``views.large_scale``) + horizontal flip as the
only augmentation.

Model selection follows BYOL and SimCLR: the learning rate and the number of epochs are swept
(``finetune.lrs`` x ``finetune.epochs``); each setting is trained on the labelled images minus a
validation split held out from every class (``finetune.val_fraction``) and scored on that split,
never on the test set. The best setting is then trained again from the pre-trained weights on the
whole labelled set, and only that final model is evaluated on the test set (single centre crop).
"""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from paws import rundir, runtime
from paws.after.evaluate import accuracy, classifier_accuracy, classifier_probs, paws_nn
from paws.after.saved import open_pretrained, save_step
from paws.config import Config, ViewsConfig
from paws.data.images import ImageSet
from paws.data.loaders import Loading, view_batches
from paws.data.sources import Datasets
from paws.errors import UserError
from paws.method.optim import LARS, WarmupCosine, backward_step, set_lr
from paws.method.sampling import EpochSampler, Stream
from paws.models import Classifier, PAWSModel
from paws.progress import Progress, info

__all__ = [
    "validation_split",
    "crop_flip_views",
    "train_classifier",
    "finetune",
    "finetune_checkpoint",
]


def validation_split(
    labels: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Hold out ``fraction`` of every class as a local validation split.

    Each class with two or more images gives ``round(fraction * n)`` of them (at least one, and
    never all); a class with a single image keeps it for training.

    Args:
        labels: (N,) class ids of the labelled images.
        fraction: share of each class to hold out.
        seed: seed of the draw.

    Returns:
        ``(train_indices, val_indices)``, sorted positions in ``labels``.
    """
    rng = np.random.default_rng([seed, int(Stream.FINETUNE), 1])
    train, val = [], []
    for c in np.unique(labels):
        pool = rng.permutation(np.flatnonzero(labels == c))
        n_val = 0
        if fraction > 0 and len(pool) >= 2:
            n_val = min(len(pool) - 1, max(1, int(round(fraction * len(pool)))))
        val.append(pool[:n_val])
        train.append(pool[n_val:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def crop_flip_views(views: ViewsConfig) -> ViewsConfig:
    """The views config with colour jitter, grey and blur switched off: crop + flip only."""
    return dataclasses.replace(
        views, color_strength=0.0, color_prob=0.0, gray_prob=0.0, blur_prob=0.0
    )


def _batch_size(cfg: Config, n: int) -> int:
    if n < 2:
        raise UserError(f"fine-tuning needs at least 2 labelled images, got {n}")
    return min(cfg.finetune.batch_size, n)


def _num_steps(cfg: Config, n: int, epochs: int) -> int:
    return epochs * (n // _batch_size(cfg, n))


def train_classifier(
    model: nn.Module,
    images: ImageSet,
    lr: float,
    epochs: int,
    cfg: Config,
    data: Datasets,
    device: torch.device,
    progress: Progress | None = None,
) -> int:
    """Fine-tune ``model`` (in place) with cross-entropy on ``images`` for ``epochs`` epochs.

    SGD with Nesterov momentum 0.9, no weight decay, learning rate ``lr`` decayed by a cosine to
    0, crop + flip views; batches of ``finetune.batch_size`` (or the whole set if smaller).

    Args:
        model: a classifier, (N, C, H, W) to (N, K) logits, on ``device``.
        images: labelled images (their ``labels`` are the targets).
        lr: learning rate.
        epochs: passes over ``images``.
        cfg: the run's config.
        data: the run's datasets (channels, normalisation).
        device: compute device.
        progress: advanced by one per step.

    Returns:
        The number of steps taken.
    """
    n = len(images)
    # Whole batches only (the last incomplete one of an epoch is dropped), so batch norm never
    # sees a batch of one.
    order = EpochSampler(n, _batch_size(cfg, n), cfg.run.seed, Stream.FINETUNE)
    steps = epochs * order.steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = LARS(
        [{"params": params, "lars": False, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    schedule = WarmupCosine(lr, lr, 0.0, 0, steps)
    dtype = runtime.amp_dtype(cfg, device)
    scaler = runtime.grad_scaler(dtype)
    labels = torch.from_numpy(images.labels).to(device)
    views = crop_flip_views(cfg.views)
    model.train()
    batches = view_batches(
        images,
        order.local_batch,
        range(steps),
        views,
        1,
        Loading.of(cfg, data),
        cfg.run.seed,
        Stream.FINETUNE,
        device,
    )
    for step, x, _ in batches:
        set_lr(optimizer, schedule(step))
        y = labels[torch.from_numpy(order.local_batch(step)).to(device)]
        with runtime.autocast(device.type, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        backward_step(loss, optimizer, scaler)
        if progress is not None:
            progress.update(1, loss=loss.item())
    return steps


def _sweep(
    cfg: Config,
    pretrained: PAWSModel,
    data: Datasets,
    device: torch.device,
    settings: list[tuple[float, int]],
) -> tuple[list[dict[str, Any]], int, int]:
    """Train each (lr, epochs) setting on the labelled images minus a validation split and
    score it there: ``(one {"lr", "epochs", "val_top1"} per setting, train size, val size)``."""
    labeled, num_classes = data.labeled, len(data.classes)
    train_idx, val_idx = validation_split(labeled.labels, cfg.finetune.val_fraction, cfg.run.seed)
    if len(val_idx) == 0:
        raise UserError(
            "no labelled class has two images to hold one out for validation; label more "
            "images or sweep a single setting (one finetune.lrs and finetune.epochs value)"
        )
    train_set, val_set = labeled.subset(train_idx), labeled.subset(val_idx)
    info(
        f"fine-tuning sweep: {len(settings)} settings on {len(train_set)} labelled images, "
        f"{len(val_set)} held out for validation"
    )
    total = sum(_num_steps(cfg, len(train_set), e) for _, e in settings)
    progress = Progress(total, "finetune sweep")
    y_val = torch.from_numpy(val_set.labels)
    sweep = []
    for lr, epochs in settings:
        model = Classifier.from_pretrained(copy.deepcopy(pretrained), num_classes)
        train_classifier(model, train_set, lr, epochs, cfg, data, device, progress)
        top1 = accuracy(classifier_probs(model, val_set, cfg, data, device), y_val, 1)
        sweep.append({"lr": lr, "epochs": epochs, "val_top1": top1})
        info(f"lr {lr:g}, {epochs} epochs: validation top-1 {top1:.2f}%")
    progress.close()
    return sweep, len(train_set), len(val_set)


def finetune(
    cfg: Config, pretrained: PAWSModel, data: Datasets, device: torch.device
) -> tuple[dict[str, Any], Classifier]:
    """Sweep, select on the validation split, retrain on all labels, test (Appendix A).

    The test set is read only after the setting is chosen, to report the final model's accuracy
    and PAWS-NN's next to it.

    Args:
        cfg: the config (its ``finetune`` section drives the sweep).
        pretrained: the pre-trained model on ``device`` (left unchanged).
        data: datasets; only ``data.labeled`` is used for training and selection.
        device: compute device.

    Returns:
        ``(report, model)``: the report holds ``sweep`` (one ``{"lr", "epochs", "val_top1"}`` per
        setting, in sweep order; empty for a single setting), ``lr`` and ``epochs`` chosen,
        ``val_top1`` of the choice, ``num_train``, ``num_val``, ``num_labeled``, ``steps`` of
        the final training, ``test`` (``{"top1", "top5", "num_query"}`` or None) and ``paws_nn``
        (PAWS-NN of the pre-trained model on the test set, or None); the model is the fine-tuned
        classifier.
    """
    f = cfg.finetune
    labeled, num_classes = data.labeled, len(data.classes)
    settings = [(float(lr), int(e)) for lr in f.lrs for e in f.epochs]
    sweep: list[dict[str, Any]] = []
    num_train, num_val = len(labeled), 0
    if len(settings) > 1:
        sweep, num_train, num_val = _sweep(cfg, pretrained, data, device, settings)
    # max() keeps the first of equal scores: ties go to the earlier setting of the sweep.
    best = max(range(len(sweep)), key=lambda i: sweep[i]["val_top1"]) if sweep else 0
    lr, epochs = settings[best]
    chosen = "chosen on validation" if sweep else "single setting"
    info(f"{chosen}: lr {lr:g}, {epochs} epochs; training on all {len(labeled)} labelled images")
    model = Classifier.from_pretrained(copy.deepcopy(pretrained), num_classes)
    progress = Progress(_num_steps(cfg, len(labeled), epochs), "finetune")
    steps = train_classifier(model, labeled, lr, epochs, cfg, data, device, progress)
    progress.close()
    report: dict[str, Any] = {
        "sweep": sweep,
        "lr": lr,
        "epochs": epochs,
        "val_top1": sweep[best]["val_top1"] if sweep else None,
        "num_train": num_train,
        "num_val": num_val,
        "num_labeled": len(labeled),
        "steps": steps,
        "test": None,
        "paws_nn": None,
    }
    if data.test is not None:
        report["test"] = classifier_accuracy(model, data, cfg, device)
        ev = paws_nn(pretrained, data, cfg, device)
        report["paws_nn"] = {"top1": ev["top1"], "top5": ev["top5"]}
    return report, model


def finetune_checkpoint(
    path: str | Path,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    data: Datasets | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Fine-tune a pre-trained checkpoint and save the classifier.

    Writes ``finetune.pt`` (a checkpoint of kind ``"finetune"`` that ``paws predict``,
    ``paws embed`` and ``paws export`` read) and ``finetune.json`` (the report of
    :func:`finetune`) into ``out_dir`` (default: the checkpoint's run directory).

    Args:
        path: pre-trained checkpoint file or run directory.
        overrides: ``key=value`` config overrides (e.g. ``finetune.lrs=[0.05]``, ``data.root``).
        out_dir: output folder.
        data: preloaded datasets (tests); default: loaded from the checkpoint's config.
        device: compute device (default: from the config's ``run.device``).

    Returns:
        The report, with ``seconds`` and ``checkpoint`` (the saved file) added.
    """
    opened = open_pretrained(path, overrides, out_dir, data, device)
    report, model = finetune(opened.cfg, opened.net, opened.data, opened.device)
    finetuned = {k: report[k] for k in ("lr", "epochs", "sweep", "val_top1", "steps")}
    arch = opened.arch.with_classifier(len(opened.data.classes))
    save_step("finetune", model, arch, opened, report, rundir.FINETUNED, finetune=finetuned)
    rundir.write_json(opened.out / "finetune.json", report)
    return report
