"""A training run's directory: metric logs, checkpoint contents and what a resume may change.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (a row every
``run.log_every`` steps), ``evals.csv`` (PAWS-NN during training), ``last.pt`` (the latest
checkpoint), ``final.pt``, ``eval.json`` and ``predictions.json`` (the final evaluation).
Only rank 0 writes.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import torch

from paws import checkpoint, distributed
from paws.config import Config
from paws.data import Datasets
from paws.errors import UserError
from paws.models import PAWSModel
from paws.optim import LARS

__all__ = [
    "RESUME_SAFE_KEYS",
    "shape_diff",
    "MetricsLog",
    "truncate_rows",
    "training_state",
    "finite",
    "diverged",
]

# Keys that may differ when resuming: they change neither the model nor the batches.
RESUME_SAFE_KEYS = (
    "run.log_every",
    "run.checkpoint_every",
    "run.eval_every",
    "run.monitor_every",
    "run.tensorboard",
    "run.threads",
    "data.root",
    "data.workers",
    "data.memory_limit_gb",
    "data.labeled",
    "data.unlabeled",
    "data.test",
    "eval.",
    "baseline.",
    "finetune.",
    "tighten.",
)


class MetricsLog:
    """Appends rows to a CSV file (and TensorBoard when asked), rank 0 only."""

    def __init__(
        self,
        path: Path,
        tensorboard_dir: Path | None = None,
        writer: Any = None,
        tag: str = "",
    ):
        self.path, self.writer, self.tag = path, writer, tag
        self.fields: list[str] | None = None
        if path.is_file() and distributed.is_main():
            with open(path, newline="") as f:
                self.fields = next(csv.reader(f), None)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError(
                    "run.tensorboard is true but tensorboard is not installed: "
                    "pip install 'paws-ssl[tensorboard]'"
                ) from e
            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.fields])
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(self.tag + k, v, row["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def shape_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Keys (with old and new values) where ``current`` changes the run ``saved`` describes;
    keys in :data:`RESUME_SAFE_KEYS` may differ."""
    keys = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += shape_diff(a, b, f"{prefix}{k}.")
        elif a != b and not any((prefix + k).startswith(s) for s in RESUME_SAFE_KEYS):
            keys.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return keys


def finite(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> bool:
    """Whether every weight, buffer and optimiser state tensor is finite (checked before a
    checkpoint, so that a checkpoint named as good is good)."""
    tensors = [*model.state_dict().values()]
    tensors += [v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)]
    return all(bool(torch.isfinite(t).all()) for t in tensors if t.is_floating_point())


def truncate_rows(path: Path, last_step: int) -> None:
    """Drop CSV rows logged after ``last_step`` (steps a crashed run did after its checkpoint)."""
    if not path.is_file():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    keep = rows[:1] + [r for r in rows[1:] if r and r[0].isdigit() and int(r[0]) <= last_step]
    if len(keep) != len(rows):
        with open(path, "w", newline="") as f:
            csv.writer(f).writerows(keep)


def training_state(
    model: PAWSModel,
    optimizer: LARS,
    scaler: Any,
    step: int,
    cfg: Config,
    steps_per_epoch: int,
    data: Datasets,
) -> dict[str, Any]:
    """Everything a resumed run needs, as tensors and plain values (see paws.checkpoint)."""
    return checkpoint.model_record(
        "pretrain",
        model,
        cfg,
        data,
        step,
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        epoch=step / steps_per_epoch,
        rng=checkpoint.rng_state(),
    )


def diverged(what: str, last_good: tuple[Path, int] | None) -> UserError:
    """The one-line error of a run whose loss or weights stopped being finite."""
    where = (
        f"the last good checkpoint is {last_good[0]} (step {last_good[1]})"
        if last_good
        else "no checkpoint was written before it"
    )
    return UserError(f"{what}; {where}; lower optim.ref_lr or check the data")
