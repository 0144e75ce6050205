"""Classical hand-crafted fundus features: a no-weights baseline (family ``classical``).

Before foundation models, fundus classifiers were built on hand-crafted colour, texture and
vessel/lesion descriptors fed to a shallow classifier. This adapter computes such a
descriptor in pure, batched torch: no learned parameters, no files, and only operations
that are deterministic on CPU and GPU (pooling, fixed stencils, reductions, gathers and
integer-count histograms). Any
foundation model should beat it; where one does not, the task is solvable from colour,
blur or acquisition artefacts alone.

Pixels arrive in [0, 1] (the tag's mean is 0 and std 1). For speed the image is
average-pooled to ``WORK_SIZE`` (112) pixels, colour statistics to half that; only the
finest sharpness measure uses the full resolution. The fundus **mask** is the set of pixels
whose brightest channel exceeds ``MASK_THRESHOLD``, eroded by two pixels so the vignetted
rim does not count (the whole image if that leaves almost nothing). Statistics are taken
inside the mask, so black background and ``pad_canvas`` padding never dominate; before
filtering, background pixels are replaced by the mean fundus colour so the rim is not seen
as an edge. ``gn`` is the green channel (best vessel and lesion contrast) divided by its
masked mean, i.e. illumination normalised.

Feature blocks, in order (``FEATURE_DIM`` = 712, whatever the input size):

* foreground (1): fraction of the image inside the mask.
* colour moments (30): masked mean, std and skewness of R, G, B, HSV value and saturation,
  hue angle, opponent R-G and (R+G)/2-B, and rg-chromaticity.
* colour histograms (96): 16-bin masked histograms of R, G, B, saturation, value and hue.
* colour layout (256): 8x8 average-pooled R, G, B and ``gn`` (optic disc position, size
  and pallor, illumination pattern).
* sharpness (25): log energy of the full-resolution detail lost by pooling (2x2 block
  variance at 224 px), log energy and log mean
  absolute Laplacian of ``gn`` at three scales (blur and haze, e.g. cataract), gradient
  magnitude mean and std and a 16-bin histogram of its logarithm.
* HOG (144): 9 unsigned gradient-orientation bins of ``gn``, magnitude weighted, on a 4x4
  grid, each cell L2-normalised.
* vessels and lesions (98): black top-hat (closing minus image: vessels, haemorrhages,
  microaneurysms) and white top-hat (image minus opening: exudates, drusen, reflexes) of
  ``gn`` with squares of 3, 5 and 9 work pixels (about 6, 10 and 18 at 224 px); for each
  the masked mean, std, fraction above ``TOPHAT_THRESHOLD`` and an 8-bin histogram (66),
  plus 4x4 layouts of the 5-pixel black and white top-hats (32).
* optic disc (62): a 24-pixel window around the brightest smoothed spot away from the rim
  (the presumed disc): its relative position (2), mean and std of R, G, B and ``gn`` (8),
  ``gn`` pooled to 6x6 (36, cup and rim pattern) and a 16-bin ``gn`` histogram (glaucoma).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F

from retbench.adapters import Adapter, WeightsTag, register_adapter
from retbench.preprocess import Preprocess

WORK_SIZE = 112
MASK_THRESHOLD = 10 / 255
TOPHAT_THRESHOLD = 0.08
EPS = 1e-6
SOBEL_X = ((-0.125, 0.0, 0.125), (-0.25, 0.0, 0.25), (-0.125, 0.0, 0.125))
SOBEL_Y = ((-0.125, -0.25, -0.125), (0.0, 0.0, 0.0), (0.125, 0.25, 0.125))
LAPLACIAN = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))
FEATURE_DIM = 712
CHUNK = 64  # images per internal step: bounds memory for huge batches

_TAG = WeightsTag(
    name="default",
    source="handcrafted (no weights)",
    preprocess=Preprocess(
        size=224,
        resize="pad_canvas",
        interpolation="bilinear",
        mean=(0.0, 0.0, 0.0),
        std=(1.0, 1.0, 1.0),
    ),
    licence="Apache-2.0 (retbench)",
    feature=f"{FEATURE_DIM}-d hand-crafted colour, texture, vessel and optic-disc descriptor",
    description=(
        "Classical features inside the fundus mask, a floor for foundation models: colour moments and "
        "histograms (RGB/HSV/opponent), 8x8 colour layout, multi-scale Laplacian sharpness, 4x4 HOG, "
        "multi-scale black/white top-hat vessel and lesion statistics, optic-disc window"
    ),
)


# --------------------------------------------------------------------------- primitives
def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` (B, C, H, W) over pixels where ``mask`` (B, 1, H, W) is 1 → (B, C)."""
    return (x * mask).sum((2, 3)) / mask.sum((2, 3)).clamp_min(1.0)


