"""Multi-crop views: shapes, determinism, crop geometry, flips, colour distortion, eval crops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from paws.config import ViewsConfig
from paws.data.transforms import (
    BatchViews,
    _per_image,
    color_distort,
    eval_batch,
    multicrop_transform,
    resized_crop,
    support_transform,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _images(n: int = 4, c: int = 3, side: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, c, side, side), dtype=torch.uint8, generator=_gen(seed))


def _identity_views(**kw) -> ViewsConfig:
    """Views that change nothing: whole image, square, no flip, no colour, no grey, no blur."""
    base = dict(
        large_scale=[1.0, 1.0],
        small_scale=[1.0, 1.0],
        ratio=[1.0, 1.0],
        flip=False,
        color_strength=0.0,
        gray_prob=0.0,
        blur_prob=0.0,
    )
    return ViewsConfig(**{**base, **kw})


def _ramp(side: int, axis: int) -> torch.Tensor:
    """(1, 1, side, side) image whose value is the pixel's column (axis=-1) or row (axis=-2)."""
    r = torch.arange(side, dtype=torch.float64)
    img = r.view(1, -1).expand(side, side) if axis == -1 else r.view(-1, 1).expand(side, side)
    return img.reshape(1, 1, side, side).clone()


# --------------------------------------------------------------------------------------------
# Batch views.


@pytest.mark.parametrize("channels", [1, 3])
def test_multicrop_shapes_dtype_and_normalisation(channels):
    cfg = ViewsConfig(large_size=12, small_size=6, small_crops=3, blur_prob=0.5)
    mean, std = [0.5] * channels, [0.25] * channels
    views = BatchViews(cfg, mean, std).multicrop(_images(5, channels), _gen(0))
    assert len(views) == 2 + 3
    for v in views[:2]:
        assert v.shape == (5, channels, 12, 12)
    for v in views[2:]:
        assert v.shape == (5, channels, 6, 6)
    for v in views:
        assert v.dtype == torch.float32
        # Values in [0, 1] before normalisation: (x - 0.5) / 0.25 lies in [-2, 2].
        assert v.min() >= -2 - 1e-5 and v.max() <= 2 + 1e-5
    # The two large views are different augmentations of the same images.
    assert not torch.allclose(views[0], views[1])


def test_multicrop_without_small_crops():
    cfg = ViewsConfig(large_size=8, small_crops=0)
    views = BatchViews(cfg, [0.5], [0.5]).multicrop(_images(2, 1), _gen(0))
    assert [tuple(v.shape) for v in views] == [(2, 1, 8, 8), (2, 1, 8, 8)]


def test_identity_views_reproduce_the_normalised_image():
    x = _images(3, 3, 10)
    mean, std = [0.4, 0.5, 0.6], [0.2, 0.25, 0.3]
    views = BatchViews(_identity_views(large_size=10, small_size=10, small_crops=1), mean, std)
    out = views.multicrop(x, _gen(0))
    expected = (x.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(
        1, 3, 1, 1
    )
    for v in out:
        assert torch.allclose(v, expected, atol=1e-5)
    assert torch.allclose(views.support(x, 2, _gen(0)), torch.cat([expected, expected]), atol=1e-5)


def test_views_are_deterministic_from_the_generator_seed():
    cfg = ViewsConfig(large_size=10, small_size=6, small_crops=2, blur_prob=0.5)
    views = BatchViews(cfg, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])
    x = _images(6)
    a = views.multicrop(x, _gen(7))
    b = views.multicrop(x, _gen(7))
    c = views.multicrop(x, _gen(8))
    for va, vb in zip(a, b):
        assert torch.equal(va, vb)
    assert all(not torch.allclose(va, vc) for va, vc in zip(a, c))
    s1, s2 = views.support(x, 2, _gen(3)), views.support(x, 2, _gen(3))
    assert s1.shape == (12, 3, 10, 10) and torch.equal(s1, s2)


def test_support_views_stack_view_by_view():
    x = _images(3, 1, 8)
    views = BatchViews(_identity_views(large_size=8), [0.0], [1.0])
    out = views.support(x, 3, _gen(0))
    assert out.shape == (9, 1, 8, 8)
    for i in range(3):
        assert torch.allclose(out[3 * i : 3 * i + 3], x.float() / 255, atol=1e-6)


def test_view_does_not_modify_its_input():
    x = _images(2)
    before = x.clone()
    BatchViews(ViewsConfig(large_size=8), [0.5] * 3, [0.5] * 3).multicrop(x, _gen(0))
    assert torch.equal(x, before)


# --------------------------------------------------------------------------------------------
# Crops and flips.


