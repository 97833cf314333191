"""The networks: projection and prediction heads, the PAWS model, classifiers, and the one
builder that makes any of them from an :class:`Architecture` record.

An :class:`Architecture` is derived from a config once (:meth:`Architecture.from_config`, where
the small-image stem rule lives), saved in checkpoints and exports alike as plain values, and
turned into a freshly initialised network by :func:`build_network`; loading saved weights is the
caller's business.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn

from paws.config import TIMM_KEYS, TIMM_RESERVED
from paws.errors import UserError
from paws.models.encoders import check_encoder, create_encoder, is_timm, load_encoder_weights
from paws.progress import info

__all__ = [
    "Architecture",
    "build_network",
    "input_channels",
    "load_weights",
    "ProjectionHead",
    "PredictionHead",
    "PAWSModel",
    "Classifier",
]


@dataclass(frozen=True)
class Architecture:
    """Everything needed to rebuild a network, as JSON-friendly values.

    Attributes:
        encoder: a registered encoder name or ``timm:<name>`` (``model.encoder``).
        encoder_kwargs: its options, e.g. ``{"width": 48}``, or a timm ViT's
            ``{"patch_size": 4, "img_size": 32, "drop_path_rate": 0.1}`` (``model.patch_size``,
            ``model.img_size`` and ``model.timm_kwargs``).
        in_channels: 1 (grey) or 3 (colour).
        small_images: the encoder's small-image stem.
        proj_hidden: projection head hidden size.
        proj_out: projection head output size (the embedding).
        proj_layers: projection head linear layers.
        pred_head: a prediction head on the anchor side.
        pred_hidden: its hidden size.
        num_classes: K for a classifier, None for a PAWS model.
        classifier_on: where a classifier sits: ``"head"`` (the first layer of the projection
            head: fine-tuning) or ``"trunk"`` (the encoder output: the supervised baseline).
    """

    encoder: str
    encoder_kwargs: dict[str, Any] = field(default_factory=dict)
    in_channels: int = 3
    small_images: bool = False
    proj_hidden: int = 256
    proj_out: int = 256
    proj_layers: int = 3
    pred_head: bool = False
    pred_hidden: int = 512
    num_classes: int | None = None
    classifier_on: Literal["head", "trunk"] = "head"

    @classmethod
    def from_config(
        cls,
        cfg: Any,
        channels: int,
        num_classes: int | None = None,
        classifier_on: Literal["head", "trunk"] = "head",
    ) -> Architecture:
        """The network a :class:`paws.config.Config` describes for ``channels``-channel
        images; a classifier of ``num_classes`` outputs when given. The small-image stem of a
        built-in encoder is on when ``model.small_images`` says so, by default when
        ``views.large_size`` < 64; timm encoders have none (their options, such as a ViT's
        ``patch_size`` and ``img_size``, are in ``encoder_kwargs``)."""
        m = cfg.model
        small = m.small_images if m.small_images is not None else cfg.views.large_size < 64
        return cls(
            encoder=m.encoder,
            encoder_kwargs=_encoder_kwargs(m),
            in_channels=int(channels),
            small_images=bool(small) and not is_timm(m.encoder),
            proj_hidden=m.proj_hidden,
            proj_out=m.proj_out,
            proj_layers=m.proj_layers,
            pred_head=m.pred_head,
            pred_hidden=m.pred_hidden,
            num_classes=num_classes,
            classifier_on=classifier_on,
        )

    def to_dict(self) -> dict[str, Any]:
        """Plain values, for checkpoints and export manifests."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Any, where: str = "architecture") -> Architecture:
        """The record :meth:`to_dict` wrote, checked field by field (a file that holds it may
        be damaged or crafted), so that building the network cannot fail deep inside torch.

        Raises:
            UserError: naming ``where`` and the field: an unknown field, a missing encoder, a
                value of the wrong type or out of range.
        """
        if not isinstance(values, dict):
            raise UserError(f"{where} must be a mapping, got {type(values).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(str(k) for k in set(values) - names)
        if unknown:
            raise UserError(f"{where}: unknown fields {unknown}: written by a newer paws?")
        if "encoder" not in values:
            raise UserError(f"{where} names no encoder")
        for key, value in values.items():
            problem = _ARCH_CHECKS[key](value)
            if problem:
                raise UserError(f"{where}: {key} must be {problem}, got {value!r:.60}")
        check_encoder(values["encoder"])
        return cls(**values)

    def with_classifier(
        self, num_classes: int | None, on: Literal["head", "trunk"] = "head"
    ) -> Architecture:
        """The same network with (or, for None, without) a classifier."""
        return dataclasses.replace(self, num_classes=num_classes, classifier_on=on)


def _count(lo: int, hi: int, optional: bool = False) -> Callable[[Any], str | None]:
    """A check of a whole number in [lo, hi] (or None when ``optional``)."""

    def check(v: Any) -> str | None:
        if v is None and optional:
            return None
        ok = isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi
        return None if ok else f"a whole number in [{lo}, {hi}]" + (" or null" if optional else "")

    return check


def _kind_of(*types: type) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, types) else " or ".join(t.__name__ for t in types)


