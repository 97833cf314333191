"""PAWS pre-training: build everything, then loop over steps.

Each step (``train_step``) reads like the paper: encode the support views together with the two
large views and, separately, the small views; classify every view against the supports by soft
nearest neighbours; take the other views' sharpened predictions as targets; minimise the
cross-entropy plus ME-MAX; step LARS. Everything a step uses is a function of ``(seed, step)``,
so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paws import checkpoint, distributed, rundir
from paws.config import Config, save_config, to_dict
from paws.data import Batch, Datasets, load_datasets, step_batches
from paws.errors import UserError
from paws.losses import nt_xent, paws_loss, sharpen, smooth_labels, snn, supervised_nce
from paws.models import PAWSModel, build_model
from paws.optim import LARS, WarmupCosine, backward_step, param_groups, set_lr
from paws.progress import Progress, info
from paws.sampling import SupportSampler, UnlabeledSampler

__all__ = [
    "training_model",
    "build_optimizer",
    "train_step",
    "train",
    "setup_runtime",
    "amp_dtype",
    "autocast",
    "total_steps",
]


def training_model(cfg: Config, channels: int, device: torch.device) -> PAWSModel:
    """The model as training runs it: on ``device``, batch norm global across processes
    (``run.sync_bn``), channels-last memory where it is faster (``run.channels_last``)."""
    model = build_model(cfg, channels).to(device)
    if cfg.run.sync_bn:
        model = distributed.convert_batchnorm(model, device)
    model.channels_last = (
        cfg.run.channels_last if cfg.run.channels_last is not None else device.type == "cuda"
    )
    if model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def build_optimizer(cfg: Config, model: torch.nn.Module) -> LARS:
    """LARS over the model's parameter groups, as ``optim`` configures it."""
    optimizer = LARS(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.start_lr,
        momentum=cfg.optim.momentum,
        trust_coefficient=cfg.optim.trust_coefficient,
    )
    if not cfg.optim.lars:
        for g in optimizer.param_groups:
            g["lars"] = False
    return optimizer


def amp_dtype(cfg: Config, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for the forward pass, or None for fp32."""
    if device.type != "cuda" or cfg.run.amp == "off":
        return None
    if cfg.run.amp == "fp16":
        return torch.float16
    if cfg.run.amp == "bf16" or torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float16


def autocast(device_type: str, dtype: torch.dtype | None) -> Any:
    """Autocast context for ``dtype``, or a no-op context for fp32."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=dtype)


def setup_runtime(cfg: Config) -> torch.device:
    """Process group, device, threads, denormals, determinism; returns the device."""
    device = distributed.init(cfg.run.device)
    if cfg.run.device == "cuda" and device.type != "cuda":
        raise UserError("run.device is 'cuda' but no GPU is available; use run.device=auto")
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    # Denormal floats made small-loss CPU steps 10x slower; flushing them costs nothing.
    torch.set_flush_denormal(True)
    if cfg.run.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=device.type == "cuda")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.run.deterministic
        # TF32 convolutions in the encoder, but float32 matrix products: the loss compares
        # embeddings by cosine / tau in float32, and TF32's 10-bit mantissa would round them.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = True
    torch.manual_seed(cfg.run.seed)
    return device


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
    with autocast(device_type, dtype):
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


class _Stop:
    """Turns SIGINT/SIGTERM into a flag checked between steps."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self.old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum  # reported by the loop: printing here could re-enter print

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)


def _until_stopped(batches: Iterator[Batch], stop: _Stop) -> Iterator[Batch]:
    """The batches, ending early if fetching one fails after a stop signal: data-loader
    workers get a process group's SIGTERM too, and stop."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except Exception:
            if stop.signum is None:
                raise
            return
        yield batch


def _tighten_after_training(
    cfg: Config, model: PAWSModel, data: Datasets, device: torch.device, out: Path, step: int
) -> dict[str, Any] | None:
    """The last step of Appendix C's protocol when ``tighten.after_training``: SuNCEt on the
    labelled images (:func:`paws.tighten.tighten`, ``model`` changed in place), saved as
    ``tighten.pt`` in ``out``.

    Returns:
        The tightening report (PAWS-NN not yet filled in, ``seconds`` and ``checkpoint``
        added), or None when tightening is off or the labels do not allow it (fewer than 2
        classes, or a class with a single image), which is said in a line.
    """
    from paws.tighten import save_tightened, tighten  # tightening imports this module

    if not cfg.tighten.after_training:
        return None
    start = time.time()
    try:
        report = tighten(cfg, model, data, device, evaluate=False)
    except UserError as e:
        info(f"not tightening the clusters after training: {e}")
        return None
    return save_tightened(report, model, cfg, data, step, out, start)


