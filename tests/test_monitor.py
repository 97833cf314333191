"""Monitor-only metrics of the paper's Fig. 4: hand values, no effect on training, and where
they land (metrics.csv, evals.csv, TensorBoard)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny import EVALUATED, tiny_overrides, train_tiny

from paws.config import load_config
from paws.method.losses import smooth_labels
from paws.method.monitor import monitor_metrics
from paws.rundir import load_run
from paws.rundir.checkpoint import load


def _metrics(h: torch.Tensor, z: torch.Tensor, n_sup: int, n_img: int, classes: int):
    cfg = load_config(None, ["loss.tau=0.1", "loss.sharpen=0.25"])
    per_class = n_sup // classes
    labels = smooth_labels(torch.arange(classes).repeat_interleave(per_class), classes, 0.1)
    return monitor_metrics(
        h, z, z[:n_sup], h[:n_sup], labels, n_sup, n_img, cfg.loss.tau, cfg.loss.sharpen
    )


def test_collapsed_embeddings_give_the_uninformative_values() -> None:
    # 2 classes x 2 supports, 3 images x 2 large views, every embedding the same vector.
    n_sup, n_img, k = 4, 3, 2
    h = torch.ones(n_sup + 2 * n_img, 5)
    m = _metrics(h, h.clone(), n_sup, n_img, k)
    assert m["target_confidence"] == pytest.approx(1 / k)  # sharpening a uniform is uniform
    assert m["mean_entropy"] == pytest.approx(math.log(k))
    # Each support sees 3 others, 1 of its class: -log(1/3). Each view sees 5 others: log 5.
    assert m["support_loss"] == pytest.approx(math.log(3), rel=1e-5)
    assert m["instance_loss"] == pytest.approx(math.log(5), rel=1e-5)


def test_separated_classes_give_confident_targets_and_no_support_loss() -> None:
    n_sup, n_img, k = 4, 2, 2
    e = torch.eye(3)
    supports = e[[0, 0, 1, 1]]
    images = e[[0, 1, 0, 1]]  # view 1 of images 0, 1, then view 2 of the same
    h = torch.cat([supports, images])
    m = _metrics(h, h.clone(), n_sup, n_img, k)
    assert m["target_confidence"] > 0.999
    # Scored against hard labels: smoothed ones would leave a floor of about 0.2 nats.
    assert m["support_loss"] < 1e-3
    assert m["mean_entropy"] == pytest.approx(math.log(2), rel=1e-4)
    # Each view: its other view at cosine 1 (logit 10), the other image's views at 0.
    assert m["instance_loss"] == pytest.approx(math.log1p(2 * math.exp(-10)), rel=1e-3)


def _train(out: Path, folders: dict[str, Path], *changes: str) -> Path:
    """A run of 6 steps, monitored every 2 and evaluated every 3 (unless ``changes`` say)."""
    return train_tiny(out, tiny_overrides(folders, *EVALUATED, *changes))


def test_monitoring_does_not_change_training(labeled_and_test, tmp_path: Path) -> None:
    a = _train(tmp_path / "a", labeled_and_test, "optim.steps=3", "run.monitor_every=1")
    b = _train(tmp_path / "b", labeled_and_test, "optim.steps=3", "run.monitor_every=0")
    wa, wb = load(a / "final.pt")["model"], load(b / "final.pt")["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert np.isfinite(load_run(a).metrics["support_loss"]).all()
    assert np.isnan(load_run(b).metrics["support_loss"]).all()


def test_metrics_land_in_csv_and_tensorboard(labeled_and_test, tmp_path: Path) -> None:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = _train(tmp_path / "run", labeled_and_test, "run.tensorboard=true")
    rec = load_run(run)
    assert list(rec.metrics["step"]) == [1, 2, 3, 4, 5, 6]
    # Monitored on steps 0, 2, 4 (rows 1, 3, 5): values there, blanks elsewhere.
    conf = rec.metrics["target_confidence"]
    assert np.isfinite(conf[[0, 2, 4]]).all() and np.isnan(conf[[1, 3, 5]]).all()
    assert ((conf[[0, 2, 4]] >= 1 / 3 - 1e-6) & (conf[[0, 2, 4]] <= 1)).all()
    entropy = rec.metrics["mean_entropy"][[0, 2, 4]]
    assert ((entropy > 0) & (entropy <= math.log(3) + 1e-6)).all()
    assert (rec.metrics["instance_loss"][[0, 2, 4]] > 0).all()
    assert list(rec.evals["step"]) == [3, 6]
    assert rec.predictions is not None and len(rec.predictions["labels"]) == 30

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    for tag in ("train/loss", "train/lr", "train/target_confidence", "train/support_loss"):
        assert tag in tags, tags
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2, 3, 4, 5, 6]
    assert [e.step for e in events.Scalars("train/instance_loss")] == [1, 3, 5]
    top1 = events.Scalars("eval/top1")
    assert [e.step for e in top1] == [3, 6]
    assert top1[-1].value == pytest.approx(rec.evals["top1"][-1], abs=1e-4)
