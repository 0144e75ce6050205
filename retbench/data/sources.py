"""Source readers, one per ``source.kind``: csv, folder, npz, hf_disk."""

from __future__ import annotations

import ast
import hashlib
import math
import os
import re
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from retbench.data.examples import ArrayImages, Examples, FileImages, RootGuard, missing_message
from retbench.errors import DataError
from retbench.registry import Registry
from retbench.spec import TaskSpec

SourceReader = Callable[[TaskSpec, Path], Examples]
SOURCES: Registry[SourceReader] = Registry("source kind")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def _raw_key(value: Any) -> str | None:
    """Normalise a raw label value to the string compared with ``match`` (None if missing)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


class LabelMapper:
    """Maps raw label values to class indices per the spec (match lists, bins, list cells)."""

    def __init__(self, spec: TaskSpec) -> None:
        self.spec = spec
        self.lookup = {m: i for i, c in enumerate(spec.classes) for m in c.match}

    def __call__(self, value: Any, where: str) -> int | None:
        src = self.spec.source
        if src.bins:
            key = _raw_key(value)
            if key is None:
                return None
            try:
                return int(np.digitize(float(key), src.bins))
            except ValueError:
                raise DataError(f"{where}: label '{value}' is not a number (the task bins a score)") from None
        if src.label_format == "list":
            return self._from_list(value, where)
        key = _raw_key(value)
        if key is None:
            return None
        if key not in self.lookup:
            raise DataError(f"{where}: label '{key}' is not in the class list {sorted(self.lookup)}")
        return self.lookup[key]

    def _from_list(self, value: Any, where: str) -> int | None:
        try:
            items = ast.literal_eval(value) if isinstance(value, str) else value
        except (ValueError, SyntaxError):
            raise DataError(f"{where}: label cell {value!r} is not a list") from None
        hits = {self.lookup[str(i)] for i in items if str(i) in self.lookup}
        if len(hits) != 1:
            raise DataError(
                f"{where}: label list {items} must name exactly one class of {sorted(self.lookup)}, names {len(hits)}"
            )
        return hits.pop()


def patient_of(spec: TaskSpec, image_id: str, column_value: Any = None) -> str:
    """Patient id from the patient column, else the spec's filename patterns, else the image id."""
    if column_value is not None and _raw_key(column_value) is not None:
        return f"p:{_raw_key(column_value)}"
    name = Path(image_id).name
    for pattern, prefix in spec.source.patient_patterns:
        m = re.match(pattern, name)
        if m:
            return prefix + (m.group(1) if m.groups() else m.group(0))
    return f"img:{image_id}"


def _finish(spec: TaskSpec, rows: list[tuple[str, int, str, str | None]], images: Any, dropped: dict) -> Examples:
    ids = [r[0] for r in rows]
    splits = [r[3] for r in rows]
    return Examples(
        ids=ids,
        labels=np.array([r[1] for r in rows], dtype=np.int64),
        patients=[r[2] for r in rows],
        given_split=splits if all(s is not None for s in splits) and rows else None,
        images=images,
        dropped={k: v for k, v in dropped.items() if v},
    )


def _need(path: Path, spec: TaskSpec, root: Path, kind: str | None = None) -> Path:
    """``path`` if it exists (and, with ``kind`` 'file' or 'folder', is one); else a one-line error naming it."""
    if not path.exists():
        raise DataError(missing_message(spec, root, [str(path.relative_to(root))], 1).replace(" images ", " files "))
    if kind == "file" and not path.is_file():
        raise DataError(f"task '{spec.name}': {path} is a folder, expected a {spec.source.kind} file")
    if kind == "folder" and not path.is_dir():
        raise DataError(f"task '{spec.name}': {path} is a file, expected a folder")
    return path


def _read_csv_file(csv_path: Path) -> pd.DataFrame:
    if csv_path.is_dir():
        raise DataError(f"{csv_path}: is a folder, expected a CSV file")
    try:
        return pd.read_csv(csv_path, dtype=object, keep_default_na=True)
    except pd.errors.EmptyDataError:
        raise DataError(f"{csv_path}: empty CSV ({csv_path.stat().st_size} bytes, no header row); expected a header "
                        "row and one row per image") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise DataError(f"{csv_path}: unreadable CSV: {exc}") from None
    except OSError as exc:
        raise DataError(f"{csv_path}: cannot read: {exc.strerror or exc}") from None


