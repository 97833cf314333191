"""Opening a trained model for prediction: a checkpoint or run directory (rebuilt with
:func:`paws.rundir.restore`, its support the run's labelled images), an export folder (the
format of :mod:`paws.apply.export`), and :func:`load`, which tells them apart (``paws.load``).
Each builds its :class:`~paws.apply.predictor.Predictor` whole, with the reading settings it is
given."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from paws import rundir
from paws.apply.embedding import embed_images
from paws.apply.export import MANIFEST, is_export, made_from, read_export, source_of
from paws.apply.predictor import (
    ClassifierPredictor,
    Prediction,
    Predictor,
    SoftNearestNeighbourPredictor,
    Support,
    SupportSource,
    UnlabeledSource,
)
from paws.apply.reading import ImageReader, Preprocessing
from paws.config import apply_overrides, from_dict, load_config
from paws.data.loaders import Loading
from paws.data.sources import load_datasets
from paws.errors import UserError, first_line
from paws.method.diffusion import KnownGraph
from paws.method.known_score import KnownScore
from paws.models import Architecture, build_network, load_weights
from paws.rundir import checkpoint

__all__ = ["from_checkpoint", "from_export", "load", "Prediction"]


def _run_sources(cfg: Any, data: Any = None) -> tuple[SupportSource, UnlabeledSource]:
    """The default support of a checkpoint, the run's labelled images, and the unlabelled
    images of its diffusion known score (at most ``eval.unknown_nodes`` of the run's), each
    embedded exactly as ``paws eval`` embeds them; the run's data (``data`` when the caller
    holds them already) are read once for both."""
    held: dict[str, Any] = {} if data is None else {"data": data}

    def datasets() -> Any:
        if "data" not in held:
            try:
                held["data"] = load_datasets(cfg)
            except UserError as e:
                raise UserError(
                    f"cannot rebuild the run's labelled set ({e}); give a support folder "
                    "(--support DIR) or set data paths with --set"
                ) from e
        return held["data"]

    def embed(predictor: Predictor, images: Any, features: str, progress: bool, desc: str):
        loading = Loading.of(cfg, datasets())
        return embed_images(
            predictor.net, images, cfg, loading, predictor.device, features, progress, desc
        ).cpu()

    def support(predictor: Predictor, progress: bool) -> Support:
        data = datasets()
        space = predictor.support_features
        emb = embed(predictor, data.labeled, space, progress, "embed support")
        known_features = predictor.known_score.features
        known = None
        if known_features != space:
            known = embed(predictor, data.labeled, known_features, progress, "embed support")
        labels = torch.from_numpy(np.asarray(data.labeled.labels, dtype=np.int64))
        return Support(emb, labels, list(data.classes), space, known)

    def unlabeled(predictor: Predictor, progress: bool) -> torch.Tensor:
        pool = datasets().unlabeled
        pool = pool.subset(predictor.known_score.graph_pool(len(pool)))
        features = predictor.known_score.features
        return embed(predictor, pool, features, progress, "embed unlabelled images")

    return support, unlabeled


def _reader(preprocessing: Preprocessing, batch_size: int, reading: Any) -> ImageReader:
    """How a model reads image files: ``reading`` is a config's ``data`` section."""
    return ImageReader(preprocessing, batch_size, reading.on_bad_image, reading.max_image_pixels)


