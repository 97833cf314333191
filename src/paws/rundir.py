"""A run directory: its files, its metric columns, what a resume may change, and reading it back.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (a row every
``run.log_every`` steps, columns :data:`METRIC_COLUMNS`), ``evals.csv`` (PAWS-NN during
training), ``last.pt`` (the latest checkpoint), ``final.pt``, ``eval.json`` and
``predictions.json`` (the final evaluation), and, when the run ended by tightening,
``tighten.pt`` and ``tighten.json``; when it started from another run's weights (``paws train
--init``), ``init.json`` (that run and checkpoint); with experiment trackers,
``trackers.json`` (their runs, see :mod:`paws.tracking`) and their local stores. Later commands
add ``baseline.json``, ``finetune.pt`` and ``finetune.json``. Only rank 0 writes.

Which model a run directory means is decided here alone (:func:`model_file`), and so is the one
way to rebuild a saved model (:func:`restore`).
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from paws import checkpoint, distributed
from paws.config import Config, apply_overrides, from_dict, load_config, read_yaml
from paws.errors import UserError
from paws.files import write_atomic
from paws.models import Architecture, build_network, load_weights
from paws.models.networks import input_channels

if TYPE_CHECKING:
    from paws.data import Datasets

__all__ = [
    "CONFIG",
    "METRICS",
    "EVALS",
    "TRACKERS",
    "INIT",
    "LAST",
    "FINAL",
    "TIGHTENED",
    "FINETUNED",
    "METRIC_COLUMNS",
    "MONITOR_COLUMNS",
    "EVAL_COLUMNS",
    "RESUME_SAFE_KEYS",
    "metrics_row",
    "MetricsLog",
    "shape_diff",
    "truncate_rows",
    "finite",
    "diverged",
    "training_state",
    "write_json",
    "read_json",
    "write_results",
    "output_dir",
    "model_file",
    "checkpoint_config",
    "resume_config",
    "Restored",
    "restore",
    "restore_model",
    "RunRecord",
    "load_run",
]

CONFIG, METRICS, EVALS = "config.yaml", "metrics.csv", "evals.csv"
TRACKERS = "trackers.json"
INIT = "init.json"  # where a run started with paws train --init took its weights from
LAST, FINAL, TIGHTENED, FINETUNED = "last.pt", "final.pt", "tighten.pt", "finetune.pt"

# The monitor-only metrics of the paper's Fig. 4 (every run.monitor_every steps).
MONITOR_COLUMNS = ("target_confidence", "instance_loss", "support_loss", "mean_entropy")
# metrics.csv, in this order.
METRIC_COLUMNS = (
    "step",
    "epoch",
    "loss",
    "cross_entropy",
    "me_max",
    "lr",
    "images_per_s",
    "data_wait",
    *MONITOR_COLUMNS,
)
EVAL_COLUMNS = ("step", "top1", "top5")

# Keys that may differ when resuming: they change neither the model nor the batches.
RESUME_SAFE_KEYS = (
    "run.log_every",
    "run.checkpoint_every",
    "run.eval_every",
    "run.monitor_every",
    "run.tensorboard",
    "run.trackers",
    "run.experiment",
    "run.threads",
    "data.root",
    "data.workers",
    "data.memory_limit_gb",
    "data.max_image_pixels",
    "data.labeled",
    "data.unlabeled",
    "data.test",
    "eval.",
    "baseline.",
    "finetune.",
    "tighten.",
)


# --------------------------------------------------------------------------------------------
# Writing a run.


def metrics_row(values: dict[str, Any]) -> dict[str, Any]:
    """A metrics.csv row: every column of :data:`METRIC_COLUMNS`, empty where not measured.

    Raises:
        ValueError: for a value that has no column (a metric spelt differently from here).
    """
    unknown = sorted(set(values) - set(METRIC_COLUMNS))
    if unknown:
        raise ValueError(f"no metrics.csv column for {unknown}")
    return {k: values.get(k, "") for k in METRIC_COLUMNS}


class MetricsLog:
    """Appends rows to a CSV file, rank 0 only, and hands each row's numbers to ``tracker``
    (anything with ``log_metrics(values, step, prefix)``, e.g. a
    :class:`paws.tracking.Tracking`), named ``prefix + column``."""

    def __init__(self, path: Path, tracker: Any = None, prefix: str = ""):
        self.path, self.tracker, self.prefix = path, tracker, prefix
        self.fields: list[str] | None = None
        if path.is_file() and distributed.is_main():
            with open(path, newline="") as f:
                self.fields = next(csv.reader(f), None)

    def log(self, row: dict[str, Any]) -> None:
        """Append ``row`` (the first row written fixes the columns)."""
        if not distributed.is_main():
            return
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.fields])
        if self.tracker is not None:
            values = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            self.tracker.log_metrics(values, int(row["step"]), self.prefix)


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
        text = io.StringIO(newline="")
        csv.writer(text).writerows(keep)
        write_atomic(path, text.getvalue())


def training_state(
    model: torch.nn.Module,
    arch: Architecture,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    step: int,
    cfg: Config,
    steps_per_epoch: int,
    data: Datasets,
    **extra: Any,
) -> dict[str, Any]:
    """Everything a resumed run needs, as tensors and plain values (see paws.checkpoint);
    ``extra`` adds further training state (e.g. the ME-MAX prior's estimate)."""
    return checkpoint.model_record(
        "pretrain",
        model,
        arch.to_dict(),
        cfg,
        data,
        step,
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        epoch=step / steps_per_epoch,
        rng=checkpoint.rng_state(),
        **extra,
    )


def diverged(what: str, last_good: tuple[Path, int] | None) -> UserError:
    """The one-line error of a run whose loss or weights stopped being finite."""
    where = (
        f"the last good checkpoint is {last_good[0]} (step {last_good[1]})"
        if last_good
        else "no checkpoint was written before it"
    )
    return UserError(f"{what}; {where}; lower optim.ref_lr or check the data")


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as a JSON file (one line per value with ``indent``), atomically."""
    write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_results(out: Path, summary: dict[str, Any], ev: dict[str, Any], classes: list) -> None:
    """The final evaluation's files: ``eval.json`` (``summary``) and ``predictions.json`` (the
    test set's labels, predictions and confusion matrix from ``ev``, a
    :func:`paws.evaluate.paws_nn` result)."""
    write_json(out / "eval.json", summary)
    predictions = {k: ev[k] for k in ("labels", "predictions", "confusion")}
    write_json(out / "predictions.json", {"classes": list(classes), **predictions}, indent=None)


# --------------------------------------------------------------------------------------------
# Which model a path means, and rebuilding it.


def output_dir(path: str | Path) -> Path:
    """Where results about a checkpoint go by default: its run directory."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def model_file(path: str | Path, pretrained: bool = False) -> Path:
    """The checkpoint file that ``path`` names: a file as it is; for a run directory, its final
    model, ``tighten.pt`` when the run ended by tightening (``tighten.after_training``), else
    ``last.pt``; with ``pretrained``, always ``last.pt`` (what fine-tuning starts from)."""
    path = Path(path)
    if not path.is_dir():
        return path
    if not pretrained and (path / TIGHTENED).is_file():
        return path / TIGHTENED
    return path / LAST


