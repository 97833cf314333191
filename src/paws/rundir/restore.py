"""Rebuilding a saved model: the one way a checkpoint file or run directory becomes a network
with its config, and the config a resumed run continues with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paws.config import (
    Config,
    apply_overrides,
    from_dict,
    load_config,
    read_yaml,
    relative_data_paths,
)
from paws.errors import UserError
from paws.models import Architecture, build_network, load_weights
from paws.models.networks import input_channels
from paws.rundir import checkpoint
from paws.rundir.layout import CONFIG, model_file

__all__ = [
    "Restored",
    "run_config",
    "resume_config",
    "checkpoint_config",
    "restore",
    "restore_model",
]


@dataclass
class Restored:
    """A saved model rebuilt: its config, network, architecture and checkpoint.

    Attributes:
        cfg: the run's config with the overrides applied.
        net: a :class:`paws.models.PAWSModel` (kinds pretrain, tighten) or
            :class:`paws.models.Classifier` (finetune), on the CPU in eval mode.
        arch: its architecture.
        state: the checkpoint dict.
        path: the checkpoint file.
    """

    cfg: Config
    net: torch.nn.Module
    arch: Architecture
    state: dict[str, Any]
    path: Path

    @property
    def kind(self) -> str:
        """One of :data:`paws.rundir.checkpoint.KINDS`."""
        return str(self.state.get("kind") or "pretrain")

    def pretrained(self) -> Restored:
        """Self, or a one-line error if this is a fine-tuned classifier (which has no PAWS
        embedding to tighten, fine-tune or classify by soft nearest neighbours)."""
        if self.kind in checkpoint.CLASSIFIERS:
            what = "a fine-tuned classifier" if self.kind == "finetune" else "a student classifier"
            raise UserError(
                f"{self.path} is {what}, not a pre-trained model; apply it with paws predict, "
                "or pass the pre-trained checkpoint"
            )
        return self


def run_config(values: dict[str, Any], overrides: list[str] | None, where: Path) -> Config:
    """A saved run's config (``values``, from ``where``) with ``overrides`` applied, refusing
    data paths that are still relative: they were relative to the folder the run was trained
    in, which it did not record, and read from another folder they would name other data.

    Raises:
        UserError: naming the first relative path and how to give it.
    """
    merged = apply_overrides(values, list(overrides or []))
    relative = relative_data_paths(merged)
    if relative:
        key = relative[0].split("=", 1)[0]
        raise UserError(
            f"{where} names {relative[0]}, relative to the folder it was trained in, which was "
            f"not recorded; give the absolute path with --set {key}=PATH"
        )
    return from_dict(merged)


def resume_config(
    run_dir: str | Path, config: str | Path | None = None, overrides: list[str] | None = None
) -> Config:
    """The config a resumed run continues with: ``config`` (a file or recipe name) when given,
    else the run's own ``config.yaml``, with ``overrides`` applied.

    Raises:
        UserError: no run directory, or a ``config.yaml`` that is empty or unreadable:
            resuming with the defaults in its place would silently train another run.
    """
    run = Path(run_dir)
    file = run / CONFIG
    if config is None:
        if not file.is_file():
            raise UserError(f"{run} is not a run directory (no {CONFIG})")
        try:
            values = read_yaml(file)
        except UserError as e:
            raise UserError(f"cannot resume {run}: {e}; give the run's config with --config") from e
        if not values:
            raise UserError(
                f"cannot resume {run}: its {CONFIG} is empty (a write that did not finish?); "
                "give the run's config with --config FILE"
            )
        return run_config(values, overrides, file)
    return load_config(config, overrides)


def checkpoint_config(
    path: str | Path, overrides: list[str] | None = None, pretrained: bool = False
) -> Config:
    """The config saved in the checkpoint ``path`` names (:func:`model_file`), with
    ``overrides`` applied."""
    file = model_file(path, pretrained)
    return run_config(checkpoint.load(file)["config"], overrides, file)


def restore(
    path: str | Path, overrides: list[str] | None = None, pretrained: bool = False
) -> Restored:
    """Rebuild the model a checkpoint file or run directory holds (:func:`model_file`).

    Args:
        path: checkpoint file, or a run directory.
        overrides: ``key=value`` config overrides (e.g. ``data.root=...``); keys that change
            the architecture do not apply to the saved weights.
        pretrained: for a run directory, its pre-trained ``last.pt`` even if it was tightened.
    """
    file = model_file(path, pretrained)
    state = checkpoint.load(file)
    cfg = run_config(state["config"], overrides, file)
    if state.get("architecture"):
        arch = Architecture.from_dict(state["architecture"], f"{file}: its architecture")
    else:  # checkpoints written before architectures were recorded
        saved = from_dict(state["config"])
        channels = int(state.get("channels") or input_channels(state["model"]))
        classes = len(state.get("classes") or []) if state.get("kind") == "finetune" else None
        # (only fine-tuned classifiers predate architecture records)
        arch = Architecture.from_config(saved, channels, classes)
    net = build_network(arch, seed=0)  # the saved weights replace these
    load_weights(net, state["model"], str(file))
    net.eval()
    return Restored(cfg, net, arch, state, file)


def restore_model(
    path: str | Path, overrides: list[str] | None = None, pretrained: bool = False
) -> tuple[Config, torch.nn.Module, dict[str, Any]]:
    """A pre-trained (or tightened) model from a checkpoint, refusing a fine-tuned classifier.

    Returns:
        ``(config, model on the CPU in eval mode, checkpoint dict)``, see :func:`restore`.
    """
    r = restore(path, overrides, pretrained).pretrained()
    return r.cfg, r.net, r.state