def test_resized_crop_full_square_without_flip_is_identity():
    x = torch.rand(3, 3, 12, 12)
    out = resized_crop(x, 12, scale=(1, 1), ratio=(1, 1), flip=False, gen=_gen(0))
    assert torch.allclose(out, x, atol=1e-6)
    # Resizing the whole image: a smooth image is reproduced up to interpolation.
    smooth = _ramp(16, -1).float() / 15
    down = resized_crop(smooth, 8, scale=(1, 1), ratio=(1, 1), flip=False)
    assert torch.allclose(down, torch.nn.functional.interpolate(smooth, 8, mode="bilinear"))


def test_resized_crop_flip_mirrors():
    x = torch.rand(64, 1, 6, 6)
    out = resized_crop(x, 6, scale=(1, 1), ratio=(1, 1), flip=True, gen=_gen(1))
    same = torch.isclose(out, x, atol=1e-6).flatten(1).all(1)
    mirrored = torch.isclose(out, x.flip(-1), atol=1e-6).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 10 < int(mirrored.sum()) < 54  # about half of them


def test_resized_crop_area_and_aspect_ratio():
    side, size = 16, 8
    # Area 1/4, square: the crop is 8 x 8 px, sampled at 8 points, so one output pixel per input
    # pixel in both directions (a linear ramp advances by exactly 1).
    for axis in (-1, -2):
        out = resized_crop(_ramp(side, axis).repeat(5, 1, 1, 1), size, (0.25, 0.25), (1, 1), False)
        step = out.diff(dim=axis)
        assert torch.allclose(step, torch.ones_like(step), atol=1e-4)
        assert out.min() >= 0 and out.max() <= side - 1
    # Area 1/2, aspect ratio w/h = 2: a 16 px wide, 8 px tall crop.
    wide_x = resized_crop(_ramp(side, -1), size, (0.5, 0.5), (2, 2), False).diff(dim=-1)
    wide_y = resized_crop(_ramp(side, -2), size, (0.5, 0.5), (2, 2), False).diff(dim=-2)
    assert torch.allclose(wide_x, torch.full_like(wide_x, 2.0), atol=1e-4)
    assert torch.allclose(wide_y, torch.ones_like(wide_y), atol=1e-4)


def test_resized_crop_on_non_square_images_keeps_pixel_aspect_ratio():
    # A 8 x 16 (h x w) image, area 1/2 with ratio 1: an 8 x 8 px crop, spacing 1 px each way.
    x = _ramp(16, -1)[..., :8, :]
    y = _ramp(16, -2)[..., :8, :]
    ox = resized_crop(x, 8, (0.5, 0.5), (1, 1), False).diff(dim=-1)
    oy = resized_crop(y, 8, (0.5, 0.5), (1, 1), False).diff(dim=-2)
    assert torch.allclose(ox, torch.ones_like(ox), atol=1e-4)
    assert torch.allclose(oy, torch.ones_like(oy), atol=1e-4)


# --------------------------------------------------------------------------------------------
# Colour.


def test_color_distort_stays_in_unit_range():
    x = torch.rand(32, 3, 8, 8, generator=_gen(0))
    for seed in range(4):
        out = color_distort(x, strength=1.0, p_jitter=1.0, p_grey=0.5, gen=_gen(seed))
        assert out.shape == x.shape
        assert out.min() >= 0 and out.max() <= 1
        assert not torch.allclose(out, x)


def test_color_distort_grey_images_stay_one_channel():
    x = torch.rand(8, 1, 6, 6, generator=_gen(0))
    out = color_distort(x, strength=1.0, p_jitter=1.0, p_grey=1.0, gen=_gen(0))
    assert out.shape == (8, 1, 6, 6)
    assert out.min() >= 0 and out.max() <= 1
    assert not torch.allclose(out, x)


def test_color_distort_strength_zero_is_identity():
    x = torch.rand(4, 3, 5, 5)
    assert torch.equal(color_distort(x, 0.0, p_jitter=1.0, p_grey=0.0, gen=_gen(0)), x)
    grey = torch.rand(4, 1, 5, 5)
    # Grey images are never converted to grey, so only the jitter could change them.
    assert torch.equal(color_distort(grey, 0.0, p_jitter=1.0, p_grey=1.0, gen=_gen(0)), grey)
    # No jitter probability is the same as no strength.
    assert torch.equal(color_distort(x, 1.0, p_jitter=0.0, p_grey=0.0, gen=_gen(0)), x)


def test_color_distort_random_grey_is_luminance():
    x = torch.rand(4, 3, 5, 5)
    out = color_distort(x, 0.0, p_jitter=0.0, p_grey=1.0)
    lum = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for c in range(3):
        assert torch.allclose(out[:, c], lum, atol=1e-6)