@dataclass
class Restored:
    """A saved model rebuilt: its config, network, architecture and checkpoint.

    Attributes:
        cfg: the run's config with the overrides applied.
        net: a :class:`paws.models.PAWSModel` (kinds pretrain, tighten) or
            :class:`paws.models.Classifier` (finetune), on the CPU in eval mode.
        arch: its architecture.
        state: the checkpoint dict.
        path: the checkpoint file.
    """

    cfg: Config
    net: torch.nn.Module
    arch: Architecture
    state: dict[str, Any]
    path: Path

    @property
    def kind(self) -> str:
        """``"pretrain"``, ``"tighten"`` or ``"finetune"``."""
        return str(self.state.get("kind") or "pretrain")

    def pretrained(self) -> Restored:
        """Self, or a one-line error if this is a fine-tuned classifier (which has no PAWS
        embedding to tighten, fine-tune or classify by soft nearest neighbours)."""
        if self.kind == "finetune":
            raise UserError(
                f"{self.path} is a fine-tuned classifier, not a pre-trained model; apply it "
                "with paws predict, or pass the pre-trained checkpoint"
            )
        return self


def resume_config(
    run_dir: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """The config a resumed run continues with: ``config`` (a file or recipe name) when given,
    else the run's own ``config.yaml``, with ``overrides`` applied.

    Raises:
        UserError: no run directory, or a ``config.yaml`` that is empty or unreadable:
            resuming with the defaults in its place would silently train another run.
    """
    run = Path(run_dir)
    file = run / CONFIG
    if config is None:
        if not file.is_file():
            raise UserError(f"{run} is not a run directory (no {CONFIG})")
        try:
            values = read_yaml(file)
        except UserError as e:
            raise UserError(f"cannot resume {run}: {e}; give the run's config with --config") from e
        if not values:
            raise UserError(
                f"cannot resume {run}: its {CONFIG} is empty (a write that did not finish?); "
                "give the run's config with --config FILE"
            )
        return from_dict(apply_overrides(values, list(overrides or [])))
    return load_config(config, overrides)


def checkpoint_config(
    path: str | Path, overrides: list[str] | None = None, pretrained: bool = False
) -> Config:
    """The config saved in the checkpoint ``path`` names (:func:`model_file`), with
    ``overrides`` applied."""
    state = checkpoint.load(model_file(path, pretrained))
    return from_dict(apply_overrides(state["config"], list(overrides or [])))


def restore(
    path: str | Path, overrides: list[str] | None = None, pretrained: bool = False
) -> Restored:
    """Rebuild the model a checkpoint file or run directory holds (:func:`model_file`).

    Args:
        path: checkpoint file, or a run directory.
        overrides: ``key=value`` config overrides (e.g. ``data.root=...``); keys that change
            the architecture do not apply to the saved weights.
        pretrained: for a run directory, its pre-trained ``last.pt`` even if it was tightened.
    """
    file = model_file(path, pretrained)
    state = checkpoint.load(file)
    cfg = from_dict(apply_overrides(state["config"], list(overrides or [])))
    if state.get("architecture"):
        arch = Architecture.from_dict(state["architecture"], f"{file}: its architecture")
    else:  # checkpoints written before architectures were recorded
        saved = from_dict(state["config"])
        channels = int(state.get("channels") or input_channels(state["model"]))
        classes = len(state.get("classes") or []) if state.get("kind") == "finetune" else None
        arch = Architecture.from_config(saved, channels, classes)
    net = build_network(arch, seed=0)  # the saved weights replace these
    load_weights(net, state["model"], str(file))
    net.eval()
    return Restored(cfg, net, arch, state, file)


def restore_model(
    path: str | Path, overrides: list[str] | None = None, pretrained: bool = False
) -> tuple[Config, torch.nn.Module, dict[str, Any]]:
    """A pre-trained (or tightened) model from a checkpoint, refusing a fine-tuned classifier.

    Returns:
        ``(config, model on the CPU in eval mode, checkpoint dict)``, see :func:`restore`.
    """
    r = restore(path, overrides, pretrained).pretrained()
    return r.cfg, r.net, r.state


# --------------------------------------------------------------------------------------------
# Reading a run back.


@dataclass
class RunRecord:
    """What a run directory holds, read once.

    Attributes:
        name: label in legends (the directory name, made unique among the runs shown).
        path: the run directory.
        config: the resolved config (config.yaml) as a dict.
        metrics: metrics.csv columns as float arrays (NaN where a row has no value).
        evals: evals.csv columns (step, top1, top5), possibly empty.
        predictions: predictions.json (classes, labels, predictions, confusion) or None.
        baseline: baseline.json (supervised-only top1, top5, ...) or None.
        summary: eval.json (final PAWS-NN result) or None.
        init: init.json (the run and checkpoint it started from) or None.
    """

    name: str
    path: Path
    config: dict[str, Any]
    metrics: dict[str, np.ndarray]
    evals: dict[str, np.ndarray]
    predictions: dict[str, Any] | None
    baseline: dict[str, Any] | None
    summary: dict[str, Any] | None
    init: dict[str, Any] | None = None

    @property
    def classes(self) -> list[str] | None:
        """Class names of the last evaluation."""
        return list(self.predictions["classes"]) if self.predictions else None

    @property
    def steps_per_epoch(self) -> float | None:
        """Steps in one epoch over the unlabelled set, from metrics.csv's step and epoch."""
        s, e = self.metrics.get("step"), self.metrics.get("epoch")
        if s is None or e is None or not len(s) or not np.isfinite(e[-1]) or e[-1] <= 0:
            return None
        return float(s[-1] / e[-1])

    @property
    def model(self) -> Path:
        """The checkpoint the run's results describe (:func:`model_file`)."""
        return model_file(self.path)

    @property
    def minutes(self) -> float | None:
        """Wall-clock minutes from writing config.yaml (the start, or the last resume) to
        writing eval.json (the end), or None for a run that has not ended."""
        start, end = self.path / CONFIG, self.path / "eval.json"
        if not start.is_file() or not end.is_file():
            return None
        return max(0.0, end.stat().st_mtime - start.stat().st_mtime) / 60


def _read_csv(path: Path) -> dict[str, np.ndarray]:
    """Columns of a numeric CSV file as float arrays; empty cells become NaN."""
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows:
        return {}
    header, body = rows[0], rows[1:]

    def num(v: str) -> float:
        try:
            return float(v)
        except ValueError:
            return math.nan

    return {
        k: np.array([num(r[i]) if i < len(r) else math.nan for r in body], dtype=np.float64)
        for i, k in enumerate(header)
    }


def read_json(path: Path) -> Any:
    """A JSON file of the run directory, or None when it does not exist."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from e


def load_run(path: str | Path, name: str | None = None) -> RunRecord:
    """Read a run directory written by ``paws train``.

    Args:
        path: the run directory.
        name: legend label (default: the directory name).
    """
    run = Path(path).expanduser()
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    if not (run / METRICS).is_file() and not (run / CONFIG).is_file():
        raise UserError(f"{run} is not a run directory (no {METRICS} or {CONFIG})")
    config = read_yaml(run / CONFIG) if (run / CONFIG).is_file() else {}
    return RunRecord(
        name=name or run.resolve().name,
        path=run,
        config=config,
        metrics=_read_csv(run / METRICS),
        evals=_read_csv(run / EVALS),
        predictions=read_json(run / "predictions.json"),
        baseline=read_json(run / "baseline.json"),
        summary=read_json(run / "eval.json"),
        init=read_json(run / INIT),
    )
