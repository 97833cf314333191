"""Which images to label next: ``paws suggest``.

From a trained run, the candidates (a folder of images, or the run's own unlabelled set) are
embedded as PAWS-NN embeds them and classified by soft nearest neighbours against the run's
labelled images; :mod:`paws.labelling.strategies` then chooses n of them by one of
:data:`STRATEGIES`:

- ``coverage`` (the default, chosen by ``benchmarks/label_selection.py``): the image nearest
  each of n k-means centres, the labelled images held as fixed centres
  (:func:`paws.labelling.strategies.kmeans_select`), in the trunk's embedding, so that new
  labels go where nothing is labelled yet;
- ``typiclust``: the most typical image of each of n k-means clusters
  (:func:`paws.labelling.strategies.typiclust_select`), the default in a label-free run's
  embedding;
- ``mixed``: typical images among the uncertain, spread over the suggested classes
  (:func:`paws.labelling.strategies.mixed_select`);
- ``uncertainty``: the smallest margins between PAWS-NN's two most probable classes;
- ``kcenter``: farthest first from everything labelled or chosen
  (:func:`paws.labelling.strategies.k_center_greedy`);
- ``random``: uniformly at random.

With no run yet (the cold start), the first batch is chosen by :data:`COLD_STRATEGY` on
features that need no labels (:data:`COLD_FEATURES`): the eval view's pixels, or the config's
encoder (its ``model.weights`` backbone, or random weights). A label-free run of ``paws train``
(``loss.objective: simclr``) is a cold start in its trunk's embedding, with nothing to
classify against, by :data:`LABEL_FREE_STRATEGY`. Images already labelled are never
suggested (:mod:`paws.labelling.pools`).

Embeddings of up to ``memory_rows`` images stay in memory; more go to a float16 file in a
scratch folder, embedded and read in chunks, so memory stays bounded for any number of images.
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from paws import rundir
from paws.apply.embedding import embed_images
from paws.config import Config
from paws.data.images import ImageSet, expand_images
from paws.data.loaders import Loading
from paws.data.sources import Datasets, load_datasets, normalisation, without_labels
from paws.errors import UserError
from paws.labelling.new_classes import NewGroups, new_class_groups
from paws.labelling.pools import check_n, file_pool, no_labels, on_disk, own_pool
from paws.labelling.records import Pool, Suggestion, Suggestions
from paws.labelling.strategies import (
    EmbeddingSource,
    MemmapSource,
    TensorSource,
    k_center_greedy,
    kmeans_select,
    least_margin,
    margins,
    mixed_select,
    random_select,
    typiclust_select,
    unit_rows,
)
from paws.method.known_score import KnownScore
from paws.method.snn import snn_classify
from paws.models import Architecture, build_network
from paws.progress import Progress

__all__ = [
    "STRATEGIES",
    "COLD_FEATURES",
    "COLD_STRATEGY",
    "LABEL_FREE_STRATEGY",
    "Suggestion",
    "Suggestions",
    "PixelFeatures",
    "embed_pool",
    "choose",
    "suggest_from_run",
    "suggest_cold",
]

STRATEGIES = ("mixed", "coverage", "typiclust", "uncertainty", "random", "kcenter")
GEOMETRIC = (
    "mixed",
    "coverage",
    "typiclust",
    "kcenter",
)  # strategies that use distances between images
SPACES = ("trunk", "head")
KMEANS_ITERS = 10  # Lloyd iterations of coverage and typiclust
TYPICLUST_RESTARTS = 5  # k-means++ restarts of typiclust, the lowest inertia kept
# The first labels' strategies, by benchmarks/cold_start_picks.py (benchmarks/RESULTS.md): on
# pixels coverage, in a label-free run's embedding typiclust.
COLD_STRATEGY = "coverage"
LABEL_FREE_STRATEGY = "typiclust"
COLD_FEATURES = ("auto", "pixels", "encoder")


# --------------------------------------------------------------------------------------------
# Embedding.


class PixelFeatures(torch.nn.Module):
    """The evaluation view's normalised pixels as an embedding: (n, C, S, S) to (n, C*S*S)."""

    def embed(self, x: torch.Tensor, features: str = "head") -> torch.Tensor:
        return x.flatten(1)


