"""The process a command runs in: device, threads, denormals, determinism, autocast, stop signals.

:func:`setup` changes process-wide state (torch flags, the thread count, the global seed, the
process group under torchrun), so only entry points call it: the ``paws`` command does, once,
before it calls the library. Library functions take a device (or pick one with
:func:`device_for`, which changes nothing), so a notebook that calls them keeps its settings.
"""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Iterator
from typing import Any, TypeVar

import torch

from paws import distributed
from paws.errors import UserError
from paws.progress import info

__all__ = [
    "setup",
    "thread_count",
    "usable_cores",
    "free_memory",
    "device_for",
    "amp_dtype",
    "autocast",
    "grad_scaler",
    "StopSignals",
    "until_stopped",
]

T = TypeVar("T")


def device_for(requested: str | torch.device, key: str = "run.device") -> torch.device:
    """The device ``requested`` means here, without changing any state: the one rule every
    command and library function chooses its device by.

    Args:
        requested: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a device.
        key: the setting or option that asked, named in the error.

    Returns:
        ``cuda:LOCAL_RANK`` (the process's GPU under torchrun) for ``auto`` and ``cuda``, the
        CPU, or the device given.

    Raises:
        UserError: a GPU was asked for and there is none.
    """
    if isinstance(requested, torch.device) or requested not in ("auto", "cpu", "cuda"):
        device = torch.device(requested)
        if device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"{key} is '{requested}' but no GPU is available; use auto or cpu")
        return device
    use_cuda = requested in ("auto", "cuda") and torch.cuda.is_available()
    if requested == "cuda" and not use_cuda:
        raise UserError(f"{key} is 'cuda' but no GPU is available; use auto or cpu")
    if not use_cuda:
        return torch.device("cpu")
    return torch.device(f"cuda:{distributed.local_rank()}")


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity where the OS has one), at least 1."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def free_memory(device: torch.device) -> int | None:
    """Bytes that a computation on ``device`` may still allocate, or None where that cannot be
    known: a GPU's free memory; for the CPU, the memory the OS can give without swapping
    (``MemAvailable``), within this process's control-group limit where it has one."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    if device.type != "cpu":
        return None
    free = _meminfo_available()
    limit = _cgroup_room()
    if free is None or limit is None:
        return free if limit is None else limit
    return min(free, limit)


def _meminfo_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_room() -> int | None:
    """The memory a cgroup-v2 limit leaves this process's group (None: no limit, no cgroup)."""
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit == "max":
            return None
        with open("/sys/fs/cgroup/memory.current") as f:
            return max(0, int(limit) - int(f.read().strip()))
    except (OSError, ValueError):
        return None


def thread_count(asked: int) -> int:
    """The threads to compute with for ``run.threads`` = ``asked``: at most the cores this
    process may run on, said in a line when fewer than asked (threads beyond the cores only
    wait for each other: 1024 of them on 2 cores made a run take minutes to start)."""
    cores = usable_cores()
    if asked > cores:
        info(f"run.threads is {asked} but this process has {cores} cores: using {cores}")
        return cores
    return asked


def setup(cfg: Any) -> torch.device:
    """Set the process up for ``cfg`` (a :class:`paws.config.Config`); returns the device.

    Joins torchrun's process group, sets the thread count (``run.threads``), flushes denormal
    floats, switches deterministic algorithms on for ``run.deterministic``, chooses the GPU's
    matrix-product precision and seeds torch's global generator with ``run.seed``.
    """
    device = device_for(cfg.run.device)
    distributed.init(device)
    if cfg.run.threads:
        torch.set_num_threads(thread_count(cfg.run.threads))
    # Denormal floats made small-loss CPU steps 10x slower; flushing them costs nothing.
    torch.set_flush_denormal(True)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.run.deterministic
        # TF32 convolutions in the encoder, but float32 matrix products: the loss compares
        # embeddings by cosine / tau in float32, and TF32's 10-bit mantissa would round them.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.run.seed)
    return device


def amp_dtype(cfg: Any, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of the forward pass (``run.amp`` on a GPU), or None for fp32."""
    if device.type != "cuda" or cfg.run.amp == "off":
        return None
    if cfg.run.amp == "fp16":
        return torch.float16
    if cfg.run.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device_type: str, dtype: torch.dtype | None) -> Any:
    """Autocast context for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def grad_scaler(dtype: torch.dtype | None) -> torch.amp.GradScaler | None:
    """A gradient scaler for fp16 autocast, None otherwise."""
    return torch.amp.GradScaler("cuda") if dtype == torch.float16 else None


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag (``signum``) that a loop checks between steps; a
    second signal stops at once (KeyboardInterrupt). Handlers are restored on exit."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.old: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum  # reported by the loop: printing here could re-enter print

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)


def until_stopped(items: Iterator[T], stop: StopSignals) -> Iterator[T]:
    """The items, ending early if fetching one fails after a stop signal: data-loader workers
    get a process group's SIGTERM too, and stop."""
    while True:
        try:
            item = next(items)
        except StopIteration:
            return
        except Exception:
            if stop.signum is None:
                raise
            return
        yield item
