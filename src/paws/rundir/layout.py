"""A run directory's files: their names, the metric columns, what a resume may change, and
which checkpoint a run means.

A run directory holds ``config.yaml`` (the resolved config), ``metrics.csv`` (a row every
``run.log_every`` steps, columns :data:`METRIC_COLUMNS`), ``evals.csv`` (PAWS-NN during
training), ``last.pt`` (the latest checkpoint), ``final.pt``, ``eval.json`` and
``predictions.json`` (the final evaluation), and, when the run ended by tightening,
``tighten.pt`` and ``tighten.json``; when it started from another run's weights (``paws train
--init``), ``init.json`` (that run and checkpoint); with experiment trackers,
``trackers.json`` (their runs, see :mod:`paws.tracking`) and their local stores. Later commands
add ``baseline.json``, ``finetune.pt`` and ``finetune.json``. At its end a run exports the
model it means to ``export/`` (``run.export``), which ``paws.load`` of the run directory opens
while it is of that model as it is now. Only rank 0 writes.

Which model a run directory means is decided here alone (:func:`model_file`).
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from paws import distributed
from paws.errors import UserError
from paws.files import read_text, write_atomic

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
    "DISTILLED",
    "CHOICE",
    "EXPORT",
    "METRIC_COLUMNS",
    "MONITOR_COLUMNS",
    "EVAL_COLUMNS",
    "RESUME_SAFE_KEYS",
    "metrics_row",
    "MetricsLog",
    "shape_diff",
    "truncate_rows",
    "write_json",
    "read_json",
    "read_run_text",
    "DAMAGED",
    "csv_rows",
    "write_results",
    "output_dir",
    "model_file",
    "chosen_name",
]

CONFIG, METRICS, EVALS = "config.yaml", "metrics.csv", "evals.csv"
TRACKERS = "trackers.json"
INIT = "init.json"  # where a run started with paws train --init took its weights from
LAST, FINAL, TIGHTENED, FINETUNED = "last.pt", "final.pt", "tighten.pt", "finetune.pt"
DISTILLED = "distill.pt"  # the student (paws distill, distill.after_training)
CHOICE = "choice.json"  # which model the run means, chosen on the labelled images alone
EXPORT = "export"  # the export of the model the run means (paws.apply.export's format)

# What a user can do about a run file that is damaged, the end of every message saying so.
DAMAGED = "the file is damaged; remove it, or train the run again"


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
    "run.export",
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
    "distill.",
)


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
            self.fields = next(iter(csv_rows(path, ("step",))), None)

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


def truncate_rows(path: Path, last_step: int) -> None:
    """Drop CSV rows logged after ``last_step`` (steps a crashed run did after its checkpoint)."""
    if not path.is_file():
        return
    rows = csv_rows(path, ("step",))
    if not rows:
        return
    at = rows[0].index("step")
    keep = rows[:1] + [
        r for r in rows[1:] if len(r) > at and r[at].isdigit() and int(r[at]) <= last_step
    ]
    if len(keep) != len(rows):
        text = io.StringIO(newline="")
        csv.writer(text).writerows(keep)
        write_atomic(path, text.getvalue())


def write_json(path: Path, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as a JSON file (one line per value with ``indent``), atomically."""
    write_atomic(path, json.dumps(obj, indent=indent) + "\n")


def write_results(out: Path, summary: dict[str, Any], ev: dict[str, Any], classes: list) -> None:
    """The final evaluation's files: ``eval.json`` (``summary``) and ``predictions.json`` (the
    test set's labels, predictions and confusion matrix from ``ev``, a
    :func:`paws.after.evaluate.paws_nn` result)."""
    write_json(out / "eval.json", summary)
    predictions = {k: ev[k] for k in ("labels", "predictions", "confusion")}
    write_json(out / "predictions.json", {"classes": list(classes), **predictions}, indent=None)


def output_dir(path: str | Path) -> Path:
    """Where results about a checkpoint go by default: its run directory."""
    p = Path(path)
    return p if p.is_dir() else p.parent


def model_file(path: str | Path, pretrained: bool = False) -> Path:
    """The checkpoint file that ``path`` names: a file as it is; for a run directory, the model
    the run chose from its labelled images alone (``choice.json``, see
    :mod:`paws.after.choose`), else ``tighten.pt`` when the run ended by tightening, else
    ``last.pt``; with ``pretrained``, always ``last.pt`` (what the steps after pre-training
    start from).

    Raises:
        UserError: a ``choice.json`` that names no checkpoint of the run directory.
    """
    path = Path(path)
    if not path.is_dir():
        return path
    if pretrained:
        return path / LAST
    if (path / CHOICE).is_file():
        return path / chosen_name(path)
    if (path / TIGHTENED).is_file():
        return path / TIGHTENED
    return path / LAST


def chosen_name(run: Path) -> str:
    """The checkpoint ``run/choice.json`` names (a file of the run directory).

    Raises:
        UserError: the file is damaged or names a checkpoint that is not there.
    """
    file = run / CHOICE
    record = read_json(file)
    name = record.get("model") if isinstance(record, dict) else None
    plain = isinstance(name, str) and name.endswith(".pt") and Path(name).name == name
    if not plain or not (run / name).is_file():
        raise UserError(
            f"{file} is damaged or names no checkpoint of {run} (model: {name!r:.60}); name a "
            "checkpoint file instead (e.g. tighten.pt), or train the run again"
        )
    return name


def read_run_text(path: Path) -> str:
    """The text of a file paws wrote into a run directory (UTF-8).

    Raises:
        UserError: a file in another encoding or holding binary data: it was damaged.
    """
    return read_text(path, "run file", DAMAGED)


def csv_rows(path: Path, need: tuple[str, ...] = ()) -> list[list[str]]:
    """The rows of a CSV file of the run directory (``metrics.csv``, ``evals.csv``), the header
    first.

    Args:
        path: the file.
        need: columns the header must name (when the file has rows).

    Raises:
        UserError: a file that is not UTF-8 text, does not parse as CSV (strictly: an
            unbalanced quote too), or whose header lacks a column of ``need``.
    """
    try:
        rows = list(csv.reader(io.StringIO(read_run_text(path), newline=""), strict=True))
    except csv.Error as e:
        raise UserError(f"run file {path} is not valid CSV ({e}): {DAMAGED}") from e
    missing = [k for k in need if rows and k not in rows[0]]
    if missing:
        raise UserError(f"run file {path} has no column {missing[0]!r} in its header: {DAMAGED}")
    return rows


def read_json(path: Path, kind: type | None = None) -> Any:
    """A JSON file of the run directory, or None when it does not exist.

    Args:
        path: the file.
        kind: the type its top level must have (``dict`` for every record paws writes).

    Raises:
        UserError: a file that is not UTF-8 JSON, or whose top level is not a ``kind``.
    """
    if not path.is_file():
        return None
    try:
        value = json.loads(read_run_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg}, line {e.lineno})") from e
    if kind is not None and not isinstance(value, kind):
        raise UserError(
            f"{path} holds a JSON {type(value).__name__}, not the {kind.__name__} paws writes: "
            f"{DAMAGED}"
        )
    return value
