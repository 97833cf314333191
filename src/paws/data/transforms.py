"""SimCLR augmentations with multi-crop, in two interchangeable forms.

- :class:`BatchViews` augments a whole uint8 batch ``(N, C, H, W)`` at once, on the tensor's
  device, with per-image random parameters drawn from a ``torch.Generator`` (so a step's views
  are a function of ``(seed, step)``). Used for datasets held in memory (Fashion-MNIST, CIFAR,
  small image folders): on a CPU it costs a few percent of a training step, where per-image PIL
  transforms in worker processes compete with the two compute threads. Under several processes
  a :class:`ShardGenerator` draws the parameters of the whole global batch and keeps this
  process's rows, so an image's views do not depend on the number of processes. The batch
  functions never wait for the device (no data-dependent branches), so on a GPU the next step's
  augmentation is queued while the current step computes.
- :func:`multicrop_transform` / :func:`support_transform` build ``torchvision.transforms.v2``
  pipelines applied per image in data-loader workers, for large images read from disk
  (ImageNet: each view cropped from the full-resolution file; ``data.disk_views``).

The evaluation view's resize and crop, :func:`eval_batch`, is the arithmetic of the one rule of
:mod:`paws.data.eval_view`.

Both follow SimCLR / PAWS: RandomResizedCrop (scale and size from the config), horizontal flip,
colour jitter of strength s (brightness, contrast, saturation 0.8s, hue 0.2s, applied with
probability 0.8 in random order), random grey (0.2), optional Gaussian blur (sigma in [0.1, 2]),
then normalisation. Grey (1-channel) images get brightness and contrast only.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from paws.config import ViewsConfig
from paws.data.images import to_grey

if TYPE_CHECKING:
    from torchvision.transforms import v2

__all__ = [
    "BatchViews",
    "ShardGenerator",
    "resized_crop",
    "color_distort",
    "eval_resize",
    "eval_batch",
    "multicrop_transform",
    "support_transform",
]


class ShardGenerator:
    """Random numbers for one shard of a global batch, independent of how it is sharded.

    Every draw is made for all ``total`` rows of the global batch (per view) from ``generator``,
    which is the same on every process, and this shard's ``rows`` are kept. An image's random
    augmentation thus depends on the seed, the step and its place in the global batch only.

    Args:
        generator: the step's CPU generator (identical on every process).
        total: rows of the global batch.
        rows: positions of this shard's rows in the global batch, in the shard's order.
    """

    def __init__(self, generator: torch.Generator, total: int, rows: Sequence[int] | torch.Tensor):
        self.generator, self.total = generator, total
        self.rows = torch.as_tensor(rows, dtype=torch.long)

    def rand(self, n: int) -> torch.Tensor:
        """(n,) uniform numbers for n = views x shard rows, laid out view by view."""
        views, rest = divmod(n, len(self.rows))
        if rest or not views:
            raise ValueError(f"{n} rows are not whole views of a {len(self.rows)}-row shard")
        return torch.rand(views, self.total, generator=self.generator)[:, self.rows].reshape(-1)


Random = torch.Generator | ShardGenerator | None


def _rand(n: int, gen: Random) -> torch.Tensor:
    if isinstance(gen, ShardGenerator):
        return gen.rand(n)
    return torch.rand(n, generator=gen)


def _uniform(n: int, lo: float, hi: float, gen: Random) -> torch.Tensor:
    return _rand(n, gen) * (hi - lo) + lo


def resized_crop(
    x: torch.Tensor,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float] = (3 / 4, 4 / 3),
    flip: bool = True,
    gen: Random = None,
) -> torch.Tensor:
    """Per-image RandomResizedCrop (+ horizontal flip) of a float batch, by affine resampling.

    Each image gets a crop of area fraction ~ U(scale) and log aspect ratio ~ U(log ratio), at a
    uniform position inside the image (sides clipped to the image), bilinearly resized to
    ``size`` x ``size``; with ``flip`` half the crops are mirrored.

    Args:
        x: (N, C, H, W) float images.
        size: output side.
        scale: (low, high) area fraction.
        ratio: (low, high) aspect ratio w/h.
        flip: random horizontal flip.
        gen: CPU generator (or shard generator) for the random parameters.

    Returns:
        (N, C, size, size).
    """
    n = x.shape[0]
    area = _uniform(n, scale[0], scale[1], gen)
    log_r = _uniform(n, math.log(ratio[0]), math.log(ratio[1]), gen)
    aspect = torch.exp(log_r) * x.shape[-2] / x.shape[-1]  # w/h in normalised units
    w = torch.sqrt(area * aspect).clamp(max=1.0)
    h = torch.sqrt(area / aspect).clamp(max=1.0)
    cx = (_rand(n, gen) * 2 - 1) * (1 - w)
    cy = (_rand(n, gen) * 2 - 1) * (1 - h)
    sign = torch.ones(n)
    if flip:
        sign = torch.where(_rand(n, gen) < 0.5, -1.0, 1.0)
    sx, sy, cx, cy = (t.to(device=x.device, dtype=x.dtype) for t in (w * sign, h, cx, cy))
    grid = _crop_grid(sx, sy, cx, cy, size)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def _crop_grid(
    sx: torch.Tensor, sy: torch.Tensor, cx: torch.Tensor, cy: torch.Tensor, size: int
) -> torch.Tensor:
    """(N, size, size, 2) sampling grid of axis-aligned crops: what ``F.affine_grid`` gives for
    ``theta = [[sx, 0, cx], [0, sy, cy]]`` (align_corners=False), as an outer sum of two
    coordinate lines instead of a batched matrix product (half of the augmentation's time)."""
    n = sx.shape[0]
    base = (torch.arange(size, device=sx.device, dtype=sx.dtype) * 2 + 1) / size - 1
    gx = sx.view(n, 1, 1) * base.view(1, 1, size) + cx.view(n, 1, 1)
    gy = sy.view(n, 1, 1) * base.view(1, size, 1) + cy.view(n, 1, 1)
    return torch.stack(torch.broadcast_tensors(gx, gy), dim=-1)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return x if x.shape[1] == 1 else to_grey(x)


def color_distort(
    x: torch.Tensor,
    strength: float,
    p_jitter: float = 0.8,
    p_grey: float = 0.2,
    gen: Random = None,
) -> torch.Tensor:
    """SimCLR colour distortion of a float batch in [0, 1], per-image random factors.

    Brightness and contrast factors ~ U[max(0, 1 - 0.8s), 1 + 0.8s] (torchvision's ColorJitter
    semantics), saturation likewise and hue ~ U[-0.2s, 0.2s] for colour images, applied in a
    random order (one order per call, factors per image) with probability ``p_jitter``; then
    random grey with probability ``p_grey``.

    Args:
        x: (N, C, H, W) float images in [0, 1], C in {1, 3}.
        strength: s.
        p_jitter: probability of jitter per image.
        p_grey: probability of grey per colour image.
        gen: CPU generator (or shard generator).

    Returns:
        (N, C, H, W) in [0, 1].
    """
    n, dev = x.shape[0], x.device
    colour = x.shape[1] == 3
    if strength > 0 and p_jitter > 0:
        apply = (_rand(n, gen) < p_jitter).float()
        s = 0.8 * strength
        factors = {
            name: _uniform(n, max(0.0, 1 - s), 1 + s, gen)
            for name in ("brightness", "contrast", "saturation")
        }
        factors["hue"] = _uniform(n, -0.2 * strength, 0.2 * strength, gen)
        ops = ["brightness", "contrast"] + (["saturation", "hue"] if colour else [])
        order = torch.randperm(len(ops), generator=_base(gen)).tolist()
        for i in order:
            op = ops[i]
            if op == "hue":
                shift = (factors["hue"] * apply * 2 * math.pi).to(dev, x.dtype)
                x = _on_rows(x, shift != 0, shift, _adjust_hue)
                continue
            f = (1 + (factors[op] - 1) * apply).to(dev, x.dtype).view(n, 1, 1, 1)
            if op == "brightness":
                x = x * f
            elif op == "contrast":
                m = _grey(x).mean(dim=(1, 2, 3), keepdim=True)
                x = (x - m) * f + m
            else:
                g = _grey(x)
                x = (x - g) * f + g
            x = x.clamp_(0, 1)
    if colour and p_grey > 0:
        grey = (_rand(n, gen) < p_grey).to(dev).view(n, 1, 1, 1)
        x = torch.where(grey, _grey(x).expand_as(x), x)
    return x


def _base(gen: Random) -> torch.Generator | None:
    """The generator itself: for draws shared by the whole batch (every shard the same)."""
    return gen.generator if isinstance(gen, ShardGenerator) else gen


def _on_rows(
    x: torch.Tensor,
    chosen: torch.Tensor,
    params: torch.Tensor,
    fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> torch.Tensor:
    """``fn(rows, their params)`` on the chosen rows of x, the others unchanged.

    On the CPU only the chosen rows are computed; on other devices every row is and the result
    is selected, because indexing by a boolean mask would wait for the device.
    """
    if x.device.type == "cpu":
        if not bool(chosen.any()):
            return x
        out = x.clone()
        out[chosen] = fn(x[chosen], params[chosen])
        return out
    return torch.where(chosen.view(-1, *[1] * (x.dim() - 1)), fn(x, params), x)


def _kornia():
    """kornia, imported on first use: it takes a second to import, and applying a model never
    augments."""
    import kornia

    return kornia


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    return _kornia().enhance.adjust_hue(x, shift)


def _blur(x: torch.Tensor, prob: float, gen: Random) -> torch.Tensor:
    n = x.shape[0]
    chosen = (_rand(n, gen) < prob).to(x.device)
    sigma = _uniform(n, 0.1, 2.0, gen).to(x.device, x.dtype)
    k = max(3, int(0.1 * x.shape[-1]) // 2 * 2 + 1)  # about 10% of the side, odd (SimCLR)
    return _on_rows(
        x,
        chosen,
        sigma,
        lambda rows, s: _kornia().filters.gaussian_blur2d(
            rows, (k, k), torch.stack([s, s], dim=1), border_type="reflect"
        ),
    )


class BatchViews:
    """Multi-crop views of uint8 batches, augmented as tensors on their device.

    Args:
        cfg: the views section of the config.
        mean: per-channel normalisation mean.
        std: per-channel normalisation std.
    """

    def __init__(self, cfg: ViewsConfig, mean: Sequence[float], std: Sequence[float]):
        self.cfg = cfg
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)

    def _normalise(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def view(self, x: torch.Tensor, size: int, scale: Sequence[float], gen: Random) -> torch.Tensor:
        """One augmented, normalised view of every image: (N, C, H, W) uint8 to
        (N, C, size, size) float32."""
        c = self.cfg
        x = x.float().div_(255)
        x = resized_crop(x, size, scale, c.ratio, c.flip, gen)
        x = color_distort(x, c.color_strength, c.color_prob, c.gray_prob, gen)
        if c.blur_prob > 0:
            x = _blur(x, c.blur_prob, gen)
        return self._normalise(x)

    def multicrop(self, x: torch.Tensor, gen: Random) -> list[torch.Tensor]:
        """``[large 1, large 2, small 1, ..., small M]`` views of a uint8 batch (N, C, H, W)."""
        c = self.cfg
        large = self.view(x.repeat(2, 1, 1, 1), c.large_size, c.large_scale, gen).chunk(2)
        views = list(large)
        if c.small_crops:
            small = self.view(x.repeat(c.small_crops, 1, 1, 1), c.small_size, c.small_scale, gen)
            views += list(small.chunk(c.small_crops))
        return views

    def support(self, x: torch.Tensor, num_views: int, gen: Random) -> torch.Tensor:
        """``num_views`` large views of each support image, stacked view by view:
        (num_views * N, C, large_size, large_size)."""
        c = self.cfg
        return self.view(x.repeat(num_views, 1, 1, 1), c.large_size, c.large_scale, gen)


def eval_resize(size: int, crop_fraction: float) -> int:
    """The shorter side an evaluation view is resized to before its centre ``size`` crop."""
    return int(round(size / crop_fraction))


def eval_batch(x: torch.Tensor, size: int, crop_fraction: float = 1.0) -> torch.Tensor:
    """Resize the shorter side to ``size / crop_fraction`` and centre-crop ``size``.

    Args:
        x: (N, C, H, W) uint8 or float in [0, 1].

    Returns:
        (N, C, size, size) float in [0, 1].
    """
    if x.dtype == torch.uint8:
        x = x.float().div_(255)
    resize = eval_resize(size, crop_fraction)
    h, w = x.shape[-2:]
    if min(h, w) != resize:
        if h <= w:
            new = (resize, max(resize, int(round(w * resize / h))))
        else:
            new = (max(resize, int(round(h * resize / w))), resize)
        x = F.interpolate(x, size=new, mode="bilinear", antialias=True, align_corners=False)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size].clamp(0, 1)


# --------------------------------------------------------------------------------------------
# Per-image torchvision.transforms.v2 pipelines, for images read from disk.


def _per_image(
    cfg: ViewsConfig,
    size: int,
    scale: Sequence[float],
    channels: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> v2.Compose:
    from torchvision.transforms import v2  # seconds to import: only for images on disk

    s = cfg.color_strength
    steps: list[Callable] = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=tuple(scale), ratio=tuple(cfg.ratio), antialias=True),
    ]
    if cfg.flip:
        steps.append(v2.RandomHorizontalFlip())
    if s > 0 and cfg.color_prob > 0:
        colour = channels == 3
        jitter = v2.ColorJitter(
            0.8 * s, 0.8 * s, 0.8 * s if colour else 0, 0.2 * s if colour else 0
        )
        steps.append(v2.RandomApply([jitter], p=cfg.color_prob))
    if channels == 3 and cfg.gray_prob > 0:
        steps.append(v2.RandomGrayscale(p=cfg.gray_prob))
    if cfg.blur_prob > 0:
        k = max(3, int(0.1 * size) // 2 * 2 + 1)
        steps.append(v2.RandomApply([v2.GaussianBlur(k, sigma=(0.1, 2.0))], p=cfg.blur_prob))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


def multicrop_transform(
    cfg: ViewsConfig, channels: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[object], list[torch.Tensor]]:
    """Per-image transform returning ``[large 1, large 2, small 1, ..., small M]`` tensors.

    Args:
        cfg: views config.
        channels: 1 or 3 (images are converted to this mode before the transform).
        mean, std: normalisation.
    """
    large = _per_image(cfg, cfg.large_size, cfg.large_scale, channels, mean, std)
    small = _per_image(cfg, cfg.small_size, cfg.small_scale, channels, mean, std)
    return lambda img: [large(img), large(img)] + [small(img) for _ in range(cfg.small_crops)]


def support_transform(
    cfg: ViewsConfig, channels: int, mean: Sequence[float], std: Sequence[float], num_views: int
) -> Callable[[object], list[torch.Tensor]]:
    """Per-image transform returning ``num_views`` large views of a support image."""
    large = _per_image(cfg, cfg.large_size, cfg.large_scale, channels, mean, std)
    return lambda img: [large(img) for _ in range(num_views)]
