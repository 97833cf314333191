"""Batches of network input: augmented views for each training step, and evaluation views.

Every batch is a function of what it is for (a :class:`paws.method.sampling.Stream`), the seed
and the step, never of the order in which batches are drawn, the number of data-loader workers
or the number of processes, so a resumed run continues exactly where it stopped. Images held in
memory are augmented as whole batches on the compute device
(:class:`paws.data.transforms.BatchViews`). Images on disk are read in data-loader workers,
in one of two ways (``data.disk_views``):

- batched (the default for small images, ``views.large_size`` < 64): the workers only decode
  each file to the size a folder held in memory has (``Loading.size``) and the batch is
  augmented as in memory, so a folder's views are the same pixels whether it fits in memory
  or not. On 2 idle cores the per-image way made such a step 1.73 times the bare encoder, the
  workers' augmentation competing with the step's threads (``benchmarks/RESULTS.md``);
- per image (large images, ImageNet): each view is cropped in a worker from the
  full-resolution file, as the paper's recipes crop.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paws.config import Config, ViewsConfig
from paws.data.eval_view import Preprocessing, batches_of, decode_workers, read_batches
from paws.data.images import MAX_IMAGE_PIXELS, ImageSet, read_image, square
from paws.data.sources import Datasets, memory_size
from paws.data.transforms import (
    BatchViews,
    ShardGenerator,
    multicrop_transform,
    support_transform,
)
from paws.errors import UserError
from paws.method.sampling import Stream, SupportSampler, UnlabeledSampler
from paws.progress import info, quiet

__all__ = [
    "Batch",
    "Loading",
    "step_batches",
    "multicrop_batches",
    "view_batches",
    "eval_batches",
    "step_generator",
    "default_workers",
]

IndexFn = Callable[[int], np.ndarray]
Shard = tuple[int, np.ndarray]


@dataclass(frozen=True)
class Loading:
    """How images become network input, apart from the augmentation itself.

    Attributes:
        channels: 1 (grey) or 3 (colour); files are converted to this.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
        workers: data-loader worker processes for images on disk (-1: automatic).
        skip_bad: report and skip unreadable files instead of stopping (``data.on_bad_image``).
        max_pixels: larger images are unreadable (``data.max_image_pixels``).
        size: for batched views of images on disk (``data.disk_views``), the side they are
            decoded to before the batch is augmented, that of a folder held in memory
            (:func:`paws.data.sources.memory_size`); None: views cropped per image.
    """

    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    workers: int = 0
    skip_bad: bool = False
    max_pixels: int = MAX_IMAGE_PIXELS
    size: int | None = None

    @classmethod
    def of(cls, cfg: Config, data: Datasets) -> Loading:
        """The loading of a run's datasets under its config."""
        return cls(
            data.channels,
            tuple(data.mean),
            tuple(data.std),
            cfg.data.workers,
            cfg.data.on_bad_image == "skip",
            cfg.data.max_image_pixels,
            memory_size(cfg) if _batched_on_disk(cfg) else None,
        )


def _batched_on_disk(cfg: Config) -> bool:
    """Whether images on disk are decoded to the in-memory size and augmented as a batch."""
    mode = cfg.data.disk_views
    return mode == "batched" or (mode == "auto" and cfg.views.large_size < 64)


@dataclass
class Batch:
    """One training step's inputs on the compute device.

    Attributes:
        step: the step index.
        views: ``[large 1, large 2, small 1, ...]``, each (B_local, C, h, w).
        supports: (views * n_local, C, H, W) support views, stacked view by view.
        wait: seconds the step waited for this batch (data loading and augmentation).
        classes: (C,) dataset class ids of the step's support classes, in position order
            (the support labels are positions), or None.
    """

    step: int
    views: list[torch.Tensor]
    supports: torch.Tensor
    wait: float = 0.0
    classes: torch.Tensor | None = None


def default_workers(requested: int) -> int:
    """Data-loader workers: the requested number, or (for -1) CPU cores minus one, at most 8."""
    if requested >= 0:
        return requested
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """CPU generator for the random augmentation of one step and stream (the same on every
    process: each draws for the global batch and keeps its rows, see ``ShardGenerator``)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, int(stream)]).generate_state(1)[0]))
    return g


def _worker_init(worker_id: int) -> None:
    """Signals for data-loader workers. A terminal's Ctrl-C reaches the whole process group:
    workers leave SIGINT to the main process, which saves a checkpoint and shuts them down. A
    worker killed by a signal (some schedulers send SIGTERM to every process) makes PyTorch
    raise in the main process at an arbitrary point, so on SIGTERM a worker exits quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


