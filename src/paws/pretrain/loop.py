"""The pre-training loop: steps from the run's start to its end or to a stop signal, with the
metrics rows, checkpoints and evaluations along the way."""

from __future__ import annotations

import math
import signal
import time
from typing import Any

from paws import distributed, rundir, runtime
from paws.after.evaluate import paws_nn
from paws.data.loaders import step_batches
from paws.method.optim import set_lr
from paws.pretrain.stages import Run
from paws.pretrain.step import train_step
from paws.progress import Progress, info

__all__ = ["run_steps"]


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
    if not every or done % every or done >= run.steps or run.data.test is None or run.label_free:
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
                net,
                run.optimizer,
                batch,
                run.labels,
                cfg.loss,
                run.ropaws,
                run.scaler,
                run.dtype,
                monitor,
                prior,
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
                    raise run.diverged(f"the loss became {values['loss']} by step {done}", done)
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
