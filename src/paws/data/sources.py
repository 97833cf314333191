"""Where a run's images come from: the unlabelled, labelled and test sets of a config.

:func:`load_datasets` assembles a :class:`Datasets` from a built-in dataset (Fashion-MNIST,
CIFAR-10/100), ImageNet-style folders (``train/<class>/*``, ``val/<class>/*``), any folder of
images (unlabelled images anywhere below a folder; labelled and test images as
``<class>/<image>``) or a Hugging Face dataset on disk (:mod:`paws.data.hf`), with the labelled
subset a config asks for (:func:`select_labeled`).
Folders small enough are decoded once into uint8 tensors (augmented as batches); larger ones
stay on disk and are decoded per image by the loaders.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from paws.config import Config, DataConfig
from paws.data.builtin import FASHION_MNIST_CLASSES, STATS, load_cifar, load_fashion_mnist
from paws.data.checks import suspicious
from paws.data.images import (
    ImageSet,
    decode_images,
    fits_in_memory,
    is_grey,
    readable,
    relative_names,
    scan_images,
    scan_labeled_folder,
    to_grey,
)
from paws.data.labels import LabelRow, LabelsFile, read_labels_file
from paws.errors import UserError
from paws.progress import info

__all__ = [
    "Datasets",
    "select_labeled",
    "labeled_from_file",
    "labeled_as_unlabeled",
    "without_labels",
    "load_datasets",
    "normalisation",
]


@dataclass
class Datasets:
    """Everything a run reads: the unlabelled, labelled and (optional) test sets."""

    unlabeled: ImageSet
    labeled: ImageSet
    test: ImageSet | None
    classes: list[str]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        test = f", {len(self.test)} test" if self.test is not None else ", no test set"
        where = "in memory" if self.unlabeled.in_memory else "on disk"
        return (
            f"{len(self.unlabeled)} unlabelled, {len(self.labeled)} labelled "
            f"({len(self.classes)} classes){test}; {where}"
        )


def _read_split(path: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"split file not found: {p}")
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    names = [ln for ln in lines if ln and not ln.startswith("#")]
    if not names:
        raise UserError(f"split file {p} lists no images")
    return names


class _Names(dict):
    """Image positions by name: a bare file name that several images share (``a.png`` in two
    class folders) is refused when used, naming two of them."""

    def __init__(self, images: ImageSet):
        super().__init__()
        self.shared: dict[str, list[str]] = {}
        for i, name in enumerate(images.names):
            self.setdefault(name, i)
        full = set(self)
        for i, name in enumerate(images.names):
            base = Path(name).name
            if base in full:  # a whole name means that image
                continue
            if base in self and images.names[self[base]] != name:
                self.shared.setdefault(base, [images.names[self[base]]]).append(name)
            self.setdefault(base, i)

    def position(self, name: str, where: str) -> int:
        """The image ``name`` means, ``where`` naming the file and line for the error."""
        if name in self.shared:
            a, b = self.shared[name][:2]
            raise UserError(
                f"{where}: '{name}' names {len(self.shared[name])} images ('{a}', '{b}', ...); "
                "give its path relative to the folder"
            )
        return self[name]


def _name_lookup(images: ImageSet) -> _Names:
    """Image positions by name and by file name: how split files and labels files name the
    images of a set (a file name several images share is refused, :class:`_Names`)."""
    return _Names(images)


def select_labeled(images: ImageSet, cfg: DataConfig, num_classes: int) -> np.ndarray:
    """Indices of the labelled subset of a fully labelled set, per ``cfg``.

    ``split_file`` lines are matched to image names (an index for Fashion-MNIST/CIFAR, a file
    name or relative path for folders); otherwise ``num_labels`` images are drawn uniformly at
    random from the whole set, or ``label_fraction`` or else ``labels_per_class`` images per
    class, with ``split_seed``. With none of them set, every image is labelled.
    """
    if cfg.split_file:
        wanted = _read_split(cfg.split_file)
        lookup = _name_lookup(images)
        missing = [w for w in wanted if w not in lookup]
        if missing:
            raise UserError(
                f"split file {cfg.split_file} names {len(missing)} image(s) not in the "
                f"dataset, e.g. '{missing[0]}'; fix the names or the data folder"
            )
        return np.unique([lookup.position(w, f"split file {cfg.split_file}") for w in wanted])
    if cfg.num_labels is not None:
        if cfg.num_labels > len(images):
            raise UserError(
                f"data.num_labels is {cfg.num_labels} but the set has {len(images)} images"
            )
        return np.sort(
            np.random.default_rng(cfg.split_seed).choice(len(images), cfg.num_labels, replace=False)
        )
    if cfg.labels_per_class is None and cfg.label_fraction is None:
        return np.arange(len(images))
    rng = np.random.default_rng(cfg.split_seed)
    chosen = []
    for c in range(num_classes):
        pool = np.flatnonzero(images.labels == c)
        if cfg.label_fraction is not None:
            n = max(1, int(round(cfg.label_fraction * len(pool))))
        else:
            n = cfg.labels_per_class
            if n > len(pool):
                raise UserError(
                    f"data.labels_per_class is {n} but class {c} has only {len(pool)} images; "
                    "lower it"
                )
        chosen.append(rng.choice(pool, size=min(n, len(pool)), replace=False))
    return np.sort(np.concatenate(chosen))


def _class_id(labels: LabelsFile, row: LabelRow, classes: Sequence[str]) -> int:
    """The class a labels file's row names in a dataset of fixed classes: a class name, or a
    class index where no class has that name."""
    if row.label in classes:
        return list(classes).index(row.label)
    if row.label.isdigit() and int(row.label) < len(classes):
        return int(row.label)
    shown = ", ".join(classes[:12]) + (", ..." if len(classes) > 12 else "")
    raise labels.error(row, f"'{row.label}' is not a class of the dataset ({shown})")


def labeled_from_file(
    images: ImageSet, cfg: DataConfig, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """The labelled subset ``data.labels_file`` names in a set of named images (a built-in,
    ImageNet or Hugging Face training set), with the file's labels.

    Returns:
        ``(index (M,), labels (M,))``: positions in ``images`` (sorted) and class ids.
    """
    labels = read_labels_file(cfg.labels_file or "", cfg.accept_suggested, cfg.labels_columns)
    lookup = _name_lookup(images)

    def image(row: LabelRow) -> str:
        if row.path not in lookup:
            example = f", e.g. '{images.names[0]}'" if len(images) else ""
            raise labels.error(row, f"no image of that name in the training set (names{example})")
        where = f"labels file {labels.path} row {row.row}"
        return str(lookup.position(row.path, where))

    rows = labels.unique(image)
    index = np.array([int(k) for k in rows], dtype=np.int64)
    y = np.array([_class_id(labels, r, classes) for r in rows.values()], dtype=np.int64)
    order = np.argsort(index, kind="stable")
    _said(labels, y, classes)
    return index[order], y[order]


def _said(labels: LabelsFile, y: np.ndarray, classes: Sequence[str]) -> None:
    skipped = f"; {labels.unlabelled} unlabelled suggestions skipped" if labels.unlabelled else ""
    info(
        f"labels file {labels.path}: {len(y)} labelled images of {len(np.unique(y))} of "
        f"{len(classes)} classes{skipped}"
    )


def _labeled_subset(
    images: ImageSet, cfg: DataConfig, classes: Sequence[str]
) -> tuple[np.ndarray, np.ndarray]:
    """Positions and labels of the labelled subset of a fully labelled, named set:
    :func:`labeled_from_file` with ``data.labels_file``, else :func:`select_labeled`."""
    if cfg.labels_file:
        return labeled_from_file(images, cfg, classes)
    chosen = select_labeled(images, cfg, len(classes))
    return chosen, images.labels[chosen]


def _split(full: ImageSet, cfg: DataConfig, classes: Sequence[str]) -> tuple[ImageSet, ImageSet]:
    """A fully labelled, named set split into ``(labelled subset, unlabelled set)``: the
    unlabelled set is every image, or those left out of the labelled subset
    (``data.unlabeled_includes_labeled``), without its labels."""
    chosen, chosen_y = _labeled_subset(full, cfg, classes)
    labeled = full.subset(chosen)
    labeled.labels = chosen_y
    if cfg.unlabeled_includes_labeled:
        return labeled, labeled_as_unlabeled(full)
    rest = np.setdiff1d(np.arange(len(full)), chosen)
    return labeled, labeled_as_unlabeled(full.subset(rest))


def _add_labels_file(
    labeled: ImageSet, classes: list[str], folder: ImageSet, cfg: DataConfig
) -> tuple[ImageSet, list[str], ImageSet]:
    """A folder dataset's labelled set with the images of ``data.labels_file`` added.

    Args:
        labeled: the labelled folder's images (its ``data.split_file`` subset), maybe none.
        classes: their class names.
        folder: every image of the labelled folder, with its class.
        cfg: the data config.

    Returns:
        ``(labelled set, class names, the file's images that are not in the folder)``; the
        classes are the sorted union of the folder's and the file's.

    Raises:
        UserError: an unknown path, a duplicate, or an image the file labels with another
            class than its class folder.
    """
    labels = read_labels_file(cfg.labels_file or "", cfg.accept_suggested, cfg.labels_columns)

    def image(row: LabelRow) -> str:
        f = labels.file(row)
        if not f.is_file():
            raise labels.error(row, f"no such image file {f}")
        return str(f.resolve())

    rows = labels.unique(image)
    _same_kind_as_folder(labels, classes, cfg)
    in_folder = {str(f.resolve()): classes[y] for f, y in zip(folder.files or [], folder.labels)}
    chosen = {str(f.resolve()) for f in labeled.files or []}
    for key, r in rows.items():
        if key in in_folder and in_folder[key] != r.label:
            raise labels.error(
                r, f"conflicting labels: '{r.label}' here, '{in_folder[key]}' by its class folder"
            )
    new = [(k, r) for k, r in rows.items() if k not in chosen]
    outside = [(k, r) for k, r in new if k not in in_folder]
    names = sorted(set(classes) | {r.label for r in rows.values()})
    added = sorted(set(names) - set(classes))
    if classes and added:
        info(f"labels file {labels.path} adds classes to {cfg.labeled}: {', '.join(added)}")
    y = [names.index(classes[c]) for c in labeled.labels] + [names.index(r.label) for _, r in new]
    out = ImageSet(
        labels=np.asarray(y, dtype=np.int64),
        names=list(labeled.names) + [r.path for _, r in new],
        files=list(labeled.files or []) + [labels.file(r) for _, r in new],
    )
    _said(labels, np.asarray([names.index(r.label) for r in rows.values()]), names)
    extra = ImageSet(
        labels=np.asarray([names.index(r.label) for _, r in outside], dtype=np.int64),
        names=[r.path for _, r in outside],
        files=[labels.file(r) for _, r in outside],
    )
    return out, names, extra


def _same_kind_as_folder(labels: LabelsFile, classes: Sequence[str], cfg: DataConfig) -> None:
    """Refuse class numbers beside class names in a folder dataset, where every label names
    a class: ``0`` would become a class of its own beside ``zero``. (A built-in dataset reads
    a number as the class of that index, :func:`_class_id`.)"""
    named = [(None, c) for c in classes if not c.isdigit()]
    named += [(r, r.label) for r in labels.rows if not r.label.isdigit()]
    if not named:
        return
    row, name = named[0]
    where = f"row {row.row} names" if row is not None else f"{cfg.labeled} has"
    for r in labels.rows:
        if r.label.isdigit() and r.label not in classes:
            raise labels.error(
                r,
                f"the label '{r.label}' is a number, but {where} the class '{name}': label "
                "every image by class name",
            )


def _test_with_new_classes(
    root: Path, classes: list[str]
) -> tuple[list[Path], np.ndarray, list[str]]:
    """A test folder beside a labels file, which may not have labelled every class yet: its
    classes without labels are added after the labelled ones (PAWS-NN never predicts them).

    Returns:
        ``(files, labels, classes)``.
    """
    files, y, own = scan_labeled_folder(root)
    unlabelled = [c for c in own if c not in classes]
    if unlabelled:
        info(f"test classes with no labels yet: {', '.join(unlabelled)} (never predicted)")
    names = [*classes, *unlabelled]
    return files, np.asarray([names.index(own[c]) for c in y], dtype=np.int64), names


def memory_size(cfg: Config) -> int:
    """Side of the square images a dataset decoded into memory holds: ``data.image_size``, by
    default ``views.large_size * 8/7`` (room for the evaluation view's resize and crop)."""
    return cfg.data.image_size or max(cfg.views.large_size, round(cfg.views.large_size * 8 / 7))


def _folder_sets(cfg: Config) -> Datasets:
    d = cfg.data
    if d.labeled:
        lab_root = Path(d.labeled).expanduser()
        lab_files, lab_y, classes = scan_labeled_folder(lab_root)
        lab_names = relative_names(lab_files, lab_root)
    else:  # the labels file alone names the labelled images
        lab_files, lab_y, classes, lab_names = [], np.zeros(0, dtype=np.int64), [], []
    folder = ImageSet(labels=lab_y, names=lab_names, files=lab_files)
    labeled = folder
    if d.split_file:
        labeled = labeled.subset(select_labeled(labeled, d, len(classes)))
    if d.labels_file:
        labeled, classes, extra = _add_labels_file(labeled, classes, folder, d)
        lab_files, lab_names = lab_files + (extra.files or []), lab_names + extra.names
    if d.unlabeled:
        unl_root = Path(d.unlabeled).expanduser()
        unl_files = scan_images(unl_root)
        names = relative_names(unl_files, unl_root)
        if d.unlabeled_includes_labeled:
            seen = {f.resolve() for f in unl_files}
            extra_i = [i for i, f in enumerate(lab_files) if f.resolve() not in seen]
            unl_files = unl_files + [lab_files[i] for i in extra_i]
            names = names + [lab_names[i] for i in extra_i]
    else:
        unl_files, names = list(lab_files), list(lab_names)
    unlabeled = ImageSet(
        labels=-np.ones(len(unl_files), dtype=np.int64), names=names, files=unl_files
    )
    test = None
    if d.test:
        test_root = Path(d.test).expanduser()
        if d.labels_file:
            test_files, test_y, classes = _test_with_new_classes(test_root, classes)
        else:
            test_files, test_y, _ = scan_labeled_folder(test_root, classes)
        test = ImageSet(
            labels=test_y, names=relative_names(test_files, test_root), files=test_files
        )
    sets = [s for s in (unlabeled, labeled, test) if s is not None]
    unique = list(dict.fromkeys(f for s in sets for f in s.files or []))
    channels = d.channels or (1 if is_grey(unique) else 3)
    size = memory_size(cfg)
    in_memory = d.in_memory is True or (
        d.in_memory == "auto" and fits_in_memory(len(unique), size, channels, d.memory_limit_gb)
    )
    skipped: list[str] = []
    if in_memory:
        images, kept, skipped = decode_images(
            unique, size, channels, d.on_bad_image, max_pixels=d.max_image_pixels
        )
        row = {unique[k]: r for r, k in enumerate(kept)}

        def load(s: ImageSet) -> ImageSet:
            keep = [i for i, f in enumerate(s.files or []) if f in row]
            if not len(s):  # no labelled images (a label-free run)
                return ImageSet(s.labels, [], images=images[:0])
            if not keep:
                raise UserError("every image of a set was unreadable and skipped")
            out = s.subset(keep)
            out.images = images[torch.tensor([row[f] for f in out.files or []])]
            out.sources, out.files = list(out.files or []), None
            return out

        unlabeled, labeled = load(unlabeled), load(labeled)
        test = load(test) if test is not None else None
    elif d.on_bad_image == "skip":
        unlabeled, labeled, test, skipped = _drop_unreadable(
            unlabeled, labeled, test, d.max_image_pixels
        )
    mean, std = normalisation(cfg, "imagenet", channels)
    return Datasets(unlabeled, labeled, test, classes, channels, mean, std, skipped)


def _drop_unreadable(
    unlabeled: ImageSet, labeled: ImageSet, test: ImageSet | None, max_pixels: int
) -> tuple[ImageSet, ImageSet, ImageSet | None, list[str]]:
    """The sets of an on-disk folder dataset without their unreadable files
    (``data.on_bad_image: skip``), and the files left out: labelled and test images are
    decoded once, since a blank image in their place would count with its label; unlabelled
    images have their headers checked (a file that fails later in a data-loader worker is
    replaced by the next readable one).
    """
    test_files = (test.files or []) if test is not None else []
    decoded = list(dict.fromkeys([*(labeled.files or []), *test_files]))
    seen = set(decoded)
    rest = [f for f in dict.fromkeys(unlabeled.files or []) if f not in seen]
    bad = {f for f, ok in zip(decoded, readable(decoded, max_pixels)) if not ok}
    bad |= {f for f, ok in zip(rest, readable(rest, max_pixels, decode=False)) if not ok}

    def keep(s: ImageSet) -> ImageSet:
        index = [i for i, f in enumerate(s.files or []) if f not in bad]
        if not index:
            raise UserError("every image of a set was unreadable and skipped")
        return s.subset(index)

    skipped = [str(f) for f in [*decoded, *rest] if f in bad]
    return keep(unlabeled), keep(labeled), keep(test) if test else None, skipped


def labeled_as_unlabeled(labeled: ImageSet) -> ImageSet:
    """The labelled images viewed as an unlabelled set (labels hidden)."""
    return ImageSet(
        labels=-np.ones(len(labeled), dtype=np.int64),
        names=list(labeled.names),
        images=labeled.images,
        files=labeled.files,
        sources=labeled.sources,
    )


def without_labels(data: Datasets) -> Datasets:
    """The datasets of a label-free run (``loss.objective: simclr``): the unlabelled set alone,
    no labelled images, no classes and no test set (nothing to classify it against). With
    ``data.unlabeled_includes_labeled`` (the default) a built-in dataset's unlabelled set is
    its whole training set."""
    unl = data.unlabeled
    empty = ImageSet(
        labels=np.zeros(0, dtype=np.int64),
        names=[],
        images=unl.images[:0] if unl.images is not None else None,
        files=[] if unl.files is not None else None,
    )
    return Datasets(unl, empty, None, [], data.channels, data.mean, data.std, data.skipped)


def normalisation(
    cfg: Config, dataset: str, channels: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) of each channel: ``data.mean``/``data.std`` when set, else the dataset's
    (ImageNet's for folders; for grey images, its luma)."""
    mean, std = STATS.get(dataset, STATS["imagenet"])
    if channels == 1 and len(mean) == 3:
        mean, std = (0.449,), (0.226,)
    mean = tuple(cfg.data.mean) if cfg.data.mean else mean
    std = tuple(cfg.data.std) if cfg.data.std else std
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"data.mean and data.std need {channels} values for this dataset")
    return mean, std


def _imagenet_sets(cfg: Config) -> Datasets:
    d = cfg.data
    if not d.root:
        raise UserError("set data.root to the ImageNet folder holding train/ and val/")
    root = Path(d.root).expanduser()
    train_files, train_y, classes = scan_labeled_folder(root / "train")
    full = ImageSet(
        labels=train_y, names=relative_names(train_files, root / "train"), files=train_files
    )
    labeled, unlabeled = _split(full, d, classes)
    test = None
    if (root / "val").is_dir():
        val_files, val_y, _ = scan_labeled_folder(root / "val", classes)
        test = ImageSet(
            labels=val_y, names=relative_names(val_files, root / "val"), files=val_files
        )
    mean, std = normalisation(cfg, "imagenet", 3)
    return Datasets(unlabeled, labeled, test, classes, 3, mean, std)


def _joined(first: ImageSet, second: ImageSet) -> ImageSet:
    """Two sets of images in memory as one, ``first``'s images first."""
    assert first.images is not None and second.images is not None
    return ImageSet(
        labels=np.concatenate([first.labels, second.labels]),
        names=first.names + second.names,
        images=torch.cat([first.images, second.images]),
        sources=None
        if first.sources is None or second.sources is None
        else [*first.sources, *second.sources],
    )


def _hf_sets(cfg: Config) -> Datasets:
    from paws.data.hf import load_hf  # imports the datasets package: only when asked for

    d = cfg.data
    hf = load_hf(d, memory_size(cfg))
    if hf.unlabeled is not None and d.labels_file:
        # A labels file may name images of the unlabelled split (``<split>/<name>``, what
        # paws suggest proposes from it) as well as of the train split.
        labeled, unlabeled = _split(_joined(hf.train, hf.unlabeled), d, hf.classes)
    else:
        labeled, unlabeled = _split(hf.train, d, hf.classes)
        if hf.unlabeled is not None:
            unlabeled = _joined(unlabeled, hf.unlabeled)
    mean, std = normalisation(cfg, "imagenet", hf.channels)
    return Datasets(unlabeled, labeled, hf.test, hf.classes, hf.channels, mean, std, hf.skipped)


def load_datasets(cfg: Config) -> Datasets:
    """Load the run's unlabelled, labelled and test sets as the config describes, saying in one
    line each what looks unintended (:func:`paws.data.checks.suspicious`).

    Raises:
        UserError: a folder the config names does not exist (``data.root`` included: a
            dataset is never silently taken from elsewhere), or anything wrong with the data.
    """
    data = _load(cfg)
    for line in suspicious(data.classes, data.labeled, data.test):
        info(line)
    return data


def _load(cfg: Config) -> Datasets:
    d = cfg.data
    if d.root and not Path(d.root).expanduser().exists():
        raise UserError(
            f"data.root {d.root} does not exist; fix the path, or create the folder "
            "(Fashion-MNIST is downloaded into it when it is not there)"
        )
    if d.dataset == "folder":
        return _folder_sets(cfg)
    if d.dataset == "imagenet":
        return _imagenet_sets(cfg)
    if d.dataset == "hf":
        return _hf_sets(cfg)
    if d.dataset == "fashion_mnist":
        train, test = load_fashion_mnist(d.root)
        classes = list(FASHION_MNIST_CLASSES)
    else:
        train, test, classes = load_cifar(d.root, d.dataset)
    channels = train.images.shape[1]
    if d.channels and d.channels != channels:
        if d.channels == 3:
            train.images, test.images = (
                s.images.expand(-1, 3, -1, -1).contiguous() for s in (train, test)
            )
        else:
            train.images, test.images = (to_grey(s.images) for s in (train, test))
        channels = d.channels
    labeled, unlabeled = _split(train, d, classes)
    mean, std = normalisation(cfg, d.dataset, channels)
    return Datasets(unlabeled, labeled, test, classes, channels, mean, std)
