"""Image preprocessing owned by an adapter's weights tag, adjusted by task hints.

Images are decoded and geometrically transformed on the CPU into ``uint8`` tensors
(cheap to move between DataLoader workers); normalisation to float happens per batch
on the target device (:func:`normalize`).
"""

from __future__ import annotations

import math
import os
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
FundusCrop = Literal["none", "threshold", "li_red", "mean_bbox"]
Normalization = Literal["mean_std", "per_image"]
FUNDUS_CROPS = ("none", "threshold", "li_red", "mean_bbox")
Interpolation = Literal["bicubic", "bilinear", "nearest", "lanczos"]
Decoder = Literal["pil", "nvjpeg"]
DECODERS = ("pil", "nvjpeg")
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
    ``fundus_crop`` crops the fundus disc before resizing: ``threshold`` = bounding box of
    pixels brighter than 20 (grey level); ``li_red`` = FLAIR's crop (Li threshold on the red
    channel, largest connected component, its bounding box); ``mean_bbox`` = RETFound-Green's
    offline crop (row/column means of the background-subtracted intensity, 2.5% margin,
    centred black padding to a square). ``grayscale`` converts to grey and replicates it to
    three channels (RetFiner's OCT probes). ``normalization``: ``mean_std`` uses ``mean`` and
    ``std``; ``per_image`` standardises each image by its own per-channel mean and std
    (RETFound's feature-export notebook). ``jpeg_draft`` (opt-in, off by default; a task's
    ``preprocess: {jpeg_draft: true}``) decodes a JPEG at a reduced DCT scale (PIL's draft mode)
    when that keeps at least twice the size the resize needs: 2.2× faster decoding of the 1000 px
    fundus photos, but not the same pixels as a full decode (the 120 bundled mx_dme CFP at 224 px:
    mean |Δ| 0.23 grey levels, at most 10; with the threshold fundus crop mean 0.34, at most 42),
    so it is part of the recipe recorded in results and keyed in the caches. ``decoder``:
    ``pil`` (default), or ``nvjpeg`` (opt-in, CUDA only): JPEGs decoded in batches on the GPU and
    the geometry run there (:mod:`retbench.gpu_decode`; close to, not equal to, PIL's pixels).
    """

    size: int = 224
    resize: ResizeMode = "resize_crop"
    interpolation: Interpolation = "bicubic"
    crop_pct: float = 1.0
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    fundus_crop: FundusCrop = "none"
    grayscale: bool = False
    normalization: Normalization = "mean_std"
    jpeg_draft: bool = False
    decoder: Decoder = "pil"

    def __post_init__(self) -> None:
        if self.fundus_crop not in FUNDUS_CROPS:
            raise ValueError(f"fundus_crop must be one of {', '.join(FUNDUS_CROPS)}, got {self.fundus_crop!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, got {self.decoder!r}")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable description."""
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        return d

    def with_hints(self, hints: dict[str, Any], crop_method: FundusCrop = "threshold") -> Preprocess:
        """Apply a task's preprocessing hints (only keys this class knows).

        ``fundus_crop: true`` in a task means "crop the fundus": the model's own crop when its
        preprocessing has one, else ``crop_method`` (the adapter's preferred method).
        """
        known = {k: v for k, v in hints.items() if k in self.__dataclass_fields__}
        crop = known.get("fundus_crop")
        if crop is True:
            known["fundus_crop"] = self.fundus_crop if self.fundus_crop != "none" else crop_method
        elif crop is False:
            known["fundus_crop"] = "none"
        for k in ("mean", "std"):
            if k in known:
                known[k] = tuple(known[k])
        return replace(self, **known)

    def pixel_recipe(self) -> dict[str, Any]:
        """The fields that decide the ``uint8`` pixels :meth:`load` makes (not mean, std or normalisation,
        applied per batch on the device): the pixel cache's recipe."""
        d = self.to_dict()
        for k in ("mean", "std", "normalization"):
            d.pop(k)
        return d

    def draft_size(self, width: int, height: int) -> tuple[int, int] | None:
        """With ``jpeg_draft``, the size to ask PIL's JPEG draft mode for (twice what the resize needs),
        or ``None`` when the source is smaller than that (a full decode)."""
        if not self.jpeg_draft:
            return None
        need = 2 * (max(self.size, math.floor(self.size / self.crop_pct + 1e-9)) if self.resize == "resize_crop"
                    else self.size)
        if min(width, height) < 2 * need:  # the smallest DCT scale-down halves: it would keep < 2× the need
            return None
        return need, need

    def open_file(self, path: str | os.PathLike[str]) -> Image.Image:
        """Decode an image file for :meth:`load`: 16/32-bit grey scaled to 8 bits; a large JPEG decoded at a
        reduced DCT scale when ``jpeg_draft`` is on (:meth:`draft_size`)."""
        with Image.open(path) as im:
            if im.format == "JPEG" and (request := self.draft_size(*im.size)) is not None:
                im.draft("RGB" if im.mode == "RGB" else None, request)
            im.load()
            return to_8bit(im)

    def load(self, image: Image.Image) -> torch.Tensor:
        """Transform a PIL image into a ``uint8`` tensor of shape (3, size, size)."""
        image = to_8bit(image).convert("RGB")
        if self.fundus_crop != "none":
            image = CROPS[self.fundus_crop](image)
        if self.grayscale:
            image = image.convert("L").convert("RGB")
        image = self._resize(image)
        arr = np.asarray(image, dtype=np.uint8)
        return torch.from_numpy(arr.copy()).permute(2, 0, 1)

    def _resize(self, image: Image.Image) -> Image.Image:
        s, interp = self.size, _PIL_INTERP[self.interpolation]
        w, h = image.size
        if self.resize == "squash":
            return image.resize((s, s), interp)
        if self.resize == "pad_canvas":
            if w == h:
                return image.resize((s, s), interp)
            scale = max(w, h) / s  # FLAIR's arithmetic, truncation included
            nw, nh = max(1, int(w / scale)), max(1, int(h / scale))
            canvas = Image.new("RGB", (s, s))
            canvas.paste(image.resize((nw, nh), interp), (0, 0))
            return canvas
        # torchvision/timm arithmetic: short side floor(size / crop_pct), long side truncated, crop offsets rounded
        short = max(s, math.floor(s / self.crop_pct + 1e-9))
        if w <= h:
            nw, nh = short, max(s, int(short * h / w))
        else:
            nw, nh = max(s, int(short * w / h)), short
        image = image.resize((nw, nh), interp)
        left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
        return image.crop((left, top, left + s, top + s))


def _bit_depth(image: Image.Image, values: np.ndarray) -> int:
    """Bits per sample of a 16/32-bit grey image: its mode, else the file's declared depth, else what holds it."""
    if image.mode.startswith("I;16"):
        return 16
    declared = getattr(image, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    if declared:
        return int(max(declared)) if isinstance(declared, tuple) else int(declared)
    if image.format == "PNG":  # PNG stores at most 16 bits per sample (older Pillow opens them as mode I)
        return 16
    return 16 if values.size == 0 or int(values.max()) <= 0xFFFF else 32


def to_8bit(image: Image.Image) -> Image.Image:
    """``image`` with 16- or 32-bit grey samples scaled by its bit depth to 8 bits (mode ``L``); others unchanged.

    ``convert("RGB")`` clips such samples at 255 (a 16-bit OCT export turns almost white); here a value
    ``v`` of a ``b``-bit image becomes ``round(v · 255 / (2^b - 1))``, so a 16-bit copy of an 8-bit image
    (``v · 257``) decodes to the same bytes. Float images (mode ``F``) in [0, 1] are scaled by 255, in
    [0, 255] kept as they were; other float ranges are refused (ValueError) rather than clipped.
    8-bit images are returned as they are.
    """
    mode = image.mode
    if mode == "I" or mode.startswith("I;16"):
        values = np.asarray(image).astype(np.int64)
        top = (1 << _bit_depth(image, values)) - 1
        scaled = (np.clip(values, 0, top) * 255 + top // 2) // top
        return Image.fromarray(scaled.astype(np.uint8))
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and not np.isfinite(values).all():
            raise ValueError("float image with NaN or infinite samples")
        low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
        if low >= 0 and high <= 1:
            return Image.fromarray(np.rint(values * 255).astype(np.uint8))
        if low < 0 or high > 255:
            raise ValueError(f"float image with samples in [{low:g}, {high:g}]; expected [0, 1] or [0, 255]")
    return image


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


def li_threshold(values: np.ndarray, tolerance: float | None = None) -> float:
    """Li's iterative minimum cross-entropy threshold (Li & Tam 1998), as scikit-image computes it.

    ``values`` are grey levels; the iteration starts at their mean and stops when the update
    is smaller than half the smallest difference between intensities (``tolerance``).
    """
    values = np.asarray(values, dtype=np.float64).ravel()
    levels = np.unique(values)
    if levels.size < 2:
        return float(levels[0]) if levels.size else 0.0
    tol = float(np.min(np.diff(levels)) / 2) if tolerance is None else tolerance
    offset = float(values.min())
    values = values - offset  # the method needs non-negative intensities
    t_next, t_curr = float(values.mean()), -2.0 * tol
    while abs(t_next - t_curr) > tol:
        t_curr = t_next
        fore, back = values > t_curr, values <= t_curr
        mean_fore, mean_back = values[fore].mean(), values[back].mean()
        if mean_back == 0:
            break
        t_next = (mean_back - mean_fore) / (np.log(mean_back) - np.log(mean_fore))
    return t_next + offset


def crop_fundus_li(image: Image.Image) -> Image.Image:
    """FLAIR's foreground crop: red channel > Li threshold, largest component, its bounding box."""
    from scipy import ndimage

    red = np.asarray(image, dtype=np.uint8)[..., 0]
    mask = red > li_threshold(red)
    labels, n = ndimage.label(mask)
    if n == 0:
        return image
    largest = 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))
    rows, cols = np.nonzero(labels == largest)
    return image.crop((int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1))


def crop_fundus_mean_bbox(image: Image.Image, margin: float = 0.025, threshold: float = 5.0) -> Image.Image:
    """RETFound-Green's offline crop: bbox from row/column means, 2.5% margin, centred square pad."""
    arr = np.asarray(image, dtype=np.float32)
    gray = arr.mean(axis=2)
    if gray.max() <= 0:
        return image
    gray = gray * (255.0 / gray.max())
    gray = gray - np.quantile(gray, 0.05)
    rows, cols = np.flatnonzero(gray.mean(axis=1) > threshold), np.flatnonzero(gray.mean(axis=0) > threshold)
    if rows.size == 0 or cols.size == 0:
        return image
    h, w = gray.shape
    pad = int(margin * (h + w) / 2)
    # the release's bounds: first index - margin to last index + margin, the end exclusive
    top, bottom = max(0, int(rows[0]) - pad), min(h, int(rows[-1]) + pad)
    left, right = max(0, int(cols[0]) - pad), min(w, int(cols[-1]) + pad)
    crop = image.crop((left, top, right, bottom))
    side = max(crop.size)
    canvas = Image.new("RGB", (side, side))
    canvas.paste(crop, ((side - crop.size[0]) // 2, (side - crop.size[1]) // 2))
    return canvas


CROPS = {"threshold": crop_fundus, "li_red": crop_fundus_li, "mean_bbox": crop_fundus_mean_bbox}


def normalize(batch: torch.Tensor, preprocess: Preprocess, dtype: torch.dtype = torch.float32,
              out: torch.Tensor | None = None) -> torch.Tensor:
    """``uint8`` (B, 3, H, W) → float, scaled to [0, 1] and standardised by mean/std.

    Computed in place on the converted copy: three batch-sized temporaries cost as much as a
    small model's forward pass on CPU (60 ms → 23 ms for 64 images at 224 px). ``out``: a
    ``dtype`` tensor of at least ``len(batch)`` rows to convert into (its first rows are returned):
    reused across batches it saves mapping and faulting in a fresh batch-sized buffer each time
    (38 MB at 224 px × 64). The values are the same bit for bit either way.
    """
    x = batch.to(dtype) if out is None else out[:len(batch)].copy_(batch)
    x.div_(255.0)
    if preprocess.normalization == "per_image":
        mean = x.mean(dim=(2, 3), keepdim=True)
        std = x.std(dim=(2, 3), keepdim=True, correction=0).clamp_min_(1e-6)  # numpy's population std
        return x.sub_(mean).div_(std)
    if any(preprocess.mean):  # x - 0 and x / 1 are exact: skipping them changes no bit (e.g. ``classical``)
        x.sub_(torch.tensor(preprocess.mean, device=batch.device, dtype=dtype).view(1, 3, 1, 1))
    if any(s != 1 for s in preprocess.std):
        x.div_(torch.tensor(preprocess.std, device=batch.device, dtype=dtype).view(1, 3, 1, 1))
    return x
