"""Task specs: YAML files validated into frozen, typed objects.

A spec may ``include:`` other YAML files (paths relative to itself); included mappings
are merged depth-first, the including file winning. Every error names the file, the
key and what was allowed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retbench.errors import SpecError

MODALITIES = ("cfp", "oct")
PROBLEMS = ("binary", "multiclass", "ordinal", "multilabel")
SOURCE_KINDS = ("csv", "folder", "npz", "hf_disk")
SPLIT_STRATEGIES = ("given", "stratified")
LABEL_FORMATS = ("value", "list")


@dataclass(frozen=True)
class ClassSpec:
    """One class: its name, the raw values that mean it, and its text prompts."""

    name: str
    match: tuple[str, ...]
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class SourceSpec:
    """Where the examples come from, relative to the data root."""

    kind: str
    path: str
    files: dict[str, str] = field(default_factory=dict)
    image_column: str = "image"
    image_root: str | None = None
    label_column: str = "label"
    label_format: str = "value"
    bins: tuple[float, ...] = ()
    patient_column: str | None = None
    patient_patterns: tuple[tuple[str, str], ...] = ()
    split_column: str | None = None
    split_dirs: dict[str, str] = field(default_factory=dict)
    drop_missing_labels: bool = False
    drop_conflicting_duplicates: bool = False
    layout: str = ""
    download: str = ""


@dataclass(frozen=True)
class SplitSpec:
    """How train/val/test are obtained: given by the source, or made with a fixed seed."""

    strategy: str = "stratified"
    test_fraction: float = 0.2
    val_fraction: float = 0.0
    seed: int = 0
    by_patient: bool = True


@dataclass(frozen=True)
class TaskSpec:
    """A validated task: data, classes and prompts, splits, preprocessing, metrics."""

    name: str
    version: str
    file: str
    description: str
    modality: str
    problem: str
    source: SourceSpec
    classes: tuple[ClassSpec, ...]
    splits: SplitSpec
    preprocess: dict[str, Any]
    metrics: tuple[str, ...]
    primary_metric: str
    protocols: tuple[str, ...]
    groups: tuple[str, ...]
    prompt_template: str
    citation: str
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)

    @property
    def class_names(self) -> list[str]:
        """Class names in label-index order."""
        return [c.name for c in self.classes]

    @property
    def spec_hash(self) -> str:
        """sha256 of the fully resolved spec (includes merged), recorded with results."""
        blob = json.dumps(self.raw, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def class_prompts(self) -> list[list[str]]:
        """Per class, the texts used for zero-shot (template applied to each prompt)."""
        return [[self.prompt_template.format(p) for p in c.prompts] for c in self.classes]


def load_yaml_with_includes(path: Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML mapping, resolving ``include:`` (a path or list of paths) recursively."""
    path = path.resolve()
    if path in _seen:
        raise SpecError(str(path), "include", "include cycle")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SpecError(str(path), "include", "file not found") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else "?"
        raise SpecError(str(path), "<yaml>", f"malformed YAML at {where}: {getattr(exc, 'problem', exc)}") from None
    if not isinstance(data, dict):
        raise SpecError(str(path), "<root>", "a task spec must be a YAML mapping")
    includes = data.pop("include", [])
    merged: dict[str, Any] = {}
    for inc in [includes] if isinstance(includes, str) else includes:
        merged = _deep_merge(merged, load_yaml_with_includes(path.parent / inc, _seen + (path,)))
    return _deep_merge(merged, data)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