def read_frame(spec: TaskSpec, root: Path, csv_path: Path) -> pd.DataFrame:
    """One CSV of a source as strings, with the source's ``join`` CSVs merged in (row order kept).

    Every row must find exactly one match in each joined CSV (keys compared as stripped strings);
    a column the frame already has is not taken from the joined CSV.
    """
    frame = _read_csv_file(csv_path)
    for join in spec.source.join:
        other_path = _need(root / join.path, spec, root, "file")
        other = _read_csv_file(other_path)
        for col, table, where in ((join.key, frame, csv_path), (join.join_key, other, other_path)):
            if col not in table.columns:
                raise DataError(f"{where}: no column '{col}' to join on (columns: {', '.join(map(str, table.columns))})")
        keys = other[join.join_key].astype(str).str.strip()
        if keys.duplicated().any():
            raise DataError(f"{other_path}: key '{keys[keys.duplicated()].iloc[0]}' appears twice in column "
                            f"'{join.join_key}'; a joined CSV needs one row per key")
        wanted = list(join.columns) or [c for c in other.columns if c != join.join_key]
        unknown = [c for c in wanted if c not in other.columns]
        if unknown:
            raise DataError(f"{other_path}: no column '{unknown[0]}' (columns: {', '.join(map(str, other.columns))})")
        lookup = other.assign(_key=keys).set_index("_key")[[c for c in wanted if c not in frame.columns]]
        left = frame[join.key].astype(str).str.strip()
        unmatched = ~left.isin(lookup.index)
        if unmatched.any():
            row = int(np.flatnonzero(unmatched.to_numpy())[0])
            raise DataError(f"{csv_path}: row {row + 2}: '{left.iloc[row]}' (column '{join.key}') has no row in "
                            f"{other_path} (column '{join.join_key}'); {int(unmatched.sum())} rows unmatched")
        frame = pd.concat([frame.reset_index(drop=True), lookup.loc[left.to_numpy()].reset_index(drop=True)], axis=1)
    return frame


@SOURCES.register("csv")
def read_csv(spec: TaskSpec, root: Path) -> Examples:
    """CSV manifest(s): one row per image; ``files`` gives one CSV per given split."""
    src = spec.source
    guard = RootGuard(spec, root)
    guard.check_spec()
    files = src.files or {None: src.path}
    mapper = LabelMapper(spec)
    rows, dropped, origins = [], defaultdict(list), []
    image_root = None
    for split, rel in files.items():
        csv_path = _need(root / rel, spec, root, "file")
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
    rows, warnings = _drop_relabelled(spec, rows, origins, lambda label: spec.classes[label].name, dropped)
    examples = _finish(spec, rows, FileImages(image_root), dropped)
    examples.warnings.extend(warnings)
    return examples


def _drop_relabelled(spec: TaskSpec, rows: list, origins: list[tuple[Path, int]], describe: Callable[[Any], str],
                     dropped: dict[str, list[str]],
                     differ: Callable[[Any, Any], bool] = lambda a, b: a != b) -> tuple[list, list[str]]:
    """Rows of a manifest that lists one image under two different labels: an error, or with
    ``source.drop_conflicting_duplicates`` every row of such an image dropped (as folder sources drop
    identical files filed under two classes), recorded under ``dropped['conflicting_duplicate']`` with a warning.

    ``rows`` are (image id, label, ...) with ``origins[i]`` = (CSV file, row number) and ``describe(label)`` the
    label as the message names it; the same image listed twice under one label (labels that do not ``differ``)
    stays as it is.
    """
    seen: dict[str, list[int]] = defaultdict(list)
    conflicts: dict[str, tuple[int, int]] = {}
    for i, row in enumerate(rows):
        key = os.path.normpath(row[0])
        if key not in conflicts:
            j = next((j for j in seen[key] if differ(rows[j][1], row[1])), None)
            if j is not None:
                conflicts[key] = (j, i)
        seen[key].append(i)
    if not conflicts:
        return rows, []
    j, i = next(iter(conflicts.values()))
    (path_j, row_j), (path_i, row_i) = origins[j], origins[i]
    detail = (f"{path_i}: image '{rows[i][0]}' is listed under two labels: '{describe(rows[j][1])}' (row {row_j}"
              f"{'' if path_j == path_i else f' of {path_j}'}) and '{describe(rows[i][1])}' (row {row_i})")
    if not spec.source.drop_conflicting_duplicates:
        raise DataError(f"{detail}; fix the manifest, or set source.drop_conflicting_duplicates: true to drop every "
                        "image listed under two labels")
    gone = [r for r in rows if os.path.normpath(r[0]) in conflicts]
    dropped["conflicting_duplicate"].extend(dict.fromkeys(r[0] for r in gone))
    note = (f"task '{spec.name}': dropped {len(gone)} rows of {len(conflicts)} images listed under two labels "
            f"(source.drop_conflicting_duplicates; first: {detail})")
    from retbench.store import warn

    warn(note)
    return [r for r in rows if os.path.normpath(r[0]) not in conflicts], [note]


