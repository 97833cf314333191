"""Which model a run means, chosen on its labelled images alone.

A run ends with several models: the pre-trained one (``final.pt``), the tightened one
(``tighten.pt``), the student (``distill.pt``). Which of them classifies the user's images best
varies from run to run (tightening took one run from 78.9% to 74.6%), and a user with 100
labels has no test set to tell. So the run decides, by k-fold cross-validation over its labelled
images: for each fold, every candidate is built again from the pre-trained weights with the
fold's images left out (tightening and the student train again on the other labels) and scored
on the fold, the other labelled images being its support. Folds are paired: every candidate is
scored on the same held-out images, so their difference is measured more finely than either
score.

The held-out images are not new to the network: pre-training used every labelled image as a
support, so held-out accuracies run far above test accuracies (97% against 78% on the default
run), and they favour the models closest to pre-training (the pre-trained model scored 4 points
above the tightened one on the folds of one run, whose test set says the opposite by 0.6). So the
candidate with the best mean held-out accuracy is chosen only when it beats the default (the
candidate that measured best across the benchmarks, ``DEFAULT_ORDER``) by more than
``SIGNIFICANCE`` standard errors of the per-fold difference; otherwise the evidence does not
tell, and the default is kept. With fewer than two labelled images in every class nothing can
be held out, and the default is kept too; ``choice.json`` and one line say which and why.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paws.data.images import ImageSet
from paws.data.sources import Datasets
from paws.method.sampling import Stream
from paws.rundir.layout import CHOICE, write_json

__all__ = [
    "Candidate",
    "Choice",
    "label_folds",
    "cross_validate",
    "decide",
    "write_choice",
    "SIGNIFICANCE",
]

# Standard errors of the paired per-fold difference a candidate must beat the default by
# (about a one-sided 2.5% test).
SIGNIFICANCE = 2.0


@dataclass
class Candidate:
    """A model a run may mean, and how to build it again on part of the labels.

    Attributes:
        file: its checkpoint in the run directory (``"tighten.pt"``).
        what: what it is, in words (``"after tightening"``).
        held_out: ``fn(train, held_out) -> percent``: build the candidate with ``train`` as the
            labelled set (a :class:`paws.data.sources.Datasets` whose ``labeled`` is the fold's
            complement) and return its top-1 on the ``held_out`` images.
    """

    file: str
    what: str
    held_out: Callable[[Datasets, ImageSet], float]


@dataclass
class Choice:
    """The model a run means and why.

    Attributes:
        file: the chosen checkpoint.
        reason: one sentence.
        scores: file -> the candidate's held-out top-1 on each fold (percent).
        folds: the number of folds (0: nothing could be held out).
    """

    file: str
    reason: str
    scores: dict[str, list[float]] = field(default_factory=dict)
    folds: int = 0


def label_folds(labels: np.ndarray, k: int, seed: int) -> list[np.ndarray]:
    """``k`` stratified folds of the labelled images, as held-out positions.

    Each class's images are shuffled (seeded by ``seed``) and dealt to the folds in turn, the
    first image of each class to a different fold, so every fold holds about the same share of
    every class. A class with a single image is never held out (it would leave its class with
    no support); a class with fewer images than folds is held out in fewer folds, never all
    of it at once. Folds that would hold nothing are dropped.

    Args:
        labels: (N,) class ids of the labelled images.
        k: the number of folds (>= 2).
        seed: seed of the shuffle.

    Returns:
        Up to ``k`` sorted arrays of positions in ``labels``, disjoint.
    """
    rng = np.random.default_rng([seed, int(Stream.CHOICE)])
    folds: list[list[int]] = [[] for _ in range(k)]
    start = 0
    for c in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == c))
        if len(members) < 2:
            continue
        # Dealt in turn, a fold holds at most ceil(n / k) < n of a class's n >= 2 images, so
        # the other labels keep at least one image of it as support.
        for j, i in enumerate(members):
            folds[(start + j) % k].append(int(i))
        start += 1
    return [np.sort(np.asarray(f, dtype=np.int64)) for f in folds if f]


def _without(data: Datasets, held_out: np.ndarray) -> tuple[Datasets, ImageSet]:
    """The datasets with ``held_out`` labelled images removed from the labelled set (and no
    test set), and those images."""
    keep = np.setdiff1d(np.arange(len(data.labeled)), held_out)
    train = dataclasses.replace(data, labeled=data.labeled.subset(keep), test=None)
    return train, data.labeled.subset(held_out)


def cross_validate(
    candidates: Sequence[Candidate],
    data: Datasets,
    k: int,
    seed: int,
    tick: Callable[[], None] | None = None,
) -> tuple[dict[str, list[float]], int]:
    """Every candidate's held-out top-1 on the same ``k`` folds of the labelled images.

    Returns:
        ``(file -> per-fold top-1 in percent, the number of folds)``; no folds (and empty
        lists) when no class has two labelled images.
    """
    folds = label_folds(data.labeled.labels, k, seed)
    scores: dict[str, list[float]] = {c.file: [] for c in candidates}
    for fold in folds:
        train, held = _without(data, fold)
        for c in candidates:
            with torch.random.fork_rng(devices=[]):  # the run's own random state is untouched
                scores[c.file].append(float(c.held_out(train, held)))
            if tick is not None:
                tick()
    return scores, len(folds)


def _mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for fewer than two values)."""
    a = np.asarray(values, dtype=np.float64)
    if len(a) < 2:
        return float(a.mean()) if len(a) else math.nan, 0.0
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(len(a)))


