"""A disk cache of preprocessed pixels: the ``uint8`` tensors :meth:`Preprocess.load` makes, before normalisation.

Decoding and resizing a fundus photograph costs far more than a small model's forward pass (1000 px JPEG:
~22 ms; 3888×2592: ~270 ms). The result depends only on the image's bytes and the geometric part of the recipe
(:meth:`Preprocess.pixel_recipe`: size, resize mode, crop fraction, interpolation, fundus crop, grey, JPEG draft),
not on mean/std (applied per batch on the device), so every model and task with one recipe — most 224 px
adapters share one — reads the pixels decoded once.

Layout, under ``<cache>/pixels/``::

    <recipe hash>/recipe.json              the recipe, for people
    <recipe hash>/<c[:2]>/<c>.px           one image: c = sha256 of the image file's bytes

Each entry is a 64-byte header (magic, version, channels, height, width, the payload's CRC-32 and length, and
the first 32 bytes of the entry's key) followed by the raw ``uint8`` (C, H, W) pixels; it is read with one
``readv`` into the array the pixels are returned in. An entry whose size, header, key or CRC does not match is
reported in one ``warning:`` line and rebuilt from the image, never read as pixels.

Concurrency: entries are written whole to a temporary file and renamed (:func:`atomic_write_bytes`), so two
processes writing one entry (a sweep's parallel jobs) each rename a complete file, and a reader sees a complete
file or none. Eviction: after an extraction that wrote entries, the oldest entries by modification time are
deleted until the cache holds at most ``$RETBENCH_PIXEL_CACHE_MAX_GB`` (default 20) GB; a hit refreshes an
entry's time at most once a minute (least recently used first, without relying on ``atime``). An entry deleted
while read stays readable to the reader (POSIX); one deleted before it is opened is a miss.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import json
import os
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from retbench.atomic_files import atomic_write_bytes
from retbench.errors import RetbenchError, warn
from retbench.preprocess import Preprocess

MAGIC = b"RBPIXEL\x00"
VERSION = 1
HEADER = struct.Struct("<8sHHIIIQ32s")  # magic, version, channels, height, width, payload crc32, length, key
HEADER_SIZE = 64
assert HEADER.size == HEADER_SIZE
SUFFIX = ".px"
MAX_GB_ENV = "RETBENCH_PIXEL_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
TOUCH_AFTER_S = 60.0
STALE_TMP_S = 3600.0  # a temporary file this old is a killed writer's


def max_bytes_from_env() -> int:
    """The size bound in bytes: ``$RETBENCH_PIXEL_CACHE_MAX_GB`` (GB = 10^9 bytes, default 20).

    Raises a one-line :class:`RetbenchError` when it is not a number >= 0.
    """
    raw = os.environ.get(MAX_GB_ENV, "").strip()
    if not raw:
        return int(DEFAULT_MAX_GB * 1e9)
    try:
        gb = float(raw)
    except ValueError:
        gb = -1.0
    if not gb >= 0:  # also NaN
        raise RetbenchError(f"${MAX_GB_ENV} must be a number of GB >= 0; got {raw!r}")
    return int(gb * 1e9)


@functools.lru_cache(maxsize=64)
def recipe_hash(preprocess: Preprocess) -> str:
    """A short hex hash of the recipe's pixel fields (:meth:`Preprocess.pixel_recipe`)."""
    return hashlib.sha256(json.dumps(preprocess.pixel_recipe(), sort_keys=True).encode()).hexdigest()[:16]


