"""Encoder trunks: a registry of architectures, and initial weights from a local file.

``create_encoder(name, in_channels=3, small_images=False, **kw)`` builds a trunk that maps
(N, C, H, W) images to (N, F) features and exposes ``num_features``. Registered encoders:

- ``resnet18``, ``resnet34``, ``resnet50``: torchvision ResNets with the ImageNet stem (7x7 conv,
  stride 2, max-pool) or, with ``small_images=True``, the CIFAR stem (3x3 conv, stride 1, no
  max-pool); ``width`` multiplies every stage's channels (ResNet-50 2x/4x of Table 2).
- ``wide_resnet28_2`` (other widen factors through ``width``): pre-activation
  WideResNet-28 without dropout (Appendix C).
- ``cnn_small``: a small VGG-style CNN that trains fast on a CPU.
- ``timm:<name>``: any timm model (:mod:`paws.models.timm_encoders`, timm installed apart).

Every encoder takes 1-channel (grayscale) or 3-channel input.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from paws.errors import UserError
from paws.models import timm_encoders

if TYPE_CHECKING:
    import torchvision

__all__ = [
    "ENCODERS",
    "register_encoder",
    "is_timm",
    "check_encoder",
    "create_encoder",
    "load_encoder_weights",
    "WideResNet",
    "SmallCNN",
]

ENCODERS: dict[str, Callable[..., nn.Module]] = {}


def register_encoder(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator adding an encoder factory to :data:`ENCODERS` under ``name``."""

    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ENCODERS[name] = factory
        return factory

    return add


def is_timm(name: str) -> bool:
    """Whether ``name`` (``model.encoder``) names a timm model: ``timm:<name>``."""
    return name.startswith(timm_encoders.PREFIX)


def check_encoder(name: str) -> None:
    """Raise a one-line :class:`UserError` (with the nearest name) unless ``name`` is a
    registered encoder or ``timm:<name>`` of a timm model (timm installed)."""
    if name in ENCODERS:
        return
    if is_timm(name):
        timm_encoders.check(name[len(timm_encoders.PREFIX) :])
        return
    close = difflib.get_close_matches(name, sorted(ENCODERS), n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UserError(
        f"unknown encoder '{name}' (model.encoder); {hint}choose one of: "
        f"{', '.join(sorted(ENCODERS))}, or {timm_encoders.PREFIX}<name> of a timm model"
    )


def create_encoder(
    name: str, in_channels: int = 3, small_images: bool = False, **kwargs: object
) -> nn.Module:
    """Build a registered encoder trunk, or a timm model's.

    Args:
        name: a key of :data:`ENCODERS`, or ``timm:<name>`` (:mod:`paws.models.timm_encoders`).
        in_channels: 1 for grayscale, 3 for colour images.
        small_images: use a stem for small inputs (e.g. 28x28 or 32x32) where the architecture
            has one.
        **kwargs: architecture options, e.g. ``width`` (ResNet width multiplier, CNN base
            channels, WideResNet widen factor); for timm, ``patch_size`` and ``img_size``.

    Returns:
        A module mapping (N, in_channels, H, W) to (N, module.num_features).
    """
    check_encoder(name)
    if is_timm(name):
        bare = name[len(timm_encoders.PREFIX) :]
        return timm_encoders.create(bare, in_channels, small_images, **kwargs)
    return ENCODERS[name](in_channels=in_channels, small_images=small_images, **kwargs)


# --------------------------------------------------------------------------------------------
# ResNets (torchvision), with a small-image stem and grayscale input.


class _TorchvisionResNet(nn.Module):
    def __init__(self, net: torchvision.models.ResNet, in_channels: int, small_images: bool):
        super().__init__()
        width = net.conv1.out_channels
        if small_images:
            net.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False)
        self.num_features = net.fc.in_features
        net.fc = nn.Identity()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def _widen_resnet(block_name: str, layers: Sequence[int], width: int) -> torchvision.models.ResNet:
    """torchvision ResNet with every stage ``width`` times wider (SimCLR's ResNet-50 (2x)).
    torchvision is imported here, not with the module: it takes seconds to import, and
    loading a model of another encoder should not pay for it."""
    import torchvision

    block = getattr(torchvision.models.resnet, block_name)
    net = torchvision.models.ResNet(block, list(layers))
    if width == 1:
        return net
    # torchvision's width_per_group widens only the bottleneck; widen the stem and stages too.
    net.inplanes = 64 * width
    net.conv1 = nn.Conv2d(3, 64 * width, 7, 2, 3, bias=False)
    net.bn1 = nn.BatchNorm2d(64 * width)
    for i, (planes, n) in enumerate(zip((64, 128, 256, 512), layers)):
        stride = 1 if i == 0 else 2
        setattr(net, f"layer{i + 1}", net._make_layer(block, planes * width, n, stride=stride))
    net.fc = nn.Linear(512 * width * block.expansion, 1000)
    for m in net.modules():  # the same initialisation torchvision applies
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net


@register_encoder("resnet18")
def resnet18(in_channels: int = 3, small_images: bool = False, width: int = 1) -> nn.Module:
    """ResNet-18 trunk (512 features times ``width``)."""
    net = _widen_resnet("BasicBlock", (2, 2, 2, 2), width)
    return _TorchvisionResNet(net, in_channels, small_images)


@register_encoder("resnet34")
def resnet34(in_channels: int = 3, small_images: bool = False, width: int = 1) -> nn.Module:
    """ResNet-34 trunk (512 features times ``width``)."""
    net = _widen_resnet("BasicBlock", (3, 4, 6, 3), width)
    return _TorchvisionResNet(net, in_channels, small_images)


