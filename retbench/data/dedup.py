"""Keep evaluation test images out of pretraining data, matching by content, not by name.

The corpus holds the same photographs under different names, sizes and encodings (CSDI's
cataract images re-appear at 224 px in eye4class; the mx_dme paired subset repeats files of
its fundus and OCT subsets). Two images are taken to be the same when their perceptual hashes
are close: grey levels squashed to 64 × 64, a 2-D DCT, the 16 × 16 lowest frequencies less the
DC term (255 bits), each bit = coefficient above the median. On the bundled corpus re-encoded
copies of one photograph differ in at most 6 bits and distinct photographs in at least 14
(tests/test_dedup.py measures both), so the default threshold is 10 bits.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.fft import dctn

from retbench.atomic_files import atomic_write_bytes
from retbench.data.examples import Examples, FileImages

HASH_SIDE = 64
HASH_FREQ = 16
HASH_BITS = HASH_FREQ * HASH_FREQ - 1
DEFAULT_MAX_DISTANCE = 10


def perceptual_hash(image: Image.Image) -> np.ndarray:
    """255-bit DCT hash of ``image`` (bool array); robust to resizing, aspect squashing and JPEG."""
    grey = np.asarray(image.convert("L").resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BILINEAR), dtype=np.float64)
    coeffs = dctn(grey, norm="ortho")[:HASH_FREQ, :HASH_FREQ].ravel()[1:]
    return coeffs > np.median(coeffs)


def open_for_hash(path: Path) -> Image.Image:
    """Open an image file, letting JPEG decode at reduced scale (the hash needs only 64 px)."""
    with Image.open(path) as im:
        im.draft("RGB", (4 * HASH_SIDE, 4 * HASH_SIDE))
        from retbench.preprocess import to_8bit

        return to_8bit(im).convert("RGB")


@dataclass(frozen=True)
class ImageItem:
    """One image to hash: where it comes from (task or folder), its id, and how to open it."""

    source: str
    image_id: str
    key: str  # content-stable cache key (path, size and mtime, or the array's digest)
    opener: Callable[[], Image.Image]


class HashCache:
    """Perceptual hashes on disk (one JSON file), keyed by :attr:`ImageItem.key`."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.data: dict[str, str] = {}
        if path is not None and path.is_file():
            self.data = json.loads(path.read_text())
        self.dirty = False

    def get(self, item: ImageItem) -> np.ndarray:
        if item.key not in self.data:
            bits = perceptual_hash(item.opener())
            self.data[item.key] = np.packbits(bits).tobytes().hex()
            self.dirty = True
        return np.unpackbits(np.frombuffer(bytes.fromhex(self.data[item.key]), dtype=np.uint8))[:HASH_BITS].astype(bool)

    def save(self) -> None:
        if self.path is not None and self.dirty:
            atomic_write_bytes(self.path, json.dumps(self.data, sort_keys=True).encode())
            self.dirty = False


def hash_items(items: Sequence[ImageItem], cache: HashCache) -> np.ndarray:
    """(N, 255) bool hashes of ``items``."""
    out = np.zeros((len(items), HASH_BITS), dtype=bool)
    for i, item in enumerate(items):
        out[i] = cache.get(item)
    cache.save()
    return out


