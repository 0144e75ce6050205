"""Pretraining data: images (with texts, labels, eyes and modalities where known) from tasks,
folders and caption files, with every evaluation test image removed by content.

``--data`` accepts, comma-separated:

* a task name or ``@group`` — the images of the task's **train** split (its test split never
  enters), with the class label and the class's expert-knowledge descriptions as texts;
* ``csdi-reports`` — CSDI's images with their English diagnostic reports (real free text);
* ``captions:FILE.csv`` — any CSV with columns ``image`` (path relative to the CSV) and ``text``;
* a folder — every image below it, unlabelled.

Whatever the source, images matching (by perceptual hash) a test image of the evaluation tasks
(``--exclude``, default ``@all`` bundled tasks present under the data root) are dropped and
listed in the data report.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from retbench.data.dedup import HashCache, ImageItem, example_items, exclude_matches, file_items
from retbench.errors import DataError, RetbenchError
from retbench.preprocess import Preprocess
from retbench.progress import progress_bar

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}


@dataclass
class PretrainItem:
    """One pretraining image and what is known about it."""

    item: ImageItem
    modality: str = "cfp"
    label: int = -1  # index into PretrainSet.label_names, -1 = unlabelled
    texts: tuple[str, ...] = ()  # captions / class descriptions
    eye: str = ""  # patient + eye, linking modalities of the same eye


@dataclass
class PretrainSet:
    """Decoded pretraining images (uint8, N × 3 × S × S) and their annotations."""

    pixels: torch.Tensor
    items: list[PretrainItem]
    label_names: list[str]
    report: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor([it.label for it in self.items])


def _task_sources(name: str, data_root: Path, labels: dict[str, int]) -> list[PretrainItem]:
    from retbench.data.loading import load_examples
    from retbench.data.splits import make_splits
    from retbench.tasks import get_task

    spec = get_task(name)
    examples = load_examples(spec, data_root)
    train = make_splits(spec, examples)["train"]
    items = example_items(name, examples, train)
    out = []
    for it, i in zip(items, train):
        cls = spec.classes[int(examples.labels[i])]
        key = f"{name}:{cls.name}"
        labels.setdefault(key, len(labels))
        out.append(PretrainItem(it, spec.modality, labels[key], tuple(cls.prompts) or (cls.name,),
                                eye=_eye_of(examples.patients[i], examples.ids[i])))
    return out


def _eye_of(patient: str, image_id: str) -> str:
    """``patient:left|right`` when the file name says which eye (OD/OI/OS, left/right), else ``patient``."""
    stem = Path(image_id).stem.upper()
    for tag, eye in (("_OD", "right"), ("_OI", "left"), ("_OS", "left"), ("RIGHT", "right"), ("LEFT", "left")):
        if tag in stem:
            return f"{patient}:{eye}"
    return patient


def _csdi_reports(data_root: Path) -> list[PretrainItem]:
    folder = data_root / "csdi"
    manifest = folder / "resized_manifest.csv"
    notes = folder / "CSDI_annotations.csv"
    for f in (manifest, notes):
        if not f.is_file():
            raise DataError(f"csdi-reports needs {f}")
    files = {r["id"]: folder / r["file"] for r in csv.DictReader(manifest.open(encoding="utf-8"))}
    out = []
    for r in csv.DictReader(notes.open(encoding="utf-8")):
        path = files.get(r["id"])
        text = (r.get("English_diagnosis") or "").strip()
        if path is None or not text:
            continue
        out += [PretrainItem(it, "cfp", texts=(text,)) for it in file_items("csdi-reports", [path], root=data_root)]
    return out


def _captions(path: Path) -> list[PretrainItem]:
    if not path.is_file():
        raise DataError(f"captions file not found: {path}")
    out = []
    with path.open(encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        missing = {"image", "text"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} (need image,text)")
        for row_no, r in enumerate(reader, start=2):
            img = path.parent / r["image"]
            if not img.is_file():
                raise DataError(f"{path}: row {row_no}: image not found: {img}")
            out += [PretrainItem(it, r.get("modality") or "cfp", texts=(r["text"],)) for it in file_items(path.name, [img])]
    return out


def _folder(path: Path) -> list[PretrainItem]:
    files = sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"no images under {path}")
    return [PretrainItem(it) for it in file_items(path.name, files, root=path)]


def collect(sources: list[str], data_root: Path) -> tuple[list[PretrainItem], list[str]]:
    """Items of every ``--data`` source, and the label names (``task:class``)."""
    from retbench.tasks import resolve_tasks, task_index

    labels: dict[str, int] = {}
    items: list[PretrainItem] = []
    known = set(task_index())
    for source in sources:
        if source == "csdi-reports":
            items += _csdi_reports(data_root)
        elif source.startswith("captions:"):
            items += _captions(Path(source.removeprefix("captions:")).expanduser())
        elif source.startswith("@") or source in known:
            for task in resolve_tasks([source]):
                items += _task_sources(task, data_root, labels)
        elif Path(source).expanduser().is_dir():
            items += _folder(Path(source).expanduser())
        else:
            raise RetbenchError(f"--data '{source}' is not a task, @group, folder, csdi-reports or captions:FILE.csv")
    if not items:
        raise DataError("no pretraining images")
    return items, sorted(labels, key=labels.__getitem__)


def task_items(task: str, data_root: Path, split: str | None = "test") -> list[ImageItem]:
    """Items to hash for a task's images: one split (default ``test``) or all of them (``split=None``)."""
    from retbench.data.loading import load_examples
    from retbench.data.splits import make_splits
    from retbench.tasks import get_task

    spec = get_task(task)
    examples = load_examples(spec, data_root)
    indices = make_splits(spec, examples)[split] if split else np.arange(len(examples))
    return example_items(task, examples, indices)


