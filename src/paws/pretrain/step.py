"""One PAWS pre-training step, as the paper writes it (section 3, eq. 4).

Encode the support views together with the two large views and, separately, the small views;
classify every view against the supports by soft nearest neighbours; take the other views'
sharpened predictions as targets; minimise the cross-entropy plus ME-MAX; step LARS. Everything
a step uses is a function of ``(seed, step)``, so a resumed run continues exactly where it
stopped.

A label-free run (``loss.objective: simclr``) takes :func:`simclr_step` instead: the same
views and optimiser, SimCLR's NT-Xent between the two large views in place of eq. 4.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from paws import distributed, runtime
from paws.config.schema import LossConfig
from paws.data.loaders import Batch
from paws.method.losses import RoPAWS, nt_xent, paws_loss, sharpen, snn
from paws.method.monitor import monitor_metrics
from paws.method.optim import backward_step

__all__ = ["StepResult", "ropaws_of", "train_step", "simclr_step"]


@dataclass
class StepResult:
    """Scalars of one step, as detached tensors on the compute device.

    Reading them waits for the device and (under several processes) talks to the other ranks,
    so the training loop reads them only on logging and checkpoint steps: :meth:`read`.
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    me_max: torch.Tensor
    extra: dict[str, torch.Tensor]
    mass: torch.Tensor | None = None

    def read(self) -> dict[str, float]:
        """The scalars as floats, averaged over ranks (one transfer, one all-reduce)."""
        names = ["loss", "cross_entropy", "me_max", *self.extra]
        values = torch.stack([self.loss, self.cross_entropy, self.me_max, *self.extra.values()])
        return dict(zip(names, distributed.all_reduce_mean(values.float()).tolist()))


def ropaws_of(loss: LossConfig) -> RoPAWS | None:
    """RoPAWS's hyperparameters when ``loss.ropaws`` is on, else None (plain PAWS)."""
    if not loss.ropaws:
        return None
    return RoPAWS(loss.ropaws_prior_tau, loss.ropaws_prior_pow, loss.ropaws_label_ratio)


@torch.no_grad()
def _class_mass(
    views: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float, T: float
) -> torch.Tensor:
    """(K,) the mean sharpened soft nearest-neighbour prediction of a step's target views
    (the targets' class marginal), over every rank: what an estimated ME-MAX prior follows."""
    p = sharpen(snn(views.detach().float(), supports.float(), labels, tau), T)
    return distributed.all_reduce_mean(p.mean(dim=0))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    support_labels: torch.Tensor,
    loss_cfg: LossConfig,
    ropaws: RoPAWS | None = None,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
    monitor: bool = False,
    prior: torch.Tensor | None = None,
) -> StepResult:
    """One PAWS step (section 3, eq. 4) on ``model`` and ``optimizer``, or :func:`simclr_step`.

    Args:
        model: the :class:`PAWSModel` (possibly wrapped in DistributedDataParallel).
        optimizer: LARS.
        batch: this rank's views ``[large 1, large 2, small ...]`` (each (B, C, h, w)) and
            support views (n, C, H, W).
        support_labels: (S, K) smoothed labels of the supports gathered from all ranks.
        loss_cfg: the run's ``loss`` section (temperatures, ME-MAX and its prior).
        ropaws: RoPAWS's hyperparameters (:func:`ropaws_of`), built once per run, or None.
        scaler, dtype: the fp16 gradient scaler; the forward's autocast dtype (None: fp32).
        monitor: also compute the monitor-only metrics of Fig. 4 (no gradient).
        prior: (K,) ME-MAX prior of the step's support classes (None: the paper's uniform).

    Returns:
        The step's scalars as tensors, not waiting for the device (``.read()``: floats averaged
        over ranks), with ``loss.me_max_prior: estimated`` the step's class mass.
    """
    if loss_cfg.objective == "simclr":
        return simclr_step(model, optimizer, batch, loss_cfg.tau, scaler, dtype)
    device_type = batch.supports.device.type
    n_sup, n_img = batch.supports.shape[0], batch.views[0].shape[0]
    # One forward per crop size: the supports ride along with the two large views.
    with runtime.autocast(device_type, dtype):
        h, z = model([batch.supports, *batch.views])
    # Supports from every rank; gradients flow back into each rank's own supports.
    anchor_supports = distributed.all_gather(z[:n_sup])
    target_supports = distributed.all_gather(h[:n_sup].detach())
    target_views = h[n_sup : n_sup + 2 * n_img]
    cross_entropy, me_max = paws_loss(
        anchor_views=z[n_sup:],
        anchor_supports=anchor_supports,
        anchor_support_labels=support_labels,
        target_views=target_views,
        target_supports=target_supports,
        target_support_labels=support_labels,
        tau=loss_cfg.tau,
        T=loss_cfg.sharpen,
        me_max=loss_cfg.me_max,
        reduce=distributed.all_reduce_mean,
        prior=prior,
        ropaws=ropaws,
        # RoPAWS propagates labels through the whole batch, every rank's images.
        batch=distributed.gather_views(target_views.detach(), 2) if ropaws else None,
    )
    loss = cross_entropy + me_max
    backward_step(loss, optimizer, scaler)
    mass = None
    if loss_cfg.me_max_prior == "estimated":
        mass = _class_mass(
            target_views, target_supports, support_labels, loss_cfg.tau, loss_cfg.sharpen
        )
    extra = (
        monitor_metrics(
            h.detach(),
            z.detach(),
            anchor_supports.detach(),
            target_supports,
            support_labels,
            n_sup,
            n_img,
            loss_cfg.tau,
            loss_cfg.sharpen,
        )
        if monitor
        else {}
    )
    return StepResult(loss.detach(), cross_entropy.detach(), me_max.detach(), extra, mass)


def simclr_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    tau: float,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
) -> StepResult:
    """One label-free step (``loss.objective: simclr``), in place on ``model`` and ``optimizer``:
    SimCLR's NT-Xent between the two large views, every process's views the negatives.

    The loss is taken on ``z`` (after the prediction head), so that every parameter gets a
    gradient (as DistributedDataParallel requires) and the trunk ``paws suggest`` chooses in
    is trained; the step's supports, if any, are not used.

    Args:
        model: the :class:`PAWSModel` (possibly wrapped in DistributedDataParallel).
        optimizer: LARS.
        batch: this rank's views ``[large 1, large 2, ...]``, each (B, C, h, w).
        tau: the NT-Xent temperature (``loss.tau``).
        scaler: gradient scaler for fp16.
        dtype: autocast dtype of the forward pass, or None for fp32.

    Returns:
        The step's scalars: ``loss`` and ``cross_entropy`` are NT-Xent, ``me_max`` is 0.
    """
    n = batch.views[0].shape[0]
    with runtime.autocast(batch.views[0].device.type, dtype):
        _, z = model(batch.views[:2])
    rows = torch.nn.functional.normalize(z.float(), dim=1)
    keys = distributed.all_gather(rows)  # gradients reach every process's rows
    loss = nt_xent(rows[:n], rows[n:], tau, keys, distributed.get_rank() * 2 * n)
    backward_step(loss, optimizer, scaler)
    loss = loss.detach()
    return StepResult(loss, loss, torch.zeros_like(loss), {})
