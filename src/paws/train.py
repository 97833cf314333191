"""PAWS pre-training: open the run, build it, restore it, loop over steps, finish.

Each step (:func:`train_step`) reads like the paper: encode the support views together with
the two large views and, separately, the small views; classify every view against the supports
by soft nearest neighbours; take the other views' sharpened predictions as targets; minimise
the cross-entropy plus ME-MAX; step LARS. Everything a step uses is a function of
``(seed, step)``, so a resumed run continues exactly where it stopped.

:func:`train` is the whole run: :func:`open_run` (the run directory and the checkpoint to
resume from), :func:`build_run` (model, optimiser, samplers, schedule: everything before the
first step, also what a benchmark needs), :func:`restore_run`, :func:`run_steps` (the loop)
and :func:`finish_run` (final checkpoint, PAWS-NN, tightening, result files).
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paws import checkpoint, distributed, rundir, runtime, tracking
from paws.config import Config, save_config, to_dict
from paws.data.loaders import Batch, step_batches
from paws.data.sources import Datasets, load_datasets
from paws.errors import UserError
from paws.evaluate import paws_nn
from paws.losses import nt_xent, paws_loss, sharpen, smooth_labels, snn, supervised_nce
from paws.models import Architecture, PAWSModel, build_network, check_encoder
from paws.optim import LARS, WarmupCosine, backward_step, param_groups, set_lr
from paws.progress import Progress, info
from paws.sampling import SupportSampler, UnlabeledSampler
from paws.tighten import save_tightened, tighten

__all__ = [
    "training_model",
    "build_optimizer",
    "total_steps",
    "train_step",
    "Run",
    "open_run",
    "build_run",
    "restore_run",
    "run_steps",
    "finish_run",
    "train",
]


def training_model(cfg: Config, arch: Architecture, device: torch.device) -> PAWSModel:
    """The model as training runs it: initialised from ``run.seed`` (and ``model.weights``),
    on ``device``, batch norm global across processes (``run.sync_bn``), channels-last memory
    where it is faster (``run.channels_last``, by default on GPUs)."""
    channels_last = (
        cfg.run.channels_last if cfg.run.channels_last is not None else device.type == "cuda"
    )
    model = build_network(arch, cfg.run.seed, cfg.model.weights, channels_last).to(device)
    if cfg.run.sync_bn:
        model = distributed.convert_batchnorm(model, device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: Config, model: torch.nn.Module) -> LARS:
    """LARS over the model's parameter groups, as ``optim`` configures it."""
    return LARS(
        param_groups(model, cfg.optim.weight_decay, lars=cfg.optim.lars),
        lr=cfg.optim.start_lr,
        momentum=cfg.optim.momentum,
        trust_coefficient=cfg.optim.trust_coefficient,
    )


