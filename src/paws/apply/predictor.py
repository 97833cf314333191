"""Applying a trained model to new images: classify, embed, and :func:`load`.

A :class:`Predictor` wraps a network with its preprocessing (resize, centre crop, normalisation:
the evaluation view of training) and its way of classifying:

- a pre-trained (or tightened) PAWS model classifies by soft nearest neighbours against a
  *support set* of labelled embeddings (:func:`paws.method.snn.snn_classify`, as PAWS-NN). The
  support defaults to the run's own labelled images, and can be replaced by any labelled images
  (:meth:`Predictor.set_support`), including classes the model never saw labelled during
  pre-training: nothing is retrained, new classes only need a few labelled examples;
- a fine-tuned model (``paws finetune``) classifies with its linear classifier.

:func:`paws.apply.load.load` (``paws.load``) opens a training checkpoint or an export folder as a
:class:`Predictor`, so an exported model works without the training code's config files or
data.
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

from paws.apply.export import Export, write_export
from paws.data.images import (
    MAX_IMAGE_PIXELS,
    Images,
    as_items,
    expand_images,
    read_image,
    scan_labeled_folder,
    tensor_channels,
    to_mode,
)
from paws.data.transforms import eval_transform
from paws.errors import UserError
from paws.method.known_score import KnownScore
from paws.method.snn import snn_classify
from paws.models import Architecture, Classifier
from paws.progress import Progress

__all__ = [
    "Preprocessing",
    "Support",
    "Prediction",
    "Predictor",
    "expand_images",
]


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
        return eval_transform(self.size, self.crop_fraction, self.mean, self.std)


@dataclass
class Support:
    """Labelled embeddings that pre-trained models classify against.

    Attributes:
        embeddings: (M, D) float32.
        labels: (M,) int64 positions in ``classes``.
        classes: class names.
        features: which embedding (``"head"`` or ``"trunk"``).
        known: (M, F) embeddings the known score compares with (see :mod:`paws.method.known_score`),
            or None when they are ``embeddings`` (the same features).
    """

    embeddings: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    features: str
    known: torch.Tensor | None = None


@dataclass
class Prediction:
    """What a model says of one image.

    Attributes:
        top: the most probable classes with their probabilities, most probable first.
        score: the known score (:mod:`paws.method.known_score`: similarity to the nearest
            supports), or None for a fine-tuned classifier.
        unknown: the score is below the threshold calibrated on the labelled images: the image
            is likely of none of the support classes.
    """

    top: list[tuple[str, float]]
    score: float | None = None
    unknown: bool = False

    @property
    def label(self) -> str:
        """The answer: the most probable class, or ``"unknown"``."""
        return "unknown" if self.unknown else self.top[0][0]


# --------------------------------------------------------------------------------------------
# The predictor.


class Predictor:
    """A trained network with its preprocessing and classifier, ready for new images.

    Images may be given as file paths or folders (searched recursively), PIL images, or tensors
    (C, H, W) / (N, C, H, W), uint8 in [0, 255] or float in [0, 1]; any size: each is resized
    and centre-cropped as in training's evaluation view, then normalised.

    Args:
        net: a :class:`paws.models.PAWSModel` or :class:`paws.models.Classifier` (moved to
            ``device``).
        kind: ``"pretrain"``, ``"tighten"`` or ``"finetune"``.
        preprocessing: the input pipeline.
        architecture: the network's :class:`paws.models.Architecture` (for exports).
        classes: class names of a fine-tuned classifier (pre-trained models take theirs from the
            support).
        features: embedding used against the support (pre-trained models).
        tau: soft nearest-neighbour temperature.
        batch_size: images per forward pass.
        chunk_size: supports per similarity chunk.
        known_score: how images are judged unknown (:class:`paws.method.known_score.KnownScore`).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a device.
        support: the support set, or None to build it on first use with ``support_source``.
        support_source: ``fn(predictor, progress) -> Support``, the default support.
        on_bad_image: ``"error"``: an unreadable image file stops with its name; ``"skip"``:
            it is left out of the result, and its position and name are in :attr:`skipped`
            (``data.on_bad_image``).
        max_pixels: image files claiming more pixels are unreadable (``data.max_image_pixels``).

    Attributes:
        skipped: ``(position, name)`` of the images the last call left out.
    """

    def __init__(
        self,
        net: nn.Module,
        kind: str,
        preprocessing: Preprocessing,
        architecture: Architecture,
        classes: Sequence[str] | None = None,
        features: str = "head",
        tau: float = 0.1,
        batch_size: int = 256,
        chunk_size: int = 8192,
        device: str | torch.device = "auto",
        support: Support | None = None,
        support_source: Callable[[Predictor, bool], Support] | None = None,
        known_score: KnownScore | None = None,
        on_bad_image: str = "error",
        max_pixels: int = MAX_IMAGE_PIXELS,
    ):
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise UserError(f"device '{device}' asked for but no GPU is available; use auto or cpu")
        self.net = net.to(self.device).eval()
        self.kind = kind
        self.preprocessing = preprocessing
        self.architecture = architecture
        self._classes = list(classes) if classes is not None else None
        self.features, self.tau = features, tau
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self._support, self._support_source = support, support_source
        self.known_score = known_score or KnownScore(features=features)
        self._threshold: tuple[int, float] | None = None  # (id of its support, threshold)
        self.on_bad_image, self.max_pixels = on_bad_image, max_pixels
        self.skipped: list[tuple[int, str]] = []

    @property
    def is_classifier(self) -> bool:
        """True for a fine-tuned model (linear classifier), False for soft nearest neighbours."""
        return isinstance(self.net, Classifier)

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
        """Preprocessed batches (n, C, size, size) on the device, in input order; with
        ``on_bad_image`` ``"skip"``, unreadable files are left out and listed in
        :attr:`skipped`.

        Raises:
            UserError: an unreadable file (unless skipped), or none of the images readable.
        """
        items = as_items(images)
        tf = self.preprocessing.transform()
        channels = self.preprocessing.channels
        self.skipped = []

        def one(i: int) -> torch.Tensor | None:
            item = items[i]
            if isinstance(item, Path):
                try:
                    return tf(read_image(item, channels, max_pixels=self.max_pixels))
                except UserError:
                    if self.on_bad_image != "skip":
                        raise
                    self.skipped.append((i, str(item)))
                    return None
            if isinstance(item, Image.Image):
                return tf(to_mode(item, channels))
            return tf(tensor_channels(item, channels))

        n = len(items)
        bar = Progress((n + self.batch_size - 1) // self.batch_size, desc) if progress else None
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for start in range(0, n, self.batch_size):
                index = range(start, min(n, start + self.batch_size))
                views = [x for x in pool.map(one, index) if x is not None]
                if views:
                    yield torch.stack(views).to(self.device)
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        self.skipped.sort()
        if n and len(self.skipped) == n:
            raise UserError(f"none of the {n} images could be read")

    # -- outputs --------------------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, images: Images, features: str = "head", progress: bool = False) -> torch.Tensor:
        """Embeddings of ``images``: ``"head"`` (pre-trained: the space PAWS-NN classifies in;
        fine-tuned: the classifier's input) or ``"trunk"`` (encoder output).

        Returns:
            (N, D) float32 on the CPU.
        """
        return self._embed(images, [features], progress)[0]

    @torch.no_grad()
    def _embed(self, images: Images, features: list[str], progress: bool) -> list[torch.Tensor]:
        """The embeddings of ``images`` in each of ``features``, from one pass: float32 on the
        CPU."""
        for f in features:
            if f not in ("head", "trunk"):
                raise UserError(f"features must be 'head' or 'trunk', got {f!r}")
        out: list[list[torch.Tensor]] = [[] for _ in features]
        for x in self.batches(images, progress, "embed"):
            for store, e in zip(out, self.net.embed_features(x, features)):
                store.append(e.float().cpu())
        return [torch.cat(o) for o in out]

    def _support_embeddings(
        self, images: Images, progress: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Support embeddings for classifying and, when another space, for the known score."""
        if self.known_score.features == self.features:
            return self.embed(images, self.features, progress), None
        emb, known = self._embed(images, [self.features, self.known_score.features], progress)
        return emb, known

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
            files, y, classes = scan_labeled_folder(images)
            images, labels = files, y
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        names = list(classes) if classes is not None else [str(i) for i in range(int(y.max()) + 1)]
        if y.numel() and (y.min() < 0 or y.max() >= len(names)):
            raise UserError(f"support labels must lie in [0, {len(names)})")
        emb, known = self._support_embeddings(images, progress)
        if self.skipped:  # unreadable support images skipped: so are their labels
            gone = {i for i, _ in self.skipped}
            y = y[[i for i in range(len(y)) if i not in gone]]
        if len(emb) != len(y):
            raise UserError(f"{len(emb)} support images but {len(y)} labels")
        self._support = Support(emb, y, names, self.features, known)
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
        most probable first (:meth:`predictions` also says which images are unknown)."""
        return self._top(self.predict_proba(images, progress), top_k)

    def _top(self, probs: torch.Tensor, top_k: int) -> list[list[tuple[str, float]]]:
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        names = self.classes
        return [
            [(names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)
        ]

    def _known_support(self) -> torch.Tensor:
        support = self.support
        if support.known is not None:
            return support.known
        if self.known_score.features != support.features:
            raise UserError(
                f"this support has no {self.known_score.features} embeddings for the known "
                f"score; set eval.unknown_features: {support.features}"
            )
        return support.embeddings

    @property
    def unknown_threshold(self) -> float:
        """The known score below which an image is unknown, calibrated on the support itself
        (leave one out, :meth:`paws.method.known_score.KnownScore.threshold`)."""
        support = self.support
        if self._threshold is None or self._threshold[0] != id(support):
            t = self.known_score.threshold(self._known_support(), self.chunk_size)
            self._threshold = (id(support), t)
        return self._threshold[1]

    def known_scores(self, images: Images, progress: bool = False) -> torch.Tensor:
        """(N,) known scores of pre-trained models (:mod:`paws.method.known_score`)."""
        queries = self.embed(images, self.known_score.features, progress)
        return self.known_score.scores(queries, self._known_support(), self.chunk_size)

    @torch.no_grad()
    def predictions(
        self, images: Images, top_k: int = 1, progress: bool = False
    ) -> list[Prediction]:
        """The ``top_k`` classes of each image and, for pre-trained models, its known score and
        whether it is unknown (of none of the support classes), from one pass over the
        images."""
        if self.is_classifier:
            return [Prediction(t) for t in self.predict(images, top_k, progress)]
        support = self.support
        features = list(dict.fromkeys([support.features, self.known_score.features]))
        embedded = dict(zip(features, self._embed(images, features, progress)))
        probs = snn_classify(
            embedded[support.features],
            support.embeddings,
            support.labels,
            len(support.classes),
            self.tau,
            self.chunk_size,
        ).cpu()
        scores = self.known_score.scores(
            embedded[self.known_score.features], self._known_support(), self.chunk_size
        )
        threshold = self.unknown_threshold
        return [
            Prediction(t, float(sc), bool(sc < threshold))
            for t, sc in zip(self._top(probs, top_k), scores.tolist())
        ]

    def export(self, out_dir: str | Path, progress: bool = False) -> Path:
        """Write this model as a self-contained export folder (see :mod:`paws.apply.export`); a
        pre-trained model's support is embedded now if it was not yet."""
        prep = self.preprocessing
        parts = Export(
            kind=self.kind,
            architecture=self.architecture.to_dict(),
            preprocessing={
                "size": prep.size,
                "crop_fraction": prep.crop_fraction,
                "mean": list(prep.mean),
                "std": list(prep.std),
                "channels": prep.channels,
            },
            classes=[],
            classify={"method": "linear"},
            weights=self.net.state_dict(),
            batch_size=self.batch_size,
        )
        if self.is_classifier:
            parts.classes = self.classes
        else:
            support = self.load_support(progress)
            parts.classes = support.classes
            parts.classify = {
                "method": "snn",
                "features": support.features,
                "tau": self.tau,
                "chunk_size": self.chunk_size,
                "known": self.known_score.to_dict(),
            }
            parts.support = {"embeddings": support.embeddings, "labels": support.labels}
            if support.known is not None:
                parts.support["known"] = support.known
        return write_export(parts, out_dir)