def _encoder_options(v: Any) -> str | None:
    """Encoder options are plain values, a built-in encoder's width within reason."""
    if not isinstance(v, dict) or not all(isinstance(k, str) for k in v):
        return "a mapping of option names to values"
    if any(not isinstance(x, (int, float, str, bool, list, type(None))) for x in v.values()):
        return "plain values"
    if "width" in v and _count(1, MAX_WIDTH)(v["width"]):
        return f"options with a width in [1, {MAX_WIDTH}]"
    if any(k in TIMM_RESERVED and k not in TIMM_KEYS for k in v):
        return f"options without {', '.join(k for k in TIMM_RESERVED if k not in TIMM_KEYS)}"
    return None


# The largest sizes an architecture record may ask for: far above any real network, far below
# what would exhaust memory while building it.
MAX_WIDTH = 4096
MAX_HEAD = 65536
_ARCH_CHECKS: dict[str, Callable[[Any], str | None]] = {
    "encoder": _kind_of(str),
    "encoder_kwargs": _encoder_options,
    "in_channels": lambda v: None if v in (1, 3) and not isinstance(v, bool) else "1 or 3",
    "small_images": _kind_of(bool),
    "proj_hidden": _count(1, MAX_HEAD),
    "proj_out": _count(1, MAX_HEAD),
    "proj_layers": _count(1, 16),
    "pred_head": _kind_of(bool),
    "pred_hidden": _count(1, MAX_HEAD),
    "num_classes": _count(1, 10**6, optional=True),
    "classifier_on": lambda v: None if v in ("head", "trunk") else "'head' or 'trunk'",
}


def _encoder_kwargs(m: Any) -> dict[str, Any]:
    """The options a ``model`` config section gives the encoder's factory: ``width`` (when not
    0) for a built-in encoder; for a timm one, the timm arguments among :data:`TIMM_KEYS` that
    are set and ``model.timm_kwargs``."""
    if is_timm(m.encoder):
        own = {k: getattr(m, k) for k in TIMM_KEYS if getattr(m, k, None) is not None}
        return {**own, **dict(getattr(m, "timm_kwargs", None) or {})}
    return {"width": m.width} if m.width else {}


def build_network(
    arch: Architecture,
    seed: int | None = None,
    weights: str | Path | None = None,
    channels_last: bool = False,
) -> nn.Module:
    """A freshly initialised network: a :class:`PAWSModel`, or a :class:`Classifier` when
    ``arch.num_classes`` is set (on the projection head's first layer, or on the trunk).

    Args:
        arch: what to build.
        seed: initialise from this seed, leaving torch's global generator as it was; None
            draws from the global generator.
        weights: initial encoder weights, a local torchvision/timm state dict
            (``model.weights``); tensors it lacks keep their initialisation (said in a line).
        channels_last: feed the trunk channels-last tensors (PAWS models).
    """
    if seed is None:
        return _build(arch, weights, channels_last)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(arch, weights, channels_last)


def _build(arch: Architecture, weights: str | Path | None, channels_last: bool) -> nn.Module:
    encoder = create_encoder(
        arch.encoder,
        in_channels=arch.in_channels,
        small_images=arch.small_images,
        **arch.encoder_kwargs,
    )
    if weights:
        missing, _ = load_encoder_weights(encoder, weights)
        if missing:
            info(
                f"encoder weights: {len(missing)} tensors not in {weights} keep their "
                "initialisation"
            )
    if arch.num_classes and arch.classifier_on == "trunk":
        return Classifier.on_trunk(encoder, int(arch.num_classes))
    projection = ProjectionHead(
        encoder.num_features, arch.proj_hidden, arch.proj_out, arch.proj_layers
    )
    prediction = PredictionHead(arch.proj_out, arch.pred_hidden) if arch.pred_head else None
    model = PAWSModel(encoder, projection, prediction, channels_last)
    if arch.num_classes:
        return Classifier.from_pretrained(model, int(arch.num_classes))
    return model


def input_channels(state_dict: dict[str, torch.Tensor]) -> int:
    """Input channels of the first convolution in saved weights (for records that do not say)."""
    for k, v in state_dict.items():
        if k.startswith("encoder.") and v.dim() == 4:
            return int(v.shape[1])
    raise UserError("cannot tell the input channels of these weights")


