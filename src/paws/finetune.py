"""Fine-tuning after pre-training (paper Appendix A): the BYOL / SimCLR evaluation protocol.

A linear classifier, initialised to zero, is put on the first layer of the pre-trained projection
head (trunk -> fc1 -> bn1 -> relu -> linear: :class:`paws.models.FineTunedClassifier`); encoder
and classifier are fine-tuned together with supervised cross-entropy on the labelled images only,
by SGD with Nesterov momentum 0.9 (classical momentum, :class:`paws.optim.LARS` with adaptation
off), no weight decay, a cosine learning-rate decay, and random crop (the pre-training's large
crops: ``views.large_size``, ``views.large_scale``) + horizontal flip as the only augmentation.

Model selection follows BYOL and SimCLR: the learning rate and the number of epochs are swept
(``finetune.lrs`` x ``finetune.epochs``); each setting is trained on the labelled images minus a
validation split held out from every class (``finetune.val_fraction``) and scored on that split,
never on the test set. The best setting is then trained again from the pre-trained weights on the
whole labelled set, and only that final model is evaluated on the test set (single centre crop).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from paws import checkpoint
from paws.checkpoint import restore_model
from paws.config import Config, ViewsConfig
from paws.data import Datasets, ImageSet, augmented_batches, eval_batches, load_datasets
from paws.errors import UserError
from paws.evaluate import accuracy, paws_nn
from paws.models import FineTunedClassifier, PAWSModel
from paws.optim import LARS, WarmupCosine, backward_step, set_lr
from paws.progress import Progress, info
from paws.train import amp_dtype, autocast, setup_runtime

__all__ = [
    "validation_split",
    "crop_flip_views",
    "train_classifier",
    "classifier_probs",
    "finetune",
    "finetune_checkpoint",
    "output_dir",
]

_STREAM = 5  # augmentation and batch-order stream of fine-tuning (pre-training uses 0 to 3)


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
    rng = np.random.default_rng([seed, _STREAM, 1])
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


def _epoch_batches(n: int, batch_size: int, seed: int) -> tuple[Callable[[int], np.ndarray], int]:
    """Index batches over epochs of fresh permutations (the last incomplete batch of an epoch is
    dropped, so batch norm never sees a batch of one): a function of the step."""
    per_epoch = n // batch_size
    cache: dict[int, np.ndarray] = {}

    def fn(step: int) -> np.ndarray:
        epoch, i = divmod(step, per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = np.random.default_rng([seed, _STREAM, 2, epoch]).permutation(n)
        return cache[epoch][i * batch_size : (i + 1) * batch_size]

    return fn, per_epoch


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
    index_fn, per_epoch = _epoch_batches(n, _batch_size(cfg, n), cfg.run.seed)
    steps = epochs * per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = LARS(
        [{"params": params, "lars": False, "weight_decay": 0.0}],
        lr=lr,
        momentum=0.9,
        nesterov=True,
    )
    schedule = WarmupCosine(lr, lr, 0.0, 0, steps)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None
    labels = torch.from_numpy(images.labels).to(device)
    views = crop_flip_views(cfg.views)
    model.train()
    batches = augmented_batches(
        images, index_fn, 0, steps, views, data, cfg, device, multicrop=False, stream=_STREAM
    )
    for step, (x,), _ in batches:
        set_lr(optimizer, schedule(step))
        y = labels[torch.from_numpy(index_fn(step)).to(device)]
        with autocast(device.type, dtype):
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        backward_step(loss, optimizer, scaler)
        if progress is not None:
            progress.update(1, loss=loss.item())
    return steps


@torch.no_grad()
def classifier_probs(
    model: nn.Module, images: ImageSet, cfg: Config, data: Datasets, device: torch.device
) -> torch.Tensor:
    """Class probabilities of a classifier on centre-cropped images: (N, K) on the CPU."""
    model.eval()
    out = [
        model(x).float().softmax(dim=1).cpu()
        for x, _ in eval_batches(images, cfg, data.channels, data.mean, data.std, device)
    ]
    return torch.cat(out)


def finetune(
    cfg: Config, pretrained: PAWSModel, data: Datasets, device: torch.device
) -> tuple[dict[str, Any], FineTunedClassifier]:
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
        train_idx, val_idx = validation_split(labeled.labels, f.val_fraction, cfg.run.seed)
        if len(val_idx) == 0:
            raise UserError(
                "no labelled class has two images to hold one out for validation; label more "
                "images or sweep a single setting (one finetune.lrs and finetune.epochs value)"
            )
        train_set, val_set = labeled.subset(train_idx), labeled.subset(val_idx)
        num_train, num_val = len(train_set), len(val_set)
        info(
            f"fine-tuning sweep: {len(settings)} settings on {num_train} labelled images, "
            f"{num_val} held out for validation"
        )
        total = sum(_num_steps(cfg, num_train, e) for _, e in settings)
        progress = Progress(total, "finetune sweep")
        y_val = torch.from_numpy(val_set.labels)
        for lr, epochs in settings:
            model = FineTunedClassifier.from_pretrained(copy.deepcopy(pretrained), num_classes)
            train_classifier(model, train_set, lr, epochs, cfg, data, device, progress)
            top1 = accuracy(classifier_probs(model, val_set, cfg, data, device), y_val, 1)
            sweep.append({"lr": lr, "epochs": epochs, "val_top1": top1})
            info(f"lr {lr:g}, {epochs} epochs: validation top-1 {top1:.2f}%")
        progress.close()
    # max() keeps the first of equal scores: ties go to the earlier setting of the sweep.
    best = max(range(len(sweep)), key=lambda i: sweep[i]["val_top1"]) if sweep else 0
    lr, epochs = settings[best]
    chosen = "chosen on validation" if sweep else "single setting"
    info(f"{chosen}: lr {lr:g}, {epochs} epochs; training on all {len(labeled)} labelled images")
    model = FineTunedClassifier.from_pretrained(copy.deepcopy(pretrained), num_classes)
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
        probs = classifier_probs(model, data.test, cfg, data, device)
        y = torch.from_numpy(data.test.labels)
        report["test"] = {
            "top1": accuracy(probs, y, 1),
            "top5": accuracy(probs, y, 5),
            "num_query": len(y),
        }
        ev = paws_nn(pretrained, data, cfg, device)
        report["paws_nn"] = {"top1": ev["top1"], "top5": ev["top5"]}
    return report, model


def output_dir(path: str | Path) -> Path:
    """Where results about a checkpoint go by default: its run directory."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def finetune_checkpoint(
    path: str | Path,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    data: Datasets | None = None,
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

    Returns:
        The report, with ``seconds`` and ``checkpoint`` (the saved file) added.
    """
    start = time.time()
    cfg, pretrained, state = restore_model(path, overrides, pretrained=True)
    device = setup_runtime(cfg)
    data = data or load_datasets(cfg)
    pretrained.to(device)
    report, model = finetune(cfg, pretrained, data, device)
    out = Path(out_dir) if out_dir is not None else output_dir(path)
    out.mkdir(parents=True, exist_ok=True)
    finetuned = {k: report[k] for k in ("lr", "epochs", "sweep", "val_top1", "steps")}
    record = checkpoint.model_record(
        "finetune", model, cfg, data, state.get("step"), finetune=finetuned
    )
    checkpoint.save(record, out / "finetune.pt")
    report["seconds"] = round(time.time() - start, 1)
    report["checkpoint"] = str(out / "finetune.pt")
    (out / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    return report
