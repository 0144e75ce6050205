"""VQA questions: per image of a CSV or folder source, the answer to each question of the spec (or none).

A question reads one column (a folder-per-class source has one: ``folder``, the image's class folder):
raw values map to its candidate answers through each answer's ``match`` list, or through ``bins`` for a
numeric score; empty cells and the question's ``missing`` values mean the question is not asked about
that image. An image none of whose questions has an answer is dropped (recorded). The split is by
patient, stratified on the answer to the image's first answered question.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np

from retbench.data.examples import Examples, FileImages, RootGuard, check_examples, missing_message
from retbench.data.reading import (
    IMAGE_SUFFIXES,
    drop_conflicting_files,
    drop_relabelled_rows,
    patient_of,
    raw_key,
    read_frame,
    require_path,
)
from retbench.errors import DataError
from retbench.spec import QuestionSpec, TaskSpec


@dataclass
class QuestionData:
    """The images of a VQA task and, per question, each image's answer index (-1: not asked)."""

    spec: TaskSpec
    examples: Examples
    answers: np.ndarray  # (N images, Q questions)

    def asked(self, q: int) -> np.ndarray:
        """Boolean mask of the images question ``q`` is asked about."""
        return self.answers[:, q] >= 0


_ORIGIN = "\0origin"  # key of a CSV record's (file, row number); no CSV column is called that


def _describe_answers(questions: tuple[QuestionSpec, ...], answers: tuple[int, ...]) -> str:
    return ", ".join(f"{q.name}: {q.answers[a].name}" for q, a in zip(questions, answers) if a >= 0)


class AnswerMapper:
    """Raw cell value → answer index of one question (None: not asked)."""

    def __init__(self, question: QuestionSpec) -> None:
        self.question = question
        self.lookup = {m: i for i, a in enumerate(question.answers) for m in a.match}

    def __call__(self, value: Any, where: str) -> int | None:
        key = raw_key(value)
        q = self.question
        if key is None or key in q.missing:
            return None
        if q.bins:
            try:
                return int(np.digitize(float(key), q.bins))
            except ValueError:
                raise DataError(f"{where}: '{key}' in column '{q.column}' is not a number (question '{q.name}' "
                                "bins a score)") from None
        if key not in self.lookup:
            raise DataError(f"{where}: '{key}' in column '{q.column}' is no answer of question '{q.name}' "
                            f"(answers match {sorted(self.lookup)}; list other values under 'missing')")
        return self.lookup[key]


def _csv_records(spec: TaskSpec, root: Path) -> tuple[list[tuple[str, Any, dict[str, Any]]], Path]:
    """(where, given split, record) per CSV row (the record's ``_origin``: its file and row number), and the image root."""
    src, out = spec.source, []
    image_root = root
    files: dict[str | None, str] = {split: rel for split, rel in src.files.items()} or {None: src.path}
    for split, rel in files.items():
        csv_path = require_path(root / rel, spec, root, "file")
        image_root = root / src.image_root if src.image_root is not None else csv_path.parent
        frame = read_frame(spec, root, csv_path)
        assert spec.vqa is not None
        for col in [src.image_column, src.patient_column, src.split_column] + [q.column for q in spec.vqa.questions]:
            if col is not None and col not in frame.columns:
                raise DataError(f"{csv_path}: no column '{col}' (columns: {', '.join(map(str, frame.columns))})")
        for i, rec in enumerate(frame.to_dict("records")):
            out.append((f"{csv_path}: row {i + 2}", split if split is not None else
                        (rec[src.split_column] if src.split_column else None), {**rec, _ORIGIN: (csv_path, i + 2)}))
    return out, image_root


def _folder_records(spec: TaskSpec, root: Path, dropped: dict[str, list[str]]) -> tuple[list, Path]:
    """A folder per class: each image is a record whose column ``folder`` is its class folder's name."""
    src = spec.source
    base = require_path(root / src.path, spec, root, "folder")
    rows = []
    split_dirs: dict[str | None, str] = {split: sub for split, sub in src.split_dirs.items()} or {None: ""}
    for split, sub in split_dirs.items():
        split_root = base / sub
        if not split_root.is_dir():
            raise DataError(missing_message(spec, root, [str(split_root.relative_to(root)) + "/"], 1))
        for class_dir in sorted(p for p in split_root.iterdir() if p.is_dir()):
            for img in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                rows.append((str(img.relative_to(base)), class_dir.name, split))
    if src.drop_conflicting_duplicates:
        rows, dropped["conflicting_duplicate"] = drop_conflicting_files(rows, base)
    return [(f"{base / image}", split, {"image": image, "folder": folder}) for image, folder, split in rows], base


def read_questions(spec: TaskSpec, root: Path) -> QuestionData:
    """Read the images of a ``kind: vqa`` task and their answers (no check that the images exist)."""
    assert spec.vqa is not None, "read_questions needs a vqa task"
    src, questions = spec.source, spec.vqa.questions
    guard = RootGuard(spec, root)
    guard.check_spec()
    dropped: dict[str, list[str]] = defaultdict(list)
    if src.kind == "folder":
        records, image_root = _folder_records(spec, root, dropped)
        image_column = "image"
    else:
        records, image_root = _csv_records(spec, root)
        image_column = src.image_column
    mappers = [AnswerMapper(q) for q in questions]
    offsets = spec.vqa.offsets()
    ids, labels, patients, given, answers = [], [], [], [], []
    origins = []  # per kept record of a CSV: (file, row number)
    for where, split, rec in records:
        image_id = str(rec[image_column])
        if src.kind != "folder":
            guard.check_image(image_root, image_id, where, image_column)
        row = [m(rec[q.column], where) for m, q in zip(mappers, questions)]
        asked = [j for j, a in enumerate(row) if a is not None]
        if not asked:
            dropped["no_answer"].append(image_id)
            continue
        ids.append(image_id)
        labels.append(offsets[asked[0]] + cast(int, row[asked[0]]))  # asked lists the answered questions
        patients.append(patient_of(spec, image_id, rec.get(src.patient_column) if src.patient_column else None))
        given.append(split)
        answers.append([-1 if a is None else a for a in row])
        origins.append(rec.get(_ORIGIN))
    warnings: list[str] = []
    if src.kind != "folder":  # one image given two answers to a question: an error, or dropped when opted in
        rows = [(image_id, tuple(a), k) for k, (image_id, a) in enumerate(zip(ids, answers))]
        keep, warnings = drop_relabelled_rows(spec, rows, origins, lambda a: _describe_answers(questions, a), dropped,
                                          lambda a, b: any(x >= 0 and y >= 0 and x != y for x, y in zip(a, b)))
        if len(keep) < len(rows):
            kept = [k for *_, k in keep]
            ids, labels, patients = [ids[k] for k in kept], [labels[k] for k in kept], [patients[k] for k in kept]
            given, answers = [given[k] for k in kept], [answers[k] for k in kept]
    examples = Examples(
        ids=ids, labels=np.asarray(labels, dtype=np.int64), patients=patients,
        given_split=given if ids and all(g is not None for g in given) else None,
        images=FileImages(image_root), dropped={k: v for k, v in dropped.items() if v}, warnings=warnings,
    )
    return QuestionData(spec, examples, np.asarray(answers, dtype=np.int64).reshape(len(ids), len(questions)))


def load_questions(spec: TaskSpec, root: Path) -> QuestionData:
    """Read the questions' answers and check that every image exists."""
    data = read_questions(spec, root)
    check_examples(spec, root, data.examples)
    return data
