"""Source readers, one per ``source.kind``: csv, folder, npz, hf_disk."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import numpy as np

from retbench.data.examples import ArrayImages, Examples, FileImages, RootGuard, missing_message
from retbench.data.reading import (
    IMAGE_SUFFIXES,
    LabelMapper,
    drop_conflicting_files,
    drop_relabelled_rows,
    patient_of,
    read_frame,
    require_path,
)
from retbench.errors import DataError
from retbench.registry import Registry
from retbench.spec import TaskSpec

SourceReader = Callable[[TaskSpec, Path], Examples]
SOURCES: Registry[SourceReader] = Registry("source kind")


Row = tuple[str, int, str, str | None]  # image id, class index, patient, given split


def _finish(spec: TaskSpec, rows: list[Row], images: Any, dropped: dict) -> Examples:
    ids = [r[0] for r in rows]
    given = [r[3] for r in rows if r[3] is not None]
    return Examples(
        ids=ids,
        labels=np.array([r[1] for r in rows], dtype=np.int64),
        patients=[r[2] for r in rows],
        given_split=given if len(given) == len(rows) and rows else None,
        images=images,
        dropped={k: v for k, v in dropped.items() if v},
    )


@SOURCES.register("csv")
def read_csv(spec: TaskSpec, root: Path) -> Examples:
    """CSV manifest(s): one row per image; ``files`` gives one CSV per given split."""
    src = spec.source
    guard = RootGuard(spec, root)
    guard.check_spec()
    files: dict[str | None, str] = {split: rel for split, rel in src.files.items()} or {None: src.path}
    mapper = LabelMapper(spec)
    rows: list[Row] = []
    dropped: defaultdict[str, list[str]] = defaultdict(list)
    origins: list[tuple[Path, int]] = []
    image_root: Path | None = None
    for split, rel in files.items():
        csv_path = require_path(root / rel, spec, root, "file")
        image_root = root / src.image_root if src.image_root is not None else csv_path.parent
        frame = read_frame(spec, root, csv_path)
        for col in [src.image_column, src.label_column, src.patient_column, src.split_column]:
            if col is not None and col not in frame.columns:
                raise DataError(f"{csv_path}: no column '{col}' (columns: {', '.join(map(str, frame.columns))})")
        for i, rec in enumerate(frame.to_dict("records")):
            where = f"{csv_path}: row {i + 2}"
            image_id = str(rec[src.image_column])
            guard.check_image(image_root, image_id, where, src.image_column)
            label = mapper(rec[src.label_column], where)
            if label is None:
                if not src.drop_missing_labels:
                    raise DataError(f"{where}: missing label in column '{src.label_column}'")
                dropped["missing_label"].append(image_id)
                continue
            patient = patient_of(spec, image_id, rec.get(src.patient_column) if src.patient_column else None)
            row_split = split if split is not None else (rec[src.split_column] if src.split_column else None)
            rows.append((image_id, label, patient, row_split))
            origins.append((csv_path, i + 2))
    rows, warnings = drop_relabelled_rows(spec, rows, origins, lambda label: spec.classes[label].name, dropped)
    examples = _finish(spec, rows, FileImages(cast(Path, image_root)), dropped)  # files is never empty
    examples.warnings.extend(warnings)
    return examples


@SOURCES.register("folder")
def read_folder(spec: TaskSpec, root: Path) -> Examples:
    """Folder per class (optionally inside per-split folders): ``<path>[/<split>]/<class>/<image>``."""
    RootGuard(spec, root).check_spec()
    src = spec.source
    base = require_path(root / src.path, spec, root, "folder")
    split_dirs: dict[str | None, str] = {split: sub for split, sub in src.split_dirs.items()} or {None: ""}
    mapper = LabelMapper(spec)
    rows: list[Row] = []
    for split, sub in split_dirs.items():
        split_root = base / sub
        if not split_root.is_dir():
            raise DataError(missing_message(spec, root, [str(split_root.relative_to(root)) + "/"], 1))
        for class_dir in sorted(p for p in split_root.iterdir() if p.is_dir()):
            label = mapper.required(class_dir.name, f"{class_dir}")
            for img in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                image_id = str(img.relative_to(base))
                rows.append((image_id, label, patient_of(spec, image_id), split))
    dropped: dict[str, list[str]] = {}
    if src.drop_conflicting_duplicates:
        rows, dropped["conflicting_duplicate"] = drop_conflicting_files(rows, base)
    return _finish(spec, rows, FileImages(base), dropped)


@SOURCES.register("npz")
def read_npz(spec: TaskSpec, root: Path) -> Examples:
    """``.npz`` with ``<split>_images`` and ``<split>_labels`` arrays (MedMNIST layout)."""
    RootGuard(spec, root).check_spec()
    path = require_path(root / spec.source.path, spec, root, "file")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable .npz: {exc}") from None
    mapper = LabelMapper(spec)
    splits = [k[: -len("_images")] for k in arrays if k.endswith("_images")]
    if not splits:
        raise DataError(f"{path}: no '<split>_images' arrays (found: {', '.join(arrays)})")
    rows: list[Row] = []
    images: dict[str, np.ndarray | list[np.ndarray]] = {}
    for split in sorted(splits, key=["train", "val", "test"].index if set(splits) <= {"train", "val", "test"} else str):
        if f"{split}_labels" not in arrays:
            raise DataError(f"{path}: '{split}_images' has no matching '{split}_labels'")
        images[split] = arrays[f"{split}_images"]
        for i, lab in enumerate(np.asarray(arrays[f"{split}_labels"]).reshape(len(images[split]), -1)[:, 0]):
            image_id = f"{split}/{i}"
            rows.append((image_id, mapper.required(lab.item(), f"{path}: {split}_labels[{i}]"), f"img:{image_id}", split))
    return _finish(spec, rows, ArrayImages(images), {})


@SOURCES.register("hf_disk")
def read_hf_disk(spec: TaskSpec, root: Path) -> Examples:
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (DatasetDict = given splits)."""
    RootGuard(spec, root).check_spec()
    import datasets

    src = spec.source
    path = require_path(root / src.path, spec, root, "folder")
    ds = datasets.load_from_disk(str(path))
    parts = dict(ds.items()) if isinstance(ds, datasets.DatasetDict) else {None: ds}
    mapper = LabelMapper(spec)
    rows: list[Row] = []
    arrays: dict[str, np.ndarray | list[np.ndarray]] = {}
    for split, part in parts.items():
        feature = part.features.get(src.label_column)
        if feature is None:
            raise DataError(f"{path}: no column '{src.label_column}' (columns: {', '.join(part.column_names)})")
        names = getattr(feature, "names", None)
        key = split or "all"
        from retbench.preprocess import to_8bit

        arrays[key] = [np.asarray(to_8bit(im).convert("RGB")) for im in part[src.image_column]]
        for i, raw in enumerate(part[src.label_column]):
            value = names[raw] if names else raw
            label = mapper.required(value, f"{path}: {key}[{i}]")
            rows.append((f"{key}/{i}", label, f"img:{key}/{i}", split))
    return _finish(spec, rows, ArrayImages(arrays), {})