def held_out_items(tasks: list[str], data_root: Path, all_images: bool) -> tuple[list[ImageItem], list[str]]:
    """Test-split images (or all images) of the evaluation tasks whose data is present."""
    from retbench.tasks import resolve_tasks

    items, used = [], []
    for task in resolve_tasks(tasks):
        try:
            items += task_items(task, data_root, split=None if all_images else "test")
            used.append(task)
        except (DataError, RetbenchError):
            continue  # a task whose images are not under this data root cannot leak into pretraining
    return items, used


def load_pretrain_set(
    sources: list[str],
    data_root: Path,
    preprocess: Preprocess,
    exclude: list[str],
    all_images: bool = False,
    cache_dir: Path | None = None,
) -> PretrainSet:
    """Collect, de-duplicate against evaluation images, and decode the pretraining images."""
    items, label_names = collect(sources, data_root)
    items = _dedupe_within(items)
    held, used = held_out_items(exclude, data_root, all_images)
    cache = HashCache(cache_dir / "phash.json" if cache_dir else None)
    keep, excluded = exclude_matches([it.item for it in items], held, cache)
    kept = [items[i] for i in keep]
    if not kept:
        raise DataError("every pretraining image matches an evaluation test image; nothing left to train on")
    pixels = decode(kept, preprocess)
    report = {
        "sources": sources, "images_found": len(items), "images_kept": len(kept),
        "excluded_total": len(excluded),
        "excluded_by_task": dict(Counter(x.matches_task for x in excluded)),
        "excluded": [x.to_dict() for x in excluded],
        "held_out_tasks": used, "held_out_images": len(held), "held_out_split": "all" if all_images else "test",
        "modalities": dict(Counter(it.modality for it in kept)),
        "labelled": sum(it.label >= 0 for it in kept), "with_text": sum(bool(it.texts) for it in kept),
    }
    return PretrainSet(pixels, kept, label_names, report)


def _dedupe_within(items: list[PretrainItem]) -> list[PretrainItem]:
    """Drop repeated files (same resolved path) listed by two sources."""
    seen, out = set(), []
    for it in items:
        if it.item.key not in seen:
            seen.add(it.item.key)
            out.append(it)
    return out


def decode(items: list[PretrainItem], preprocess: Preprocess) -> torch.Tensor:
    """All images as one uint8 tensor (N, 3, S, S) through ``preprocess``'s geometry."""
    out = torch.empty(len(items), 3, preprocess.size, preprocess.size, dtype=torch.uint8)
    with progress_bar("decode pretraining images", len(items)) as advance:
        for i, it in enumerate(items):
            image = it.item.opener()
            out[i] = preprocess.load(image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image)))
            advance(1)
    return out
