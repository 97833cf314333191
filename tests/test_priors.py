"""The ME-MAX prior: per-step restriction to the support classes, its running estimate, and a
prior of the wrong length, negative or misspelt refused in one line."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny import (
    expect_error,
    paws_train,
    tiny_config,
)

from paws.errors import UserError
from paws.method.priors import ClassPrior


def test_uniform_is_the_papers_me_max_and_labeled_counts_the_labels():
    labels = np.array([0, 0, 0, 1, 2, 2])
    assert ClassPrior("uniform", labels, 3).for_step(torch.tensor([2, 0, 1])) is None
    labeled = ClassPrior("labeled", labels, 3)
    torch.testing.assert_close(labeled.probs, torch.tensor([3, 1, 2]) / 6.0)
    # A step's supports in the order [2, 0]: the prior of those classes, renormalised.
    torch.testing.assert_close(labeled.for_step(torch.tensor([2, 0])), torch.tensor([0.4, 0.6]))


def test_given_frequencies_are_normalised_and_must_have_one_per_class():
    prior = ClassPrior([2.0, 1.0, 1.0], np.zeros(1, dtype=int), 3)
    torch.testing.assert_close(prior.probs, torch.tensor([0.5, 0.25, 0.25]))
    with pytest.raises(UserError, match="has 2 numbers but there are 3 classes"):
        ClassPrior([1.0, 1.0], np.zeros(1, dtype=int), 3)


def test_the_estimate_starts_uniform_moves_towards_the_mass_and_keeps_other_classes():
    prior = ClassPrior("estimated", np.zeros(1, dtype=int), 4, momentum=0.5)
    torch.testing.assert_close(prior.probs, torch.full((4,), 0.25))
    # A step whose supports are classes 3 and 1, in that order, with 90% of the mass on 3.
    prior.update(torch.tensor([3, 1]), torch.tensor([0.9, 0.1]))
    # The two classes keep their total weight (0.5) and move half-way towards 0.9 / 0.1.
    torch.testing.assert_close(prior.probs, torch.tensor([0.25, 0.15, 0.25, 0.35]))
    torch.testing.assert_close(prior.probs.sum(), torch.tensor(1.0))
    saved = prior.state_dict()
    other = ClassPrior("estimated", np.zeros(1, dtype=int), 4)
    other.load_state_dict(saved)
    assert torch.equal(other.probs, prior.probs)
    fixed = ClassPrior("labeled", np.array([0, 1]), 2)
    fixed.update(torch.tensor([0, 1]), torch.tensor([1.0, 0.0]))  # only estimates move
    torch.testing.assert_close(fixed.probs, torch.tensor([0.5, 0.5]))


def test_a_me_max_prior_of_the_wrong_length_or_negative_is_one_line(
    folder, tmp_path, capsys, monkeypatch
):
    cfg = tiny_config(folder, "loss.me_max_prior=[0.5,0.5]")  # the folder has 3 classes
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert line.startswith("loss.me_max_prior has 2 numbers but there are 3 classes")
    cfg = tiny_config(folder, "loss.me_max_prior=[0.5,-0.2,0.7]")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert "non-negative" in line and "-0.2" in line
    cfg = tiny_config(folder, "loss.me_max_prior=estimatd")
    line = expect_error(paws_train(tmp_path, capsys, monkeypatch, cfg))
    assert "did you mean 'estimated'" in line


def test_huge_frequencies_are_normalised_without_overflow():
    import warnings

    labels = np.zeros(3, dtype=np.int64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an overflow would warn
        huge = ClassPrior([1e308, 5e307, 5e307], labels, 3).probs
        small = ClassPrior([2.0, 1.0, 1.0], labels, 3).probs
    assert huge is not None and torch.isfinite(huge).all()
    assert torch.allclose(huge, torch.tensor([0.5, 0.25, 0.25]))
    assert torch.equal(huge, small)
