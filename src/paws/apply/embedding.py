"""Embedding a dataset's images with a network, through the evaluation view of training."""

from __future__ import annotations

import torch

from paws.config import Config
from paws.data.images import ImageSet
from paws.data.loaders import Loading, eval_batches
from paws.models import PAWSModel
from paws.progress import Progress

__all__ = ["embed_images"]


@torch.no_grad()
def embed_images(
    model: PAWSModel,
    images: ImageSet,
    cfg: Config,
    loading: Loading,
    device: torch.device,
    features: str | None = None,
    progress: bool = False,
    desc: str = "embed",
) -> torch.Tensor:
    """Embeddings of every image (evaluation view of ``cfg.views``), in order.

    Args:
        model: the model (left in the mode it was in).
        images: the images.
        cfg: the config (``views``, ``eval.batch_size``, ``eval.features``).
        loading: channels, normalisation and workers of the images.
        device: compute device.
        features: ``"head"`` or ``"trunk"`` (default: ``eval.features``).
        progress: show progress.
        desc: the progress label.

    Returns:
        (N, D) float32 on ``device``.
    """
    was_training = model.training
    model.eval()
    out: list[torch.Tensor] = []
    batches = eval_batches(images, cfg.views, loading, device, cfg.eval.batch_size)
    total = (len(images) + cfg.eval.batch_size - 1) // cfg.eval.batch_size
    bar = Progress(total, desc) if progress else None
    for x, _ in batches:
        out.append(model.embed(x, features or cfg.eval.features).float())
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    model.train(was_training)
    return torch.cat(out)
