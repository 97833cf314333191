"""Images into network input for a trained model: the preprocessing, batching, and what happens
to an image that cannot be read.

Every predictor reads its images here, so a file, a PIL image, a tensor and an array go through
the same rule (the evaluation view of training, :class:`paws.data.eval_view.Preprocessing`,
which ``paws eval`` follows too) and the same policy for
unreadable files (``data.on_bad_image``). A batch says which inputs it holds, so a caller that
skips unreadable files knows which answer belongs to which input without asking afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from paws.data.eval_view import (
    Preprocessing,
    batch_count,
    batches_of,
    decode_workers,
    read_batches,
)
from paws.data.images import MAX_IMAGE_PIXELS, Images, as_items
from paws.errors import UserError
from paws.progress import Progress

__all__ = ["Preprocessing", "InputBatch", "ImageReader"]


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
        draft: decode large JPEGs at a reduced scale (faster; pixels not those the evaluation
            sees, see :func:`paws.data.eval_view.read_batches`).
        workers: decoding threads (default: the cores the network leaves,
            :func:`paws.data.eval_view.decode_workers`).
    """

    preprocessing: Preprocessing
    batch_size: int = 256
    on_bad_image: str = "error"
    max_pixels: int = MAX_IMAGE_PIXELS
    draft: bool = False
    workers: int | None = None

    def batches(
        self,
        images: Images,
        device: torch.device,
        progress: bool = False,
        desc: str = "images",
    ) -> Iterator[InputBatch]:
        """Preprocessed batches in input order, decoded a few batches ahead while the caller
        computes (:func:`paws.data.eval_view.read_batches`). Images may be file paths or
        folders (searched recursively), PIL images, tensors (C, H, W) / (N, C, H, W), uint8 in
        [0, 255] or float in [0, 1], or numpy arrays (H, W) / (H, W, C) / (N, H, W, C), uint8
        or float in [0, 1] (:func:`paws.data.images.array_image`); any size.

        Raises:
            UserError: an unreadable file (unless skipped), or none of the images readable.
        """
        items = as_items(images)
        n, bs = len(items), self.batch_size
        bar = Progress(batch_count(n, bs), desc) if progress else None
        reads = read_batches(
            items,
            batches_of(n, bs),
            self.preprocessing,
            self.on_bad_image,
            self.max_pixels,
            draft=self.draft,
            workers=self.workers or decode_workers(device),
            pin=device.type == "cuda",
        )
        kept, pending = 0, []
        for r in reads:
            pending += r.skipped
            if r.positions:
                x = r.x.to(device, non_blocking=True)
                sources = [_source(items[i], i) for i in r.positions]
                yield InputBatch(x, r.positions, sources, pending)
                kept, pending = kept + len(r.positions), []
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        if n and not kept:
            raise UserError(f"none of the {n} images could be read")
        if pending:  # unreadable files after the last readable one
            size, channels = self.preprocessing.size, self.preprocessing.channels
            empty = torch.zeros(0, channels, size, size, device=device)
            yield InputBatch(empty, [], [], pending)


def _source(item: Any, position: int) -> str | int:
    """How an answer names its input: the file, or the position of an in-memory image."""
    return str(item) if isinstance(item, Path) else position
