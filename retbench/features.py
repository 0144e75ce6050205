"""Feature extraction, bounded by the model, and a content-keyed feature cache.

Images are decoded and resized in DataLoader workers (in the main process on machines with
two cores or fewer) into ``uint8`` tensors; the main process normalises each batch on the
device, in place, runs the encoder under ``inference_mode`` and keeps outputs on the device
until the end (no host sync per batch).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from retbench.adapters import Adapter
from retbench.allocator import tune_malloc
from retbench.atomic_files import atomic_write_bytes, atomic_write_json
from retbench.data.examples import Examples, FileImages
from retbench.errors import DataError, warn
from retbench.gpu_decode import check_recipe, load_batch, read_encoded
from retbench.pixel_cache import PixelCache
from retbench.preprocess import Preprocess, normalize
from retbench.progress import progress_bar


class ImageDataset(Dataset):
    """Yields ``(index, uint8 tensor | None, error | None, written)``; errors are reported, not raised, in workers.

    With a ``pixel_cache``, an image file's pixels are read from it when present (keyed by the sha256 of the
    file's bytes and the recipe's pixel fields), else decoded and stored (``written`` is then True); in-memory
    arrays (e.g. RetinaMNIST) are cheap to resize and bypass it.
    """

    def __init__(self, examples: Examples, preprocess: Preprocess, pixel_cache: PixelCache | None = None) -> None:
        self.examples, self.preprocess, self.pixel_cache = examples, preprocess, pixel_cache

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str | None, bool]:
        images = self.examples.images
        digest = None
        if self.pixel_cache is not None and isinstance(images, FileImages):
            try:
                digest = file_digest(images.path(self.examples.ids[i]))
            except OSError:
                digest = None  # unreadable: the decoder below reports it as it would without the cache
            if digest is not None and (hit := self.pixel_cache.get(self.preprocess, digest)) is not None:
                return i, hit, None, False
        try:
            pixels = self.preprocess.load(self._open(i))
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image
            return i, None, f"{type(exc).__name__}: {exc}", False
        written = digest is not None and self.pixel_cache is not None and self.pixel_cache.put(self.preprocess, digest, pixels)
        return i, pixels, None, written

    def _open(self, i: int) -> Image.Image:
        images, image_id = self.examples.images, self.examples.ids[i]
        if self.preprocess.jpeg_draft and isinstance(images, FileImages):
            return self.preprocess.open_file(images.path(image_id))
        return images.open(image_id)


class EncodedDataset(Dataset):
    """Yields ``(index, (bytes or PIL-decoded tensor, is_jpeg) | None, error | None, False)`` for the nvjpeg path
    (:mod:`retbench.gpu_decode`): files are read here and decoded in batches on the device."""

    def __init__(self, examples: Examples) -> None:
        if not isinstance(examples.images, FileImages):
            raise DataError("preprocess decoder 'nvjpeg' reads image files; this task's images are arrays "
                            "(use decoder: pil)")
        self.examples, self.images = examples, examples.images

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[int, tuple[torch.Tensor, bool] | None, str | None, bool]:
        try:
            return i, read_encoded(self.images.path(self.examples.ids[i])), None, False
        except Exception as exc:  # noqa: BLE001 - any decoder failure is a bad image
            return i, None, f"{type(exc).__name__}: {exc}", False


def _collate_encoded(items: list) -> tuple[list[int], list[tuple[torch.Tensor, bool]], list[tuple[int, str]], int]:
    good = [(i, t) for i, t, err, _ in items if err is None]
    return [i for i, _ in good], [t for _, t in good], [(i, err) for i, _, err, _ in items if err is not None], 0


def _decode_on_device(idx: list[int], encoded: list[tuple[torch.Tensor, bool]], errors: list[tuple[int, str]],
                      preprocess: Preprocess, device: torch.device) -> tuple[list[int], torch.Tensor | None]:
    """The nvjpeg path's batch: decoded and transformed on ``device``; failures join ``errors``."""
    images = load_batch(encoded, preprocess, device)
    keep = [(i, t) for i, t in zip(idx, images) if isinstance(t, torch.Tensor)]
    errors += [(i, f"{type(t).__name__}: {t}") for i, t in zip(idx, images) if not isinstance(t, torch.Tensor)]
    return [i for i, _ in keep], torch.stack([t for _, t in keep]) if keep else None


