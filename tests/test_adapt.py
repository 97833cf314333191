"""Defaults that fit any folder: support classes, batch size and run length adapt to the data."""

from __future__ import annotations

import math

import numpy as np
import pytest
from tiny import tiny_overrides, train_tiny, write_folder

from paws.config import load_config
from paws.config.adapt import fit_to_data
from paws.errors import UserError
from paws.pretrain.stages import total_steps


def test_the_default_run_is_left_as_it_is(capsys):
    cfg = load_config()
    fitted = fit_to_data(cfg, 60000, np.repeat(np.arange(10), 10))
    assert fitted.support.classes == 10
    assert fitted.optim == cfg.optim  # 830 steps of 128: nothing to lengthen or shrink
    assert total_steps(fitted, 60000 // 128) == 830
    assert capsys.readouterr().err == ""


def test_support_classes_default_to_every_labelled_class_within_the_cap(capsys):
    cfg = load_config()
    assert fit_to_data(cfg, 60000, np.arange(6)).support.classes == 6
    # 400 classes x 5 images would be 2,000 support images a step: capped at 4 x 128.
    many = fit_to_data(cfg, 60000, np.arange(400))
    assert many.support.classes == 4 * 128 // 5
    assert "support batches of 102 of the 400 labelled classes" in capsys.readouterr().err
    # An explicit value stays.
    assert (
        fit_to_data(load_config(None, ["support.classes=3"]), 60000, np.arange(6)).support.classes
        == 3
    )


def test_a_small_unlabelled_set_shrinks_the_batch_and_scales_the_learning_rates(capsys):
    cfg = load_config()
    fitted = fit_to_data(cfg, 50, np.arange(5))
    assert fitted.optim.batch_size == 50
    scale = math.sqrt(50 / 128)
    assert fitted.optim.ref_lr == pytest.approx(cfg.optim.ref_lr * scale)
    assert fitted.optim.start_lr == pytest.approx(cfg.optim.start_lr * scale)
    assert "fewer than optim.batch_size (128): batches of 50" in capsys.readouterr().err
    # Under 4 processes the batch stays divisible by their number.
    assert fit_to_data(cfg, 50, np.arange(5), world_size=4).optim.batch_size == 48


def test_a_small_set_trains_as_long_as_the_default_run_with_the_same_warmup_share(capsys):
    cfg = load_config()
    fitted = fit_to_data(cfg, 1350, np.arange(9))  # 10 steps an epoch: 1.774 epochs = 18 steps
    assert fitted.optim.steps == 830 and total_steps(fitted, 1350 // 128) == 830
    warmup = round(fitted.optim.warmup_epochs * (1350 // 128))
    assert warmup == pytest.approx(830 * 0.25 / 1.774, abs=1)  # the recipe's share of the run
    assert "are 18 steps: training 830 steps instead" in capsys.readouterr().err
    assert fit_to_data(fitted, 1350, np.arange(9)) == fitted  # fitting is idempotent
    off = load_config(None, ["optim.min_steps=null"])
    assert fit_to_data(off, 1350, np.arange(9)).optim.steps is None
    explicit = load_config(None, ["optim.steps=40"])
    assert fit_to_data(explicit, 1350, np.arange(9)).optim.steps == 40


@pytest.mark.slow
def test_a_folder_of_six_classes_with_one_and_two_labels_trains_with_no_override(tmp_path):
    labeled = write_folder(tmp_path / "labeled", [0, 1, 2, 3], 4, seed=1)
    write_folder(labeled, [4], 1, seed=2, names=["one"])
    write_folder(labeled, [5], 2, seed=3, names=["two"])
    test = write_folder(
        tmp_path / "test", 6, 2, seed=4, names=[*(f"class{c}" for c in range(4)), "one", "two"]
    )
    # The tiny settings, but support.classes and support.images_per_class at their defaults.
    overrides = tiny_overrides(
        {"labeled": labeled, "test": test}, "support.classes=null", "support.images_per_class=5"
    )
    run = train_tiny(tmp_path / "run", overrides)
    saved = load_config(run / "config.yaml")
    assert saved.support.classes == 6  # the resolved config is what ran
    assert (run / "tighten.pt").is_file()  # tightening coped with the classes of 1 and 2
    assert (run / "eval.json").is_file()


@pytest.mark.parametrize("world", [2, 3, 4, 8])
def test_the_default_config_fits_any_number_of_processes(world, capsys):
    cfg = load_config()
    fitted = fit_to_data(cfg, 60000, np.repeat(np.arange(10), 10), world_size=world)
    k, batch = fitted.support.images_per_class, fitted.optim.batch_size
    assert k % world == 0 and k - world < 5 <= k  # the next multiple of the processes
    assert batch % world == 0 and batch > 128 - world
    assert fitted.optim.ref_lr == pytest.approx(cfg.optim.ref_lr * math.sqrt(batch / 128))
    err = capsys.readouterr().err
    assert (k != 5) == (f"support.images_per_class (5) is not divisible by the {world}" in err)
    assert (batch != 128) == (f"optim.batch_size (128) is not divisible by the {world}" in err)
    assert fit_to_data(fitted, 60000, np.repeat(np.arange(10), 10), world_size=world) == fitted
    shared = load_config(None, ["support.unique_classes=true"])  # classes are shared instead
    assert fit_to_data(shared, 60000, np.arange(10), world_size=world).support.images_per_class == 5


def test_a_resumed_run_keeps_its_sizes_and_names_the_process_counts_that_share_them():
    labels = np.repeat(np.arange(10), 10)
    two = fit_to_data(load_config(), 60000, labels, world_size=2)  # 6 images a class, 128
    for world in (1, 2):
        assert fit_to_data(two, 60000, labels, world_size=world, resumed=True) == two
    with pytest.raises(UserError) as e:
        fit_to_data(two, 60000, labels, world_size=4, resumed=True)
    assert str(e.value) == (
        "this run's optim.batch_size (128) and support.images_per_class (6) cannot be shared by "
        "4 processes; resume it on 1, 2 processes"
    )
