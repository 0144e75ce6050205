"""What every reader of a task's source shares (:mod:`~retbench.data.sources`, :mod:`~retbench.data.pairs`,
:mod:`~retbench.data.questions`): required paths, CSV manifests with their joins, raw cell values, class
labels, patient ids, and images listed under two labels.
"""

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

from retbench.data.examples import missing_message
from retbench.errors import DataError, warn
from retbench.spec import TaskSpec

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"}


def raw_key(value: Any) -> str | None:
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
            key = raw_key(value)
            if key is None:
                return None
            try:
                return int(np.digitize(float(key), src.bins))
            except ValueError:
                raise DataError(f"{where}: label '{value}' is not a number (the task bins a score)") from None
        if src.label_format == "list":
            return self._from_list(value, where)
        key = raw_key(value)
        if key is None:
            return None
        if key not in self.lookup:
            raise DataError(f"{where}: label '{key}' is not in the class list {sorted(self.lookup)}")
        return self.lookup[key]

    def required(self, value: Any, where: str) -> int:
        """The class index of ``value`` for a source that has no way to drop a row: a missing label is an error."""
        label = self(value, where)
        if label is None:
            raise DataError(f"{where}: missing label {value!r}")
        return label

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
    if column_value is not None and raw_key(column_value) is not None:
        return f"p:{raw_key(column_value)}"
    name = Path(image_id).name
    for pattern, prefix in spec.source.patient_patterns:
        m = re.match(pattern, name)
        if m:
            return prefix + (m.group(1) if m.groups() else m.group(0))
    return f"img:{image_id}"


def require_path(path: Path, spec: TaskSpec, root: Path, kind: str | None = None) -> Path:
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
        other_path = require_path(root / join.path, spec, root, "file")
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


def drop_relabelled_rows(spec: TaskSpec, rows: list, origins: list[tuple[Path, int]], describe: Callable[[Any], str],
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
    warn(note)
    return [r for r in rows if os.path.normpath(r[0]) not in conflicts], [note]


def drop_conflicting_files(rows: list, base: Path) -> tuple[list, list[str]]:
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