def train(
    cfg: Config, out_dir: str | Path, resume: bool = False, data: Datasets | None = None
) -> dict[str, Any]:
    """Pre-train PAWS as ``cfg`` describes, writing the run into ``out_dir``.

    Args:
        cfg: the run's config.
        out_dir: run directory (config.yaml, metrics.csv, last.pt, final.pt, eval.json).
        resume: continue from ``out_dir/last.pt``; refuses a config that changes the run.
        data: preloaded datasets (tests), else loaded from the config.

    Returns:
        ``{"status": "done" | "interrupted", "step", "eval": PAWS-NN result or None,
        "skipped": number of unreadable images skipped, "signal": signal number when
        interrupted}``.
    """
    from paws.evaluate import paws_nn  # evaluation imports the data loaders; keep it lazy

    out = Path(out_dir)
    device = setup_runtime(cfg)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    state = None
    if resume and not (out / "last.pt").exists():
        info(f"{out} has no checkpoint yet: starting it from step 0")
    elif resume:
        state = checkpoint.load(out / "last.pt")
        if any(k not in state for k in ("optimizer", "step", "rng")):
            raise UserError(f"{out / 'last.pt'} holds no training state to resume from")
        diff = rundir.shape_diff(state["config"], to_dict(cfg))
        if diff:
            raise UserError(
                "cannot resume: the config changes the run's shape: "
                + "; ".join(diff)
                + "; resume with the run's own config, or start a new run with --out"
            )
    elif (out / "last.pt").exists():
        raise UserError(
            f"{out} already holds a run; resume it with --resume {out} or choose another --out"
        )
    # Every rank has looked at the run directory before rank 0 writes into it.
    distributed.barrier()
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    data = data or load_datasets(cfg)
    info(f"data: {data.summary()}")
    if data.skipped and distributed.is_main():
        (out / "skipped_images.txt").write_text("\n".join(data.skipped) + "\n")
        info(f"skipped {len(data.skipped)} unreadable images (listed in skipped_images.txt)")

    model = training_model(cfg, data.channels, device)
    optimizer = build_optimizer(cfg, model)
    dtype = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if dtype == torch.float16 else None

    unl = UnlabeledSampler(len(data.unlabeled), cfg.optim.batch_size, cfg.run.seed, rank, world)
    sup = SupportSampler(
        data.labeled.labels,
        cfg.support.classes,
        cfg.support.images_per_class,
        cfg.run.seed,
        rank,
        world,
        cfg.support.unique_classes,
        data.classes,
    )
    steps = total_steps(cfg, unl.steps_per_epoch)
    schedule = WarmupCosine(
        cfg.optim.start_lr,
        cfg.optim.ref_lr,
        cfg.optim.final_lr,
        int(round(cfg.optim.warmup_epochs * unl.steps_per_epoch)),
        steps,
    )
    labels = smooth_labels(
        torch.from_numpy(sup.gathered_positions(cfg.support.views)),
        cfg.support.classes,
        cfg.support.label_smoothing,
    ).to(device)

    start, last_good = 0, None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        start = int(state["step"])
        last_good = (out / "last.pt", start)
        if distributed.is_main():
            checkpoint.remove_partial_writes(out)
            rundir.truncate_rows(out / "metrics.csv", start)
            rundir.truncate_rows(out / "evals.csv", start)
        info(f"resuming {out} at step {start}/{steps}")
    del state

    net = distributed.data_parallel(model, device, compile=cfg.run.compile)

    metrics = rundir.MetricsLog(
        out / "metrics.csv",
        out / "tensorboard" if cfg.run.tensorboard and distributed.is_main() else None,
        tag="train/",
    )
    evals = rundir.MetricsLog(out / "evals.csv", writer=metrics.writer, tag="eval/")
    progress = Progress(steps, "train", initial=start)
    global_batch = cfg.optim.batch_size
    result = {"status": "done", "step": start, "eval": None, "skipped": len(data.skipped)}
    shown: dict[str, float] = {}  # the latest PAWS-NN accuracy, shown next to the loss
    model.train()
    t_last, wait_sum, n_since = time.perf_counter(), 0.0, 0

    def save_checkpoint(done: int) -> tuple[Path, int]:
        """Write last.pt after ``done`` steps; returns it as the last good checkpoint."""
        if not rundir.finite(model, optimizer):
            raise rundir.diverged(f"the weights became infinite or NaN by step {done}", last_good)
        if distributed.is_main():
            checkpoint.save(
                rundir.training_state(
                    model, optimizer, scaler, done, cfg, unl.steps_per_epoch, data
                ),
                out / "last.pt",
            )
        distributed.barrier()
        return out / "last.pt", done

    stopping = False
    with _Stop() as stop:
        batches = step_batches(data, cfg, unl, sup, start, steps, device)
        for batch in _until_stopped(batches, stop):
            step = batch.step
            lr = schedule(step)
            set_lr(optimizer, lr)
            monitor = cfg.run.monitor_every > 0 and step % cfg.run.monitor_every == 0
            r = train_step(net, optimizer, batch, labels, cfg, scaler, dtype, monitor)
            wait_sum += batch.wait
            n_since += 1
            done = step + 1
            # Every rank stops at the same step, whichever received the signal.
            stopping = distributed.any_true(stop.signum is not None)
            log = done % cfg.run.log_every == 0 or done == steps or bool(r.extra)
            save = done % cfg.run.checkpoint_every == 0
            if log or save or stopping:
                # Reading the loss waits for the device: only on these steps.
                values = r.read()
                if not math.isfinite(values["loss"]):
                    raise rundir.diverged(
                        f"the loss became {values['loss']} by step {done}", last_good
                    )
                shown["loss"] = values["loss"]
            progress.update(1, **shown, lr=lr)
            if log:
                now = time.perf_counter()
                elapsed = now - t_last
                row = {
                    "step": done,
                    "epoch": done / unl.steps_per_epoch,
                    "loss": values["loss"],
                    "cross_entropy": values["cross_entropy"],
                    "me_max": values["me_max"],
                    "lr": lr,
                    "images_per_s": global_batch * n_since / max(elapsed, 1e-9),
                    "data_wait": wait_sum / max(elapsed, 1e-9),
                    "target_confidence": "",
                    "instance_loss": "",
                    "support_loss": "",
                    "mean_entropy": "",
                }
                row.update({k: v for k, v in values.items() if k in r.extra})
                metrics.log(row)
                t_last, wait_sum, n_since = now, 0.0, 0
            if save:
                last_good = save_checkpoint(done)
            if (
                cfg.run.eval_every
                and done % cfg.run.eval_every == 0
                and done < steps
                and data.test is not None
            ):
                if distributed.is_main():
                    ev = paws_nn(model, data, cfg, device)
                    evals.log({"step": done, "top1": ev["top1"], "top5": ev["top5"]})
                    info(f"step {done}: PAWS-NN top-1 {ev['top1']:.2f}%")
                    shown["top1"] = ev["top1"]
                distributed.barrier()
            result["step"] = done
            if stopping:
                break
        if stopping or stop.signum is not None:
            done = result["step"]
            info(f"stopping: saving a checkpoint at step {done}")
            if last_good is None or last_good[1] != done:
                last_good = save_checkpoint(done)
            progress.close()
            metrics.close()
            info(f"stopped at step {done}; continue with: paws train --resume {out}")
            signum = stop.signum or int(signal.SIGTERM)
            return {"status": "interrupted", "step": done, "eval": None, "signal": signum}
    progress.close()
    if not rundir.finite(model, optimizer):
        raise rundir.diverged(
            f"the weights became infinite or NaN by step {result['step']}", last_good
        )
    if distributed.is_main():
        final = rundir.training_state(
            model, optimizer, scaler, result["step"], cfg, unl.steps_per_epoch, data
        )
        checkpoint.save(final, out / "last.pt")
        checkpoint.save(final, out / "final.pt")
        ev = None
        if data.test is not None:
            ev = paws_nn(model, data, cfg, device, progress=True)
            evals.log({"step": result["step"], "top1": ev["top1"], "top5": ev["top5"]})
        summary: dict[str, Any] = {"model": "final.pt", "step": result["step"]}
        report = _tighten_after_training(cfg, model, data, device, out, result["step"])
        if report is not None:
            if ev is not None:
                before = {"top1": ev["top1"], "top5": ev["top5"]}
                ev = paws_nn(model, data, cfg, device, progress=True)
                report["paws_nn_before"] = before
                report["paws_nn_after"] = {k: ev[k] for k in ("top1", "top5", "num_query")}
                summary["pretrained"] = dict(before, model="final.pt")
            (out / "tighten.json").write_text(json.dumps(report, indent=2) + "\n")
            summary["model"] = "tighten.pt"
            summary["tighten"] = {k: report[k] for k in ("steps", "loss_first", "loss_last")}
        if ev is not None:
            summary.update({k: ev[k] for k in ("top1", "top5", "num_support", "num_query")})
            summary["features"] = ev["features"]
            (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
            (out / "predictions.json").write_text(
                json.dumps(
                    {
                        "classes": data.classes,
                        "labels": ev["labels"],
                        "predictions": ev["predictions"],
                        "confusion": ev["confusion"],
                    }
                )
                + "\n"
            )
            result["eval"] = summary
    metrics.close()
    distributed.barrier()
    return result
