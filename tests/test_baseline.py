"""The supervised-only baseline (after/baseline.py): as many steps as the PAWS run and at least
``baseline.min_epochs`` epochs over the labelled images, or ``baseline.epochs``; its result and
config written beside each other."""

from __future__ import annotations

import json

import pytest
from tiny import tiny_overrides

from paws.after.baseline import train_baseline
from paws.config import load_config
from paws.errors import UserError

# 12 labelled images in batches of 4: 3 steps an epoch.
BATCHES_OF_4 = ["baseline.batch_size=4", "optim.steps=2"]


def test_baseline_epochs_set_the_length_and_the_result_is_written(image_folders, tmp_path):
    cfg = load_config(None, tiny_overrides(image_folders, *BATCHES_OF_4, "baseline.epochs=2"))
    result = train_baseline(cfg, tmp_path / "out")
    assert result["steps"] == 6 and result["epochs"] == 2.0
    assert result["num_labeled"] == 12 and result["num_query"] == 12
    assert 0 <= result["top1"] <= result["top5"] <= 100
    assert result["train_loss"] > 0
    assert json.loads((tmp_path / "out" / "baseline.json").read_text()) == result
    assert load_config(tmp_path / "out" / "baseline_config.yaml").baseline.epochs == 2


@pytest.mark.parametrize("min_epochs, steps", [(0, 2), (3, 9)])
def test_baseline_trains_as_long_as_paws_and_at_least_min_epochs(image_folders, min_epochs, steps):
    # The PAWS run is 2 steps; 3 epochs of 3 steps are more.
    changes = [*BATCHES_OF_4, f"baseline.min_epochs={min_epochs}"]
    result = train_baseline(load_config(None, tiny_overrides(image_folders, *changes)))
    assert result["steps"] == steps


def test_baseline_without_a_test_set_is_one_line(image_folders):
    cfg = load_config(None, tiny_overrides(image_folders, "data.test=null"))
    with pytest.raises(UserError, match="the baseline needs a test set"):
        train_baseline(cfg)
