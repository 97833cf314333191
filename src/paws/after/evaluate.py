"""Accuracy of a model: PAWS-NN for pre-trained models (Appendix A), and classifiers.

PAWS-NN compares every query with every labelled image (tau 0.1, no augmentation, centre crop)
and takes the class of highest probability under ``snn``. Supports are processed in chunks with
a streaming softmax, so memory stays bounded for any number of supports and queries. A
classifier (fine-tuned, or the supervised baseline) is scored on the same centre crops.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from paws.apply.embedding import embed_images
from paws.config import Config
from paws.data.images import ImageSet
from paws.data.loaders import Loading, eval_batches
from paws.data.sources import Datasets
from paws.method.known_score import KnownScore, detection_metrics
from paws.method.snn import snn_classify
from paws.models import PAWSModel

__all__ = [
    "scores",
    "accuracy",
    "balanced_accuracy",
    "snn_probs",
    "paws_nn",
    "unknown_detection",
    "classifier_probs",
    "classifier_eval",
    "classifier_accuracy",
]


def accuracy(probs: torch.Tensor, labels: torch.Tensor, k: int = 1) -> float:
    """Top-k accuracy in percent. probs: (N, K); labels: (N,)."""
    k = min(k, probs.shape[1])
    top = probs.topk(k, dim=1).indices.cpu()
    return 100.0 * float((top == labels.view(-1, 1).cpu()).any(dim=1).float().mean())


def balanced_accuracy(confusion: np.ndarray) -> float:
    """Mean per-class recall in percent, over the classes with test images (rows of the
    (K, K) confusion matrix: true classes)."""
    confusion = np.asarray(confusion, dtype=np.float64)
    per_class = confusion.sum(axis=1)
    present = per_class > 0
    return float(100.0 * np.mean(np.diag(confusion)[present] / per_class[present]))


def scores(probs: torch.Tensor, labels: torch.Tensor) -> dict[str, Any]:
    """How well (N, K) ``probs`` answer (N,) ``labels``: ``{"top1", "top5", "balanced_top1"}``
    in percent, ``"predictions"`` (the arg-max, a list) and ``"confusion"`` ((K, K) counts,
    true classes in rows, a list of lists)."""
    k = probs.shape[1]
    pred = probs.argmax(dim=1).cpu()
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (labels.cpu().numpy(), pred.numpy()), 1)
    return {
        "top1": accuracy(probs, labels, 1),
        "top5": accuracy(probs, labels, 5),
        "balanced_top1": balanced_accuracy(confusion),
        "predictions": pred.tolist(),
        "confusion": confusion.tolist(),
    }


def snn_probs(
    model: PAWSModel,
    data: Datasets,
    cfg: Config,
    device: torch.device,
    queries: ImageSet,
    progress: bool = False,
) -> torch.Tensor:
    """PAWS-NN class probabilities of ``queries`` against the labelled set (evaluation views,
    ``eval.features``, ``eval.tau``): (N, K) float32."""
    args = (cfg, Loading.of(cfg, data), device)
    sup = embed_images(model, data.labeled, *args, progress=progress, desc="embed supports")
    qry = embed_images(model, queries, *args, progress=progress, desc="embed queries")
    labels = torch.from_numpy(data.labeled.labels)
    k = len(data.classes)
    return snn_classify(qry, sup, labels, k, cfg.eval.tau, cfg.eval.chunk_size).float().cpu()


def paws_nn(
    model: PAWSModel,
    data: Datasets,
    cfg: Config,
    device: torch.device,
    queries: ImageSet | None = None,
    progress: bool = False,
) -> dict:
    """PAWS-NN accuracy of ``queries`` (default: the test set) with the labelled set as support.

    Returns:
        ``{"top1", "top5", "balanced_top1", "num_support", "num_query", "features",
        "predictions", "labels", "confusion"}`` (accuracies in percent; balanced top-1 is the
        mean recall of the classes present; predictions and labels as lists).
    """
    queries = queries if queries is not None else data.test
    if queries is None:
        raise ValueError("no query images: the dataset has no test set")
    probs = snn_probs(model, data, cfg, device, queries, progress)
    y = torch.from_numpy(queries.labels)
    s = scores(probs, y)
    return {
        **{key: s[key] for key in ("top1", "top5", "balanced_top1")},
        "num_support": len(data.labeled),
        "num_query": len(queries),
        "features": cfg.eval.features,
        "predictions": s["predictions"],
        "labels": y.tolist(),
        "confusion": s["confusion"],
    }


def unknown_detection(
    model: PAWSModel,
    data: Datasets,
    cfg: Config,
    device: torch.device,
    unknown: ImageSet,
    progress: bool = False,
) -> dict[str, float | int]:
    """How well the known score (:mod:`paws.method.known_score`) tells the test images (of
    the support classes) from ``unknown`` images (of classes outside them).

    Returns:
        ``{"auroc", "fpr_at_95_tpr", "threshold", "known_flagged", "unknown_flagged",
        "num_known", "num_unknown"}``: the threshold calibrated on the labelled images and the
        shares (percent) of test and unknown images it calls unknown.
    """
    if data.test is None:
        raise ValueError("no test set: the known images of the comparison")
    known_score = KnownScore.from_config(cfg)
    args = (cfg, Loading.of(cfg, data), device, known_score.features)
    sup = embed_images(model, data.labeled, *args, progress=progress, desc="embed supports")
    known = embed_images(model, data.test, *args, progress=progress, desc="embed test images")
    other = embed_images(model, unknown, *args, progress=progress, desc="embed unknown images")
    chunk = cfg.eval.chunk_size
    if known_score.uses_graph and len(data.unlabeled):
        pool = data.unlabeled.subset(known_score.graph_pool(len(data.unlabeled)))
        unl = embed_images(model, pool, *args, progress=progress, desc="embed unlabelled images")
        labels = torch.from_numpy(np.asarray(data.labeled.labels, dtype=np.int64))
        graph = known_score.graph(sup.cpu(), labels, unl.cpu())
        s_known, s_other = graph.query(known).numpy(), graph.query(other).numpy()
        threshold = graph.threshold
    else:
        s_known = known_score.scores(known, sup, chunk).numpy()
        s_other = known_score.scores(other, sup, chunk).numpy()
        threshold = known_score.threshold(sup, chunk)
    return {
        **detection_metrics(s_known, s_other),
        "threshold": threshold,
        "known_flagged": float(100.0 * np.mean(s_known < threshold)),
        "unknown_flagged": float(100.0 * np.mean(s_other < threshold)),
        "num_known": len(s_known),
        "num_unknown": len(s_other),
    }


@torch.no_grad()
def classifier_probs(
    model: torch.nn.Module, images: ImageSet, cfg: Config, data: Datasets, device: torch.device
) -> torch.Tensor:
    """Class probabilities of a classifier ((N, C, H, W) to (N, K) logits) on centre-cropped
    images: (N, K) float32 on the CPU. The model is left in eval mode."""
    model.eval()
    batches = eval_batches(images, cfg.views, Loading.of(cfg, data), device, cfg.eval.batch_size)
    return torch.cat([model(x).float().softmax(dim=1).cpu() for x, _ in batches])


def classifier_eval(
    model: torch.nn.Module, data: Datasets, cfg: Config, device: torch.device
) -> dict[str, Any]:
    """A classifier on the test set, with the keys of :func:`paws_nn` (``features`` is
    ``"classifier"``, ``num_support`` the labelled images it was trained with)."""
    probs = classifier_probs(model, data.test, cfg, data, device)
    y = torch.from_numpy(data.test.labels)
    s = scores(probs, y)
    return {
        **s,
        "num_support": len(data.labeled),
        "num_query": len(y),
        "features": "classifier",
        "labels": y.tolist(),
    }


def classifier_accuracy(
    model: torch.nn.Module, data: Datasets, cfg: Config, device: torch.device
) -> dict[str, float | int]:
    """Test accuracy (percent) of a classifier: ``{"top1", "top5", "balanced_top1",
    "num_query"}``."""
    ev = classifier_eval(model, data, cfg, device)
    return {key: ev[key] for key in ("top1", "top5", "balanced_top1", "num_query")}
