"""paws: PAWS semi-supervised learning (Assran et al., 2021) as a library and a command.

The method lives in :mod:`paws.method`; :mod:`paws.pretrain` pre-trains, :mod:`paws.after`
evaluates by soft nearest neighbours, tightens and fine-tunes, and :func:`load` opens a trained
model for prediction and embedding (:mod:`paws.apply`). The ``paws`` command wraps them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from paws.apply.predictor import Predictor

__version__ = "0.1.0"
__all__ = ["load", "train", "suggest", "__version__"]


def load(path: Any, device: Any = "auto", support: Any = None) -> Predictor:
    """Open a trained model: an export folder (``paws export``), a checkpoint or a run directory.

    Returns a :class:`paws.apply.predictor.Predictor` with ``.predict(images, top_k=...)``,
    ``.predict_proba(images)`` and ``.embed(images, features="head" | "trunk")``; images are
    paths, folders, PIL images or tensors. ``support`` is a ``<class>/<image>`` folder that a
    pre-trained model classifies against instead of its own labelled images (see
    :func:`paws.apply.load.load`).
    """
    from paws.apply.load import load as _load  # imported here so that `import paws` stays cheap

    return _load(path, device=device, support=support)


def train(
    config: Any = None,
    overrides: list[str] | None = None,
    out: Any = "runs/paws",
    init: Any = None,
) -> dict[str, Any]:
    """Pre-train as ``paws train`` does: ``config`` is a YAML file or recipe name (default:
    the Fashion-MNIST recipe), ``overrides`` are ``key=value`` settings, ``out`` the run
    directory, ``init`` a run to start from (a labelling loop's next round).

    Returns the run's summary: ``{"status", "step", "eval", ...}`` (``eval`` as
    ``eval.json``). Example: ``paws.train(overrides=["data.labeled=photos/labelled",
    "data.unlabeled=photos/all", "data.dataset=folder"], out="runs/photos")``.
    """
    from paws.config import load_config
    from paws.pretrain.train import train as _train

    return _train(load_config(config, list(overrides or [])), out, init=init)


def suggest(run: Any, n: int, out: Any = None, strategy: str | None = None) -> Any:
    """The ``n`` images to label next from a trained run, as ``paws suggest RUN -n N``;
    written as a CSV to fill in when ``out`` is given. Returns the
    :class:`paws.labelling.records.Suggestions` (``.picks``: index, suggested class,
    confidence, reason; ``.rows(folder)``: the CSV's rows)."""
    from paws.labelling.suggest import suggest_from_run

    s = suggest_from_run(run, n, strategy=strategy, progress=False)
    if out is not None:
        s.write(out)
    return s
