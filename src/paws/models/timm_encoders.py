"""Any timm model as an encoder trunk: ``model.encoder: timm:<name>``.

timm is optional (``pip install 'paws-ssl[timm]'``) and imported only when a ``timm:`` encoder is
checked, built or given weights. The trunk is ``timm.create_model(name, pretrained=False,
num_classes=0, in_chans=C, ...)``: its pooled features, (N, C, H, W) to (N, num_features), grey
input through timm's own ``in_chans``. Models that support it get ``dynamic_img_size=True``, so
that one vision transformer takes the large and the small crops of multi-crop: timm interpolates
the position embeddings to each input size. Their ``patch_size`` and ``img_size`` (the nominal
side, which sets the position-embedding grid) are options, from ``model.patch_size`` and
``model.img_size``; any other timm keyword argument (``drop_path_rate``, ``act_layer``, ...)
comes from ``model.timm_kwargs``.

The trunk's output size is what the model returns, not ``num_features``: with
``num_classes=0`` many families (MobileNetV3, GhostNet, LCNet, EfficientViT, HGNetV2) still
apply their head's last convolution or linear layer, so their pooled features have
``head_hidden_size`` channels. Where a timm model lacks that attribute, one forward pass at
build time measures it.

Weights never come from the hub: :meth:`TimmEncoder.match_state_dict` fits a plain timm
``state_dict()`` (read from a local file, ``model.weights``) to the trunk with timm's own rules:
the family's checkpoint filter (position embeddings resampled to the trunk's grid, patch
embeddings to its patch size), the first convolution adapted to the input channels
(``adapt_input_conv``: summed for grey input), and the classifier left out.

Tested families (tests/test_timm_families.py): ResNet, RegNet, MobileNetV3, EfficientNet, ConvNeXt,
GhostNet, LCNet, EfficientViT, HGNetV2, ViT, DeiT, Swin; other timm models that end in pooled
features work the same way.
"""

from __future__ import annotations

import difflib
import sys
from typing import Any

import torch
import torch.nn as nn

from paws.errors import UserError, first_line

__all__ = ["PREFIX", "check", "create", "output_size", "TimmEncoder"]

PREFIX = "timm:"

# Keys with a model.* knob of their own; the others are model.timm_kwargs.<key>.
_OWN_KEYS = ("patch_size", "img_size")

# Key prefixes that wrappers put in front of a timm model's own keys in saved files.
_WRAPPERS = ("module.", "encoder.", "backbone.", "model.", "net.")


def _timm() -> Any:
    """The timm module, or a one-line error saying how to install it."""
    try:
        import timm
    except ImportError as e:
        raise UserError(
            f"timm encoders (model.encoder: {PREFIX}<name>) need timm: pip install 'paws-ssl[timm]'"
        ) from e
    return timm


def check(name: str) -> None:
    """Raise a one-line :class:`UserError` (with the nearest names) unless timm has a model
    called ``name`` (``vit_small_patch16_224``, or with a tag: ``resnet18.a1_in1k``)."""
    timm = _timm()
    if name and timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.5)
    hint = (
        f"did you mean {', '.join(PREFIX + c for c in close)}?"
        if close
        else "timm.list_models() lists the names"
    )
    raise UserError(f"unknown timm model '{name}' (model.encoder: {PREFIX}{name}); {hint}")


def create(
    name: str, in_channels: int = 3, small_images: bool = False, **options: Any
) -> TimmEncoder:
    """A timm model without classifier, freshly initialised (never pretrained weights).

    Args:
        name: a timm model name (:func:`check`).
        in_channels: 1 for grayscale, 3 for colour images (timm's ``in_chans``).
        small_images: must be False: timm models have no paws small-image stem (a ViT on small
            images takes ``patch_size`` and ``img_size`` instead).
        **options: timm keyword arguments: ``patch_size``, ``img_size`` and
            ``model.timm_kwargs``.

    Returns:
        A :class:`TimmEncoder`, (N, in_channels, H, W) to (N, num_features).
    """
    check(name)
    if small_images:
        raise UserError("timm encoders have no small-image stem: a ViT takes patch_size, img_size")
    timm = _timm()
    kwargs = dict(pretrained=False, num_classes=0, in_chans=in_channels, **options)
    try:
        try:
            model = timm.create_model(name, **{"dynamic_img_size": True, **kwargs})
        except TypeError as e:
            if "dynamic_img_size" not in str(e) or "dynamic_img_size" in options:
                raise
            model = timm.create_model(name, **kwargs)  # a CNN: takes any size already
    except TypeError as e:
        key = next((k for k in options if repr(k) in str(e)), None)
        if key is None:
            raise
        raise UserError(f"{_knob(key)} does not apply to {PREFIX}{name} ({first_line(e)})") from e
    except (ValueError, AssertionError, KeyError, RuntimeError) as e:
        if not options:
            raise
        shown = ", ".join(f"{k}={v!r}" for k, v in options.items())
        raise UserError(
            f"timm cannot build {PREFIX}{name} with {shown}: {first_line(e)}; check model."
            "timm_kwargs, model.patch_size and model.img_size"
        ) from e
    return TimmEncoder(model, in_channels)


