"""Whether an image belongs to any support class: a score, its threshold, and how well it works.

A PAWS model classifies an image by soft nearest neighbours against labelled supports, so it
always answers one of their classes. The *known score* of an image measures how much it belongs
with the labelled images (:class:`KnownScore`):

- ``"diffusion"`` (the default): the log of the largest labelled class's mass near the image
  after label propagation over a nearest-neighbour graph of the unlabelled and labelled images
  (:mod:`paws.method.diffusion`). The unlabelled images hold the classes nobody labelled, which
  form their own dense regions that little mass reaches; where there are no unlabelled
  embeddings (a support alone), the soft score is used instead.
- ``"soft"``: ``tau * log(sum_s exp(cos(x, s) / tau))`` over the labelled images, the log of
  soft nearest neighbours' own normaliser;
- ``"nearest"``: the largest cosine similarity to a labelled image (RoPAWS's in-domain measure).

Each is computed on the encoder's output (``"trunk"``, the default) or the embedding PAWS-NN
classifies in (``"head"``).

The threshold is calibrated on the labelled images themselves: each is scored without its own
label (the similarity scores leave it out; the diffusion score propagates each of 5 folds from
the other folds' labels, skipping a class with no label left), and an image scoring below the
``eval.unknown_quantile`` quantile of those scores (5% by default) is called unknown, so about
that share of images of the known classes is called unknown too.

:func:`detection_metrics` measures a score on images known to be in and out of the support
classes: AUROC, and the false-positive rate at 95% true positives. The trunk's features are the
default because tightening reshapes the head's space around the labelled images, which hides
how far an image lies from them there (``benchmarks/uncurated.py``, ``benchmarks/open_set.py``;
figures in ``benchmarks/RESULTS.md``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from paws.method.diffusion import KnownGraph, build_known_graph

__all__ = ["KnownScore", "detection_metrics"]


@dataclass(frozen=True)
class KnownScore:
    """How the known score of an image is computed, and the threshold's quantile.

    Attributes:
        kind: ``"diffusion"`` (label propagation through the unlabelled images, see
            :meth:`graph`), ``"soft"`` (tau * logsumexp of cosine / tau over the supports) or
            ``"nearest"`` (the largest cosine similarity to a support). :meth:`scores` and
            :meth:`threshold`, which see the supports alone, score ``"diffusion"`` as
            ``"soft"``.
        features: the embedding scored: ``"trunk"`` (encoder output) or ``"head"``.
        tau: temperature of the soft score.
        quantile: share of the labelled images the threshold calls unknown.
        neighbours: diffusion: graph neighbours of a node, and graph nodes a new image's
            score is the mean of.
        nodes: diffusion: at most this many unlabelled images in the graph (drawn at random).
        alpha: diffusion: how far the class mass travels along the graph (near 1: far).
    """

    kind: Literal["diffusion", "soft", "nearest"] = "diffusion"
    features: Literal["trunk", "head"] = "trunk"
    tau: float = 0.1
    quantile: float = 0.05
    neighbours: int = 10
    nodes: int = 20000
    alpha: float = 0.99

    @classmethod
    def from_config(cls, cfg: Any) -> KnownScore:
        """The known score of a :class:`paws.config.Config` (its ``eval`` section)."""
        e = cfg.eval
        return cls(
            e.unknown_score,
            e.unknown_features,
            e.tau,
            e.unknown_quantile,
            e.unknown_neighbours,
            e.unknown_nodes,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for exports."""
        return asdict(self)

    @property
    def uses_graph(self) -> bool:
        """Whether the score needs the unlabelled images (a :class:`KnownGraph`)."""
        return self.kind == "diffusion"

    def graph_pool(self, num_unlabeled: int) -> np.ndarray:
        """Which of ``num_unlabeled`` unlabelled images the graph holds: all of them, or
        :attr:`nodes` drawn at random (always the same ones), in order."""
        if num_unlabeled <= self.nodes:
            return np.arange(num_unlabeled)
        rng = np.random.default_rng(0)
        return np.sort(rng.choice(num_unlabeled, self.nodes, replace=False))

    def graph(
        self, labeled: torch.Tensor, labels: torch.Tensor, unlabeled: torch.Tensor
    ) -> KnownGraph:
        """The diffusion score's graph of ``labeled`` (M, F) embeddings with their ``labels``
        (M,) and ``unlabeled`` (U, F) ones (at most :attr:`nodes`, see :meth:`graph_pool`),
        with its threshold (:func:`paws.method.diffusion.build_known_graph`)."""
        return build_known_graph(
            labeled, labels, unlabeled, self.quantile, self.neighbours, self.alpha
        )

    @torch.no_grad()
    def scores(
        self,
        queries: torch.Tensor,
        supports: torch.Tensor,
        chunk_size: int = 8192,
        exclude_self: bool = False,
    ) -> torch.Tensor:
        """Known scores of ``queries`` (N, D) against ``supports`` (S, D), chunked over the
        supports so memory stays bounded; with ``exclude_self`` the queries are the supports
        (same order) and each is left out. Returns (N,) float32 on the CPU."""
        q = F.normalize(queries.float(), dim=1)
        s = F.normalize(supports.float(), dim=1)
        best = q.new_full((len(q),), float("-inf"))  # the running max (of cos / tau for soft)
        total = q.new_zeros(len(q))  # soft: sum of exp(cos / tau - best)
        soft = self.kind != "nearest"
        scale = 1.0 / self.tau if soft else 1.0
        for start in range(0, len(s), chunk_size):
            sims = (q @ s[start : start + chunk_size].T) * scale
            if exclude_self:
                rows = torch.arange(len(q), device=q.device)
                inside = (rows >= start) & (rows < start + sims.shape[1])
                sims[rows[inside], rows[inside] - start] = float("-inf")
            new = torch.maximum(best, sims.max(dim=1).values)
            if soft:
                shift = torch.where(torch.isfinite(new), new, torch.zeros_like(new))
                total = total * torch.exp(best - shift) + torch.exp(sims - shift[:, None]).sum(1)
            best = new
        if not soft:
            return best.cpu()
        return (self.tau * (best + torch.log(total))).cpu()

    def threshold(self, supports: torch.Tensor, chunk_size: int = 8192) -> float:
        """The score below which an image is unknown: the ``quantile`` of the labelled
        images' leave-one-out scores (each against the other labelled images); minus infinity
        with a single labelled image, which has nothing to be compared with."""
        if len(supports) < 2:
            return float("-inf")
        scores = self.scores(supports, supports, chunk_size, exclude_self=True)
        return float(np.quantile(scores.numpy(), self.quantile))


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