def embed_pool(
    model: torch.nn.Module,
    images: ImageSet,
    cfg: Config,
    loading: Loading,
    device: torch.device,
    features: str,
    scratch: Path | None = None,
    *,
    memory_rows: int = 250_000,
    chunk: int = 16384,
    progress: bool = True,
) -> EmbeddingSource:
    """Unit-length embeddings of every image (:func:`paws.apply.embedding.embed_images`), ``chunk``
    images at a time.

    Args:
        model: anything with ``embed(x, features)`` (a PAWS model, :class:`PixelFeatures`).
        images: the images.
        cfg: config of the evaluation view and batch size.
        loading: channels, normalisation and workers.
        device: compute device.
        features: ``"head"`` or ``"trunk"``.
        scratch: folder of the float16 file when there are more than ``memory_rows`` images.
        memory_rows: most images whose embeddings are held in memory.
        chunk: images embedded at a time.
        progress: show a progress bar.

    Returns:
        (N, D) unit rows, in memory or in a :class:`paws.labelling.strategies.MemmapSource`.
    """
    n = len(images)
    bar = Progress(n, "embed") if progress else None
    parts: list[torch.Tensor] = []
    store: MemmapSource | None = None
    for start in range(0, n, chunk):
        sub = images.subset(np.arange(start, min(start + chunk, n)))
        x = unit_rows(embed_images(model, sub, cfg, loading, device, features).cpu())
        if store is None and n > memory_rows:
            if scratch is None:
                raise ValueError("a scratch folder is needed for this many embeddings")
            store = MemmapSource(scratch / "embeddings.f16", n, x.shape[1], mode="w+")
        if store is not None:
            store.write(start, x)
        else:
            parts.append(x)
        if bar is not None:
            bar.update(len(sub))
    if bar is not None:
        bar.close()
    return store if store is not None else TensorSource(torch.cat(parts))


# --------------------------------------------------------------------------------------------
# Choosing.


