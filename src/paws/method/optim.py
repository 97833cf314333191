"""LARS with classical momentum (paper Appendix A, eq. 2), parameter groups, warm-up + cosine.

Classical (heavy-ball) momentum folds the learning rate into the velocity::

    v <- beta * v - lr * g
    theta <- theta + v

whereas PyTorch's SGD (eq. 3) applies the learning rate after the velocity, which behaves like a
time-varying momentum under warm-up and LARS. The LARS trust ratio follows the official PAWS
code (facebookresearch/suncet, ``src/lars.py``): ``eta * ||w|| / (||g|| + wd * ||w|| + eps)``,
applied to the weight-decayed gradient, and skipped for biases and normalisation parameters,
which also get no weight decay.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn

__all__ = ["LARS", "param_groups", "WarmupCosine", "set_lr", "backward_step"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm)


def param_groups(model: nn.Module, weight_decay: float, lars: bool = True) -> list[dict]:
    """Split trainable parameters into LARS-adapted, weight-decayed ones and the rest.

    Biases and every parameter of a normalisation layer (batch, layer, group norm) go to the
    second group, with no weight decay and no LARS adaptation (paper section 5).

    Args:
        model: the model.
        weight_decay: weight decay of the first group.
        lars: LARS adaptation of the first group (off: classical-momentum SGD for all).

    Returns:
        Two param-group dicts for :class:`LARS` (empty groups are dropped).
    """
    norm_params = {
        id(p) for m in model.modules() if isinstance(m, _NORM_TYPES) for p in m.parameters()
    }
    regular, excluded = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if id(p) in norm_params or name.endswith("bias") or p.ndim <= 1:
            excluded.append(p)
        else:
            regular.append(p)
    groups = [
        {"params": regular, "weight_decay": weight_decay, "lars": lars},
        {"params": excluded, "weight_decay": 0.0, "lars": False},
    ]
    return [g for g in groups if g["params"]]


class LARS(torch.optim.Optimizer):
    """SGD with classical momentum and optional LARS trust-ratio adaptation per group.

    Args:
        params: parameters or groups; a group's ``lars`` flag (default True) turns adaptation on.
        lr: learning rate (usually set every step by :class:`WarmupCosine`).
        momentum: beta in eq. 2.
        weight_decay: L2 penalty added to the gradient.
        trust_coefficient: LARS eta (0.001 in the official code).
        eps: guards the trust ratio's denominator.
        nesterov: Nesterov variant of classical momentum (used for fine-tuning).
        foreach: update a group's parameters together with ``torch._foreach_*`` kernels
            (same arithmetic as the per-parameter loop, which ``False`` selects).
    """

    def __init__(
        self,
        params: Iterable,
        lr: float,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
        nesterov: bool = False,
        foreach: bool = True,
    ):
        if lr < 0 or momentum < 0 or weight_decay < 0 or trust_coefficient <= 0:
            raise ValueError("lr, momentum and weight_decay must be >= 0, trust_coefficient > 0")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            lars=True,
            trust_coefficient=trust_coefficient,
            eps=eps,
            nesterov=nesterov,
        )
        super().__init__(params, defaults)
        self.foreach = foreach

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # type: ignore[override]
        """Apply one update: trust ratio, weight decay, then classical momentum."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            for p in params:
                if "momentum_buffer" not in self.state[p]:
                    self.state[p]["momentum_buffer"] = torch.zeros_like(p)
            same_kind = len({(p.device, p.dtype) for p in params}) == 1
            if self.foreach and same_kind:
                self._update_foreach(group, params)
            else:
                for p in params:
                    self._update_one(group, p)

    def _update_one(self, group: dict, p: torch.Tensor) -> None:
        """The update of one parameter, written out (the reference for the fused path)."""
        lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
        g = p.grad
        if wd != 0:
            g = g.add(p, alpha=wd)
        if group["lars"]:
            w_norm, g_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(p.grad)
            ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            g = g * torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        v = self.state[p]["momentum_buffer"]
        v.mul_(beta).add_(g, alpha=-lr)
        if group["nesterov"]:
            p.add_(v, alpha=beta).add_(g, alpha=-lr)
        else:
            p.add_(v)

    def _update_foreach(self, group: dict, params: list[torch.Tensor]) -> None:
        """The same update for all parameters of a group at once (a few fused kernels instead
        of about ten per parameter, which dominate a step on a GPU for small models)."""
        lr, beta, wd = group["lr"], group["momentum"], group["weight_decay"]
        grads = [p.grad for p in params]
        g = torch._foreach_add(grads, params, alpha=wd) if wd != 0 else grads
        if group["lars"]:
            w_norm = torch.stack(torch._foreach_norm(params))
            g_norm = torch.stack(torch._foreach_norm(grads))
            ratio = group["trust_coefficient"] * w_norm / (g_norm + wd * w_norm + group["eps"])
            ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
            g = torch._foreach_mul(g, list(ratio.unbind()))
        v = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_mul_(v, beta)
        torch._foreach_add_(v, g, alpha=-lr)
        if group["nesterov"]:
            torch._foreach_add_(params, v, alpha=beta)
            torch._foreach_add_(params, g, alpha=-lr)
        else:
            torch._foreach_add_(params, v)


class WarmupCosine:
    """Per-step learning rate: linear warm-up from ``start_lr`` to ``ref_lr`` over
    ``warmup_steps``, then cosine decay reaching ``final_lr`` at step ``total_steps - 1``."""

    def __init__(
        self, start_lr: float, ref_lr: float, final_lr: float, warmup_steps: int, total_steps: int
    ):
        self.start_lr, self.ref_lr, self.final_lr = start_lr, ref_lr, final_lr
        self.warmup_steps = max(0, min(warmup_steps, total_steps))
        self.total_steps = total_steps

    def __call__(self, step: int) -> float:
        """Learning rate at (0-based) ``step``."""
        if step < self.warmup_steps:
            return self.start_lr + (self.ref_lr - self.start_lr) * step / self.warmup_steps
        decay_steps = max(1, self.total_steps - 1 - self.warmup_steps)
        progress = min(1.0, (step - self.warmup_steps) / decay_steps)
        return self.final_lr + (self.ref_lr - self.final_lr) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set every param group's learning rate."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def backward_step(
    loss: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    sync: Callable[[], None] | None = None,
) -> None:
    """Zero the gradients, back-propagate ``loss`` (a scalar) and step the optimiser, through
    ``scaler`` (a ``torch.amp.GradScaler`` for fp16 autocast) when it is not None; ``sync``
    runs between the backward pass and the step (gradients averaged over processes)."""
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler is not None else loss).backward()
    if sync is not None:
        sync()
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
