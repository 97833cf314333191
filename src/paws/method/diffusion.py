"""The diffusion known score: how much of the labelled classes' mass reaches an image through
the unlabelled images.

A similarity to the labelled images alone cannot tell an image of a class nobody labelled from
an unusual image of a labelled class: both lie some way from every label. The unlabelled images
can: they hold the unknown classes too, and each class, known or not, forms its own dense
region. Mass spread from each labelled class along a nearest-neighbour graph of the unlabelled
and labelled images (label propagation, Zhou et al. 2004; Iscen et al. 2019 for deep
features) fills the regions of the labelled classes and hardly enters the others. An image's
score is the log of the largest class mass near it.

:func:`build_known_graph` builds the graph, the masses and the threshold; :class:`KnownGraph`
scores new images against it (the mean score of their nearest graph nodes).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

__all__ = ["KnownGraph", "build_known_graph", "class_masses", "knn_graph", "nearest_nodes"]

_TINY = 1e-30


@torch.no_grad()
def nearest_nodes(
    queries: torch.Tensor, nodes: torch.Tensor, k: int, exclude: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` most cosine-similar ``nodes`` (G, D) of each of ``queries`` (N, D), in blocks
    of queries so memory stays bounded; ``exclude`` (N,) names one node each query must not
    take (its own), or -1.

    Returns:
        ``(similarities (N, k), indices (N, k))``, most similar first.
    """
    q = F.normalize(queries.float(), dim=1)
    n = F.normalize(nodes.float(), dim=1)
    k = min(k, len(n) - (exclude is not None))
    sims, index = [q.new_zeros(0, k)], [torch.zeros(0, k, dtype=torch.long, device=q.device)]
    block = max(1, 2**25 // max(1, len(n)))
    for start in range(0, len(q), block):
        s = q[start : start + block] @ n.T
        if exclude is not None:
            own = exclude[start : start + block]
            rows = torch.nonzero(own >= 0).flatten()
            s[rows, own[rows]] = float("-inf")
        v, i = s.topk(k, dim=1)
        sims.append(v)
        index.append(i)
    return torch.cat(sims), torch.cat(index)


def knn_graph(features: torch.Tensor, k: int = 10) -> torch.Tensor:
    """The symmetric ``k``-nearest-neighbour graph of ``features`` (G, D), weights the positive
    part of the cosine similarity, normalised as ``D^-1/2 W D^-1/2``.

    Returns:
        (G, G) sparse COO float32.
    """
    g = len(features)
    own = torch.arange(g)
    sims, index = nearest_nodes(features, features, k, exclude=own)
    rows = own[:, None].expand_as(index).flatten()
    w = sims.clamp_min(0).flatten()
    both = torch.stack([torch.cat([rows, index.flatten()]), torch.cat([index.flatten(), rows])])
    adj = torch.sparse_coo_tensor(both, torch.cat([w, w]), (g, g), check_invariants=False)
    adj = adj.coalesce()
    degree = torch.zeros(g).index_add_(0, adj.indices()[0], adj.values()).clamp_min(_TINY)
    i, j = adj.indices()
    values = adj.values() / torch.sqrt(degree[i] * degree[j])
    normalised = torch.sparse_coo_tensor(adj.indices(), values, (g, g), check_invariants=False)
    return normalised.coalesce()


def class_masses(
    graph: torch.Tensor,
    seeds: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float = 0.99,
    iterations: int = 200,
) -> torch.Tensor:
    """Label propagation: solve ``(I - alpha * graph) M = Y`` by conjugate gradients, with
    ``Y[seeds[i], labels[i]] = 1 / (labels of that class)``, so a class's count of labels does
    not change how much mass it spreads.

    Args:
        graph: (G, G) sparse symmetric normalised adjacency (:func:`knn_graph`).
        seeds: (M,) the labelled nodes.
        labels: (M,) their classes.
        num_classes: C.
        alpha: how far mass travels (near 1: far).
        iterations: at most this many conjugate-gradient steps.

    Returns:
        (G, C) float32 class masses, zero for a class with no seed.
    """
    y = torch.zeros(graph.shape[0], num_classes)
    counts = torch.bincount(labels, minlength=num_classes).float().clamp_min(1)
    y[seeds, labels] = 1.0 / counts[labels]

    with warnings.catch_warnings():  # torch's "beta" notice, once per process, is not ours
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        rows = graph.to_sparse_csr()  # about 4 times faster products than COO on a CPU

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x - alpha * (rows @ x)

    m, r = torch.zeros_like(y), y.clone()
    p, rs = r.clone(), (r * r).sum(0)
    target = 1e-12 * rs.clamp_min(_TINY)
    for _ in range(iterations):
        ap = apply(p)
        step = rs / (p * ap).sum(0).clamp_min(_TINY)
        m += step * p
        r -= step * ap
        new = (r * r).sum(0)
        if bool((new <= target).all()):
            break
        p = r + (new / rs.clamp_min(_TINY)) * p
        rs = new
    return m.clamp_min(0)


def _node_scores(masses: torch.Tensor) -> torch.Tensor:
    return torch.log(masses.max(dim=1).values.clamp_min(_TINY))


@dataclass
class KnownGraph:
    """A nearest-neighbour graph of labelled and unlabelled embeddings with each node's known
    score: what the diffusion score of a new image is read from.

    Attributes:
        nodes: (G, D) float32 embeddings, the labelled ones first.
        scores: (G,) float32, the log of the largest class mass at each node.
        threshold: the score below which an image is unknown (calibrated on held-out labels).
        num_labeled: how many of ``nodes`` are labelled (the first ones).
        neighbours: nodes a new image's score is averaged over.
    """

    nodes: torch.Tensor
    scores: torch.Tensor
    threshold: float
    num_labeled: int
    neighbours: int = 10

    def query(self, queries: torch.Tensor, exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Known scores of ``queries`` (N, D): the mean score of their ``neighbours`` nearest
        nodes (``exclude``: as :func:`nearest_nodes`). Returns (N,) float32 on the CPU."""
        _, index = nearest_nodes(queries, self.nodes, self.neighbours, exclude)
        return self.scores[index].mean(dim=1).cpu()

    @property
    def unlabeled(self) -> torch.Tensor:
        """(U, D) the unlabelled nodes, from which a graph for another support is built."""
        return self.nodes[self.num_labeled :]


def _held_out_scores(
    graph: torch.Tensor,
    nodes: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    alpha: float,
    neighbours: int,
    folds: int,
) -> np.ndarray:
    """Scores of the labelled nodes, each fold propagated without its own labels: a labelled
    image in the threshold's calibration must not have spread mass to its own neighbours. An
    image whose class has no label left outside its fold (a class of one label) is skipped."""
    m = len(labels)
    fold = torch.from_numpy(np.random.default_rng(0).permutation(m) % folds)
    out = []
    for f in range(folds):
        held = torch.nonzero(fold == f).flatten()
        kept = torch.nonzero(fold != f).flatten()
        present = torch.bincount(labels[kept], minlength=num_classes) > 0
        held = held[present[labels[held]]]
        if not len(held) or not len(kept):
            continue
        scores = _node_scores(class_masses(graph, kept, labels[kept], num_classes, alpha))
        _, index = nearest_nodes(nodes[held], nodes, neighbours, exclude=held)
        out.append(scores[index].mean(dim=1))
    return torch.cat(out).numpy() if out else np.zeros(0)


def build_known_graph(
    labeled: torch.Tensor,
    labels: torch.Tensor,
    unlabeled: torch.Tensor,
    quantile: float = 0.05,
    neighbours: int = 10,
    alpha: float = 0.99,
    folds: int = 5,
) -> KnownGraph:
    """The graph of ``labeled`` (M, D) with ``labels`` (M,) and ``unlabeled`` (U, D) embeddings,
    its node scores, and the threshold: the ``quantile`` of the labelled images' held-out scores
    (``folds`` folds, each propagated without its labels); minus infinity when no labelled
    image can be held out."""
    labels = labels.long()
    nodes = torch.cat([labeled.float(), unlabeled.float()])
    num_classes = int(labels.max()) + 1 if len(labels) else 0
    graph = knn_graph(nodes, neighbours)
    seeds = torch.arange(len(labels))
    scores = _node_scores(class_masses(graph, seeds, labels, num_classes, alpha))
    held = _held_out_scores(graph, nodes, labels, num_classes, alpha, neighbours, folds)
    threshold = float(np.quantile(held, quantile)) if len(held) else float("-inf")
    return KnownGraph(F.normalize(nodes, dim=1), scores, threshold, len(labels), neighbours)
