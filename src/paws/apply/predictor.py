"""Applying a trained model to new images: one predictor per kind of model, one interface.

A :class:`Predictor` is a network with its preprocessing (:class:`paws.apply.reading.
ImageReader`: the evaluation view of training, and what happens to unreadable files) and its
way of turning embeddings into class probabilities:

- :class:`SoftNearestNeighbourPredictor`, for a pre-trained or tightened PAWS model, classifies
  by soft nearest neighbours against a *support set* of labelled embeddings, as PAWS-NN does
  (:func:`paws.method.snn.snn_classify`). The support defaults to the run's own labelled images
  and can be any labelled images (:meth:`~SoftNearestNeighbourPredictor.set_support`),
  including classes the model never saw labelled: new classes need a few examples, no
  retraining.
- :class:`ClassifierPredictor`, for a fine-tuned model, applies its linear classifier.

Both give the same answers through the same methods (``predict``, ``predictions``, ``embed``,
``export``) and describe themselves to the ONNX exporter (:meth:`Predictor.graph`), so nothing
outside this module asks which kind a model is. Where the labelled images' embeddings are known,
a prediction also carries the known score (:mod:`paws.method.known_score`) and whether the
image is unknown. :func:`paws.apply.load.load` (``paws.load``) builds predictors whole.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from paws.apply.export import Export, write_export
from paws.apply.graphs import ClassifierProbabilities, SoftNearestNeighbours
from paws.apply.reading import ImageReader, Preprocessing
from paws.apply.records import Embedded, Prediction, Support
from paws.data.images import Images, scan_labeled_folder
from paws.errors import UserError
from paws.method.diffusion import KnownGraph
from paws.method.known_score import KnownScore
from paws.method.snn import snn_classify
from paws.models import Architecture
from paws.progress import info
from paws.runtime import device_for

__all__ = [
    "Support",
    "Prediction",
    "Embedded",
    "Predictor",
    "SoftNearestNeighbourPredictor",
    "ClassifierPredictor",
]

FEATURES = ("head", "trunk")


# fn(predictor, progress) -> its default support (a run's labelled images, embedded by it).
SupportSource = Callable[["Predictor", bool], Support]
# fn(predictor, progress) -> (U, F) unlabelled embeddings in the known score's space.
UnlabeledSource = Callable[["Predictor", bool], torch.Tensor]


def _check_features(features: Sequence[str]) -> None:
    for f in features:
        if f not in FEATURES:
            raise UserError(f"features must be 'head' or 'trunk', got {f!r}")


class Predictor(ABC):
    """A trained network with its preprocessing and classifier, ready for new images.

    Images may be file paths or folders (searched recursively), PIL images, tensors
    (C, H, W) / (N, C, H, W), uint8 in [0, 255] or float in [0, 1], or numpy arrays (H, W) /
    (H, W, C) / (N, H, W, C) (uint8, or float in [0, 1]); any size (see
    :class:`paws.apply.reading.ImageReader`). :meth:`predictions` names each answer's input
    (its file, or its position).

    Args:
        net: a :class:`paws.models.PAWSModel` or :class:`paws.models.Classifier` (moved to
            ``device``, in eval mode).
        kind: where the weights came from (:data:`paws.rundir.checkpoint.KINDS`).
        architecture: the network's :class:`paws.models.Architecture` (for exports).
        reader: how images are read (preprocessing, batch size, unreadable files).
        device: ``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or a device.
        known_score: how images are judged unknown (:class:`paws.method.known_score.
            KnownScore`), where the model has labelled embeddings to compare with.
        chunk_size: labelled embeddings per similarity chunk.
        support: labelled embeddings (:class:`Support`): what a soft nearest-neighbour model
            classifies against, and what the known score of any model compares with; or None
            to build them on first use with ``support_source``.
        support_source: ``fn(predictor, progress) -> Support``, the default support.
        unlabeled_source: ``fn(predictor, progress) -> (U, F)`` unlabelled embeddings in the
            known score's space, from which the diffusion score's graph is built for a support
            (the run's unlabelled images); None: the known score compares with the support
            alone.
    """

    def __init__(
        self,
        net: nn.Module,
        kind: str,
        architecture: Architecture,
        reader: ImageReader,
        device: str | torch.device = "auto",
        known_score: KnownScore | None = None,
        chunk_size: int = 8192,
        support: Support | None = None,
        support_source: SupportSource | None = None,
        unlabeled_source: UnlabeledSource | None = None,
    ):
        self.device = device_for(device, "device")
        self.net = net.to(self.device).eval()
        self.kind = kind
        self.architecture = architecture
        self.reader = reader
        self.known_score = known_score or KnownScore()
        self.chunk_size = chunk_size
        self._threshold: tuple[int, float] | None = None  # (id of its reference, threshold)
        self._support, self._support_source = support, support_source
        self._unlabeled_source = unlabeled_source
        self._unlabeled: torch.Tensor | None = None
        # The checkpoint of a run this predictor answers for with the run's own support
        # (:func:`paws.apply.export.source_of`), recorded in its exports; None otherwise.
        self.source: dict[str, Any] | None = None

    @property
    def preprocessing(self) -> Preprocessing:
        """The input pipeline."""
        return self.reader.preprocessing

    @property
    def batch_size(self) -> int:
        """Images per forward pass."""
        return self.reader.batch_size

    # -- what a kind of model says -------------------------------------------------------------

    @property
    @abstractmethod
    def classes(self) -> list[str]:
        """The class names predictions refer to."""

    @property
    @abstractmethod
    def classify_features(self) -> str:
        """The embedding the classifier reads (``"head"`` or ``"trunk"``)."""

    @abstractmethod
    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        """(N, K) class probabilities on the CPU from (N, D) embeddings in
        :attr:`classify_features`."""

    @property
    @abstractmethod
    def support_features(self) -> str:
        """The embedding a support set of this model is built in (``"head"`` or ``"trunk"``)."""

    def known_reference(self) -> torch.Tensor | None:
        """(M, F) labelled embeddings in the known score's space, or None when the model has
        none (its predictions then carry no score)."""
        self.ready()
        if self._support is None:
            return None
        return self._support.in_space(self.known_score.features)

    def known_graph(self) -> KnownGraph | None:
        """The diffusion known score's graph (:mod:`paws.method.diffusion`), or None when the
        score compares with the labelled embeddings alone."""
        self.ready()
        if self._support is None or not self.known_score.uses_graph:
            return None
        return self._support.graph

    def _known(self, queries: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        graph = self.known_graph()
        if graph is not None:
            return graph.query(queries)
        return self.known_score.scores(queries, reference, self.chunk_size)

    @abstractmethod
    def export_parts(self, progress: bool = False) -> Export:
        """The model as the parts of an export folder (:mod:`paws.apply.export`)."""

    @abstractmethod
    def graph(self, net: nn.Module | None = None) -> nn.Module:
        """A module from preprocessed images (N, C, S, S) to ``(probabilities (N, K),
        embeddings (N, D))``, the embeddings being what it classifies: what ``model.onnx``
        is exported from. ``net``: the network to wrap (default: this predictor's own)."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """How the model classifies, in words and values (``onnx.json``'s ``classify``)."""

    @property
    @abstractmethod
    def summary(self) -> str:
        """What classifies, in a few words for messages."""

    def ready(self, progress: bool = False) -> None:
        """Build what is built on first use (a run's support set) now, with progress shown."""
        if self._support is None and self._support_source is not None:
            self._support = self._with_graph(self._support_source(self, progress), progress)

    def _with_graph(self, support: Support, progress: bool) -> Support:
        """``support`` with the diffusion score's graph, where the score uses one and there are
        unlabelled embeddings to build it from."""
        if not self.known_score.uses_graph or self._unlabeled_source is None:
            return support
        if self._unlabeled is None:
            self._unlabeled = self._unlabeled_source(self, progress)
        if not len(self._unlabeled) or not len(support.labels):
            return support
        known = support.in_space(self.known_score.features)
        support.graph = self.known_score.graph(known, support.labels, self._unlabeled)
        return support

    def _support_parts(self, parts: Export, support: Support) -> Export:
        """``parts`` with the support's tensors, the known score's settings and its graph (whose
        scores travel whole, so that the export makes the same decisions)."""
        parts.support = {"embeddings": support.embeddings, "labels": support.labels}
        if support.known is not None:
            parts.support["known"] = support.known
        parts.classify["known"] = self.known_score.to_dict()
        if support.graph is not None:
            g = support.graph
            parts.support.update(graph_nodes=g.nodes, graph_scores=g.scores)
            parts.classify["known"].update(threshold=g.threshold, graph_labeled=g.num_labeled)
        return parts

    def set_support(
        self,
        images: Images,
        labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        classes: Sequence[str] | None = None,
        progress: bool = False,
    ) -> Support:
        """Classify against new labelled images: pre-trained models only (see
        :meth:`SoftNearestNeighbourPredictor.set_support`).

        Raises:
            UserError: this model predicts its own classes.
        """
        raise UserError(
            f"a support set applies to pre-trained models; this {self.kind} model predicts "
            "its own classes"
        )

    # -- reading images ------------------------------------------------------------------------

    @torch.no_grad()
    def embedded(
        self,
        images: Images,
        features: Sequence[str] = ("head",),
        progress: bool = False,
        desc: str = "embed",
    ) -> Embedded:
        """The embeddings of ``images`` in each of ``features``, from one pass, with which
        inputs they are (unreadable files skipped under ``data.on_bad_image: skip``)."""
        _check_features(features)
        features = list(dict.fromkeys(features))
        out: dict[str, list[torch.Tensor]] = {f: [] for f in features}
        e = Embedded({})
        for batch in self.reader.batches(images, self.device, progress, desc):
            e.skipped += batch.skipped
            if not batch.positions:
                continue
            for f, emb in zip(features, self.net.embed_features(batch.x, features)):
                out[f].append(emb.float().cpu())
            e.positions += batch.positions
            e.sources += batch.sources
        e.features = {f: torch.cat(v) if v else self._no_rows(f) for f, v in out.items()}
        return e

    def _no_rows(self, features: str) -> torch.Tensor:
        """(0, D) float32: the embeddings of no image (none given, or none readable), as wide
        as the network's, so that every answer downstream is empty rather than an error."""
        p = self.preprocessing
        blank = torch.zeros(1, p.channels, p.size, p.size, device=self.device)
        with torch.no_grad():
            return self.net.embed_features(blank, [features])[0][:0].float().cpu()

    def embed(self, images: Images, features: str = "head", progress: bool = False) -> torch.Tensor:
        """Embeddings of ``images``: ``"head"`` (pre-trained: the space PAWS-NN classifies in;
        fine-tuned: the classifier's input) or ``"trunk"`` (encoder output).

        Returns:
            (N, D) float32 on the CPU, one row per readable image.
        """
        return self.embedded(images, [features], progress).features[features]

    # -- answers -------------------------------------------------------------------------------

    def predict_proba(self, images: Images, progress: bool = False) -> torch.Tensor:
        """Class probabilities, (N, K) float32 on the CPU, columns in :attr:`classes` order."""
        self.ready()
        e = self.embedded(images, [self.classify_features], progress, "predict")
        return self.probabilities(e.features[self.classify_features])

    def predict(
        self, images: Images, top_k: int = 1, progress: bool = False
    ) -> list[list[tuple[str, float]]]:
        """The ``top_k`` most probable classes of each image, as ``(class, probability)`` pairs,
        most probable first (:meth:`predictions` also says which images are unknown)."""
        return self._top(self.predict_proba(images, progress), top_k)

    def predictions(
        self, images: Images, top_k: int = 1, progress: bool = False
    ) -> list[Prediction]:
        """The ``top_k`` classes of each readable image, its known score and whether it is
        unknown (of none of the labelled classes), from one pass over the images."""
        self.ready()
        reference = self.known_reference()
        spaces = [self.classify_features]
        if reference is not None:
            spaces.append(self.known_score.features)
        e = self.embedded(images, spaces, progress, "predict")
        top = self._top(self.probabilities(e.features[self.classify_features]), top_k)
        if reference is None:
            return [Prediction(t, source=s) for t, s in zip(top, e.sources)]
        queries = e.features[self.known_score.features]
        scores = self._known(queries, reference).tolist()
        threshold = self.unknown_threshold
        return [
            Prediction(t, float(sc), bool(sc < threshold), s)
            for t, sc, s in zip(top, scores, e.sources)
        ]

    def _top(self, probs: torch.Tensor, top_k: int) -> list[list[tuple[str, float]]]:
        k = max(1, min(top_k, probs.shape[1]))
        values, indices = probs.topk(k, dim=1)
        names = self.classes
        return [
            [(names[i], float(v)) for v, i in zip(vs.tolist(), ix.tolist())]
            for vs, ix in zip(values, indices)
        ]

    @property
    def unknown_threshold(self) -> float | None:
        """The known score below which an image is unknown, calibrated on the labelled
        embeddings themselves (leave one out, :meth:`paws.method.known_score.KnownScore.
        threshold`), or None for a model without them."""
        self.ready()
        reference = self.known_reference()
        if reference is None:
            return None
        graph = self.known_graph()
        if graph is not None:
            return graph.threshold
        if self._threshold is None or self._threshold[0] != id(reference):
            t = self.known_score.threshold(reference, self.chunk_size)
            self._threshold = (id(reference), t)
        return self._threshold[1]

    def known_scores(self, images: Images, progress: bool = False) -> torch.Tensor:
        """(N,) known scores (:mod:`paws.method.known_score`).

        Raises:
            UserError: the model has no labelled embeddings to compare with.
        """
        self.ready()
        reference = self.known_reference()
        if reference is None:
            raise UserError(f"this {self.kind} model has no labelled embeddings for a known score")
        queries = self.embed(images, self.known_score.features, progress)
        return self._known(queries, reference)

    def export(self, out_dir: str | Path, progress: bool = False) -> Path:
        """Write this model as a self-contained export folder (:mod:`paws.apply.export`)."""
        return write_export(self.export_parts(progress), out_dir)

    def _export_base(self, classes: list[str], classify: dict[str, Any]) -> Export:
        return Export(
            kind=self.kind,
            architecture=self.architecture.to_dict(),
            preprocessing=self.preprocessing.to_dict(),
            classes=list(classes),
            classify=classify,
            weights=self.net.state_dict(),
            batch_size=self.batch_size,
            source=self.source,
        )


# --------------------------------------------------------------------------------------------
# Soft nearest neighbours.


class SoftNearestNeighbourPredictor(Predictor):
    """A pre-trained (or tightened) PAWS model: classifies by soft nearest neighbours against
    its support set, as PAWS-NN.

    Args (beyond :class:`Predictor`'s, which it takes too):
        features: the embedding compared with the support (``eval.features``).
        tau: soft nearest-neighbour temperature.
    """

    def __init__(self, *args: Any, features: str = "head", tau: float = 0.1, **kwargs: Any):
        super().__init__(*args, **kwargs)
        _check_features([features])
        self.features, self.tau = features, tau

    @property
    def support(self) -> Support:
        """The support set (built on first use)."""
        self.ready()
        if self._support is None:
            raise UserError("this model has no support set: give one with set_support()")
        return self._support

    @property
    def support_features(self) -> str:
        return self.features

    def load_support(self, progress: bool = False) -> Support:
        """Build the default support now (with a progress display) and return it."""
        self.ready(progress)
        return self.support

    @property
    def classes(self) -> list[str]:
        return self.support.classes

    @property
    def classify_features(self) -> str:
        return self.support.features

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        s = self.support
        return snn_classify(
            embeddings, s.embeddings, s.labels, len(s.classes), self.tau, self.chunk_size
        ).cpu()

    def set_support(
        self,
        images: Images,
        labels: Sequence[int] | np.ndarray | torch.Tensor | None = None,
        classes: Sequence[str] | None = None,
        progress: bool = False,
    ) -> Support:
        """Classify against new labelled images.

        Args:
            images: a ``<class>/<image>`` folder (then ``labels`` and ``classes`` come from it),
                or images with their ``labels``.
            labels: (M,) class positions in ``classes``.
            classes: class names (default: ``"0"``, ``"1"``, ...).
            progress: show progress.

        Returns:
            The new support.
        """
        if labels is None:
            if not isinstance(images, (str, Path)):
                raise UserError("set_support needs labels, or a <class>/<image> folder")
            files, y, classes = scan_labeled_folder(images)
            images, labels = files, y
        self.source = None  # no longer the run's own support
        y = torch.as_tensor(np.asarray(labels), dtype=torch.int64)
        names = list(classes) if classes is not None else [str(i) for i in range(int(y.max()) + 1)]
        if y.numel() and (y.min() < 0 or y.max() >= len(names)):
            raise UserError(f"support labels must lie in [0, {len(names)})")
        spaces = [self.features, self.known_score.features]
        e = self.embedded(images, spaces, progress, "embed support")
        if len(e.positions) + len(e.skipped) != len(y):
            raise UserError(
                f"{len(e.positions) + len(e.skipped)} support images but {len(y)} labels"
            )
        y = y[e.positions]  # unreadable support images skipped: so are their labels
        known = None
        if self.known_score.features != self.features:
            known = e.features[self.known_score.features]
        support = Support(e.features[self.features], y, names, self.features, known)
        self._support = self._with_graph(support, progress)
        return self._support

    def export_parts(self, progress: bool = False) -> Export:
        support = self.load_support(progress)
        parts = self._export_base(
            support.classes,
            {
                "method": "snn",
                "features": support.features,
                "tau": self.tau,
                "chunk_size": self.chunk_size,
            },
        )
        return self._support_parts(parts, support)

    def graph(self, net: nn.Module | None = None) -> nn.Module:
        s = self.support
        return SoftNearestNeighbours(
            self.net if net is None else net,
            s.embeddings,
            s.labels,
            len(s.classes),
            self.tau,
            s.features,
        )

    @property
    def summary(self) -> str:
        s = self.support
        return (
            f"{self.kind} model against {len(s.labels)} support images of {len(s.classes)} "
            f"classes ({s.features} features, tau {self.tau:g})"
        )

    def describe(self) -> dict[str, Any]:
        s = self.support
        return {
            "method": "snn",
            "tau": self.tau,
            "features": s.features,
            "num_support": len(s.labels),
            "probabilities": "softmax(normalise(embeddings) @ normalise(supports).T / tau), "
            "summed over the supports of each class",
            "embeddings": "the projection head's output (the space PAWS-NN classifies in)"
            if s.features == "head"
            else "the encoder trunk's features",
        }


# --------------------------------------------------------------------------------------------
# A classifier.


class ClassifierPredictor(Predictor):
    """A fine-tuned model or a student: applies its linear classifier to the first layer of
    its head. Its support, when it has one (the run's labelled images, embedded by this
    network), serves the known score only; a run whose labelled images cannot be read again
    predicts without it, which is said in a line.

    Args (beyond :class:`Predictor`'s, which it takes too):
        classes: the classifier's class names, in the order of its outputs.
    """

    def __init__(self, *args: Any, classes: Sequence[str], **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._classes = [str(c) for c in classes]

    @property
    def classes(self) -> list[str]:
        return list(self._classes)

    @property
    def classify_features(self) -> str:
        return "head"

    @property
    def support_features(self) -> str:
        return "head"

    def ready(self, progress: bool = False) -> None:
        try:
            super().ready(progress)
        except UserError as e:
            info(f"predicting without a known score: {e}")
            self._support_source = None

    def probabilities(self, embeddings: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            logits = self.net.classifier(embeddings.to(self.device))
        return logits.float().softmax(dim=1).cpu()

    def export_parts(self, progress: bool = False) -> Export:
        parts = self._export_base(self.classes, {"method": "linear"})
        self.ready(progress)
        return parts if self._support is None else self._support_parts(parts, self._support)

    def graph(self, net: nn.Module | None = None) -> nn.Module:
        return ClassifierProbabilities(self.net if net is None else net)

    @property
    def summary(self) -> str:
        return f"{self.kind} classifier of {len(self._classes)} classes"

    def describe(self) -> dict[str, Any]:
        return {
            "method": "linear",
            "probabilities": "softmax of the fine-tuned classifier's logits",
            "embeddings": "the classifier's input (the first layer of the projection head)",
        }
