"""Experiment trackers (TensorBoard, MLflow, Weights & Biases): copies of a run beside its files.

A tracked run gets the resolved config as parameters (``section.key``), every metrics.csv and
evals.csv row at its step (``train/<column>``, ``eval/<column>``), the numbers of eval.json
(``final/top1``, ``final/pretrained.top1``, ...) and files: config.yaml, eval.json and
tighten.json, report.html and report.png when ``paws report`` draws the run alone, and the
export folder when ``paws export`` exports it (for MLflow also as a model that
``mlflow.pyfunc.load_model`` serves, :mod:`paws.apply.mlflow_model`). The run
directory stays the record: a tracker that fails is reported once and dropped, and training
goes on. Only rank 0 tracks.

``trackers.json`` in the run directory records each tracker's run, so a resumed run continues
the same MLflow and W&B run. A tracker first named on resume starts its run then and is given
the rows logged so far. After a crash, the steps between the last checkpoint and the crash are
logged twice, with the same values (the resume is exact).

Where the runs go:
    tensorboard: ``RUN_DIR/tensorboard``.
    mlflow: ``MLFLOW_TRACKING_URI`` when set (a server, a database, ...), else a SQLite store in
        the run directory (``RUN_DIR/mlflow.db``, files in ``RUN_DIR/mlartifacts``); experiment
        ``run.experiment``. A resumed run uses the store it started in.
    wandb: project ``run.experiment``, files in ``RUN_DIR/wandb``; offline (``wandb sync`` uploads
        later) unless ``WANDB_MODE`` is set or a W&B key is (``WANDB_API_KEY``, ``wandb login``).
"""

from __future__ import annotations

import importlib.util
import json
import math
import netrc
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np

from paws import distributed, rundir
from paws.config import Config, to_dict
from paws.errors import UserError
from paws.progress import info

__all__ = [
    "Tracker",
    "Tracking",
    "TRACKERS",
    "chosen",
    "require",
    "flatten",
    "param_text",
    "read_records",
    "start",
    "log_files",
    "confusion_image",
]


