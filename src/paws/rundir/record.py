"""Reading a finished (or running) run directory back: its config, metrics, evaluations and
results, for reports and comparisons."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paws.config import read_yaml
from paws.errors import UserError
from paws.rundir.layout import (
    CONFIG,
    DAMAGED,
    EVAL_COLUMNS,
    EVALS,
    INIT,
    METRICS,
    csv_rows,
    model_file,
    read_json,
)

__all__ = ["RunRecord", "load_run"]


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


def _read_csv(path: Path, need: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """Columns of a numeric CSV file as float arrays; empty cells become NaN.

    Raises:
        UserError: a file that is not UTF-8 CSV, or whose header lacks a column of ``need``.
    """
    if not path.is_file():
        return {}
    rows = csv_rows(path, need)
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


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _numbers(v: Any) -> bool:
    return isinstance(v, list) and all(_number(x) for x in v)


# What the readers of a run's records rely on: each key that is there has a value of this kind.
_KINDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "top1": (_number, "a number"),
    "top5": (_number, "a number"),
    "balanced_top1": (_number, "a number"),
    "num_support": (_number, "a number"),
    "classes": (lambda v: isinstance(v, list) and all(isinstance(c, str) for c in v), "names"),
    "labels": (_numbers, "a list of numbers"),
    "predictions": (_numbers, "a list of numbers"),
    "confusion": (lambda v: isinstance(v, list) and all(_numbers(r) for r in v), "a matrix"),
    "from": (lambda v: isinstance(v, str), "a path"),
}


def _record(path: Path, need: tuple[str, ...] = ()) -> dict[str, Any] | None:
    """A JSON record of the run directory (None when absent), its values of the kinds the
    report reads (:data:`_KINDS`), with every key of ``need``.

    Raises:
        UserError: naming the file and the first key that is missing or of another kind.
    """
    record = read_json(path, dict)
    if record is None:
        return None
    for key in need:
        if key not in record:
            raise UserError(f"{path} has no {key!r}: {DAMAGED}")
    for key, value in record.items():
        check, kind = _KINDS.get(key, (None, ""))
        if check is not None and value is not None and not check(value):
            raise UserError(f"{path}: {key!r} is {str(value)[:40]!r}, not {kind}: {DAMAGED}")
    confusion, classes = record.get("confusion"), record.get("classes")
    if confusion is not None and classes is not None and len(confusion) != len(classes):
        raise UserError(f"{path}: the confusion matrix does not match its classes: {DAMAGED}")
    return record


def _config(path: Path) -> dict[str, Any]:
    """config.yaml's sections, each a mapping."""
    config = read_yaml(path) if path.is_file() else {}
    for name, section in config.items():
        if not isinstance(section, dict):
            raise UserError(
                f"{path}: section {name!r} is {str(section)[:40]!r}, not a mapping: the file is "
                "damaged; train the run again"
            )
    return config


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
    return RunRecord(
        name=name or run.resolve().name,
        path=run,
        config=_config(run / CONFIG),
        metrics=_read_csv(run / METRICS, ("step",)),
        evals=_read_csv(run / EVALS, EVAL_COLUMNS),
        predictions=_record(run / "predictions.json", ("classes", "confusion")),
        baseline=_record(run / "baseline.json"),
        summary=_record(run / "eval.json"),
        init=_record(run / INIT),
    )
