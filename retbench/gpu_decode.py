"""Batched JPEG decoding with nvjpeg and the recipe's geometry on the GPU (``Preprocess.decoder == "nvjpeg"``).

On CUDA, ``torchvision.io.decode_jpeg(list, device="cuda")`` decodes a batch of JPEG files on the GPU; the fundus
crop (``threshold``), grey conversion, resize, centre crop or padding then run there too, as ``torch`` operations
with PIL's arithmetic (sizes, offsets, the luma weights) but torch's antialiased interpolation, so the pixels are
close to, not equal to, the PIL path's: an opt-in recipe (a task's ``preprocess: {decoder: nvjpeg}``), recorded
with every result and keyed in the feature cache. Files that are not JPEG are decoded by PIL and take the same GPU
geometry. The PIL-only crops (``li_red``, ``mean_bbox``) and ``lanczos`` are refused in one line.

:func:`load_batch` also runs on the CPU (torchvision's libjpeg decoder), which is how it is tested without a GPU;
extraction uses it only on CUDA devices.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812

from retbench.errors import RetbenchError
from retbench.preprocess import Preprocess

JPEG_MAGIC = b"\xff\xd8\xff"
_MODES = {"bicubic": "bicubic", "bilinear": "bilinear", "nearest": "nearest"}


def check_recipe(preprocess: Preprocess, device: torch.device) -> None:
    """Fail in one line when the nvjpeg path cannot honour ``preprocess`` on ``device``."""
    if device.type != "cuda":
        raise RetbenchError(f"preprocess decoder 'nvjpeg' needs a CUDA device (this run uses {device}); "
                            "use decoder: pil")
    if preprocess.fundus_crop not in ("none", "threshold"):
        raise RetbenchError(f"preprocess decoder 'nvjpeg' supports fundus_crop none or threshold, "
                            f"not {preprocess.fundus_crop!r}; use decoder: pil")
    if preprocess.interpolation not in _MODES:
        raise RetbenchError(f"preprocess decoder 'nvjpeg' supports interpolation {', '.join(_MODES)}, "
                            f"not {preprocess.interpolation!r}; use decoder: pil")


def read_encoded(path: Path) -> tuple[torch.Tensor, bool]:
    """A file's bytes as a 1-D ``uint8`` tensor and whether it is a JPEG; other files come back decoded by PIL
    as a (3, H, W) ``uint8`` tensor (16-bit grey scaled as on the PIL path)."""
    data = Path(path).read_bytes()
    if data[:3] == JPEG_MAGIC:
        return torch.frombuffer(bytearray(data), dtype=torch.uint8), True
    full = Preprocess().open_file(path).convert("RGB")
    return torch.from_numpy(np.asarray(full, dtype=np.uint8).copy()).permute(2, 0, 1), False


def load_batch(items: list[tuple[torch.Tensor, bool]], preprocess: Preprocess,
               device: torch.device) -> list[torch.Tensor | Exception]:
    """Decode (JPEGs in one batched call) and transform each item on ``device``: a (3, size, size) ``uint8``
    tensor per item, or the exception that item raised."""
    out: list[torch.Tensor | Exception | None] = [None] * len(items)
    jpegs = [i for i, (_, is_jpeg) in enumerate(items) if is_jpeg]
    decoded: dict[int, torch.Tensor | Exception] = {}
    if jpegs:
        decoded.update(zip(jpegs, _decode_jpegs([items[i][0] for i in jpegs], device)))
    for i, (tensor, is_jpeg) in enumerate(items):
        image = decoded[i] if is_jpeg else tensor.to(device, non_blocking=True)
        if isinstance(image, Exception):
            out[i] = image
            continue
        try:
            out[i] = transform(image, preprocess)
        except Exception as exc:  # noqa: BLE001
            out[i] = exc
    return out  # type: ignore[return-value]


def _decode_jpegs(data: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | Exception]:
    """``decode_jpeg`` on a batch (nvjpeg on CUDA); when the batch fails, one by one, so a bad file fails alone."""
    with warnings.catch_warnings():  # torchvision 0.29 deprecates its image codecs (for TorchCodec); they work
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except Exception:  # noqa: BLE001 - which file? decode each
            out: list[torch.Tensor | Exception] = []
            for d in data:
                try:
                    out.append(decode_jpeg(d, mode=ImageReadMode.RGB, device=device))
                except Exception as exc:  # noqa: BLE001
                    out.append(exc)
            return out


def _luma(image: torch.Tensor) -> torch.Tensor:
    """PIL's ``convert("L")``: (R·19595 + G·38470 + B·7471 + 0x8000) >> 16, as int32."""
    rgb = image.to(torch.int32)
    return (rgb[0] * 19595 + rgb[1] * 38470 + rgb[2] * 7471 + 0x8000) >> 16


def _resize(image: torch.Tensor, width: int, height: int, interpolation: str) -> torch.Tensor:
    mode = _MODES[interpolation]
    x = image.unsqueeze(0).float()
    kwargs = {"align_corners": False, "antialias": True} if mode != "nearest" else {}
    y = F.interpolate(x, size=(height, width), mode=mode, **kwargs)
    return y.round_().clamp_(0, 255).to(torch.uint8).squeeze(0)


def transform(image: torch.Tensor, preprocess: Preprocess) -> torch.Tensor:
    """The recipe's fundus crop, grey conversion and geometry on a (3, H, W) ``uint8`` tensor, on its device."""
    if preprocess.fundus_crop == "threshold":
        mask = _luma(image) > 20
        rows, cols = torch.nonzero(mask.any(dim=1)).flatten(), torch.nonzero(mask.any(dim=0)).flatten()
        if rows.numel() and cols.numel():
            image = image[:, int(rows[0]):int(rows[-1]) + 1, int(cols[0]):int(cols[-1]) + 1]
    if preprocess.grayscale:
        image = _luma(image).to(torch.uint8).expand(3, -1, -1)
    s, interp = preprocess.size, preprocess.interpolation
    h, w = image.shape[1:]
    if preprocess.resize == "squash" or (preprocess.resize == "pad_canvas" and w == h):
        return _resize(image, s, s, interp)
    if preprocess.resize == "pad_canvas":
        scale = max(w, h) / s
        nw, nh = max(1, int(w / scale)), max(1, int(h / scale))
        canvas = torch.zeros(3, s, s, dtype=torch.uint8, device=image.device)
        canvas[:, :nh, :nw] = _resize(image, nw, nh, interp)
        return canvas
    short = max(s, math.floor(s / preprocess.crop_pct + 1e-9))
    if w <= h:
        nw, nh = short, max(s, int(short * h / w))
    else:
        nw, nh = max(s, int(short * w / h)), short
    resized = _resize(image, nw, nh, interp)
    left, top = int(round((nw - s) / 2.0)), int(round((nh - s) / 2.0))
    return resized[:, top:top + s, left:left + s].contiguous()
