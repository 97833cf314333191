"""A pre-training run outside its loop: everything built before the first step.

:func:`open_run` checks the run directory and loads the checkpoint to resume from;
:func:`start_run` refuses a resume that would change the run and writes its config;
:func:`build_run` makes the model, optimiser, samplers, schedule and ME-MAX prior (also what a
benchmark needs to time a step); :func:`restore_run` continues from a checkpoint;
:func:`open_init` and :func:`start_from` start a new run from another run's pre-trained weights
(``paws train --init``: a round of a labelling loop);
:func:`paws.pretrain.finish.finish_run` ends it.
The loop itself is :func:`paws.pretrain.loop.run_steps`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from paws import distributed, rundir, runtime, tracking
from paws.config import Config, from_dict, save_config, to_dict
from paws.config.adapt import total_steps
from paws.data.sources import Datasets
from paws.errors import UserError, first_line
from paws.files import check_out_dir
from paws.method.losses import RoPAWS, smooth_labels
from paws.method.optim import LARS, WarmupCosine, param_groups
from paws.method.priors import ClassPrior
from paws.method.sampling import SupportSampler, UnlabeledSampler
from paws.models import Architecture, PAWSModel, build_network, check_encoder, load_weights
from paws.pretrain.memory import check_step_fits
from paws.pretrain.step import ropaws_of
from paws.progress import info
from paws.rundir import checkpoint

__all__ = [
    "Run",
    "training_model",
    "build_optimizer",
    "open_run",
    "start_run",
    "build_run",
    "restore_run",
    "open_init",
    "start_from",
]


def training_state(
    model: torch.nn.Module,
    arch: Architecture,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    step: int,
    cfg: Config,
    steps_per_epoch: int,
    data: Datasets,
    **extra: Any,
) -> dict[str, Any]:
    """Everything a resumed run needs, as tensors and plain values (see paws.rundir.checkpoint);
    ``extra`` adds further training state (e.g. the ME-MAX prior's estimate)."""
    return checkpoint.model_record(
        "pretrain",
        model,
        arch.to_dict(),
        cfg,
        data,
        step,
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict() if scaler is not None else None,
        epoch=step / steps_per_epoch,
        rng=checkpoint.rng_state(),
        **extra,
    )


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


def build_optimizer(cfg: Config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimiser ``optim.name`` names over the model's parameter groups (biases and norm
    parameters without weight decay): LARS with classical momentum, or AdamW (``momentum``
    and ``beta2`` its betas) for vision transformers."""
    o = cfg.optim
    if o.name == "adamw":
        groups = param_groups(model, o.weight_decay, lars=False)
        return torch.optim.AdamW(groups, lr=o.start_lr, betas=(o.momentum, o.beta2))
    return LARS(
        param_groups(model, o.weight_decay, lars=o.lars),
        lr=o.start_lr,
        momentum=o.momentum,
        trust_coefficient=o.trust_coefficient,
    )


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
        optimizer: LARS or AdamW (:func:`build_optimizer`).
        scaler: the fp16 gradient scaler, or None.
        dtype: the autocast dtype, or None for fp32.
        unl: unlabelled batches.
        sup: support batches, or None in a label-free run (``loss.objective: simclr``).
        steps: the run's length in steps.
        schedule: learning rate per step.
        labels: (S, K) smoothed labels of the gathered supports (the same every step).
        prior: the class prior of ME-MAX (and its estimate).
        ropaws: RoPAWS's hyperparameters when ``loss.ropaws`` is on, else None.
        start: the first step to take (after a resume, the checkpoint's).
        last_good: the last checkpoint written and its step, named if the run diverges.
    """

    cfg: Config
    out: Path
    device: torch.device
    data: Datasets
    arch: Architecture
    model: PAWSModel
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    dtype: torch.dtype | None
    unl: UnlabeledSampler
    sup: SupportSampler | None
    steps: int
    schedule: WarmupCosine
    labels: torch.Tensor
    prior: ClassPrior
    ropaws: RoPAWS | None = None
    start: int = 0
    last_good: tuple[Path, int] | None = field(default=None)

    @property
    def label_free(self) -> bool:
        """The run learns without labels (``loss.objective: simclr``): no supports, nothing
        to evaluate, tighten or choose between."""
        return self.sup is None

    def state(self, step: int) -> dict[str, Any]:
        """The checkpoint of this run after ``step`` steps."""
        return training_state(
            self.model,
            self.arch,
            self.optimizer,
            self.scaler,
            step,
            self.cfg,
            self.unl.steps_per_epoch,
            self.data,
            prior=self.prior.state_dict(),
        )

    def diverged(self, what: str, step: int) -> UserError:
        """The one-line error of this run's loss or weights no longer finite by ``step``,
        naming the setting most likely to blame: a normalisation that scales pixels far
        beyond the usual few units (``data.mean``, ``data.std``), else the learning rate of
        that step (``optim.start_lr`` in the warm-up, ``optim.ref_lr`` after it)."""
        m, s = self.data.mean, self.data.std
        scale = max(max(abs(mu), abs(1 - mu)) / sd for mu, sd in zip(m, s))
        if scale > PIXEL_SCALE:
            fix = (
                f"data.mean {list(m)} and data.std {list(s)} scale the pixels to {scale:.3g} "
                "(the usual statistics: a few units); check them"
            )
        else:
            lr = self.schedule(max(0, step - 1))
            keys = (
                "optim.start_lr or optim.ref_lr"
                if step <= self.schedule.warmup_steps
                else ("optim.ref_lr")
            )
            fix = f"the learning rate was {lr:.3g}: lower {keys}, or check the data"
        return rundir.diverged(what, self.last_good, fix)

    def save_checkpoint(self, done: int) -> None:
        """Write ``last.pt`` after ``done`` steps (rank 0) and remember it as the last good
        checkpoint; a run whose weights are no longer finite stops instead."""
        if not rundir.finite(self.model, self.optimizer):
            raise self.diverged(f"the weights became infinite or NaN by step {done}", done)
        if distributed.is_main():
            checkpoint.save(self.state(done), self.out / rundir.LAST)
        distributed.barrier()
        self.last_good = (self.out / rundir.LAST, done)


def open_run(cfg: Config, out: Path, resume: bool) -> dict[str, Any] | None:
    """Check the run directory before any data is read.

    Returns:
        The checkpoint to resume from, or None for a new run.

    Raises:
        UserError: a new run would overwrite one; the checkpoint holds no training state; an
            unknown encoder or a tracker that is not installed.
    """
    check_encoder(cfg.model.encoder)
    tracking.require(cfg)
    check_out_dir(out, "run directory")
    state = None
    last = out / rundir.LAST
    if resume and not last.exists():
        info(f"{out} has no checkpoint yet: starting it from step 0")
        if distributed.is_main():  # rows of steps no checkpoint kept are logged again
            rundir.truncate_rows(out / rundir.METRICS, 0)
            rundir.truncate_rows(out / rundir.EVALS, 0)
    elif resume:
        state = checkpoint.load(last)
        if any(k not in state for k in ("optimizer", "step", "rng")):
            raise UserError(f"{last} holds no training state to resume from")
    elif last.exists():
        raise UserError(
            f"{out} already holds a run; resume it with --resume {out} or choose another --out"
        )
    elif distributed.is_main():
        _drop_dead_logs(out)
    return state


def _drop_dead_logs(out: Path) -> None:
    """Remove the logs of an earlier run in ``out`` that stopped before its first checkpoint:
    a new run appending to them would mix two runs' rows under one header."""
    old = [out / name for name in (rundir.METRICS, rundir.EVALS) if (out / name).is_file()]
    for path in old:
        path.unlink()
    if old:
        info(
            f"{out}: an earlier run stopped before its first checkpoint; its "
            f"{' and '.join(p.name for p in old)} are replaced by this run's"
        )


def start_run(cfg: Config, out: Path, state: dict[str, Any] | None) -> None:
    """Refuse a resume that changes the run's shape, then write the run's config (``cfg``
    fitted to the data, :func:`paws.config.adapt.fit_to_data`) into the run directory."""
    if state is not None:
        # The saved config read as a config: keys added to paws since take their defaults.
        diff = rundir.shape_diff(to_dict(from_dict(state["config"])), to_dict(cfg))
        if diff:
            raise UserError(
                "cannot resume: the config changes the run's shape: "
                + "; ".join(diff)
                + "; resume with the run's own config, or start a new run with --out"
            )
    # Every rank has looked at the run directory before rank 0 writes into it.
    distributed.barrier()
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / rundir.CONFIG)


