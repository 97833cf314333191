"""What a predictor works with and answers: the support set (labelled embeddings, and the
diffusion known score's graph), one image's prediction, and the embeddings of some inputs.
Plain records, apart from the predictors of :mod:`paws.apply.predictor` that use them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from paws.errors import UserError
from paws.method.diffusion import KnownGraph

__all__ = ["Support", "Prediction", "Embedded"]


@dataclass
class Support:
    """Labelled embeddings: what a soft nearest-neighbour model classifies against, and what
    the known score of any model compares with.

    Attributes:
        embeddings: (M, D) float32 in the ``features`` space.
        labels: (M,) int64 positions in ``classes``.
        classes: class names.
        features: which embedding ``embeddings`` are (``"head"`` or ``"trunk"``).
        known: (M, F) embeddings in the known score's space when it is another one, else None.
        graph: the diffusion known score's graph of these and the unlabelled images, or None
            (the score then compares with the labelled embeddings alone).
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    features: str
    known: torch.Tensor | None = None
    graph: KnownGraph | None = None

    def in_space(self, features: str) -> torch.Tensor:
        """The support's embeddings in ``features``.

        Raises:
            UserError: the support was embedded in another space only.
        """
        if features == self.features:
            return self.embeddings
        if self.known is not None:
            return self.known
        raise UserError(
            f"this support has no {features} embeddings for the known score; set "
            f"eval.unknown_features: {self.features}"
        )


@dataclass
class Prediction:
    """What a model says of one image.

    Attributes:
        top: the most probable classes with their probabilities, most probable first.
        score: the known score (:mod:`paws.method.known_score`: similarity to the nearest
            labelled images), or None for a model that has no labelled embeddings.
        unknown: the score is below the threshold calibrated on the labelled images: the image
            is likely of none of the support classes.
        source: the image's file (as a string), or its position among in-memory images.
    """

    top: list[tuple[str, float]]
    score: float | None = None
    unknown: bool = False
    source: str | int | None = None

    @property
    def label(self) -> str:
        """The answer: the most probable class, or ``"unknown"``."""
        return "unknown" if self.unknown else self.top[0][0]


@dataclass
class Embedded:
    """The embeddings of the readable images among some inputs.

    Attributes:
        features: embedding name (``"head"``, ``"trunk"``) -> (N, D) float32 on the CPU.
        positions: the input position of each row.
        sources: each row's file, or its position for an in-memory image.
        skipped: ``(position, name)`` of the unreadable files left out
            (``data.on_bad_image: skip``).
    """

    features: dict[str, torch.Tensor]
    positions: list[int] = field(default_factory=list)
    sources: list[str | int] = field(default_factory=list)
    skipped: list[tuple[int, str]] = field(default_factory=list)
