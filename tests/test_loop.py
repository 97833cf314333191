"""The steps of a run (pretrain/loop.py): a loss or weights that turn NaN or infinite stop the
run in one line naming the last good checkpoint, which is finite."""

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
    assert line == (
        f"the loss became nan by step 7; the last good checkpoint is {run / 'last.pt'} (step 6); "
        "lower optim.ref_lr or check the data"
    )
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
        rf"good checkpoint is {re.escape(str(run / 'last.pt'))} \(step (\d+)\); lower "
        r"optim.ref_lr or check the data",
        line,
    )
    assert m, line
    assert finite_checkpoint(run / "last.pt") == int(m.group(2)) < int(m.group(1))
