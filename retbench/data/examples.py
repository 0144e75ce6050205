"""Examples of a task: image ids, integer labels, patient ids and given splits; how their images are opened, and
the data root they must lie in. The readers that build them are in :mod:`retbench.data.loading`."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from retbench.errors import DataError, RetbenchError, SpecError
from retbench.spec import TaskSpec


class FileImages:
    """Opens images stored as files under ``root`` (ids are relative paths)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def path(self, image_id: str) -> Path:
        return self.root / image_id

    def open(self, image_id: str) -> Image.Image:
        """The decoded image; 16/32-bit grey samples scaled to 8 bits by their bit depth (8-bit images as stored)."""
        from retbench.preprocess import to_8bit

        with Image.open(self.path(image_id)) as im:
            im.load()
            return to_8bit(im)

    def missing(self, ids: list[str]) -> list[str]:
        return [i for i in ids if not self.path(i).is_file()]

    def fingerprint(self, ids: list[str]) -> list[str]:
        return [f"{i}:{self.path(i).stat().st_size}" for i in ids]


class ArrayImages:
    """Serves images held in memory as uint8 arrays (ids are ``split/index``)."""

    def __init__(self, arrays: dict[str, np.ndarray | list[np.ndarray]]) -> None:
        self.arrays = arrays

    def open(self, image_id: str) -> Image.Image:
        split, _, idx = image_id.partition("/")
        arr = self.arrays[split][int(idx)]
        if arr.dtype == np.uint16:  # scaled by the bit depth, as 16-bit files are (uint8 arrays as stored)
            arr = ((arr.astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
        return Image.fromarray(arr if arr.ndim == 3 else np.stack([arr] * 3, axis=-1))

    def missing(self, ids: list[str]) -> list[str]:
        return []

    def fingerprint(self, ids: list[str]) -> list[str]:
        digest = hashlib.sha256()
        for split in sorted(self.arrays):
            for arr in self.arrays[split]:
                digest.update(np.ascontiguousarray(arr).tobytes())
        return [digest.hexdigest()] + ids


@dataclass
class Examples:
    """All labelled examples of a task, in a fixed order."""

    ids: list[str]
    labels: np.ndarray
    patients: list[str]
    given_split: list[str] | None
    images: FileImages | ArrayImages
    dropped: dict[str, list[str]] = field(default_factory=dict)
    item_of: np.ndarray | None = None  # per row, its item (a retrieval pair): an item's rows always share a split
    near_duplicate_pairs: int | None = None  # with splits.group_near_duplicates: pairs merged into one group
    warnings: list[str] = field(default_factory=list)  # data problems let through (printed once, recorded in results)

    def __len__(self) -> int:
        return len(self.ids)

    def image_list_hash(self, indices: np.ndarray | None = None) -> str:
        """sha256 over the exact images (ids and sizes) — part of the feature cache key."""
        ids = self.ids if indices is None else [self.ids[i] for i in indices]
        blob = "\n".join(self.images.fingerprint(ids)).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def data_root(explicit: str | os.PathLike | None = None) -> Path:
    """The data root: ``explicit`` (``--data-root``), else ``$RETBENCH_DATA``."""
    value = explicit or os.environ.get("RETBENCH_DATA")
    if not value:
        raise RetbenchError("no data root: pass --data-root DIR or set RETBENCH_DATA")
    root = Path(value).expanduser()
    if not root.is_dir():
        raise RetbenchError(f"data root does not exist or is not a folder: {root}")
    return root


class RootGuard:
    """Keeps every path a task reads inside the data root.

    A path is judged by its *joined* form, normalised lexically (``os.path.abspath``: ``..`` removed, symlinks not
    followed): ``../outside/labels.csv``, ``/etc/passwd`` or an image id ``../../x.png`` are refused with one line
    naming the spec file, the key or CSV row and the path, while a symlink inside the root may point anywhere.
    """

    def __init__(self, spec: TaskSpec, root: Path) -> None:
        self.spec, self.root = spec, root
        self.base = os.path.abspath(root)
        self.prefix = self.base if self.base.endswith(os.sep) else self.base + os.sep

    def outside(self, path: str | os.PathLike) -> str | None:
        """``path`` normalised when it lies outside the data root, else None."""
        full = os.path.abspath(path)
        return None if full == self.base or full.startswith(self.prefix) else full

    def check_spec(self) -> None:
        """Every path of the spec's ``source`` section (path, files, image_root, join paths, split_dirs)."""
        src = self.spec.source
        joins = self.spec.raw.get("source", {}).get("join") if isinstance(self.spec.raw.get("source"), dict) else None
        checks = [("source.path", src.path, self.root / src.path)]
        checks += [(f"source.files.{split}", rel, self.root / rel) for split, rel in src.files.items()]
        if src.image_root is not None:
            checks.append(("source.image_root", src.image_root, self.root / src.image_root))
        checks += [("source.join.path" if not isinstance(joins, list) else f"source.join[{i}].path", j.path,
                    self.root / j.path) for i, j in enumerate(src.join)]
        checks += [(f"source.split_dirs.{split}", sub, self.root / src.path / sub) for split, sub in src.split_dirs.items()]
        for key, value, joined in checks:
            if (full := self.outside(joined)) is not None:
                raise SpecError(self.spec.file, key, f"'{value}' is outside the data root {self.root} (resolves to "
                                f"{full}); task files must lie inside it")

    def check_image(self, image_root: Path, image_id: str, where: str, column: str | None = None) -> None:
        """An image id read from ``where`` (a CSV row), joined to ``image_root``."""
        if (full := self.outside(image_root / image_id)) is not None:
            col = f" (column '{column}')" if column else ""
            raise DataError(f"{where}: image '{image_id}'{col} is outside the data root {self.root} (resolves to "
                            f"{full}; task spec {self.spec.file}); images must lie inside it")


def check_examples(spec: TaskSpec, root: Path, examples: Examples) -> None:
    """Fail with one message if ``examples`` is empty or any of its images is missing."""
    if len(examples) == 0:
        raise DataError(f"task '{spec.name}': the source under {root} yields no labelled examples")
    if isinstance(examples.images, FileImages):  # the readers check each CSV row; this catches any other way in
        guard = RootGuard(spec, root)
        for image_id in examples.ids:
            guard.check_image(examples.images.root, image_id, f"task '{spec.name}'")
    missing = examples.images.missing(examples.ids)
    if missing:
        raise DataError(missing_message(spec, root, missing, len(examples)))


def missing_message(spec: TaskSpec, root: Path, missing: list[str], total: int) -> str:
    """One message saying which files are missing and the layout expected."""
    src = spec.source
    msg = (
        f"task '{spec.name}': {len(missing)} of {total} images missing under {root} "
        f"(first: {missing[0]})"
    )
    if src.layout:
        msg += f"; expected layout: {src.layout}"
    if src.download:
        msg += f"; download: {src.download}"
    return msg