def test_color_distort_brightness_range_follows_strength():
    # A constant grey image: contrast leaves it alone, brightness scales it by U[1-0.8s, 1+0.8s].
    x = torch.full((400, 1, 2, 2), 0.5)
    out = color_distort(x, strength=0.5, p_jitter=1.0, p_grey=0.0, gen=_gen(0))
    factor = out[:, 0, 0, 0] / 0.5
    assert factor.min() >= 0.6 - 1e-6 and factor.max() <= 1.4 + 1e-6
    assert factor.min() < 0.65 and factor.max() > 1.35
    # Images get their own factors.
    assert len(torch.unique(factor)) > 300


def test_color_distort_jitter_probability():
    x = torch.full((400, 1, 2, 2), 0.5)
    out = color_distort(x, strength=0.5, p_jitter=0.25, p_grey=0.0, gen=_gen(0))
    changed = (out[:, 0, 0, 0] != 0.5).float().mean().item()
    assert 0.15 < changed < 0.35


# --------------------------------------------------------------------------------------------
# Evaluation crops.


def test_eval_batch_centre_crop_without_resize():
    x = _images(2, 3, 16)[..., :, :]
    x = torch.cat([x, x[..., :8]], dim=-1)  # 16 x 24
    out = eval_batch(x, 8, crop_fraction=0.5)  # shorter side already 16: crop only
    assert out.shape == (2, 3, 8, 8) and out.dtype == torch.float32
    assert torch.allclose(out, x[..., 4:12, 8:16].float() / 255)


def test_eval_batch_resizes_shorter_side():
    x = torch.full((1, 1, 40, 20), 200, dtype=torch.uint8)
    out = eval_batch(x, 8, crop_fraction=0.8)  # 20 -> 10, 40 -> 20, centre 8 x 8
    assert out.shape == (1, 1, 8, 8)
    assert torch.allclose(out, torch.full_like(out, 200 / 255))
    wide = eval_batch(torch.rand(2, 3, 12, 30), 6)
    assert wide.shape == (2, 3, 6, 6)
    assert wide.min() >= 0 and wide.max() <= 1


# --------------------------------------------------------------------------------------------
# Per-image torchvision pipelines.


def _pil(mode: str, side: int = 20) -> Image.Image:
    rng = np.random.default_rng(0)
    shape = (side, side, 3) if mode == "RGB" else (side, side)
    return Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode=mode)


@pytest.mark.parametrize("mode,channels", [("RGB", 3), ("L", 1)])
def test_per_image_multicrop_and_support(mode, channels):
    cfg = ViewsConfig(large_size=12, small_size=6, small_crops=2, blur_prob=0.5)
    mean, std = [0.5] * channels, [0.5] * channels
    torch.manual_seed(0)
    views = multicrop_transform(cfg, channels, mean, std)(_pil(mode))
    assert [tuple(v.shape) for v in views] == [(channels, 12, 12)] * 2 + [(channels, 6, 6)] * 2
    for v in views:
        assert v.dtype == torch.float32 and v.min() >= -1 and v.max() <= 1
    assert not torch.equal(views[0], views[1])
    support = support_transform(cfg, channels, mean, std, num_views=3)(_pil(mode))
    assert [tuple(v.shape) for v in support] == [(channels, 12, 12)] * 3


def test_per_image_identity_pipeline_reproduces_the_image():
    img = _pil("RGB", 10)
    views = multicrop_transform(
        _identity_views(large_size=10, small_crops=0), 3, [0.0] * 3, [1.0] * 3
    )
    expected = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    for v in views(img):
        assert torch.allclose(v, expected, atol=1e-6)


def _jitter(pipeline: v2.Compose) -> v2.ColorJitter:
    for t in pipeline.transforms:
        if isinstance(t, v2.RandomApply) and isinstance(t.transforms[0], v2.ColorJitter):
            return t.transforms[0]
    raise AssertionError("no colour jitter in the pipeline")


def test_per_image_grey_pipeline_has_no_saturation_hue_or_random_grey():
    cfg = ViewsConfig(color_strength=1.0)
    colour = _per_image(cfg, 8, [0.5, 1.0], 3, [0.5] * 3, [0.5] * 3)
    grey = _per_image(cfg, 8, [0.5, 1.0], 1, [0.5], [0.5])
    assert _jitter(colour).saturation is not None and _jitter(colour).hue is not None
    assert _jitter(grey).saturation is None and _jitter(grey).hue is None
    assert _jitter(grey).brightness == pytest.approx((0.2, 1.8))
    assert _jitter(colour).hue == pytest.approx((-0.2, 0.2))
    assert any(isinstance(t, v2.RandomGrayscale) for t in colour.transforms)
    assert not any(isinstance(t, v2.RandomGrayscale) for t in grey.transforms)
