"""Images as files and tensors: finding them, reading and decoding them, one set of them.

Everything that turns a file into pixels lives here, so that training, evaluation, prediction
and reports read an image the same way: Pillow decodes it fully, it is turned upright as its
EXIF orientation says (a phone photo looks as it does in a viewer), 16-bit and floating-point
images are scaled to 8 bits, palette and transparent images are composited on white, and grey
or colour is chosen by the run (``channels``). Colour becomes
grey with the ITU-R 601 luma weights :data:`GREY` wherever it happens (files, tensors,
augmentation).
"""

from __future__ import annotations

import collections
import io
import math
import os
import re
import stat
import unicodedata
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from paws.errors import UserError, first_line
from paws.progress import info

__all__ = [
    "IMAGE_EXTENSIONS",
    "MAX_IMAGE_PIXELS",
    "LARGEST_PIXEL_LIMIT",
    "GREY",
    "ImageSource",
    "ImageSet",
    "scan_images",
    "scan_labeled_folder",
    "class_name",
    "relative_names",
    "read_image",
    "to_mode",
    "upright",
    "to_grey",
    "tensor_channels",
    "is_grey",
    "fits_in_memory",
    "decode_images",
    "readable",
    "Images",
    "expand_images",
    "as_items",
    "array_image",
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
GREY = (0.299, 0.587, 0.114)  # luma weights of R, G and B (ITU-R BT.601), as Pillow's "L"
# An image file, or the encoded bytes of one (PNG, JPEG, ...: a Hugging Face dataset's images).
ImageSource = Path | bytes


# The most pixels an image may have (data.max_image_pixels): Pillow's own warning threshold,
# about 9,460 x 9,460. A file claiming more is a bad image (a decompression bomb: a few bytes
# that would decode into gigabytes) and is never decoded. Pillow refuses twice its threshold
# whatever the setting, hence the largest limit.
MAX_IMAGE_PIXELS = 89_478_485
LARGEST_PIXEL_LIMIT = 2 * MAX_IMAGE_PIXELS


class _TooLarge(Exception):
    """An image whose header claims more pixels than the limit."""


def _open(source: ImageSource, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Open an image lazily (the header only), refusing one of more than ``max_pixels``."""
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except Image.DecompressionBombError as e:  # Pillow's own limit: "Image size (N pixels)"
        claimed = re.search(r"\((\d+) pixels\)", str(e))
        raise _TooLarge(
            f"{int(claimed[1]):,}" if claimed else f"over {LARGEST_PIXEL_LIMIT:,}"
        ) from e
    w, h = im.size
    if w * h > max_pixels:
        im.close()
        raise _TooLarge(f"{w} x {h} = {w * h:,}")
    return im


@dataclass
class ImageSet:
    """A set of images held either in memory or as files.

    Attributes:
        labels: (N,) int64 class ids (-1 where unknown).
        names: (N,) image names used by split files and in outputs.
        images: (N, C, H, W) uint8 in memory, or None.
        files: N paths read on demand, or None.
        sources: for images in memory that were resized when decoded (a folder's, a Hugging
            Face dataset's), the N files or encoded bytes they came from: their evaluation
            views are computed from these (:mod:`paws.data.eval_view`); None otherwise.
    """

    labels: np.ndarray
    names: list[str]
    images: torch.Tensor | None = None
    files: list[Path] | None = None
    sources: list[ImageSource] | None = None

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
            sources=[self.sources[i] for i in index] if self.sources is not None else None,
        )

    def eval_items(self) -> list[ImageSource] | torch.Tensor:
        """What the evaluation view of each image is computed from: its file or encoded bytes,
        else the image in memory (held at its own size: a built-in dataset's)."""
        if self.files is not None:
            return self.files
        if self.sources is not None:
            return self.sources
        assert self.images is not None
        return self.images


def _image_files(folder: Path, above: tuple[Path, ...] = ()) -> list[Path]:
    """The image files below ``folder``, sorted, following linked folders once each.

    A linked folder is read like any other (a user links data in from elsewhere); one that
    leads back to a folder it lies in (or to one of ``above``) would be read without end, and
    one already read would count its images twice: each is skipped with a line saying so.
    Hidden folders (``.ipynb_checkpoints``, ``.git``) are not data and are not searched.
    """
    root = folder.resolve()
    seen = {root}
    # Breadth first, in name order: of two ways to one folder, the shorter and then the first
    # by name is the one kept, whatever order the file system lists them in.
    queue = collections.deque([(folder, (*above, root))])
    files: list[Path] = []
    while queue:
        d, chain = queue.popleft()
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as e:
            raise UserError(f"cannot read the folder {d}: {e.strerror or e}") from e
        for e in entries:
            path = Path(e.path)
            if e.is_dir():  # follows links
                if e.name.startswith("."):
                    continue
                real = path.resolve()
                if real in chain:
                    info(f"skipped the folder link {path}: it leads back to {real}, which holds it")
                elif real in seen:
                    info(f"skipped the folder link {path}: {real} is read already")
                else:
                    seen.add(real)
                    queue.append((path, (*chain, real)))
            elif e.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(path)
    return sorted(files)


def scan_images(folder: str | Path) -> list[Path]:
    """All image files below ``folder`` (recursive, sorted, linked folders followed once:
    :func:`_image_files`), by extension."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"image folder not found: {folder}")
    files = _image_files(folder)
    if not files:
        raise UserError(f"no images found in {folder} (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


def _class_folders(folder: Path) -> list[str]:
    """The class sub-folders of a labelled folder, sorted: a link that leads back to the
    folder (or above it) would make its images again a class of their own, and is skipped
    with a line; two names for one folder are refused."""
    root = folder.resolve()
    names, real_of = [], {}
    for p in sorted(folder.iterdir()):
        if not p.is_dir() or p.name.startswith("."):
            continue
        real = p.resolve()
        if real == root or real in root.parents:
            info(f"skipped the folder link {p}: it leads back to {real}, which holds it")
            continue
        if real in real_of:
            raise UserError(
                f"class folders '{real_of[real]}' and '{p.name}' of {folder} are one folder "
                f"({real}, through a link): remove one of them"
            )
        real_of[real] = p.name
        names.append(p.name)
    return names


def class_name(name: str) -> str:
    """A class name as paws compares it: in Unicode's composed form (NFC)."""
    return unicodedata.normalize("NFC", name)


def scan_labeled_folder(
    folder: str | Path, classes: Sequence[str] | None = None
) -> tuple[list[Path], np.ndarray, list[str]]:
    """Files and labels of a ``<class>/<image>`` folder (linked folders followed once).

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
    subdirs = _class_folders(folder)
    if not subdirs:
        raise UserError(
            f"{folder} has no class sub-folders: arrange labelled images as <class>/<image>"
        )
    # Class names in Unicode's composed form: a folder written on macOS (decomposed) and a
    # labels file or test folder written elsewhere name one class alike.
    order = list(classes) if classes is not None else [class_name(n) for n in subdirs]
    files, labels = [], []
    for name in subdirs:
        imgs = _image_files(folder / name, (folder.resolve(),))
        if not imgs:
            raise UserError(
                f"class folder {folder / name} holds no images; add images or remove the folder"
            )
        if class_name(name) not in order:
            raise UserError(
                f"class '{name}' in {folder} is not a class of the labelled set "
                f"({', '.join(order)})"
            )
        files += imgs
        labels += [order.index(class_name(name))] * len(imgs)
    return files, np.asarray(labels, dtype=np.int64), order


def _eight_bit(im: Image.Image) -> Image.Image:
    """A 16-bit (or 32-bit integer) grey image as 8-bit grey, its full range 0..65535 scaled
    to 0..255 (Pillow's own conversion clips everything above 255 to white)."""
    arr = np.asarray(im, dtype=np.float64)
    arr = np.clip(arr, 0, 65535) * (255 / 65535)
    return Image.fromarray(np.rint(arr).astype(np.uint8), mode="L")


def _float_eight_bit(im: Image.Image) -> Image.Image:
    """A floating-point grey image (mode F, e.g. a 32-bit TIFF) as 8-bit grey: values in
    [0, 1] are scaled to 0..255, as floating-point images store them; an image with values
    above 1 is taken to be on the 0..255 scale already. NaN reads as black, and everything is
    clipped (Pillow's own conversion truncates, so [0, 1] becomes black)."""
    arr = np.nan_to_num(np.asarray(im, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if arr.size and arr.max() <= 1.0:
        arr = arr * 255
    return Image.fromarray(np.rint(np.clip(arr, 0, 255)).astype(np.uint8), mode="L")


def upright(im: Image.Image) -> Image.Image:
    """The image turned as its EXIF orientation tag says (:func:`PIL.ImageOps.exif_transpose`),
    or itself when it has none: cameras store a photo as the sensor saw it and record how to
    turn it."""
    try:
        orientation = im.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001 - damaged EXIF: the pixels are still the image
        return im
    if orientation in (None, 1):
        return im
    try:
        return ImageOps.exif_transpose(im)
    except Exception:  # noqa: BLE001 - an orientation Pillow cannot apply: read as stored
        return im


def to_mode(im: Image.Image, channels: int | None = None) -> Image.Image:
    """The image upright (:func:`upright`), in mode L (``channels`` 1) or RGB; palette and
    transparent images are composited on white first, 16-bit grey images scaled to 8 bits
    (:func:`_eight_bit`), floating-point ones from [0, 1] (:func:`_float_eight_bit`)."""
    im = upright(im)
    if im.mode.startswith("I;16") or (im.mode == "I" and im.getextrema()[1] > 255):
        im = _eight_bit(im)
    elif im.mode == "F":
        im = _float_eight_bit(im)
    if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
        im = im.convert("RGBA")
        bg = Image.new("RGBA", im.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, im)
    return im.convert("L" if channels == 1 else "RGB")


def read_image(
    path: ImageSource,
    channels: int | None = None,
    name: str | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
    draft_side: int | None = None,
) -> Image.Image:
    """Open and fully decode an image as RGB (or L when ``channels`` is 1), see :func:`to_mode`.

    ``draft_side``: a JPEG whose shorter side is at least twice this is decoded at a reduced
    scale (Pillow's ``draft``, 1/2 to 1/8) that keeps the shorter side at least this long:
    faster, with pixels that differ from the full decode's resized.

    Raises :class:`UserError` naming the file (or ``name``) if it is corrupt, truncated, not
    an image, or claims more than ``max_pixels`` pixels (it is then never decoded).
    """
    where = name if name is not None else path
    try:
        with _open(path, max_pixels) as im:
            if draft_side and im.format == "JPEG":
                w, h = im.size
                s = draft_side / min(w, h)
                im.draft(im.mode, (math.ceil(w * s), math.ceil(h * s)))
            im.load()
            return to_mode(im, channels)
    except _TooLarge as e:
        reason = (
            f"it claims {e} pixels, more than data.max_image_pixels ({max_pixels:,}): a "
            "decompression bomb or an image far too large"
        )
        raise _unreadable(where, reason) from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, MemoryError) as e:
        if isinstance(e, UnidentifiedImageError):
            reason = "not an image, or in a format Pillow cannot read"
        else:
            reason = first_line(e, empty="corrupt")
        raise _unreadable(where, reason) from e


def _unreadable(where: Any, reason: str) -> UserError:
    return UserError(
        f"cannot read image {where}: {reason}; fix or remove it, or set data.on_bad_image: skip"
    )


def to_grey(x: torch.Tensor) -> torch.Tensor:
    """Colour to grey with :data:`GREY`: (..., 3, H, W) to (..., 1, H, W); uint8 stays uint8
    (rounded), other dtypes are computed in float32."""
    w = torch.tensor(GREY, dtype=torch.float32, device=x.device).view(3, 1, 1)
    grey = (x.float() * w).sum(dim=-3, keepdim=True)
    if x.dtype == torch.uint8:
        return grey.round().clamp(0, 255).to(torch.uint8)
    return grey


def tensor_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """A (C, H, W) image tensor with ``channels`` channels: grey from colour by :func:`to_grey`,
    colour from grey by repetition."""
    if x.dim() != 3:
        raise UserError(f"image tensors must be (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 3 and channels == 1:
        return to_grey(x)
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1)
    raise UserError(f"images need 1 or 3 channels, got {x.shape[0]}")


def is_grey(files: Sequence[ImageSource], sample: int = 2000) -> bool:
    """Whether the images are grey, judged from the modes of the first ``sample`` files
    (unreadable ones count as grey: decoding them reports the error)."""

    def grey(path: ImageSource) -> bool:
        try:
            with _open(path, LARGEST_PIXEL_LIMIT) as im:
                return im.mode in ("1", "L", "LA", "I", "F") or im.mode.startswith("I;16")
        except (UnidentifiedImageError, OSError, _TooLarge, SyntaxError, ValueError):
            return True

    return all(grey(f) for f in list(files)[:sample])


def square(im: Image.Image, size: int) -> np.ndarray:
    """The image resized (shorter side to ``size``, bicubic) and centre-cropped to a (C, size,
    size) uint8 array."""
    w, h = im.size
    s = size / min(w, h)
    nw, nh = max(size, round(w * s)), max(size, round(h * s))
    im = im.resize((nw, nh), Image.BICUBIC) if (nw, nh) != (w, h) else im
    left, top = (nw - size) // 2, (nh - size) // 2
    arr = np.asarray(im.crop((left, top, left + size, top + size)))
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def fits_in_memory(n: int, size: int, channels: int, limit_gb: float) -> bool:
    """Whether ``n`` uint8 images of ``channels`` x ``size`` x ``size`` fit ``limit_gb``."""
    return n * size * size * channels <= limit_gb * 1e9


def decode_images(
    files: Sequence[ImageSource],
    size: int,
    channels: int,
    on_bad_image: str = "error",
    names: Sequence[str] | None = None,
    max_pixels: int = MAX_IMAGE_PIXELS,
) -> tuple[torch.Tensor, list[int], list[str]]:
    """Decode files into a uint8 tensor, each resized (shorter side) and centre-cropped to
    ``size``.

    Args:
        files: image files, or their encoded bytes.
        size: side of the square images.
        channels: 1 (grey) or 3 (colour).
        on_bad_image: ``"error"`` or ``"skip"``.
        names: the images' names in messages (default: the file paths).
        max_pixels: larger images are bad images (``data.max_image_pixels``).

    Returns:
        ``(images (N', C, size, size), kept indices, skipped file names)``; with
        ``on_bad_image='error'`` a bad file raises :class:`UserError` instead.
    """
    names = [str(f) for f in files] if names is None else list(names)

    def one(i: int) -> np.ndarray | None:
        try:
            return square(read_image(files[i], channels, names[i], max_pixels), size)
        except UserError:
            if on_bad_image == "error":
                raise
            return None

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2))) as pool:
        arrays = list(pool.map(one, range(len(files))))
    kept = [i for i, a in enumerate(arrays) if a is not None]
    skipped = [names[i] for i, a in enumerate(arrays) if a is None]
    if not kept:
        raise UserError(f"none of the {len(files)} images could be read")
    out = torch.from_numpy(np.stack([arrays[i] for i in kept]))
    return out, kept, skipped


def readable(
    files: Sequence[ImageSource], max_pixels: int = MAX_IMAGE_PIXELS, decode: bool = True
) -> list[bool]:
    """Which files can be read: fully decoded (``decode``), or only their headers checked
    (an image, not too large), which is cheap enough for every image of a large set."""

    def ok(f: ImageSource) -> bool:
        try:
            if decode:
                read_image(f, max_pixels=max_pixels)
            else:
                _open(f, max_pixels).close()
            return True
        except (UserError, UnidentifiedImageError, OSError, _TooLarge, SyntaxError, ValueError):
            return False

    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2))) as pool:
        return list(pool.map(ok, files))


