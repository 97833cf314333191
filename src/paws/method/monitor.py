"""The paper's monitor-only metrics (Fig. 4), computed on a training step's own batch."""

from __future__ import annotations

import torch

from paws.method.losses import nt_xent, sharpen, snn, supervised_nce

__all__ = ["monitor_metrics"]


@torch.no_grad()
def monitor_metrics(
    h: torch.Tensor,
    z: torch.Tensor,
    anchor_supports: torch.Tensor,
    target_supports: torch.Tensor,
    labels: torch.Tensor,
    n_sup: int,
    n_img: int,
    tau: float,
    T: float,
) -> dict[str, torch.Tensor]:
    """Fig. 4 metrics on a step's own batch, without gradient: target confidence (4c),
    instance-discrimination and support-classification losses (4b), entropy of the mean
    prediction.

    Args:
        h: (S + V*B, D) embeddings before the prediction head (supports first).
        z: (S + V*B, D) embeddings after it.
        anchor_supports: (S', D) the supports anchors are classified against (all ranks).
        target_supports: (S', D) the supports targets are computed with.
        labels: (S', K) their smoothed labels.
        n_sup: S, this rank's support rows.
        n_img: B, this rank's unlabelled images.
        tau: the soft nearest-neighbour temperature (``loss.tau``).
        T: the sharpening temperature (``loss.sharpen``).

    Returns:
        Scalar tensors named as the metrics.csv columns (:data:`paws.rundir.MONITOR_COLUMNS`).
    """
    h, z = h.float(), z.float()
    large = h[n_sup : n_sup + 2 * n_img]
    targets = sharpen(snn(large, target_supports.float(), labels, tau), T)
    probs = snn(z[n_sup:], anchor_supports.float(), labels, tau)
    pbar = sharpen(probs, T).mean(0)
    # SuNCEt is scored against hard labels: with smoothed ones its floor would not be 0.
    hard = torch.nn.functional.one_hot(labels.argmax(dim=1), labels.shape[1]).float()
    return {
        "target_confidence": targets.max(dim=1).values.mean(),
        "instance_loss": nt_xent(large[:n_img], large[n_img:], tau),
        "support_loss": supervised_nce(anchor_supports.float(), hard, tau),
        "mean_entropy": -(pbar * pbar.clamp_min(1e-12).log()).sum(),
    }