def nearest(candidates: np.ndarray, references: np.ndarray, chunk: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """For each candidate hash: the Hamming distance to, and index of, its nearest reference hash."""
    if len(references) == 0:
        return np.full(len(candidates), HASH_BITS + 1), np.full(len(candidates), -1)
    ref = references.astype(np.float32)
    dist = np.empty(len(candidates), dtype=np.int64)
    arg = np.empty(len(candidates), dtype=np.int64)
    for start in range(0, len(candidates), chunk):
        c = candidates[start: start + chunk].astype(np.float32)
        # Hamming distance through dot products: |a xor b| = |a| + |b| - 2 a.b
        d = c.sum(1, keepdims=True) + ref.sum(1)[None, :] - 2 * c @ ref.T
        arg[start: start + chunk] = d.argmin(1)
        dist[start: start + chunk] = np.rint(d.min(1)).astype(np.int64)
    return dist, arg


@dataclass(frozen=True)
class Exclusion:
    """A pretraining image dropped because it shows an evaluation test image."""

    image: str
    matches_task: str
    matches_image: str
    distance: int

    def to_dict(self) -> dict[str, object]:
        return {"image": self.image, "matches_task": self.matches_task, "matches_image": self.matches_image,
                "distance": self.distance}


def exclude_matches(
    pretrain: Sequence[ImageItem],
    held_out: Sequence[ImageItem],
    cache: HashCache,
    max_distance: int = DEFAULT_MAX_DISTANCE,
) -> tuple[list[int], list[Exclusion]]:
    """Indices of ``pretrain`` to keep, and what was excluded for matching any ``held_out`` image."""
    dist, arg = nearest(hash_items(pretrain, cache), hash_items(held_out, cache))
    keep, excluded = [], []
    for i, (d, j) in enumerate(zip(dist, arg)):
        if d <= max_distance:
            ref = held_out[j]
            excluded.append(Exclusion(f"{pretrain[i].source}:{pretrain[i].image_id}", ref.source, ref.image_id, int(d)))
        else:
            keep.append(i)
    return keep, excluded


def default_cache() -> HashCache:
    """The hash cache shared by pretraining and task loading: ``$RETBENCH_CACHE/phash.json``."""
    import os

    root = Path(os.environ.get("RETBENCH_CACHE") or Path.home() / ".cache" / "retbench")
    return HashCache(root / "phash.json")


def near_duplicate_pairs(hashes: np.ndarray, max_distance: int = DEFAULT_MAX_DISTANCE,
                         chunk: int = 512) -> list[tuple[int, int]]:
    """Every pair (i < j) of rows of ``hashes`` at most ``max_distance`` bits apart."""
    h = hashes.astype(np.float32)
    ones = h.sum(1)
    pairs: list[tuple[int, int]] = []
    for start in range(0, len(h), chunk):
        d = ones[start: start + chunk, None] + ones[None, :] - 2 * h[start: start + chunk] @ h.T
        rows, cols = np.nonzero(np.rint(d) <= max_distance)
        pairs += [(start + int(r), int(c)) for r, c in zip(rows, cols) if start + r < c]
    return pairs


def merge_near_duplicate_groups(task: str, examples: Examples, cache: HashCache | None = None) -> tuple[list[str], int]:
    """Patient ids in which images that show the same photograph share one group.

    Augmented or re-encoded copies of one photograph filed as different images would otherwise land
    on both sides of a split. Groups are merged transitively: every image of the patients of two
    near-duplicates joins one group (named after its smallest patient id). Returns the new ids and
    the number of near-duplicate pairs found.
    """
    items = example_items(task, examples, range(len(examples)))
    pairs = near_duplicate_pairs(hash_items(items, cache or default_cache()))
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])
            x = parent[x]
        return x

    for i, j in pairs:
        a, b = find(examples.patients[i]), find(examples.patients[j])
        if a != b:
            parent[max(a, b)] = min(a, b)
    return [find(p) for p in examples.patients], len(pairs)


def file_items(source: str, paths: Iterable[Path], root: Path | None = None) -> list[ImageItem]:
    """Items for image files; ids are paths relative to ``root`` when given."""
    items = []
    for p in paths:
        stat = p.stat()
        image_id = str(p.relative_to(root)) if root is not None else str(p)
        items.append(ImageItem(source, image_id, f"{p.resolve()}|{stat.st_size}|{stat.st_mtime_ns}",
                               partial(open_for_hash, p)))
    return items


def example_items(task: str, examples: Examples, indices: Sequence[int] | np.ndarray) -> list[ImageItem]:
    """Items for ``indices`` of already loaded :class:`~retbench.data.examples.Examples`."""
    images = examples.images
    if isinstance(images, FileImages):
        return file_items(task, [images.path(examples.ids[i]) for i in indices], root=images.root)
    digest = hashlib.sha256("".join(images.fingerprint(examples.ids[:1])).encode()).hexdigest()[:16]
    return [ImageItem(task, examples.ids[i], f"array:{digest}:{examples.ids[i]}", partial(images.open, examples.ids[i]))
            for i in indices]
