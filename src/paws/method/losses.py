"""The PAWS objective: soft nearest neighbours, sharpening, the multi-crop loss and ME-MAX.

Everything here is a pure function of tensors (section 3 and Appendix A, eq. 4 of the paper).
Shapes use B for unlabelled images, V = 2 + M views per image (2 large, M small), S support
rows, K support classes and D the embedding size.

The semantics follow the paper and the official implementation (facebookresearch/suncet,
``src/losses.py``): targets come from the *other* large view, small views target the mean of the
two large views' sharpened targets, targets carry no gradient, gradients reach both the anchor
views and the supports, and the ME-MAX term is ``sum(pbar * log(pbar))`` over the mean sharpened
anchor prediction. Two deliberate differences from that code, both numerically safer and equal in
exact arithmetic: sharpening is computed in log space, and target entries below 1e-4 are *not*
zeroed (the safe logarithm below makes that trick unnecessary, and the loss stays exactly eq. 4).

Two options for uncurated unlabelled images, both off by default:

- RoPAWS (Mo et al., ICLR 2023; :class:`RoPAWS`): the targets are computed by a
  semi-supervised kernel density estimate, from the supports *and* the other unlabelled images
  of the batch (label propagation), with an in-domain prior that gives an image far from every
  support little mass; its weight in the loss is that mass. The anchors are classified as in
  PAWS. Written after the description in the paper and the official code (the ``ropaws``
  branch of ``init_paws_loss`` in facebookresearch/suncet), with a linear solve in place of a
  matrix inverse.
- ME-MAX with a prior: the regulariser becomes ``KL(pbar || prior)``, which pushes the mean
  prediction towards the prior (class frequencies) instead of towards uniform.

Beside them, two losses PAWS relates itself to (Fig. 4): SuNCEt (:func:`supervised_nce`,
also what tightening minimises) and SimCLR's NT-Xent (:func:`nt_xent`, also the objective of a
label-free run, ``loss.objective: simclr``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "snn",
    "sharpen",
    "smooth_labels",
    "paws_loss",
    "me_max_term",
    "RoPAWS",
    "ropaws_predictions",
    "supervised_nce",
    "nt_xent",
]


def _safe_log(p: torch.Tensor) -> torch.Tensor:
    """Logarithm that maps 0 to log(tiny) instead of -inf, so ``0 * log(0)`` is 0, not NaN."""
    return torch.log(p.clamp_min(torch.finfo(p.dtype).tiny))


def snn(
    query: torch.Tensor, supports: torch.Tensor, support_labels: torch.Tensor, tau: float = 0.1
) -> torch.Tensor:
    """Soft nearest-neighbour classifier ``softmax(norm(query) @ norm(supports).T / tau) @ labels``.

    Args:
        query: (N, D) embeddings to classify.
        supports: (S, D) embeddings of labelled images.
        support_labels: (S, K) label distributions of the supports (one-hot, possibly smoothed).
        tau: cosine-similarity temperature (the paper uses 0.1).

    Returns:
        (N, K) class probabilities; each row sums to 1 when the label rows do.
    """
    query = F.normalize(query, dim=1)
    supports = F.normalize(supports, dim=1)
    return torch.softmax(query @ supports.T / tau, dim=1) @ support_labels


def sharpen(p: torch.Tensor, T: float = 0.25) -> torch.Tensor:
    """Sharpen distributions: ``p ** (1/T)`` renormalised per row.

    Computed as ``softmax(log(p) / T)``, which is the same function but cannot overflow or divide
    by a zero sum when every entry of a row is tiny.

    Args:
        p: (N, K) probabilities.
        T: sharpening temperature; T < 1 sharpens, T = 1 is the identity.

    Returns:
        (N, K) sharpened probabilities.
    """
    return torch.softmax(_safe_log(p) / T, dim=1)


def smooth_labels(labels: torch.Tensor, num_classes: int, smoothing: float = 0.1) -> torch.Tensor:
    """One-hot labels with label smoothing: ``(1 - s) * onehot + s / K``.

    Args:
        labels: (N,) integer class indices in ``[0, num_classes)``.
        num_classes: K, the number of columns.
        smoothing: s in [0, 1); the paper uses 0.1.

    Returns:
        (N, K) float32 label distributions (rows sum to 1).
    """
    onehot = F.one_hot(labels.long(), num_classes).float()
    return onehot * (1.0 - smoothing) + smoothing / num_classes


Reduce = Callable[[torch.Tensor], torch.Tensor]


def me_max_term(
    probs: torch.Tensor,
    T: float = 0.25,
    reduce: Reduce | None = None,
    prior: torch.Tensor | None = None,
) -> torch.Tensor:
    """ME-MAX regulariser ``sum(pbar * log(pbar))``, pbar the mean sharpened prediction.

    Minimising it maximises the entropy of the mean prediction, so it is <= 0. With a
    ``prior`` it is ``KL(pbar || prior) = sum(pbar * (log(pbar) - log(prior)))`` instead,
    minimal (0) when the mean prediction equals the prior; a uniform prior gives the paper's
    term plus log K.

    Args:
        probs: (N, K) anchor predictions (with gradient).
        T: sharpening temperature.
        reduce: averages the (K,) mean prediction over processes, differentiably (e.g.
            :func:`paws.distributed.all_reduce_mean`); None in one process.
        prior: (K,) target distribution of the classes (sums to 1), or None.

    Returns:
        Scalar tensor.
    """
    pbar = sharpen(probs, T).mean(dim=0)
    if reduce is not None:
        pbar = reduce(pbar)
    if prior is None:
        return torch.sum(pbar * _safe_log(pbar))
    return torch.sum(pbar * (_safe_log(pbar) - _safe_log(prior.to(pbar))))


@dataclass(frozen=True)
class RoPAWS:
    """The hyperparameters of RoPAWS targets (the paper's defaults, its CIFAR-10 prior_tau).

    Attributes:
        prior_tau: temperature of the in-domain prior ``exp((s_max - 1) / prior_tau)``, s_max
            an image's largest cosine similarity to a support (RoPAWS uses 0.1 on CIFAR-10,
            3.0 on ImageNet and iNaturalist).
        prior_pow: an image's loss is weighted by its in-domain mass to this power.
        label_ratio: weight of the supports, as a whole, relative to the unlabelled images of
            the batch in the pseudo-labels.
    """

    prior_tau: float = 0.1
    prior_pow: float = 1.0
    label_ratio: float = 5.0


def ropaws_predictions(
    views: torch.Tensor,
    supports: torch.Tensor,
    support_labels: torch.Tensor,
    tau: float = 0.1,
    prior_tau: float = 0.1,
    label_ratio: float = 5.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Semi-supervised soft nearest neighbours of one view of a batch (RoPAWS).

    Every image spreads its in-domain prior ``pi_i = exp((max_s cos(i, s) - 1) / prior_tau)``
    over the supports and the *other* images of the batch, in proportion to
    ``exp(cos / tau)``, the supports' kernel multiplied by ``label_ratio * M / S``. Its class
    mass is then what reaches it from the supports, directly or through other images: the
    solution ``P`` of ``P = A_L Y + A_U P`` (label propagation), whose rows sum to the image's
    in-domain mass ``p_in <= pi_i``; the rest, ``1 - p_in``, is spread uniformly over the
    classes.

    Args:
        views: (M, D) embeddings of one view of every unlabelled image (all processes).
        supports: (S, D) support embeddings.
        support_labels: (S, K) label distributions of the supports.
        tau: cosine-similarity temperature.
        prior_tau: temperature of the in-domain prior.
        label_ratio: weight of the supports relative to the batch.

    Returns:
        ``(probs, p_in)``: (M, K) class distributions and (M,) in-domain masses.
    """
    q = F.normalize(views, dim=1)
    s = F.normalize(supports, dim=1)
    m, n = q.shape[0], s.shape[0]
    to_supports = q @ s.T
    to_batch = (q @ q.T).fill_diagonal_(float("-inf"))
    prior = torch.exp((to_supports.max(dim=1).values - 1.0) / prior_tau)
    boost = math.log(label_ratio * m / n)  # the supports' kernel times label_ratio * M / S
    weights = torch.softmax(torch.cat([to_supports / tau + boost, to_batch / tau], dim=1), dim=1)
    weights = weights * prior.unsqueeze(1)
    a_l, a_u = weights[:, :n], weights[:, n:]
    eye = torch.eye(m, dtype=q.dtype, device=q.device)
    probs = torch.linalg.solve(eye - a_u, a_l @ support_labels.to(q.dtype))
    p_in = probs.sum(dim=1)
    probs = probs + (1.0 - p_in).unsqueeze(1) / probs.shape[1]
    return probs, p_in


