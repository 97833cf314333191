"""Hugging Face datasets as a run's images, read from local files only.

``data.root`` is either a folder written by ``save_to_disk`` (a ``DatasetDict`` of splits, or a
single ``Dataset``, which is then the train split) or a folder of images that the
``imagefolder`` builder reads (``<class>/<image>``, optionally below ``train/``, ``test/``...
folders that become splits). The train split (``data.train_split``) holds the labelled subset's
candidates and the unlabelled images, the test split (``data.test_split``, by default ``test``
when there is one) the test images, and ``data.unlabeled_split`` more unlabelled images whose
labels are ignored. Images are decoded once into uint8 tensors, as small image folders are, by
:func:`paws.data.images.decode_images`; labels from a ``ClassLabel`` column keep its class
names, other label values (numbers, strings) are sorted into classes.

An image's name (in split files, labels files, ``paws suggest``'s CSV) is its file's path
relative to ``data.root`` without the split folder, or else its row number; the unlabelled
split's names start with the split's name (``extra/17``), so that a labels file can name the
images ``paws suggest`` proposes from it.

This module reads the splits (:func:`load_hf`); :mod:`paws.data.sources` draws the labelled
subset and assembles the run's sets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from paws.config import DataConfig
from paws.data.images import ImageSet, ImageSource, decode_images, fits_in_memory, is_grey
from paws.errors import UserError, first_line

__all__ = ["HFSplits", "load_hf"]

_INSTALL = "pip install 'paws-ssl[hf]'"


@dataclass
class HFSplits:
    """The splits a run reads, decoded.

    Attributes:
        train: the train split, (N,) labels in ``classes``.
        test: the test split (labels in ``classes``), or None.
        unlabeled: the unlabelled split (labels -1), or None.
        classes: class names.
        channels: 1 (grey) or 3 (colour).
        skipped: names of unreadable images left out (``data.on_bad_image: skip``).
    """

    train: ImageSet
    test: ImageSet | None
    unlabeled: ImageSet | None
    classes: list[str]
    channels: int
    skipped: list[str]


@dataclass
class _Part:
    """One split's images before decoding: sources, names and (N,) labels (-1: none)."""

    split: str
    sources: list[ImageSource]
    names: list[str]
    labels: np.ndarray


def _datasets() -> Any:
    try:
        import datasets
    except ImportError as e:
        raise UserError(f"data.dataset 'hf' needs the datasets package: {_INSTALL}") from e
    return datasets


def _open_splits(root: Path, train_split: str) -> dict[str, Any]:
    """The splits of the dataset at ``root``, by name."""
    datasets = _datasets()
    if not root.is_dir():
        raise UserError(f"Hugging Face dataset folder not found: {root}")
    saved = (root / "dataset_dict.json").is_file() or (root / "state.json").is_file()
    try:
        if saved:
            ds = datasets.load_from_disk(str(root))
        else:
            ds = datasets.load_dataset("imagefolder", data_dir=str(root))
    except Exception as e:  # noqa: BLE001 - any failure means files datasets cannot read
        how = "a saved dataset" if saved else "an image folder"
        raise UserError(f"cannot read {root} as {how}: {first_line(e)}") from e
    if isinstance(ds, datasets.Dataset):
        return {train_split: ds}
    return dict(ds)


def _split(splits: dict[str, Any], name: str, key: str, root: Path) -> Any:
    if name not in splits:
        raise UserError(
            f"{key} is '{name}' but {root} has no such split; its splits: {', '.join(splits)}"
        )
    return splits[name]


def _column(ds: Any, name: str, key: str, split: str) -> None:
    if name not in ds.column_names:
        raise UserError(
            f"{key} is '{name}' but split '{split}' has no such column; its columns: "
            f"{', '.join(ds.column_names)}"
        )


def _label_names(ds: Any, column: str, split: str) -> tuple[list[str], list[str] | None]:
    """Each row's label as a string, and the column's ``ClassLabel`` names if it has them."""
    datasets = _datasets()
    feature = ds.features[column]
    values = list(ds[column])
    named = isinstance(feature, datasets.ClassLabel)
    missing = sum(v is None or (named and not 0 <= v < feature.num_classes) for v in values)
    if missing:
        raise UserError(
            f"{missing} of the {len(values)} images of split '{split}' have no label in column "
            f"'{column}'; move them to a split of their own and name it in data.unlabeled_split"
        )
    if named:
        return [feature.names[v] for v in values], list(feature.names)
    return [str(v) for v in values], None


def _labels(names: list[str], classes: list[str], split: str) -> np.ndarray:
    """Class positions of ``names``; a name that is not a class is an error."""
    position = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(names) - set(position))
    if unknown:
        raise UserError(
            f"split '{split}' has label '{unknown[0]}', not a class of the train split "
            f"({', '.join(classes[:10])}{', ...' if len(classes) > 10 else ''})"
        )
    return np.asarray([position[n] for n in names], dtype=np.int64)


