"""The images ``paws suggest`` chooses from: a folder, or a config's (or a run's) unlabelled
set, with the images labelled already marked (matched by resolved path for files and by name
for a built-in dataset's images), never to be suggested."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from paws.config import Config
from paws.data.images import ImageSet, expand_images
from paws.data.loaders import Loading
from paws.data.sources import Datasets
from paws.errors import UserError
from paws.labelling.records import Pool
from paws.progress import info

__all__ = ["Pool", "file_pool", "own_pool", "on_disk", "no_labels", "check_n"]


def file_pool(folder: str | Path, labelled: ImageSet | None, loading: Loading) -> Pool:
    """The images below ``folder``, those of ``labelled`` marked."""
    files = expand_images([folder])
    known = {f.resolve() for f in (labelled.files or [])} if labelled is not None else set()
    mask = np.array([f.resolve() in known for f in files], dtype=bool)
    root = Path(folder).expanduser()
    names = [str(f.relative_to(root)) for f in files]
    images = ImageSet(labels=-np.ones(len(files), dtype=np.int64), names=names, files=files)
    return Pool(images, mask, loading, builtin=False)


def own_pool(data: Datasets, cfg: Config, loading: Loading) -> Pool:
    """The unlabelled set of a config, the labelled images marked."""
    unl, lab = data.unlabeled, data.labeled
    if unl.files is not None:
        known = {f.resolve() for f in lab.files or []}
        mask = np.array([f.resolve() in known for f in unl.files], dtype=bool)
        return Pool(unl, mask, loading, builtin=False)
    names = set(lab.names)
    mask = np.array([name in names for name in unl.names], dtype=bool)
    return Pool(unl, mask, loading, builtin=cfg.data.dataset != "folder")


def on_disk(cfg: Config) -> Config:
    """A folder dataset's config that keeps its images as files (their paths go in the CSV)."""
    if cfg.data.dataset != "folder":
        return cfg
    return replace(cfg, data=replace(cfg.data, in_memory=False))


def no_labels(cfg: Config) -> Config:
    """A built-in dataset's config whose whole training set is the pool, with no labelled
    subset drawn (a cold start has none)."""
    d = replace(
        cfg.data,
        labels_per_class=None,
        num_labels=None,
        label_fraction=None,
        split_file=None,
        unlabeled_includes_labeled=True,
    )
    return replace(cfg, data=d)


def check_n(n: int, pool: Pool) -> None:
    """Refuse -n below 1 or a pool with nothing left to suggest; say when fewer are left."""
    if n < 1:
        raise UserError("-n must be at least 1")
    left = int((~pool.labelled).sum())
    if left == 0:
        raise UserError("every candidate image is labelled already: nothing to suggest")
    if n > left:
        info(f"only {left} candidate images are not labelled yet: suggesting all of them")
