"""Process-group plumbing, kept at the edges: every function is a no-op in a single process.

Launch with ``torchrun`` (gloo on CPU, NCCL on GPU). Gradient conventions: data-parallel
training averages parameter gradients over ranks, so the collective operations below pass back
the *sum* of all ranks' upstream gradients; divided by the world size in the averaging, that is
the exact gradient of the mean loss over ranks.
"""

from __future__ import annotations

import datetime
import inspect
import os
from typing import Any

import torch
import torch.distributed as dist

from paws.errors import UserError

__all__ = [
    "init",
    "local_rank",
    "is_initialized",
    "get_rank",
    "get_world_size",
    "is_main",
    "barrier",
    "all_gather",
    "gather_rows",
    "gather_views",
    "all_reduce_sum",
    "all_reduce_mean",
    "broadcast_object",
    "any_true",
    "convert_batchnorm",
    "check_plain_batchnorm",
    "data_parallel",
    "average_gradients",
    "local_batchnorm",
    "GlobalBatchNorm",
    "destroy",
    "lost_peer",
]


_HOST_GROUP: Any = None  # a gloo group for host-side flags when the main group is NCCL


def is_initialized() -> bool:
    """Whether a process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, which alone writes checkpoints, logs and reports."""
    return get_rank() == 0


def local_rank() -> int:
    """This process's position on its machine (torchrun's ``LOCAL_RANK``; 0 alone)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def init(here: torch.device) -> torch.device:
    """Join the process group described by torchrun's environment, if any.

    Args:
        here: the device this process computes on (:func:`paws.runtime.device_for`): NCCL
            between GPUs, gloo between CPUs.

    Returns:
        ``here``.
    """
    global _HOST_GROUP
    use_cuda = here.type == "cuda"
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if use_cuda:
        torch.cuda.set_device(here)
    if world_size > 1 and not dist.is_initialized():
        options: dict[str, Any] = {}
        if use_cuda and "device_id" in inspect.signature(dist.init_process_group).parameters:
            # Bind the NCCL group to this GPU, so barriers and object broadcasts use it.
            options["device_id"] = here
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            timeout=datetime.timedelta(minutes=30),
            **options,
        )
        if use_cuda:
            _HOST_GROUP = dist.new_group(backend="gloo")
    return here


def lost_peer(e: BaseException) -> bool:
    """Whether ``e`` is a collective that failed because another process of the group stopped
    (gloo's "Connection reset by peer" or "closed", NCCL's errors, a timeout)."""
    if not is_initialized() or get_world_size() == 1:
        return False
    dist_error = getattr(torch.distributed, "DistError", ())
    text = str(e)
    said = any(w in text for w in ("gloo", "NCCL", "Connection", "peer", "timed out"))
    return isinstance(e, dist_error) or (isinstance(e, RuntimeError) and said)


def destroy() -> None:
    """Leave the process group (no-op without one)."""
    global _HOST_GROUP
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _HOST_GROUP = None


def barrier() -> None:
    """Wait for every process (no-op in one process)."""
    if is_initialized():
        dist.barrier()


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(dist.get_world_size())[dist.get_rank()]


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        x = x.clone().contiguous()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone().contiguous()
        dist.all_reduce(grad)
        return grad


def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Concatenate every rank's ``x`` along dim 0, in rank order, passing gradients back.

    Args:
        x: (N, ...) with the same shape on every rank.

    Returns:
        (W*N, ...); the backward hands each rank the summed gradient of its own rows.
    """
    return _AllGather.apply(x) if is_initialized() else x


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of ``x`` in rank order, where ranks may hold different numbers of rows
    (a set split by :func:`numpy.array_split`); no gradient is passed.

    Args:
        x: (N_r, ...) this rank's rows; the trailing dimensions are the same on every rank.

    Returns:
        (sum of N_r, ...), identical on every rank; ``x`` itself in one process.
    """
    if not is_initialized():
        return x
    sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(x)], device=x.device))
    most = int(max(sizes).item())
    padded = torch.zeros((most, *x.shape[1:]), dtype=x.dtype, device=x.device)
    padded[: len(x)] = x.detach()
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n.item())] for part, n in zip(parts, sizes)])


def gather_views(x: torch.Tensor, views: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole batch of every rank, view by view, and where this rank's images are in it.

    Args:
        x: (views * B, D) this rank's rows, ``[view 1; view 2; ...]`` (no gradient is passed).

    Returns:
        ``(whole (views, W * B, D), rows (B,))``: view v of every rank's images, rank by rank,
        and the positions of this rank's images in each view.
    """
    b = x.shape[0] // views
    whole = all_gather(x.detach())  # (W * views * B, D), rank by rank
    w = whole.shape[0] // (views * b)
    whole = whole.view(w, views, b, -1).transpose(0, 1).reshape(views, w * b, -1)
    rows = torch.arange(b, device=x.device) + get_rank() * b
    return whole, rows


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Differentiable sum over ranks (identity in one process)."""
    return _AllReduceSum.apply(x) if is_initialized() else x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over ranks (identity in one process)."""
    return all_reduce_sum(x) / get_world_size() if is_initialized() else x