def choose(
    strategy: str,
    source: EmbeddingSource,
    n: int,
    labelled: torch.Tensor | None,
    exclude: np.ndarray,
    margin: np.ndarray | None = None,
    suggested: np.ndarray | None = None,
    seed: int = 0,
    progress: bool = False,
) -> tuple[np.ndarray, list[str]]:
    """The rows a strategy chooses, best first, with the reason for each.

    Args:
        strategy: one of :data:`STRATEGIES` (``mixed`` and ``uncertainty`` need ``margin``).
        source: (N, D) unit embeddings.
        n: how many.
        labelled: (L, D) unit embeddings of the labelled images, or None.
        exclude: (N,) bool, rows never chosen.
        margin: (N,) PAWS-NN margins, or None at a cold start.
        suggested: (N,) PAWS-NN's class of each row.
        seed: seed of k-means and of random choices.
        progress: show a progress bar over the passes through the embeddings.
    """
    if strategy not in STRATEGIES:
        raise UserError(f"unknown strategy '{strategy}': choose one of {', '.join(STRATEGIES)}")
    if strategy in ("mixed", "uncertainty") and margin is None:
        raise UserError(
            f"--strategy {strategy} needs a trained run (PAWS-NN's uncertainty); "
            "without one use coverage or random"
        )
    left = np.flatnonzero(~np.asarray(exclude, dtype=bool))
    if n >= len(left):  # nothing to choose between: every one, the least sure first
        if margin is not None:
            left = left[np.argsort(margin[left], kind="stable")]
        return left, ["every candidate not labelled yet"] * len(left)
    if strategy == "random":
        rows = random_select(len(source), n, exclude, seed)
        return rows, ["random"] * len(rows)
    chunks = -(-len(source) // source.chunk)
    if strategy == "coverage":
        with _ticks(progress, (KMEANS_ITERS + 2) * chunks) as tick:
            rows = kmeans_select(source, n, labelled, exclude, KMEANS_ITERS, seed, tick=tick)
        return rows, ["coverage"] * len(rows)
    if strategy == "typiclust":
        with _ticks(progress, TYPICLUST_RESTARTS * (KMEANS_ITERS + 2) * chunks) as tick:
            rows = typiclust_select(
                source, n, labelled, exclude, KMEANS_ITERS, seed, TYPICLUST_RESTARTS, tick=tick
            )
        return rows, ["typical of a k-means cluster"] * len(rows)
    if strategy == "kcenter":
        with _ticks(progress, (n + 2) * chunks) as tick:
            rows = k_center_greedy(source, n, labelled, exclude, tick=tick)
        return rows, ["coverage (k-center)"] * len(rows)
    assert margin is not None
    if strategy == "uncertainty":
        rows = least_margin(margin, n, exclude)
        return rows, [f"uncertain (margin {margin[i]:.2f})" for i in rows]
    with _ticks(progress, (KMEANS_ITERS + 2) * chunks) as tick:
        rows = mixed_select(
            source, margin, np.asarray(suggested), n, labelled, exclude, seed=seed, tick=tick
        )
    return rows, [f"typical of an uncertain group (margin {margin[i]:.2f})" for i in rows]


@contextmanager
def _ticks(show: bool, total: int) -> Iterator[Callable[[], None] | None]:
    """A progress bar's one-step update over ``total`` chunk reads, or None."""
    if not show:
        yield None
        return
    bar = Progress(total, "select")
    try:
        yield lambda: bar.update(1)
    finally:
        bar.close()


def _classify(
    source: EmbeddingSource, support: torch.Tensor, labels: torch.Tensor, k: int, tau: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PAWS-NN of every row, chunk by chunk: ``(class (N,), probability (N,), margin (N,))``."""
    top, conf, margin = [], [], []
    for _, x in source.chunks():
        p = snn_classify(x, support, labels, k, tau)
        values, classes = p.max(dim=1)
        top.append(classes.numpy())
        conf.append(values.numpy())
        margin.append(margins(p).numpy())
    return np.concatenate(top), np.concatenate(conf), np.concatenate(margin)


# --------------------------------------------------------------------------------------------
# The two ways in.


def suggest_from_run(
    path: str | Path,
    n: int,
    strategy: str | None = None,
    unlabeled: str | Path | None = None,
    overrides: list[str] | None = None,
    device: torch.device | None = None,
    seed: int = 0,
    scratch: Path | None = None,
    progress: bool = True,
    space: str = "trunk",
) -> Suggestions:
    """Suggest ``n`` images to label next from a trained run (see the module's doc).

    Args:
        path: run directory or checkpoint (a run means its final model); a label-free run's
            (``loss.objective: simclr``) is a cold start in its embedding.
        n: how many images.
        strategy: one of :data:`STRATEGIES` (default: ``coverage``; for a label-free run,
            :data:`LABEL_FREE_STRATEGY`).
        unlabeled: a folder of candidate images (default: the run's own unlabelled set).
        overrides: config overrides (e.g. ``data.root=...`` to find the labelled set).
        device: compute device (default: the CPU).
        seed: seed of k-means and random choices.
        scratch: folder for the embeddings of very large pools (default: a temporary one).
        progress: show progress.
        space: the embedding the geometric strategies (:data:`GEOMETRIC`) choose in,
            ``"trunk"`` or ``"head"``; PAWS-NN's classes and margins always come from the
            run's ``eval.features``.
    """
    if space not in SPACES:
        raise UserError(f"unknown space '{space}': choose one of {', '.join(SPACES)}")
    device = device or torch.device("cpu")
    cfg, net, state = rundir.restore_model(path, overrides)
    cfg = on_disk(cfg)
    net.to(device)
    try:
        data = load_datasets(cfg)
    except UserError as e:
        raise UserError(
            f"cannot rebuild the run's labelled set ({e}); set data paths with --set"
        ) from e
    label_free = cfg.loss.objective == "simclr"
    if label_free:
        data = without_labels(data)
    loading = Loading.of(cfg, data)
    if unlabeled is not None:
        pool = file_pool(unlabeled, data.labeled, loading)
    else:
        pool = own_pool(data, cfg, loading)
    check_n(n, pool)
    if label_free:
        return _suggest_label_free(
            net, pool, n, strategy, cfg, device, seed, scratch, progress, space
        )
    strategy = strategy or "coverage"
    features = cfg.eval.features
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        both = (net, data.labeled, pool, cfg, loading, device)
        labelled, source = _embed_both(*both, features, tmp, progress)
        y = torch.from_numpy(np.asarray(data.labeled.labels, dtype=np.int64))
        top, conf, margin = _classify(source, labelled, y, len(data.classes), cfg.eval.tau)
        where = space if strategy in GEOMETRIC else features
        if where != features:
            labelled, source = _embed_both(*both, space, tmp, progress)
        rows, reasons = choose(
            strategy, source, n, labelled, pool.labelled, margin, top, seed, progress
        )
        known = KnownScore.from_config(cfg)
        if known.features != where:
            labelled, source = _embed_both(*both, known.features, tmp, progress)
        new = new_class_groups(source, labelled, y, known, len(data.classes), pool.labelled, seed)
    picks = [
        _pick(int(i), r, data.classes[top[i]], float(conf[i]), new) for i, r in zip(rows, reasons)
    ]
    where = space if strategy in GEOMETRIC else features
    return Suggestions(pool, picks, strategy, f"the run's {where} embedding", list(data.classes))


def _pick(i: int, reason: str, guess: str, confidence: float, new: NewGroups) -> Suggestion:
    """A suggestion: PAWS-NN's guess, or ``new:<k>`` for an image of no labelled class."""
    k = int(new.group[i])
    if not k:
        return Suggestion(i, guess, confidence, reason)
    why = f"matches no labelled class (known score {new.scores[i]:.2f} < {new.threshold:.2f})"
    return Suggestion(i, f"new:{k}", None, f"{why}; {reason}", new.sizes[k])


def _suggest_label_free(
    net: torch.nn.Module,
    pool: Pool,
    n: int,
    strategy: str | None,
    cfg: Config,
    device: torch.device,
    seed: int,
    scratch: Path | None,
    progress: bool,
    space: str,
) -> Suggestions:
    """The first labels, chosen in a label-free run's embedding (``loss.objective: simclr``):
    a cold start with learnt features, by :data:`LABEL_FREE_STRATEGY` unless another is asked
    for."""
    strategy = strategy or LABEL_FREE_STRATEGY
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        _, source = _embed_both(net, None, pool, cfg, pool.loading, device, space, tmp, progress)
        rows, reasons = choose(
            strategy, source, n, None, pool.labelled, seed=seed, progress=progress
        )
    picks = [Suggestion(int(i), None, None, r) for i, r in zip(rows, reasons)]
    return Suggestions(pool, picks, strategy, f"the label-free run's {space} embedding")


def _embed_both(
    net: torch.nn.Module,
    labelled: ImageSet | None,
    pool: Pool,
    cfg: Config,
    loading: Loading,
    device: torch.device,
    features: str,
    tmp: str,
    progress: bool,
) -> tuple[torch.Tensor | None, EmbeddingSource]:
    """The (L, D) ``features`` embeddings of the labelled images (None without them) and the
    (N, D) source of the candidates, each with its own scratch folder."""
    folder = Path(tmp) / features
    (folder / "labelled").mkdir(parents=True, exist_ok=True)
    args = (cfg, loading, device, features)
    lab = None
    if labelled is not None:
        stored = embed_pool(net, labelled, *args, folder / "labelled", progress=False)
        lab = stored.take(np.arange(len(stored)))
    source = embed_pool(net, pool.images, *args, folder, progress=progress)
    return lab, source


def _cold_model(cfg: Config, kind: str, channels: int) -> tuple[torch.nn.Module, str, str]:
    """The label-free features of a cold start: ``(model, features argument, description)``."""
    if kind == "auto":
        kind = "encoder" if cfg.model.weights else "pixels"
    if kind == "pixels":
        return PixelFeatures(), "head", "pixels"
    arch = Architecture.from_config(cfg, channels)
    net = build_network(arch, cfg.run.seed, cfg.model.weights)
    what = (
        f"the {cfg.model.encoder} backbone from {cfg.model.weights}"
        if cfg.model.weights
        else (f"a randomly initialised {cfg.model.encoder}")
    )
    return net, "trunk", what


def suggest_cold(
    cfg: Config,
    n: int,
    unlabeled: str | Path | None = None,
    strategy: str | None = None,
    features: str = "auto",
    device: torch.device | None = None,
    seed: int = 0,
    scratch: Path | None = None,
    progress: bool = True,
) -> Suggestions:
    """Suggest a first batch of ``n`` images with no trained run (see the module's doc).

    Args:
        cfg: the config: its encoder, evaluation view and normalisation; its dataset's
            training set is the pool without ``unlabeled``; the images of its
            ``data.labels_file`` or ``data.labeled`` count as labelled.
        n: how many images.
        unlabeled: a folder of candidate images.
        strategy: ``typiclust``, ``coverage``, ``kcenter`` or ``random`` (default:
            :data:`COLD_STRATEGY`).
        features: one of :data:`COLD_FEATURES` (``auto``: the encoder when ``model.weights``
            is set, else pixels).
        device: compute device (default: the CPU).
        seed: seed of k-means and random choices.
        scratch: folder for the embeddings of very large pools.
        progress: show progress.
    """
    if features not in COLD_FEATURES:
        raise UserError(f"unknown features '{features}': choose one of {', '.join(COLD_FEATURES)}")
    device = device or torch.device("cpu")
    strategy = strategy or COLD_STRATEGY
    d = cfg.data
    has_labels = bool(d.labels_file or (d.dataset == "folder" and d.labeled))
    data: Datasets | None = None
    if unlabeled is None or has_labels:
        data = load_datasets(on_disk(cfg if has_labels else no_labels(cfg)))
    if unlabeled is not None:
        files = expand_images([unlabeled])
        from paws.data.images import is_grey

        channels = d.channels or (1 if is_grey(files) else 3)
        loading = (
            Loading.of(cfg, data)
            if data is not None
            else Loading(channels, *normalisation(cfg, "folder", channels), workers=d.workers)
        )
        pool = file_pool(unlabeled, data.labeled if has_labels and data else None, loading)
    else:
        assert data is not None
        loading = Loading.of(cfg, data)
        pool = own_pool(data, cfg, loading)
        if not has_labels:
            pool.labelled[:] = False
    check_n(n, pool)
    model, which, what = _cold_model(cfg, features, loading.channels)
    model.to(device)
    with tempfile.TemporaryDirectory(dir=scratch) as tmp:
        labelled, source = _embed_both(
            model,
            data.labeled if has_labels and data else None,
            pool,
            cfg,
            loading,
            device,
            which,
            tmp,
            progress,
        )
        rows, reasons = choose(
            strategy, source, n, labelled, pool.labelled, seed=seed, progress=progress
        )
    picks = [Suggestion(int(i), None, None, r) for i, r in zip(rows, reasons)]
    return Suggestions(pool, picks, strategy, what)


def describe(s: Suggestions) -> dict[str, Any]:
    """Counts for the command's summary line."""
    groups = Counter(p.suggested or "" for p in s.picks)
    return {"images": len(s.picks), "pool": len(s.pool.images), "groups": dict(groups)}
