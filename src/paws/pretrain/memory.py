"""Whether a training step fits in memory, known before anything is allocated.

A setting such as ``support.images_per_class=1000000`` or ``model.proj_out=65536`` used to end
minutes into a run in the allocator's message ("you tried to allocate 55296147456 bytes"),
naming no setting. :func:`check_step_fits` estimates what one step needs, from the
architecture on torch's ``meta`` device (shapes without storage: no memory, no computation)
and the number of views a step embeds, and refuses in one line that names the setting that
takes the most when that exceeds the memory free on the device.

The estimate is a floor, so that a run that fits is never refused: the parameters with their
gradients and optimiser state, and the output of every layer once for each image (what
autograd keeps for the backward pass); workspace, the allocator's rounding and the data in
memory come on top.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from paws import distributed, runtime
from paws.config import Config
from paws.errors import UserError
from paws.models.networks import Architecture, build_network

__all__ = ["StepMemory", "step_memory", "check_step_fits"]

GB = 1024**3


@dataclass
class StepMemory:
    """What one training step holds, in bytes, on one process.

    Attributes:
        parameters: the weights, their gradients and the optimiser's state.
        supports: activations of the support views.
        views: activations of the unlabelled images' large and small views.
        support_views: support views embedded a step (classes x images x views).
        unlabeled_views: views of unlabelled images embedded a step.
        parameter_count: the model's parameters.
    """

    parameters: int
    supports: int
    views: int
    support_views: int
    unlabeled_views: int
    parameter_count: int

    @property
    def total(self) -> int:
        """All of it."""
        return self.parameters + self.supports + self.views


def _per_image_activations(model: nn.Module, channels: int, size: int) -> int:
    """Elements of every leaf module's output for one image of side ``size`` (meta tensors),
    each tensor once (an in-place ReLU returns its input)."""
    seen: dict[int, torch.Tensor] = {}  # held, so that no id is reused during the forward

    def count(_m: nn.Module, _inputs: object, output: object) -> None:
        outputs = output if isinstance(output, (tuple, list)) else (output,)
        seen.update((id(o), o) for o in outputs if isinstance(o, torch.Tensor))

    leaves = [m for m in model.modules() if not list(m.children())]
    hooks = [m.register_forward_hook(count) for m in leaves]
    model.eval()  # batch norm on one image
    try:
        with torch.no_grad():
            model([torch.zeros(1, channels, size, size, device="meta")])
    finally:
        for h in hooks:
            h.remove()
    return sum(o.numel() for o in seen.values())


def step_memory(cfg: Config, arch: Architecture, device: torch.device) -> StepMemory | None:
    """The memory one step of ``cfg``'s training holds on each process (a floor), or None when
    the network cannot be traced on the meta device (some timm models read values while they
    are built).

    Args:
        cfg: the run's config, its data-dependent defaults filled in (``support.classes``).
        arch: the network trained.
        device: where it trains (for the element size of mixed precision).
    """
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = build_network(arch)
        count = sum(p.numel() for p in model.parameters())
        large = _per_image_activations(model, arch.in_channels, cfg.views.large_size)
        small = _per_image_activations(model, arch.in_channels, cfg.views.small_size)
    except Exception:  # noqa: BLE001 - an estimate that cannot be made checks nothing
        return None
    dtype = runtime.amp_dtype(cfg, device)
    element = torch.finfo(dtype).bits // 8 if dtype is not None else 4
    world = distributed.get_world_size()
    s, o = cfg.support, cfg.optim
    support_views = -(-(s.classes or 0) * s.images_per_class * s.views // world)
    batch = -(-o.batch_size // world)
    states = 2 if o.name == "adamw" else 1  # AdamW's two moments, LARS's momentum
    return StepMemory(
        parameters=count * 4 * (2 + states),
        supports=support_views * large * element,
        views=batch * (2 * large + cfg.views.small_crops * small) * element,
        support_views=support_views,
        unlabeled_views=batch * (2 + cfg.views.small_crops),
        parameter_count=count,
    )


def check_step_fits(cfg: Config, arch: Architecture, device: torch.device) -> None:
    """Refuse, before any allocation, a run whose training step cannot fit in the memory free
    on ``device`` (nothing is checked where that or the estimate is unknown).

    Raises:
        UserError: naming the memory needed and free, and the setting that takes the most.
    """
    free = runtime.free_memory(device)
    need = step_memory(cfg, arch, device) if free is not None else None
    if need is None or free is None or need.total <= free:
        return
    s, o = cfg.support, cfg.optim
    if need.supports >= max(need.views, need.parameters):
        what = (
            f"{need.support_views:,} support views a step (support.classes {s.classes} x "
            f"support.images_per_class {s.images_per_class} x support.views {s.views})"
        )
        fix = "lower support.images_per_class or support.classes"
    elif need.views >= need.parameters:
        what = (
            f"{need.unlabeled_views:,} views of unlabelled images a step (optim.batch_size "
            f"{o.batch_size} x {2 + cfg.views.small_crops} views)"
        )
        fix = "lower optim.batch_size or views.small_crops"
    else:
        what = f"a model of {need.parameter_count:,} parameters with their gradients and state"
        fix = "choose a smaller model.encoder, model.width, model.proj_hidden or model.proj_out"
    raise UserError(
        f"a training step needs at least {need.total / GB:.1f} GB for {what}, but "
        f"{free / GB:.1f} GB are free on {device.type}; {fix}"
    )