def relative_names(files: Sequence[Path], root: Path) -> list[str]:
    """The files' paths relative to ``root``, as the names split files and outputs use."""
    return [str(f.relative_to(root)) for f in files]


ImageLike = str | Path | Image.Image | torch.Tensor | np.ndarray
Images = ImageLike | Sequence[ImageLike]


# --------------------------------------------------------------------------------------------
# What users pass as images: files, folders, PIL images, tensors.


def expand_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (searched recursively, sorted), in the given order."""
    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        try:
            mode = path.stat().st_mode  # one system call a file: lists of many files are common
        except OSError:
            mode = 0
        if stat.S_ISDIR(mode):
            files += scan_images(path)
        elif stat.S_ISREG(mode):
            files.append(path)
        else:
            raise UserError(f"no such image file or folder: {path}")
    if not files:
        raise UserError("no images given")
    return files


def as_items(images: Images) -> list[Any] | torch.Tensor:
    """A list of paths (folders expanded), PIL images and (C, H, W) tensors, or one
    (N, C, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        return images.unsqueeze(0) if images.dim() == 3 else images
    if isinstance(images, np.ndarray):
        images = list(images) if images.ndim == 4 else [images]
    if isinstance(images, (str, Path, Image.Image)):
        images = [images]
    items: list[Any] = []
    for im in images:
        if isinstance(im, (str, Path)):
            items += expand_images([im])
        elif isinstance(im, torch.Tensor):
            items += list(im.unsqueeze(0) if im.dim() == 3 else im)
        elif isinstance(im, Image.Image):
            items.append(im)
        elif isinstance(im, np.ndarray):
            items.append(array_image(im))
        else:
            raise UserError(f"cannot read an image from a {type(im).__name__}")
    return items


def array_image(a: np.ndarray) -> Image.Image | torch.Tensor:
    """A numpy image as paws reads it: (H, W) grey or (H, W, C) with 1, 3 or 4 (RGBA) channels,
    as PIL, OpenCV (after its BGR to RGB) and Hugging Face datasets give them.

    uint8 arrays become the PIL image they are, so that an array read from a file gives the
    file's answer; float arrays in [0, 1] become (C, H, W) tensors (alpha dropped).

    Raises:
        UserError: another shape, dtype or value range, in one line.
    """
    shape = tuple(a.shape)
    if a.ndim == 3 and shape[2] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))) or 0 in a.shape:
        raise UserError(
            f"numpy images must be (H, W) or (H, W, C) with C 1, 3 or 4 (a batch: (N, H, W, C) "
            f"or a list), got {shape}"
        )
    if a.dtype == np.uint8:
        return Image.fromarray(np.ascontiguousarray(a))
    if not np.issubdtype(a.dtype, np.floating):
        raise UserError(f"numpy images must be uint8 or float in [0, 1], got {a.dtype}")
    if not np.isfinite(a).all() or a.min() < 0 or a.max() > 1:
        raise UserError(
            f"a float numpy image must hold values in [0, 1], got [{a.min():g}, {a.max():g}]: "
            "divide by 255, or pass it as uint8"
        )
    x = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    return x[None] if x.ndim == 2 else x[..., :3].permute(2, 0, 1).contiguous()