class _Reader:
    """Typed access to a mapping with errors that name the file and dotted key."""

    def __init__(self, file: str, data: dict[str, Any], prefix: str = "") -> None:
        self.file, self.data, self.prefix = file, data, prefix

    def key(self, k: str) -> str:
        return f"{self.prefix}{k}"

    def fail(self, k: str, msg: str) -> SpecError:
        return SpecError(self.file, self.key(k), msg)

    def get(self, k: str, typ: type | tuple[type, ...], default: Any = ..., choices: tuple = ()) -> Any:
        if k not in self.data or self.data[k] is None:
            if default is ...:
                raise self.fail(k, "is required")
            return default
        v = self.data[k]
        if typ is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        accepted = typ if isinstance(typ, tuple) else (typ,)
        if not isinstance(v, typ) or (isinstance(v, bool) and bool not in accepted):
            names = typ.__name__ if isinstance(typ, type) else " or ".join(t.__name__ for t in typ)
            raise self.fail(k, f"expected {names}, got {type(v).__name__} {v!r}")
        if choices and v not in choices:
            raise self.fail(k, f"got {v!r}; allowed: {', '.join(map(str, choices))}")
        return v

    def strings(self, k: str, default: Any = ...) -> tuple[str, ...]:
        v = self.get(k, (list, str), default)
        items = [v] if isinstance(v, str) else list(v)
        if not all(isinstance(i, (str, int, float)) and not isinstance(i, bool) for i in items):
            raise self.fail(k, "expected a list of strings (quote yes/no/true/false, which YAML reads as booleans)")
        return tuple(str(i) for i in items)

    def sub(self, k: str, default: Any = ...) -> _Reader:
        return _Reader(self.file, self.get(k, dict, {} if default is ... else default), self.key(k) + ".")

    def check_unknown(self, allowed: set[str]) -> None:
        for k in self.data:
            if k not in allowed:
                raise self.fail(k, f"unknown key; allowed: {', '.join(sorted(allowed))}")


TOP_KEYS = {
    "name", "version", "description", "modality", "problem", "source", "classes", "splits",
    "preprocess", "metrics", "primary_metric", "protocols", "groups", "prompt_template", "citation",
}
SOURCE_KEYS = set(SourceSpec.__dataclass_fields__)
SPLIT_KEYS = set(SplitSpec.__dataclass_fields__)
PREPROCESS_KEYS = {"fundus_crop", "resize", "size", "interpolation", "crop_pct", "mean", "std", "grayscale", "normalization"}


def _check_preprocess(pre: _Reader) -> None:
    """Preprocessing hints must make a valid :class:`Preprocess` (bad crop names, sizes...)."""
    from retbench.preprocess import FUNDUS_CROPS, Preprocess

    crop = pre.data.get("fundus_crop", False)
    if not isinstance(crop, bool) and crop not in FUNDUS_CROPS:
        raise pre.fail("fundus_crop", f"expected true/false or one of {', '.join(FUNDUS_CROPS)}, got {crop!r}")
    pre.get("normalization", str, "mean_std", choices=("mean_std", "per_image"))
    pre.get("resize", str, "resize_crop", choices=("resize_crop", "pad_canvas", "squash"))
    try:
        Preprocess().with_hints(pre.data)
    except (TypeError, ValueError) as exc:
        raise pre.fail("preprocess", str(exc)) from None


def parse_spec(path: Path) -> TaskSpec:
    """Load and validate the YAML task spec at ``path``."""
    from retbench.metrics import METRICS  # local import: metrics import nothing from here
    from retbench.protocols import PROTOCOLS

    raw = load_yaml_with_includes(path)
    r = _Reader(str(path), raw)
    r.check_unknown(TOP_KEYS)
    metrics = r.strings("metrics")
    for m in metrics:
        if m not in METRICS:
            raise r.fail("metrics", METRICS.unknown_message(m))
    primary = r.get("primary_metric", str, metrics[0])
    if primary not in metrics:
        raise r.fail("primary_metric", f"'{primary}' is not in metrics: {', '.join(metrics)}")
    protocols = r.strings("protocols")
    for p in protocols:
        if p not in PROTOCOLS:
            raise r.fail("protocols", PROTOCOLS.unknown_message(p))
    problem = r.get("problem", str, choices=PROBLEMS)
    if problem == "multilabel":
        raise r.fail("problem", "multilabel tasks are part of the schema but no source reader or protocol "
                     "implements them yet; use binary, multiclass or ordinal")
    classes = _parse_classes(r)
    if problem == "binary" and len(classes) != 2:
        raise r.fail("classes", f"problem 'binary' needs exactly 2 classes, got {len(classes)}")
    pre = r.sub("preprocess")
    pre.check_unknown(PREPROCESS_KEYS)
    _check_preprocess(pre)
    return TaskSpec(
        name=r.get("name", str),
        version=str(r.get("version", (int, str))),
        file=str(path),
        description=r.get("description", str, ""),
        modality=r.get("modality", str, choices=MODALITIES),
        problem=problem,
        source=_parse_source(r.sub("source", ...), len(classes)),
        classes=classes,
        splits=_parse_splits(r.sub("splits")),
        preprocess=dict(pre.data),
        metrics=metrics,
        primary_metric=primary,
        protocols=protocols,
        groups=r.strings("groups", ()),
        prompt_template=r.get("prompt_template", str, "{}"),
        citation=r.get("citation", str, ""),
        raw=raw,
    )


