"""Tightening the labelled clusters with SuNCEt before PAWS-NN (paper Appendix C, CIFAR-10).

After pre-training, batch norm is frozen and the network is fine-tuned for a few steps
(``tighten.steps``, 180 in the paper) with the supervised contrastive loss SuNCEt
(:func:`paws.method.losses.supervised_nce`) on the labelled images, without augmentation; the
point is to pull the labelled images of a class together before they serve as the support of
PAWS-NN.

- Batches: ``tighten.classes`` classes x ``tighten.images_per_class`` images (10 x 64 in the
  paper) drawn by :class:`paws.method.sampling.SupportSampler`: distinct within a step, with
  replacement across steps; a class with fewer images gives all it has. Every image is its
  evaluation view (resize + centre crop), so an image without a second one of its class in the
  batch (a class with a single labelled image) is not scored, but still serves as a neighbour
  of the others.
- Loss: SuNCEt with temperature ``tighten.tau`` on the embedding PAWS-NN classifies in
  (``eval.features``; by default the head output, as the official code's
  ``encoder(images)``), each image classified against the other images of its batch.
- Trained parameters: every weight and bias of the trunk and of the heads except batch norm's, as
  in the official code (facebookresearch/suncet, ``src/snn_fine_tune.py``), which optimises the
  whole encoder including its projection head. Batch norm is frozen entirely: running statistics
  (layers in eval mode) and affine parameters (no gradient), as the paper says "freeze the
  batch-norm layers" (the official code fixes the statistics but still updates the affine
  parameters).
- Optimiser: classical momentum ``tighten.momentum`` (0.9), learning rate ``tighten.lr`` (0.1)
  decayed by a cosine to 0, no weight decay, and LARS adaptation of the weights (not of the
  biases) with trust coefficient ``optim.trust_coefficient`` (0.001), as the official code
  (``use_lars: true`` in its CIFAR-10 config); the paper only says "momentum SGD". Without
  LARS, a learning rate of 0.1 collapses the embedding within a few steps (every image mapped
  to the same point; measured on Fashion-MNIST), so ``tighten.lars: false`` needs a far smaller
  ``tighten.lr``.
- The model kept: the pre-trained and the SuNCEt weights interpolated, ``(1 - a) theta_0 +
  a theta`` with ``a = tighten.interpolate`` (0.5), as WiSE-FT does for a fine-tuned model
  (Wortsman et al. 2022, "Robust fine-tuning of zero-shot models"). SuNCEt on 100 labels learns
  them by heart and can cost a run points its labels cannot show (one run fell from 79.40% to
  77.79%); halfway between, the model was within 0.2 points of the better end on every label
  draw measured and above both on most (``benchmarks/RESULTS.md``). Batch norm is frozen, so
  its statistics are the same at both ends and the interpolation is of weights alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from paws import rundir
from paws.after.evaluate import paws_nn
from paws.after.saved import open_pretrained, save_step
from paws.config import Config
from paws.data.loaders import Loading, eval_batches
from paws.data.sources import Datasets
from paws.errors import UserError
from paws.method.losses import supervised_nce
from paws.method.optim import LARS, WarmupCosine, param_groups, set_lr
from paws.method.sampling import SupportSampler
from paws.models import PAWSModel
from paws.progress import Progress, info

__all__ = ["freeze_batchnorm", "interpolate_weights", "tighten", "tighten_checkpoint"]


def freeze_batchnorm(model: nn.Module) -> list[nn.Module]:
    """Put every batch-norm layer in eval mode and stop its affine parameters' gradients.

    Call after ``model.train()`` (which would switch the layers back to batch statistics).

    Returns:
        The frozen layers.
    """
    frozen = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in frozen:
        m.eval()
        for p in m.parameters():
            p.requires_grad_(False)
    return frozen


def interpolate_weights(model: nn.Module, start: dict[str, torch.Tensor], share: float) -> None:
    """Move ``model``'s floating-point weights and buffers in place to ``(1 - share) * start +
    share * now`` (``start``: a state dict of the same model; integer buffers such as batch
    norm's step count are kept). ``share`` 1 leaves the model as it is, 0 restores ``start``."""
    if share == 1.0:
        return
    with torch.no_grad():
        for name, now in model.state_dict().items():
            if now.is_floating_point():
                now.lerp_(start[name].to(now.device, now.dtype), 1.0 - share)


def tighten(
    cfg: Config,
    model: PAWSModel,
    data: Datasets,
    device: torch.device,
    evaluate: bool = True,
) -> dict[str, Any]:
    """Fine-tune ``model`` in place with SuNCEt on the labelled images, batch norm frozen.

    Args:
        cfg: the config (its ``tighten`` section).
        model: the pre-trained model on ``device``.
        data: datasets; ``data.labeled`` is trained on, ``data.test`` (if any) evaluated.
        device: compute device.
        evaluate: run PAWS-NN on the test set before and after (else both are None).

    Returns:
        ``{"steps", "classes", "images_per_class", "interpolate", "loss_first", "loss_last",
        "paws_nn_before", "paws_nn_after"}``: the SuNCEt loss averaged over the first and the
        last steps (a fifth of them, at most 10), and PAWS-NN ``{"top1", "top5"}`` on the test
        set before and after (None without a test set); "after" is of the model kept, the
        weights interpolated by ``tighten.interpolate``.
    """
    t = cfg.tighten
    classes, per_class = _batch_shape(cfg, data.labeled.labels)
    before = None
    if evaluate and data.test is not None:
        ev = paws_nn(model, data, cfg, device)
        before = {"top1": ev["top1"], "top5": ev["top5"]}
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    losses = _suncet_steps(cfg, model, data, device, classes, per_class)
    interpolate_weights(model, start, t.interpolate)
    model.eval()
    window = max(1, min(10, t.steps // 5))
    after = None
    if evaluate and data.test is not None:
        ev = paws_nn(model, data, cfg, device)
        after = {"top1": ev["top1"], "top5": ev["top5"], "num_query": ev["num_query"]}
    return {
        "steps": t.steps,
        "classes": classes,
        "images_per_class": per_class,
        "interpolate": t.interpolate,
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
        "paws_nn_before": before,
        "paws_nn_after": after,
    }


def _batch_shape(cfg: Config, labels: np.ndarray) -> tuple[int, int]:
    """(classes, images per class) of a tightening batch: ``tighten.classes`` and
    ``tighten.images_per_class``, at most what the labels hold (said in a line). A class with
    fewer images gives all of them; one with a single image serves only as a neighbour of the
    others (it has no second image to be pulled towards)."""
    t = cfg.tighten
    present, counts = np.unique(labels, return_counts=True)
    if len(present) < 2:
        raise UserError("tightening needs labelled images of at least 2 classes")
    if counts.max() < 2:
        raise UserError(
            "SuNCEt compares images of the same class: at least one labelled class needs 2 "
            "images, but every class has 1"
        )
    classes = min(t.classes, len(present))
    if classes < t.classes:
        info(f"tighten.classes is {t.classes} but there are {len(present)} labelled classes")
    per_class = min(t.images_per_class, int(counts.max()))
    if per_class < t.images_per_class:
        info(
            f"tighten.images_per_class is {t.images_per_class} but the largest labelled class "
            f"has {int(counts.max())} images: using {per_class} per class"
        )
    return classes, per_class


def _suncet_steps(
    cfg: Config,
    model: PAWSModel,
    data: Datasets,
    device: torch.device,
    classes: int,
    per_class: int,
) -> list[float]:
    """``tighten.steps`` SuNCEt steps on batches of ``classes`` x ``per_class`` labelled
    images, batch norm frozen; returns the loss of each step."""
    t = cfg.tighten
    labels = data.labeled.labels
    sampler = SupportSampler(labels, classes, per_class, cfg.run.seed, fill=False)
    model.train()
    freeze_batchnorm(model)
    optimizer = LARS(
        param_groups(model, 0.0, lars=t.lars),
        lr=t.lr,
        momentum=t.momentum,
        trust_coefficient=cfg.optim.trust_coefficient,
    )
    schedule = WarmupCosine(t.lr, t.lr, 0.0, 0, t.steps)
    draws = [sampler.local_batch(step) for step in range(t.steps)]
    targets = [F.one_hot(torch.from_numpy(pos), classes).float().to(device) for _, pos in draws]
    # Rows with another image of their class in the batch (all of them when every class has
    # two or more labelled images: then every row counts).
    scored = [_with_partner(pos, device) for _, pos in draws]
    bar = Progress(t.steps, "tighten")
    losses: list[float] = []
    batches = eval_batches(
        data.labeled,
        cfg.views,
        Loading.of(cfg, data),
        device,
        batches=[i for i, _ in draws],
    )
    for step, (x, _) in enumerate(batches):
        set_lr(optimizer, schedule(step))
        embedding = model.embed(x, cfg.eval.features)
        loss = supervised_nce(embedding, targets[step], t.tau, scored[step])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        bar.update(1, loss=losses[-1])
    bar.close()
    return losses


def _with_partner(positions: np.ndarray, device: torch.device) -> torch.Tensor | None:
    """(n,) bool: rows whose class appears at least twice; None when all do."""
    counts = np.bincount(positions)
    partner = counts[positions] >= 2
    return None if partner.all() else torch.from_numpy(partner).to(device)


def tighten_checkpoint(
    path: str | Path,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    data: Datasets | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """Tighten a pre-trained checkpoint and save it.

    Writes ``tighten.pt`` (a checkpoint of kind ``"tighten"``, read like a pre-trained one by
    ``paws eval``, ``predict``, ``embed`` and ``export``) and ``tighten.json`` into ``out_dir``
    (default: the checkpoint's run directory).

    Args:
        path: pre-trained checkpoint file or run directory.
        overrides: ``key=value`` config overrides (e.g. ``tighten.steps=50``).
        out_dir: output folder.
        data: preloaded datasets (tests); default: loaded from the checkpoint's config.
        device: compute device (default: from the config's ``run.device``).

    Returns:
        The report of :func:`tighten`, with ``seconds`` and ``checkpoint`` added.
    """
    opened = open_pretrained(path, overrides, out_dir, data, device)
    report = tighten(opened.cfg, opened.net, opened.data, opened.device)
    save_step("tighten", opened.net, opened.arch, opened, report, rundir.TIGHTENED)
    rundir.write_json(opened.out / "tighten.json", report)
    return report
