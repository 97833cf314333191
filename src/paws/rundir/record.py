"""Reading a finished (or running) run directory back: its config, metrics, evaluations and
results, for reports and comparisons."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paws.config import read_yaml
from paws.errors import UserError
from paws.rundir.layout import CONFIG, EVALS, INIT, METRICS, model_file, read_json

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
