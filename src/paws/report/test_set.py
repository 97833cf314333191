"""What the report draws from a run's test images: a t-SNE map of their embeddings and a grid
of them with their predictions. Both re-load the test images the run's config names and its
final model (:func:`paws.rundir.model_file`); t-SNE comes from scikit-learn (the optional
``report`` extra).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from paws import runtime
from paws.apply.embedding import embed_images
from paws.data.images import read_image
from paws.data.loaders import Loading
from paws.data.sources import load_datasets
from paws.errors import UserError
from paws.report.figures import INSTALL, plot_grid
from paws.rundir import RunRecord, restore

__all__ = ["test_view", "tsne_map", "prediction_grid"]


def test_view(run: RunRecord, data: Any, cache: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(config, model, datasets) of a run, loading each distinct dataset once; the model is the
    one the run means, a PAWS model or a classifier (its student)."""
    ckpt = run.model
    if not ckpt.is_file():
        raise UserError(f"no {ckpt.name} in the run directory")
    restored = restore(ckpt)
    cfg, model = restored.cfg, restored.net
    if data is None:
        key = json.dumps(run.config.get("data", {}), sort_keys=True) + str(cfg.views.large_size)
        if key not in cache:
            cache[key] = load_datasets(cfg)
        data = cache[key]
    if data.test is None:
        raise UserError("the run's dataset has no test set")
    device = runtime.device_for(cfg.run.device if cfg.run.device != "cuda" else "auto")
    return cfg, model.to(device), data


def tsne_map(
    run: RunRecord, cfg: Any, model: Any, data: Any, points: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """2-D t-SNE of up to ``points`` test embeddings (the run's PAWS-NN features)."""
    try:
        from sklearn.manifold import TSNE
    except ImportError as e:
        raise UserError(f"paws report needs scikit-learn for the t-SNE map: {INSTALL}") from e

    n = len(data.test)
    rng = np.random.default_rng(seed)
    index = np.sort(rng.choice(n, size=min(points, n), replace=False))
    device = next(model.parameters()).device
    subset = data.test.subset(index)
    emb = embed_images(
        model,
        subset,
        cfg,
        Loading.of(cfg, data),
        device,
        progress=True,
        desc=f"embed {run.name}",
    )
    emb = emb.cpu().numpy().astype(np.float64)
    emb /= np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-12)
    perplexity = float(min(30.0, max(2.0, (len(index) - 1) / 3.0)))
    xy = TSNE(
        n_components=2, perplexity=perplexity, init="pca", learning_rate="auto", random_state=seed
    ).fit_transform(emb)
    return xy, subset.labels


def _display_images(images: Any, index: np.ndarray, channels: int) -> list[np.ndarray]:
    """Test images at ``index`` as (H, W) or (H, W, 3) uint8 arrays for display."""
    out = []
    for i in index:
        if images.images is not None:
            a = images.images[int(i)].numpy()
            a = a[0] if a.shape[0] == 1 else np.transpose(a, (1, 2, 0))
        else:
            a = np.asarray(read_image(images.files[int(i)], channels))
        out.append(a)
    return out


def prediction_grid(
    run: RunRecord, data: Any, count: int, seed: int
) -> tuple[RunRecord, bytes] | str:
    """The image grid of a run, or why it cannot be drawn."""
    p = run.predictions
    if not p:
        return "no predictions.json"
    if len(p["labels"]) != len(data.test) or list(p["classes"]) != list(data.classes):
        return "predictions.json does not match the test set the config names"
    rng = np.random.default_rng([seed, 1])
    index = rng.choice(len(data.test), size=min(count, len(data.test)), replace=False)
    labels = np.asarray(p["labels"])[index]
    if not np.array_equal(labels, data.test.labels[index]):
        return "predictions.json's labels differ from the test set's"
    pictures = _display_images(data.test, index, data.channels)
    preds = np.asarray(p["predictions"])[index]
    return run, plot_grid(run, pictures, labels, preds, list(p["classes"]))