# Normalised pixels beyond this many units are a normalisation mistake, not data (ImageNet's
# statistics give at most 2.6; Fashion-MNIST's 2.8).
PIXEL_SCALE = 100.0


def build_run(cfg: Config, out: Path, data: Datasets, device: torch.device) -> Run:
    """Everything the loop needs before its first step: model, optimiser, samplers, schedule
    and support labels (nothing is written)."""
    rank, world = distributed.get_rank(), distributed.get_world_size()
    arch = Architecture.from_config(cfg, data.channels)
    check_step_fits(cfg, arch, device)
    model = training_model(cfg, arch, device)
    dtype = runtime.amp_dtype(cfg, device)
    unl = UnlabeledSampler(len(data.unlabeled), cfg.optim.batch_size, cfg.run.seed, rank, world)
    sup, labels = _supports(cfg, data, device)
    steps = total_steps(cfg, unl.steps_per_epoch)
    o = cfg.optim
    warmup = int(round(o.warmup_epochs * unl.steps_per_epoch))
    schedule = WarmupCosine(o.start_lr, o.ref_lr, o.final_lr, warmup, steps)
    optimizer = build_optimizer(cfg, model)
    scaler = runtime.grad_scaler(dtype)
    loss = cfg.loss
    prior = ClassPrior(
        loss.me_max_prior if sup is not None else "uniform",
        data.labeled.labels,
        len(data.classes),
        loss.me_max_prior_momentum,
        device,
    )
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
        prior,
        ropaws_of(cfg.loss),
    )