@register_encoder("resnet50")
def resnet50(in_channels: int = 3, small_images: bool = False, width: int = 1) -> nn.Module:
    """ResNet-50 trunk (2048 features times ``width``; width 2 and 4 as in Table 2)."""
    net = _widen_resnet("Bottleneck", (3, 4, 6, 3), width)
    return _TorchvisionResNet(net, in_channels, small_images)


# --------------------------------------------------------------------------------------------
# WideResNet-28 (pre-activation, Zagoruyko & Komodakis 2016), without dropout (Appendix C).


class _WideBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, padding=1, bias=True)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=True)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return out + self.shortcut(x)


class WideResNet(nn.Module):
    """Pre-activation WideResNet trunk of depth 6n+4; 64*widen features."""

    def __init__(self, depth: int = 28, widen: int = 2, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise UserError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=True)
        layers, in_planes = [], widths[0]
        for planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(_WideBlock(in_planes, planes, stride if i == 0 else 1))
                in_planes = planes
            layers.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = layers
        self.bn = nn.BatchNorm2d(widths[3])
        self.num_features = widths[3]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        return F.adaptive_avg_pool2d(F.relu(self.bn(x)), 1).flatten(1)


@register_encoder("wide_resnet28_2")
def wide_resnet28_2(
    in_channels: int = 3, small_images: bool = True, width: int = 2, depth: int = 28
) -> nn.Module:
    """WideResNet-28-2 trunk (128 features), the CIFAR-10 encoder of Appendix C; ``width`` is
    the widen factor (2)."""
    return WideResNet(depth, width, in_channels)


# --------------------------------------------------------------------------------------------
# A small CNN for CPU runs.


class SmallCNN(nn.Module):
    """A 3x3 conv stem (w channels), then two stages of two 3x3 conv-BN-ReLU layers (2w and 4w
    channels), each after a 2x2 max-pool, and global average pooling: 4w features.

    Pooling right after the stem keeps most convolutions at a quarter of the input resolution,
    which is what makes it fast on a CPU. About 0.28M parameters at w = 32."""

    def __init__(self, in_channels: int = 1, width: int = 32):
        super().__init__()

        def block(c_in: int, c_out: int) -> list[nn.Module]:
            return [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
            ]

        w = width
        self.features = nn.Sequential(
            *block(in_channels, w),
            nn.MaxPool2d(2),
            *block(w, 2 * w),
            *block(2 * w, 2 * w),
            nn.MaxPool2d(2),
            *block(2 * w, 4 * w),
            *block(4 * w, 4 * w),
        )
        self.num_features = 4 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.features(x), 1).flatten(1)


@register_encoder("cnn_small")
def cnn_small(in_channels: int = 3, small_images: bool = True, width: int = 32) -> nn.Module:
    """Small fast CNN (4*width features) for CPU training on small images."""
    return SmallCNN(in_channels, width)


def load_encoder_weights(encoder: nn.Module, path: str | Path) -> tuple[list[str], list[str]]:
    """Initialise an encoder from a local torchvision or timm state dict.

    Accepts ``.safetensors`` or a PyTorch file (loaded with ``weights_only=True``), the tensors
    possibly nested under ``state_dict``, ``model`` or ``encoder``. A built-in encoder takes
    the keys without the usual prefixes (``module.``, ``encoder.``, ``backbone.``, ``model.``),
    ignores classifier keys (``fc.``, ``head.``, ``classifier.``), and sums RGB stem filters for
    1-channel input; a timm encoder fits a plain timm ``state_dict()`` with timm's own rules
    (:meth:`paws.models.timm_encoders.TimmEncoder.match_state_dict`).

    Returns:
        ``(missing, unexpected)`` key lists after matching.
    """
    path = Path(path)
    state = _read_weights(path)
    if isinstance(encoder, timm_encoders.TimmEncoder):
        try:
            cleaned = encoder.match_state_dict(state)
        except Exception as e:  # noqa: BLE001 - timm's filters fail on tensors they cannot fit
            raise UserError(f"cannot fit the encoder weights {path} to the timm model: {e}") from e
    else:
        cleaned = _match_builtin(encoder, state)
    if not cleaned:
        raise UserError(f"no tensor in {path} matches the encoder; is it the same architecture?")
    result = encoder.load_state_dict(cleaned, strict=False)
    return list(result.missing_keys), list(result.unexpected_keys)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (a one-line error for a missing or unreadable one)."""
    if not path.is_file():
        raise UserError(f"encoder weights file not found: {path}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file
        raise UserError(f"cannot read encoder weights {path}: {e}") from e
    for key in ("state_dict", "model", "encoder"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise UserError(f"cannot read encoder weights {path}: it holds no state dict")
    return state


def _match_builtin(encoder: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a torchvision/timm-style state dict that fit a built-in encoder."""
    target = encoder.state_dict()
    inner = "net." if any(k.startswith("net.") for k in target) else ""
    cleaned: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        for prefix in ("module.", "encoder.", "backbone.", "model.", "net."):
            if k.startswith(prefix):
                k = k[len(prefix) :]
        if k.split(".")[0] in ("fc", "head", "classifier"):
            continue
        k = inner + k
        if k in target and v.dim() == 4 and target[k].shape[1] == 1 and v.shape[1] == 3:
            v = v.sum(dim=1, keepdim=True)
        if k in target and target[k].shape == v.shape:
            cleaned[k] = v
    return cleaned