def _knob(key: str) -> str:
    """The config key a timm keyword argument comes from."""
    return f"model.{key}" if key in _OWN_KEYS else f"model.timm_kwargs.{key}"


def output_size(model: nn.Module, in_channels: int = 3) -> int:
    """F, the size of the pooled features a timm model made with ``num_classes=0`` returns:
    its ``head_hidden_size`` (the head's last layer before the classifier, which many families
    keep), or, where timm has none, measured by one forward pass of a blank image in eval mode
    (no running statistic or random state changes)."""
    size = getattr(model, "head_hidden_size", None)
    if isinstance(size, int) and size > 0:
        return size
    side = getattr(getattr(model, "patch_embed", None), "img_size", None)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    h, w = tuple(side) if side is not None else tuple(cfg.get("input_size", (3, 224, 224))[1:])
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, in_channels, int(h), int(w), device=device))
    finally:
        model.train(was_training)
    return int(_pooled(out).shape[1])


def _pooled(out: Any) -> torch.Tensor:
    """``out`` when it is (N, F) pooled features, else a one-line error."""
    if not torch.is_tensor(out) or out.ndim != 2:
        shape = tuple(out.shape) if torch.is_tensor(out) else type(out).__name__
        raise UserError(
            f"the timm model returns {shape}, not pooled (N, F) features: leave out "
            "model.timm_kwargs that change its pooling (global_pool, features_only)"
        )
    return out


class TimmEncoder(nn.Module):
    """A timm model without classifier as a paws trunk.

    Args:
        model: a timm model made with ``num_classes=0``, so that it returns pooled features.
        in_channels: its input channels (for the forward pass that may measure F).

    Attributes:
        model: the timm model (its ``state_dict()`` keys are timm's, under ``model.``).
        num_features: F, the size of what the model returns (:func:`output_size`).
    """

    def __init__(self, model: nn.Module, in_channels: int = 3):
        super().__init__()
        self.model = model
        self.num_features = output_size(model, in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) images to (N, F) pooled features."""
        self._check_size(x.shape[-2:])
        return _pooled(self.model(x))

    def _check_size(self, size: torch.Size) -> None:
        """A one-line error for an image size a patch embedding cannot take (timm asserts)."""
        embed = getattr(self.model, "patch_embed", None)
        patch = getattr(embed, "patch_size", None)
        if patch is None or getattr(embed, "dynamic_img_pad", False):
            return
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        h, w = int(size[0]), int(size[1])
        img = getattr(embed, "img_size", None)
        if getattr(embed, "strict_img_size", False) and img is not None and (h, w) != tuple(img):
            raise UserError(
                f"this timm model takes only {img[0]}x{img[1]} images, got {h}x{w}: set "
                "views.large_size and views.small_size to it, or model.img_size"
            )
        if h % patch[0] or w % patch[1]:
            raise UserError(
                f"image side {h}x{w} is not a multiple of the ViT patch size {patch[0]}: make "
                "views.large_size and views.small_size multiples of it, or set model.patch_size"
            )

    def match_state_dict(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Fit a plain timm ``state_dict()`` (keys possibly under ``module.``, ``model.``, ...)
        to this trunk: the family's checkpoint filter, the first convolution adapted to the
        input channels; tensors the trunk lacks (the classifier) or of another shape are left
        out.

        Returns:
            The matching tensors under this module's own keys (``model.<timm key>``).
        """
        from timm.models import adapt_input_conv

        target = self.model.state_dict()
        state = {_unwrap(k, target): v for k, v in state.items() if torch.is_tensor(v)}
        # The checkpoint filter of the model's family is timm's own rule for fitting its
        # checkpoints to a model of other sizes (e.g. a 224 px ViT's position embeddings).
        family = sys.modules.get(type(self.model).__module__)
        filter_fn = getattr(family, "checkpoint_filter_fn", None)
        if filter_fn is not None:
            state = filter_fn(state, self.model)
        first = self.model.pretrained_cfg.get("first_conv") or ()
        for conv in [first] if isinstance(first, str) else first:
            key = f"{conv}.weight"
            if key in state and key in target and state[key].shape[1] != target[key].shape[1]:
                state[key] = adapt_input_conv(int(target[key].shape[1]), state[key])
        return {
            f"model.{k}": v for k, v in state.items() if k in target and target[k].shape == v.shape
        }


def _unwrap(key: str, known: dict[str, Any]) -> str:
    """``key`` without the wrapper prefixes in front of it, unless it is a key as it is."""
    while key not in known:
        prefix = next((p for p in _WRAPPERS if key.startswith(p)), None)
        if prefix is None:
            break
        key = key[len(prefix) :]
    return key
