"""Encoders, heads and the networks built from them.

- :mod:`paws.models.encoders`: the registry of encoder trunks and initial weights from a file.
- :mod:`paws.models.timm_encoders`: any timm model as a trunk (``timm:<name>``; timm optional).
- :mod:`paws.models.networks`: heads, :class:`PAWSModel`, :class:`Classifier`, and the one
  builder, :func:`build_network`, from an :class:`Architecture` record.
"""

from paws.models.encoders import (
    ENCODERS,
    check_encoder,
    create_encoder,
    is_timm,
    load_encoder_weights,
    register_encoder,
)
from paws.models.networks import (
    Architecture,
    Classifier,
    PAWSModel,
    PredictionHead,
    ProjectionHead,
    build_network,
    load_weights,
)

__all__ = [
    "ENCODERS",
    "Architecture",
    "Classifier",
    "PAWSModel",
    "PredictionHead",
    "ProjectionHead",
    "build_network",
    "check_encoder",
    "create_encoder",
    "is_timm",
    "load_encoder_weights",
    "load_weights",
    "register_encoder",
]