class _BadFiles:
    """The ``data.on_bad_image`` policy for files read in data-loader workers: raise, or report
    each file once (unless quiet when the loader was made) and go on."""

    def __init__(self, skip: bool):
        self.skip, self.quiet, self.reported = skip, quiet(), set()

    def handle(self, error: UserError, path: Path) -> None:
        if not self.skip:
            raise error
        self.report(path)

    def report(self, path: Path | str) -> None:
        """Say once that ``path`` is skipped."""
        if path not in self.reported:
            self.reported.add(path)
            if not self.quiet:
                info(f"skipping unreadable image {path}")


class _StepFiles(torch.utils.data.Dataset):
    """Files read per item, the item key ``(step, index)``: decoded as a folder held in memory
    holds them, (C, size, size) uint8, or with ``transform`` its views, seeded by the key so
    that they depend neither on the number of workers nor on resuming. An unreadable file is
    replaced by the next readable one (``data.on_bad_image: skip``)."""

    def __init__(
        self,
        images: ImageSet,
        loading: Loading,
        seed: int,
        stream: int,
        transform: Callable | None = None,
    ):
        self.images, self.channels, self.size = images, loading.channels, loading.size
        self.max_pixels, self.transform = loading.max_pixels, transform
        self.seed, self.stream = seed, int(stream)
        self.bad = _BadFiles(loading.skip_bad)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        step, i = key
        files = self.images.files or []
        for attempt in range(len(files)):
            path = files[(i + attempt) % len(files)]
            try:
                img = read_image(path, self.channels, max_pixels=self.max_pixels)
                break
            except UserError as e:  # a bad file is replaced by the next readable one
                self.bad.handle(e, path)
        else:
            raise UserError(f"none of the {len(files)} images could be read")
        if self.transform is None:
            return torch.from_numpy(np.array(square(img, self.size)))  # writable, contiguous
        seed = np.random.SeedSequence([self.seed, step, self.stream, i]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.transform(img)


class _StepIndex(torch.utils.data.Sampler):
    def __init__(self, fn: IndexFn, steps: range):
        self.fn, self.steps = fn, steps

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in self.steps:
            yield [(step, int(i)) for i in self.fn(step)]

    def __len__(self) -> int:
        return len(self.steps)


def _stack(items: list[Any]) -> Any:
    """A batch of decoded images (N, C, S, S), or of per-image views: one tensor a view."""
    if isinstance(items[0], torch.Tensor):
        return torch.stack(items)
    return [torch.stack(v) for v in zip(*items)]


def _loader(dataset: torch.utils.data.Dataset, batches: Any, workers: int, device: torch.device):
    workers = default_workers(workers)
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=batches,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=_stack,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init,
    )


def _augmented(
    images: ImageSet,
    index_fn: IndexFn,
    steps: range,
    loading: Loading,
    seed: int,
    stream: int,
    device: torch.device,
    shard: Shard | None,
    augment: Callable[[torch.Tensor, Any], list[torch.Tensor]],
    per_image: Callable[[], Callable],
) -> Iterator[tuple[int, list[torch.Tensor], float]]:
    """``(step, views, seconds waited)`` for each step: ``augment(x, generator)`` augments the
    step's uint8 batch ``x`` on ``device``, indexed from memory or decoded from disk in
    data-loader workers (``Loading.size``); otherwise the workers apply ``per_image()`` to
    each file. The wait counts the batch's reading and its augmentation."""
    if not images.in_memory and loading.size is None:
        dataset = _StepFiles(images, loading, seed, stream, per_image())
        loader = _loader(dataset, _StepIndex(index_fn, steps), loading.workers, device)
        t0 = time.perf_counter()
        for step, batch in zip(steps, loader):
            yield step, [v.to(device, non_blocking=True) for v in batch], time.perf_counter() - t0
            t0 = time.perf_counter()
        return
    if images.in_memory:
        on_device = images.images.to(device)
        batches: Iterator[torch.Tensor] = (
            on_device[torch.from_numpy(np.asarray(index_fn(step))).to(device)] for step in steps
        )
    else:
        dataset = _StepFiles(images, loading, seed, stream)
        loader = _loader(dataset, _StepIndex(index_fn, steps), loading.workers, device)
        batches = (x.to(device, non_blocking=True) for x in loader)
    t0 = time.perf_counter()
    for step, x in zip(steps, batches):
        gen: Any = step_generator(seed, step, stream)
        if shard is not None:
            gen = ShardGenerator(gen, shard[0], shard[1])
        out = augment(x, gen)
        yield step, out, time.perf_counter() - t0
        t0 = time.perf_counter()


