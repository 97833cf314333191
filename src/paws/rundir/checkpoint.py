"""Checkpoint storage: written atomically, read without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values. It is written to a temporary file in
the same folder, flushed and fsynced, then renamed over the old one, so a crash or a full disk
mid-write leaves the previous checkpoint intact. Reading uses ``torch.load(weights_only=True)``,
which refuses pickled code.
"""

from __future__ import annotations

import random
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paws.config import from_dict, to_dict
from paws.errors import UserError, first_line
from paws.files import reason, write_with

__all__ = [
    "save",
    "load",
    "check_structure",
    "remove_partial_writes",
    "rng_state",
    "set_rng_state",
    "model_record",
    "finite",
    "diverged",
    "FORMAT_VERSION",
    "KINDS",
    "CLASSIFIERS",
]

FORMAT_VERSION = 1

# What a checkpoint's model is: a PAWS model (pre-trained, or tightened: Appendix C), or a
# classifier (fine-tuned: Appendix A; or a student distilled from a PAWS teacher).
KINDS = ("pretrain", "tighten", "finetune", "distill")
CLASSIFIERS = ("finetune", "distill")


def save(state: dict[str, Any], path: str | Path) -> None:
    """Write ``state`` to ``path`` atomically (:func:`paws.files.write_with`).

    Raises:
        UserError: when the write fails (e.g. the disk is full); the old file is untouched.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"could not write checkpoint {path}: {reason(e)}") from e
    write_with(path, lambda f: torch.save(state, f), "checkpoint")


def remove_partial_writes(folder: str | Path) -> list[Path]:
    """Delete the temporary files of writes a killed process left in ``folder``.

    Returns:
        The files removed.
    """
    removed = []
    for p in Path(folder).glob(".*.pt.*.tmp"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


def load(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint file with ``weights_only=True`` (for the model a run directory means,
    see :func:`paws.rundir.model_file`).

    Raises:
        UserError: if the file is missing, corrupt, or holds anything but tensors and plain
            values (e.g. a file crafted to run code when unpickled).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with warnings.catch_warnings():  # e.g. about the pickle protocol: the error says it
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure means an unusable file
        first = first_line(e)
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            first = "it holds objects other than tensors and plain values, refused for safety"
        raise UserError(f"cannot load checkpoint {path}: {first}") from e
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise UserError(f"{path} is not a paws checkpoint")
    check_structure(state, path)
    return state


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and all(
        isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x) for x in v
    )


def _weights(v: Any) -> bool:
    return isinstance(v, dict) and all(torch.is_tensor(t) for t in v.values())


def _rng(v: Any) -> bool:
    """The random states :func:`rng_state` writes, of the types :func:`set_rng_state` needs."""
    if not isinstance(v, dict):
        return False
    kinds = {
        "python": lambda x: isinstance(x, list) and all(map(_is_int, x)),
        "python_version": _is_int,
        "python_gauss": lambda x: x is None or isinstance(x, float),
        "numpy": lambda x: torch.is_tensor(x) and x.dim() == 1 and x.numel() == 624,
        "numpy_pos": _is_int,
        "numpy_gauss": lambda x: isinstance(x, (list, tuple)) and len(x) == 2,
        "torch": lambda x: torch.is_tensor(x) and x.dtype == torch.uint8,
    }
    return all(k in v and ok(v[k]) for k, ok in kinds.items())


# What each top-level entry of a checkpoint must be (entries a kind does not write may be
# absent), with the words that say it.
_ENTRIES: dict[str, tuple[Any, str]] = {
    "format": (_is_int, "a whole number"),
    "kind": (lambda v: v in KINDS, ", ".join(KINDS[:-1]) + " or " + KINDS[-1]),
    "model": (_weights, "a mapping of parameter names to tensors"),
    "architecture": (lambda v: v is None or isinstance(v, dict), "a mapping"),
    "step": (lambda v: v is None or (_is_int(v) and v >= 0), "a step number"),
    "config": (lambda v: isinstance(v, dict), "a mapping of config sections"),
    "channels": (lambda v: v is None or (_is_int(v) and v in (1, 3)), "1 or 3"),
    "classes": (lambda v: isinstance(v, (list, tuple)), "a list of class names"),
    "mean": (_numbers, "a list of numbers"),
    "std": (lambda v: _numbers(v) and all(x > 0 for x in v), "a list of positive numbers"),
    "optimizer": (
        lambda v: isinstance(v, dict) and isinstance(v.get("param_groups"), list),
        "an optimiser state",
    ),
    "scaler": (lambda v: v is None or isinstance(v, dict), "a gradient scaler state"),
    "epoch": (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool), "a number"),
    "rng": (_rng, "the random states of Python, NumPy and torch"),
    "prior": (
        lambda v: (
            v is None
            or (isinstance(v, dict) and all(x is None or torch.is_tensor(x) for x in v.values()))
        ),
        "a mapping of tensors",
    ),
}


def check_structure(state: dict[str, Any], path: str | Path) -> None:
    """Check every top-level entry of a loaded checkpoint (:data:`_ENTRIES`), and its config,
    so that what uses it can trust its types.

    Raises:
        UserError: naming the file and the first entry of the wrong type, or a newer format.
    """
    for key, (ok, words) in _ENTRIES.items():
        if key in state and not ok(state[key]):
            got = state[key]
            shown = type(got).__name__ if isinstance(got, (dict, list, tuple)) else repr(got)
            raise UserError(
                f"{path} is damaged: its '{key}' must be {words}, got {shown[:60]}; use "
                "another checkpoint (a run directory keeps last.pt and final.pt)"
            )
    if state.get("format", FORMAT_VERSION) > FORMAT_VERSION:
        raise UserError(f"{path} was written by a newer paws (format {state['format']}); upgrade")
    try:
        from_dict(state["config"])
    except UserError as e:
        raise UserError(f"{path} holds a config this paws cannot use: {e}") from e


def model_record(
    kind: str,
    model: torch.nn.Module,
    architecture: dict[str, Any],
    cfg: Any,
    data: Any,
    step: int | None,
    **extra: Any,
) -> dict[str, Any]:
    """What every checkpoint holds: the weights and what is needed to use them.

    Args:
        kind: one of :data:`KINDS`.
        model: the model whose ``state_dict`` is saved (moved to the CPU).
        architecture: the network's :class:`paws.models.Architecture` as plain values.
        cfg: the run's :class:`paws.config.Config`.
        data: the datasets (:class:`paws.data.Datasets`): channels, class names, mean and std.
        step: the pre-training step the weights come from.
        **extra: further entries (the optimiser state of a resumable run, a fine-tuning report).

    Returns:
        A dict of tensors and plain values for :func:`save`.
    """
    return {
        "format": FORMAT_VERSION,
        "kind": kind,
        "model": {k: v.cpu() for k, v in model.state_dict().items()},
        "architecture": architecture,
        "step": step,
        "config": to_dict(cfg),
        "channels": data.channels,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        **extra,
    }


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states, as tensors and plain values."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "python_gauss": random.getstate()[2],
        "numpy": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_gauss": [int(np_state[3]), float(np_state[4])],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` saved."""
    random.setstate((state["python_version"], tuple(state["python"]), state["python_gauss"]))
    np.random.set_state(
        (
            "MT19937",
            state["numpy"].numpy().astype(np.uint32),
            state["numpy_pos"],
            state["numpy_gauss"][0],
            state["numpy_gauss"][1],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every weight, buffer and optimiser state tensor is finite (checked before a
    checkpoint, so that a checkpoint named as good is good)."""
    tensors = [*model.state_dict().values()]
    tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def diverged(
    what: str, last_good: tuple[Path, int] | None, fix: str = "lower optim.ref_lr or check the data"
) -> UserError:
    """The one-line error of a run whose loss or weights stopped being finite: what happened,
    the last good checkpoint, and ``fix`` (the setting to change)."""
    where = (
        f"the last good checkpoint is {last_good[0]} (step {last_good[1]})"
        if last_good
        else "no checkpoint was written before it"
    )
    return UserError(f"{what}; {where}; {fix}")
