"""Images for fine-tuning: decoded once with the adapter's preprocessing, augmented (train split only) as RETFound's
``build_transform`` does (util/datasets.py:26-37: timm's ``create_transform(is_training=True)`` — random resized
crop (scale 0.08–1, bicubic), horizontal flip, RandAugment ``rand-m9-mstd0.5-inc1``, normalisation, random
erasing 0.25 in pixel mode), applied to the adapter's preprocessed view (fundus crop, resize) with the adapter's
mean/std. Validation and test images get the adapter's preprocessing only.

Every augmented image is drawn from random generators seeded by (seed, epoch, image), so a batch is the same
whatever the worker count, and a resumed run sees exactly the images an uninterrupted run would.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from retbench.features import ImageDataset
from retbench.preprocess import Preprocess, normalize

if TYPE_CHECKING:
    from retbench.data.examples import Examples
    from retbench.finetune.recipe import FinetuneRecipe


def decode(examples: Examples, indices: np.ndarray, preprocess: Preprocess,
           workers: int) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """The ``uint8`` (N, 3, S, S) views of ``indices`` that could be read, those indices, and the unreadable ids."""
    subset = _Subset(ImageDataset(examples, preprocess), indices)
    loader = DataLoader(subset, batch_size=32, num_workers=workers, collate_fn=list)
    pixels, kept, bad = [], [], []
    for batch in loader:
        for i, t, err, _written in batch:
            if err is None:
                pixels.append(t)
                kept.append(i)
            else:
                bad.append(examples.ids[i])
    stacked = torch.stack(pixels) if pixels else torch.empty(0, 3, preprocess.size, preprocess.size, dtype=torch.uint8)
    return stacked, np.asarray(kept, dtype=np.int64), bad


class _Subset(Dataset):
    def __init__(self, base: ImageDataset, indices: np.ndarray) -> None:
        self.base, self.indices = base, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, j: int) -> Any:
        return self.base[int(self.indices[j])]


def train_transform(recipe: FinetuneRecipe, preprocess: Preprocess) -> Any:
    """RETFound's train transform (timm ``create_transform``) at the adapter's size, mean and std."""
    from timm.data import create_transform

    per_image = preprocess.normalization == "per_image"
    return create_transform(
        input_size=preprocess.size, is_training=True,
        color_jitter=recipe.color_jitter,  # type: ignore[arg-type]  # timm takes None as "no jitter"
        auto_augment=recipe.auto_augment,
        interpolation="bicubic", re_prob=recipe.reprob, re_mode=recipe.remode, re_count=recipe.recount,
        mean=(0.0, 0.0, 0.0) if per_image else preprocess.mean, std=(1.0, 1.0, 1.0) if per_image else preprocess.std,
    )


def sample_seed(seed: int, epoch: int, row: int) -> int:
    """The seed of one augmented image."""
    return (seed * 1_000_003 + epoch * 10_007 + row) % (2**31 - 1)


@contextmanager
def seeded(value: int) -> Iterator[None]:
    """Seed Python's, NumPy's and torch's global generators (timm's augmentations draw from all three), restoring
    them afterwards."""
    states = random.getstate(), np.random.get_state(), torch.random.get_rng_state()
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class AugmentedTrain(Dataset):
    """Train rows of one epoch, augmented: item ``j`` is row ``order[j]`` with its (seed, epoch, row) draw."""

    def __init__(self, pixels: torch.Tensor, labels: np.ndarray, transform: Any, preprocess: Preprocess,
                 seed: int, epoch: int, order: torch.Tensor) -> None:
        self.pixels, self.labels, self.transform, self.preprocess = pixels, labels, transform, preprocess
        self.seed, self.epoch, self.order = seed, epoch, order

    def __len__(self) -> int:
        return len(self.order)

    def __getitem__(self, j: int) -> tuple[torch.Tensor, int]:
        row = int(self.order[j])
        image = Image.fromarray(self.pixels[row].permute(1, 2, 0).numpy())
        with seeded(sample_seed(self.seed, self.epoch, row)):
            x = self.transform(image)
        if self.preprocess.normalization == "per_image":
            x = (x - x.mean(dim=(1, 2), keepdim=True)) / x.std(dim=(1, 2), keepdim=True, correction=0).clamp_min(1e-6)
        return x, int(self.labels[row])


def epoch_order(n: int, batch: int, seed: int, epoch: int) -> tuple[torch.Tensor, int]:
    """Rows of one epoch (a permutation seeded by (seed, epoch)) and its number of steps: ``n // batch`` full
    batches, the last partial one dropped (main_finetune.py:268); one batch of all rows when ``n < batch``."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    steps = max(1, n // batch)
    return perm[: steps * batch] if n >= batch else perm, steps


def train_batches(pixels: torch.Tensor, labels: np.ndarray, transform: Any, preprocess: Preprocess, recipe: FinetuneRecipe,
                  seed: int, epoch: int, workers: int) -> tuple[Iterator[tuple[torch.Tensor, torch.Tensor]], int]:
    """The augmented batches of ``epoch`` (in order) and how many there are."""
    order, steps = epoch_order(len(pixels), recipe.batch_size, seed, epoch)
    data = AugmentedTrain(pixels, labels, transform, preprocess, seed, epoch, order)
    loader = DataLoader(data, batch_size=len(order) // steps, shuffle=False, num_workers=workers, drop_last=False)
    return iter(loader), steps


def eval_batches(pixels: torch.Tensor, preprocess: Preprocess, batch: int, device: torch.device) -> Iterator[torch.Tensor]:
    """Normalised, unaugmented batches of ``pixels`` on ``device``."""
    for start in range(0, len(pixels), batch):
        yield normalize(pixels[start:start + batch].to(device), preprocess)
