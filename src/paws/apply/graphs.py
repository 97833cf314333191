"""The graphs a predictor is exported as: torch modules from preprocessed images to class
probabilities and the embeddings they classify, which ONNX export writes out
(:mod:`paws.apply.onnx_export`) and which compute what :class:`paws.apply.predictor.Predictor`
computes."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["SoftNearestNeighbours", "ClassifierProbabilities", "Trunk"]


class SoftNearestNeighbours(nn.Module):
    """A pre-trained network with its support set: images to class probabilities.

    Args:
        net: a :class:`paws.models.PAWSModel` (``embed(x, features)``).
        supports: (M, D) support embeddings (normalised here).
        labels: (M,) int64 class positions.
        num_classes: K.
        tau: soft nearest-neighbour temperature.
        features: ``"head"`` or ``"trunk"``, the embedding the supports are in.
    """

    def __init__(
        self,
        net: nn.Module,
        supports: torch.Tensor,
        labels: torch.Tensor,
        num_classes: int,
        tau: float,
        features: str,
    ):
        super().__init__()
        self.net = net
        self.register_buffer("supports", F.normalize(supports.float(), dim=1))
        self.register_buffer("labels", labels.long().view(1, -1))
        self.num_classes, self.tau, self.features = int(num_classes), float(tau), features

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, S, S) to ``(probabilities (N, K), embeddings (N, D))``."""
        emb = self.net.embed(images, self.features)
        logits = F.normalize(emb, dim=1).div(self.tau) @ self.supports.T  # (N, M)
        weights = logits.softmax(dim=1)
        n = weights.shape[0]
        # Per-class sums as a scatter, not a product with (M, K) one-hot labels: those would
        # weigh M * K floats in an ONNX file (512 MB for ImageNet 10% with 1,000 classes).
        probs = weights.new_zeros(n, self.num_classes)
        return probs.scatter_add(1, self.labels.expand(n, -1), weights), emb


class ClassifierProbabilities(nn.Module):
    """A :class:`paws.models.Classifier`: images to softmax probabilities."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """images (N, C, S, S) to ``(probabilities (N, K), embeddings (N, D))``, the
        embeddings being the classifier's input."""
        emb = self.net.embed(images, "head")
        return self.net.classifier(emb).softmax(dim=1), emb


class Trunk(nn.Module):
    """The bare encoder of a network: images (N, C, S, S) to trunk features (N, F)."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (N, C, S, S) to features (N, F)."""
        return self.net.embed(images, "trunk")
