"""The run directory: its files and their names (:mod:`~paws.rundir.layout`), checkpoint
storage (:mod:`~paws.rundir.checkpoint`), the lock that keeps one ``paws train`` in it
(:mod:`~paws.rundir.lock`), rebuilding a saved model (:mod:`~paws.rundir.restore`) and reading a
run back (:mod:`~paws.rundir.record`). Every step of a run, and every command that reads one,
goes through here; nothing here imports the steps."""

from paws.rundir.checkpoint import (
    diverged as diverged,
    finite as finite,
)
from paws.rundir.layout import (
    CHOICE as CHOICE,
    CONFIG as CONFIG,
    DISTILLED as DISTILLED,
    EVAL_COLUMNS as EVAL_COLUMNS,
    EVALS as EVALS,
    EXPORT as EXPORT,
    FINAL as FINAL,
    FINETUNED as FINETUNED,
    INIT as INIT,
    LAST as LAST,
    METRIC_COLUMNS as METRIC_COLUMNS,
    METRICS as METRICS,
    MONITOR_COLUMNS as MONITOR_COLUMNS,
    RESUME_SAFE_KEYS as RESUME_SAFE_KEYS,
    TIGHTENED as TIGHTENED,
    TRACKERS as TRACKERS,
    MetricsLog as MetricsLog,
    chosen_name as chosen_name,
    metrics_row as metrics_row,
    model_file as model_file,
    output_dir as output_dir,
    read_json as read_json,
    shape_diff as shape_diff,
    truncate_rows as truncate_rows,
    write_json as write_json,
    write_results as write_results,
)
from paws.rundir.record import (
    RunRecord as RunRecord,
    load_run as load_run,
)
from paws.rundir.restore import (
    Restored as Restored,
    checkpoint_config as checkpoint_config,
    restore as restore,
    restore_model as restore_model,
    resume_config as resume_config,
)