def decide(
    candidates: Sequence[Candidate],
    scores: dict[str, list[float]],
    folds: int,
    default: str,
) -> Choice:
    """The candidate to use: the best mean held-out top-1, unless it beats ``default`` by
    no more than ``SIGNIFICANCE`` standard errors of their per-fold difference (then
    ``default``).

    Args:
        candidates: the candidates, for their words.
        scores: file -> per-fold held-out top-1 (from :func:`cross_validate`).
        folds: the number of folds (0: nothing could be held out).
        default: the file to keep when the labels cannot tell.
    """
    what = {c.file: c.what for c in candidates}
    if folds == 0:
        return Choice(
            default,
            f"{what[default]} ({default}): no labelled class has a second image to hold out, "
            "so the labels cannot tell the models apart; this is the default",
            scores,
            0,
        )
    means = {f: _mean_se(v)[0] for f, v in scores.items()}
    best = max(means, key=lambda f: (means[f], f == default))
    if best == default:
        return Choice(
            default,
            f"{what[default]} ({default}): the best on {folds} folds of the labelled images "
            f"({means[default]:.1f}% held out)",
            scores,
            folds,
        )
    gain, se = _mean_se(np.subtract(scores[best], scores[default]).tolist())
    if gain <= SIGNIFICANCE * se:
        return Choice(
            default,
            f"{what[default]} ({default}), the default: {what[best]} scored "
            f"{means[best]:.1f}% against {means[default]:.1f}% on {folds} folds of the "
            f"labelled images, not beyond two standard errors of the per-fold gain "
            f"({gain:+.1f} ± {se:.1f} points)",
            scores,
            folds,
        )
    return Choice(
        best,
        f"{what[best]} ({best}): {means[best]:.1f}% against {means[default]:.1f}% for "
        f"{what[default]} on {folds} folds of the labelled images ({gain:+.1f} ± {se:.1f} "
        "points)",
        scores,
        folds,
    )


def write_choice(out: Path, choice: Choice, candidates: Sequence[Candidate]) -> dict[str, Any]:
    """Write ``out/choice.json``: the chosen file, why, and every candidate's per-fold
    held-out top-1 with its mean and standard error.

    Returns:
        What was written.
    """
    record: dict[str, Any] = {
        "model": choice.file,
        "reason": choice.reason,
        "folds": choice.folds,
        "candidates": {},
    }
    for c in candidates:
        values = choice.scores.get(c.file, [])
        mean, se = _mean_se(values) if values else (None, None)
        record["candidates"][c.file] = {
            "what": c.what,
            "held_out_top1": values,
            "mean": mean,
            "standard_error": se,
        }
    write_json(out / CHOICE, record)
    return record
