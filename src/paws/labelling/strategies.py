"""Which images to label next, as pure functions of embeddings and class probabilities.

Embeddings are rows of unit length (cosine geometry, the space PAWS-NN classifies in), read
from an :class:`EmbeddingSource`: a tensor in memory, or a float16 memmap on disk for sets too
large for memory, in chunks. No function here holds more than a chunk of distances at a time or
anything of size N x N: k-center greedy keeps one (N,) vector of distances to the nearest
centre, k-means its (n, D) centres and one pass over the chunks an iteration.

- :func:`k_center_greedy`: coverage, the image farthest from everything chosen or labelled, n
  times (Sener & Savarese 2018); picks outliers first.
- :func:`kmeans_select`: coverage by typical images, the image nearest each of n k-means
  centres, the labelled images held as fixed centres (TypiClust-like; better for small budgets).
- :func:`typiclust_select`: TypiClust (Hacohen et al. 2022), in each of n k-means clusters
  (several k-means++ restarts, the lowest inertia kept) the row of highest typicality, the
  inverse mean distance to its nearest neighbours within the cluster: dense regions first.
- :func:`margins`, :func:`least_margin`: uncertainty of PAWS-NN, the gap between its two most
  probable classes.
- :func:`mixed_select`: typical images of uncertain regions, spread over the suggested classes.
- :func:`random_select`: uniformly at random, for comparison.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

__all__ = [
    "EmbeddingSource",
    "TensorSource",
    "MemmapSource",
    "unit_rows",
    "k_center_greedy",
    "Clusters",
    "kmeans_clusters",
    "kmeans_select",
    "typicality",
    "typiclust_select",
    "margins",
    "least_margin",
    "mixed_select",
    "random_select",
]

Tick = Callable[[], None] | None


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """(N, D) rows scaled to unit length (float32; zero rows stay zero)."""
    x = x.float()
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


class EmbeddingSource:
    """(N, D) unit-length embeddings read in chunks of ``chunk`` rows."""

    chunk: int = 65536

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def dim(self) -> int:
        raise NotImplementedError

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """(stop - start, D) float32 rows."""
        raise NotImplementedError

    def take(self, index: np.ndarray) -> torch.Tensor:
        """(len(index), D) float32 rows at ``index``."""
        raise NotImplementedError

    def chunks(self) -> Iterator[tuple[int, torch.Tensor]]:
        """``(start, (n, D) float32 rows)`` over the whole source, in order."""
        for start in range(0, len(self), self.chunk):
            yield start, self.rows(start, min(start + self.chunk, len(self)))


class TensorSource(EmbeddingSource):
    """Embeddings held in memory: an (N, D) tensor of unit rows."""

    def __init__(self, x: torch.Tensor, chunk: int = 65536):
        self.x, self.chunk = x.float(), chunk

    def __len__(self) -> int:
        return len(self.x)

    @property
    def dim(self) -> int:
        return int(self.x.shape[1])

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.x[start:stop]

    def take(self, index: np.ndarray) -> torch.Tensor:
        return self.x[torch.from_numpy(np.asarray(index, dtype=np.int64))]


class MemmapSource(EmbeddingSource):
    """Embeddings in a float16 file on disk (``np.memmap``), read ``chunk`` rows at a time.

    Args:
        path: the file (written by :meth:`create`, or opened to read).
        n: rows.
        dim: D.
        chunk: rows read at a time.
        mode: ``"r"`` to read, ``"w+"`` to create.
    """

    def __init__(self, path: str | Path, n: int, dim: int, chunk: int = 65536, mode: str = "r"):
        self.path, self.chunk = Path(path), chunk
        self.array = np.memmap(self.path, dtype=np.float16, mode=mode, shape=(n, dim))

    def __len__(self) -> int:
        return int(self.array.shape[0])

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def write(self, start: int, x: torch.Tensor) -> None:
        """Store (n, D) rows from ``start`` (as float16)."""
        self.array[start : start + len(x)] = x.detach().cpu().to(torch.float16).numpy()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.from_numpy(np.asarray(self.array[start:stop], dtype=np.float32))

    def take(self, index: np.ndarray) -> torch.Tensor:
        index = np.asarray(index, dtype=np.int64)
        order = np.argsort(index)
        out = np.empty((len(index), self.dim), dtype=np.float32)
        out[order] = self.array[index[order]]
        return torch.from_numpy(out)


_BLOCK = 1 << 22  # distances computed at a time (16 MiB of float32)


def _sq_dist(x: torch.Tensor, c: torch.Tensor, c_sq: torch.Tensor) -> torch.Tensor:
    """(n, m) squared distances of unit rows x (n, D) to centres c (m, D) with ``c_sq`` (m,)."""
    return ((1.0 + c_sq).unsqueeze(0) - 2.0 * (x @ c.T)).clamp_min_(0)


def _min_dist(x: torch.Tensor, centres: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n,) squared distance of each row of x (n, D) to its nearest centre (m, D), and (n,)
    which, in blocks of at most :data:`_BLOCK` distances (+inf and -1 without centres)."""
    best = torch.full((len(x),), float("inf"))
    which = torch.full((len(x),), -1, dtype=torch.long)
    if not len(centres):
        return best, which
    c_sq = (centres * centres).sum(dim=1)
    cols = max(1, min(len(centres), _BLOCK // 256))
    rows = max(1, _BLOCK // cols)
    for r in range(0, len(x), rows):
        for c in range(0, len(centres), cols):
            d, i = _sq_dist(x[r : r + rows], centres[c : c + cols], c_sq[c : c + cols]).min(dim=1)
            better = d < best[r : r + rows]
            best[r : r + rows][better] = d[better]
            which[r : r + rows][better] = i[better] + c
    return best, which


def _nearest(source: EmbeddingSource, centres: torch.Tensor, tick: Tick = None) -> torch.Tensor:
    """(N,) squared distance of every row to its nearest centre (+inf without centres)."""
    out = torch.full((len(source),), float("inf"))
    if not len(centres):
        return out
    for start, x in source.chunks():
        out[start : start + len(x)] = _min_dist(x, centres)[0]
        if tick is not None:
            tick()
    return out


def k_center_greedy(
    source: EmbeddingSource,
    n: int,
    labelled: torch.Tensor | None = None,
    exclude: np.ndarray | None = None,
    tick: Tick = None,
) -> np.ndarray:
    """Coverage: n times, the row farthest from every row chosen so far and every labelled one.

    Args:
        source: (N, D) unit rows.
        n: how many to choose (at most the rows not excluded).
        labelled: (L, D) unit embeddings already labelled (centres from the start), or None;
            without them the first choice is the row nearest the mean.
        exclude: (N,) bool, rows never to choose.
        tick: called once per chunk read (a progress bar).

    Returns:
        (n,) row indices in the order chosen.
    """
    min_dist = _nearest(source, labelled if labelled is not None else torch.zeros(0), tick)
    if exclude is not None:
        min_dist[torch.from_numpy(np.asarray(exclude, dtype=bool))] = float("-inf")
    n = min(n, int((min_dist != float("-inf")).sum()))
    chosen: list[int] = []
    if (labelled is None or not len(labelled)) and n > 0:
        mean = torch.zeros(source.dim)
        for _, x in source.chunks():
            mean += x.sum(dim=0)
        d = _nearest(source, (mean / len(source)).unsqueeze(0))
        d[min_dist == float("-inf")] = float("inf")
        first = int(d.argmin())
        chosen.append(first)
        _update(source, min_dist, first, tick)
    while len(chosen) < n:
        i = int(min_dist.argmax())
        chosen.append(i)
        _update(source, min_dist, i, tick)
    return np.asarray(chosen, dtype=np.int64)


def _update(source: EmbeddingSource, min_dist: torch.Tensor, i: int, tick: Tick) -> None:
    """Lower ``min_dist`` to the squared distance to row ``i``, which is then chosen."""
    c = source.take(np.array([i]))
    c_sq = (c * c).sum(dim=1)
    for start, x in source.chunks():
        part = min_dist[start : start + len(x)]
        torch.minimum(part, _sq_dist(x, c, c_sq)[:, 0], out=part)
        if tick is not None:
            tick()
    min_dist[i] = float("-inf")


def _kmeans_pp(x: torch.Tensor, n: int, fixed: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """(n, D) initial free centres by greedy k-means++ on the rows x (S, D), the ``fixed``
    (F, D) centres counting as chosen: each step draws 2 + log(n) candidates with probability
    proportional to the squared distance and keeps the one that lowers the total most (as
    scikit-learn does)."""
    d = _min_dist(x, fixed)[0] if len(fixed) else torch.full((len(x),), float("inf"))
    tries = 2 + int(np.log(max(n, 1)))
    centres = []
    for _ in range(n):
        w = d if torch.isfinite(d).all() and float(d.sum()) > 0 else torch.ones(len(x))
        cand = torch.multinomial(w, min(tries, len(x)), replacement=True, generator=gen)
        new = torch.minimum(d.unsqueeze(0), torch.cdist(x[cand], x).pow_(2))
        best = int(new.sum(dim=1).argmin())
        centres.append(x[cand[best]])
        d = new[best]
    return torch.stack(centres)


@dataclass
class Clusters:
    """k-means clusters of a source's rows, around free centres and fixed (labelled) ones.

    Attributes:
        typical: (m,) the row nearest each free centre among the rows that may be chosen, or
            -1 where the cluster has none.
        sizes: (m,) rows in each free cluster.
        member: (N,) the free cluster of each row, -1 for rows nearest a labelled embedding.
        inertia: the sum over rows of the squared distance to the nearest centre.
    """

    typical: np.ndarray
    sizes: np.ndarray
    member: np.ndarray
    inertia: float = 0.0


def kmeans_clusters(
    source: EmbeddingSource,
    m: int,
    labelled: torch.Tensor | None = None,
    exclude: np.ndarray | None = None,
    iters: int = 10,
    seed: int = 0,
    sample: int = 20000,
    tick: Tick = None,
    restarts: int = 1,
) -> Clusters:
    """k-means with m free centres; the labelled embeddings are centres that never move, so
    the free ones settle where nothing is labelled yet. Initialised by greedy k-means++ on a
    random sample of at most ``sample`` rows, then ``iters`` Lloyd iterations over all rows,
    one pass over the chunks each, and a last pass to assign the rows.

    Args:
        source: (N, D) unit rows.
        m: free centres (at least 1).
        labelled: (L, D) unit embeddings already labelled, or None.
        exclude: (N,) bool, rows never chosen as typical (they still shape the clusters).
        iters: Lloyd iterations.
        seed: seed of the sample and of k-means++.
        sample: rows k-means++ starts from.
        tick: called once per chunk read.
        restarts: k-means++ starts, each run for ``iters`` Lloyd iterations on the sample;
            the one of lowest inertia there starts the iterations over all rows, so that the
            clusters depend less on the seed at little more cost.
    """
    N = len(source)
    ok = np.ones(N, dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    fixed = labelled.float() if labelled is not None else torch.zeros(0, source.dim)
    rng = np.random.default_rng(seed)
    start = np.sort(rng.choice(N, min(N, max(sample, m)), replace=False))
    free = _best_start(source.take(start), min(m, len(start)), fixed, seed, iters, restarts)
    _lloyd(source, fixed, free, ok, iters, tick)
    member = np.full(N, -1, dtype=np.int64)
    _, counts, _, best_i, inertia = _assign(source, fixed, free, ok, tick, member)
    return Clusters(best_i.numpy(), counts.numpy().astype(np.int64), member, inertia)


def _lloyd(
    source: EmbeddingSource,
    fixed: torch.Tensor,
    free: torch.Tensor,
    ok: np.ndarray,
    iters: int,
    tick: Tick,
) -> None:
    """``iters`` Lloyd iterations, moving the free centres (m, D) in place."""
    for _ in range(iters):
        sums, counts, _, _, _ = _assign(source, fixed, free, ok, tick)
        moved = counts > 0
        free[moved] = sums[moved] / counts[moved].unsqueeze(1)


def _best_start(
    x: torch.Tensor, m: int, fixed: torch.Tensor, seed: int, iters: int, restarts: int
) -> torch.Tensor:
    """(m, D) starting centres from the sample x (S, D): greedy k-means++ seeded by ``seed``;
    with several restarts, each its own k-means++ followed by ``iters`` Lloyd iterations on
    the sample, the centres of lowest inertia on the sample kept (the first restart is the
    one-restart start, so more restarts never end worse on the sample)."""
    best, best_inertia = None, float("inf")
    sample = TensorSource(x)
    every = np.ones(len(x), dtype=bool)
    for r in range(max(1, restarts)):
        s = seed if r == 0 else int(np.random.default_rng([seed, r]).integers(2**62))
        free = _kmeans_pp(x, m, fixed, torch.Generator().manual_seed(s))
        if restarts <= 1:
            return free
        _lloyd(sample, fixed, free, every, iters, None)
        inertia = _assign(sample, fixed, free, every, None)[4]
        if inertia < best_inertia:
            best, best_inertia = free, inertia
    assert best is not None
    return best


def kmeans_select(
    source: EmbeddingSource,
    n: int,
    labelled: torch.Tensor | None = None,
    exclude: np.ndarray | None = None,
    iters: int = 10,
    seed: int = 0,
    sample: int = 20000,
    tick: Tick = None,
) -> np.ndarray:
    """Coverage by typical images: the row nearest each of n k-means centres
    (:func:`kmeans_clusters`, the labelled embeddings fixed centres).

    Args:
        source: (N, D) unit rows.
        n: clusters, and rows chosen.
        labelled: (L, D) unit embeddings already labelled, or None.
        exclude: (N,) bool, rows never chosen (they still shape the clusters).
        iters: Lloyd iterations.
        seed: seed of the sample and of k-means++.
        sample: rows k-means++ starts from.
        tick: called once per chunk read.

    Returns:
        (n,) row indices (fewer if fewer rows can be chosen), the largest cluster's first.
    """
    ok = np.ones(len(source), dtype=bool) if exclude is None else ~np.asarray(exclude, bool)
    n = min(n, int(ok.sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    c = kmeans_clusters(source, n, labelled, exclude, iters, seed, sample, tick)
    order = np.argsort(-c.sizes, kind="stable")
    chosen = [int(c.typical[j]) for j in order if c.typical[j] >= 0]
    if len(chosen) < n:  # empty clusters: the rows worst covered by the others
        chosen += _worst_covered(source, labelled, chosen, ok, n - len(chosen))
    return np.asarray(chosen, dtype=np.int64)


def typicality(x: torch.Tensor, ref: torch.Tensor, k: int, rows: int = 1024) -> torch.Tensor:
    """TypiClust's typicality: (n,) the inverse of the mean Euclidean distance of each row of
    x (n, D) to its k nearest rows of ref (m, D), the row itself left out (x's rows are rows
    of ref, each at distance 0 from itself), computed ``rows`` rows at a time."""
    if len(ref) < 2:  # a cluster of one row: it is the cluster's only choice
        return torch.ones(len(x))
    k = max(1, min(k, len(ref) - 1))
    out = torch.empty(len(x))
    for r in range(0, len(x), rows):
        d = torch.cdist(x[r : r + rows], ref)
        near = d.topk(k + 1, dim=1, largest=False).values[:, 1:]
        out[r : r + rows] = 1.0 / near.mean(dim=1).clamp_min(1e-12)
    return out


def typiclust_select(
    source: EmbeddingSource,
    n: int,
    labelled: torch.Tensor | None = None,
    exclude: np.ndarray | None = None,
    iters: int = 10,
    seed: int = 0,
    restarts: int = 5,
    neighbours: int = 20,
    sample: int = 20000,
    tick: Tick = None,
) -> np.ndarray:
    """TypiClust (Hacohen et al., ICML 2022): the most typical row of each of n k-means
    clusters, so that the first labels sit in dense regions, one a region.

    k-means (:func:`kmeans_clusters`, k-means++ ``restarts`` times, the lowest inertia kept,
    the labelled embeddings fixed centres) cuts the rows into n clusters; in each, the row
    chosen is the one of highest :func:`typicality` among the cluster's rows (the inverse mean
    distance to its ``neighbours`` nearest rows of the cluster; a cluster of more than
    ``sample`` rows is represented by ``sample`` of its rows, drawn with ``seed``, which
    bounds the work at ``sample``**2 distances a cluster).

    Args:
        source: (N, D) unit rows.
        n: clusters, and rows chosen.
        labelled: (L, D) unit embeddings already labelled, or None.
        exclude: (N,) bool, rows never chosen (still clustered, and neighbours).
        iters, seed, restarts: Lloyd iterations, seed and restarts of k-means.
        neighbours: k of the typicality.
        sample: most rows of a cluster its neighbours are searched among.
        tick: called once per chunk read.

    Returns:
        (n,) row indices (fewer if fewer rows can be chosen), the largest cluster's first.
    """
    ok = np.ones(len(source), dtype=bool) if exclude is None else ~np.asarray(exclude, bool)
    n = min(n, int(ok.sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    c = kmeans_clusters(source, n, labelled, exclude, iters, seed, sample, tick, restarts)
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for j in np.argsort(-c.sizes, kind="stable"):
        members = np.flatnonzero(c.member == j)
        if len(members) > sample:
            members = np.sort(rng.choice(members, sample, replace=False))
        mine = ok[members]
        if not mine.any():
            continue
        x = source.take(members)
        typ = typicality(x[torch.from_numpy(mine)], x, neighbours)
        chosen.append(int(members[mine][int(typ.argmax())]))
    if len(chosen) < n:  # empty clusters: the rows worst covered by the others
        chosen += _worst_covered(source, labelled, chosen, ok, n - len(chosen))
    return np.asarray(chosen, dtype=np.int64)


def _worst_covered(
    source: EmbeddingSource,
    labelled: torch.Tensor | None,
    chosen: list[int],
    ok: np.ndarray,
    count: int,
) -> list[int]:
    """``count`` rows that may be chosen, farthest from every labelled and chosen row first."""
    fixed = labelled.float() if labelled is not None else torch.zeros(0, source.dim)
    d = _nearest(source, torch.cat([fixed, source.take(np.asarray(chosen, dtype=np.int64))]))
    d[torch.from_numpy(~ok)] = float("-inf")
    d[torch.as_tensor(chosen, dtype=torch.long)] = float("-inf")
    return [int(i) for i in torch.argsort(d, descending=True)[:count]]


def _assign(
    source: EmbeddingSource,
    fixed: torch.Tensor,
    free: torch.Tensor,
    ok: np.ndarray,
    tick: Tick,
    member: np.ndarray | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """One pass: each row to its nearest centre (a fixed one where it is as near), written
    into ``member`` (N,) when given (-1 for a fixed centre).

    Returns:
        ``(sums (n, D), counts (n,), best distance (n,), best row (n,) or -1, inertia)`` of
        the free centres: the sum and number of their rows, and their nearest row that may be
        chosen; the inertia is the total squared distance of the rows to their centres.
    """
    n = len(free)
    sums, counts = torch.zeros(n, free.shape[1]), torch.zeros(n)
    best, best_i = torch.full((n,), float("inf")), torch.full((n,), -1, dtype=torch.long)
    inertia = 0.0
    for start, x in source.chunks():
        to_fixed = _min_dist(x, fixed)[0]
        dist, which = _min_dist(x, free)
        mine = dist < to_fixed
        inertia += float(torch.minimum(dist, to_fixed).double().sum())
        if member is not None:
            member[start : start + len(x)] = np.where(mine.numpy(), which.numpy(), -1)
        sums.index_add_(0, which[mine], x[mine])
        counts.index_add_(0, which[mine], torch.ones(int(mine.sum())))
        pick = mine & torch.from_numpy(ok[start : start + len(x)])
        if pick.any():
            cd, ci = dist[pick].numpy(), which[pick].numpy()
            cr = np.flatnonzero(pick.numpy()) + start
            o = np.lexsort((cr, cd, ci))  # by centre, then distance, then row
            first = o[np.r_[True, ci[o][1:] != ci[o][:-1]]]
            c, d, r = torch.from_numpy(ci[first]), torch.from_numpy(cd[first]), cr[first]
            better = d < best[c]
            best[c[better]] = d[better]
            best_i[c[better]] = torch.from_numpy(r[better.numpy()])
        if tick is not None:
            tick()
    return sums, counts, best, best_i, inertia


def margins(probs: torch.Tensor) -> torch.Tensor:
    """(N,) the gap between the two most probable classes of (N, K) probabilities (1 for a
    single class): small means PAWS-NN hesitates between two classes."""
    if probs.shape[1] < 2:
        return torch.ones(len(probs))
    top = probs.float().topk(2, dim=1).values
    return top[:, 0] - top[:, 1]


def least_margin(margin: np.ndarray, n: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """(n,) the rows of smallest margin, smallest first (ties in row order)."""
    m = np.asarray(margin, dtype=np.float64).copy()
    if exclude is not None:
        m[np.asarray(exclude, dtype=bool)] = np.inf
    n = min(n, int(np.isfinite(m).sum()))
    return np.argsort(m, kind="stable")[:n]


def mixed_select(
    source: EmbeddingSource,
    margin: np.ndarray,
    suggested: np.ndarray,
    n: int,
    labelled: torch.Tensor | None = None,
    exclude: np.ndarray | None = None,
    clusters: int = 3,
    seed: int = 0,
    tick: Tick = None,
) -> np.ndarray:
    """Typical images of uncertain regions, spread over the suggested classes.

    k-means cuts the rows into ``clusters * n`` groups away from the labelled embeddings
    (:func:`kmeans_clusters`). A group's doubt is the sum of (1 - margin) over its rows (many
    rows PAWS-NN is unsure of: a few outliers weigh little), its class the suggested class of
    its typical row (the one nearest its centre). The choice takes, class after class in
    turns, each class's most doubtful group not taken yet, and from it the typical row:
    never a near-duplicate, never an outlier on a class boundary.

    Args:
        source: (N, D) unit rows.
        margin: (N,) margins (:func:`margins`).
        suggested: (N,) the most probable class of each row.
        n: rows to choose.
        labelled: (L, D) unit embeddings already labelled, or None.
        exclude: (N,) bool, rows never chosen.
        clusters: groups per row chosen.
        seed: seed of k-means.
        tick: called once per chunk read.

    Returns:
        (n,) row indices (fewer if fewer rows can be chosen), in the order taken.
    """
    ok = np.ones(len(source), dtype=bool) if exclude is None else ~np.asarray(exclude, bool)
    n = min(n, int(ok.sum()))
    if n <= 0:
        return np.zeros(0, dtype=np.int64)
    c = kmeans_clusters(source, clusters * n, labelled, exclude, seed=seed, tick=tick)
    inside = c.member >= 0
    doubt = 1.0 - np.asarray(margin, dtype=np.float64)[inside]
    mass = np.bincount(c.member[inside], weights=doubt, minlength=len(c.sizes))
    groups = np.flatnonzero(c.typical >= 0)
    group_class = np.asarray(suggested)[c.typical[groups]]
    queues = []
    for k in np.unique(group_class):
        mine = groups[group_class == k]
        queues.append(list(mine[np.argsort(-mass[mine], kind="stable")]))
    queues.sort(key=lambda q: -mass[q[0]])  # the class of the most uncertain group first
    chosen: list[int] = []
    while len(chosen) < n and any(queues):
        for q in queues:
            if q and len(chosen) < n:
                chosen.append(int(c.typical[q.pop(0)]))
    if len(chosen) < n:  # fewer typical rows than asked: the least certain of the rest
        rest = ~ok
        rest[chosen] = True
        chosen += least_margin(margin, n - len(chosen), rest).tolist()
    return np.asarray(chosen, dtype=np.int64)


def random_select(
    count: int, n: int, exclude: np.ndarray | None = None, seed: int = 0
) -> np.ndarray:
    """(n,) rows drawn uniformly at random without replacement from ``count`` rows."""
    ok = np.arange(count) if exclude is None else np.flatnonzero(~np.asarray(exclude, bool))
    return np.random.default_rng(seed).choice(ok, min(n, len(ok)), replace=False)