def any_true(flag: bool) -> bool:
    """Whether ``flag`` is true on any rank, so that every rank takes the same branch (e.g. to
    stop after a signal that reached only some processes). ``flag`` itself in one process."""
    if not is_initialized():
        return flag
    # On the host (gloo), so that asking does not wait for the GPUs.
    t = torch.tensor([1.0 if flag else 0.0])
    dist.all_reduce(t, group=_HOST_GROUP)
    return bool(t.item() > 0)


def broadcast_object(obj: Any) -> Any:
    """Send a picklable object from rank 0 to every rank (identity in one process)."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class GlobalBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Batch norm whose training statistics span every rank (any backend, CPU included).

    PyTorch's SyncBatchNorm runs on GPUs only; this one uses the differentiable all-reduce above,
    so a gloo run on CPU normalises exactly as one process holding the global batch would. In one
    process it is plain batch norm.
    """

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not (self.training and is_initialized()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))
        shape = [1, -1] + [1] * (x.dim() - 2)
        # One all-reduce for the sums and the row count (the count carries no gradient).
        sums = all_reduce_sum(torch.cat([x.sum(dim=dims), x.new_tensor([x.numel() / x.shape[1]])]))
        count = sums[-1].detach()
        mean = sums[:-1] / count
        var = all_reduce_sum(((x - mean.view(shape)) ** 2).sum(dim=dims)) / count
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                # momentum None: cumulative average, as torch's batch norm does.
                n = float(self.num_batches_tracked)
                m = self.momentum if self.momentum is not None else 1.0 / n
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.mul_(1 - m).add_(m * mean)
                self.running_var.mul_(1 - m).add_(m * unbiased)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def average_gradients(params: Any) -> None:
    """Replace each parameter's gradient by its mean over ranks, in one all-reduce (a no-op in
    one process): the step of a loss averaged over equal shares of a global batch. For loops
    that call the network more than once before a backward pass, which
    DistributedDataParallel's hooks do not allow."""
    if not is_initialized():
        return
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def local_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` with every global batch norm (:func:`convert_batchnorm`) made plain again, for
    a copy that one rank trains alone while the others wait: a global one would wait for them.
    The weights and running statistics are kept."""
    out = module
    if isinstance(module, (GlobalBatchNorm, torch.nn.SyncBatchNorm)):
        out = _rebuilt_bn(module, _AnyBatchNorm)
    for name, child in module.named_children():
        out.add_module(name, local_batchnorm(child))
    return out


class _AnyBatchNorm(torch.nn.modules.batchnorm._BatchNorm):
    """Plain batch norm over inputs of any rank (a global one's layers held 1-D or 2-D)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-D input, got {x.dim()}-D")


def _rebuilt_bn(module: torch.nn.Module, kind: type) -> torch.nn.Module:
    """A batch norm of class ``kind`` with ``module``'s settings, state and mode."""
    like = next(iter(module.parameters()), module.running_mean)
    out = kind(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        device=like.device if like is not None else None,
        dtype=like.dtype if like is not None else None,
    )
    out.load_state_dict(module.state_dict())
    out.train(module.training)
    return out


def convert_batchnorm(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Make every batch-norm layer global across ranks (the paper's "global batch norm").

    Uses ``torch.nn.SyncBatchNorm`` on CUDA and :class:`GlobalBatchNorm` elsewhere. Returns the
    module unchanged in a single process.
    """
    if not is_initialized():
        return module
    check_plain_batchnorm(module)
    if device.type == "cuda":
        return torch.nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _swap_bn(module)


def check_plain_batchnorm(module: torch.nn.Module) -> None:
    """A one-line error if a batch-norm layer holds more than a batch norm (timm's
    ``BatchNormAct2d``, with its activation inside): converting it to a global batch norm would
    silently drop what it holds."""
    for m in module.modules():
        held = [c for c in m.children() if not isinstance(c, torch.nn.Identity)]
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and held:
            raise UserError(
                f"run.sync_bn cannot make {type(m).__name__} layers global (they hold an "
                "activation too): set run.sync_bn=false for this encoder"
            )


def data_parallel(
    model: torch.nn.Module, device: torch.device, compile: bool = False
) -> torch.nn.Module:
    """The module a training step calls: ``model`` wrapped for data parallelism and compiled.

    Under several processes: DistributedDataParallel, which averages parameter gradients over
    ranks during the backward pass (buffers such as batch-norm statistics are not broadcast: they
    are global already, see :func:`convert_batchnorm`). With ``compile``: ``torch.compile`` of
    the (wrapped) module, so DDP's graph splitting overlaps communication with the backward.
    Parameters stay shared with ``model``, which remains the module to checkpoint and evaluate.
    """
    net = model
    if is_initialized():
        ddp = torch.nn.parallel.DistributedDataParallel
        # Newer PyTorch renames broadcast_buffers; syncing once at start is harmless here.
        if "forward_sync_buffers" in inspect.signature(ddp).parameters:
            no_sync: dict[str, bool] = {"forward_sync_buffers": False}
        else:
            no_sync = {"broadcast_buffers": False}
        net = ddp(model, device_ids=[device.index] if device.type == "cuda" else None, **no_sync)
    if compile:
        net = torch.compile(net)
    return net


def _swap_bn(module: torch.nn.Module) -> torch.nn.Module:
    out = module
    if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and not isinstance(
        module, GlobalBatchNorm
    ):
        out = _rebuilt_bn(module, GlobalBatchNorm)
    for name, child in module.named_children():
        out.add_module(name, _swap_bn(child))
    return out
