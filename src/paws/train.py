"""PAWS pre-training: one step as the paper writes it, the loop over steps, and the whole run.

Each step (:func:`train_step`) reads like the paper: encode the support views together with
the two large views and, separately, the small views; classify every view against the supports
by soft nearest neighbours; take the other views' sharpened predictions as targets; minimise
the cross-entropy plus ME-MAX; step LARS. Everything a step uses is a function of
``(seed, step)``, so a resumed run continues exactly where it stopped.

:func:`train` is the whole run: :func:`paws.run.open_run` (the run directory and the
checkpoint to resume from), the data and its defaults (:func:`paws.fitting.fit_to_data`),
:func:`paws.run.start_run` (the resume check and config.yaml), :func:`paws.run.build_run`
(model, optimiser, samplers, schedule, ME-MAX prior: everything before the first step),
:func:`paws.run.restore_run` (or, for a run started from another's weights,
:func:`paws.run.open_init` and :func:`paws.run.start_from`), :func:`run_steps` (the loop) and
:func:`paws.run.finish_run` (final checkpoint, PAWS-NN, tightening, result files).
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paws import distributed, rundir, runtime, tracking
from paws.config import Config
from paws.data.loaders import Batch, step_batches
from paws.data.sources import Datasets, load_datasets
from paws.errors import UserError
from paws.evaluate import paws_nn
from paws.files import check_out_dir, write_atomic
from paws.fitting import fit_to_data
from paws.losses import RoPAWS, paws_loss, sharpen, snn
from paws.monitor import monitor_metrics
from paws.optim import backward_step, set_lr
from paws.progress import Progress, info
from paws.run import (
    Run,
    build_run,
    finish_run,
    open_init,
    open_run,
    restore_run,
    start_from,
    start_run,
)
from paws.runlock import RunLock

__all__ = ["StepResult", "train_step", "run_steps", "train"]


@dataclass
class StepResult:
    """Scalars of one step, as detached tensors on the compute device.

    Reading them waits for the device and (under several processes) talks to the other ranks,
    so the training loop reads them only on logging and checkpoint steps: :meth:`read`.
    """

    loss: torch.Tensor
    cross_entropy: torch.Tensor
    me_max: torch.Tensor
    extra: dict[str, torch.Tensor]
    mass: torch.Tensor | None = None

    def read(self) -> dict[str, float]:
        """The scalars as floats, averaged over ranks (one transfer, one all-reduce)."""
        names = ["loss", "cross_entropy", "me_max", *self.extra]
        values = torch.stack([self.loss, self.cross_entropy, self.me_max, *self.extra.values()])
        return dict(zip(names, distributed.all_reduce_mean(values.float()).tolist()))


def _ropaws(cfg: Config) -> RoPAWS | None:
    """RoPAWS's hyperparameters when ``loss.ropaws`` is on."""
    c = cfg.loss
    return (
        RoPAWS(c.ropaws_prior_tau, c.ropaws_prior_pow, c.ropaws_label_ratio) if c.ropaws else None
    )


