"""Retrieval pairs: the rows of a CSV source, each holding one member per side (an image or a text).

Each row is a pair (an image with its caption, or the CFP and the OCT of one eye). Images of
every image side are gathered into one :class:`Examples` (rows side by side, each tied to its
pair by ``item_of``), so the image checks, the splits and the pretraining exclusion work on
them as on any task; the split is made pair by pair, grouped by patient.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np

from retbench.data.examples import Examples, FileImages, RootGuard, check_examples
from retbench.data.reading import LabelMapper, patient_of, raw_key, read_frame, require_path
from retbench.data.splits import make_splits
from retbench.errors import DataError
from retbench.spec import SideSpec, TaskSpec


@dataclass
class Side:
    """One side of every pair: its spec, its value per pair, and (image sides) its images in pair order."""

    spec: SideSpec
    values: list[str]
    examples: Examples | None = None

    def texts(self, indices: np.ndarray) -> list[str]:
        """The texts of ``indices`` with the side's template applied (text sides)."""
        return [self.spec.template.format(self.values[i]) for i in indices]


@dataclass
class PairData:
    """All pairs of a retrieval task, their sides and their split (pair indices)."""

    spec: TaskSpec
    labels: np.ndarray
    patients: list[str]
    sides: dict[str, Side]
    examples: Examples
    splits: dict[str, np.ndarray] = field(default_factory=dict)
    dropped: dict[str, list[str]] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.patients)

    def image_sides(self) -> list[Side]:
        """The image sides, in spec order."""
        return [s for s in self.sides.values() if s.spec.type == "image"]


def read_pairs(spec: TaskSpec, root: Path) -> PairData:
    """Read the pairs of a ``kind: retrieval`` task (no check that the images exist, no split)."""
    assert spec.retrieval is not None, "read_pairs needs a retrieval task"
    src, sides = spec.source, spec.retrieval.sides
    guard = RootGuard(spec, root)
    guard.check_spec()
    mapper = LabelMapper(spec) if spec.classes else None
    values: dict[str, list[str]] = {s.name: [] for s in sides}
    labels, patients, given = [], [], []
    dropped: dict[str, list[str]] = defaultdict(list)
    image_root = root
    files: dict[str | None, str] = {split: rel for split, rel in src.files.items()} or {None: src.path}
    for split, rel in files.items():
        csv_path = require_path(root / rel, spec, root, "file")
        image_root = root / src.image_root if src.image_root is not None else csv_path.parent
        frame = read_frame(spec, root, csv_path)
        needed = [s.column for s in sides] + [src.patient_column, src.split_column] + ([src.label_column] if mapper else [])
        for col in needed:
            if col is not None and col not in frame.columns:
                raise DataError(f"{csv_path}: no column '{col}' (columns: {', '.join(map(str, frame.columns))})")
        for i, rec in enumerate(frame.to_dict("records")):
            where = f"{csv_path}: row {i + 2}"
            row = {s.name: raw_key(rec[s.column]) for s in sides}
            label = mapper(rec[src.label_column], where) if mapper else 0
            empty = [s for s in sides if row[s.name] is None]
            if empty or label is None:
                what = f"column '{empty[0].column}' (side '{empty[0].name}')" if empty else f"label column '{src.label_column}'"
                if not src.drop_missing_labels:
                    raise DataError(f"{where}: empty {what}; set source.drop_missing_labels: true to drop such rows")
                dropped["missing_value"].append(where)
                continue
            for s in sides:
                if s.type == "image":
                    guard.check_image(image_root, str(row[s.name]), where, s.column)
            first_image = cast(str, next(row[s.name] for s in sides if s.type == "image"))  # no side is empty here
            patients.append(patient_of(spec, first_image, rec.get(src.patient_column) if src.patient_column else None))
            for s in sides:
                values[s.name].append(str(row[s.name]))
            labels.append(label)
            given.append(split if split is not None else (rec[src.split_column] if src.split_column else None))
    return _assemble(spec, values, np.asarray(labels, dtype=np.int64), patients, given, FileImages(image_root), dropped)


def _assemble(spec: TaskSpec, values: dict[str, list[str]], labels: np.ndarray, patients: list[str],
              given: list[Any], images: FileImages, dropped: dict[str, list[str]]) -> PairData:
    assert spec.retrieval is not None
    n = len(patients)
    given_split = given if n and all(g is not None for g in given) else None
    sides, stacked_ids = {}, []
    for s in spec.retrieval.sides:
        examples = None
        if s.type == "image":
            examples = Examples(ids=values[s.name], labels=labels, patients=patients, given_split=given_split,
                                images=images, item_of=np.arange(n))
            stacked_ids += values[s.name]
        sides[s.name] = Side(s, values[s.name], examples)
    n_image_sides = sum(s.type == "image" for s in spec.retrieval.sides)
    stacked = Examples(
        ids=stacked_ids, labels=np.tile(labels, n_image_sides), patients=patients * n_image_sides,
        given_split=None if given_split is None else given_split * n_image_sides, images=images,
        dropped={k: v for k, v in dropped.items() if v}, item_of=np.tile(np.arange(n), n_image_sides),
    )
    return PairData(spec, labels, patients, sides, stacked, dropped=stacked.dropped)


def load_pairs(spec: TaskSpec, root: Path) -> PairData:
    """Read the pairs, check that every image exists, and split them (by pair, grouped by patient)."""
    pairs = read_pairs(spec, root)
    check_examples(spec, root, pairs.examples)
    stacked = make_splits(spec, pairs.examples)
    item_of = cast(np.ndarray, pairs.examples.item_of)  # _assemble sets it on the stacked examples
    pairs.splits = {name: np.unique(item_of[rows]) for name, rows in stacked.items()}
    return pairs