def from_checkpoint(
    path: str | Path,
    overrides: list[str] | None = None,
    device: str | torch.device = "auto",
    data: Any = None,
) -> Predictor:
    """A :class:`Predictor` from a checkpoint of kind pretrain, tighten or finetune.

    Args:
        path: checkpoint file or run directory.
        overrides: ``key=value`` config overrides (e.g. ``data.root=...`` to find the labelled
            set, ``eval.tau=...``).
        device: compute device.
        data: the run's datasets (:func:`paws.data.load_datasets` of its config), when the
            caller holds them (the end of training): not read again.
    """
    r = rundir.restore(path, overrides)
    cfg, state = r.cfg, r.state
    channels = r.arch.in_channels
    mean = tuple(state.get("mean") or cfg.data.mean or [])
    std = tuple(state.get("std") or cfg.data.std or [])
    if len(mean) != channels or len(std) != channels:
        raise UserError(f"{path} does not record its normalisation (mean and std)")
    prep = Preprocessing(cfg.views.large_size, cfg.views.eval_crop, mean, std, int(channels))
    reader = _reader(prep, cfg.eval.batch_size, cfg.data)
    known = KnownScore.from_config(cfg)
    support, unlabeled = _run_sources(cfg, data)
    args = (r.net, r.kind, r.arch, reader, device, known, cfg.eval.chunk_size)
    sources = dict(support_source=support, unlabeled_source=unlabeled)
    if r.kind in checkpoint.CLASSIFIERS:
        classes = [str(c) for c in state.get("classes") or []]
        predictor: Predictor = ClassifierPredictor(*args, classes=classes, **sources)
    else:
        predictor = SoftNearestNeighbourPredictor(
            *args, features=cfg.eval.features, tau=cfg.eval.tau, **sources
        )
    if not overrides:  # the run's own support and settings: its exports say so
        predictor.source = source_of(rundir.model_file(path))
    return predictor


def _width(net: torch.nn.Module, prep: Preprocessing, features: str) -> int:
    """The width of a network's ``features`` embedding, from one blank image."""
    x = torch.zeros(1, prep.channels, prep.size, prep.size)
    try:
        with torch.no_grad():
            return int(net.embed_features(x, [features])[0].shape[1])
    except RuntimeError as err:  # e.g. an input too small for the network's strides
        raise UserError(
            f"the network cannot take {prep.size}-pixel images (preprocessing.size): "
            f"{first_line(err, 120)}"
        ) from err


def _check_widths(folder: Path, e: Any, net: torch.nn.Module, prep: Preprocessing) -> None:
    """An export's support embeddings must be as wide as the network's embeddings."""
    spaces = [("embeddings", str(e.classify.get("features", "head")))]
    if e.support.get("known") is not None:
        spaces.append(("known", str((e.classify.get("known") or {}).get("features", "trunk"))))
    for key, features in spaces:
        got, want = e.support[key].shape[1], _width(net, prep, features)
        if got != want:
            raise UserError(
                f"{folder} is damaged: its support {key} are {got} wide, the network's "
                f"{features} embeddings {want}; export the model again"
            )


def from_export(
    folder: str | Path, device: str | torch.device = "auto", reading: Any = None
) -> Predictor:
    """A :class:`Predictor` from an export folder (:mod:`paws.apply.export`), checked whole when
    opened: manifest, weights against the architecture, support against the network.

    Args:
        folder: the export folder.
        device: compute device.
        reading: how image files are read (a config's ``data`` section: ``on_bad_image``,
            ``max_image_pixels``); default: the defaults.

    Raises:
        UserError: naming the file and what in it is wrong.
    """
    folder = Path(folder)
    e = read_export(folder)
    manifest = folder / MANIFEST
    arch = Architecture.from_dict(e.architecture, f"{manifest}: its architecture")
    linear = e.classify.get("method") == "linear"
    if linear and arch.num_classes != len(e.classes):
        raise UserError(
            f"{manifest} is damaged: its classifier has {arch.num_classes} outputs but "
            f"{len(e.classes)} classes are named; export the model again"
        )
    prep = Preprocessing.from_dict(e.preprocessing)
    if arch.in_channels != prep.channels:
        raise UserError(
            f"{manifest} is damaged: the network takes {arch.in_channels} channels, the "
            f"preprocessing gives {prep.channels}; export the model again"
        )
    net = build_network(arch, seed=0)  # the saved weights replace these
    load_weights(net, e.weights, str(folder / "model.safetensors"))
    net.eval()
    reader = _reader(prep, e.batch_size, reading or from_dict({}).data)
    if linear and e.support is None:
        return ClassifierPredictor(net, e.kind, arch, reader, device, classes=e.classes)
    _check_widths(folder, e, net, prep)
    features = "head" if linear else str(e.classify.get("features", "head"))
    known = e.support.get("known")
    support = Support(
        e.support["embeddings"].float(),
        e.support["labels"].long(),
        e.classes,
        features,
        None if known is None else known.float(),
    )
    # An export without the known score's embeddings scores in its classifying space.
    settings = dict(e.classify.get("known") or {"features": features, "kind": "soft"})
    if known is None:
        settings["features"] = features
    threshold = settings.pop("threshold", None)
    num_labeled = settings.pop("graph_labeled", None)
    known_score = KnownScore(**settings)
    unlabeled_source = None
    if "graph_nodes" in e.support and threshold is not None and num_labeled is not None:
        support.graph = KnownGraph(
            e.support["graph_nodes"].float(),
            e.support["graph_scores"].float(),
            float(threshold),
            int(num_labeled),
            known_score.neighbours,
        )
        unlabeled_source = _graph_unlabeled(support.graph)
    args = (net, e.kind, arch, reader, device, known_score)
    chunk = int(e.classify.get("chunk_size", 8192))
    kwargs = dict(support=support, unlabeled_source=unlabeled_source)
    if linear:
        return ClassifierPredictor(*args, chunk, classes=e.classes, **kwargs)
    tau = float(e.classify.get("tau", 0.1))
    return SoftNearestNeighbourPredictor(*args, chunk, features=support.features, tau=tau, **kwargs)