def load_weights(net: nn.Module, weights: Any, where: str) -> None:
    """Load saved ``weights`` into ``net`` after checking that they fit it, tensor by tensor:
    a damaged file is one line naming the first tensor that does not fit, not a wall of
    size mismatches.

    Args:
        net: the freshly built network.
        weights: its state dict as a file held it.
        where: the file, as messages name it.

    Raises:
        UserError: a missing or unknown tensor, a wrong shape or kind, or a value that is not
            finite.
    """
    fix = "the file is damaged, or was not written for this architecture"
    if not isinstance(weights, dict):
        raise UserError(f"{where}: the weights must be a mapping of tensors; {fix}")
    expected = net.state_dict()
    missing = [k for k in expected if k not in weights]
    unknown = [str(k) for k in weights if k not in expected]
    if missing or unknown:
        what = f"lacks '{missing[0]}'" if missing else f"has an unknown tensor '{unknown[0]}'"
        count = f" ({len(missing)} missing, {len(unknown)} unknown)"
        raise UserError(
            f"{where}: the weights do not fit the architecture: it {what}{count}; {fix}"
        )
    for key, want in expected.items():
        got = weights[key]
        if not torch.is_tensor(got):
            raise UserError(
                f"{where}: weight '{key}' is a {type(got).__name__}, not a tensor; {fix}"
            )
        if tuple(got.shape) != tuple(want.shape):
            raise UserError(
                f"{where}: weight '{key}' has shape {tuple(got.shape)}, the architecture needs "
                f"{tuple(want.shape)}; {fix}"
            )
        if got.is_floating_point() != want.is_floating_point() or got.is_complex():
            raise UserError(
                f"{where}: weight '{key}' is of dtype {got.dtype}, not {want.dtype}; {fix}"
            )
        if got.is_floating_point() and not bool(torch.isfinite(got).all()):
            raise UserError(f"{where}: weight '{key}' holds NaN or infinite values; {fix}")
    net.load_state_dict(weights)


# --------------------------------------------------------------------------------------------
# Heads and the models.


