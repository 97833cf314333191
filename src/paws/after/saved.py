"""A step after pre-training applied to a saved model (``paws tighten RUN``, ``paws finetune
RUN``, and the steps a training run ends with): open the pre-trained checkpoint with its
config, data and device, then save what the step made as a checkpoint. One rule for every such
step, so they read and write a run directory the same way."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from paws import rundir, runtime
from paws.config import Config
from paws.data.sources import Datasets, load_datasets
from paws.files import check_out_dir
from paws.models import Architecture
from paws.rundir import checkpoint

__all__ = ["Opened", "open_pretrained", "save_step"]


@dataclass
class Opened:
    """A pre-trained model opened for a step after pre-training.

    Attributes:
        cfg: its config, with the overrides applied.
        net: the pre-trained network, on ``device`` in eval mode.
        arch: its architecture.
        step: the pre-training step it was saved at.
        out: where the step's files go.
        device: compute device.
        data: the datasets.
        start: ``time.time()`` when it was opened (the step's time counts from here).
    """

    cfg: Config
    net: torch.nn.Module
    arch: Architecture
    step: int | None
    out: Path
    device: torch.device
    data: Datasets
    start: float


def open_pretrained(
    path: str | Path,
    overrides: list[str] | None = None,
    out_dir: str | Path | None = None,
    data: Datasets | None = None,
    device: torch.device | None = None,
) -> Opened:
    """Open the pre-trained model ``path`` names (a run directory means its ``last.pt``).

    Args:
        path: pre-trained checkpoint file or run directory.
        overrides: ``key=value`` config overrides.
        out_dir: output folder (default: the checkpoint's run directory), checked now.
        data: preloaded datasets (tests); default: loaded from the checkpoint's config.
        device: compute device (default: from the config's ``run.device``).

    Raises:
        UserError: no such checkpoint, a fine-tuned classifier, or an unusable output folder.
    """
    start = time.time()
    restored = rundir.restore(path, overrides, pretrained=True).pretrained()
    cfg = restored.cfg
    out = check_out_dir(out_dir if out_dir is not None else rundir.output_dir(path))
    device = device or runtime.device_for(cfg.run.device)
    data = data or load_datasets(cfg)
    net = restored.net.to(device)
    return Opened(cfg, net, restored.arch, restored.state.get("step"), out, device, data, start)


def save_step(
    kind: str,
    model: torch.nn.Module,
    arch: Architecture,
    opened: Opened,
    report: dict[str, Any],
    file: str,
    **extra: Any,
) -> dict[str, Any]:
    """Save ``model`` as the checkpoint ``opened.out/file`` of ``kind`` (``extra`` goes into
    it) and add ``seconds`` and ``checkpoint`` to ``report``.

    Returns:
        ``report``, which the caller writes beside the checkpoint once it is complete.
    """
    out = opened.out
    out.mkdir(parents=True, exist_ok=True)
    record = checkpoint.model_record(
        kind, model, arch.to_dict(), opened.cfg, opened.data, opened.step, **extra
    )
    checkpoint.save(record, out / file)
    report.update(seconds=round(time.time() - opened.start, 1), checkpoint=str(out / file))
    return report
