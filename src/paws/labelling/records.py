"""What ``paws suggest`` works with and answers: the candidate images (:class:`Pool`), one
image worth labelling (:class:`Suggestion`) and the chosen images with their CSV
(:class:`Suggestions`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from paws.data.images import ImageSet, read_image
from paws.data.labels import csv_path, write_suggestions
from paws.data.loaders import Loading

__all__ = ["Pool", "Suggestion", "Suggestions"]


@dataclass
class Suggestion:
    """One image worth labelling.

    Attributes:
        index: its position in the pool.
        suggested: PAWS-NN's class for it, ``new:<k>`` for an image of no labelled class
            (group k of :mod:`paws.labelling.new_classes`), or None at a cold start.
        confidence: PAWS-NN's probability of that class, or None.
        reason: why it was chosen, e.g. ``"uncertain (margin 0.03)"``.
        group_size: for a suggestion ``new:<k>``, the candidates in its group.
    """

    index: int
    suggested: str | None
    confidence: float | None
    reason: str
    group_size: int | None = None


@dataclass
class Pool:
    """The images to choose from.

    Attributes:
        images: the candidates (files, or a built-in dataset's images in memory).
        labelled: (N,) bool, the candidates labelled already (never suggested).
        loading: how they become network input.
        builtin: the images are named by a built-in dataset (the CSV's paths are their names).
    """

    images: ImageSet
    labelled: np.ndarray
    loading: Loading
    builtin: bool

    def path(self, i: int, folder: Path) -> str:
        """How a labels file in ``folder`` names candidate ``i``."""
        if self.builtin or self.images.files is None:
            return self.images.names[i]
        return csv_path(self.images.files[i], folder)

    def picture(self, i: int) -> Image.Image:
        """Candidate ``i`` as a PIL image (for the contact sheet and Label Studio)."""
        if self.images.images is not None:
            x = self.images.images[i].numpy()
            return Image.fromarray(x[0] if x.shape[0] == 1 else x.transpose(1, 2, 0))
        assert self.images.files is not None
        return read_image(self.images.files[i])


@dataclass
class Suggestions:
    """The chosen images, best first, with the pool they come from and the classes a run
    knows (none at a cold start)."""

    pool: Pool
    picks: list[Suggestion]
    strategy: str
    features: str
    classes: list[str] = field(default_factory=list)

    def rows(self, folder: Path) -> list[list[object]]:
        """CSV rows ``(path, label, suggested_label, confidence, reason)`` for a file in
        ``folder`` (the label left empty, for a person to fill in)."""
        return [
            [
                self.pool.path(s.index, folder),
                "",
                s.suggested or "",
                "" if s.confidence is None else f"{s.confidence:.4f}",
                s.reason,
            ]
            for s in self.picks
        ]

    def write(self, out: str | Path) -> Path:
        """Write the suggestion CSV (:func:`paws.data.labels.write_suggestions`)."""
        out = Path(out).expanduser()
        return write_suggestions(out, self.rows(out.parent))
