"""Task specs: YAML files validated into frozen, typed objects.

A spec may ``include:`` other YAML files (paths relative to itself); included mappings
are merged depth-first, the including file winning. Every error names the file, the
key and what was allowed.

``kind`` selects the task type: ``classification`` (the default: one label per image),
``retrieval`` (pairs of images and texts, or of two images, ranked against each other;
its ``retrieval:`` section names the sides and the directions) or ``vqa`` (closed-form
questions generated from columns of the source; its ``vqa:`` section lists the questions
and their candidate answers).
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retbench.errors import SpecError

KINDS = ("classification", "retrieval", "vqa")
IMAGE_MODALITIES = ("cfp", "oct")
MODALITIES = IMAGE_MODALITIES + ("cfp+oct",)  # cfp+oct: a cross-modal retrieval task
CLASSIFICATION_PROBLEMS = ("binary", "multiclass", "ordinal", "multilabel")
PROBLEMS = CLASSIFICATION_PROBLEMS + ("retrieval", "vqa")  # the last two are the kinds' own
SOURCE_KINDS = ("csv", "folder", "npz", "hf_disk")
SIDE_TYPES = ("image", "text")
DEFAULT_ANSWER_TEMPLATE = "Q: {question} A: {answer}"
SPLIT_STRATEGIES = ("given", "stratified")
LABEL_FORMATS = ("value", "list")


@dataclass(frozen=True)
class ClassSpec:
    """One class: its name, the raw values that mean it, and its text prompts."""

    name: str
    match: tuple[str, ...]
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class JoinSpec:
    """A second CSV merged into a CSV source's rows on a key column (every row must find its match)."""

    path: str
    key: str  # the key column of the source CSV
    join_key: str  # the key column of the joined CSV (default: the same name)
    columns: tuple[str, ...] = ()  # the joined CSV's columns to bring in (default: all); the base CSV wins on clashes


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
    join: tuple[JoinSpec, ...] = ()


@dataclass(frozen=True)
class SplitSpec:
    """How train/val/test are obtained: given by the source, or made with a fixed seed."""

    strategy: str = "stratified"
    test_fraction: float = 0.2
    val_fraction: float = 0.0
    seed: int = 0
    by_patient: bool = True
    group_near_duplicates: bool = False  # images showing the same photograph (perceptual hash) share a group


@dataclass(frozen=True)
class SideSpec:
    """One side of a retrieval pair: a column of images (with their modality and preprocessing hints) or of texts."""

    name: str
    type: str
    column: str
    modality: str = ""
    preprocess: dict[str, Any] = field(default_factory=dict)
    template: str = "{}"


@dataclass(frozen=True)
class DirectionSpec:
    """Queries from one side ranked against the gallery of another (``<query>_to_<gallery>``)."""

    name: str
    query: str
    gallery: str


@dataclass(frozen=True)
class RetrievalSpec:
    """The sides of each pair and the directions evaluated."""

    sides: tuple[SideSpec, ...]
    directions: tuple[DirectionSpec, ...]

    def side(self, name: str) -> SideSpec:
        """The side called ``name``."""
        return next(s for s in self.sides if s.name == name)

    def needs_text(self, direction: DirectionSpec) -> bool:
        """Whether ``direction`` involves a text side."""
        return "text" in (self.side(direction.query).type, self.side(direction.gallery).type)


@dataclass(frozen=True)
class QuestionSpec:
    """One closed-form question: its text, the source column that answers it and the candidate answers."""

    name: str
    question: str
    column: str
    answers: tuple[ClassSpec, ...]
    bins: tuple[float, ...] = ()
    missing: tuple[str, ...] = ()  # raw values meaning "not asked for this image" (besides empty cells)


@dataclass(frozen=True)
class VQASpec:
    """The question set and the text template each candidate answer is scored with."""

    questions: tuple[QuestionSpec, ...]
    answer_template: str = DEFAULT_ANSWER_TEMPLATE

    def answer_texts(self, question: QuestionSpec) -> list[list[str]]:
        """Per candidate answer, its "question + answer" texts (one per phrasing of the answer)."""
        return [[self.answer_template.format(question=question.question, answer=p) for p in a.prompts]
                for a in question.answers]

    def offsets(self) -> list[int]:
        """Index of each question's first answer in the flattened class list of the task."""
        out, start = [], 0
        for q in self.questions:
            out.append(start)
            start += len(q.answers)
        return out


