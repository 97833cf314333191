"""Applying a trained model to new images: classify, embed, and :func:`load`.

A :class:`Predictor` wraps a network with its preprocessing (resize, centre crop, normalisation:
the evaluation view of training) and its way of classifying:

- a pre-trained (or tightened) PAWS model classifies by soft nearest neighbours against a
  *support set* of labelled embeddings (:func:`paws.evaluate.snn_classify`, as PAWS-NN). The
  support defaults to the run's own labelled images, and can be replaced by any labelled images
  (:meth:`Predictor.set_support`), including classes the model never saw labelled during
  pre-training: nothing is retrained, new classes only need a few labelled examples;
- a fine-tuned model (``paws finetune``) classifies with its linear classifier.

:func:`load` opens a training checkpoint (the run's config is inside it) or an export folder
(``paws export``: safetensors weights, a JSON description, and the support embeddings), so an
exported model works without the training code's config files or data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from paws.errors import UserError
from paws.models import (
    FineTunedClassifier,
    PAWSModel,
    PredictionHead,
    ProjectionHead,
    create_encoder,
)
from paws.progress import Progress

__all__ = [
    "Preprocessing",
    "Support",
    "Predictor",
    "architecture",
    "build_network",
    "expand_images",
    "from_checkpoint",
    "load",
]

ImageLike = str | Path | Image.Image | torch.Tensor
Images = ImageLike | Sequence[ImageLike]


@dataclass
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
        from paws.transforms import eval_transform

        return eval_transform(self.size, self.crop_fraction, self.mean, self.std)


@dataclass
class Support:
    """Labelled embeddings that pre-trained models classify against.

    Attributes:
        embeddings: (M, D) float32.
        labels: (M,) int64 positions in ``classes``.
        classes: class names.
        features: which embedding (``"head"`` or ``"trunk"``).
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    features: str


# --------------------------------------------------------------------------------------------
# Architecture: a plain dict that rebuilds the network with paws.models alone.


def architecture(cfg: Any, channels: int, num_classes: int | None = None) -> dict[str, Any]:
    """The network a config describes, as JSON-friendly values.

    Args:
        cfg: a :class:`paws.config.Config`.
        channels: input channels.
        num_classes: K for a fine-tuned classifier; None for a pre-trained PAWS model.
    """
    m = cfg.model
    return {
        "encoder": m.encoder,
        "encoder_kwargs": {"width": m.width} if m.width else {},
        "in_channels": int(channels),
        "small_images": bool(
            m.small_images if m.small_images is not None else cfg.views.large_size < 64
        ),
        "proj_hidden": m.proj_hidden,
        "proj_out": m.proj_out,
        "proj_layers": m.proj_layers,
        "pred_head": m.pred_head,
        "pred_hidden": m.pred_hidden,
        "num_classes": num_classes,
    }


def build_network(arch: dict[str, Any]) -> nn.Module:
    """A freshly initialised network from :func:`architecture`'s dict: a :class:`PAWSModel`,
    or a :class:`FineTunedClassifier` when ``num_classes`` is set."""
    encoder = create_encoder(
        arch["encoder"],
        in_channels=arch["in_channels"],
        small_images=arch["small_images"],
        **arch.get("encoder_kwargs", {}),
    )
    projection = ProjectionHead(
        encoder.num_features, arch["proj_hidden"], arch["proj_out"], arch["proj_layers"]
    )
    prediction = (
        PredictionHead(arch["proj_out"], arch["pred_hidden"]) if arch["pred_head"] else None
    )
    model = PAWSModel(encoder, projection, prediction)
    if arch.get("num_classes"):
        return FineTunedClassifier.from_pretrained(model, int(arch["num_classes"]))
    return model