def _collate(items: list) -> tuple[list[int], torch.Tensor | None, list[tuple[int, str]], int]:
    good = [(i, t) for i, t, err, _ in items if err is None]
    bad = [(i, err) for i, _, err, _ in items if err is not None]
    pixels = torch.stack([t for _, t in good]) if good else None
    return [i for i, _ in good], pixels, bad, sum(bool(w) for *_, w in items)


@dataclass
class Features:
    """Features of all examples of a task (rows of ``bad`` images are NaN)."""

    values: np.ndarray
    bad_ids: list[str] = field(default_factory=list)
    seconds: float = 0.0
    from_cache: bool = False
    key: str = ""

    @property
    def valid(self) -> np.ndarray:
        """Boolean mask of rows with features."""
        return ~np.isnan(self.values).any(axis=1)


def default_workers() -> int:
    """DataLoader workers: leave the cores to the model on small machines.

    With two cores or fewer the images are decoded in the main process between batches: a
    worker process can only run by taking a core from the model's intra-op threads. Measured
    on a 2-core machine, paired runs: the cheap ``classical`` adapter (~4 ms/image) kept
    0.55-0.83 of its bare throughput with one worker and 0.72-0.99 decoding in line;
    ``timm:resnet18`` 0.92-0.99 either way; 1000 px fundus photos were no faster with a worker
    (nor with a lower-priority worker or a decoding thread).
    """
    cores = os.cpu_count() or 2
    return 0 if cores <= 2 else min(8, cores - 1)


def largest_fitting_batch(try_batch: Callable[[int], None], start: int = 512) -> int:
    """The largest power-of-two batch ≤ ``start`` for which ``try_batch(n)`` runs without CUDA OOM."""
    n = start
    while n > 1:
        try:
            try_batch(n)
            return n
        except torch.cuda.OutOfMemoryError:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            n //= 2
    return 1


_AUTO_BATCH: dict[tuple[str, int, bool, str], int] = {}