@dataclass(frozen=True)
class TaskSpec:
    """A validated task: data, classes and prompts, splits, preprocessing, metrics.

    For ``kind: vqa`` the classes are the flattened (question, answer) candidates, their prompts
    the "question + answer" texts; for ``kind: retrieval`` they are optional labels of the pairs
    (used to stratify the split).
    """

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
    kind: str = "classification"
    retrieval: RetrievalSpec | None = None
    vqa: VQASpec | None = None

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
    "kind", "retrieval", "vqa",
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

    raw = load_yaml_with_includes(path)
    r = _Reader(str(path), raw)
    r.check_unknown(TOP_KEYS)
    kind = r.get("kind", str, "classification", choices=KINDS)
    for section in ("retrieval", "vqa"):
        if section in raw and section != kind:
            raise r.fail(section, f"a '{section}' section needs kind: {section} (this task's kind is '{kind}')")
    if kind != "classification":
        return _parse_kind_task(r, path, raw, kind)
    metrics = r.strings("metrics")
    for m in metrics:
        if m not in METRICS:
            raise r.fail("metrics", METRICS.unknown_message(m))
    primary = r.get("primary_metric", str, metrics[0])
    if primary not in metrics:
        raise r.fail("primary_metric", f"'{primary}' is not in metrics: {', '.join(metrics)}")
    protocols = r.strings("protocols")
    _check_protocols(r, protocols, kind)
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


def _parse_classes(r: _Reader, key: str = "classes", what: str = "class") -> tuple[ClassSpec, ...]:
    items = r.get(key, list)
    if len(items) < 2:
        raise r.fail(key, f"needs at least 2 {key}")
    out = []
    for i, item in enumerate(items):
        if isinstance(item, (str, int)) and not isinstance(item, bool):
            item = {"name": item}
        if not isinstance(item, dict):
            raise r.fail(f"{key}[{i}]", f"expected a {what} name or a mapping with name/match/prompts")
        c = _Reader(r.file, item, f"{r.key(key)}[{i}].")
        c.check_unknown({"name", "match", "prompts"})
        name = str(c.get("name", (str, int)))
        out.append(ClassSpec(name, c.strings("match", (name,)), c.strings("prompts", (name,))))
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise r.fail(key, f"duplicate {what} names in {names}")
    return tuple(out)


def _check_protocols(r: _Reader, protocols: tuple[str, ...], kind: str) -> None:
    """Every protocol is registered and evaluates tasks of ``kind``."""
    from retbench.protocols import PROTOCOLS

    for p in protocols:
        if p not in PROTOCOLS:
            raise r.fail("protocols", PROTOCOLS.unknown_message(p))
        own = getattr(PROTOCOLS.get(p), "kind", "classification")
        if own != kind:
            fitting = [n for n in PROTOCOLS.names() if getattr(PROTOCOLS.get(n), "kind", "classification") == kind]
            raise r.fail("protocols", f"protocol '{p}' evaluates {own} tasks, this task's kind is '{kind}'; "
                         f"allowed: {', '.join(fitting)}")