def masked_moments(x: torch.Tensor, mask: torch.Tensor, skew: bool = True) -> torch.Tensor:
    """Masked mean, std (and skewness) per channel → (B, 2C) or (B, 3C)."""
    n = mask.sum((2, 3)).clamp_min(1.0)
    mean = (x * mask).sum((2, 3)) / n
    centred = (x - mean[:, :, None, None]) * mask
    sq = centred * centred
    std = (sq.sum((2, 3)) / n).sqrt()
    if not skew:
        return torch.cat([mean, std], 1)
    third = (sq * centred).sum((2, 3)) / n / (std.pow(3) + EPS)
    return torch.cat([mean, std, third.clamp(-10.0, 10.0)], 1)


def masked_histogram(x: torch.Tensor, mask: torch.Tensor, bins: int, lo: float, hi: float) -> torch.Tensor:
    """Normalised per-channel histograms over masked pixels → (B, C * bins).

    Values outside [lo, hi] fall in the end bins. Integer counts (``bincount`` without
    weights) keep the result deterministic on GPU too.
    """
    b, c = x.shape[:2]
    idx = ((x - lo) * (bins / (hi - lo))).clamp(0, bins - 1).long()
    offsets = torch.arange(b * c, device=x.device).view(b, c, 1, 1) * bins
    flat = torch.where(mask.bool(), idx + offsets, b * c * bins)
    counts = torch.bincount(flat.flatten(), minlength=b * c * bins + 1)[:-1]
    hist = counts.view(b, c, bins).float() / mask.sum((2, 3)).clamp_min(1.0).view(b, 1, 1)
    return hist.flatten(1)


