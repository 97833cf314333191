"""Classes nobody labelled, among the candidates of ``paws suggest``.

PAWS-NN answers one of the labelled classes for every image, so a suggestion from a class that
nobody labelled yet comes with a wrong guess and nothing says a class is missing. The known
score (:mod:`paws.method.known_score`, the diffusion score by default) tells such images: the
candidates scoring below its threshold (calibrated on the labelled images) match no labelled
class. They are grouped by k-means in the known score's embedding (the images of one unlabelled
class lie together there), the largest group first, and a suggestion among them is proposed as
``new:<k>``, the group it falls in, rather than as a labelled class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from paws.labelling.strategies import EmbeddingSource, TensorSource, kmeans_clusters
from paws.method.known_score import KnownScore

__all__ = ["NewGroups", "new_class_groups"]


@dataclass
class NewGroups:
    """Which candidates match no labelled class, and their groups.

    Attributes:
        scores: (N,) the known score of every candidate.
        threshold: the score below which a candidate matches no labelled class.
        group: (N,) the group of each candidate matching no labelled class (1 the largest),
            0 for the others.
        sizes: ``{group: candidates in it}``.
    """

    scores: np.ndarray
    threshold: float
    group: np.ndarray
    sizes: dict[int, int]


def _scores(
    source: EmbeddingSource, labelled: torch.Tensor, labels: torch.Tensor, known: KnownScore
) -> tuple[np.ndarray, float]:
    """The known score of every row of ``source`` and the threshold; the diffusion score's
    graph holds the labelled rows and (at most ``known.nodes`` of) the candidates."""
    if known.uses_graph:
        graph = known.graph(labelled, labels, source.take(known.graph_pool(len(source))))
        scores = [graph.query(x) for _, x in source.chunks()]
        return torch.cat(scores).numpy(), graph.threshold
    scores = [known.scores(x, labelled) for _, x in source.chunks()]
    return torch.cat(scores).numpy(), known.threshold(labelled)


def new_class_groups(
    source: EmbeddingSource,
    labelled: torch.Tensor,
    labels: torch.Tensor,
    known: KnownScore,
    groups: int,
    exclude: np.ndarray | None = None,
    seed: int = 0,
) -> NewGroups:
    """Score every candidate, and group those that match no labelled class.

    Args:
        source: (N, D) the candidates' embeddings in the known score's space.
        labelled: (M, D) the labelled images' embeddings in that space.
        labels: (M,) their classes.
        known: the known score and its threshold's quantile.
        groups: at most this many groups (k-means centres).
        exclude: (N,) bool, candidates labelled already (never called new).
        seed: seed of k-means.
    """
    scores, threshold = _scores(source, labelled, labels.long(), known)
    rejected = scores < threshold
    if exclude is not None:
        rejected &= ~np.asarray(exclude, dtype=bool)
    group = np.zeros(len(scores), dtype=np.int64)
    rows = np.flatnonzero(rejected)
    if not len(rows) or groups < 1:
        return NewGroups(scores, threshold, group, {})
    x = torch.nn.functional.normalize(source.take(rows).float(), dim=1)
    member = kmeans_clusters(TensorSource(x), min(groups, len(rows)), seed=seed).member
    counts = np.bincount(member, minlength=member.max() + 1)
    order = np.argsort(-counts, kind="stable")  # the largest group is new:1
    rank = np.empty_like(order)
    rank[order] = np.arange(1, len(order) + 1)
    group[rows] = rank[member]
    sizes = {int(rank[c]): int(n) for c, n in enumerate(counts) if n}
    return NewGroups(scores, threshold, group, sizes)
