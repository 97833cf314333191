"""Which images each step uses: class-balanced support batches and unlabelled batches.

Both samplers are pure functions of ``(seed, step)``: a resumed run draws exactly the batches an
uninterrupted one would, and every rank can compute every other rank's share without talking.

Support batches (paper Appendix A): each step draws C classes and k distinct images of each,
*with replacement across steps* (an image may reappear next step, never twice in one step).
Sizes are global: C x k images over all ranks together, so a recipe means the same on 1 or 64
processes. Ranks split them either by images (every rank sees all C classes, k / W images each)
or, with ``unique_classes``, by classes (C / W classes each, k images each), as the official
``ClassStratifiedSampler`` (facebookresearch/suncet) does for ImageNet.

Support labels are positions in the step's class list (0..C-1), not dataset class ids, as in the
official ``make_labels_matrix``: the soft nearest-neighbour prediction is over the C classes
present, so ME-MAX spreads predictions over them.

Every random draw of a run (batches, augmentations, validation splits) comes from a generator
seeded with ``(run.seed, step or epoch, stream)``, the stream naming what it is for
(:class:`Stream`), so that two uses never share numbers and adding one changes no other.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

import numpy as np
import torch

from paws.errors import UserError
from paws.progress import info

__all__ = ["Stream", "SupportSampler", "EpochSampler", "UnlabeledSampler"]


class Stream(enum.IntEnum):
    """The random streams of a run, one per use."""

    VIEWS = 0  # augmentation of the unlabelled images' views
    SUPPORT = 1  # which support images a step draws, and their augmentation
    UNLABELED = 2  # the order of the unlabelled images, epoch by epoch
    BASELINE = 3  # the supervised baseline: batch order and augmentation
    FINETUNE = 5  # fine-tuning: validation split, batch order and augmentation
    DISTILL = 6  # the student: batch order and augmentation
    CHOICE = 7  # the folds of the labelled images the final model is chosen on
    DISTILL_LABELED = 8  # the student's labelled batches: order and augmentation


def _rng(seed: int, step: int, stream: int) -> np.random.Generator:
    return np.random.default_rng([seed, step, int(stream)])


class SupportSampler:
    """Class-balanced support batches, deterministic from ``(seed, step)``.

    A class with fewer than k labelled images still gives k support rows a step: its images
    repeat (each as often as the others, to within one), and training augments every row
    anew; this is said once in a line. With ``fill=False`` such a class gives its images once
    instead (batches of varying size, one process only: what SuNCEt tightening wants, since
    its views are not augmented).

    Args:
        labels: dataset class id of every labelled image.
        classes_per_step: C, classes per step over all ranks.
        images_per_class: k, images per class per step over all ranks (distinct where the
            class has k or more).
        seed: base seed.
        rank: this process's rank.
        world_size: number of processes.
        unique_classes: split ranks by classes instead of by images.
        class_names: names used in messages.
        fill: repeat the images of classes smaller than k (default) or give them once.
    """

    def __init__(
        self,
        labels: Sequence[int] | np.ndarray | torch.Tensor,
        classes_per_step: int,
        images_per_class: int,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        unique_classes: bool = False,
        class_names: Sequence[str] | None = None,
        fill: bool = True,
    ):
        labels = np.asarray(labels, dtype=np.int64)
        self.classes = np.unique(labels)
        C, k, W = classes_per_step, images_per_class, world_size
        if C < 1 or k < 1:
            raise UserError("support.classes and support.images_per_class must be at least 1")
        if C > len(self.classes):
            raise UserError(
                f"support.classes is {C} but the labelled set has only {len(self.classes)} "
                f"classes; set support.classes to at most {len(self.classes)}"
            )
        if unique_classes and C % W:
            raise UserError(
                f"support.classes ({C}) must be divisible by the {W} processes "
                "when support.unique_classes is true"
            )
        if not unique_classes and k % W:
            raise UserError(
                f"support.images_per_class ({k}) must be divisible by the {W} "
                "processes (or set support.unique_classes: true)"
            )
        if not fill and W > 1:
            raise ValueError("batches of varying size (fill=False) need a single process")
        self.pools = [np.flatnonzero(labels == c) for c in self.classes]
        self.C, self.k, self.seed, self.fill = C, k, seed, fill
        self.rank, self.world_size, self.unique_classes = rank, W, unique_classes
        small = [(int(c), len(p)) for c, p in zip(self.classes, self.pools) if len(p) < k]
        if small and fill and rank == 0:
            names = list(class_names) if class_names is not None else None
            shown = ", ".join(
                f"'{names[c]}' ({n})" if names and c < len(names) else f"{c} ({n})"
                for c, n in small[:5]
            )
            more = f" and {len(small) - 5} more" if len(small) > 5 else ""
            which = "class has" if len(small) == 1 else "classes have"
            info(
                f"{len(small)} labelled {which} fewer images than support.images_per_class "
                f"({k}): {shown}{more}; their support images repeat, each augmented anew"
            )

    def _draw(self, rng: np.random.Generator, c: int) -> np.ndarray:
        """k images of class position ``c`` (distinct when it has k; repeated evenly, or all
        of them once with ``fill=False``, when it has fewer)."""
        pool = self.pools[c]
        if len(pool) >= self.k:
            return pool[rng.choice(len(pool), self.k, replace=False)]
        if not self.fill:
            return pool[rng.permutation(len(pool))]
        reps = -(-self.k // len(pool))
        return np.concatenate([pool[rng.permutation(len(pool))] for _ in range(reps)])[: self.k]

    def global_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The whole step's draw over all ranks.

        Returns:
            ``(indices, classes)``: (C, k) indices into the labelled set, row c holding k
            images of dataset class ``classes[c]`` (distinct where it has k; with
            ``fill=False``, a list of C arrays of up to k); classes (C,) distinct.
        """
        rng = _rng(self.seed, step, Stream.SUPPORT)
        chosen = rng.choice(len(self.classes), size=self.C, replace=False)
        rows = [self._draw(rng, c) for c in chosen]
        return (np.stack(rows) if self.fill else rows), self.classes[chosen]

    def _shard(self, rank: int) -> tuple[slice, slice]:
        """(class rows, image columns) of the global (C, k) draw that ``rank`` loads."""
        if self.unique_classes:
            n = self.C // self.world_size
            return slice(rank * n, (rank + 1) * n), slice(None)
        n = self.k // self.world_size
        return slice(None), slice(rank * n, (rank + 1) * n)

    def positions(self, rank: int) -> np.ndarray:
        """Class positions (0..C-1) of the rows ``rank`` loads, class by class."""
        rows, cols = self._shard(rank)
        pos = np.arange(self.C)[rows]
        per_class = len(range(self.k)[cols])
        return np.repeat(pos, per_class)

    @property
    def global_size(self) -> int:
        """Support images per step over all ranks (C x k)."""
        return self.C * self.k

    def shard_rows(self, rank: int | None = None) -> np.ndarray:
        """Where ``rank``'s images (default: this rank's) sit in the step's global draw,
        flattened class by class: positions in ``[0, C*k)``, in :meth:`local_batch` order."""
        rows, cols = self._shard(self.rank if rank is None else rank)
        return np.arange(self.C * self.k).reshape(self.C, self.k)[rows, cols].reshape(-1)

    def local_batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of the step's draw.

        Returns:
            ``(indices, positions)``: (n,) labelled-set indices, class by class, and their
            class positions in ``[0, C)``.
        """
        idx, _ = self.global_batch(step)
        if not self.fill:
            pos = np.concatenate([np.full(len(r), c) for c, r in enumerate(idx)])
            return np.concatenate(idx), pos
        rows, cols = self._shard(self.rank)
        return idx[rows, cols].reshape(-1), self.positions(self.rank)

    def gathered_positions(self, views: int = 1) -> np.ndarray:
        """Class positions of the support rows after an all-gather, when every rank stacks its
        ``views`` augmented views as ``[view 1 rows; view 2 rows; ...]``. Same every step."""
        return np.concatenate([np.tile(self.positions(r), views) for r in range(self.world_size)])


class EpochSampler:
    """Batches over epochs: a fresh permutation of the images per epoch (seeded by
    ``(seed, epoch, stream)``), sliced into global batches, each split evenly over ranks; the
    last incomplete batch of an epoch is dropped.

    Args:
        num_images: size of the set (at least ``batch_size``).
        batch_size: global batch size (over all ranks, divisible by their number).
        seed: base seed.
        stream: the :class:`Stream` of this use.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self,
        num_images: int,
        batch_size: int,
        seed: int = 0,
        stream: int = Stream.UNLABELED,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1 or num_images < batch_size or batch_size % world_size:
            raise ValueError(
                f"cannot split {num_images} images into batches of {batch_size} over "
                f"{world_size} processes"
            )
        self.num_images, self.batch_size, self.seed = num_images, batch_size, seed
        self.stream, self.rank, self.world_size = stream, rank, world_size
        self.steps_per_epoch = num_images // batch_size
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    @property
    def global_size(self) -> int:
        """Images per step over all ranks."""
        return self.batch_size

    def shard_rows(self, rank: int | None = None) -> np.ndarray:
        """Where ``rank``'s images (default: this rank's) sit in the step's global batch."""
        n = self.batch_size // self.world_size
        r = self.rank if rank is None else rank
        return np.arange(r * n, (r + 1) * n)

    def local_batch(self, step: int) -> np.ndarray:
        """(batch_size / world_size,) indices of this rank's images at ``step``."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            perm = _rng(self.seed, epoch, self.stream).permutation(self.num_images)
            self._epoch, self._perm = epoch, perm
        batch = self._perm[i * self.batch_size : (i + 1) * self.batch_size]
        n = self.batch_size // self.world_size
        return batch[self.rank * n : (self.rank + 1) * n]


class UnlabeledSampler(EpochSampler):
    """The unlabelled batches of pre-training (:class:`EpochSampler` on
    ``Stream.UNLABELED``), with the user's mistakes in sizes said in one line.

    Args:
        num_images: size of the unlabelled set.
        batch_size: global batch size (``optim.batch_size``).
        seed: base seed.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(
        self, num_images: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1
    ):
        if batch_size % world_size:
            raise UserError(
                f"optim.batch_size ({batch_size}) must be divisible by the {world_size} processes"
            )
        if num_images < batch_size:
            raise UserError(
                f"the unlabelled set has {num_images} images, fewer than "
                f"optim.batch_size ({batch_size}); lower the batch size"
            )
        super().__init__(num_images, batch_size, seed, Stream.UNLABELED, rank, world_size)
