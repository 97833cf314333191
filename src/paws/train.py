"""PAWS pre-training: build everything, then loop over steps.

Each step (``train_step``) reads like the paper: encode the support views together with the two
large views and, separately, the small views; classify every view against the supports by soft
nearest neighbours; take the other views' sharpened predictions as targets; minimise the
cross-entropy plus ME-MAX; step LARS. Everything a step uses is a function of ``(seed, step)``,
so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import math
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paws import checkpoint, distributed
from paws.config import Config, save_config, to_dict
from paws.data import Batch, Datasets, load_datasets, step_batches
from paws.errors import UserError
from paws.losses import nt_xent, paws_loss, sharpen, smooth_labels, snn, supervised_nce
from paws.models import (
    PAWSModel,
    PredictionHead,
    ProjectionHead,
    create_encoder,
    load_encoder_weights,
)
from paws.optim import LARS, WarmupCosine, param_groups, set_lr
from paws.progress import Progress, info
from paws.sampling import SupportSampler, UnlabeledSampler

__all__ = [
    "build_encoder",
    "build_model",
    "restore_model",
    "train_step",
    "train",
    "setup_runtime",
    "amp_dtype",
    "autocast",
    "total_steps",
    "RESUME_SAFE_KEYS",
]

# Keys that may differ when resuming: they change neither the model nor the batches.
RESUME_SAFE_KEYS = (
    "run.log_every",
    "run.checkpoint_every",
    "run.eval_every",
    "run.monitor_every",
    "run.tensorboard",
    "run.threads",
    "data.root",
    "data.workers",
    "data.memory_limit_gb",
    "data.labeled",
    "data.unlabeled",
    "data.test",
    "eval.",
    "baseline.",
    "finetune.",
    "tighten.",
)


def build_encoder(cfg: Config, channels: int) -> torch.nn.Module:
    """The encoder trunk the config names, initialised from ``model.weights`` if set."""
    m = cfg.model
    small = m.small_images if m.small_images is not None else cfg.views.large_size < 64
    kwargs = {"width": m.width} if m.width else {}
    encoder = create_encoder(m.encoder, in_channels=channels, small_images=small, **kwargs)
    if m.weights:
        missing, _ = load_encoder_weights(encoder, m.weights)
        if missing:
            info(
                f"encoder weights: {len(missing)} tensors not in {m.weights} keep their "
                "initialisation"
            )
    return encoder


def build_model(cfg: Config, channels: int) -> PAWSModel:
    """Encoder, projection head and (optional) prediction head from the config."""
    m = cfg.model
    encoder = build_encoder(cfg, channels)
    projection = ProjectionHead(encoder.num_features, m.proj_hidden, m.proj_out, m.proj_layers)
    prediction = PredictionHead(m.proj_out, m.pred_hidden) if m.pred_head else None
    return PAWSModel(encoder, projection, prediction)


def restore_model(
    path: str | Path, overrides: list[str] | None = None, channels: int | None = None
) -> tuple[Config, PAWSModel, dict[str, Any]]:
    """Rebuild a pre-trained (or tightened) model from a checkpoint (file or run directory).

    Args:
        path: checkpoint file, or a run directory (its ``last.pt``).
        overrides: ``key=value`` config overrides (e.g. ``data.root=...``); keys that change
            the architecture would not match the saved weights.
        channels: input channels (default: from the saved config's dataset).

    Returns:
        ``(config, model on the CPU in eval mode, checkpoint dict)``.
    """
    from paws.config import apply_overrides, from_dict

    state = checkpoint.load(path)
    if state.get("kind") == "finetune":
        raise UserError(
            f"{path} is a fine-tuned classifier, not a pre-trained model; apply it with "
            "paws predict, or pass the pre-trained checkpoint"
        )
    cfg = from_dict(apply_overrides(state["config"], list(overrides or [])))
    if channels is None:
        channels = int(state.get("channels") or _channels_of(state["model"]))
    # The saved weights replace any initial ones: do not read model.weights again.
    arch = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, weights=None))
    model = build_model(arch, channels)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise UserError(
            f"{path} does not match the configured model: {str(e).splitlines()[0]}"
        ) from e
    model.eval()
    return cfg, model, state


def _channels_of(state_dict: dict[str, torch.Tensor]) -> int:
    """Input channels of the first convolution in a saved encoder."""
    for k, v in state_dict.items():
        if k.startswith("encoder.") and v.dim() == 4:
            return int(v.shape[1])
    raise UserError("cannot tell the input channels of this checkpoint's encoder")


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
        torch.backends.cuda.matmul.allow_tf32 = True
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
    """Scalars of one step (floats; monitor-only entries when requested)."""

    loss: float
    cross_entropy: float
    me_max: float
    extra: dict[str, float]


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
        The step's scalars.
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
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
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
    return StepResult(loss.item(), cross_entropy.item(), me_max.item(), extra)


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
) -> dict[str, float]:
    """Fig. 4 metrics on the step's own batch: target confidence (4c), instance-discrimination
    and support-classification losses (4b), entropy of the mean prediction."""
    h, z = h.float(), z.float()
    large = h[n_sup : n_sup + 2 * n_img]
    targets = sharpen(snn(large, target_supports.float(), labels, cfg.loss.tau), cfg.loss.sharpen)
    probs = snn(z[n_sup:], anchor_supports.float(), labels, cfg.loss.tau)
    pbar = sharpen(probs, cfg.loss.sharpen).mean(0)
    return {
        "target_confidence": float(targets.max(dim=1).values.mean()),
        "instance_loss": float(nt_xent(large[:n_img], large[n_img:], cfg.loss.tau)),
        "support_loss": float(supervised_nce(anchor_supports, labels, cfg.loss.tau)),
        "mean_entropy": float(-(pbar * pbar.clamp_min(1e-12).log()).sum()),
    }


# --------------------------------------------------------------------------------------------
# The run.


class _Metrics:
    """Appends rows to a CSV file (and TensorBoard when asked), rank 0 only."""

    def __init__(self, path: Path, tensorboard_dir: Path | None = None):
        self.path, self.writer = path, None
        self.fields: list[str] | None = None
        if path.is_file():
            with open(path) as f:
                self.fields = next(csv.reader(f), None)
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise UserError(
                    "run.tensorboard is true but tensorboard is not installed: "
                    "pip install 'paws-ssl[tensorboard]'"
                ) from e
            self.writer = SummaryWriter(str(tensorboard_dir))

    def log(self, row: dict[str, Any]) -> None:
        if not distributed.is_main():
            return
        if self.fields is None:
            self.fields = list(row)
            with open(self.path, "w", newline="") as f:
                csv.writer(f).writerow(self.fields)
        with open(self.path, "a", newline="") as f:
            csv.writer(f).writerow([_fmt(row.get(k, "")) for k in self.fields])
        if self.writer is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.writer.add_scalar(k, v, row["step"])


def _fmt(v: Any) -> Any:
    return f"{v:.6g}" if isinstance(v, float) else v


def _shape_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    keys = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += _shape_diff(a, b, f"{prefix}{k}.")
        elif a != b and not any((prefix + k).startswith(s) for s in RESUME_SAFE_KEYS):
            keys.append(f"{prefix}{k} ({a!r} -> {b!r})")
    return keys


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
        self.signum = signum
        info(f"received signal {signum}: saving a checkpoint after this step")

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.old.items():
            signal.signal(s, handler)


def _state(
    model: PAWSModel,
    optimizer: LARS,
    scaler: Any,
    step: int,
    cfg: Config,
    steps_per_epoch: int,
    data: Datasets,
) -> dict[str, Any]:
    return {
        "format": checkpoint.FORMAT_VERSION,
        "kind": "pretrain",
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "step": step,
        "epoch": step / steps_per_epoch,
        "config": to_dict(cfg),
        "channels": data.channels,
        "classes": list(data.classes),
        "mean": list(data.mean),
        "std": list(data.std),
        "rng": checkpoint.rng_state(),
    }


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
        "signal": signal number when interrupted}``.
    """
    from paws.evaluate import paws_nn  # evaluation imports the data loaders; keep it lazy

    out = Path(out_dir)
    device = setup_runtime(cfg)
    rank, world = distributed.get_rank(), distributed.get_world_size()
    state = None
    if resume:
        state = checkpoint.load(out / "last.pt")
        diff = _shape_diff(state["config"], to_dict(cfg))
        if diff:
            raise UserError("cannot resume: the config changes the run's shape: " + "; ".join(diff))
    elif distributed.is_main() and (out / "last.pt").exists():
        raise UserError(
            f"{out} already holds a run; resume it with --resume {out} or choose another --out"
        )
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")

    data = data or load_datasets(cfg)
    info(f"data: {data.summary()}")
    if data.skipped and distributed.is_main():
        (out / "skipped_images.txt").write_text("\n".join(data.skipped) + "\n")
        info(f"skipped {len(data.skipped)} unreadable images (listed in skipped_images.txt)")

    model = build_model(cfg, data.channels).to(device)
    if cfg.run.sync_bn:
        model = distributed.convert_batchnorm(model, device)
    model.channels_last = (
        cfg.run.channels_last if cfg.run.channels_last is not None else device.type == "cuda"
    )
    if model.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = LARS(
        param_groups(model, cfg.optim.weight_decay),
        lr=cfg.optim.start_lr,
        momentum=cfg.optim.momentum,
        trust_coefficient=cfg.optim.trust_coefficient,
    )
    if not cfg.optim.lars:
        for g in optimizer.param_groups:
            g["lars"] = False
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

    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        start = int(state["step"])
        info(f"resuming {out} at step {start}/{steps}")
    del state

    net: torch.nn.Module = model
    if cfg.run.compile:
        net = torch.compile(model)
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            net,
            device_ids=[device.index] if device.type == "cuda" else None,
            broadcast_buffers=False,
        )

    metrics = _Metrics(
        out / "metrics.csv",
        out / "tensorboard" if cfg.run.tensorboard and distributed.is_main() else None,
    )
    evals = _Metrics(out / "evals.csv")
    progress = Progress(steps, "train", initial=start)
    global_batch = cfg.optim.batch_size
    last_good, result = None, {"status": "done", "step": start, "eval": None}
    model.train()
    t_last, wait_sum, n_since = time.perf_counter(), 0.0, 0
    with _Stop() as stop:
        for batch in step_batches(data, cfg, unl, sup, start, steps, device):
            step = batch.step
            lr = schedule(step)
            set_lr(optimizer, lr)
            monitor = cfg.run.monitor_every > 0 and step % cfg.run.monitor_every == 0
            r = train_step(net, optimizer, batch, labels, cfg, scaler, dtype, monitor)
            if not math.isfinite(r.loss):
                where = f"; the last good checkpoint is {last_good}" if last_good else ""
                raise UserError(
                    f"the loss became {r.loss} at step {step}{where}; lower "
                    "optim.ref_lr or check the data"
                )
            wait_sum += batch.wait
            n_since += 1
            done = step + 1
            progress.update(1, loss=r.loss, lr=lr)
            if done % cfg.run.log_every == 0 or done == steps or r.extra:
                now = time.perf_counter()
                elapsed = now - t_last
                row = {
                    "step": done,
                    "epoch": done / unl.steps_per_epoch,
                    "loss": r.loss,
                    "cross_entropy": r.cross_entropy,
                    "me_max": r.me_max,
                    "lr": lr,
                    "images_per_s": global_batch * n_since / max(elapsed, 1e-9),
                    "data_wait": wait_sum / max(elapsed, 1e-9),
                    "target_confidence": "",
                    "instance_loss": "",
                    "support_loss": "",
                    "mean_entropy": "",
                }
                row.update(distributed.reduce_scalars(r.extra))
                metrics.log(row)
                t_last, wait_sum, n_since = now, 0.0, 0
            if done % cfg.run.checkpoint_every == 0 or stop.signum is not None:
                if distributed.is_main():
                    checkpoint.save(
                        _state(model, optimizer, scaler, done, cfg, unl.steps_per_epoch, data),
                        out / "last.pt",
                    )
                last_good = out / "last.pt"
                distributed.barrier()
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
                distributed.barrier()
            result["step"] = done
            if stop.signum is not None:
                progress.close()
                info(f"stopped at step {done}; continue with: paws train --resume {out}")
                return {"status": "interrupted", "step": done, "eval": None, "signal": stop.signum}
    progress.close()
    if distributed.is_main():
        final = _state(model, optimizer, scaler, result["step"], cfg, unl.steps_per_epoch, data)
        checkpoint.save(final, out / "last.pt")
        checkpoint.save(final, out / "final.pt")
        if data.test is not None:
            ev = paws_nn(model, data, cfg, device, progress=True)
            evals.log({"step": result["step"], "top1": ev["top1"], "top5": ev["top5"]})
            summary = {k: ev[k] for k in ("top1", "top5", "num_support", "num_query", "features")}
            summary["step"] = result["step"]
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
    distributed.barrier()
    return result
