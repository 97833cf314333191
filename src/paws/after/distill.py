"""The student: a classifier trained on every unlabelled image against the teacher's answers.

PAWS uses the unlabelled images to shape its embedding; PAWS-NN then answers from 100 labels.
The teacher's soft answer holds more than its arg-max (its top-5 is far above its top-1), and
the semi-supervised recipes that lead the field end by teaching a classifier on every
unlabelled image with the model's own predictions: SimCLRv2's distillation step (Chen et al.
2020: cross-entropy to the teacher's temperature-scaled probabilities) and the pseudo-labels of
noisy student / FixMatch (arg-max targets, confidence-thresholded). This module is that step:

- Teacher targets: PAWS-NN probabilities of the teacher (the tightened model when the run has
  one) on the evaluation view of every unlabelled image, against the labelled images
  (:func:`teacher_targets`); sharpened as ``p^(1/T)`` renormalised (``distill.temperature``),
  as arg-max pseudo-labels with ``distill.targets: hard``, and images whose top probability is
  below ``distill.threshold`` left out. The teacher is fixed: its targets are computed once.
- Student: :class:`paws.models.Classifier` (the trunk and first head layer, a linear layer to
  the classes), from the teacher's weights or new ones (``distill.init``); trained with the
  cross-entropy to the targets on crop + flip views of the unlabelled images, plus the
  labelled images' cross-entropy to their labels (``distill.labeled_weight``), by Nesterov SGD
  with a cosine decay, as fine-tuning (:mod:`paws.after.finetune`).
- Every batch is a function of (seed, step), so the student resumes exactly from its last
  checkpoint (``distill.last.pt``, every ``distill.checkpoint_every`` steps): run ``paws
  distill RUN`` again after an interruption.
- Under torchrun (``paws train`` ending with the student, or ``paws distill`` itself), every
  process trains the one student on its share of each global batch (``distill.batch_size``
  images over all processes): each computes the teacher's targets for its part of the
  unlabelled images and gathers the rest, an image's augmentation depends on its place in the
  global batch only, batch norm spans the processes (``run.sync_bn``), and the gradients are
  averaged before each step, so the steps are those of one process with the whole batch. The
  copies the run's choice trains on folds of the labels (``shared=False``) train in rank 0
  alone, with batch norm made local.

What was measured for each choice is in ``benchmarks/RESULTS.md`` ("The student").
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from paws import distributed, rundir, runtime
from paws.after.evaluate import accuracy, classifier_accuracy, snn_probs
from paws.after.finetune import crop_flip_views
from paws.after.saved import open_pretrained, save_step
from paws.config import Config, to_dict
from paws.data.loaders import Loading, view_batches
from paws.data.sources import Datasets
from paws.errors import UserError
from paws.method.optim import LARS, WarmupCosine, backward_step, set_lr
from paws.method.sampling import EpochSampler, Stream
from paws.models import Architecture, Classifier, PAWSModel, build_network
from paws.progress import Progress, info
from paws.rundir import checkpoint

__all__ = [
    "sharpen_targets",
    "distill_loss",
    "teacher_targets",
    "train_student",
    "distill",
    "distill_checkpoint",
    "PARTIAL",
]

PARTIAL = "distill.last.pt"  # the student's resumable state while it trains


def sharpen_targets(
    probs: torch.Tensor, temperature: float = 1.0, kind: str = "soft", threshold: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's targets from the teacher's probabilities.

    Args:
        probs: (N, K) teacher probabilities (rows sum to 1).
        temperature: T; the targets are ``p^(1/T)`` renormalised (T < 1 sharpens).
        kind: ``"soft"`` (those probabilities) or ``"hard"`` (one-hot of their arg-max).
        threshold: rows whose largest teacher probability is below it are not kept.

    Returns:
        ``(targets (N, K) float32, kept (N,) bool)``.
    """
    p = probs.float().clamp_min(1e-12)
    if kind == "hard":
        targets = F.one_hot(p.argmax(dim=1), p.shape[1]).float()
    elif kind == "soft":
        # log-space, so that a small T cannot underflow every entry of a row to zero
        targets = torch.softmax(p.log() / temperature, dim=1)
    else:
        raise ValueError(f"unknown kind of targets {kind!r}")
    return targets, p.max(dim=1).values >= threshold