def _sources(ds: Any, column: str, split: str, root: Path) -> tuple[list[ImageSource], list[str]]:
    """Each row's image as encoded bytes or a file, and its name: the file's path relative to
    ``root`` without a leading split folder, or else the row number."""
    datasets = _datasets()
    if not isinstance(ds.features[column], datasets.Image):
        raise UserError(
            f"column '{column}' of split '{split}' holds {ds.features[column]}, not images; "
            "set data.image_column"
        )
    sources: list[ImageSource] = []
    names: list[str] = []
    for i, item in enumerate(ds.cast_column(column, datasets.Image(decode=False))[column]):
        item = item or {}
        path = Path(item["path"]) if item.get("path") else None
        if item.get("bytes"):
            sources.append(bytes(item["bytes"]))
        elif path is not None:
            sources.append(path)
        else:
            raise UserError(f"row {i} of split '{split}' has no image in column '{column}'")
        names.append(_name(path, root, split) if path is not None else str(i))
    return sources, names


def _name(path: Path, root: Path, split: str) -> str:
    try:
        parts = path.resolve().relative_to(root.resolve()).parts
    except ValueError:
        return str(path)
    return str(Path(*parts[1:])) if len(parts) > 1 and parts[0] == split else str(Path(*parts))


def load_hf(d: DataConfig, size: int) -> HFSplits:
    """Read and decode the splits of the Hugging Face dataset ``d.root``.

    Args:
        d: the data config (``root``, ``image_column``, ``label_column``, the split names,
            ``channels``, ``in_memory``, ``memory_limit_gb``, ``on_bad_image``).
        size: side of the square uint8 images to decode to.

    Returns:
        The train, test and unlabelled splits with labels, classes and channels.
    """
    root = Path(str(d.root)).expanduser()
    splits = _open_splits(root, d.train_split)
    test_name = d.test_split or ("test" if "test" in splits else None)
    chosen = {"train": (d.train_split, "data.train_split")}
    if test_name is not None:
        chosen["test"] = (test_name, "data.test_split")
    if d.unlabeled_split:
        chosen["unlabeled"] = (d.unlabeled_split, "data.unlabeled_split")
    parts: dict[str, _Part] = {}
    classes: list[str] = []
    for role, (name, key) in chosen.items():  # train first: its labels make the classes
        ds = _split(splits, name, key, root)
        _column(ds, d.image_column, "data.image_column", name)
        sources, names = _sources(ds, d.image_column, name, root)
        if role == "unlabeled":  # named apart from the train split's rows and files
            names = [f"{name}/{n}" for n in names]
            y = -np.ones(len(names), dtype=np.int64)
        else:
            _column(ds, d.label_column, "data.label_column", name)
            labels, label_names = _label_names(ds, d.label_column, name)
            if role == "train":
                classes = label_names or sorted(set(labels), key=_natural)
            y = _labels(labels, classes, name)
        parts[role] = _Part(name, sources, names, y)
    return _decode(parts, classes, d, size)


def _natural(label: str) -> tuple[int, float, str]:
    """Numbers in numeric order, then text."""
    try:
        return (0, float(label), label)
    except ValueError:
        return (1, 0.0, label)


def _decode(
    parts: dict[str, _Part],
    classes: list[str],
    d: DataConfig,
    size: int,
) -> HFSplits:
    """Decode every split into uint8 images (N, C, size, size) of the same channels."""
    every = [s for part in parts.values() for s in part.sources]
    channels = d.channels or (1 if is_grey(every) else 3)
    if d.in_memory is False:
        raise UserError("hf datasets are decoded into memory: set data.in_memory to auto or true")
    if d.in_memory == "auto" and not fits_in_memory(len(every), size, channels, d.memory_limit_gb):
        raise UserError(
            f"{len(every)} images of {channels} x {size} x {size} exceed "
            f"data.memory_limit_gb ({d.memory_limit_gb:g}); raise it, or lower data.image_size"
        )
    sets: dict[str, ImageSet | None] = {"test": None, "unlabeled": None}
    skipped: list[str] = []
    for role, p in parts.items():
        # In messages, the split too (the unlabelled split's names hold it already).
        shown = p.names if role == "unlabeled" else [f"{p.split}/{n}" for n in p.names]
        images, kept, bad = decode_images(
            p.sources, size, channels, d.on_bad_image, shown, d.max_image_pixels
        )
        skipped += bad
        sets[role] = ImageSet(
            labels=p.labels[kept],
            names=[p.names[k] for k in kept],
            images=images,
            sources=[p.sources[k] for k in kept],
        )
    train = sets.pop("train")
    assert train is not None
    return HFSplits(train, sets["test"], sets["unlabeled"], classes, channels, skipped)