def _parse_kind_task(r: _Reader, path: Path, raw: dict[str, Any], kind: str) -> TaskSpec:
    """A ``retrieval`` or ``vqa`` task: the shared keys plus the kind's own section."""
    from retbench.metrics import METRICS, RANK_METRICS

    if "problem" in raw:
        raise r.fail("problem", f"not used by kind '{kind}' (the kind is the problem)")
    retrieval, vqa = None, None
    if kind == "retrieval":
        classes = _parse_classes(r) if "classes" in raw else ()  # optional labels of the pairs
        modality = r.get("modality", str, None, choices=IMAGE_MODALITIES)
        retrieval = _parse_retrieval(r.sub("retrieval", ...), modality)
        used = {retrieval.side(n).modality for d in retrieval.directions for n in (d.query, d.gallery)
                if retrieval.side(n).type == "image"}
        modality = "+".join(m for m in IMAGE_MODALITIES if m in used)
        default_metrics: tuple[str, ...] = RANK_METRICS
        default_protocols = ("retrieval.zero_shot",) + (
            ("retrieval.linear_map",) if any(not retrieval.needs_text(d) for d in retrieval.directions) else ())
    else:
        if "classes" in raw:
            raise r.fail("classes", "not used by kind 'vqa': each question lists its candidate answers")
        modality = r.get("modality", str, choices=IMAGE_MODALITIES)
        vqa = _parse_vqa(r.sub("vqa", ...))
        classes = tuple(ClassSpec(f"{q.name}: {a.name}", a.match, tuple(texts))
                        for q in vqa.questions for a, texts in zip(q.answers, vqa.answer_texts(q)))
        default_metrics, default_protocols = ("balanced_accuracy", "accuracy"), ("vqa.zero_shot", "vqa.probe")
    metrics = r.strings("metrics", default_metrics)
    for m in metrics:
        if m not in METRICS:
            raise r.fail("metrics", METRICS.unknown_message(m))
        if kind == "retrieval" and m not in RANK_METRICS:
            raise r.fail("metrics", f"got '{m}'; kind 'retrieval' reports rank metrics: {', '.join(RANK_METRICS)}")
        if kind == "vqa" and (METRICS.get(m).per_class or m in RANK_METRICS):
            raise r.fail("metrics", f"got '{m}'; kind 'vqa' averages scalar classification metrics over question "
                         "types (e.g. accuracy, balanced_accuracy)")
    primary = r.get("primary_metric", str, metrics[0])
    if primary not in metrics:
        raise r.fail("primary_metric", f"'{primary}' is not in metrics: {', '.join(metrics)}")
    protocols = r.strings("protocols", default_protocols)
    _check_protocols(r, protocols, kind)
    if retrieval is not None and "retrieval.linear_map" in protocols and all(map(retrieval.needs_text,
                                                                                   retrieval.directions)):
        raise r.fail("protocols", "protocol 'retrieval.linear_map' maps image features to image features and needs "
                     "an image-to-image direction")
    pre = r.sub("preprocess")
    pre.check_unknown(PREPROCESS_KEYS)
    _check_preprocess(pre)
    src = r.sub("source", ...)
    if kind == "vqa":
        for key in ("bins", "label_column", "label_format"):
            if key in src.data:
                raise src.fail(key, "kind 'vqa' reads its answers per question (vqa.questions[i].column, bins)")
    source = _parse_source(src, len(classes))
    allowed_sources = ("csv",) if kind == "retrieval" else ("csv", "folder")
    if source.kind not in allowed_sources:
        raise src.fail("kind", f"got '{source.kind}'; kind '{kind}' reads {' or '.join(allowed_sources)} sources")
    return TaskSpec(
        name=r.get("name", str),
        version=str(r.get("version", (int, str))),
        file=str(path),
        description=r.get("description", str, ""),
        modality=modality,
        problem=kind,
        source=source,
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
        kind=kind,
        retrieval=retrieval,
        vqa=vqa,
    )


_NAME = re.compile(r"^[A-Za-z0-9]+(?:_[A-Za-z0-9]+)*$")


def _parse_retrieval(t: _Reader, modality: str | None) -> RetrievalSpec:
    """``retrieval: {sides: {<name>: {type, column, ...}}, directions: [<query>_to_<gallery>, ...]}``."""
    t.check_unknown({"sides", "directions"})
    raw_sides = t.get("sides", dict)
    if len(raw_sides) < 2:
        raise t.fail("sides", f"needs at least 2 sides (the two members of a pair), got {len(raw_sides)}")
    sides = []
    for name, item in raw_sides.items():
        name = str(name)
        if not _NAME.match(name) or "_to_" in name:
            raise t.fail(f"sides.{name}", "a side name is letters, digits and single underscores, without '_to_'")
        if not isinstance(item, dict):
            raise t.fail(f"sides.{name}", "expected a mapping with type, column (and modality, preprocess or template)")
        sr = _Reader(t.file, item, f"{t.key('sides')}.{name}.")
        sr.check_unknown({"type", "column", "modality", "preprocess", "template"})
        typ = sr.get("type", str, "image", choices=SIDE_TYPES)
        column = sr.get("column", str)
        if typ == "image":
            if "template" in item:
                raise sr.fail("template", "only text sides have a template")
            pre = sr.sub("preprocess")
            pre.check_unknown(PREPROCESS_KEYS)
            _check_preprocess(pre)
            side_modality = sr.get("modality", str, modality if modality else ..., choices=IMAGE_MODALITIES)
            sides.append(SideSpec(name, typ, column, side_modality, dict(pre.data)))
        else:
            for key in ("modality", "preprocess"):
                if key in item:
                    raise sr.fail(key, "only image sides have a modality and preprocessing")
            template = sr.get("template", str, "{}")
            if template.count("{}") != 1:
                raise sr.fail("template", f"must contain '{{}}' once (where the text goes), got {template!r}")
            sides.append(SideSpec(name, typ, column, template=template))
    if not any(s.type == "image" for s in sides):
        raise t.fail("sides", "needs at least one image side")
    names = [s.name for s in sides]
    directions = []
    for d in t.strings("directions"):
        query, sep, gallery = d.partition("_to_")
        if not sep or query not in names or gallery not in names or query == gallery:
            pairs = [f"{a}_to_{b}" for a in names for b in names if a != b]
            raise t.fail("directions", f"got {d!r}; allowed: {', '.join(pairs)}")
        if "image" not in (sides[names.index(query)].type, sides[names.index(gallery)].type):
            raise t.fail("directions", f"{d!r} ranks texts against texts; a direction needs an image side")
        directions.append(DirectionSpec(d, query, gallery))
    if not directions:
        raise t.fail("directions", "needs at least one direction")
    if len({d.name for d in directions}) != len(directions):
        raise t.fail("directions", "a direction is listed twice")
    return RetrievalSpec(tuple(sides), tuple(directions))


