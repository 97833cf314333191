"""Images into network input for a trained model: the preprocessing, batching, and what happens
to an image that cannot be read.

Every predictor reads its images here, so a file, a PIL image, a tensor and an array go through
the same rule (the evaluation view of training, :class:`Preprocessing`) and the same policy for
unreadable files (``data.on_bad_image``). A batch says which inputs it holds, so a caller that
skips unreadable files knows which answer belongs to which input without asking afterwards.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from paws.data.images import (
    MAX_IMAGE_PIXELS,
    Images,
    as_items,
    read_image,
    tensor_channels,
    to_mode,
)
from paws.data.transforms import eval_transform
from paws.errors import UserError
from paws.progress import Progress

__all__ = ["Preprocessing", "InputBatch", "ImageReader"]


@dataclass(frozen=True)
class Preprocessing:
    """How images become network input: the evaluation view of training.

    Attributes:
        size: side of the square input (``views.large_size``).
        crop_fraction: resize the shorter side to ``size / crop_fraction``, then centre-crop
            ``size`` (``views.eval_crop``).
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        channels: 1 (grey) or 3 (colour); images are converted to this.
    """

    size: int
    crop_fraction: float
    mean: tuple[float, ...]
    std: tuple[float, ...]
    channels: int

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """Per-image transform: PIL image or (C, H, W) tensor to (C, size, size) float32."""
        return eval_transform(self.size, self.crop_fraction, self.mean, self.std)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists for the statistics), as exports store them."""
        d = asdict(self)
        return {**d, "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict` (values already checked by the export's reader)."""
        return cls(
            int(d["size"]),
            float(d["crop_fraction"]),
            tuple(float(v) for v in d["mean"]),
            tuple(float(v) for v in d["std"]),
            int(d["channels"]),
        )


@dataclass
class InputBatch:
    """Some of the inputs, preprocessed.

    Attributes:
        x: (n, C, size, size) float32 on the compute device.
        positions: the position in the input of each row of ``x``.
        sources: each row's file (as a string), or its position for an in-memory image.
        skipped: ``(position, name)`` of the unreadable files left out since the last batch.
    """

    x: torch.Tensor
    positions: list[int]
    sources: list[str | int]
    skipped: list[tuple[int, str]] = field(default_factory=list)


@dataclass(frozen=True)
class ImageReader:
    """Reads images in batches for a model: preprocessing and the bad-image policy.

    Attributes:
        preprocessing: the input pipeline.
        batch_size: images per batch.
        on_bad_image: ``"error"``: an unreadable file stops with its name; ``"skip"``: it is
            left out, and named in the batch's ``skipped`` (``data.on_bad_image``).
        max_pixels: files claiming more pixels are unreadable (``data.max_image_pixels``).
    """

    preprocessing: Preprocessing
    batch_size: int = 256
    on_bad_image: str = "error"
    max_pixels: int = MAX_IMAGE_PIXELS

    def batches(
        self,
        images: Images,
        device: torch.device,
        progress: bool = False,
        desc: str = "images",
    ) -> Iterator[InputBatch]:
        """Preprocessed batches in input order. Images may be file paths or folders (searched
        recursively), PIL images, tensors (C, H, W) / (N, C, H, W), uint8 in [0, 255] or
        float in [0, 1], or numpy arrays (H, W) / (H, W, C) / (N, H, W, C), uint8 or float in
        [0, 1] (:func:`paws.data.images.array_image`); any size.

        Raises:
            UserError: an unreadable file (unless skipped), or none of the images readable.
        """
        items = as_items(images)
        tf = self.preprocessing.transform()
        channels = self.preprocessing.channels

        def one(i: int) -> torch.Tensor | tuple[int, str]:
            item = items[i]
            if isinstance(item, Path):
                try:
                    return tf(read_image(item, channels, max_pixels=self.max_pixels))
                except UserError:
                    if self.on_bad_image != "skip":
                        raise
                    return (i, str(item))
            if isinstance(item, Image.Image):
                return tf(to_mode(item, channels))
            return tf(tensor_channels(item, channels))

        n, skipped = len(items), 0
        bar = Progress((n + self.batch_size - 1) // self.batch_size, desc) if progress else None
        pending: list[tuple[int, str]] = []
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, n, self.batch_size):
                index = range(start, min(n, start + self.batch_size))
                views, kept = [], []
                for i, v in zip(index, pool.map(one, index)):
                    if isinstance(v, tuple):
                        pending.append(v)
                    else:
                        views.append(v)
                        kept.append(i)
                if views:
                    x = torch.stack(views).to(device)
                    sources = [_source(items[i], i) for i in kept]
                    yield InputBatch(x, kept, sources, pending)
                    skipped += len(pending)
                    pending = []
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        if n and skipped + len(pending) == n:
            raise UserError(f"none of the {n} images could be read")
        if pending:  # unreadable files after the last readable one
            size = self.preprocessing.size
            empty = torch.zeros(0, channels, size, size, device=device)
            yield InputBatch(empty, [], [], pending)


def _source(item: Any, position: int) -> str | int:
    """How an answer names its input: the file, or the position of an in-memory image."""
    return str(item) if isinstance(item, Path) else position
