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
__all__ = ["load", "__version__"]


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