class PixelCache:
    """Preprocessed ``uint8`` pixels on disk, keyed by the image's content digest and the pixel recipe."""

    def __init__(self, root: Path, max_bytes: int | None = None) -> None:
        """``root``: the cache folder (``<cache>/pixels``); ``max_bytes``: the size bound (default: from the environment)."""
        self.root = Path(root)
        self.max_bytes = max_bytes_from_env() if max_bytes is None else max_bytes
        self._write_failed = False
        self._recipes: dict[str, Path] = {}
        self._folders: dict[Preprocess, str] = {}

    # ------------------------------------------------------------------ layout
    def folder(self, preprocess: Preprocess) -> Path:
        """The recipe's folder (its ``recipe.json`` is written with the first entry)."""
        rh = recipe_hash(preprocess)
        return self.root / rh

    def path(self, preprocess: Preprocess, digest: str) -> Path:
        """Where the entry of the image with content ``digest`` (hex sha256 of its file) lives."""
        return Path(self._entry_path(preprocess, digest))

    @staticmethod
    def _key(preprocess: Preprocess, digest: str) -> bytes:
        """The 32 bytes stored in the entry's header: the recipe and content it holds the pixels of."""
        return hashlib.sha256(f"{recipe_hash(preprocess)}|{digest}".encode()).digest()

    # ------------------------------------------------------------------ read / write
    def get(self, preprocess: Preprocess, digest: str) -> torch.Tensor | None:
        """The cached pixels, or ``None`` (absent; or damaged: warned once, to be rebuilt by :meth:`put`)."""
        path = self._entry_path(preprocess, digest)
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None  # absent (or evicted meanwhile): a miss
        try:
            st = os.fstat(fd)
            if st.st_size < HEADER_SIZE:
                return self._damaged(path, f"{st.st_size} bytes, shorter than its header")
            # one read into the array the tensor will own: no map to set up and tear down, no second copy
            buf = np.empty(st.st_size, dtype=np.uint8)
            got = os.readv(fd, [buf.data])
            if got != st.st_size:
                return self._damaged(path, f"read {got} of its {st.st_size} bytes")
            tensor = self._decode(buf, self._key(preprocess, digest), path)
        except (OSError, ValueError) as exc:
            return self._damaged(path, f"{type(exc).__name__}: {exc}")
        finally:
            os.close(fd)
        if tensor is not None and time.time() - st.st_mtime > TOUCH_AFTER_S:
            with contextlib.suppress(OSError):
                os.utime(path)  # least recently *used* goes first
        return tensor

    def _entry_path(self, preprocess: Preprocess, digest: str) -> str:
        """:meth:`path` as a string, its recipe folder worked out once per recipe (a hit's path is on the hot path)."""
        folder = self._folders.get(preprocess)
        if folder is None:
            folder = self._folders[preprocess] = str(self.folder(preprocess))
        return f"{folder}/{digest[:2]}/{digest}{SUFFIX}"

    def _decode(self, buf: np.ndarray, key: bytes, path: str | Path) -> torch.Tensor | None:
        """The pixels of an entry's bytes ``buf`` (header and payload), or None when they are not a sound entry."""
        magic, version, c, h, w, crc, length, stored_key = HEADER.unpack_from(buf.data, 0)
        if magic != MAGIC or version != VERSION:
            return self._damaged(path, "not a pixel cache entry (bad magic or version)")
        if length != c * h * w or len(buf) != HEADER_SIZE + length:
            return self._damaged(path, f"{len(buf)} bytes, its header says {HEADER_SIZE + c * h * w} (truncated?)")
        if stored_key != key:
            return self._damaged(path, "its key does not match its name (moved or replaced)")
        payload = buf[HEADER_SIZE:]
        if zlib.crc32(payload.data) != crc:
            return self._damaged(path, "its CRC-32 does not match (damaged)")
        return torch.from_numpy(payload.reshape(c, h, w))

    @staticmethod
    def _damaged(path: str | Path, why: str) -> None:
        warn(f"pixel cache entry {path} is damaged ({why}); rebuilding it from the image")
        return None

    def put(self, preprocess: Preprocess, digest: str, pixels: torch.Tensor) -> bool:
        """Store ``pixels`` (``uint8`` (C, H, W)) atomically; False when it could not be written (extraction goes on
        without caching; warned once per cache object, except for a full disk or quota, which the feature cache or
        result write that follows reports in its own one line)."""
        if self._write_failed:
            return False
        arr = np.ascontiguousarray(pixels.numpy(), dtype=np.uint8)
        if arr.ndim != 3:
            raise ValueError(f"pixels must be (C, H, W); got shape {tuple(arr.shape)}")
        c, h, w = arr.shape
        payload = arr.tobytes()
        header = HEADER.pack(MAGIC, VERSION, c, h, w, zlib.crc32(payload), len(payload), self._key(preprocess, digest))
        try:
            self._note_recipe(preprocess)
            # no fsync: a file a power cut leaves short fails its size/CRC check and is rebuilt
            atomic_write_bytes(self.path(preprocess, digest), header + payload, fsync=False)
        except RetbenchError as exc:
            self._write_failed = True
            cause = exc.__context__  # the OSError atomic_write_bytes turned into this one line
            if not (isinstance(cause, OSError) and cause.errno in (errno.ENOSPC, errno.EDQUOT)):
                warn(f"pixel cache: {exc}; going on without caching pixels (--no-pixel-cache silences this)")
            # a full disk is left to the next write that must succeed (features, results): its error is the one line
            return False
        return True

    def _note_recipe(self, preprocess: Preprocess) -> None:
        folder = self.folder(preprocess)
        if folder.name not in self._recipes:
            note = folder / "recipe.json"
            if not note.is_file():
                atomic_write_bytes(note, (json.dumps(preprocess.pixel_recipe(), indent=1, sort_keys=True) + "\n").encode())
            self._recipes[folder.name] = folder

    # ------------------------------------------------------------------ size bound
    def entries(self) -> list[tuple[float, int, Path]]:
        """Every entry as (modification time, size, path); entries vanishing meanwhile are left out. Temporary files
        a killed writer left (older than an hour) are deleted on the way."""
        out: list[tuple[float, int, Path]] = []
        stale_before = time.time() - STALE_TMP_S
        if not self.root.is_dir():
            return out
        for recipe in os.scandir(self.root):
            if not recipe.is_dir(follow_symlinks=False):
                continue
            for shard in os.scandir(recipe.path):
                if not shard.is_dir(follow_symlinks=False):
                    continue
                for entry in os.scandir(shard.path):
                    is_tmp = entry.name.startswith(".") and entry.name.endswith(".tmp")
                    if not (entry.name.endswith(SUFFIX) or is_tmp):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                        if is_tmp and st.st_mtime < stale_before:
                            os.unlink(entry.path)
                    except OSError:
                        continue
                    if not is_tmp:
                        out.append((st.st_mtime, st.st_size, Path(entry.path)))
        return out

    def size(self) -> int:
        """Bytes held by entries."""
        return sum(size for _, size, _ in self.entries())

    def evict(self, max_bytes: int | None = None) -> int:
        """Delete least recently used entries until at most ``max_bytes`` (default: the cache's bound) remain;
        returns the bytes freed. Safe beside other processes reading, writing or evicting."""
        limit = self.max_bytes if max_bytes is None else max_bytes
        entries = self.entries()
        total = sum(size for _, size, _ in entries)
        freed = 0
        if total <= limit:
            return 0
        for _, size, path in sorted(entries, key=lambda e: e[0]):
            if total - freed <= limit:
                break
            try:
                path.unlink()
                freed += size
            except FileNotFoundError:
                freed += size  # another process evicted it
            except OSError:
                continue
        return freed

    def describe(self) -> dict[str, Any]:
        """Folder, bound and current size (for messages and benchmarks)."""
        return {"root": str(self.root), "max_bytes": self.max_bytes, "bytes": self.size()}