class ProjectionHead(nn.Module):
    """MLP projection head: ``layers`` linear layers, batch norm and ReLU on the hidden ones.

    The paper's head has 3 layers of 2048 (ImageNet) or 128 (CIFAR-10) units (Appendix A, C).
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 3):
        super().__init__()
        mods: OrderedDict[str, nn.Module] = OrderedDict()
        d = in_dim
        for i in range(1, layers):
            mods[f"fc{i}"] = nn.Linear(d, hidden_dim)
            mods[f"bn{i}"] = nn.BatchNorm1d(hidden_dim)
            mods[f"relu{i}"] = nn.ReLU(inplace=True)
            d = hidden_dim
        mods[f"fc{layers}"] = nn.Linear(d, out_dim)
        self.mlp = nn.Sequential(mods)
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PredictionHead(nn.Module):
    """2-layer MLP prediction head of Table 5: BN on its input and on the hidden layer."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(
            OrderedDict(
                [
                    ("bn0", nn.BatchNorm1d(dim)),
                    ("fc1", nn.Linear(dim, hidden_dim)),
                    ("bn1", nn.BatchNorm1d(hidden_dim)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("fc2", nn.Linear(hidden_dim, dim)),
                ]
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(x)


class PAWSModel(nn.Module):
    """Encoder trunk, projection head and optional prediction head.

    ``forward`` returns two embeddings of every view: ``h`` after the projection head and ``z``
    after the prediction head (``z is h`` without one). Following the official implementation
    (facebookresearch/suncet, ``src/paws_train.py``), anchors and anchor supports use ``z`` while
    targets and target supports use ``h``: the prediction head is an extra mapping on the anchor
    side only, as in BYOL, and targets stay in the projection space it predicts.

    Args:
        encoder: the trunk, (N, C, H, W) to (N, F).
        projection: the projection head, (N, F) to (N, D).
        prediction: the prediction head (N, D) to (N, D), or None.
        channels_last: feed the trunk channels-last tensors (faster on GPUs).
    """

    def __init__(
        self,
        encoder: nn.Module,
        projection: nn.Module,
        prediction: nn.Module | None,
        channels_last: bool = False,
    ):
        super().__init__()
        self.encoder = encoder
        self.projection = projection
        self.prediction = prediction
        self.channels_last = channels_last

    def trunk(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images to (N, F) trunk features."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x)

    def forward(self, views: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Embed a list of view batches, one trunk forward per run of equal-sized views.

        Args:
            views: tensors (N_i, C, H_i, W_i); consecutive tensors of the same size are
                concatenated and encoded together (so batch norm sees them as one batch).

        Returns:
            ``(h, z)``, each (sum N_i, D), rows in the order of ``views``.
        """
        if isinstance(views, torch.Tensor):
            views = [views]
        hs = []
        start = 0
        while start < len(views):
            end = start + 1
            while end < len(views) and views[end].shape[-2:] == views[start].shape[-2:]:
                end += 1
            x = torch.cat(list(views[start:end])) if end - start > 1 else views[start]
            hs.append(self.projection(self.trunk(x)))
            start = end
        h = torch.cat(hs) if len(hs) > 1 else hs[0]
        z = self.prediction(h) if self.prediction is not None else h
        return h, z

    def embed(self, x: torch.Tensor, features: str = "head") -> torch.Tensor:
        """Embeddings for evaluation: ``"head"`` (the space anchors are classified in) or
        ``"trunk"`` (encoder output). x: (N, C, H, W); returns (N, D)."""
        if features == "trunk":
            return self.trunk(x)
        return self.forward([x])[1]

    def embed_features(self, x: torch.Tensor, features: Sequence[str]) -> list[torch.Tensor]:
        """The embeddings named in ``features`` (``"trunk"``, ``"head"``) from one trunk
        pass: (N, F) or (N, D) each, in that order."""
        t = self.trunk(x)
        head = None
        if "head" in features:
            h = self.projection(t)
            head = self.prediction(h) if self.prediction is not None else h
        return [t if f == "trunk" else head for f in features]


class Classifier(nn.Module):
    """Encoder trunk, a head (possibly empty) and a linear classifier: images to logits.

    Two uses: the supervised baseline puts the classifier on the trunk (:meth:`on_trunk`, an
    empty head); fine-tuning puts it on the first layer of a pre-trained projection head
    (:meth:`from_pretrained`), the classifier of Appendix A: SimCLRv2 and PAWS fine-tune "from
    the first layer of the projection head", i.e. trunk -> fc1 -> bn1 -> relu1 of the
    pre-trained head, then a new linear layer to the K classes (initialised to zero). A head
    with a single layer has no hidden layer, so its first linear layer alone is kept.

    Args:
        encoder: the pre-trained trunk, (N, C, H, W) to (N, F).
        head: the first layer(s) of the projection head, (N, F) to (N, D), or nn.Identity.
        classifier: linear layer (N, D) to (N, K) logits.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module, classifier: nn.Linear):
        super().__init__()
        self.encoder = encoder
        self.head = head
        self.classifier = classifier

    @classmethod
    def from_pretrained(
        cls, model: PAWSModel, num_classes: int, zero_init: bool = True
    ) -> Classifier:
        """Wrap a pre-trained model's trunk and first head layer (shared, not copied) with a new
        classifier of ``num_classes`` outputs (zero weights and bias when ``zero_init``) on the
        model's device."""
        layers = list(model.projection.mlp.named_children())
        kept: OrderedDict[str, nn.Module] = OrderedDict()
        for name, module in layers:
            kept[name] = module
            if isinstance(module, nn.ReLU):
                break
        if not any(isinstance(m, nn.ReLU) for m in kept.values()):
            kept = OrderedDict(layers[:1])
        first = next(m for m in kept.values() if isinstance(m, nn.Linear))
        # On the pre-trained layer's device, so fine-tuning on a GPU finds every weight there.
        classifier = nn.Linear(first.out_features, num_classes, device=first.weight.device)
        if zero_init:
            nn.init.zeros_(classifier.weight)
            nn.init.zeros_(classifier.bias)
        return cls(model.encoder, nn.Sequential(kept), classifier)

    @classmethod
    def on_trunk(cls, encoder: nn.Module, num_classes: int) -> Classifier:
        """A linear classifier (PyTorch's default initialisation) on the trunk's features."""
        return cls(encoder, nn.Identity(), nn.Linear(encoder.num_features, num_classes))

    @property
    def num_classes(self) -> int:
        """K, the number of classes."""
        return self.classifier.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images to (N, K) logits."""
        return self.classifier(self.head(self.encoder(x)))

    def embed(self, x: torch.Tensor, features: str = "head") -> torch.Tensor:
        """``"head"``: the classifier's input (N, D); ``"trunk"``: encoder output (N, F)."""
        return self.embed_features(x, [features])[0]

    def embed_features(self, x: torch.Tensor, features: Sequence[str]) -> list[torch.Tensor]:
        """The embeddings named in ``features`` (``"trunk"``, ``"head"``) from one pass."""
        t = self.encoder(x)
        head = self.head(t) if "head" in features else None
        return [t if f == "trunk" else head for f in features]