def _parse_classes(r: _Reader) -> tuple[ClassSpec, ...]:
    items = r.get("classes", list)
    if len(items) < 2:
        raise r.fail("classes", "needs at least 2 classes")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            item = {"name": item}
        if not isinstance(item, dict):
            raise r.fail(f"classes[{i}]", "expected a class name or a mapping with name/match/prompts")
        c = _Reader(r.file, item, f"classes[{i}].")
        c.check_unknown({"name", "match", "prompts"})
        name = str(c.get("name", (str, int)))
        out.append(ClassSpec(name, c.strings("match", (name,)), c.strings("prompts", (name,))))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise r.fail("classes", f"duplicate class names in {names}")
    return tuple(out)


def _parse_source(s: _Reader, n_classes: int) -> SourceSpec:
    s.check_unknown(SOURCE_KEYS)
    kind = s.get("kind", str, choices=SOURCE_KINDS)
    files = s.get("files", dict, {})
    bins = tuple(float(b) for b in s.get("bins", list, []))
    if bins and len(bins) != n_classes - 1:
        raise s.fail("bins", f"{n_classes} classes need {n_classes - 1} inner bin edges, got {len(bins)}")
    if list(bins) != sorted(bins):
        raise s.fail("bins", "edges must increase")
    patterns = []
    for i, p in enumerate(s.get("patient_patterns", list, [])):
        if not isinstance(p, dict) or "pattern" not in p:
            raise s.fail(f"patient_patterns[{i}]", "expected a mapping with 'pattern' (and optional 'prefix')")
        patterns.append((str(p["pattern"]), str(p.get("prefix", ""))))
    return SourceSpec(
        kind=kind,
        path=s.get("path", str, "" if files else ...),
        files={str(k): str(v) for k, v in files.items()},
        image_column=s.get("image_column", str, "image"),
        image_root=s.get("image_root", str, None),
        label_column=s.get("label_column", str, "label"),
        label_format=s.get("label_format", str, "value", choices=LABEL_FORMATS),
        bins=bins,
        patient_column=s.get("patient_column", str, None),
        patient_patterns=tuple(patterns),
        split_column=s.get("split_column", str, None),
        split_dirs={str(k): str(v) for k, v in s.get("split_dirs", dict, {}).items()},
        drop_missing_labels=s.get("drop_missing_labels", bool, False),
        drop_conflicting_duplicates=s.get("drop_conflicting_duplicates", bool, False),
        layout=s.get("layout", str, ""),
        download=s.get("download", str, ""),
    )


def _parse_splits(s: _Reader) -> SplitSpec:
    s.check_unknown(SPLIT_KEYS)
    spec = SplitSpec(
        strategy=s.get("strategy", str, "stratified", choices=SPLIT_STRATEGIES),
        test_fraction=s.get("test_fraction", float, 0.2),
        val_fraction=s.get("val_fraction", float, 0.0),
        seed=s.get("seed", int, 0),
        by_patient=s.get("by_patient", bool, True),
    )
    if spec.strategy == "stratified" and not 0.0 < spec.test_fraction < 1.0:
        raise s.fail("test_fraction", f"must be in (0, 1), got {spec.test_fraction}")
    if not 0.0 <= spec.val_fraction < 1.0 - spec.test_fraction:
        raise s.fail("val_fraction", f"must be in [0, 1 - test_fraction), got {spec.val_fraction}")
    return spec
