"""Datasets, labelled subsets and the per-step batches the training loop consumes.

Sources: Fashion-MNIST (idx ``.gz`` files), CIFAR-10/100 (the python-pickle batches
torchvision downloads), ImageNet-style folders (``train/<class>/*``, ``val/<class>/*``) and any
folder of images (unlabelled images anywhere below a folder; labelled and test images as
``<class>/<image>``). Small datasets are decoded once into a uint8 tensor and augmented as
batches (:class:`paws.transforms.BatchViews`); large ones stay on disk and are decoded per image
in data-loader workers.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import signal
import subprocess
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from paws.config import Config, DataConfig, ViewsConfig
from paws.errors import UserError
from paws.progress import info
from paws.sampling import SupportSampler, UnlabeledSampler
from paws.transforms import (
    BatchViews,
    ShardGenerator,
    eval_transform,
    multicrop_transform,
    support_transform,
)

__all__ = [
    "ImageSet",
    "Datasets",
    "Batch",
    "IMAGE_EXTENSIONS",
    "load_datasets",
    "load_fashion_mnist",
    "load_cifar",
    "scan_labeled_folder",
    "scan_images",
    "decode_images",
    "read_image",
    "select_labeled",
    "step_batches",
    "augmented_batches",
    "step_generator",
    "eval_batches",
    "default_workers",
]

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".bmp",
    ".gif",
    ".tif",
    ".tiff",
    ".webp",
    ".ppm",
    ".pgm",
)
FASHION_MNIST_DEBIAN = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
STATS = {
    "fashion_mnist": ((0.2860,), (0.3530,)),
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


@dataclass
class ImageSet:
    """A set of images held either in memory or as files.

    Attributes:
        labels: (N,) int64 class ids (-1 where unknown).
        names: (N,) image names used by split files and in outputs.
        images: (N, C, H, W) uint8 in memory, or None.
        files: N paths read on demand, or None.
    """

    labels: np.ndarray
    names: list[str]
    images: torch.Tensor | None = None
    files: list[Path] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def in_memory(self) -> bool:
        return self.images is not None

    def subset(self, index: Sequence[int] | np.ndarray) -> ImageSet:
        """The images at ``index``, in that order."""
        index = np.asarray(index, dtype=np.int64)
        return ImageSet(
            labels=self.labels[index],
            names=[self.names[i] for i in index],
            images=self.images[torch.from_numpy(index)] if self.images is not None else None,
            files=[self.files[i] for i in index] if self.files is not None else None,
        )


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


# --------------------------------------------------------------------------------------------
# Built-in datasets.


def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise UserError(f"cannot read {path}: {e}") from e
    if len(data) < 8 or data[:2] != b"\x00\x00":
        raise UserError(f"{path} is not an idx file")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated: expected {int(np.prod(dims))} values")
    return body.reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (f"{stem}.gz", stem):
        for sub in ("", "FashionMNIST/raw", "raw"):
            p = folder / sub / name
            if p.is_file():
                return p
    return None


def _debian_fashion_mnist() -> Path | None:
    if FASHION_MNIST_DEBIAN.is_dir():
        return FASHION_MNIST_DEBIAN
    if shutil.which("dpkg"):
        try:
            out = subprocess.run(
                ["dpkg", "-L", "dataset-fashion-mnist"], capture_output=True, text=True, timeout=10
            ).stdout
        except (OSError, subprocess.SubprocessError):
            return None
        for line in out.splitlines():
            if line.endswith("train-images-idx3-ubyte.gz"):
                return Path(line).parent
    return None


def load_fashion_mnist(root: str | None) -> tuple[ImageSet, ImageSet]:
    """Fashion-MNIST train and test sets (60,000 and 10,000 28x28 grey images).

    Looks in ``root``, then in the Debian package ``dataset-fashion-mnist``'s folder, then
    downloads with torchvision into ``root`` (or ``~/.cache/paws``).
    """
    candidates = [Path(root).expanduser()] if root else []
    debian = _debian_fashion_mnist()
    if debian:
        candidates.append(debian)
    for folder in candidates:
        paths = {
            s: _find_idx(folder, s)
            for s in (
                "train-images-idx3-ubyte",
                "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte",
                "t10k-labels-idx1-ubyte",
            )
        }
        if all(paths.values()):
            break
    else:
        target = Path(root).expanduser() if root else Path.home() / ".cache" / "paws"
        try:
            from torchvision.datasets import FashionMNIST

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                FashionMNIST(str(target), train=True, download=True)
                FashionMNIST(str(target), train=False, download=True)
        except Exception as e:  # noqa: BLE001 - offline, or no permission
            raise UserError(
                "Fashion-MNIST not found: set data.root to a folder with its idx .gz files, "
                "install the Debian package (apt-get install dataset-fashion-mnist), or go "
                f"online so torchvision can download it ({type(e).__name__})"
            ) from e
        return load_fashion_mnist(str(target))
    sets = []
    for split in ("train", "t10k"):
        x = _read_idx(paths[f"{split}-images-idx3-ubyte"])
        y = _read_idx(paths[f"{split}-labels-idx1-ubyte"]).astype(np.int64)
        if len(x) != len(y):
            raise UserError(f"{split} images and labels differ in length in {folder}")
        sets.append(
            ImageSet(
                labels=y,
                names=[str(i) for i in range(len(y))],
                images=torch.from_numpy(x.copy()).unsqueeze(1),
            )
        )
    return sets[0], sets[1]


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles CIFAR batch files only: plain containers and numpy arrays, nothing else.

    The allowed names build arrays and bytes (as the original Python 2 batches and files
    re-pickled by Python 3 store them); any other global, e.g. ``os.system``, is refused.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}")


def _unpickle(path: Path, *keys: str) -> dict:
    try:
        with open(path, "rb") as f:
            d = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as e:  # noqa: BLE001 - any failure means a corrupt or hostile file
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"cannot read CIFAR batch {path}: {first}") from e
    if not isinstance(d, dict) or any(k not in d for k in keys):
        raise UserError(f"{path} is not a CIFAR batch file (expected keys {', '.join(keys)})")
    return d


def load_cifar(root: str | None, which: str = "cifar10") -> tuple[ImageSet, ImageSet, list[str]]:
    """CIFAR-10 or CIFAR-100 from torchvision's python batches below ``root``.

    Returns:
        ``(train, test, class_names)``.
    """
    if not root:
        raise UserError(
            f"set data.root to the folder holding {which}'s python batches "
            "(cifar-10-batches-py or cifar-100-python)"
        )
    base = Path(root).expanduser()
    sub = "cifar-10-batches-py" if which == "cifar10" else "cifar-100-python"
    folder = base / sub if (base / sub).is_dir() else base
    if which == "cifar10":
        train_files, test_files = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]
        meta, key, names_key = "batches.meta", "labels", "label_names"
    else:
        train_files, test_files = ["train"], ["test"]
        meta, key, names_key = "meta", "fine_labels", "fine_label_names"
    missing = [f for f in train_files + test_files + [meta] if not (folder / f).is_file()]
    if missing:
        raise UserError(
            f"{which} files missing in {folder}: {', '.join(missing)}; set "
            f"data.root to the folder holding {sub}"
        )

    def read(files: list[str]) -> ImageSet:
        xs, ys = [], []
        for f in files:
            d = _unpickle(folder / f, "data", key)
            xs.append(np.asarray(d["data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            ys.append(np.asarray(d[key], dtype=np.int64))
        x, y = np.concatenate(xs), np.concatenate(ys)
        return ImageSet(labels=y, names=[str(i) for i in range(len(y))], images=torch.from_numpy(x))

    classes = [str(c) for c in _unpickle(folder / meta, names_key)[names_key]]
    return read(train_files), read(test_files), classes


# --------------------------------------------------------------------------------------------
# Image folders.


def scan_images(folder: str | Path) -> list[Path]:
    """All image files below ``folder`` (recursive, sorted), by extension."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
    )
    if not files:
        raise UserError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def scan_labeled_folder(
    folder: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels of a ``<class>/<image>`` folder.

    Args:
        folder: the folder.
        classes: fixed class order (e.g. the labelled set's for a test folder); by default the
            sorted sub-folder names.

    Returns:
        ``(files, labels, classes)``.
    """
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"labelled folder not found: {folder}")
    subdirs = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not subdirs:
        raise UserError(
            f"{folder} has no class sub-folders: arrange labelled images as <class>/<image>"
        )
    order = list(classes) if classes is not None else subdirs
    files, labels = [], []
    for name in subdirs:
        imgs = sorted(
            p
            for p in (folder / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
        )
        if not imgs:
            raise UserError(
                f"class folder {folder / name} holds no images; add images or remove the folder"
            )
        if name not in order:
            raise UserError(
                f"class '{name}' in {folder} is not a class of the labelled set "
                f"({', '.join(order)})"
            )
        files += imgs
        labels += [order.index(name)] * len(imgs)
    return files, np.asarray(labels, dtype=np.int64), order


def read_image(path: Path, channels: int | None = None) -> Image.Image:
    """Open and fully decode an image as RGB (or L when ``channels`` is 1).

    Palette and RGBA images are composited on white; raises :class:`UserError` naming the file
    if it is corrupt, truncated or not an image.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
                im = im.convert("RGBA")
                bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
                im = Image.alpha_composite(bg, im)
            mode = "L" if channels == 1 else "RGB"
            return im.convert(mode)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image, or in a format Pillow cannot read"
        else:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else "corrupt"
        raise UserError(
            f"cannot read image {path}: {reason}; fix or remove it, or set data.on_bad_image: skip"
        ) from e


def _is_grey(path: Path) -> bool:
    try:
        with Image.open(path) as im:
            return im.mode in ("1", "L", "LA", "I", "I;16", "F")
    except (UnidentifiedImageError, OSError):
        return True  # decided when decoding


def _square(im: Image.Image, size: int) -> np.ndarray:
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else im
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def decode_images(
    files: Sequence[Path], size: int, channels: int, on_bad_image: str = "error"
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode files into a uint8 tensor, each resized (shorter side) and centre-cropped to
    ``size``.

    Returns:
        ``(images (N', C, size, size), kept indices, skipped file names)``; with
        ``on_bad_image='error'`` a bad file raises :class:`UserError` instead.
    """

    def one(path: Path) -> np.ndarray | None:
        try:
            return _square(read_image(path, channels), size)
        except UserError:
            if on_bad_image == "error":
                raise
            return None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2))) as pool:
        arrays = list(pool.map(one, files))
    kept = [i for i, a in enumerate(arrays) if a is not None]
    skipped = [str(files[i]) for i, a in enumerate(arrays) if a is None]
    if not kept:
        raise UserError(f"none of the {len(files)} images could be read")
    out = torch.from_numpy(np.stack([arrays[i] for i in kept]))
    return out, kept, skipped


def _names(files: Sequence[Path], root: Path) -> list[str]:
    return [str(f.relative_to(root)) for f in files]


# --------------------------------------------------------------------------------------------
# Labelled subsets.


def _read_split(path: str) -> list[str]:
    p = Path(path).expanduser()
    if not p.is_file():
        raise UserError(f"split file not found: {p}")
    lines = [ln.strip() for ln in p.read_text().splitlines()]
    names = [ln for ln in lines if ln and not ln.startswith("#")]
    if not names:
        raise UserError(f"split file {p} lists no images")
    return names


def select_labeled(images: ImageSet, cfg: DataConfig, num_classes: int) -> np.ndarray:
    """Indices of the labelled subset of a fully labelled set, per ``cfg``.

    ``split_file`` lines are matched to image names (an index for Fashion-MNIST/CIFAR, a file
    name or relative path for folders); otherwise ``label_fraction`` or else
    ``labels_per_class`` images are drawn per class with ``split_seed``. With none of them set,
    every image is labelled.
    """
    if cfg.split_file:
        wanted = _read_split(cfg.split_file)
        lookup: dict[str, int] = {}
        for i, name in enumerate(images.names):
            lookup.setdefault(name, i)
            lookup.setdefault(Path(name).name, i)
        missing = [w for w in wanted if w not in lookup]
        if missing:
            raise UserError(
                f"split file {cfg.split_file} names {len(missing)} image(s) not in the "
                f"dataset, e.g. '{missing[0]}'; fix the names or the data folder"
            )
        return np.unique([lookup[w] for w in wanted])
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


# --------------------------------------------------------------------------------------------
# Putting it together.


def _fits(n: int, size: int, channels: int, limit_gb: float) -> bool:
    return n * size * size * channels <= limit_gb * 1e9


def _folder_sets(cfg: Config) -> Datasets:
    d = cfg.data
    lab_root = Path(d.labeled).expanduser()
    lab_files, lab_y, classes = scan_labeled_folder(lab_root)
    labeled = ImageSet(labels=lab_y, names=_names(lab_files, lab_root), files=lab_files)
    if d.split_file:
        labeled = labeled.subset(select_labeled(labeled, d, len(classes)))
    if d.unlabeled:
        unl_root = Path(d.unlabeled).expanduser()
        unl_files = scan_images(unl_root)
        names = _names(unl_files, unl_root)
        if d.unlabeled_includes_labeled:
            seen = {f.resolve() for f in unl_files}
            extra = [f for f in lab_files if f.resolve() not in seen]
            unl_files, names = unl_files + extra, names + _names(extra, lab_root)
    else:
        unl_files, names = list(lab_files), _names(lab_files, lab_root)
    unlabeled = ImageSet(
        labels=-np.ones(len(unl_files), dtype=np.int64), names=names, files=unl_files
    )
    test = None
    if d.test:
        test_root = Path(d.test).expanduser()
        test_files, test_y, _ = scan_labeled_folder(test_root, classes)
        test = ImageSet(labels=test_y, names=_names(test_files, test_root), files=test_files)
    sets = [s for s in (unlabeled, labeled, test) if s is not None]
    unique = list(dict.fromkeys(f for s in sets for f in s.files or []))
    channels = d.channels or (1 if all(_is_grey(f) for f in unique[:2000]) else 3)
    size = d.image_size or max(cfg.views.large_size, round(cfg.views.large_size * 8 / 7))
    in_memory = d.in_memory is True or (
        d.in_memory == "auto" and _fits(len(unique), size, channels, d.memory_limit_gb)
    )
    skipped: list[str] = []
    if in_memory:
        images, kept, skipped = decode_images(unique, size, channels, d.on_bad_image)
        row = {unique[k]: r for r, k in enumerate(kept)}

        def load(s: ImageSet) -> ImageSet:
            keep = [i for i, f in enumerate(s.files or []) if f in row]
            if not keep:
                raise UserError("every image of a set was unreadable and skipped")
            out = s.subset(keep)
            out.images = images[torch.tensor([row[f] for f in out.files or []])]
            out.files = None
            return out

        unlabeled, labeled = load(unlabeled), load(labeled)
        test = load(test) if test is not None else None
    mean, std = _stats(cfg, "imagenet", channels)
    return Datasets(unlabeled, labeled, test, classes, channels, mean, std, skipped)


def labeled_as_unlabeled(labeled: ImageSet) -> ImageSet:
    """The labelled images viewed as an unlabelled set (labels hidden)."""
    return ImageSet(
        labels=-np.ones(len(labeled), dtype=np.int64),
        names=list(labeled.names),
        images=labeled.images,
        files=labeled.files,
    )


def _stats(cfg: Config, dataset: str, channels: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
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
    full = ImageSet(labels=train_y, names=_names(train_files, root / "train"), files=train_files)
    labeled = full.subset(select_labeled(full, d, len(classes)))
    unlabeled = (
        full
        if d.unlabeled_includes_labeled
        else full.subset(np.setdiff1d(np.arange(len(full)), select_labeled(full, d, len(classes))))
    )
    unlabeled = labeled_as_unlabeled(unlabeled)
    test = None
    if (root / "val").is_dir():
        val_files, val_y, _ = scan_labeled_folder(root / "val", classes)
        test = ImageSet(labels=val_y, names=_names(val_files, root / "val"), files=val_files)
    mean, std = _stats(cfg, "imagenet", 3)
    return Datasets(unlabeled, labeled, test, classes, 3, mean, std)


def load_datasets(cfg: Config) -> Datasets:
    """Load the run's unlabelled, labelled and test sets as the config describes."""
    d = cfg.data
    if d.dataset == "folder":
        return _folder_sets(cfg)
    if d.dataset == "imagenet":
        return _imagenet_sets(cfg)
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
            train.images, test.images = (_to_grey(s.images) for s in (train, test))
        channels = d.channels
    chosen = select_labeled(train, d, len(classes))
    labeled = train.subset(chosen)
    unlabeled = (
        train
        if d.unlabeled_includes_labeled
        else train.subset(np.setdiff1d(np.arange(len(train)), chosen))
    )
    mean, std = _stats(cfg, d.dataset, channels)
    return Datasets(labeled_as_unlabeled(unlabeled), labeled, test, classes, channels, mean, std)


def _to_grey(x: torch.Tensor) -> torch.Tensor:
    w = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
    return (x.float() * w).sum(1, keepdim=True).round().clamp(0, 255).to(torch.uint8)


# --------------------------------------------------------------------------------------------
# Per-step batches for training.


@dataclass
class Batch:
    """One training step's inputs on the compute device.

    Attributes:
        step: the step index.
        views: ``[large 1, large 2, small 1, ...]``, each (B_local, C, h, w).
        supports: (views * n_local, C, H, W) support views, stacked view by view.
        wait: seconds the step waited for this batch (data loading and augmentation).
    """

    step: int
    views: list[torch.Tensor]
    supports: torch.Tensor
    wait: float = 0.0


def default_workers(requested: int) -> int:
    """Data-loader workers: the requested number, or (for -1) CPU cores minus one, at most 8."""
    if requested >= 0:
        return requested
    return max(0, min(8, (os.cpu_count() or 1) - 1))


def step_generator(seed: int, step: int, stream: int) -> torch.Generator:
    """CPU generator for the random augmentation of one step and stream (the same on every
    process: each draws for the global batch and keeps its rows, see ``ShardGenerator``)."""
    g = torch.Generator()
    g.manual_seed(int(np.random.SeedSequence([seed, step, stream]).generate_state(1)[0]))
    return g


def _worker_init(worker_id: int) -> None:
    """Signals for data-loader workers. A terminal's Ctrl-C reaches the whole process group:
    workers leave SIGINT to the main process, which saves a checkpoint and shuts them down. A
    worker killed by a signal (some schedulers send SIGTERM to every process) makes PyTorch
    raise in the main process at an arbitrary point, so on SIGTERM a worker exits quietly."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda signum, frame: os._exit(0))


def _skip_or_raise(error: UserError, skip_bad: bool, reported: set[Path], path: Path) -> None:
    """Policy ``data.on_bad_image`` for a file read in a data-loader worker: raise, or report
    the file (once per worker) and go on."""
    if not skip_bad:
        raise error
    if path not in reported:
        reported.add(path)
        info(f"skipping unreadable image {path}")


class _StepFiles(torch.utils.data.Dataset):
    """Files read per item; the item key is (step, index) and seeds that item's augmentation,
    so views depend neither on the number of workers nor on resuming."""

    def __init__(
        self,
        images: ImageSet,
        transform: Callable,
        channels: int,
        seed: int,
        stream: int,
        skip_bad: bool,
    ):
        self.images, self.transform, self.channels = images, transform, channels
        self.seed, self.stream, self.skip_bad = seed, stream, skip_bad
        self.reported: set[Path] = set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: tuple[int, int]) -> list[torch.Tensor]:
        step, i = key
        files = self.images.files or []
        for attempt in range(len(files)):
            path = files[(i + attempt) % len(files)]
            try:
                img = read_image(path, self.channels)
                break
            except UserError as e:  # a bad file is replaced by the next readable one
                _skip_or_raise(e, self.skip_bad, self.reported, path)
        else:
            raise UserError(f"none of the {len(files)} images could be read")
        seed = np.random.SeedSequence([self.seed, step, self.stream, i]).generate_state(1)[0]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            return self.transform(img)


class _StepIndex(torch.utils.data.Sampler):
    def __init__(self, fn: Callable[[int], np.ndarray], start: int, stop: int):
        self.fn, self.start, self.stop = fn, start, stop

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for step in range(self.start, self.stop):
            yield [(step, int(i)) for i in self.fn(step)]

    def __len__(self) -> int:
        return self.stop - self.start


def _stack_views(items: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(v) for v in zip(*items)]


def augmented_batches(
    images: ImageSet,
    index_fn: Callable[[int], np.ndarray],
    start: int,
    stop: int,
    views: ViewsConfig,
    data: Datasets,
    cfg: Config,
    device: torch.device,
    multicrop: bool,
    num_views: int = 1,
    stream: int = 0,
    shard: tuple[int, np.ndarray] | None = None,
) -> Iterator[tuple[int, list[torch.Tensor], float]]:
    """Augmented views of ``images[index_fn(step)]`` for each step in ``[start, stop)``.

    With ``multicrop`` each step gives ``[large 1, large 2, small 1, ...]`` (each (n, C, h, w));
    otherwise ``num_views`` large views stacked view by view in one (num_views * n, C, H, W)
    tensor. In-memory images are augmented as batches on ``device``; files are decoded and
    augmented per image in data-loader workers. Random parameters come from
    ``(run.seed, step, stream)`` and, under several processes, an image's place in the global
    batch: ``shard`` is ``(global batch size, positions of this process's images in it)``, so
    views do not depend on the number of processes (on disk: on the image index).

    Yields:
        ``(step, views, seconds waited for them)``.
    """
    seed = cfg.run.seed
    if images.in_memory:
        aug = BatchViews(views, data.mean, data.std)
        on_device = images.images.to(device)
        for step in range(start, stop):
            t0 = time.perf_counter()
            x = on_device[torch.from_numpy(np.asarray(index_fn(step))).to(device)]
            gen = step_generator(seed, step, stream)
            if shard is not None:
                gen = ShardGenerator(gen, shard[0], shard[1])
            out = aug.multicrop(x, gen) if multicrop else [aug.support(x, num_views, gen)]
            yield step, out, time.perf_counter() - t0
        return
    if multicrop:
        tf = multicrop_transform(views, data.channels, data.mean, data.std)
    else:
        tf = support_transform(views, data.channels, data.mean, data.std, num_views)
    workers = default_workers(cfg.data.workers)
    ds = _StepFiles(images, tf, data.channels, seed, stream, cfg.data.on_bad_image == "skip")
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=_StepIndex(index_fn, start, stop),
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=_stack_views,
        prefetch_factor=4 if workers else None,
        worker_init_fn=_worker_init,
    )
    t0 = time.perf_counter()
    for step, batch in zip(range(start, stop), loader):
        batch = [v.to(device, non_blocking=True) for v in batch]
        out = batch if multicrop else [torch.cat(batch)]
        yield step, out, time.perf_counter() - t0
        t0 = time.perf_counter()


def step_batches(
    data: Datasets,
    cfg: Config,
    unl: UnlabeledSampler,
    sup: SupportSampler,
    start: int,
    stop: int,
    device: torch.device,
) -> Iterator[Batch]:
    """The PAWS batches of steps ``start`` to ``stop - 1``, each a function of (seed, step)."""
    views = augmented_batches(
        data.unlabeled,
        unl.local_batch,
        start,
        stop,
        cfg.views,
        data,
        cfg,
        device,
        multicrop=True,
        stream=0,
        shard=(unl.global_size, unl.shard_rows()),
    )
    supports = augmented_batches(
        data.labeled,
        lambda s: sup.local_batch(s)[0],
        start,
        stop,
        cfg.views,
        data,
        cfg,
        device,
        multicrop=False,
        num_views=cfg.support.views,
        stream=1,
        shard=(sup.global_size, sup.shard_rows()),
    )
    for (step, v, wait_v), (_, s, wait_s) in zip(views, supports):
        yield Batch(step, v, s[0], wait_v + wait_s)


class _EvalFiles(torch.utils.data.Dataset):
    def __init__(self, images: ImageSet, transform: Callable, channels: int, skip_bad: bool):
        self.images, self.transform, self.channels = images, transform, channels
        self.skip_bad, self.reported = skip_bad, set()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        try:
            img = read_image(self.images.files[i], self.channels)
        except UserError as e:
            _skip_or_raise(e, self.skip_bad, self.reported, self.images.files[i])
            img = Image.new("L" if self.channels == 1 else "RGB", (8, 8))
        return self.transform(img), i


def eval_batches(
    images: ImageSet,
    cfg: Config,
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
    device: torch.device,
    batch_size: int | None = None,
    batches: Sequence[np.ndarray] | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield ``(x, index)`` batches of evaluation views (resize + centre crop, normalised).

    x: (n, C, S, S) float32 on ``device``; index: (n,) positions in ``images``. ``batches``
    gives the positions of each batch in turn (default: every image in order, ``batch_size``
    or ``eval.batch_size`` at a time). An unreadable file on disk stops with its name, or under
    ``data.on_bad_image: skip`` is reported and read as a blank image.
    """
    if batches is None:
        bs = batch_size or cfg.eval.batch_size
        batches = [np.arange(s, min(s + bs, len(images))) for s in range(0, len(images), bs)]
    if images.in_memory:
        aug = BatchViews(cfg.views, mean, std)
        for b in batches:
            index = torch.from_numpy(np.asarray(b, dtype=np.int64))
            yield aug.eval(images.images[index].to(device)), index
        return
    tf = eval_transform(cfg.views.large_size, cfg.views.eval_crop, mean, std)
    ds = _EvalFiles(images, tf, channels, cfg.data.on_bad_image == "skip")
    workers = default_workers(cfg.data.workers)
    loader = torch.utils.data.DataLoader(
        ds,
        batch_sampler=[np.asarray(b).tolist() for b in batches],
        num_workers=workers,
        pin_memory=device.type == "cuda",
        worker_init_fn=_worker_init,
    )
    for x, idx in loader:
        yield x.to(device, non_blocking=True), idx
