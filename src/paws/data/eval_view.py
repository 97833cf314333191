"""The evaluation view: the one rule by which an image becomes network input outside training,
and reading many images through it with decoding overlapped with the network.

The rule (:class:`Preprocessing`), for a file, encoded bytes, a PIL image or a tensor alike:

1. decode fully (:func:`paws.data.images.read_image`: palette and transparency on white, grey
   or colour as the run's ``channels``) into 8-bit pixels, channels first;
2. as float32 in [0, 1], resize on the CPU so that the shorter side is
   ``round(size / crop_fraction)`` (bilinear, antialiased, ``torch.nn.functional.interpolate``
   with ``align_corners=False``; nothing when it already is), and crop the centre
   ``size`` x ``size`` (:func:`paws.data.transforms.eval_batch`);
3. subtract ``mean`` and divide by ``std``, per channel.

PAWS-NN during ``paws train`` and ``paws eval``, the classifier's accuracy, tightening,
``paws predict``, ``embed``, ``suggest``, ``paws.load`` and the ONNX export's preprocessing all
go through it, so an accuracy reported for a folder is the accuracy of the predictions made on
it, image for image. Images a folder dataset holds in memory were resized for training
(``data.image_size``): their evaluation views are computed from the files again.

:func:`read_batches` reads inputs in batches: each batch is decoded and preprocessed by one of
a few threads, up to ``depth`` batches ahead of the consumer, so decoding the next batches runs
while the network computes on this one, memory stays bounded by ``depth`` batches whatever the
number of inputs, and batches come out in input order.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from paws.data.images import MAX_IMAGE_PIXELS, read_image, tensor_channels, to_mode
from paws.data.transforms import eval_batch, eval_resize
from paws.errors import UserError
from paws.runtime import usable_cores

__all__ = [
    "Preprocessing",
    "Read",
    "read_batches",
    "decode_workers",
    "pixels",
    "batches_of",
    "batch_count",
]


def pixels(im: Image.Image) -> torch.Tensor:
    """A decoded L or RGB image as a (C, H, W) uint8 tensor."""
    arr = np.array(im)  # a copy: Pillow's buffer is read-only
    return torch.from_numpy(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))


@dataclass(frozen=True)
class Preprocessing:
    """The evaluation view of training: how images become network input (see the module).

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

    @property
    def resize(self) -> int:
        """The shorter side images are resized to before the centre crop."""
        return eval_resize(self.size, self.crop_fraction)

    def views(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Network input of decoded images: (C, H, W) tensors of any sizes, uint8 in [0, 255]
        or float in [0, 1], with :attr:`channels` channels, to (N, C, size, size) float32.

        Images of one size are resized together, which gives the same values as one at a
        time (the resize works plane by plane).
        """
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, x in enumerate(images):
            groups.setdefault((tuple(x.shape), x.dtype), []).append(i)
        out = torch.empty(len(images), self.channels, self.size, self.size)
        for index in groups.values():
            batch = torch.stack([images[i].cpu() for i in index])
            out[index] = eval_batch(batch, self.size, self.crop_fraction)
        mean = torch.tensor(self.mean, dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=torch.float32).view(1, -1, 1, 1)
        return (out - mean) / std

    def __call__(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """One image (PIL, or a (C, H, W) tensor) to (C, size, size) float32."""
        return self.views([self.decoded(image)])[0]

    def decoded(self, image: Image.Image | torch.Tensor) -> torch.Tensor:
        """A PIL image or a (C, H, W) tensor as a (C, H, W) tensor of :attr:`channels`."""
        if isinstance(image, Image.Image):
            return pixels(to_mode(image, self.channels))
        return tensor_channels(image, self.channels)

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
class Read:
    """One batch of inputs through the evaluation view.

    Attributes:
        x: (n, C, size, size) float32 on the CPU (pinned when asked), the readable inputs.
        positions: the position in the input of each row of ``x``.
        skipped: ``(position, name)`` of this batch's unreadable files
            (``on_bad_image: skip``).
    """

    x: torch.Tensor
    positions: list[int]
    skipped: list[tuple[int, str]]


def decode_workers(device: torch.device | str = "cpu") -> int:
    """Threads that decode while the network computes: the cores the network leaves (on a CPU,
    those beyond torch's compute threads, at least one; beside an accelerator, all but one),
    at most 8."""
    cores = usable_cores()
    if torch.device(device).type == "cpu":
        return max(1, min(8, cores - torch.get_num_threads()))
    return max(1, min(8, cores - 1))


def read_batches(
    items: Sequence[Any] | torch.Tensor,
    batches: Iterable[Sequence[int]],
    prep: Preprocessing,
    on_bad_image: str = "error",
    max_pixels: int = MAX_IMAGE_PIXELS,
    names: Sequence[str] | None = None,
    draft: bool = False,
    workers: int | None = None,
    depth: int | None = None,
    pin: bool = False,
) -> Iterator[Read]:
    """The evaluation views of ``items`` (files, encoded bytes, PIL images, (C, H, W) tensors,
    or one (N, C, H, W) tensor), batch by batch in the order of ``batches`` (positions in
    ``items``), decoded ``depth`` batches ahead by ``workers`` threads.

    Args:
        items: the inputs.
        batches: the positions of each batch, in turn.
        prep: the evaluation view.
        on_bad_image: ``"error"``: an unreadable file raises :class:`UserError` naming it (when
            its batch is reached); ``"skip"``: it is left out and named in ``skipped``.
        max_pixels: files claiming more pixels are unreadable (``data.max_image_pixels``).
        names: how files are named in messages (default: their paths).
        draft: decode JPEGs larger than needed at a reduced scale (Pillow's ``draft``: 1/2,
            1/4 or 1/8, never below the resize's shorter side). Faster, but the pixels are not
            those of the full decode (the DCT's own downscaling), so predictions may differ
            from the evaluation's; off by default.
        workers: decoding threads (default :func:`decode_workers` for a CPU).
        depth: batches decoded ahead (default ``workers + 1``).
        pin: pin each batch's memory (for a CUDA device).
    """
    workers = workers or decode_workers("cpu")
    depth = max(1, depth or workers + 1)
    side = prep.resize if draft else None

    def one(i: int) -> torch.Tensor | None:
        item = items[i]
        if isinstance(item, (Path, bytes)):
            where = names[i] if names is not None else None
            try:
                im = read_image(item, prep.channels, where, max_pixels, draft_side=side)
            except UserError:
                if on_bad_image != "skip":
                    raise
                return None
            return pixels(im)
        return prep.decoded(item)

    def batch(index: Sequence[int]) -> Read:
        decoded = [(int(i), one(int(i))) for i in index]
        kept = [(i, x) for i, x in decoded if x is not None]
        skipped = [(i, _name(items[i], names, i)) for i, x in decoded if x is None]
        if kept:
            x = prep.views([x for _, x in kept])
        else:
            x = torch.zeros(0, prep.channels, prep.size, prep.size)
        return Read(x.pin_memory() if pin else x, [i for i, _ in kept], skipped)

    pending: deque[Future[Read]] = deque()
    with ThreadPoolExecutor(max_workers=workers) as pool:
        try:
            for index in batches:
                pending.append(pool.submit(batch, list(index)))
                if len(pending) >= depth:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:  # a consumer that stops early, or an error: drop what is queued
            for f in pending:
                f.cancel()


def _name(item: Any, names: Sequence[str] | None, i: int) -> str:
    return names[i] if names is not None else str(item)


def batches_of(n: int, batch_size: int) -> Iterator[range]:
    """Positions ``0..n-1`` in consecutive batches of ``batch_size``."""
    return (range(s, min(n, s + batch_size)) for s in range(0, n, batch_size))


def batch_count(n: int, batch_size: int) -> int:
    """How many batches :func:`batches_of` gives."""
    return math.ceil(n / batch_size)