def _parse_vqa(v: _Reader) -> VQASpec:
    """``vqa: {answer_template, questions: [{name, question, column, answers, bins, missing}, ...]}``."""
    v.check_unknown({"questions", "answer_template"})
    template = v.get("answer_template", str, DEFAULT_ANSWER_TEMPLATE)
    try:
        template.format(question="q", answer="a")
    except (KeyError, IndexError, ValueError) as exc:
        raise v.fail("answer_template", f"only {{question}} and {{answer}} may be filled in, got {template!r} ({exc})") from None
    if "{question}" not in template or "{answer}" not in template:
        raise v.fail("answer_template", f"must contain {{question}} and {{answer}}, got {template!r}")
    items = v.get("questions", list)
    if not items:
        raise v.fail("questions", "needs at least one question")
    questions = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise v.fail(f"questions[{i}]", "expected a mapping with name, question, column and answers")
        q = _Reader(v.file, item, f"{v.key('questions')}[{i}].")
        q.check_unknown({"name", "question", "column", "answers", "bins", "missing"})
        name = q.get("name", str)
        if not _NAME.match(name):
            raise q.fail("name", f"a question name is letters, digits and single underscores, got {name!r}")
        answers = _parse_classes(q, "answers", "answer")
        bins = tuple(float(b) for b in q.get("bins", list, []))
        if bins and len(bins) != len(answers) - 1:
            raise q.fail("bins", f"{len(answers)} answers need {len(answers) - 1} inner bin edges, got {len(bins)}")
        if list(bins) != sorted(bins):
            raise q.fail("bins", "edges must increase")
        questions.append(QuestionSpec(name, q.get("question", str), q.get("column", str), answers, bins,
                                      q.strings("missing", ())))
    names = [q.name for q in questions]
    if len(set(names)) != len(names):
        raise v.fail("questions", f"duplicate question names in {names}")
    return VQASpec(tuple(questions), template)


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
    joins = _parse_joins(s, kind)
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
        join=joins,
    )


def _parse_joins(s: _Reader, kind: str) -> tuple[JoinSpec, ...]:
    """``join:`` one mapping ``{path, key, join_key, columns}`` or a list of them (CSV sources only).

    (Not ``on``: YAML 1.1 reads a bare ``on`` key as the boolean true.)
    """
    value = s.get("join", (dict, list), [])
    items = [value] if isinstance(value, dict) else value
    if items and kind != "csv":
        raise s.fail("join", f"joins apply to csv sources, this source is '{kind}'")
    out = []
    for i, item in enumerate(items):
        key = "join" if isinstance(value, dict) else f"join[{i}]"
        if not isinstance(item, dict):
            raise s.fail(key, "expected a mapping with path and key (and optional join_key, columns)")
        j = _Reader(s.file, {str(k): v for k, v in item.items()}, f"{s.key(key)}.")
        if True in item:
            raise j.fail("on", "YAML 1.1 reads a bare 'on' key as true; name the key column with 'key:' "
                         "(and the joined CSV's with 'join_key:')")
        j.check_unknown({"path", "key", "join_key", "columns"})
        column = j.get("key", str)
        out.append(JoinSpec(j.get("path", str), column, j.get("join_key", str, column), j.strings("columns", ())))
    return tuple(out)


def _parse_splits(s: _Reader) -> SplitSpec:
    s.check_unknown(SPLIT_KEYS)
    spec = SplitSpec(
        strategy=s.get("strategy", str, "stratified", choices=SPLIT_STRATEGIES),
        test_fraction=s.get("test_fraction", float, 0.2),
        val_fraction=s.get("val_fraction", float, 0.0),
        seed=s.get("seed", int, 0),
        by_patient=s.get("by_patient", bool, True),
        group_near_duplicates=s.get("group_near_duplicates", bool, False),
    )
    if spec.strategy == "stratified" and not 0.0 < spec.test_fraction < 1.0:
        raise s.fail("test_fraction", f"must be in (0, 1), got {spec.test_fraction}")
    if not 0.0 <= spec.val_fraction < 1.0 - spec.test_fraction:
        raise s.fail("val_fraction", f"must be in [0, 1 - test_fraction), got {spec.val_fraction}")
    return spec
