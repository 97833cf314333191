"""The training step: the label-free one (``loss.objective: simclr``) learns on a tiny folder."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny import tiny_overrides, write_folder

from paws.config import load_config
from paws.config.adapt import fit_to_data, label_free
from paws.data.loaders import step_batches
from paws.data.sources import load_datasets, without_labels
from paws.pretrain.stages import build_run
from paws.pretrain.step import train_step


def test_the_label_free_step_lowers_nt_xent_on_a_tiny_folder(tmp_path: Path):
    unl = write_folder(tmp_path / "unl", 3, 6, size=14, seed=1)
    overrides = [o for o in tiny_overrides({}) if not o.startswith("data.dataset")]
    cfg = load_config(None, ["data.dataset=folder", f"data.unlabeled={unl}", *overrides])
    data = load_datasets(cfg)
    cfg = label_free(cfg, len(data.labeled))
    assert cfg.loss.objective == "simclr"
    data = without_labels(data)
    cfg = fit_to_data(cfg, len(data.unlabeled), data.labeled.labels)
    run = build_run(cfg, tmp_path / "run", data, torch.device("cpu"))
    assert run.label_free
    batch = next(step_batches(data, cfg, run.unl, run.sup, range(1), run.device))
    assert len(batch.views) == 2 and batch.supports.shape[0] == 0
    run.model.train()
    losses = []
    for _ in range(12):  # the same batch again and again: the loss must come down
        r = train_step(run.model, run.optimizer, batch, run.labels, cfg.loss)
        losses.append(r.read()["loss"])
    assert losses[-1] < 0.8 * losses[0], losses