def multicrop_batches(
    images: ImageSet,
    index_fn: IndexFn,
    steps: range,
    views: ViewsConfig,
    loading: Loading,
    seed: int,
    stream: int,
    device: torch.device,
    shard: Shard | None = None,
) -> Iterator[tuple[int, list[torch.Tensor], float]]:
    """Multi-crop views of ``images[index_fn(step)]`` for each step of ``steps``.

    Random parameters come from ``(seed, step, stream)`` and, under several processes, an
    image's place in the global batch: ``shard`` is ``(global batch size, positions of this
    process's images in it)``, so views depend neither on the number of processes nor, when
    batched (``data.disk_views``), on whether the images are in memory or on disk (per image:
    on the image index).

    Yields:
        ``(step, [large 1, large 2, small 1, ...], seconds waited)``, views (n, C, h, w).
    """
    aug = BatchViews(views, loading.mean, loading.std)
    return _augmented(
        images,
        index_fn,
        steps,
        loading,
        seed,
        stream,
        device,
        shard,
        aug.multicrop,
        lambda: multicrop_transform(views, loading.channels, loading.mean, loading.std),
    )


def view_batches(
    images: ImageSet,
    index_fn: IndexFn,
    steps: range,
    views: ViewsConfig,
    num_views: int,
    loading: Loading,
    seed: int,
    stream: int,
    device: torch.device,
    shard: Shard | None = None,
) -> Iterator[tuple[int, torch.Tensor, float]]:
    """``num_views`` large views of ``images[index_fn(step)]`` for each step (supports, and
    the labelled batches of supervised training); random parameters as in
    :func:`multicrop_batches`.

    Yields:
        ``(step, views stacked view by view (num_views * n, C, H, W), seconds waited)``.
    """
    aug = BatchViews(views, loading.mean, loading.std)
    batches = _augmented(
        images,
        index_fn,
        steps,
        loading,
        seed,
        stream,
        device,
        shard,
        lambda x, gen: [aug.support(x, num_views, gen)],
        lambda: support_transform(views, loading.channels, loading.mean, loading.std, num_views),
    )
    for step, out, wait in batches:
        yield step, out[0] if len(out) == 1 else torch.cat(out), wait


def step_batches(
    data: Datasets,
    cfg: Config,
    unl: UnlabeledSampler,
    sup: SupportSampler | None,
    steps: range,
    device: torch.device,
) -> Iterator[Batch]:
    """The PAWS batches of ``steps``, each a function of (seed, step); without a support
    sampler (a label-free run), batches of views alone, their supports empty."""
    loading, seed = Loading.of(cfg, data), cfg.run.seed
    views = multicrop_batches(
        data.unlabeled,
        unl.local_batch,
        steps,
        cfg.views,
        loading,
        seed,
        Stream.VIEWS,
        device,
        shard=(unl.global_size, unl.shard_rows()),
    )
    if sup is None:
        for step, v, wait_v in views:
            yield Batch(step, v, v[0][:0], wait_v)
        return
    supports = view_batches(
        data.labeled,
        lambda s: sup.local_batch(s)[0],
        steps,
        cfg.views,
        cfg.support.views,
        loading,
        seed,
        Stream.SUPPORT,
        device,
        shard=(sup.global_size, sup.shard_rows()),
    )
    for (step, v, wait_v), (_, s, wait_s) in zip(views, supports):
        classes = torch.from_numpy(sup.global_batch(step)[1])
        yield Batch(step, v, s, wait_v + wait_s, classes)


def eval_batches(
    images: ImageSet,
    views: ViewsConfig,
    loading: Loading,
    device: torch.device,
    batch_size: int = 512,
    batches: Sequence[np.ndarray] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, index)`` batches of evaluation views (:mod:`paws.data.eval_view`: the rule
    predictions follow too), decoded a few batches ahead while the network computes.

    x: (n, C, S, S) float32 on ``device``, S = ``views.large_size``; index: (n,) positions in
    ``images``. ``batches`` gives the positions of each batch in turn (default: every image in
    order, ``batch_size`` at a time). An unreadable file stops with its name, or with
    ``loading.skip_bad`` is reported and read as a blank image.
    """
    if batches is None:
        batches = [np.asarray(b) for b in batches_of(len(images), batch_size)]
    batches = [np.asarray(b, dtype=np.int64) for b in batches]
    prep = Preprocessing(
        views.large_size, views.eval_crop, loading.mean, loading.std, loading.channels
    )
    names = images.names if images.files is None else None  # encoded bytes: by their names
    reads = read_batches(
        images.eval_items(),
        [b.tolist() for b in batches],
        prep,
        "skip" if loading.skip_bad else "error",
        loading.max_pixels,
        names,
        workers=decode_workers(device),
        pin=device.type == "cuda",
    )
    bad = _BadFiles(loading.skip_bad)
    for index, r in zip(batches, reads):
        x = r.x
        if r.skipped:
            blank = prep.views([torch.zeros(loading.channels, 1, 1, dtype=torch.uint8)])
            x = blank.expand(len(index), -1, prep.size, prep.size).clone()
            x[torch.as_tensor(np.isin(index, r.positions))] = r.x
            for _, name in r.skipped:
                bad.report(name)
        yield x.to(device, non_blocking=True), torch.from_numpy(index)
