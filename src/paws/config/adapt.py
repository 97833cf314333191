"""Defaults that depend on the data, filled in once the datasets are known.

The defaults are the Fashion-MNIST recipe. For any other folder, three of them would not fit,
so they adapt, each said in one line:

- ``support.classes`` (default: every labelled class) is the number of labelled classes, at
  most as many as keep a support batch within 4 x ``optim.batch_size`` images (and, under
  several processes with ``support.unique_classes``, a multiple of their number);
- ``optim.batch_size`` larger than the unlabelled set shrinks to it (under several processes,
  to a multiple of their number), and the learning rates scale with the square root of the
  change, as the paper scales them;
- under several processes, ``support.images_per_class`` that they cannot share evenly grows to
  the next multiple of their number (the default 5 under 2 processes: 6), so that the
  defaults fit any process count as they fit any folder. A resumed run keeps its sizes: it
  continues on a number of processes that shares them, and is told which in one line.
- a run of ``optim.epochs`` shorter than ``optim.min_steps`` steps (a small folder) is
  lengthened to that many steps, its warm-up keeping its share of the run.

A class with fewer labelled images than ``support.images_per_class`` needs nothing here: the
support sampler repeats its images (:class:`paws.method.sampling.SupportSampler`).

With no labelled image at all, :func:`label_free` makes the run a label-free one
(``loss.objective: simclr``); such a run has no supports and no small crops.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from paws.config.schema import MAX_STEPS, Config
from paws.errors import UserError
from paws.progress import info

__all__ = ["fit_to_data", "label_free", "support_classes", "total_steps", "check_length"]


def support_classes(cfg: Config, num_classes: int, world_size: int = 1) -> int:
    """``support.classes``, or by default every labelled class within the support-batch cap."""
    s = cfg.support
    if s.classes is not None:
        return s.classes
    cap = max(2, 4 * cfg.optim.batch_size // s.images_per_class)
    classes = min(num_classes, cap)
    if s.unique_classes and world_size > 1:
        classes -= classes % world_size
    if classes < 1:
        raise UserError(
            f"{num_classes} labelled classes cannot be split over {world_size} processes; "
            "set support.classes"
        )
    if classes < num_classes:
        info(
            f"support batches of {classes} of the {num_classes} labelled classes a step "
            f"({s.images_per_class} images each, at most 4 x optim.batch_size); set "
            "support.classes to change it"
        )
    return classes


def _batch(cfg: Config, num_unlabeled: int, world_size: int) -> Config:
    o = cfg.optim
    if num_unlabeled >= o.batch_size and o.batch_size % world_size == 0:
        return cfg
    batch = min(num_unlabeled, o.batch_size)
    batch -= batch % world_size
    if batch < 1:
        raise UserError(
            f"the unlabelled set has {num_unlabeled} images, fewer than the {world_size} "
            "processes; add unlabelled images"
        )
    scale = math.sqrt(batch / o.batch_size)
    why = (
        f"the unlabelled set has {num_unlabeled} images, fewer than optim.batch_size "
        f"({o.batch_size})"
        if num_unlabeled < o.batch_size
        else f"optim.batch_size ({o.batch_size}) is not divisible by the {world_size} processes"
    )
    info(
        f"{why}: batches of {batch}, learning rates scaled by sqrt({batch}/"
        f"{o.batch_size}) (optim.ref_lr {o.ref_lr:g} -> {o.ref_lr * scale:.3g})"
    )
    optim = dataclasses.replace(
        o,
        batch_size=batch,
        start_lr=o.start_lr * scale,
        ref_lr=o.ref_lr * scale,
        final_lr=o.final_lr * scale,
    )
    return dataclasses.replace(cfg, optim=optim)


def _check_shares(cfg: Config, world_size: int) -> None:
    """Refuse to resume a run on processes that cannot share its batches, naming the process
    counts that can."""
    s, batch = cfg.support, cfg.optim.batch_size
    shared = s.classes if s.unique_classes else s.images_per_class
    if cfg.loss.objective == "simclr" or shared is None:
        shared = batch
    if batch % world_size == 0 and shared % world_size == 0:
        return
    fit = [n for n in range(1, min(batch, shared) + 1) if batch % n == 0 and shared % n == 0]
    what = "support.classes" if s.unique_classes else "support.images_per_class"
    raise UserError(
        f"this run's optim.batch_size ({batch}) and {what} ({shared}) cannot be shared by "
        f"{world_size} processes; resume it on {', '.join(map(str, fit))} processes"
    )


def _support_images(cfg: Config, world_size: int) -> Config:
    """``support.images_per_class`` raised to a multiple of ``world_size`` when the processes
    share each class's images (not with ``support.unique_classes``, which shares classes)."""
    s = cfg.support
    if s.unique_classes or s.images_per_class % world_size == 0:
        return cfg
    k = -(-s.images_per_class // world_size) * world_size
    info(
        f"support.images_per_class ({s.images_per_class}) is not divisible by the "
        f"{world_size} processes: {k} images a class, {k // world_size} on each"
    )
    return dataclasses.replace(cfg, support=dataclasses.replace(s, images_per_class=k))


def _length(cfg: Config, num_unlabeled: int) -> Config:
    o = cfg.optim
    if o.steps is not None or o.min_steps is None:
        return cfg
    per_epoch = num_unlabeled // o.batch_size
    steps = max(1, int(round(o.epochs * per_epoch)))
    if steps >= o.min_steps:
        return cfg
    # The same share of the run as the recipe's warm-up: warmup_epochs of epochs.
    warmup = o.warmup_epochs / o.epochs * o.min_steps / per_epoch if o.epochs > 0 else 0.0
    info(
        f"{o.epochs:g} epochs of {num_unlabeled} unlabelled images are {steps} steps: "
        f"training {o.min_steps} steps instead (optim.min_steps; {o.min_steps / per_epoch:.1f} "
        f"epochs, warm-up {int(round(warmup * per_epoch))} steps)"
    )
    optim = dataclasses.replace(o, steps=o.min_steps, warmup_epochs=warmup)
    return dataclasses.replace(cfg, optim=optim)


def label_free(cfg: Config, num_labeled: int) -> Config:
    """The config of a run with ``num_labeled`` labelled images: with none, or with
    ``loss.objective: simclr`` asked for, a label-free run (SimCLR's NT-Xent on the two large
    views, so no small crops: they would be made and never used), each change said in a
    line; otherwise ``cfg`` unchanged.
    """
    if cfg.loss.objective == "paws" and num_labeled > 0:
        return cfg
    if cfg.loss.objective == "paws":
        info(
            "no labelled images: training a label-free embedding (loss.objective=simclr); "
            "paws suggest on this run then chooses the first images to label"
        )
        cfg = dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, objective="simclr"))
    if cfg.views.small_crops:
        info(
            "loss.objective simclr uses the 2 large views: views.small_crops "
            f"{cfg.views.small_crops} -> 0"
        )
        cfg = dataclasses.replace(cfg, views=dataclasses.replace(cfg.views, small_crops=0))
    return cfg