def _supports(
    cfg: Config, data: Datasets, device: torch.device
) -> tuple[SupportSampler | None, torch.Tensor]:
    """The support sampler and the (S, K) smoothed labels of the gathered supports; for a
    label-free run (``loss.objective: simclr``), None and an empty (0, 0) tensor."""
    if cfg.loss.objective == "simclr":
        return None, torch.zeros(0, 0, device=device)
    rank, world = distributed.get_rank(), distributed.get_world_size()
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
    positions = torch.from_numpy(sup.gathered_positions(s.views))
    return sup, smooth_labels(positions, s.classes, s.label_smoothing).to(device)


def restore_run(run: Run, state: dict[str, Any]) -> None:
    """Continue ``run`` from a checkpoint: weights, optimiser, scaler, random state, step; logs
    of steps after the checkpoint are dropped.

    Raises:
        UserError: the checkpoint's weights or training state do not fit the run.
    """
    last = run.out / rundir.LAST
    load_weights(run.model, state["model"], str(last))
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        if run.scaler is not None and state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        checkpoint.set_rng_state(state["rng"])
        run.prior.load_state_dict(state.get("prior") or {})
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        first = first_line(e, 120)
        raise UserError(
            f"{last} is damaged: its training state does not fit the run ({first}); "
            "resume from a copy of the run's earlier checkpoint, or start a new run"
        ) from e
    run.start = int(state["step"])
    run.last_good = (run.out / rundir.LAST, run.start)
    if distributed.is_main():
        checkpoint.remove_partial_writes(run.out)
        rundir.truncate_rows(run.out / rundir.METRICS, run.start)
        rundir.truncate_rows(run.out / rundir.EVALS, run.start)
    info(f"resuming {run.out} at step {run.start}/{run.steps}")


def open_init(
    cfg: Config, out: Path, init: str | Path | None, state: dict[str, Any] | None
) -> tuple[Config, dict[str, Any] | None]:
    """The checkpoint a new run starts from: ``init`` (a run directory means its pre-trained
    ``last.pt``, before tightening), or for a resumed run that has no checkpoint yet, the one
    its ``init.json`` names.

    Returns:
        ``(config, checkpoint or None)``; a run started from a checkpoint keeps the schedule
        as given: ``optim.min_steps`` never lengthens it.

    Raises:
        UserError: no such checkpoint, or a fine-tuned classifier.
    """
    if state is not None:
        return cfg, None  # a resumed run continues from its own checkpoint
    if init is None and (out / rundir.INIT).is_file():
        init = rundir.read_json(out / rundir.INIT)["checkpoint"]
    if init is None:
        return cfg, None
    path = rundir.model_file(init, pretrained=True)
    if not path.is_file():
        raise UserError(f"--init {init}: no checkpoint {path}; name a paws run directory or .pt")
    start = checkpoint.load(path)
    if start.get("kind") in checkpoint.CLASSIFIERS or not start.get("architecture"):
        raise UserError(f"--init {path} is not a pre-trained model; name a paws train run")
    Architecture.from_dict(start["architecture"], f"{path}: its architecture")
    start["path"] = str(path.resolve())
    cfg = replace(cfg, optim=replace(cfg.optim, min_steps=None))
    return cfg, start


def start_from(run: Run, start: dict[str, Any]) -> None:
    """Begin ``run`` at step 0 with the pre-trained weights of ``start`` (:func:`open_init`)
    and record where they came from in ``init.json``; optimiser, schedule, step and random
    state are the new run's own.

    Raises:
        UserError: the checkpoint's architecture is not this run's.
    """
    saved, wanted = start["architecture"], run.arch.to_dict()
    diff = [f"{k} {saved.get(k)!r} -> {wanted[k]!r}" for k in wanted if saved.get(k) != wanted[k]]
    if diff:
        raise UserError(
            f"cannot start from {start['path']}: its architecture differs ({'; '.join(diff)}); "
            "use the same model settings and image channels"
        )
    load_weights(run.model, start["model"], start["path"])
    path = Path(start["path"])
    if distributed.is_main():
        record = {"from": str(rundir.output_dir(path)), "checkpoint": str(path)}
        rundir.write_json(run.out / rundir.INIT, {**record, "step": start.get("step")})
    info(f"starting from the weights of {path} (step {start.get('step')}), a new schedule")