def _graph_unlabeled(graph: KnownGraph) -> UnlabeledSource:
    """An export's unlabelled graph nodes, for a graph of another support."""
    return lambda predictor, progress: graph.unlabeled


def _ready_export(run: Path) -> Path | None:
    """``RUN/export`` when it was made from the model the run directory ``run`` means, as that
    file is now, with the run's own support and settings (``paws train`` writes it at the end,
    ``paws export RUN`` writes it again); None otherwise."""
    if not run.is_dir() or not (run / rundir.LAST).is_file():
        return None
    folder = run / rundir.EXPORT
    try:
        model = rundir.model_file(run)
    except UserError:
        return None
    return folder if is_export(folder) and model.is_file() and made_from(folder, model) else None


def load(
    path: str | Path,
    device: str | torch.device = "auto",
    support: str | Path | None = None,
    overrides: list[str] | None = None,
) -> Predictor:
    """Open a trained model for prediction and embedding.

    A run directory opens its export of the model it means (``RUN/export``, which ``paws
    train`` writes at its end) when that export is of the checkpoint as it is now and neither
    ``support`` nor ``overrides`` is given: the same answers, in a fraction of a second instead
    of rebuilding the support and the known score's graph from the run's data.

    Args:
        path: an export folder (``paws export``), a checkpoint file, or a run directory.
        device: ``"auto"``, ``"cpu"``, ``"cuda"``.
        support: a ``<class>/<image>`` folder to classify against (pre-trained models); default:
            the export's support embeddings, or the run's labelled images for a checkpoint.
        overrides: config overrides for a checkpoint; for an export, only how image files
            are read applies (``data.on_bad_image``, ``data.max_image_pixels``).

    Returns:
        A :class:`Predictor` with ``.predict(images, top_k=...)``, ``.predict_proba(images)``
        and ``.embed(images, features=...)``.

    Example:
        >>> model = paws.load("runs/paws-fashion_mnist/export")  # doctest: +SKIP
        >>> model.predict(["shoe.png"], top_k=3)  # doctest: +SKIP
        [[('Sneaker', 0.91), ('Sandal', 0.06), ('Ankle boot', 0.02)]]
    """
    p = Path(path).expanduser()
    ready = _ready_export(p) if support is None and not overrides else None
    if ready is not None:
        # The run's export of the model it means: the same answers, without rebuilding the
        # support and the known score's graph from the run's data (seconds to minutes).
        return from_export(ready, device, load_config(p / rundir.CONFIG).data)
    if is_export(p):
        reading = from_dict(apply_overrides({}, list(overrides or []))).data
        predictor = from_export(p, device, reading)
    elif p.is_file() or (p / rundir.LAST).is_file():
        predictor = from_checkpoint(p, overrides, device)
    else:
        raise UserError(
            f"{p} is neither an export folder (no model.json), a checkpoint, nor a run directory"
        )
    if support is not None:
        predictor.set_support(support)
    return predictor