def running_max(x: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Centred running maximum of odd width ``k`` along ``dim`` (-1 or -2), same size.

    Windows are doubled (1, 2, 4, ...) and two overlapping ones combined: O(log k)
    element-wise maxima, much faster on CPU than stride-1 max-pooling.
    """
    n, r = x.shape[dim], k // 2
    y = F.pad(x, (r, r) if dim == -1 else (0, 0, r, r), value=-math.inf)
    width = 1
    while 2 * width <= k:
        m = y.shape[dim] - width
        y = torch.maximum(y.narrow(dim, 0, m), y.narrow(dim, width, m))
        width *= 2
    return torch.maximum(y.narrow(dim, 0, n), y.narrow(dim, k - width, n))


def dilate(x: torch.Tensor, k: int) -> torch.Tensor:
    """Grey dilation of (B, C, H, W) with a k x k square (k odd, same size)."""
    return running_max(running_max(x, k, -1), k, -2)


def erode(x: torch.Tensor, k: int) -> torch.Tensor:
    """Grey erosion with a k x k square."""
    return -dilate(-x, k)


def conv3x3(x: torch.Tensor, kernel: tuple[tuple[float, ...], ...]) -> torch.Tensor:
    """Same-size 3x3 correlation with a fixed kernel and replicated borders.

    A sum of shifted slices: faster than a one-channel ``conv2d`` on CPU, and exact.
    """
    h, w = x.shape[-2:]
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    out = torch.zeros_like(x)
    for i, row in enumerate(kernel):
        for j, weight in enumerate(row):
            if weight:
                out = out + weight * p[..., i : i + h, j : j + w]
    return out


def pool_to(x: torch.Tensor, size: int) -> torch.Tensor:
    """Average-pool to ``size`` x ``size`` (plain pooling when it divides, else adaptive)."""
    h, w = x.shape[-2:]
    if h % size == 0 and w % size == 0 and h // size == w // size:
        return x if h == size else F.avg_pool2d(x, h // size)
    return F.adaptive_avg_pool2d(x, size)


def downsample(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Average-pool by ``factor`` (identity for 1)."""
    return x if factor == 1 else F.avg_pool2d(x, factor)


def downsample_mask(mask: torch.Tensor, factor: int) -> torch.Tensor:
    """Shrink a {0, 1} mask by ``factor``, keeping only cells fully inside it."""
    return (downsample(mask, factor) > 0.999).float()


def log_energy(x: torch.Tensor) -> torch.Tensor:
    """``log10`` of a non-negative energy, safe at zero."""
    return torch.log10(x + 1e-8)


# --------------------------------------------------------------------------- feature blocks
def foreground(x: torch.Tensor) -> torch.Tensor:
    """Eroded fundus mask (B, 1, H, W) in {0, 1}; all ones where it would be near-empty."""
    mask = (x.amax(1, keepdim=True) > MASK_THRESHOLD).float()
    mask = erode(mask, 5)
    empty = mask.mean((1, 2, 3), keepdim=True) < 0.01
    return torch.where(empty, torch.ones_like(mask), mask)


def colour_channels(x: torch.Tensor) -> torch.Tensor:
    """R, G, B, value, saturation, hue, R-G, (R+G)/2-B, r and g chromaticity → (B, 10, H, W)."""
    r, g, b = x.unbind(1)
    value = x.amax(1)
    sat = (value - x.amin(1)) / value.clamp_min(EPS)
    hue = torch.atan2(math.sqrt(3.0) * (g - b), 2 * r - g - b)  # 0 = red, pi/3 = yellow
    total = (r + g + b).clamp_min(EPS)
    return torch.stack([r, g, b, value, sat, hue, r - g, (r + g) / 2 - b, r / total, g / total], 1)


def colour_features(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Colour moments (30) and histograms (96), at half the work resolution."""
    xs, ms = downsample(x, 2), downsample_mask(mask, 2)
    ch = colour_channels(xs)
    unit = masked_histogram(ch[:, [0, 1, 2, 4, 3]], ms, 16, 0.0, 1.0)
    hue = masked_histogram(ch[:, 5:6], ms, 16, -math.pi / 6, math.pi / 2)
    return torch.cat([masked_moments(ch, ms), unit, hue], 1)


def layout_features(filled: torch.Tensor, gn: torch.Tensor) -> torch.Tensor:
    """8x8 average-pooled R, G, B and normalised green → (B, 256)."""
    return pool_to(torch.cat([filled, gn], 1), 8).flatten(1)


def sharpness_features(
    detail: torch.Tensor, gn: torch.Tensor, mag: torch.Tensor, mask: torch.Tensor
) -> torch.Tensor:
    """Fine detail energy (1), multi-scale Laplacian (6), gradient stats (2) and histogram (16)."""
    feats = [log_energy(masked_mean(detail, mask))]
    for factor in (1, 2, 4):
        response = conv3x3(downsample(gn, factor), LAPLACIAN)
        m = downsample_mask(mask, factor)
        feats += [log_energy(masked_mean(response * response, m)), log_energy(masked_mean(response.abs(), m))]
    hist = masked_histogram(torch.log10(mag + 1e-3), mask, 16, -3.0, 0.5)
    return torch.cat([*feats, masked_moments(mag, mask, skew=False), hist], 1)


def hog_features(
    grad: torch.Tensor, mag: torch.Tensor, mask: torch.Tensor, bins: int = 9, cells: int = 4
) -> torch.Tensor:
    """Magnitude-weighted unsigned orientation histograms on a ``cells`` grid → (B, bins * cells²)."""
    weight = mag * mask
    angle = torch.atan2(grad[:, 1:], grad[:, :1])
    idx = (torch.remainder(angle, math.pi) * (bins / math.pi)).floor().clamp(0, bins - 1)
    hist = torch.cat([pool_to(weight * (idx == k), cells) for k in range(bins)], 1)
    return F.normalize(hist, dim=1, eps=EPS).flatten(1)


def tophat_stats(response: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean, std, fraction above threshold and 8-bin sqrt-histogram of a top-hat → (B, 11)."""
    frac = masked_mean((response > TOPHAT_THRESHOLD).float(), mask)
    hist = masked_histogram(response.sqrt(), mask, 8, 0.0, 0.6)
    return torch.cat([masked_moments(response, mask, skew=False), frac, hist], 1)


def tophat_features(gn: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Black/white top-hats of ``gn`` at three scales (66) and their 4x4 layouts (32)."""
    feats, layouts = [], []
    for k in (3, 5, 9):
        black = (erode(dilate(gn, k), k) - gn).clamp_min(0)
        white = (gn - dilate(erode(gn, k), k)).clamp_min(0)
        feats += [tophat_stats(black, mask), tophat_stats(white, mask)]
        if k == 5:
            layouts = [pool_to(t * mask, 4).flatten(1) for t in (black, white)]
    return torch.cat(feats + layouts, 1)


def locate_disc(gn: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column (B,) of the brightest smoothed spot away from the rim: the presumed disc."""
    h, w = gn.shape[-2:]
    inner = erode(mask, 9)  # rim glare is often brighter than the disc
    coarse = F.avg_pool2d(F.avg_pool2d(gn * inner, 4), 3, stride=1, padding=1, count_include_pad=False)
    ch, cw = coarse.shape[-2:]
    flat = coarse.flatten(1).argmax(1)
    return (flat // cw) * h // ch + h // (2 * ch), (flat % cw) * w // cw + w // (2 * cw)


def crop_windows(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, size: int) -> torch.Tensor:
    """(B, C, size, size) windows of ``x`` centred on per-image ``rows``/``cols`` (edges clamped)."""
    h, w = x.shape[-2:]
    offsets = torch.arange(size, device=x.device) - size // 2
    r = (rows[:, None] + offsets).clamp(0, h - 1)[:, :, None]
    c = (cols[:, None] + offsets).clamp(0, w - 1)[:, None, :]
    batch = torch.arange(x.shape[0], device=x.device)[:, None, None]
    return x[batch, :, r, c].permute(0, 3, 1, 2)


def optic_disc_features(
    filled: torch.Tensor, gn: torch.Tensor, mask: torch.Tensor, size: int = 24
) -> torch.Tensor:
    """Features of a ``size`` window around the presumed optic disc → (B, 62).

    Relative position (2), R/G/B/``gn`` mean and std (8), ``gn`` pooled to 6x6 (36) and a
    16-bin ``gn`` histogram (16).
    """
    rows, cols = locate_disc(gn, mask)
    patch = crop_windows(torch.cat([filled, gn], 1), rows, cols, size)
    ones = torch.ones_like(patch[:, :1])
    centre = torch.stack([rows / gn.shape[-2], cols / gn.shape[-1]], 1).float()
    grid = pool_to(patch[:, 3:], 6).flatten(1)
    hist = masked_histogram(patch[:, 3:], ones, 16, 0.5, 2.5)
    return torch.cat([centre, masked_moments(patch, ones, skew=False), grid, hist], 1)


def classical_features(pixels: torch.Tensor) -> torch.Tensor:
    """All feature blocks for (B, 3, H, W) pixels in [0, 1] → (B, ``FEATURE_DIM``)."""
    green = pixels[:, 1:2]
    x = pool_to(pixels, WORK_SIZE)
    detail = (pool_to(green * green, WORK_SIZE) - x[:, 1:2].pow(2)).clamp_min(0)
    mask = foreground(x)
    mean_colour = masked_mean(x, mask)[:, :, None, None]
    filled = x * mask + mean_colour * (1 - mask)
    scale = mean_colour[:, 1:2].clamp_min(0.05)
    gn = filled[:, 1:2] / scale
    grad = torch.cat([conv3x3(gn, SOBEL_X), conv3x3(gn, SOBEL_Y)], 1)
    mag = grad.pow(2).sum(1, keepdim=True).sqrt()
    feats = [
        mask.mean((1, 2, 3)).unsqueeze(1),
        colour_features(x, mask),
        layout_features(filled, gn),
        sharpness_features(detail / scale.pow(2), gn, mag, mask),
        hog_features(grad, mag, mask),
        tophat_features(gn, mask),
        optic_disc_features(filled, gn, mask),
    ]
    return torch.nan_to_num(torch.cat(feats, 1))


# --------------------------------------------------------------------------- adapter
@register_adapter
class ClassicalAdapter(Adapter):
    """Hand-crafted colour, texture and vessel features of fundus images (no weights)."""

    family: ClassVar[str] = "classical"
    # fp32: hand-crafted features (their conv kernels gain nothing from autocast)
    autocast_dtype: ClassVar[torch.dtype | None] = None
    tags: ClassVar[dict[str, WeightsTag]] = {"default": _TAG}
    has_text: ClassVar[bool] = False
    dim: ClassVar[int] = FEATURE_DIM

    def build(self) -> None:
        """Nothing to build: the features have no parameters and their kernels are constants."""

    @torch.no_grad()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) pixels in [0, 1] → (B, ``FEATURE_DIM``) float32 hand-crafted features."""
        x = pixels.to(self.device, torch.float32).clamp(0.0, 1.0)
        if x.shape[0] == 0:
            return x.new_zeros(0, FEATURE_DIM)
        return torch.cat([classical_features(chunk) for chunk in x.split(CHUNK)])
