"""The run directory: its files and their names (:mod:`~paws.rundir.layout`), checkpoint
storage (:mod:`~paws.rundir.checkpoint`), the lock that keeps one ``paws train`` in it
(:mod:`~paws.rundir.lock`), rebuilding a saved model (:mod:`~paws.rundir.restore`) and reading a
run back (:mod:`~paws.rundir.record`). Every step of a run, and every command that reads one,
goes through here; nothing here imports the steps."""

from paws.rundir.checkpoint import diverged, finite
from paws.rundir.layout import (
    CONFIG,
    EVAL_COLUMNS,
    EVALS,
    FINAL,
    FINETUNED,
    INIT,
    LAST,
    METRIC_COLUMNS,
    METRICS,
    MONITOR_COLUMNS,
    RESUME_SAFE_KEYS,
    TIGHTENED,
    TRACKERS,
    MetricsLog,
    metrics_row,
    model_file,
    output_dir,
    read_json,
    shape_diff,
    truncate_rows,
    write_json,
    write_results,
)
from paws.rundir.record import RunRecord, load_run
from paws.rundir.restore import Restored, checkpoint_config, restore, restore_model, resume_config

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
