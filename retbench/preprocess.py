"""Image preprocessing owned by an adapter's weights tag, adjusted by task hints.

Images are decoded and geometrically transformed on the CPU into ``uint8`` tensors
(cheap to move between DataLoader workers); normalisation to float happens per batch
on the target device (:func:`normalize`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["resize_crop", "pad_canvas", "squash"]
Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos"]
_PIL_INTERP = {
    "bicubic": Image.Resampling.BICUBIC,
    "bilinear": Image.Resampling.BILINEAR,
    "nearest": Image.Resampling.NEAREST,
    "lanczos": Image.Resampling.LANCZOS,
}


@dataclass(frozen=True)
class Preprocess:
    """Everything that turns a file into the tensor a model sees; recorded in every result.

    ``resize``: ``resize_crop`` = shortest side to ``size / crop_pct`` then centre crop
    (CLIP/timm style); ``pad_canvas`` = longest side to ``size`` keeping aspect, zero-padded
    at the bottom/right onto a square canvas (FLAIR style); ``squash`` = resize both sides.
    ``fundus_crop`` crops to the bounding box of the bright fundus disc before resizing.
    """

    size: int = 224
    resize: ResizeMode = "resize_crop"
    interpolation: Interpolation = "bicubic"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fundus_crop: bool = False

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def with_hints(self, hints: dict[str, Any]) -> Preprocess:
        """Apply a task's preprocessing hints (only keys this class knows)."""
        known = {k: v for k, v in hints.items() if k in self.__dataclass_fields__}
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return replace(self, **known)

    def load(self, image: Image.Image) -> torch.Tensor:
        """Transform a PIL image into a ``uint8`` tensor of shape (3, size, size)."""
        image = image.convert("RGB")
        if self.fundus_crop:
            image = crop_fundus(image)
        image = self._resize(image)
        arr = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def _resize(self, image: Image.Image) -> Image.Image:
        s, interp = self.size, _PIL_INTERP[self.interpolation]
        w, h = image.size
        if self.resize == "squash":
            return image.resize((s, s), interp)
        if self.resize == "pad_canvas":
            scale = s / max(w, h)
            nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
            canvas = Image.new("RGB", (s, s))
            canvas.paste(image.resize((nw, nh), interp), (0, 0))
            return canvas
        short = s / self.crop_pct
        scale = short / min(w, h)
        nw, nh = max(s, round(w * scale)), max(s, round(h * scale))
        image = image.resize((nw, nh), interp)
        left, top = (nw - s) // 2, (nh - s) // 2
        return image.crop((left, top, left + s, top + s))


def crop_fundus(image: Image.Image, threshold: int = 20) -> Image.Image:
    """Crop to the bounding box of the fundus (pixels brighter than ``threshold``).

    Fundus photographs sit on a black background; removing it is the "fundus foreground
    crop" whose absence cost FLAIR 11 ACA points on MESSIDOR (FLAIR issue #7).
    """
    gray = np.asarray(image.convert("L"))
    mask = gray > threshold
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    if rows.size == 0 or cols.size == 0:
        return image
    return image.crop((int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))


def normalize(batch: torch.Tensor, preprocess: Preprocess, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``uint8`` (B, 3, H, W) → float, scaled to [0, 1] and standardised by mean/std.

    Computed in place on the converted copy: three batch-sized temporaries cost as much as a
    small model's forward pass on CPU (60 ms → 23 ms for 64 images at 224 px).
    """
    mean = torch.tensor(preprocess.mean, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    std = torch.tensor(preprocess.std, device=batch.device, dtype=dtype).view(1, 3, 1, 1)
    return batch.to(dtype).div_(255.0).sub_(mean).div_(std)