def auto_batch_size(adapter: Adapter, preprocess: Preprocess, joint: bool) -> int:
    """A batch size that fits: probed once per model/input size on CUDA, a fixed default on CPU.

    On CUDA the largest power of two (≤ 512) whose forward pass fits in memory under the
    adapter's autocast is used, halved once for headroom (activations of real images vary
    with the allocator's fragmentation). On CPU memory is rarely the limit: 64 images, 16
    above 256 px.
    """
    if adapter.device.type != "cuda":
        return 64 if preprocess.size <= 256 else 16
    key = (adapter.name, preprocess.size, joint, adapter.inference_precision)  # fp32 needs more memory than autocast
    if key not in _AUTO_BATCH:
        encode = adapter.encode_image_joint if joint else adapter.encode_image
        dtype = adapter.autocast_dtype

        @torch.inference_mode()
        def try_batch(n: int) -> None:
            x = torch.zeros(n, 3, preprocess.size, preprocess.size, device=adapter.device)
            with torch.autocast("cuda", dtype=dtype, enabled=dtype is not None):
                encode(x)
            torch.cuda.synchronize(adapter.device)

        _AUTO_BATCH[key] = max(1, largest_fitting_batch(try_batch) // 2)
    return _AUTO_BATCH[key]


@torch.inference_mode()
def extract(
    adapter: Adapter,
    examples: Examples,
    preprocess: Preprocess,
    joint: bool = False,
    batch_size: int | None = None,
    num_workers: int | None = None,
    skip_bad_images: bool = False,
    pixel_cache: PixelCache | None = None,
) -> Features:
    """Encode every example; ``joint`` selects image-text space embeddings (zero-shot).

    With ``preprocess.decoder == "nvjpeg"`` (CUDA only) the files are read in the loader and decoded and
    transformed on the device in batches (:mod:`retbench.gpu_decode`); the pixel cache is not used.

    ``pixel_cache``: read preprocessed pixels from it and store those decoded here (the features are the
    same bit for bit: the cache holds :meth:`Preprocess.load`'s exact output); when entries were written,
    the cache is trimmed to its size bound at the end.

    ``batch_size=None`` picks one that fits (:func:`auto_batch_size`). On CUDA the forward
    pass runs under the adapter's autocast dtype, in channels-last layout for CNNs, and
    outputs stay on the device until the end (no host sync per batch).
    """
    device = adapter.device
    if device.type == "cpu":
        tune_malloc()  # each batch's large buffers reused, not page-faulted in anew (retbench.allocator)
    batch_size = batch_size or auto_batch_size(adapter, preprocess, joint)
    workers = default_workers() if num_workers is None else num_workers
    on_device = preprocess.decoder == "nvjpeg"
    if on_device:
        check_recipe(preprocess, device)
    loader = DataLoader(
        EncodedDataset(examples) if on_device else ImageDataset(examples, preprocess, pixel_cache),
        batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_collate_encoded if on_device else _collate,
        pin_memory=device.type == "cuda" and not on_device, prefetch_factor=4 if workers else None,
    )
    encode = adapter.encode_image_joint if joint else adapter.encode_image
    cuda = device.type == "cuda"
    autocast = torch.autocast("cuda", dtype=adapter.autocast_dtype, enabled=cuda and adapter.autocast_dtype is not None)
    memory_format = torch.channels_last if cuda and adapter.channels_last else torch.contiguous_format
    outputs, rows, bad = [], [], []
    written = 0
    on_cpu = device.type == "cpu"
    buffer: torch.Tensor | None = None  # CPU only: one float batch, reused (see normalize)
    start = time.perf_counter()
    with progress_bar(f"extract {adapter.name} {'joint' if joint else 'features'}", len(examples)) as advance:
        for idx, pixels, errors, wrote in loader:
            written += wrote
            if on_device:  # nvjpeg: the batch arrives encoded
                idx, pixels = _decode_on_device(idx, pixels, errors, preprocess, device)
            for i, err in errors:
                if not skip_bad_images:
                    raise DataError(f"unreadable image {_path_of(examples, i)}: {err} (use --skip-bad-images to skip)")
                bad.append(examples.ids[i])
            if pixels is not None:
                if on_cpu and (buffer is None or len(buffer) < len(pixels) or buffer.shape[1:] != pixels.shape[1:]):
                    buffer = torch.empty(pixels.shape, dtype=torch.float32)
                x = normalize(pixels.to(device, non_blocking=True), preprocess,
                              out=buffer).contiguous(memory_format=memory_format)
                with autocast:
                    out = encode(x).float()
                if buffer is not None and out.untyped_storage().data_ptr() == buffer.untyped_storage().data_ptr():
                    out = out.clone()  # an encoder that returns (a view of) its input: keep it past the next batch
                outputs.append(out)
                rows += idx
            advance(len(idx) + len(errors))
    if not outputs:
        raise DataError("no image could be read")
    feats = torch.cat(outputs).cpu().numpy()
    if written and pixel_cache is not None:
        pixel_cache.evict()
    values = np.full((len(examples), feats.shape[1]), np.nan, dtype=np.float32)
    values[np.asarray(rows)] = feats
    return Features(values, bad, time.perf_counter() - start)


def _path_of(examples: Examples, i: int) -> str:
    images = examples.images
    return str(images.path(examples.ids[i])) if hasattr(images, "path") else examples.ids[i]


_FILE_DIGESTS: dict[tuple[str, int, int, int, int], str] = {}


def file_digest(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, streamed; memoised per path, size, inode, mtime and ctime in this process."""
    stat = path.stat()
    memo_key = (str(path), stat.st_size, stat.st_ino, stat.st_mtime_ns, stat.st_ctime_ns)
    if memo_key not in _FILE_DIGESTS:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            while block := fh.read(chunk):
                digest.update(block)
        _FILE_DIGESTS[memo_key] = digest.hexdigest()
    return _FILE_DIGESTS[memo_key]


def image_content_digest(examples: Examples) -> str:
    """A digest of the bytes of every image, in order: the feature cache's content key.

    Unlike :meth:`Examples.image_list_hash` (ids and sizes, recorded in results and compared by
    the leaderboard), an image edited in place with the same byte size changes it. Files are
    hashed once per process (:func:`file_digest`); in-memory arrays are hashed by their bytes.
    """
    images = examples.images
    if isinstance(images, FileImages):
        lines = []
        for image_id in examples.ids:
            try:
                lines.append(f"{image_id}:{file_digest(images.path(image_id))}")
            except OSError:
                lines.append(f"{image_id}:unreadable")  # extract() fails on it, or skips and records it
    else:
        lines = images.fingerprint(examples.ids)  # the sha256 of the arrays' bytes, then the ids
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:24]


def _checksum(key: str, values: np.ndarray) -> str:
    """sha256 of an entry's key, dtype, shape and array bytes (stored with the entry, verified on load)."""
    digest = hashlib.sha256(f"{key}|{values.dtype.str}|{values.shape}|".encode())
    digest.update(np.ascontiguousarray(values).tobytes())
    return digest.hexdigest()


def _keyed_recipe(preprocess: Preprocess) -> dict[str, Any]:
    """The recipe as the feature cache key holds it: ``jpeg_draft`` and ``decoder`` only when not the default
    (keys from before those fields existed stay valid)."""
    d = preprocess.to_dict()
    if not d.get("jpeg_draft"):
        d.pop("jpeg_draft", None)
    if d.get("decoder") == "pil":
        d.pop("decoder", None)
    return d


class FeatureCache:
    """Features on disk keyed by model, weights, preprocessing, task version and image contents.

    Each entry stores the checksum of its array (with its key, dtype and shape); an entry that
    cannot be read or does not match is reported in one warning line and recomputed, never used.
    """

    def __init__(self, root: Path) -> None:
        self.root = root

    @staticmethod
    def key(adapter: Adapter, preprocess: Preprocess, task: str, version: str, image_hash: str, joint: bool,
            content: str | None = None) -> str:
        """Deterministic cache key (hex); ``content`` is :func:`image_content_digest` of the images."""
        ident = {
            "model": adapter.name, "weights": adapter.weights_identity(), "preprocess": _keyed_recipe(preprocess),
            "task": task, "task_version": version, "images": image_hash, "space": "joint" if joint else "features",
        }
        if content is not None:
            ident["content"] = content
        if adapter.inference_precision != "fp32":  # autocast features are other numbers (fp32 keys stay as they were)
            ident["precision"] = adapter.inference_precision
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]

    def load(self, key: str, rows: int | None = None) -> Features | None:
        """Cached features of ``rows`` examples, or ``None`` (absent, or damaged: warned, to be recomputed)."""
        npy, meta = self.root / f"{key}.npy", self.root / f"{key}.json"
        if not (npy.is_file() and meta.is_file()):
            return None
        try:
            info: dict[str, Any] = json.loads(meta.read_text())
            values = np.load(npy, allow_pickle=False)
        except Exception as exc:  # noqa: BLE001 - truncated, flipped or foreign bytes alike
            warn(f"feature cache entry {npy} is damaged ({type(exc).__name__}); recomputing it")
            return None
        if not isinstance(info, dict) or info.get("checksum") != _checksum(key, values) \
                or (rows is not None and values.shape[:1] != (rows,)):
            warn(f"feature cache entry {npy} does not match its checksum (damaged or replaced); recomputing it")
            return None
        return Features(values, info.get("bad_ids", []), info.get("seconds", 0.0), True, key)

    def save(self, key: str, features: Features, info: dict[str, Any]) -> None:
        """Write features then their metadata with the checksum, each atomically (metadata last marks completion)."""
        import io

        buf = io.BytesIO()
        np.save(buf, features.values)
        atomic_write_bytes(self.root / f"{key}.npy", buf.getvalue())
        atomic_write_json(self.root / f"{key}.json", {**info, "bad_ids": features.bad_ids, "seconds": features.seconds,
                                                      "shape": list(features.values.shape),
                                                      "dtype": features.values.dtype.str,
                                                      "checksum": _checksum(key, features.values)})