def total_steps(cfg: Config, steps_per_epoch: int) -> int:
    """Training length in steps: ``optim.steps`` or ``optim.epochs`` epochs (at least 1)."""
    if cfg.optim.steps is not None:
        return cfg.optim.steps
    return max(1, int(round(cfg.optim.epochs * steps_per_epoch)))


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

    def read(self) -> dict[str, float]:
        """The scalars as floats, averaged over ranks (one transfer, one all-reduce)."""
        names = ["loss", "cross_entropy", "me_max", *self.extra]
        values = torch.stack([self.loss, self.cross_entropy, self.me_max, *self.extra.values()])
        return dict(zip(names, distributed.all_reduce_mean(values.float()).tolist()))


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: Batch,
    support_labels: torch.Tensor,
    cfg: Config,
    scaler: torch.amp.GradScaler | None = None,
    dtype: torch.dtype | None = None,
    monitor: bool = False,
) -> StepResult:
    """One PAWS step (paper section 3, eq. 4), in place on ``model`` and ``optimizer``.

    Args:
        model: the :class:`PAWSModel` (possibly wrapped in DistributedDataParallel).
        optimizer: LARS.
        batch: this rank's views ``[large 1, large 2, small ...]`` (each (B, C, h, w)) and
            support views (n, C, H, W).
        support_labels: (S, K) smoothed labels of the supports gathered from all ranks.
        cfg: the run's config.
        scaler: gradient scaler for fp16.
        dtype: autocast dtype of the forward pass, or None for fp32.
        monitor: also compute the monitor-only metrics of Fig. 4 (no gradient).

    Returns:
        The step's scalars as tensors, without waiting for the device; ``.read()`` gives
        floats averaged over ranks.
    """
    device_type = batch.supports.device.type
    n_sup, n_img = batch.supports.shape[0], batch.views[0].shape[0]
    # One forward per crop size: the supports ride along with the two large views.
    with runtime.autocast(device_type, dtype):
        h, z = model([batch.supports, *batch.views])
    # Supports from every rank; gradients flow back into each rank's own supports.
    anchor_supports = distributed.all_gather(z[:n_sup])
    target_supports = distributed.all_gather(h[:n_sup].detach())
    cross_entropy, me_max = paws_loss(
        anchor_views=z[n_sup:],
        anchor_supports=anchor_supports,
        anchor_support_labels=support_labels,
        target_views=h[n_sup : n_sup + 2 * n_img],
        target_supports=target_supports,
        target_support_labels=support_labels,
        tau=cfg.loss.tau,
        T=cfg.loss.sharpen,
        me_max=cfg.loss.me_max,
        reduce=distributed.all_reduce_mean,
    )
    loss = cross_entropy + me_max
    backward_step(loss, optimizer, scaler)
    extra = (
        _monitor(
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
    return StepResult(loss.detach(), cross_entropy.detach(), me_max.detach(), extra)


@torch.no_grad()
def _monitor(
    h: torch.Tensor,
    z: torch.Tensor,
    anchor_supports: torch.Tensor,
    target_supports: torch.Tensor,
    labels: torch.Tensor,
    n_sup: int,
    n_img: int,
    cfg: Config,
) -> dict[str, torch.Tensor]:
    """Fig. 4 metrics on the step's own batch: target confidence (4c), instance-discrimination
    and support-classification losses (4b), entropy of the mean prediction (scalar tensors)."""
    h, z = h.float(), z.float()
    large = h[n_sup : n_sup + 2 * n_img]
    targets = sharpen(snn(large, target_supports.float(), labels, cfg.loss.tau), cfg.loss.sharpen)
    probs = snn(z[n_sup:], anchor_supports.float(), labels, cfg.loss.tau)
    pbar = sharpen(probs, cfg.loss.sharpen).mean(0)
    # SuNCEt is scored against hard labels: with smoothed ones its floor would not be 0.
    hard = torch.nn.functional.one_hot(labels.argmax(dim=1), labels.shape[1]).float()
    return {
        "target_confidence": targets.max(dim=1).values.mean(),
        "instance_loss": nt_xent(large[:n_img], large[n_img:], cfg.loss.tau),
        "support_loss": supervised_nce(anchor_supports.float(), hard, cfg.loss.tau),
        "mean_entropy": -(pbar * pbar.clamp_min(1e-12).log()).sum(),
    }


# --------------------------------------------------------------------------------------------
# The run.


@dataclass
class Run:
    """A pre-training run, built and ready for its first (or next) step.

    Attributes:
        cfg: the config.
        out: the run directory.
        device: compute device.
        data: the datasets.
        arch: the network's architecture.
        model: the model (the module to checkpoint and evaluate).
        optimizer: LARS.
        scaler: the fp16 gradient scaler, or None.
        dtype: the autocast dtype, or None for fp32.
        unl: unlabelled batches.
        sup: support batches.
        steps: the run's length in steps.
        schedule: learning rate per step.
        labels: (S, K) smoothed labels of the gathered supports (the same every step).
        start: the first step to take (after a resume, the checkpoint's).
        last_good: the last checkpoint written and its step, named if the run diverges.
    """

    cfg: Config
    out: Path
    device: torch.device
    data: Datasets
    arch: Architecture
    model: PAWSModel
    optimizer: LARS
    scaler: torch.amp.GradScaler | None
    dtype: torch.dtype | None
    unl: UnlabeledSampler
    sup: SupportSampler
    steps: int
    schedule: WarmupCosine
    labels: torch.Tensor
    start: int = 0
    last_good: tuple[Path, int] | None = field(default=None)

    def state(self, step: int) -> dict[str, Any]:
        """The checkpoint of this run after ``step`` steps."""
        return rundir.training_state(
            self.model,
            self.arch,
            self.optimizer,
            self.scaler,
            step,
            self.cfg,
            self.unl.steps_per_epoch,
            self.data,
        )

    def save_checkpoint(self, done: int) -> None:
        """Write ``last.pt`` after ``done`` steps (rank 0) and remember it as the last good
        checkpoint; a run whose weights are no longer finite stops instead."""
        if not rundir.finite(self.model, self.optimizer):
            raise rundir.diverged(
                f"the weights became infinite or NaN by step {done}", self.last_good
            )
        if distributed.is_main():
            checkpoint.save(self.state(done), self.out / rundir.LAST)
        distributed.barrier()
        self.last_good = (self.out / rundir.LAST, done)


def open_run(cfg: Config, out: Path, resume: bool) -> dict[str, Any] | None:
    """Check the run directory and write its config.

    Returns:
        The checkpoint to resume from, or None for a new run.

    Raises:
        UserError: a new run would overwrite one; a resume changes the run's shape; an unknown
            encoder or a tracker not installed (checked before any data is read).
    """
    check_encoder(cfg.model.encoder)
    tracking.require(cfg)
    state = None
    last = out / rundir.LAST
    if resume and not last.exists():
        info(f"{out} has no checkpoint yet: starting it from step 0")
    elif resume:
        state = checkpoint.load(last)
        if any(k not in state for k in ("optimizer", "step", "rng")):
            raise UserError(f"{last} holds no training state to resume from")
        diff = rundir.shape_diff(state["config"], to_dict(cfg))
        if diff:
            raise UserError(
                "cannot resume: the config changes the run's shape: "
                + "; ".join(diff)
                + "; resume with the run's own config, or start a new run with --out"
            )
    elif last.exists():
        raise UserError(
            f"{out} already holds a run; resume it with --resume {out} or choose another --out"
        )
    # Every rank has looked at the run directory before rank 0 writes into it.
    distributed.barrier()
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / rundir.CONFIG)
    return state


def build_run(cfg: Config, out: Path, data: Datasets, device: torch.device) -> Run:
    """Everything the loop needs before its first step: model, optimiser, samplers, schedule
    and support labels (nothing is written)."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    arch = Architecture.from_config(cfg, data.channels)
    model = training_model(cfg, arch, device)
    dtype = runtime.amp_dtype(cfg, device)
    unl = UnlabeledSampler(len(data.unlabeled), cfg.optim.batch_size, cfg.run.seed, rank, world)
    s = cfg.support
    sup = SupportSampler(
        data.labeled.labels,
        s.classes,
        s.images_per_class,
        cfg.run.seed,
        rank,
        world,
        s.unique_classes,
        data.classes,
    )
    steps = total_steps(cfg, unl.steps_per_epoch)
    o = cfg.optim
    warmup = int(round(o.warmup_epochs * unl.steps_per_epoch))
    schedule = WarmupCosine(o.start_lr, o.ref_lr, o.final_lr, warmup, steps)
    positions = torch.from_numpy(sup.gathered_positions(s.views))
    labels = smooth_labels(positions, s.classes, s.label_smoothing).to(device)
    optimizer = build_optimizer(cfg, model)
    scaler = runtime.grad_scaler(dtype)
    return Run(
        cfg,
        out,
        device,
        data,
        arch,
        model,
        optimizer,
        scaler,
        dtype,
        unl,
        sup,
        steps,
        schedule,
        labels,
    )


def restore_run(run: Run, state: dict[str, Any]) -> None:
    """Continue ``run`` from a checkpoint: weights, optimiser, scaler, random state, step; logs
    of steps after the checkpoint are dropped."""
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    if run.scaler is not None and state.get("scaler"):
        run.scaler.load_state_dict(state["scaler"])
    checkpoint.set_rng_state(state["rng"])
    run.start = int(state["step"])
    run.last_good = (run.out / rundir.LAST, run.start)
    if distributed.is_main():
        checkpoint.remove_partial_writes(run.out)
        rundir.truncate_rows(run.out / rundir.METRICS, run.start)
        rundir.truncate_rows(run.out / rundir.EVALS, run.start)
    info(f"resuming {run.out} at step {run.start}/{run.steps}")


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
            r = train_step(
                net, run.optimizer, batch, run.labels, cfg, run.scaler, run.dtype, monitor
            )
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


def _tighten_after_training(run: Run, step: int) -> dict[str, Any] | None:
    """The last step of Appendix C's protocol when ``tighten.after_training``: SuNCEt on the
    labelled images (:func:`paws.tighten.tighten`, ``run.model`` changed in place), saved as
    ``tighten.pt`` in the run directory.

    Returns:
        The tightening report (PAWS-NN not yet filled in, ``seconds`` and ``checkpoint``
        added), or None when tightening is off or the labels do not allow it (fewer than 2
        classes, or a class with a single image), which is said in a line.
    """
    if not run.cfg.tighten.after_training:
        return None
    start = time.time()
    try:
        report = tighten(run.cfg, run.model, run.data, run.device, evaluate=False)
    except UserError as e:
        info(f"not tightening the clusters after training: {e}")
        return None
    return save_tightened(report, run.model, run.arch, run.cfg, run.data, step, run.out, start)


def finish_run(run: Run, step: int, evals: rundir.MetricsLog) -> dict[str, Any] | None:
    """After the last step: ``last.pt`` and ``final.pt``, PAWS-NN on the test set, tightening
    (``tighten.after_training``) and PAWS-NN again, ``eval.json`` and ``predictions.json``.

    Returns:
        The summary written to ``eval.json`` (None without a test set, and on ranks other
        than 0).
    """
    if not rundir.finite(run.model, run.optimizer):
        raise rundir.diverged(f"the weights became infinite or NaN by step {step}", run.last_good)
    if not distributed.is_main():
        return None
    final = run.state(step)
    checkpoint.save(final, run.out / rundir.LAST)
    checkpoint.save(final, run.out / rundir.FINAL)
    cfg, data, device = run.cfg, run.data, run.device
    ev = None
    if data.test is not None:
        ev = paws_nn(run.model, data, cfg, device, progress=True)
        evals.log({"step": step, "top1": ev["top1"], "top5": ev["top5"]})
    summary: dict[str, Any] = {"model": rundir.FINAL, "step": step}
    report = _tighten_after_training(run, step)
    if report is not None:
        if ev is not None:
            before = {"top1": ev["top1"], "top5": ev["top5"]}
            ev = paws_nn(run.model, data, cfg, device, progress=True)
            report["paws_nn_before"] = before
            report["paws_nn_after"] = {k: ev[k] for k in ("top1", "top5", "num_query")}
            summary["pretrained"] = dict(before, model=rundir.FINAL)
        rundir.write_json(run.out / "tighten.json", report)
        summary["model"] = rundir.TIGHTENED
        summary["tighten"] = {k: report[k] for k in ("steps", "loss_first", "loss_last")}
    if ev is None:
        return None
    summary.update({k: ev[k] for k in ("top1", "top5", "num_support", "num_query", "features")})
    rundir.write_results(run.out, summary, ev, data.classes)
    return summary


def train(
    cfg: Config,
    out_dir: str | Path,
    resume: bool = False,
    data: Datasets | None = None,
    device: torch.device | None = None,
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

    Returns:
        ``{"status": "done" | "interrupted", "step", "eval": PAWS-NN summary or None,
        "skipped": number of unreadable images skipped, "signal": signal number when
        interrupted}``.
    """
    out = Path(out_dir)
    device = device or runtime.device_for(cfg.run.device)
    state = open_run(cfg, out, resume)
    data = data or load_datasets(cfg)
    info(f"data: {data.summary()}")
    if data.skipped and distributed.is_main():
        (out / "skipped_images.txt").write_text("\n".join(data.skipped) + "\n")
        info(f"skipped {len(data.skipped)} unreadable images (listed in skipped_images.txt)")
    run = build_run(cfg, out, data, device)
    if state is not None:
        restore_run(run, state)
    tracked = tracking.start(cfg, out, resume=state is not None)
    del state
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
