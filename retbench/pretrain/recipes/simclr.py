"""SimCLR (Chen et al. 2020, "A Simple Framework for Contrastive Learning of Visual Representations").

Each image of a batch of N gives two independently augmented views (random resized crop,
horizontal flip, colour jitter with probability 0.8, greyscale with probability 0.2 and,
optionally, Gaussian blur). The encoder ``f`` (a timm model's pooled feature) and a 2-layer
MLP projection head ``g`` (Linear → BatchNorm → ReLU → Linear to 128 dims) map the 2N views
to embeddings ``z``; the NT-Xent loss treats, for every view, its sibling view as the positive
and the other 2N − 2 views as negatives::

    s_ij = cos(z_i, z_j),   l(i, j) = −log exp(s_ij / τ) / Σ_{k ≠ i} exp(s_ik / τ),
    L = 1 / 2N · Σ_k [ l(2k−1, 2k) + l(2k, 2k−1) ]

Temperature: τ = 0.1 on the GPU preset (the paper's ImageNet setting, best in its temperature
ablation with large batches); τ = 0.2 on the CPU preset, whose batches of 64 images give only
126 negatives per view: the paper's appendix finds the best temperature rises as batches and
training shrink, and 0.2 keeps gradients from concentrating on the few hardest negatives of a
small batch of near-identical fundus photographs.

Only the encoder is exported (the head is thrown away, as in the paper); its probe feature is
the timm model's pooled output.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retbench.pretrain.recipe import Preset, Recipe, color_jitter, flip, random_resized_crop

CNN_CPU = {"timm": "resnet18", "kwargs": {}}
CNN_GPU = {"timm": "resnet50", "kwargs": {}}


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """NT-Xent over the 2N views ``cat([z1, z2])``: view i's positive is its sibling, its negatives the other 2N − 2.

    ``z1[k]`` and ``z2[k]`` are the projections of two views of image ``k`` (N × D, any scale:
    they are L2-normalised here). Returns the mean of the 2N per-view losses, in float32.
    """
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]).float(), dim=1)
    logits = z @ z.t() / temperature
    logits.fill_diagonal_(float("-inf"))  # k ≠ i: a view is never its own negative
    positive = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, positive)


def gaussian_blur(x: torch.Tensor, p: float, sigma: tuple[float, float] = (0.1, 2.0), ref_size: int = 224) -> torch.Tensor:
    """Per-image Gaussian blur with probability ``p`` (separable, reflect padding, torch RNG).

    ``sigma`` is drawn uniformly per image in pixels of a ``ref_size`` image and scaled to the
    actual size, so a 64 px view is blurred as much, relative to its content, as a 224 px one.
    The kernel spans ±3 of the largest sigma.
    """
    b, c, h, w = x.shape
    apply = torch.rand(b) < p
    if p <= 0 or not bool(apply.any()):
        return x
    scale = h / ref_size
    s = torch.empty(b).uniform_(*sigma) * scale
    radius = max(1, math.ceil(3 * sigma[1] * scale))
    radius = min(radius, (min(h, w) - 1) // 2) or 1
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t[None] ** 2) / (2 * s[:, None].clamp(min=1e-3) ** 2))
    k = (k / k.sum(1, keepdim=True)).to(x.device, x.dtype)  # (B, 2r+1)
    k = k.repeat_interleave(c, dim=0)  # one kernel per (image, channel)
    y = x.reshape(1, b * c, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), k[:, None, None, :], groups=b * c)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), k[:, None, :, None], groups=b * c)
    return torch.where(apply.to(x.device).view(-1, 1, 1, 1), y.reshape(b, c, h, w), x)


def solarize(x: torch.Tensor, p: float, threshold: float = 0.5) -> torch.Tensor:
    """Per-image solarisation with probability ``p``: pixels at or above ``threshold`` become 1 − x."""
    apply = (torch.rand(x.shape[0]) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(apply & (x >= threshold), 1 - x, x)


class SimCLR(Recipe):
    """Contrastive pretraining of a timm encoder with two views per image and the NT-Xent loss."""

    name = "simclr"
    description = ("SimCLR (Chen et al. 2020): two augmented views per image (crop, flip, colour jitter, grey), "
                   "encoder + 2-layer MLP head, NT-Xent loss over 2N-2 in-batch negatives; exports the encoder.")
    presets = {
        "cpu": Preset(image_size=64, steps=200, batch_size=64, lr=1e-3, vision=CNN_CPU, weight_decay=1e-4,
                      extra={"temperature": 0.2, "proj_dim": 128, "crop_scale": [0.08, 1.0], "jitter": 0.8,
                             "blur_p": 0.0}),
        "gpu": Preset(image_size=224, steps=20000, batch_size=256, lr=1e-3, vision=CNN_GPU, weight_decay=1e-4,
                      amp=True, warmup_frac=0.05,
                      extra={"temperature": 0.1, "proj_dim": 128, "crop_scale": [0.08, 1.0], "jitter": 0.8,
                             "blur_p": 0.5}),
    }

    encoder: Any  # a timm model: typed Any, as timm.create_model returns a plain nn.Module

    def __init__(self, settings: Any, data: Any) -> None:
        super().__init__(settings, data)
        import timm

        v = settings.vision
        self.encoder = timm.create_model(v["timm"], num_classes=0, **v.get("kwargs", {}))
        e = settings.extra
        width = self.encoder.num_features
        self.temperature = float(e.get("temperature", 0.1))
        self.head = nn.Sequential(nn.Linear(width, width, bias=False), nn.BatchNorm1d(width), nn.ReLU(inplace=True),
                                  nn.Linear(width, int(e.get("proj_dim", 128))))

    def view(self, x: torch.Tensor) -> torch.Tensor:
        """One SimCLR augmentation of [0, 1] images, ImageNet-normalised at the training size."""
        e = self.settings.extra
        x = flip(random_resized_crop(x, self.settings.image_size, scale=tuple(e.get("crop_scale", [0.08, 1.0]))))
        x = color_jitter(x, strength=float(e.get("jitter", 0.8)), p=0.8, grey_p=0.2)
        x = gaussian_blur(x, float(e.get("blur_p", 0.0)))
        return self.normalize(x)

    def training_loss(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """NT-Xent between the projections of two views of each image (both views in one forward pass)."""
        x = self.pixels(indices)
        views = torch.cat([self.view(x), self.view(x)])
        z = self.head(self.encoder(views))
        z1, z2 = z.chunk(2)
        loss = nt_xent(z1, z2, self.temperature)
        with torch.no_grad():  # how often the sibling is the nearest view: a readable training signal
            zn = F.normalize(z.float(), dim=1)
            sim = (zn @ zn.t()).fill_diagonal_(-2.0)
            n = z1.shape[0]
            sibling = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(sim.device)
            top1 = (sim.argmax(1) == sibling).float().mean()
        return {"loss": loss, "positive_top1": top1}

    def export(self) -> dict[str, Any]:
        """The encoder only; the projection head is discarded."""
        return {"vision": self.encoder, "vision_cfg": self.settings.vision}


RECIPE = SimCLR