def fit_to_data(
    cfg: Config,
    num_unlabeled: int,
    labels: np.ndarray,
    world_size: int = 1,
    resumed: bool = False,
) -> Config:
    """The config with the data-dependent defaults filled in (see the module's doc).

    Args:
        cfg: the config as given.
        num_unlabeled: size of the unlabelled set.
        labels: (N,) class ids of the labelled images.
        world_size: number of processes.
        resumed: the config of a run being resumed (fitted when it started): its batch and
            support sizes are kept, whatever the number of processes now.

    Returns:
        A config whose values all apply as they are; fitting it again changes nothing.

    Raises:
        UserError: a resumed run whose sizes ``world_size`` processes cannot share.
    """
    if resumed:
        _check_shares(cfg, world_size)
    cfg = _batch(cfg, num_unlabeled, 1 if resumed else world_size)
    cfg = _length(cfg, num_unlabeled)
    if cfg.loss.objective == "simclr":
        return cfg  # no supports
    cfg = cfg if resumed else _support_images(cfg, world_size)
    classes = support_classes(cfg, len(np.unique(labels)), world_size)
    if classes != cfg.support.classes:
        cfg = dataclasses.replace(cfg, support=dataclasses.replace(cfg.support, classes=classes))
    return cfg


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Training length in steps: ``optim.steps`` or ``optim.epochs`` epochs (at least 1).

    Raises:
        UserError: more epochs than :data:`paws.config.MAX_STEPS` steps.
    """
    if cfg.optim.steps is not None:
        return cfg.optim.steps
    return check_length(
        max(1, int(round(cfg.optim.epochs * steps_per_epoch))), "optim.epochs", steps_per_epoch
    )


def check_length(steps: int, key: str, steps_per_epoch: int) -> int:
    """``steps``, or a one-line error when a length in epochs (``key``) means more steps than
    a run can take (:data:`paws.config.MAX_STEPS`)."""
    if steps > MAX_STEPS:
        raise UserError(
            f"{key} asks for {steps:,} steps ({steps_per_epoch:,} an epoch), more than the "
            f"largest run ({MAX_STEPS:,} steps); lower it"
        )
    return steps
