"""The steps of a run (pretrain/loop.py): a loss or weights that turn NaN or infinite stop the
run in one line naming the last good checkpoint, which is finite, and the setting to blame."""

from __future__ import annotations

import math
import re

from tiny import (
    expect_error,
    finite_checkpoint,
    paws_train,
    tiny_config,
)

import paws.files
import paws.pretrain.step


def test_nan_loss_names_the_step_and_the_last_good_checkpoint(
    folder, tmp_path, capsys, monkeypatch
):
    calls, real_loss = [], paws.pretrain.step.paws_loss

    def loss_nan_at_step_7(*args, **kwargs):
        calls.append(1)
        ce, me = real_loss(*args, **kwargs)
        return (ce * math.nan, me) if len(calls) == 7 else (ce, me)

    monkeypatch.setattr(paws.pretrain.step, "paws_loss", loss_nan_at_step_7)
    cfg = tiny_config(folder, "run.checkpoint_every=3")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    run = tmp_path / "run"
    prefix = (
        f"the loss became nan by step 7; the last good checkpoint is {run / 'last.pt'} (step 6)"
    )
    assert re.fullmatch(
        re.escape(prefix) + r"; the learning rate was [0-9.e+-]+: lower optim\.(start_lr or "
        r"optim\.)?ref_lr, or check the data",
        line,
    ), line
    assert finite_checkpoint(run / "last.pt") == 6


def test_divergence_never_names_a_corrupt_checkpoint(folder, tmp_path, capsys, monkeypatch):
    # An absurd learning rate sends weights and batch-norm statistics to infinity a step or
    # more before the loss itself turns NaN; checkpoints are written every step.
    cfg = tiny_config(folder, "run.checkpoint_every=1")
    cfg["optim"].update(start_lr=1e6, ref_lr=1e6, final_lr=1e6)
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    run = tmp_path / "run"
    m = re.fullmatch(
        r"the (?:loss became nan|weights became infinite or NaN) by step (\d+); the last "
        rf"good checkpoint is {re.escape(str(run / 'last.pt'))} \(step (\d+)\); the learning "
        r"rate was 1e\+06: lower optim\.(start_lr or optim\.)?ref_lr, or check the data",
        line,
    )
    assert m, line
    assert finite_checkpoint(run / "last.pt") == int(m.group(2)) < int(m.group(1))


def test_a_normalisation_that_blows_the_pixels_up_is_named(folder, tmp_path, capsys, monkeypatch):
    cfg = tiny_config(folder, "data.std=[1e-30, 1e-30, 1e-30]")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert re.fullmatch(
        r"the (loss became nan|weights became infinite or NaN) by step \d+; .*; data\.mean "
        r"\[.*\] and data\.std \[1e-30, 1e-30, 1e-30\] scale the pixels to [0-9.e+]+ \(the "
        r"usual statistics: a few units\); check them",
        line,
    ), line