def _load_weights(net: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    try:
        net.load_state_dict(state)
    except RuntimeError as e:
        raise UserError(f"{where} does not match its architecture: {str(e).splitlines()[0]}") from e
    net.eval()


# --------------------------------------------------------------------------------------------
# Inputs.


def expand_images(paths: Sequence[str | Path]) -> list[Path]:
    """Image files from files and folders (searched recursively, sorted), in the given order."""
    from paws.data import scan_images

    files: list[Path] = []
    for p in paths:
        path = Path(p).expanduser()
        if path.is_dir():
            files += scan_images(path)
        elif path.is_file():
            files.append(path)
        else:
            raise UserError(f"no such image file or folder: {path}")
    if not files:
        raise UserError("no images given")
    return files


def _as_items(images: Images) -> list[Any] | torch.Tensor:
    """A list of paths and PIL images, or one (N, C, H, W) tensor."""
    if isinstance(images, torch.Tensor):
        return images.unsqueeze(0) if images.dim() == 3 else images
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
        else:
            raise UserError(f"cannot read an image from a {type(im).__name__}")
    return items


def _pil_mode(im: Image.Image, channels: int) -> Image.Image:
    """The image in mode L or RGB; transparent images composited on white (as for files)."""
    if im.mode in ("P", "PA", "LA", "RGBA") or "transparency" in im.info:
        im = im.convert("RGBA")
        im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im)
    return im.convert("L" if channels == 1 else "RGB")


def _tensor_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    if x.dim() != 3:
        raise UserError(f"image tensors must be (C, H, W) or (N, C, H, W), got {tuple(x.shape)}")
    if x.shape[0] == channels:
        return x
    if x.shape[0] == 3 and channels == 1:
        w = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float32).view(3, 1, 1)
        grey = (x.float() * w).sum(0, keepdim=True)
        return grey.round().to(torch.uint8) if x.dtype == torch.uint8 else grey
    if x.shape[0] == 1 and channels == 3:
        return x.expand(3, -1, -1)
    raise UserError(f"images need 1 or 3 channels, got {x.shape[0]}")


# --------------------------------------------------------------------------------------------
# The predictor.


