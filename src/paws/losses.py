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
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "snn",
    "sharpen",
    "smooth_labels",
    "paws_loss",
    "me_max_term",
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


def me_max_term(probs: torch.Tensor, T: float = 0.25, reduce: Reduce | None = None) -> torch.Tensor:
    """ME-MAX regulariser ``sum(pbar * log(pbar))``, pbar the mean sharpened prediction.

    Minimising it maximises the entropy of the mean prediction, so it is <= 0.

    Args:
        probs: (N, K) anchor predictions (with gradient).
        T: sharpening temperature.
        reduce: averages the (K,) mean prediction over processes, differentiably (e.g.
            :func:`paws.distributed.all_reduce_mean`); None in one process.

    Returns:
        Scalar tensor.
    """
    pbar = sharpen(probs, T).mean(dim=0)
    if reduce is not None:
        pbar = reduce(pbar)
    return torch.sum(pbar * _safe_log(pbar))


def _targets(
    target_views: torch.Tensor,
    target_supports: torch.Tensor,
    target_support_labels: torch.Tensor,
    num_small: int,
    tau: float,
    T: float,
) -> torch.Tensor:
    """Sharpened, swapped multi-crop targets, without gradient: ((2 + M) * B, K)."""
    with torch.no_grad():
        p = sharpen(snn(target_views, target_supports, target_support_labels, tau), T)
        first, second = p.chunk(2)
        small = 0.5 * (first + second)
        return torch.cat([second, first] + [small] * num_small, dim=0)


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
) -> tuple[torch.Tensor, torch.Tensor]:
    """The PAWS loss (paper eq. 4): cross-entropy to the other views' sharpened predictions.

    Anchors are laid out in blocks of B rows, ``[large 1; large 2; small 1; ...; small M]``.
    ``target_views`` holds the 2B large-view rows in the same order ``[large 1; large 2]`` (the
    same embeddings as the anchors', or the ones before a prediction head); this function swaps
    them (large 1 targets large 2 and vice versa), averages them for the small views, sharpens
    and detaches them, so callers cannot get either wrong.

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

    Returns:
        ``(cross_entropy, me_max_term)``; the training loss is their sum (it can be negative).
    """
    num_rows, num_targets = anchor_views.shape[0], target_views.shape[0]
    if num_targets % 2 or num_rows % (num_targets // 2) or num_rows < num_targets:
        raise ValueError(
            f"anchor_views has {num_rows} rows and target_views {num_targets}: expected "
            "target_views = 2B rows and anchor_views = (2 + M) * B rows"
        )
    num_small = num_rows // (num_targets // 2) - 2
    device_type = anchor_views.device.type
    with torch.autocast(device_type=device_type, enabled=False):
        targets = _targets(
            target_views.detach().float(),
            target_supports.detach().float(),
            target_support_labels.float(),
            num_small,
            tau,
            T,
        )
        probs = snn(
            anchor_views.float(), anchor_supports.float(), anchor_support_labels.float(), tau
        )
        cross_entropy = -(targets * _safe_log(probs)).sum(dim=1).mean()
        if me_max:
            regulariser = me_max_term(probs, T, reduce)
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


def nt_xent(first: torch.Tensor, second: torch.Tensor, tau: float = 0.1) -> torch.Tensor:
    """Instance-discrimination loss (SimCLR NT-Xent) between two views of the same B images.

    Args:
        first: (B, D) embeddings of view 1.
        second: (B, D) embeddings of view 2, row i a view of the same image as ``first[i]``.
        tau: temperature.

    Returns:
        Scalar mean loss over the 2B rows.
    """
    z = F.normalize(torch.cat([first, second]).float(), dim=1)
    n = first.shape[0]
    logits = (z @ z.T / tau).fill_diagonal_(float("-inf"))
    positives = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positives)