def _targets(
    target_views: torch.Tensor,
    target_supports: torch.Tensor,
    target_support_labels: torch.Tensor,
    num_small: int,
    tau: float,
    T: float,
    ropaws: RoPAWS | None = None,
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sharpened, swapped multi-crop targets, without gradient: ((2 + M) * B, K), and with
    RoPAWS the (B,) in-domain masses of the images (else None)."""
    with torch.no_grad():
        if ropaws is None:
            p, p_in = snn(target_views, target_supports, target_support_labels, tau), None
        else:
            views, rows = batch if batch is not None else _local_batch(target_views)
            per_view = [
                ropaws_predictions(
                    v,
                    target_supports,
                    target_support_labels,
                    tau,
                    ropaws.prior_tau,
                    ropaws.label_ratio,
                )
                for v in views
            ]
            p = torch.cat([probs[rows] for probs, _ in per_view])
            p_in = 0.5 * (per_view[0][1][rows] + per_view[1][1][rows])
        p = sharpen(p, T)
        first, second = p.chunk(2)
        small = 0.5 * (first + second)
        return torch.cat([second, first] + [small] * num_small, dim=0), p_in


def _local_batch(target_views: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The two views of this process's batch as the whole batch: ((2, B, D), rows 0..B-1)."""
    b = target_views.shape[0] // 2
    rows = torch.arange(b, device=target_views.device)
    return target_views.view(2, b, -1), rows


def _small_views(num_rows: int, num_targets: int) -> int:
    """M, the small views per image, from (2 + M) * B anchor rows and 2B target rows."""
    if num_targets % 2 or num_rows % (num_targets // 2) or num_rows < num_targets:
        raise ValueError(
            f"anchor_views has {num_rows} rows and target_views {num_targets}: expected "
            "target_views = 2B rows and anchor_views = (2 + M) * B rows"
        )
    return num_rows // (num_targets // 2) - 2


def paws_loss(
    anchor_views: torch.Tensor,
    anchor_supports: torch.Tensor,
    anchor_support_labels: torch.Tensor,
    target_views: torch.Tensor,
    target_supports: torch.Tensor,
    target_support_labels: torch.Tensor,
    tau: float = 0.1,
    T: float = 0.25,
    me_max: bool = True,
    reduce: Reduce | None = None,
    prior: torch.Tensor | None = None,
    ropaws: RoPAWS | None = None,
    batch: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PAWS loss (paper eq. 4): cross-entropy to the other views' sharpened predictions.

    Anchors are laid out in blocks of B rows, ``[large 1; large 2; small 1; ...; small M]``.
    ``target_views`` holds the 2B large-view rows in the same order ``[large 1; large 2]`` (the
    same embeddings as the anchors', or the ones before a prediction head); this function swaps
    them (large 1 targets large 2 and vice versa), averages them for the small views, sharpens
    and detaches them, so callers cannot get either wrong.

    With ``ropaws``, the targets are RoPAWS's (:func:`ropaws_predictions`, each large view
    against the supports and the same view of the other images), and each image's
    cross-entropy is weighted by its in-domain mass to the power ``ropaws.prior_pow``.

    Computed in float32 even under autocast.

    Args:
        anchor_views: (V*B, D) anchor embeddings, V = 2 + M.
        anchor_supports: (S, D) support embeddings that anchors are classified against.
        anchor_support_labels: (S, K) (smoothed) one-hot support labels.
        target_views: (2B, D) large-view embeddings the targets are computed from.
        target_supports: (S', D) supports for the targets (detached here).
        target_support_labels: (S', K) their labels.
        tau: cosine-similarity temperature.
        T: target sharpening temperature.
        me_max: add the ME-MAX regulariser; if False the second output is 0.
        reduce: averages ME-MAX's mean prediction over processes (see :func:`me_max_term`).
        prior: (K,) class prior of ME-MAX (see :func:`me_max_term`), or None for the paper's.
        ropaws: RoPAWS targets and weights, or None for PAWS's.
        batch: RoPAWS under several processes: ``(views (2, M, D), rows (B,))``, the target
            views of the whole batch (every process, detached) and where this process's
            images are in it; default: ``target_views`` alone.

    Returns:
        ``(cross_entropy, me_max_term)``; the training loss is their sum (it can be negative).
    """
    num_small = _small_views(anchor_views.shape[0], target_views.shape[0])
    device_type = anchor_views.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        targets, p_in = _targets(
            target_views.detach().float(),
            target_supports.detach().float(),
            target_support_labels.float(),
            num_small,
            tau,
            T,
            ropaws,
            None if batch is None else (batch[0].detach().float(), batch[1]),
        )
        probs = snn(
            anchor_views.float(), anchor_supports.float(), anchor_support_labels.float(), tau
        )
        per_row = -(targets * _safe_log(probs)).sum(dim=1)
        if p_in is None:
            cross_entropy = per_row.mean()
        else:
            weights = (p_in**ropaws.prior_pow).repeat(2 + num_small)
            cross_entropy = (weights * per_row).mean()
        if me_max:
            regulariser = me_max_term(probs, T, reduce, prior)
        else:
            regulariser = probs.new_zeros(())
    return cross_entropy, regulariser


def supervised_nce(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    tau: float = 0.1,
    rows: torch.Tensor | None = None,
) -> torch.Tensor:
    """SuNCEt: supervised contrastive loss of each labelled embedding against the others.

    Each row is classified by soft nearest neighbours against all *other* rows (self-similarity
    masked out) and scored by cross-entropy with its own label (Assran et al. 2020; paper
    Fig. 4b and Appendix C). Used to monitor support classification and to tighten clusters.

    Args:
        embeddings: (N, D) embeddings.
        labels: (N, K) one-hot (or smoothed) labels.
        tau: temperature.
        rows: (N,) bool, the rows scored (default: all); the others still serve as
            neighbours, e.g. the only image of its class, which has no other image to find.

    Returns:
        Scalar mean cross-entropy over the scored rows.
    """
    z = F.normalize(embeddings.float(), dim=1)
    logits = z @ z.T / tau
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    probs = torch.softmax(logits, dim=1) @ labels.float()
    losses = -(labels.float() * _safe_log(probs)).sum(dim=1)
    return losses.mean() if rows is None else losses[rows].mean()


def nt_xent(
    first: torch.Tensor,
    second: torch.Tensor,
    tau: float = 0.1,
    keys: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """Instance-discrimination loss (SimCLR NT-Xent) between two views of the same B images:
    each of the 2B views must find the other view of its image among every view but itself.

    Args:
        first: (B, D) embeddings of view 1.
        second: (B, D) embeddings of view 2, row i a view of the same image as ``first[i]``.
        tau: temperature.
        keys: (M, D) unit rows to find the other view among: ``[first; second]`` normalised,
            of every process of a run, process by process (default: these 2B rows alone).
        offset: where this process's ``[first; second]`` rows start in ``keys``.

    Returns:
        Scalar mean loss over the 2B rows.
    """
    z = F.normalize(torch.cat([first, second]).float(), dim=1)
    keys = z if keys is None else keys.float()
    n = first.shape[0]
    logits = z @ keys.T / tau
    own = torch.arange(2 * n, device=z.device)
    logits[own, own + offset] = float("-inf")
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device) + offset
    return F.cross_entropy(logits, positives)
