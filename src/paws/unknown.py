"""Whether an image belongs to any support class: a score, its threshold, and how well it works.

A PAWS model classifies an image by soft nearest neighbours against labelled supports, so it
always answers one of their classes. The *known score* of an image is its mean cosine
similarity to its ``k`` nearest supports (``eval.unknown_neighbors``; the largest similarity
for k = 1, RoPAWS's in-domain measure): images of classes nobody labelled, or of no class,
lie far from every support. The threshold is calibrated on the labelled images themselves:
each is scored against the *other* labelled images (leave one out), and an image scoring below
the ``eval.unknown_quantile`` quantile of those scores (5% by default) is called unknown, so
about that share of images of the known classes is called unknown too.

:func:`detection_metrics` measures a score on images known to be in and out of the support
classes: AUROC, and the false-positive rate at 95% true positives.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["similarity_scores", "calibrate_threshold", "detection_metrics"]


@torch.no_grad()
def similarity_scores(
    queries: torch.Tensor,
    supports: torch.Tensor,
    k: int = 1,
    chunk_size: int = 8192,
    exclude_self: bool = False,
) -> torch.Tensor:
    """Mean cosine similarity of each query to its ``k`` most similar supports.

    Args:
        queries: (N, D) embeddings.
        supports: (S, D) embeddings.
        k: neighbours averaged (at most S, or S - 1 with ``exclude_self``).
        chunk_size: supports compared at a time (bounds memory for any S).
        exclude_self: the queries are the supports (same order): leave each one out.

    Returns:
        (N,) float32 scores in [-1, 1], on the CPU.
    """
    q = F.normalize(queries.float(), dim=1)
    s = F.normalize(supports.float(), dim=1)
    k = max(1, min(k, len(s) - (1 if exclude_self else 0)))
    best = q.new_full((len(q), k), float("-inf"))
    for start in range(0, len(s), chunk_size):
        sims = q @ s[start : start + chunk_size].T
        if exclude_self:
            rows = torch.arange(len(q), device=q.device)
            cols = rows - start
            inside = (cols >= 0) & (cols < sims.shape[1])
            sims[rows[inside], cols[inside]] = float("-inf")
        best = torch.cat([best, sims], dim=1).topk(k, dim=1).values
    return best.mean(dim=1).cpu()


def calibrate_threshold(
    supports: torch.Tensor, quantile: float = 0.05, k: int = 1, chunk_size: int = 8192
) -> float:
    """The score below which an image is unknown: the ``quantile`` of the labelled images'
    leave-one-out scores (each against the other labelled images).

    Args:
        supports: (S, D) embeddings of the labelled images (S >= 2).
        quantile: share of the labelled images that would be called unknown.
        k: neighbours of the score.
        chunk_size: supports compared at a time.
    """
    if len(supports) < 2:
        return float("-inf")  # a single labelled image: nothing to compare it with
    scores = similarity_scores(supports, supports, k, chunk_size, exclude_self=True)
    return float(np.quantile(scores.numpy(), quantile))


def detection_metrics(known: np.ndarray, unknown: np.ndarray) -> dict[str, float]:
    """How well scores tell images of the support classes (``known``, higher is known) from
    others (``unknown``).

    Returns:
        ``{"auroc"}``: the probability that a known image scores above an unknown one (ties
        count half; 0.5 is chance); ``{"fpr_at_95_tpr"}``: the share of unknown images scoring
        at least as high as the threshold that keeps 95% of the known ones.
    """
    known, unknown = np.asarray(known, np.float64), np.asarray(unknown, np.float64)
    if not len(known) or not len(unknown):
        raise ValueError("detection metrics need known and unknown scores")
    scores = np.concatenate([known, unknown])
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    # Average ranks of tied scores (1-based), for the Mann-Whitney U statistic.
    start = 0
    while start < len(scores):
        end = start
        while end + 1 < len(scores) and sorted_scores[end + 1] == sorted_scores[start]:
            end += 1
        ranks[order[start : end + 1]] = 0.5 * (start + end) + 1
        start = end + 1
    n_k, n_u = len(known), len(unknown)
    auroc = (ranks[:n_k].sum() - n_k * (n_k + 1) / 2) / (n_k * n_u)
    threshold = np.quantile(known, 0.05, method="lower")
    return {"auroc": float(auroc), "fpr_at_95_tpr": float(np.mean(unknown >= threshold))}
