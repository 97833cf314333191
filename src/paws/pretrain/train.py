"""The whole pre-training run, as ``paws train`` runs it: open -> fit -> start -> build ->
restore -> loop -> finish.

With no labelled image (or ``loss.objective: simclr``) the run is label-free
(:func:`paws.config.adapt.label_free`): the same loop trains a SimCLR embedding of the
unlabelled images, for ``paws suggest`` to choose the first labels in.

:func:`paws.pretrain.stages.open_run` checks the run directory and finds the checkpoint to
resume from; :func:`paws.config.adapt.fit_to_data` fits the defaults to the data;
:func:`~paws.pretrain.stages.start_run` refuses a resume that changes the run and writes
config.yaml; :func:`~paws.pretrain.stages.build_run` builds everything before the first step;
:func:`~paws.pretrain.stages.restore_run` (or :func:`~paws.pretrain.stages.start_from`, for a
run started from another's weights) continues; :func:`paws.pretrain.loop.run_steps` is the
loop; :func:`~paws.pretrain.stages.finish_run` writes the final checkpoint, evaluates, and takes
the steps a run ends with.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from paws import distributed, rundir, runtime, tracking
from paws.config import Config, with_absolute_paths
from paws.config.adapt import fit_to_data, label_free
from paws.data.sources import Datasets, load_datasets, without_labels
from paws.errors import UserError
from paws.files import check_out_dir, write_atomic
from paws.pretrain.finish import finish_run
from paws.pretrain.loop import run_steps
from paws.pretrain.stages import (
    build_run,
    open_init,
    open_run,
    restore_run,
    start_from,
    start_run,
)
from paws.progress import info
from paws.rundir.lock import RunLock

__all__ = ["train"]


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    data: Datasets | None = None,
    device: torch.device | None = None,
    init: str | Path | None = None,
) -> dict[str, Any]:
    """Pre-train PAWS as ``cfg`` describes, writing the run into ``out_dir`` (and to the
    experiment trackers of ``run.trackers``, :mod:`paws.tracking`).

    Changes no process-wide setting: the ``paws`` command calls :func:`paws.runtime.setup`
    first (threads, determinism, denormals, the process group under torchrun).

    Args:
        cfg: the run's config; relative data paths are taken from the working directory and
            saved absolute.
        out_dir: run directory (config.yaml, metrics.csv, last.pt, final.pt, eval.json).
        resume: continue from ``out_dir/last.pt``; refuses a config that changes the run.
        data: preloaded datasets (tests, benchmarks), else loaded from the config.
        device: compute device (default: from ``run.device``).
        init: start a new run from the pre-trained weights of this run directory or
            checkpoint (:func:`paws.pretrain.stages.open_init`), with the schedule as given.

    Returns:
        ``{"status": "done" | "interrupted", "step", "eval": PAWS-NN summary or None,
        "skipped": number of unreadable images skipped, "label_free": no labels were used
        (``loss.objective: simclr``), "signal": signal number when interrupted}``.
    """
    out = Path(out_dir)
    cfg = with_absolute_paths(cfg)  # the run reads the same data from any folder later
    device = device or runtime.device_for(cfg.run.device)
    with _locked(cfg, out):
        return _train(cfg, out, resume, data, device, init)


def _locked(cfg: Config, out: Path) -> RunLock | contextlib.nullcontext:
    """The run directory's lock, held by rank 0; every rank stops if another process holds
    it."""
    lock = RunLock(out) if distributed.is_main() else contextlib.nullcontext()
    held = None
    if isinstance(lock, RunLock):
        check_out_dir(out, "run directory")
        try:
            lock.acquire()
        except UserError as e:
            held = str(e)
    held = distributed.broadcast_object(held)
    if held:
        raise UserError(held)
    return lock


def _train(
    cfg: Config,
    out: Path,
    resume: bool,
    data: Datasets | None,
    device: torch.device,
    init: str | Path | None,
) -> dict[str, Any]:
    """:func:`train` with the run directory locked."""
    state = open_run(cfg, out, resume)
    cfg, start = open_init(cfg, out, init, state)
    data = data or load_datasets(cfg)
    cfg = label_free(cfg, len(data.labeled))
    if cfg.loss.objective == "simclr":
        data = without_labels(data)
    info(f"data: {data.summary()}")
    world = distributed.get_world_size()
    cfg = fit_to_data(cfg, len(data.unlabeled), data.labeled.labels, world, state is not None)
    start_run(cfg, out, state)
    if data.skipped and distributed.is_main():
        # Listed here, counted in the result: ``paws train`` says it once, with its results.
        write_atomic(out / "skipped_images.txt", "\n".join(data.skipped) + "\n")
    run = build_run(cfg, out, data, device)
    if state is not None:
        restore_run(run, state)
    elif start is not None:
        start_from(run, start)
    tracked = tracking.start(cfg, out, resume=state is not None)
    del state, start
    metrics = rundir.MetricsLog(out / rundir.METRICS, tracked, "train/")
    evals = rundir.MetricsLog(out / rundir.EVALS, tracked, "eval/")
    status = "failed"
    try:
        result = run_steps(run, metrics, evals)
        if result["status"] == "done":
            result["eval"] = finish_run(run, result["step"], evals)
            tracked.log_results(out)
        status = result["status"]
    finally:
        tracked.close(status)
    distributed.barrier()
    return {"eval": None, "skipped": len(data.skipped), "label_free": run.label_free, **result}