class Predictor:
    """A trained network with its preprocessing and classifier, ready for new images.

    Images may be given as file paths or folders (searched recursively), PIL images, or tensors
    (C, H, W) / (N, C, H, W), uint8 in [0, 255] or float in [0, 1]; any size: each is resized
    and centre-cropped as in training's evaluation view, then normalised.

    Args:
        net: a :class:`PAWSModel` or :class:`FineTunedClassifier` (moved to ``device``).
        kind: ``"pretrain"``, ``"tighten"`` or ``"finetune"``.
        preprocessing: the input pipeline.
        architecture: :func:`architecture`'s description of ``net`` (for exports).
        classes: class names of a fine-tuned classifier (pre-trained models take theirs from the
            support).
        features: embedding used against the support (pre-trained models).
        tau: soft nearest-neighbour temperature.
        batch_size: images per forward pass.
        chunk_size: supports per similarity chunk.
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a device.
        support: the support set, or None to build it on first use with ``support_source``.
        support_source: ``fn(predictor, progress) -> Support``, the default support.
    """

    def __init__(
        self,
        net: nn.Module,
        kind: str,
        preprocessing: Preprocessing,
        architecture: dict[str, Any],
        classes: Sequence[str] | None = None,
        features: str = "head",
        tau: float = 0.1,
        batch_size: int = 256,
        chunk_size: int = 8192,
        device: str | torch.device = "auto",
        support: Support | None = None,
        support_source: Callable[[Predictor, bool], Support] | None = None,
    ):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.kind = kind
        self.preprocessing = preprocessing
        self.architecture = architecture
        self._classes = list(classes) if classes is not None else None
        self.features, self.tau = features, tau
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self._support, self._support_source = support, support_source

    @property
    def is_classifier(self) -> bool:
        """True for a fine-tuned model (linear classifier), False for soft nearest neighbours."""
        return isinstance(self.net, FineTunedClassifier)

    @property
    def classes(self) -> list[str]:
        """The class names predictions refer to."""
        if self.is_classifier:
            return list(self._classes or [])
        return self.support.classes

    @property
    def support(self) -> Support:
        """The support set of a pre-trained model (built on first use)."""
        if self.is_classifier:
            raise UserError("a fine-tuned model classifies with its classifier, not a support set")
        if self._support is None:
            if self._support_source is None:
                raise UserError("this model has no support set: give one with set_support()")
            self._support = self._support_source(self, False)
        return self._support

    def load_support(self, progress: bool = False) -> Support:
        """Build the default support now (with a progress display) and return it."""
        if self._support is None and self._support_source is not None:
            self._support = self._support_source(self, progress)
        return self.support

    # -- inputs ---------------------------------------------------------------------------------

    def batches(
        self, images: Images, progress: bool = False, desc: str = "images"
    ) -> Iterator[torch.Tensor]:
        """Preprocessed batches (n, C, size, size) on the device, in input order."""
        items = _as_items(images)
        tf = self.preprocessing.transform()
        channels = self.preprocessing.channels
        from paws.data import read_image

        def one(item: Any) -> torch.Tensor:
            if isinstance(item, Path):
                return tf(read_image(item, channels))
            if isinstance(item, Image.Image):
                return tf(_pil_mode(item, channels))
            return tf(_tensor_channels(item, channels))

        n = len(items)
        bar = Progress((n + self.batch_size - 1) // self.batch_size, desc) if progress else None
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, n, self.batch_size):
                chunk = items[start : start + self.batch_size]
                x = torch.stack(list(pool.map(one, chunk)))
                yield x.to(self.device)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()

    # -- outputs --------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, images: Images, features: str = "head", progress: bool = False) -> torch.Tensor:
        """Embeddings of ``images``: ``"head"`` (pre-trained: the space PAWS-NN classifies in;
        fine-tuned: the classifier's input) or ``"trunk"`` (encoder output).

        Returns:
            (N, D) float32 on the CPU.
        """
        if features not in ("head", "trunk"):
            raise UserError(f"features must be 'head' or 'trunk', got {features!r}")
        out = [
            self.net.embed(x, features).float().cpu()
            for x in self.batches(images, progress, "embed")
        ]
        return torch.cat(out)

    def set_support(
        self,
        images: Images,
        labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        classes: Sequence[str] | None = None,
        progress: bool = False,
    ) -> Support:
        """Classify against new labelled images (pre-trained models).

        Args:
            images: a ``<class>/<image>`` folder (then ``labels`` and ``classes`` come from it),
                or images with their ``labels``.
            labels: (M,) class positions in ``classes``.
            classes: class names (default: ``"0"``, ``"1"``, ...).
            progress: show progress.

        Returns:
            The new support.
        """
        if self.is_classifier:
            raise UserError(
                "a support set applies to pre-trained models; this fine-tuned model "
                "predicts its own classes"
            )
        if labels is None:
            if not isinstance(images, (str, Path)):
                raise UserError("set_support needs labels, or a <class>/<image> folder")
            from paws.data import scan_labeled_folder

            files, y, classes = scan_labeled_folder(images)
            images, labels = files, y
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        names = list(classes) if classes is not None else [str(i) for i in range(int(y.max()) + 1)]
        if y.numel() and (y.min() < 0 or y.max() >= len(names)):
            raise UserError(f"support labels must lie in [0, {len(names)})")
        emb = self.embed(images, self.features, progress)
        if len(emb) != len(y):
            raise UserError(f"{len(emb)} support images but {len(y)} labels")
        self._support = Support(emb, y, names, self.features)
        return self._support

    @torch.no_grad()
    def predict_proba(self, images: Images, progress: bool = False) -> torch.Tensor:
        """Class probabilities, (N, K) float32 on the CPU, columns in :attr:`classes` order."""
        if self.is_classifier:
            out = [
                self.net(x).float().softmax(dim=1).cpu()
                for x in self.batches(images, progress, "predict")
            ]
            return torch.cat(out)
        from paws.evaluate import snn_classify

        support = self.support
        queries = self.embed(images, support.features, progress)
        return snn_classify(
            queries,
            support.embeddings,
            support.labels,
            len(support.classes),
            self.tau,
            self.chunk_size,
        ).cpu()

    def predict(
        self, images: Images, top_k: int = 1, progress: bool = False
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most probable classes of each image, as ``(class, probability)`` pairs,
        most probable first."""
        probs = self.predict_proba(images, progress)
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        names = self.classes
        return [
            [(names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)
        ]

    def export(self, out_dir: str | Path, progress: bool = False) -> Path:
        """Write this model as a self-contained export folder (see :mod:`paws.export`)."""
        from paws.export import write_export

        return write_export(self, out_dir, progress)


# --------------------------------------------------------------------------------------------
# Loading.


def _run_support(cfg: Any) -> Callable[[Predictor, bool], Support]:
    """The default support of a checkpoint: the run's labelled images, embedded exactly as
    ``paws eval`` embeds them."""

    def build(predictor: Predictor, progress: bool) -> Support:
        from paws.data import load_datasets
        from paws.evaluate import embed_images

        try:
            data = load_datasets(cfg)
        except UserError as e:
            raise UserError(
                f"cannot rebuild the run's labelled set ({e}); give a support folder "
                "(--support DIR) or set data paths with --set"
            ) from e
        emb = embed_images(
            predictor.net,
            data.labeled,
            cfg,
            data.channels,
            data.mean,
            data.std,
            predictor.device,
            predictor.features,
            progress=progress,
            desc="embed support",
        )
        labels = torch.from_numpy(np.asarray(data.labeled.labels, dtype=np.int64))
        return Support(emb.cpu(), labels, list(data.classes), predictor.features)

    return build


def from_checkpoint(
    path: str | Path, overrides: list[str] | None = None, device: str | torch.device = "auto"
) -> Predictor:
    """A :class:`Predictor` from a checkpoint of kind pretrain, tighten or finetune.

    Args:
        path: checkpoint file or run directory.
        overrides: ``key=value`` config overrides (e.g. ``data.root=...`` to find the labelled
            set, ``eval.tau=...``).
        device: compute device.
    """
    from paws import checkpoint
    from paws.config import apply_overrides, from_dict

    state = checkpoint.load(path)
    kind = str(state.get("kind") or "pretrain")
    cfg = from_dict(apply_overrides(state["config"], list(overrides or [])))
    channels = state.get("channels")
    if channels is None:
        first = next((v for k, v in state["model"].items() if v.dim() == 4), None)
        if first is None:
            raise UserError(f"cannot tell the input channels of {path}")
        channels = int(first.shape[1])
    classes = [str(c) for c in state.get("classes") or []]
    is_classifier = kind == "finetune"
    arch = architecture(cfg, channels, len(classes) if is_classifier else None)
    net = build_network(arch)
    _load_weights(net, state["model"], str(path))
    mean = tuple(state.get("mean") or cfg.data.mean or [])
    std = tuple(state.get("std") or cfg.data.std or [])
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"{path} does not record its normalisation (mean and std)")
    prep = Preprocessing(cfg.views.large_size, cfg.views.eval_crop, mean, std, int(channels))
    return Predictor(
        net,
        kind,
        prep,
        arch,
        classes=classes if is_classifier else None,
        features=cfg.eval.features,
        tau=cfg.eval.tau,
        batch_size=cfg.eval.batch_size,
        chunk_size=cfg.eval.chunk_size,
        device=device,
        support_source=None if is_classifier else _run_support(cfg),
    )


def load(
    path: str | Path,
    device: str | torch.device = "auto",
    support: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Predictor:
    """Open a trained model for prediction and embedding.

    Args:
        path: an export folder (``paws export``), a checkpoint file, or a run directory.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        support: a ``<class>/<image>`` folder to classify against (pre-trained models); default:
            the export's support embeddings, or the run's labelled images for a checkpoint.
        overrides: config overrides for a checkpoint (ignored for an export).

    Returns:
        A :class:`Predictor` with ``.predict(images, top_k=...)``, ``.predict_proba(images)``
        and ``.embed(images, features=...)``.

    Example:
        >>> model = paws.load("runs/paws-fashion_mnist/export")  # doctest: +SKIP
        >>> model.predict(["shoe.png"], top_k=3)  # doctest: +SKIP
        [[('Sneaker', 0.91), ('Sandal', 0.06), ('Ankle boot', 0.02)]]
    """
    p = Path(path).expanduser()
    from paws.export import MANIFEST, read_export

    if (p / MANIFEST).is_file():
        predictor = read_export(p, device)
    elif p.is_file() or (p / "last.pt").is_file():
        predictor = from_checkpoint(p, overrides, device)
    else:
        raise UserError(
            f"{p} is neither an export folder (no {MANIFEST}), a checkpoint, nor a run directory"
        )
    if support is not None:
        predictor.set_support(support)
    return predictor