@torch.no_grad()
def _class_mass(
    views: torch.Tensor, supports: torch.Tensor, labels: torch.Tensor, tau: float, T: float
) -> torch.Tensor:
    """(K,) the mean sharpened soft nearest-neighbour prediction of a step's target views
    (the targets' class marginal), over every rank: what an estimated ME-MAX prior follows."""
    p = sharpen(snn(views.detach().float(), supports.float(), labels, tau), T)
    return distributed.all_reduce_mean(p.mean(dim=0))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    support_labels: torch.Tensor,
    cfg: Config,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
    monitor: bool = False,
    prior: torch.Tensor | None = None,
) -> StepResult:
    """One PAWS step (paper section 3, eq. 4), in place on ``model`` and ``optimizer``.

    Args:
        model: the :class:`PAWSModel` (possibly wrapped in DistributedDataParallel).
        optimizer: LARS.
        batch: this rank's views ``[large 1, large 2, small ...]`` (each (B, C, h, w)) and
            support views (n, C, H, W).
        support_labels: (S, K) smoothed labels of the supports gathered from all ranks.
        cfg: the run's config (``loss.ropaws``: RoPAWS targets).
        scaler: gradient scaler for fp16.
        dtype: autocast dtype of the forward pass, or None for fp32.
        monitor: also compute the monitor-only metrics of Fig. 4 (no gradient).
        prior: (K,) ME-MAX prior of the step's support classes, or None for the paper's.

    Returns:
        The step's scalars as tensors, without waiting for the device; ``.read()`` gives
        floats averaged over ranks. With ``loss.me_max_prior: estimated`` also the step's
        class mass (the mean soft nearest-neighbour prediction of its unlabelled images).
    """
    device_type = batch.supports.device.type
    n_sup, n_img = batch.supports.shape[0], batch.views[0].shape[0]
    # One forward per crop size: the supports ride along with the two large views.
    with runtime.autocast(device_type, dtype):
        h, z = model([batch.supports, *batch.views])
    # Supports from every rank; gradients flow back into each rank's own supports.
    anchor_supports = distributed.all_gather(z[:n_sup])
    target_supports = distributed.all_gather(h[:n_sup].detach())
    target_views = h[n_sup : n_sup + 2 * n_img]
    loss_cfg = cfg.loss
    ropaws = _ropaws(cfg)
    cross_entropy, me_max = paws_loss(
        anchor_views=z[n_sup:],
        anchor_supports=anchor_supports,
        anchor_support_labels=support_labels,
        target_views=target_views,
        target_supports=target_supports,
        target_support_labels=support_labels,
        tau=loss_cfg.tau,
        T=loss_cfg.sharpen,
        me_max=loss_cfg.me_max,
        reduce=distributed.all_reduce_mean,
        prior=prior,
        ropaws=ropaws,
        # RoPAWS propagates labels through the whole batch, every rank's images.
        batch=distributed.gather_views(target_views.detach(), 2) if ropaws else None,
    )
    loss = cross_entropy + me_max
    backward_step(loss, optimizer, scaler)
    mass = None
    if loss_cfg.me_max_prior == "estimated":
        mass = _class_mass(
            target_views, target_supports, support_labels, loss_cfg.tau, loss_cfg.sharpen
        )
    extra = (
        monitor_metrics(
            h.detach(),
            z.detach(),
            anchor_supports.detach(),
            target_supports,
            support_labels,
            n_sup,
            n_img,
            cfg,
        )
        if monitor
        else {}
    )
    return StepResult(loss.detach(), cross_entropy.detach(), me_max.detach(), extra, mass)


class _Throughput:
    """Images/s and the share of time spent waiting for data since the last metrics row."""

    def __init__(self, images_per_step: int):
        self.images_per_step = images_per_step
        self.since, self.wait, self.steps = time.perf_counter(), 0.0, 0

    def add(self, wait: float) -> None:
        self.wait += wait
        self.steps += 1

    def take(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - self.since, 1e-9)
        out = {
            "images_per_s": self.images_per_step * self.steps / elapsed,
            "data_wait": self.wait / elapsed,
        }
        self.since, self.wait, self.steps = now, 0.0, 0
        return out


def _evaluate_during(run: Run, done: int, evals: rundir.MetricsLog, shown: dict) -> None:
    """PAWS-NN every ``run.eval_every`` steps (not at the last step: the end evaluates)."""
    every = run.cfg.run.eval_every
    if not every or done % every or done >= run.steps or run.data.test is None:
        return
    if distributed.is_main():
        ev = paws_nn(run.model, run.data, run.cfg, run.device)
        evals.log({"step": done, "top1": ev["top1"], "top5": ev["top5"]})
        info(f"step {done}: PAWS-NN top-1 {ev['top1']:.2f}%")
        shown["top1"] = ev["top1"]
    distributed.barrier()


