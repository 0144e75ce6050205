"""What a pretraining recipe is: presets, the training module's interface, batched augmentations.

A recipe is one file in ``retbench/pretrain/recipes/``: a subclass of :class:`Recipe`
(an ``nn.Module`` holding every trainable part) registered in :data:`RECIPES`. The trainer
owns the loop, the optimiser, checkpoints, resumption and export; a recipe only says how to
build its networks, how to compute its losses on a batch of image indices, and which parts
become the exported ``local:`` model.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn
from torchvision.ops import roi_align

from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD
from retbench.pretrain.data import PretrainSet
from retbench.registry import Registry


@dataclass(frozen=True)
class Preset:
    """Default settings of a recipe on one kind of machine (``cpu``: minutes on the bundled corpus)."""

    image_size: int
    steps: int
    batch_size: int
    lr: float
    vision: dict[str, Any]  # {"timm": name, "kwargs": {...}}
    weight_decay: float = 0.05
    warmup_frac: float = 0.1
    amp: bool = False
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Settings:
    """Resolved training settings (preset + command-line overrides); recorded in checkpoint and card."""

    recipe: str
    preset: str
    image_size: int
    steps: int
    batch_size: int
    lr: float
    weight_decay: float
    warmup_frac: float
    amp: bool
    seed: int
    vision: dict[str, Any]
    text_tower: str = "minilm"
    init: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)


class Recipe(nn.Module, ABC):
    """A self-supervised or image-text pretraining objective over a :class:`PretrainSet`."""

    name: ClassVar[str]
    description: ClassVar[str]
    needs_text: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False
    presets: ClassVar[dict[str, Preset]]
    mean: torch.Tensor  # buffers registered in __init__ (declared for type checkers: Module.__getattr__ is untyped)
    std: torch.Tensor

    def __init__(self, settings: Settings, data: PretrainSet) -> None:
        super().__init__()
        self.settings = settings
        self.data = data
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @property
    def device(self) -> torch.device:
        return self.mean.device

    @abstractmethod
    def training_loss(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Losses on the images ``indices`` of :attr:`data`; key ``loss`` is minimised."""

    @abstractmethod
    def export(self) -> dict[str, Any]:
        """Keyword arguments of :func:`retbench.local_model_format.save_local_model` (vision, vision_cfg, towers...)."""

    def after_step(self, step: int) -> None:
        """Called after each optimiser step (e.g. an EMA teacher update)."""

    def check_data(self) -> None:
        """Refuse data the objective cannot use (no texts, no labels) with one clear line."""
        from retbench.errors import DataError

        if self.needs_text and not any(it.texts for it in self.data.items):
            raise DataError(f"recipe '{self.name}' needs texts: use a task (class descriptions), csdi-reports or captions:")
        if self.needs_labels and not any(it.label >= 0 for it in self.data.items):
            raise DataError(f"recipe '{self.name}' needs labelled images: use a task or @group as --data")

    # ---- image helpers shared by recipes -------------------------------------------------------
    def pixels(self, indices: torch.Tensor) -> torch.Tensor:
        """uint8 images → float in [0, 1] on the training device."""
        return self.data.pixels[indices].to(self.device, non_blocking=True).float().div_(255.0)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] images → ImageNet-standardised (what the exported preprocessing does)."""
        return (x - self.mean) / self.std

    def center(self, indices: torch.Tensor) -> torch.Tensor:
        """The un-augmented view at the training size (a centre crop of the stored image)."""
        x = self.pixels(indices)
        return self.normalize(random_resized_crop(x, self.settings.image_size, scale=(1.0, 1.0), ratio=(1.0, 1.0),
                                                  jitter_center=False))


def random_resized_crop(
    x: torch.Tensor,
    size: int,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    jitter_center: bool = True,
) -> torch.Tensor:
    """Batched RandomResizedCrop (bilinear, via ``roi_align``): one random box per image (torch RNG)."""
    b, _, h, w = x.shape
    area = torch.empty(b).uniform_(*scale) * h * w
    log_r = torch.empty(b).uniform_(torch.log(torch.tensor(ratio[0])).item(), torch.log(torch.tensor(ratio[1])).item())
    aspect = torch.exp(log_r)
    bw = torch.sqrt(area * aspect).clamp(max=w)
    bh = torch.sqrt(area / aspect).clamp(max=h)
    if jitter_center:
        x0 = torch.rand(b) * (w - bw)
        y0 = torch.rand(b) * (h - bh)
    else:
        x0, y0 = (w - bw) / 2, (h - bh) / 2
    boxes = torch.stack([torch.arange(b, dtype=torch.float32), x0, y0, x0 + bw, y0 + bh], dim=1).to(x.device)
    return roi_align(x, boxes, output_size=(size, size), spatial_scale=1.0, sampling_ratio=2, aligned=True)


def flip(x: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Random horizontal flips, per image."""
    mask = (torch.rand(x.shape[0]) < p).to(x.device).view(-1, 1, 1, 1)
    return torch.where(mask, x.flip(-1), x)


def color_jitter(x: torch.Tensor, strength: float = 0.4, p: float = 0.8, grey_p: float = 0.2) -> torch.Tensor:
    """Per-image brightness / contrast / saturation jitter and random greyscale on [0, 1] images."""
    b = x.shape[0]
    apply = (torch.rand(b) < p).float().view(-1, 1, 1, 1).to(x.device)

    def factor() -> torch.Tensor:
        return (1 + (torch.rand(b) * 2 - 1) * strength).view(-1, 1, 1, 1).to(x.device)

    grey = (x * torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)
    y = x * factor()
    y = (y - grey.mean((2, 3), keepdim=True)) * factor() + grey.mean((2, 3), keepdim=True)
    y = (y - grey) * factor() + grey
    y = apply * y + (1 - apply) * x
    to_grey = (torch.rand(b) < grey_p).view(-1, 1, 1, 1).to(x.device)
    y = torch.where(to_grey, y.mean(1, keepdim=True).expand_as(y), y)
    return y.clamp_(0, 1)


RECIPES: Registry[type[Recipe]] = Registry("recipe", entry_point_group="retbench.recipes")
for _name in ("mae", "flair", "simclr", "dino", "retfiner", "eyeclip"):
    RECIPES.register_lazy(_name, f"retbench.pretrain.recipes.{_name}:RECIPE")
