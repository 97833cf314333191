"""The file formats of the built-in datasets: Fashion-MNIST's idx files and CIFAR's batches.

Fashion-MNIST is read from ``data.root``, from the Debian package ``dataset-fashion-mnist``'s
folder, or downloaded with torchvision; CIFAR-10/100 from the python-pickle batches torchvision
downloads, through an unpickler that builds arrays and nothing else.
"""

from __future__ import annotations

import gzip
import pickle
import shutil
import subprocess
import warnings
from pathlib import Path

import numpy as np
import torch

from paws.data.images import ImageSet
from paws.errors import UserError, first_line

__all__ = ["FASHION_MNIST_CLASSES", "STATS", "load_fashion_mnist", "load_cifar"]

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
        first = first_line(e)
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

    names = _unpickle(folder / meta, names_key)[names_key]
    if not isinstance(names, (list, tuple)) or not names:
        raise UserError(f"{folder / meta} is damaged: '{names_key}' must list the class names")
    classes = [str(c) for c in names]

    def read(files: list[str]) -> ImageSet:
        xs, ys = [], []
        for f in files:
            x, y = _check_batch(folder / f, _unpickle(folder / f, "data", key), key, len(classes))
            xs.append(x)
            ys.append(y)
        x, y = np.concatenate(xs), np.concatenate(ys)
        return ImageSet(labels=y, names=[str(i) for i in range(len(y))], images=torch.from_numpy(x))

    return read(train_files), read(test_files), classes


def _check_batch(path: Path, d: dict, key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR batch's images as (N, 3, 32, 32) uint8 and labels as (N,) int64, checked: the
    data must be uint8 rows of 3072 values, one label in [0, ``num_classes``) for each row.

    Raises:
        UserError: naming the file and what is wrong.
    """
    fix = "download the batches again"
    data = d["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise UserError(f"{path} is damaged: its data must be a uint8 array, got {kind}; {fix}")
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise UserError(
            f"{path} is damaged: its data must be rows of 3072 values (32x32 colour images), "
            f"got shape {data.shape}; {fix}"
        )
    try:
        labels = np.asarray(d[key])
    except (TypeError, ValueError) as e:
        raise UserError(f"{path} is damaged: its '{key}' are not a list of numbers; {fix}") from e
    if labels.ndim != 1 or len(labels) != len(data) or labels.dtype.kind not in "iu":
        raise UserError(
            f"{path} is damaged: {len(data)} images need {len(data)} whole-number labels, got "
            f"'{key}' of shape {labels.shape} and dtype {labels.dtype}; {fix}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise UserError(
            f"{path} is damaged: its labels must lie in [0, {num_classes}), got "
            f"{labels.min()} to {labels.max()}; {fix}"
        )
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)