def run_steps(run: Run, metrics: rundir.MetricsLog, evals: rundir.MetricsLog) -> dict[str, Any]:
    """The training loop, from ``run.start`` to the end or to a stop signal.

    Returns:
        ``{"status": "done" | "interrupted", "step": steps done, "signal": number}`` (the
        signal only when interrupted, after a checkpoint at the step reached).
    """
    cfg, run_cfg = run.cfg, run.cfg.run
    net = distributed.data_parallel(run.model, run.device, compile=run_cfg.compile)
    progress = Progress(run.steps, "train", initial=run.start)
    shown: dict[str, float] = {}  # the latest loss and PAWS-NN accuracy, shown in the bar
    speed, done, stopping = _Throughput(cfg.optim.batch_size), run.start, False
    run.model.train()
    with runtime.StopSignals() as stop:
        batches = step_batches(
            run.data, cfg, run.unl, run.sup, range(run.start, run.steps), run.device
        )
        for batch in runtime.until_stopped(batches, stop):
            lr = run.schedule(batch.step)
            set_lr(run.optimizer, lr)
            monitor = run_cfg.monitor_every > 0 and batch.step % run_cfg.monitor_every == 0
            prior = run.prior.for_step(batch.classes)
            r = train_step(
                net, run.optimizer, batch, run.labels, cfg, run.scaler, run.dtype, monitor, prior
            )
            if r.mass is not None:
                run.prior.update(batch.classes, r.mass)
            speed.add(batch.wait)
            done = batch.step + 1
            # Every rank stops at the same step, whichever received the signal.
            stopping = distributed.any_true(stop.signum is not None)
            log = done % run_cfg.log_every == 0 or done == run.steps or bool(r.extra)
            save = done % run_cfg.checkpoint_every == 0
            if log or save or stopping:
                # Reading the loss waits for the device: only on these steps.
                values = r.read()
                if not math.isfinite(values["loss"]):
                    raise rundir.diverged(
                        f"the loss became {values['loss']} by step {done}", run.last_good
                    )
                shown["loss"] = values["loss"]
            progress.update(1, **shown, lr=lr)
            if log:
                epoch = done / run.unl.steps_per_epoch
                metrics.log(
                    rundir.metrics_row(
                        {"step": done, "epoch": epoch, **values, "lr": lr, **speed.take()}
                    )
                )
            if save:
                run.save_checkpoint(done)
            _evaluate_during(run, done, evals, shown)
            if stopping:
                break
        progress.close()
        if stopping or stop.signum is not None:
            info(f"stopping: saving a checkpoint at step {done}")
            if run.last_good is None or run.last_good[1] != done:
                run.save_checkpoint(done)
            info(f"stopped at step {done}; continue with: paws train --resume {run.out}")
            signum = stop.signum or int(signal.SIGTERM)
            return {"status": "interrupted", "step": done, "signal": signum}
    return {"status": "done", "step": done}


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
        cfg: the run's config.
        out_dir: run directory (config.yaml, metrics.csv, last.pt, final.pt, eval.json).
        resume: continue from ``out_dir/last.pt``; refuses a config that changes the run.
        data: preloaded datasets (tests, benchmarks), else loaded from the config.
        device: compute device (default: from ``run.device``).
        init: start a new run from the pre-trained weights of this run directory or
            checkpoint (:func:`paws.run.open_init`), with the schedule as given.

    Returns:
        ``{"status": "done" | "interrupted", "step", "eval": PAWS-NN summary or None,
        "skipped": number of unreadable images skipped, "signal": signal number when
        interrupted}``.
    """
    out = Path(out_dir)
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
    info(f"data: {data.summary()}")
    cfg = fit_to_data(cfg, len(data.unlabeled), data.labeled.labels, distributed.get_world_size())
    start_run(cfg, out, state)
    if data.skipped and distributed.is_main():
        write_atomic(out / "skipped_images.txt", "\n".join(data.skipped) + "\n")
        info(f"skipped {len(data.skipped)} unreadable images (listed in skipped_images.txt)")
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
    return {"eval": None, "skipped": len(data.skipped), **result}
