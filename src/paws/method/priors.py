"""The class prior that ME-MAX pushes the mean prediction towards (``loss.me_max_prior``).

The paper's ME-MAX maximises the entropy of the mean prediction, that is, pushes it towards
uniform classes; when the unlabelled images are imbalanced this fights the data. With a prior,
the regulariser is ``KL(pbar || prior)`` (:func:`paws.method.losses.me_max_term`):

- ``uniform``: the paper's ME-MAX, unchanged;
- ``labeled``: the labelled images' class frequencies (when the labels were drawn with the
  same profile as the unlabelled images);
- ``estimated``: a running average of the class marginal of the targets (the mean sharpened
  soft nearest-neighbour prediction of the unlabelled images' target views), as distribution
  alignment (ReMixMatch) estimates the model's class marginal; it starts uniform, so early
  training is the paper's ME-MAX, and follows the data as the embedding forms;
- a list of numbers: the user's class frequencies, one per class.

Each step classifies against the step's support classes only (positions 0..C-1 of
:class:`paws.method.sampling.SupportSampler`), so the prior of a step is the prior of those classes,
in that order, renormalised.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from paws.errors import UserError

__all__ = ["ClassPrior"]


class ClassPrior:
    """The ME-MAX prior over the dataset's classes, and its running estimate.

    Args:
        kind: ``"uniform"``, ``"labeled"``, ``"estimated"`` or a list of K frequencies.
        labels: (N,) class ids of the labelled images.
        num_classes: K, the number of dataset classes.
        momentum: share of the old estimate kept at each update (``"estimated"``).
        device: where the prior lives.
    """

    def __init__(
        self,
        kind: str | Sequence[float],
        labels: np.ndarray,
        num_classes: int,
        momentum: float = 0.99,
        device: torch.device | str = "cpu",
    ):
        self.kind = kind if isinstance(kind, str) else "given"
        self.momentum = momentum
        if self.kind == "uniform":
            probs = None
        elif self.kind == "labeled":
            probs = np.bincount(np.asarray(labels), minlength=num_classes).astype(np.float64)
        elif self.kind == "estimated":
            probs = np.ones(num_classes)
        else:
            probs = np.asarray(kind, dtype=np.float64)
            if probs.shape != (num_classes,):
                raise UserError(
                    f"loss.me_max_prior has {probs.size} numbers but there are {num_classes} "
                    "classes; give one frequency per class, in the order of the class names"
                )
        self.probs = None if probs is None else _normalised(probs, device)

    def for_step(self, classes: torch.Tensor) -> torch.Tensor | None:
        """(C,) prior of a step's support classes (dataset ids, in position order), or None
        for the paper's ME-MAX."""
        if self.probs is None:
            return None
        p = self.probs[classes.to(self.probs.device)]
        return p / p.sum().clamp_min(torch.finfo(p.dtype).tiny)

    def update(self, classes: torch.Tensor, mass: torch.Tensor) -> None:
        """Move the estimate of the step's classes towards ``mass`` (C,), their share of the
        step's unlabelled images; a no-op unless the prior is estimated. The classes keep their
        total weight in the estimate, so classes absent from the step are untouched."""
        if self.kind != "estimated":
            return
        classes = classes.to(self.probs.device)
        old = self.probs[classes]
        total = old.sum()
        new = self.momentum * old / total + (1.0 - self.momentum) * mass.to(old) / mass.sum()
        self.probs[classes] = new * total

    def state_dict(self) -> dict[str, Any]:
        """The estimate, for checkpoints (exact resume)."""
        return {"probs": None if self.probs is None else self.probs.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved."""
        if state.get("probs") is not None and self.probs is not None:
            self.probs.copy_(state["probs"].to(self.probs))


def _normalised(freqs: np.ndarray, device: torch.device | str) -> torch.Tensor:
    """(C,) frequencies as float32 probabilities: scaled by their largest first, so that huge
    frequencies (1e308 each) do not overflow their sum to infinity and every class to 0."""
    freqs = np.asarray(freqs, dtype=np.float64)
    freqs = freqs / freqs.max()
    return torch.tensor(freqs / freqs.sum(), dtype=torch.float32, device=device)