def distill_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of (N, K) ``logits`` to (N, K) target distributions: a scalar."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def teacher_targets(
    teacher: PAWSModel,
    data: Datasets,
    cfg: Config,
    device: torch.device,
    progress: bool = False,
    shared: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`sharpen_targets` of the teacher's PAWS-NN probabilities on the evaluation view of
    every unlabelled image, against ``data.labeled``: ``(targets (N, K), kept (N,))``. With
    ``shared`` under several processes, each computes its part and all receive every row."""
    images, world = data.unlabeled, distributed.get_world_size()
    shared = shared and 1 < world <= len(images)  # every part holds an image
    if shared:
        part = np.array_split(np.arange(len(images)), world)
        images = images.subset(part[distributed.get_rank()])
    probs = snn_probs(teacher, data, cfg, device, images, progress)
    if shared:
        probs = distributed.gather_rows(probs.to(device)).cpu()
    d = cfg.distill
    return sharpen_targets(probs, d.temperature, d.targets, d.threshold)


def _student(
    cfg: Config, teacher: PAWSModel, arch: Architecture, classes: int, shared: bool
) -> Classifier:
    """The student before training: the teacher's trunk and first head layer (copied) or new
    weights of the same architecture (``distill.init``), with a zero linear classifier; its
    batch norm global across processes when they train it together (``shared`` and
    ``run.sync_bn``), local otherwise."""
    device = next(teacher.parameters()).device
    if cfg.distill.init == "teacher":
        base = distributed.local_batchnorm(copy.deepcopy(teacher))
    else:
        base = build_network(arch.with_classifier(None), seed=cfg.run.seed).to(device)
    if shared and cfg.run.sync_bn:
        base = distributed.convert_batchnorm(base, device)
    return Classifier.from_pretrained(base, classes)


def _place(shared: bool) -> tuple[int, int]:
    """``(rank, processes)`` among those that train the student: ``(0, 1)`` when this process
    trains it alone."""
    return (distributed.get_rank(), distributed.get_world_size()) if shared else (0, 1)


def _shared_batch(size: int, what: str, world: int) -> int:
    """``size`` lowered to a multiple of the ``world`` processes that share it (said in a
    line)."""
    if size % world == 0:
        return size
    fitted = size - size % world
    info(f"{what} ({size}) is not divisible by the {world} processes: batches of {fitted}")
    return fitted


def _state(
    cfg: Config, student: Classifier, optimizer: LARS, scaler: Any, step: int, key: dict
) -> dict:
    """What resuming the student needs: its weights, the optimiser's and scaler's state, the
    next step, and what it was trained for (``key``)."""
    return {
        "kind": "distill",
        "config": to_dict(cfg),
        "model": student.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "key": key,
    }


def _resume(
    partial: Path | None, key: dict, student: Classifier, optimizer: LARS, scaler: Any
) -> int:
    """Restore the student from ``partial`` when it was saved for the same ``key``; the step to
    start from (0 without a matching state, which is said in a line)."""
    if partial is None or not partial.is_file():
        return 0
    state = checkpoint.load(partial)
    if state.get("key") != key:
        info(f"{partial} was saved for another teacher or settings: training the student anew")
        return 0
    student.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    info(f"resuming the student from step {state['step']} ({partial})")
    return int(state["step"])


def _optimiser(student: Classifier, lr: float, steps: int) -> tuple[LARS, WarmupCosine]:
    """Nesterov SGD without weight decay and a cosine decay from ``lr`` to 0, as
    fine-tuning."""
    params = [{"params": list(student.parameters()), "lars": False, "weight_decay": 0.0}]
    optimizer = LARS(params, lr=lr, momentum=0.9, nesterov=True)
    return optimizer, WarmupCosine(lr, lr, 0.0, 0, steps)


def _ends(losses: list[float]) -> dict[str, float | None]:
    """The loss averaged over the first and the last steps (a fifth of them, at most 10)."""
    if not losses:
        return {"loss_first": None, "loss_last": None}
    window = max(1, min(10, len(losses) // 5))
    return {
        "loss_first": float(np.mean(losses[:window])),
        "loss_last": float(np.mean(losses[-window:])),
    }


def _views(
    cfg: Config,
    data: Datasets,
    images: Any,
    order: EpochSampler,
    steps: range,
    stream: int,
    device: torch.device,
) -> Any:
    """Crop + flip views of ``images[order.local_batch(step)]`` for each of ``steps``, each
    image's drawn by its place in the step's global batch."""
    views, loading = crop_flip_views(cfg.views), Loading.of(cfg, data)
    shard = (order.global_size, order.shard_rows())
    return view_batches(
        images, order.local_batch, steps, views, 1, loading, cfg.run.seed, stream, device, shard
    )


def _orders(
    cfg: Config, kept: int, labeled: int, shared: bool
) -> tuple[EpochSampler, EpochSampler | None]:
    """The batches of the ``kept`` unlabelled images and of the ``labeled`` ones (None when
    the labelled term is off or has fewer than 2 images), split over the processes that share
    the student."""
    d = cfg.distill
    rank, world = _place(shared)
    batch = _shared_batch(min(d.batch_size, kept), "distill.batch_size", world)
    if batch < max(2, world):
        raise UserError(
            f"the student needs 2 unlabelled images the teacher is sure of (distill.threshold "
            f"{d.threshold:g} keeps {kept})"
        )
    order = EpochSampler(kept, batch, cfg.run.seed, Stream.DISTILL, rank, world)
    lab_batch = min(d.labeled_batch, labeled) if d.labeled_weight > 0 else 0
    lab_batch = _shared_batch(lab_batch, "distill.labeled_batch", world)
    if lab_batch < max(2, world):
        return order, None
    stream = Stream.DISTILL_LABELED
    return order, EpochSampler(labeled, lab_batch, cfg.run.seed, stream, rank, world)


def train_student(
    cfg: Config,
    teacher: PAWSModel,
    arch: Architecture,
    data: Datasets,
    device: torch.device,
    partial: Path | None = None,
    key: dict | None = None,
    progress: bool = True,
    shared: bool = False,
) -> tuple[Classifier, dict[str, Any]]:
    """Train a student on ``data``'s unlabelled images against ``teacher`` (left unchanged).

    Args:
        cfg: the config (its ``distill`` section).
        teacher: the pre-trained or tightened model on ``device``.
        arch: the teacher's architecture.
        data: the datasets: ``unlabeled`` to distil on, ``labeled`` as the teacher's support
            and the student's labelled batches.
        device: compute device.
        partial: where the resumable state goes (None: not saved).
        key: what identifies the training for resuming (the teacher and settings).
        progress: show progress.
        shared: every process of a torchrun trains this student together (each calls this
            with the same arguments); False: this process trains it alone.

    Returns:
        ``(student in eval mode, report)``: ``steps``, ``kept`` (unlabelled images trained on),
        ``num_unlabeled``, ``resumed_from``, ``loss_first``, ``loss_last``.
    """
    d = cfg.distill
    targets, kept = teacher_targets(teacher, data, cfg, device, progress, shared)
    pool = np.flatnonzero(kept.numpy())
    rank, world = _place(shared)
    order, lab_order = _orders(cfg, len(pool), len(data.labeled), shared)
    steps = max(1, math.ceil(d.epochs * order.steps_per_epoch))
    student = _student(cfg, teacher, arch, len(data.classes), shared).to(device)
    sync = (lambda: distributed.average_gradients(student.parameters())) if world > 1 else None
    optimizer, schedule = _optimiser(student, d.lr, steps)
    dtype = runtime.amp_dtype(cfg, device)
    scaler = runtime.grad_scaler(dtype)
    key = dict(key or {}, steps=steps, kept=len(pool))
    start = _resume(partial, key, student, optimizer, scaler)
    y_unl = targets[pool].to(device)
    y_lab = torch.from_numpy(data.labeled.labels).to(device)
    todo = range(start, steps)
    unl = _views(cfg, data, data.unlabeled.subset(pool), order, todo, Stream.DISTILL, device)
    lab = None
    if lab_order is not None:
        lab = _views(cfg, data, data.labeled, lab_order, todo, Stream.DISTILL_LABELED, device)
    bar = Progress(len(todo), "student") if progress else None
    losses: list[float] = []
    student.train()
    for step, x, _ in unl:
        set_lr(optimizer, schedule(step))
        with runtime.autocast(device.type, dtype):
            loss = distill_loss(student(x), y_unl[torch.from_numpy(order.local_batch(step))])
            if lab is not None:
                _, xl, _ = next(lab)
                yl = y_lab[torch.from_numpy(lab_order.local_batch(step)).to(device)]
                loss = loss + d.labeled_weight * F.cross_entropy(student(xl).float(), yl)
        backward_step(loss, optimizer, scaler, sync)
        losses.append(
            float(distributed.all_reduce_mean(loss.detach())) if world > 1 else loss.item()
        )
        if bar is not None:
            bar.update(1, loss=losses[-1])
        saves = (step + 1) % d.checkpoint_every == 0 or step + 1 == steps
        if partial is not None and saves and rank == 0:
            checkpoint.save(_state(cfg, student, optimizer, scaler, step + 1, key), partial)
    if bar is not None:
        bar.close()
    student.eval()
    report = {"steps": steps, "resumed_from": start, "kept": len(pool)}
    return student, dict(report, num_unlabeled=len(data.unlabeled), **_ends(losses))


def distill(
    cfg: Config,
    teacher: PAWSModel,
    arch: Architecture,
    data: Datasets,
    device: torch.device,
    partial: Path | None = None,
    key: dict | None = None,
    evaluate: bool = True,
    shared: bool = False,
) -> tuple[dict[str, Any], Classifier]:
    """Train the student (:func:`train_student`, ``shared`` by every process of a torchrun)
    and test it (and the teacher) when there is a test set and ``evaluate`` (a run's finish
    has both tested already).

    Returns:
        ``(report, student)``: :func:`train_student`'s report with the ``distill`` settings,
        ``test`` (``{"top1", "top5", "balanced_top1", "num_query"}`` or None) and
        ``teacher_test`` (the teacher's PAWS-NN ``{"top1"}`` or None).
    """
    student, report = train_student(cfg, teacher, arch, data, device, partial, key, shared=shared)
    report["settings"] = dict(vars(cfg.distill))
    report["test"] = report["teacher_test"] = None
    if evaluate and data.test is not None:
        report["test"] = classifier_accuracy(student, data, cfg, device)
        probs = snn_probs(teacher, data, cfg, device, data.test)
        report["teacher_test"] = {"top1": accuracy(probs, torch.from_numpy(data.test.labels))}
    return report, student


def teacher_file(run: Path) -> Path:
    """The teacher a run directory offers: its tightened model when it has one, else its
    pre-trained model (``last.pt``)."""
    return run / rundir.TIGHTENED if (run / rundir.TIGHTENED).is_file() else run / rundir.LAST


def distill_checkpoint(
    path: str | Path,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    data: Datasets | None = None,
    device: torch.device | None = None,
) -> dict[str, Any]:
    """``paws distill``: train a student against the model ``path`` names and save it.

    Writes ``distill.pt`` (a checkpoint of kind ``"distill"`` that ``paws eval``, ``predict``,
    ``embed``, ``export`` and ``paws.load`` read as a classifier) and ``distill.json`` into
    ``out_dir`` (default: the run directory), and keeps ``distill.last.pt`` while training.
    Under torchrun every process trains the student on its share of each batch, and rank 0
    tests it and writes the files.

    Args:
        path: a run directory (its teacher: :func:`teacher_file`) or a pre-trained or
            tightened checkpoint file.
        overrides: ``key=value`` config overrides (``distill.epochs=4``, ``data.root``).
        out_dir: output folder.
        data: preloaded datasets (tests); default: loaded from the checkpoint's config.
        device: compute device (default: from the config's ``run.device``).

    Returns:
        The report (:func:`distill`) with ``teacher``, ``seconds`` and ``checkpoint``.
    """
    p = Path(path)
    source = teacher_file(p) if p.is_dir() else p
    opened = open_pretrained(source, overrides, out_dir or rundir.output_dir(p), data, device)
    partial = opened.out / PARTIAL
    key = {"teacher": str(source.resolve()), "step": opened.step, **vars(opened.cfg.distill)}
    key.pop("after_training", None)
    key.pop("checkpoint_every", None)
    main = distributed.is_main()
    report, student = distill(
        opened.cfg,
        opened.net,
        opened.arch,
        opened.data,
        opened.device,
        partial,
        key,
        evaluate=main,
        shared=True,
    )
    report["teacher"] = source.name
    if not main:
        return report
    arch = opened.arch.with_classifier(len(opened.data.classes))
    save_step("distill", student, arch, opened, report, rundir.DISTILLED)
    rundir.write_json(opened.out / "distill.json", report)
    partial.unlink(missing_ok=True)
    return report