class Tracker(Protocol):
    """One tracker's run, opened by its class from ``(run directory, experiment, the record
    trackers.json kept of it or None)``."""

    name: ClassVar[str]
    package: ClassVar[str]
    keeps_files: ClassVar[bool]
    record: dict[str, Any]  # what trackers.json keeps to continue this run

    def log_params(self, params: dict[str, Any]) -> None:
        """The run's flattened config (``section.key`` to value)."""

    def log_metrics(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        """Scalars at ``step``, each named ``prefix + key``."""

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """A copy of the file ``path``, in the run's files or their sub-folder ``folder``."""

    def log_final(self, values: dict[str, float], step: int) -> None:
        """The run's final numbers (eval.json's), as scalars named ``final/`` + key."""

    def log_confusion(self, confusion: np.ndarray, classes: list[str], step: int) -> None:
        """The final test confusion matrix, (K, K) counts (rows: true class), as a picture."""

    def close(self, status: str | None) -> None:
        """End the run as ``"done"``, ``"interrupted"`` or ``"failed"``; None: as it was."""


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested dict as one level of ``a.b`` keys (``{"run": {"seed": 0}}`` -> ``run.seed``)."""
    out: dict[str, Any] = {}
    for k, v in values.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def param_text(value: Any) -> str:
    """A parameter as text: a string as it is, anything else as JSON (``null``, ``true``,
    ``1e-05``, ``[0.75, 1.0]``)."""
    return value if isinstance(value, str) else json.dumps(value)


# --------------------------------------------------------------------------------------------
# The trackers.


# The prefix of a run's final numbers (eval.json's) among a tracker's scalars.
FINAL = "final/"


def confusion_image(confusion: np.ndarray, cell: int | None = None) -> np.ndarray:
    """A confusion matrix as a picture: each row normalised to the share of its true class,
    from white (0) to dark blue (all of the row), each cell a square of ``cell`` pixels (by
    default about 256 pixels in all, at least 8 a cell).

    Args:
        confusion: (K, K) counts, rows the true classes.
        cell: the side of a cell in pixels.

    Returns:
        (K * cell, K * cell, 3) uint8 RGB.
    """
    cm = np.asarray(confusion, dtype=np.float64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    white, blue = np.array([255.0, 255.0, 255.0]), np.array([8.0, 48.0, 107.0])
    rgb = white + share[..., None] * (blue - white)
    side = cell or max(8, 256 // max(1, len(cm)))
    return np.round(rgb).astype(np.uint8).repeat(side, axis=0).repeat(side, axis=1)


def _confusion_table(confusion: np.ndarray, classes: list[str]) -> str:
    """The counts as a Markdown table, true classes down, predicted across."""
    head = "| true \\ predicted | " + " | ".join(classes) + " |"
    rule = "| --- " * (len(classes) + 1) + "|"
    rows = [
        f"| {c} | " + " | ".join(str(int(v)) for v in r) + " |" for c, r in zip(classes, confusion)
    ]
    return "\n".join([head, rule, *rows])


class TensorBoard:
    """Scalars and the config (as a text table) in ``RUN_DIR/tensorboard``, and at the end the
    config beside the final numbers in TensorBoard's HParams view; keeps no files."""

    name, package, keeps_files = "tensorboard", "tensorboard", False

    def __init__(self, out: Path, experiment: str, previous: dict[str, Any] | None):
        from torch.utils.tensorboard import SummaryWriter

        self.record = {"log_dir": "tensorboard"}
        self.writer = SummaryWriter(str(out / self.record["log_dir"]))
        self.params: dict[str, Any] = {}

    def log_params(self, params: dict[str, Any]) -> None:
        self.params = dict(params)
        rows = "\n".join(f"| {k} | {param_text(v)} |" for k, v in params.items())
        self.writer.add_text("config", "| key | value |\n| --- | --- |\n" + rows)

    def log_metrics(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        for k, v in values.items():
            self.writer.add_scalar(prefix + k, v, step)

    def log_final(self, values: dict[str, float], step: int) -> None:
        """The final scalars, and the config (plain values; lists and None as text) against
        them, so runs of one folder compare in the HParams view."""
        from torch.utils.tensorboard.summary import hparams

        self.log_metrics(values, step, FINAL)
        if not self.params:
            return
        plain = (bool, int, float, str)
        config = {k: v if isinstance(v, plain) else param_text(v) for k, v in self.params.items()}
        for summary in hparams(config, {FINAL + k: float(v) for k, v in values.items()}):
            self.writer.file_writer.add_summary(summary)

    def log_confusion(self, confusion: np.ndarray, classes: list[str], step: int) -> None:
        """The picture in the Images tab, the counts with the class names in the Text tab."""
        image = confusion_image(confusion)
        self.writer.add_image(FINAL + "confusion", image, step, dataformats="HWC")
        self.writer.add_text(FINAL + "confusion", _confusion_table(confusion, classes), step)

    def log_artifact(self, path: Path, folder: str = "") -> None:
        pass  # the files are in the run directory, beside the logs

    def close(self, status: str | None) -> None:
        self.writer.close()


# An MLflow run's end state for each way a run ends.
_MLFLOW_STATUS = {"done": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}


class MLflow:
    """An MLflow run, written through ``MlflowClient`` (no active run: nothing process-wide)."""

    name, package, keeps_files = "mlflow", "mlflow", True

    def __init__(self, out: Path, experiment: str, previous: dict[str, Any] | None):
        import mlflow
        from mlflow.entities import Metric, Param

        self._metric, self._param = Metric, Param
        # A resumed run stays in its store; a new one goes where MLflow's variable says.
        uri = (previous or {}).get("tracking_uri", os.environ.get("MLFLOW_TRACKING_URI"))
        local = self.store(out, None)
        self.client = mlflow.MlflowClient(uri or local)
        if previous:
            self.run_id = previous["run_id"]
            self.found = self.client.get_run(self.run_id).info.status
            self.client.update_run(self.run_id, status="RUNNING")
            info(f"mlflow: logging to run {self.run_id} of {uri or local}")
        else:
            artifacts = None if uri else (out / "mlartifacts").resolve().as_uri()
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = self.client.create_experiment(experiment, artifact_location=artifacts)
            else:
                exp_id = exp.experiment_id
            tags = {"paws.run_dir": str(out.resolve())}
            run = self.client.create_run(exp_id, run_name=out.resolve().name, tags=tags)
            self.run_id, self.found = run.info.run_id, None
            where = uri or f"{local}; browse it with: mlflow ui --backend-store-uri {local}"
            info(f"mlflow: run {self.run_id} in experiment '{experiment}' of {where}")
        self.record = {"run_id": self.run_id, "tracking_uri": uri}

    @staticmethod
    def store(out: Path, record: dict[str, Any] | None) -> str:
        """The tracking URI of the run ``record`` (trackers.json's) describes: the one it was
        started in, else the local store of the run directory ``out``."""
        uri = (record or {}).get("tracking_uri")
        return uri or f"sqlite:///{(Path(out) / 'mlflow.db').resolve()}"

    def log_params(self, params: dict[str, Any]) -> None:
        # Parameters cannot change: a resumed run keeps the values it started with (its
        # config.yaml artifact is the new one).
        have = self.client.get_run(self.run_id).data.params
        new = [self._param(k, param_text(v)) for k, v in params.items() if k not in have]
        for i in range(0, len(new), 100):  # MLflow's batch limit
            self.client.log_batch(self.run_id, params=new[i : i + 100])

    def log_metrics(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        ms = int(time.time() * 1000)
        metrics = [self._metric(prefix + k, float(v), ms, step) for k, v in values.items()]
        self.client.log_batch(self.run_id, metrics=metrics)

    def log_artifact(self, path: Path, folder: str = "") -> None:
        self.client.log_artifact(self.run_id, str(path), folder or None)

    def log_final(self, values: dict[str, float], step: int) -> None:
        self.log_metrics(values, step, FINAL)

    def log_confusion(self, confusion: np.ndarray, classes: list[str], step: int) -> None:
        self.client.log_image(self.run_id, confusion_image(confusion), "confusion.png")

    def close(self, status: str | None) -> None:
        end = _MLFLOW_STATUS.get(status or "", self.found)
        if end and end != "RUNNING":
            self.client.set_terminated(self.run_id, end)


def _wandb_mode() -> str | None:
    """``"offline"`` unless the user chose a mode (``WANDB_MODE``, which is then the mode) or
    has a W&B key (``WANDB_API_KEY``, or ``wandb login``'s entry in ~/.netrc); None: W&B
    decides."""
    if os.environ.get("WANDB_MODE"):  # passed on: W&B reads its variables once a process
        return os.environ["WANDB_MODE"]
    if os.environ.get("WANDB_API_KEY"):
        return None
    host = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai").split("://")[-1]
    try:
        path = os.environ.get("NETRC") or os.path.expanduser("~/.netrc")
        if netrc.netrc(path).authenticators(host.rstrip("/")):
            return None
    except (OSError, netrc.NetrcParseError):
        pass
    return "offline"


class WandB:
    """A W&B run in ``RUN_DIR/wandb``, its x-axis the training step (``step``)."""

    name, package, keeps_files = "wandb", "wandb", True

    def __init__(self, out: Path, experiment: str, previous: dict[str, Any] | None):
        import wandb

        previous = previous or {}
        # console "off": W&B would otherwise replace sys.stdout and sys.stderr to copy them.
        settings = wandb.Settings(console="off", silent=True)
        self.run = wandb.init(
            project=previous.get("project", experiment),
            name=out.resolve().name,
            id=previous.get("id"),
            resume="allow" if previous else None,
            dir=str(out),
            mode=_wandb_mode(),
            settings=settings,
            reinit="create_new",
        )
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")
        self.record = {"id": self.run.id, "project": self.run.project}
        if self.run.offline:
            where = Path(self.run.dir).parent
            self.record.update(offline=True, dir=str(where))
            asked = os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun")
            why = (
                "as asked (WANDB_MODE)"
                if asked
                else "as no W&B key is set (WANDB_API_KEY or wandb login)"
            )
            info(f"wandb: offline, {why}; logging to {where}; upload it with: wandb sync {where}")

    @staticmethod
    def add_offline(
        record: dict[str, Any], files: Sequence[Path], folder: str = "", what: str = "report"
    ) -> bool:
        """Add ``files`` (in the sub-folder ``folder``) to the offline run folder ``record``
        names, without opening another run (which would be a second folder); False when there
        is no such folder."""
        where = Path(str(record.get("dir", "")))
        if not record.get("offline") or not (where / "files").is_dir():
            return False
        dest = where / "files" / "paws" / folder
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            shutil.copy2(f, dest / Path(f).name)
        info(f"wandb: {what} added to the offline run {where}; upload it with: wandb sync {where}")
        return True

    def log_params(self, params: dict[str, Any]) -> None:
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        self.run.log({"step": step, **{prefix + k: v for k, v in values.items()}})

    def log_final(self, values: dict[str, float], step: int) -> None:
        self.log_metrics(values, step, FINAL)

    def log_confusion(self, confusion: np.ndarray, classes: list[str], step: int) -> None:
        import wandb

        picture = wandb.Image(confusion_image(confusion), caption=", ".join(classes))
        self.run.log({"step": step, FINAL + "confusion": picture})

    def log_artifact(self, path: Path, folder: str = "") -> None:
        # Files in the run's folder are uploaded with it (offline: by wandb sync); in a folder
        # of their own, as W&B writes its own config.yaml there.
        dest = Path(self.run.dir) / "paws" / folder
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, dest / path.name)

    def close(self, status: str | None) -> None:
        self.run.finish(exit_code=0 if status in ("done", None) else 1)


# Each tracker's class, by its name in run.trackers.
TRACKERS: dict[str, Any] = {c.name: c for c in (TensorBoard, MLflow, WandB)}


# --------------------------------------------------------------------------------------------
# Several trackers as one.


def _dropped(name: str, error: BaseException) -> None:
    text = (str(error).strip().splitlines() or [""])[0][:300]
    info(f"{name} tracking failed ({type(error).__name__}: {text}); training goes on without it")


class Tracking:
    """The run's trackers as one: each call goes to every tracker, and a tracker that raises
    is reported once (a line) and dropped (no further calls)."""

    def __init__(self, trackers: Sequence[Tracker] = ()):
        self.trackers = list(trackers)

    @property
    def names(self) -> list[str]:
        """The trackers still logging."""
        return [t.name for t in self.trackers]

    def _each(self, call: Callable[[Tracker], Any], only: Iterable[str] | None = None) -> None:
        names = None if only is None else set(only)
        for t in list(self.trackers):
            if names is not None and t.name not in names:
                continue
            try:
                call(t)
            except Exception as e:  # noqa: BLE001 - tracking never stops training
                # No more calls, not even close: a server that is gone would make each one
                # wait through its retries.
                self.trackers.remove(t)
                _dropped(t.name, e)

    def log_params(self, params: dict[str, Any]) -> None:
        """Log the flattened config to every tracker."""
        self._each(lambda t: t.log_params(params))

    def log_metrics(self, values: dict[str, float], step: int, prefix: str = "") -> None:
        """Log scalars at ``step`` (a metrics row without its step) to every tracker."""
        self._each(lambda t: t.log_metrics(values, step, prefix))

    def log_artifact(self, path: Path, folder: str = "") -> None:
        """Log a copy of the file ``path`` (into the sub-folder ``folder`` of the run's files)
        to every tracker that keeps files (if it exists)."""
        if Path(path).is_file():
            self._each(lambda t: t.log_artifact(Path(path), folder))

    def log_results(self, out: Path) -> None:
        """The end of training: eval.json's numbers as ``final/...`` metrics, the confusion
        matrix of predictions.json as a picture, and eval.json, tighten.json and choice.json
        as files."""
        if not self.trackers:
            return
        record = rundir.load_run(out)
        summary = record.summary
        if summary is not None:
            values = {
                k: v
                for k, v in flatten(summary).items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
            }
            step = int(summary.get("step", 0))
            self._each(lambda t: t.log_final(values, step))
            if record.predictions is not None:
                cm, classes = np.asarray(record.predictions["confusion"]), record.classes or []
                self._each(lambda t: t.log_confusion(cm, classes, step))
        for name in ("eval.json", "tighten.json", rundir.CHOICE):
            self.log_artifact(out / name)

    def close(self, status: str | None) -> None:
        """End every tracker's run (see :meth:`Tracker.close`)."""
        self._each(lambda t: t.close(status))
        self.trackers = []


# --------------------------------------------------------------------------------------------
# A run's trackers.


def chosen(cfg: Config) -> list[str]:
    """The trackers a config asks for: ``run.trackers``, and tensorboard for
    ``run.tensorboard``."""
    return list(dict.fromkeys([*cfg.run.trackers, *(["tensorboard"] * cfg.run.tensorboard)]))


def require(cfg: Config) -> None:
    """A one-line error for a tracker whose package is not installed (checked before the run)."""
    for name in chosen(cfg):
        if importlib.util.find_spec(TRACKERS[name].package) is None:
            key = "run.trackers" if name in cfg.run.trackers else "run.tensorboard"
            raise UserError(
                f"{key} asks for {name}, which is not installed: pip install 'paws-ssl[{name}]'"
            )


def read_records(out: Path) -> dict[str, dict[str, Any]]:
    """What ``trackers.json`` in the run directory records of each tracker's run ({} if none)."""
    path = Path(out) / rundir.TRACKERS
    try:
        records = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    return records if isinstance(records, dict) else {}


def _logged_rows(out: Path) -> Iterator[tuple[str, int, dict[str, float]]]:
    """``(prefix, step, values)`` of each metrics.csv and evals.csv row of the run so far."""
    run = rundir.load_run(out)
    for prefix, table in (("train/", run.metrics), ("eval/", run.evals)):
        for i, step in enumerate(table.get("step", [])):
            values = {k: float(v[i]) for k, v in table.items() if k != "step"}
            yield prefix, int(step), {k: v for k, v in values.items() if math.isfinite(v)}


def _open(names: Iterable[str], out: Path, experiment: str, records: dict) -> Tracking:
    tracking = Tracking()
    for name in names:
        try:
            tracking.trackers.append(TRACKERS[name](out, experiment, records.get(name)))
        except Exception as e:  # noqa: BLE001 - tracking never stops training
            _dropped(name, e)
    return tracking


def start(cfg: Config, out: Path, resume: bool = False) -> Tracking:
    """Open the trackers ``cfg`` asks for, log the config to them, and record their runs in
    ``trackers.json``.

    Args:
        cfg: the run's config (``run.trackers``, ``run.tensorboard``, ``run.experiment``).
        out: the run directory (its config.yaml already written).
        resume: the run continues from a checkpoint: continue the tracked runs trackers.json
            records, and give a tracker new to the run the rows logged so far.

    Returns:
        The trackers as one :class:`Tracking` (none on ranks other than 0).
    """
    names = chosen(cfg)
    if not names or not distributed.is_main():
        return Tracking()
    previous = read_records(out) if resume else {}
    tracking = _open(names, out, cfg.run.experiment, previous)
    records = {**previous, **{t.name: t.record for t in tracking.trackers}}
    rundir.write_json(out / rundir.TRACKERS, records)
    tracking.log_params(flatten(to_dict(cfg)))
    tracking.log_artifact(out / rundir.CONFIG)
    new = set(tracking.names) - set(previous)
    if resume and new:
        for prefix, step, values in _logged_rows(out):
            tracking._each(lambda t, v=values, s=step, p=prefix: t.log_metrics(v, s, p), new)
    return tracking


def log_files(
    run_dir: str | Path, files: Sequence[Path], folder: str = "", what: str = "report"
) -> list[str]:
    """Add ``files`` made from a run after its training (its report, its export: ``what``),
    in the sub-folder ``folder`` of the run's files, to the tracked runs its ``trackers.json``
    records.

    Returns:
        The trackers that took them (a tracker that cannot is reported in a line).
    """
    out = Path(run_dir)
    records, names = read_records(out), []
    for name in records:
        cls = TRACKERS.get(name)
        if cls is None or not cls.keeps_files:
            continue
        if importlib.util.find_spec(cls.package) is None:
            info(f"{name} is not installed: the {what} is not added to the run's {name} run")
            continue
        names.append(name)
    offline = "wandb" in names and WandB.add_offline(records["wandb"], files, folder, what)
    added = ["wandb"] if offline else []
    # Only recorded runs are opened, so the experiment name is never used.
    tracking = _open([n for n in names if n not in added], out, "paws", records)
    for f in files:
        tracking.log_artifact(Path(f), folder)
    logged = tracking.names
    tracking.close(None)
    return [*logged, *added]