@SOURCES.register("folder")
def read_folder(spec: TaskSpec, root: Path) -> Examples:
    """Folder per class (optionally inside per-split folders): ``<path>[/<split>]/<class>/<image>``."""
    RootGuard(spec, root).check_spec()
    src = spec.source
    base = _need(root / src.path, spec, root, "folder")
    split_dirs = src.split_dirs or {None: ""}
    mapper = LabelMapper(spec)
    rows = []
    for split, sub in split_dirs.items():
        split_root = base / sub
        if not split_root.is_dir():
            raise DataError(missing_message(spec, root, [str(split_root.relative_to(root)) + "/"], 1))
        for class_dir in sorted(p for p in split_root.iterdir() if p.is_dir()):
            label = mapper(class_dir.name, f"{class_dir}")
            for img in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                image_id = str(img.relative_to(base))
                rows.append((image_id, label, patient_of(spec, image_id), split))
    dropped: dict[str, list[str]] = {}
    if src.drop_conflicting_duplicates:
        rows, dropped["conflicting_duplicate"] = _drop_conflicts(rows, base)
    return _finish(spec, rows, FileImages(base), dropped)


def _drop_conflicts(rows: list, base: Path) -> tuple[list, list[str]]:
    """Drop every copy of an image whose identical bytes appear under different labels."""
    labels_by_hash: dict[str, set[int]] = defaultdict(set)
    hashes = []
    for image_id, label, *_ in rows:
        digest = hashlib.sha1((base / image_id).read_bytes()).hexdigest()
        hashes.append(digest)
        labels_by_hash[digest].add(label)
    keep = [r for r, h in zip(rows, hashes) if len(labels_by_hash[h]) == 1]
    gone = [r[0] for r, h in zip(rows, hashes) if len(labels_by_hash[h]) > 1]
    return keep, gone


@SOURCES.register("npz")
def read_npz(spec: TaskSpec, root: Path) -> Examples:
    """``.npz`` with ``<split>_images`` and ``<split>_labels`` arrays (MedMNIST layout)."""
    RootGuard(spec, root).check_spec()
    path = _need(root / spec.source.path, spec, root, "file")
    try:
        with np.load(path) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError) as exc:
        raise DataError(f"{path}: unreadable .npz: {exc}") from None
    mapper = LabelMapper(spec)
    splits = [k[: -len("_images")] for k in arrays if k.endswith("_images")]
    if not splits:
        raise DataError(f"{path}: no '<split>_images' arrays (found: {', '.join(arrays)})")
    rows, images = [], {}
    for split in sorted(splits, key=["train", "val", "test"].index if set(splits) <= {"train", "val", "test"} else str):
        if f"{split}_labels" not in arrays:
            raise DataError(f"{path}: '{split}_images' has no matching '{split}_labels'")
        images[split] = arrays[f"{split}_images"]
        for i, lab in enumerate(np.asarray(arrays[f"{split}_labels"]).reshape(len(images[split]), -1)[:, 0]):
            image_id = f"{split}/{i}"
            rows.append((image_id, mapper(lab.item(), f"{path}: {split}_labels[{i}]"), f"img:{image_id}", split))
    return _finish(spec, rows, ArrayImages(images), {})


@SOURCES.register("hf_disk")
def read_hf_disk(spec: TaskSpec, root: Path) -> Examples:
    """A Hugging Face ``datasets`` dataset saved with ``save_to_disk`` (DatasetDict = given splits)."""
    RootGuard(spec, root).check_spec()
    import datasets

    src = spec.source
    path = _need(root / src.path, spec, root, "folder")
    ds = datasets.load_from_disk(str(path))
    parts = dict(ds.items()) if isinstance(ds, datasets.DatasetDict) else {None: ds}
    mapper = LabelMapper(spec)
    rows, arrays = [], {}
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
            label = mapper(value, f"{path}: {key}[{i}]")
            rows.append((f"{key}/{i}", label, f"img:{key}/{i}", split))
    return _finish(spec, rows, ArrayImages(arrays), {})
