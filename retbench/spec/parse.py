"""``parse_spec``: a YAML task file, includes resolved, validated into a :class:`TaskSpec`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from retbench.errors import SpecError
from retbench.spec.reader import Reader, load_yaml_with_includes
from retbench.spec.schema import (
    DEFAULT_METRICS,
    DEFAULT_PROTOCOLS,
    IMAGE_MODALITIES,
    KINDS,
    MODALITIES,
    PROBLEMS,
    ClassSpec,
    TaskSpec,
)
from retbench.spec.sections import (
    PREPROCESS_KEYS,
    check_preprocess,
    parse_classes,
    parse_retrieval,
    parse_source,
    parse_splits,
    parse_vqa,
)

TOP_KEYS = {
    "name", "version", "description", "modality", "problem", "source", "classes", "splits",
    "preprocess", "metrics", "primary_metric", "protocols", "groups", "prompt_template", "citation",
    "kind", "retrieval", "vqa",
}


def parse_spec(path: Path) -> TaskSpec:
    """Load and validate the YAML task spec at ``path`` (its ``manifest`` mapping, if any, on ``spec.manifest``)."""
    raw = load_yaml_with_includes(path)
    # the data manifest describes the files of a release, not the evaluation: kept out of ``raw`` so that recording
    # counts or checksums never re-hashes a task (its stored results stay current)
    manifest = raw.pop("manifest", None)
    if manifest is not None and not isinstance(manifest, dict):
        raise SpecError(str(path), "manifest", f"expected a mapping, got {type(manifest).__name__}")
    spec = _parse_raw(path, raw)
    return replace(spec, manifest=manifest) if manifest is not None else spec


def _parse_raw(path: Path, raw: dict[str, Any]) -> TaskSpec:
    """Validate the merged mapping ``raw`` of the spec at ``path``."""
    from retbench.metrics import METRICS  # local import: metrics import nothing from here

    r = Reader(str(path), raw)
    r.check_unknown(TOP_KEYS)
    kind = r.get("kind", str, "classification", choices=KINDS)
    for section in ("retrieval", "vqa"):
        if section in raw and section != kind:
            raise r.fail(section, f"a '{section}' section needs kind: {section} (this task's kind is '{kind}')")
    if kind != "classification":
        return _parse_kind_task(r, path, raw, kind)
    problem = r.get("problem", str, choices=PROBLEMS)
    if problem == "multilabel":
        raise r.fail("problem", "multilabel tasks are part of the schema but no source reader or protocol "
                     "implements them yet; use binary, multiclass or ordinal")
    metrics = r.strings("metrics", DEFAULT_METRICS.get(problem, ...))
    for m in metrics:
        if m not in METRICS:
            raise r.fail("metrics", METRICS.unknown_message(m))
    primary = _primary_metric(r, metrics)
    protocols = r.strings("protocols", DEFAULT_PROTOCOLS.get(problem, ...))
    _check_protocols(r, protocols, kind)
    # defaults are hashed as if written out, so a spec_hash also changes should a default change
    raw = {**raw, **{k: list(v) for k, v in (("metrics", metrics), ("protocols", protocols)) if raw.get(k) is None}}
    classes = parse_classes(r)
    if problem == "binary" and len(classes) != 2:
        raise r.fail("classes", f"problem 'binary' needs exactly 2 classes, got {len(classes)}")
    preprocess = _preprocess(r)
    return TaskSpec(
        modality=r.get("modality", str, choices=MODALITIES),
        problem=problem,
        source=parse_source(r.sub("source", ...), len(classes)),
        classes=classes,
        splits=parse_splits(r.sub("splits")),
        preprocess=preprocess,
        metrics=metrics,
        primary_metric=primary,
        protocols=protocols,
        **_shared_fields(r, path, raw),
    )


def _shared_fields(r: Reader, path: Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The TaskSpec fields every kind reads the same way (identity, grouping, prompt template, citation)."""
    return {"name": _task_name(r), "version": str(r.get("version", (int, str))), "file": str(path),
            "description": r.get("description", str, ""), "groups": r.strings("groups", ()),
            "prompt_template": r.get("prompt_template", str, "{}"), "citation": r.get("citation", str, ""), "raw": raw}


def _task_name(r: Reader) -> str:
    """``name``, which names result folders, figures and sweep jobs: never a path (no ``/``, ``\\``, control
    characters, nor a leading ``.``: ``..``, ``../x``)."""
    name = r.get("name", str)
    if not name.strip() or name.startswith(".") or any(c in name for c in "/\\") \
            or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise r.fail("name", f"got {name!r}; a task name names files and folders, so it may not be empty, contain "
                     "'/', '\\' or control characters, or start with '.'")
    return name


def _primary_metric(r: Reader, metrics: tuple[str, ...]) -> str:
    """``primary_metric`` (default: the first metric), which must be one of ``metrics``."""
    primary = r.get("primary_metric", str, metrics[0])
    if primary not in metrics:
        raise r.fail("primary_metric", f"'{primary}' is not in metrics: {', '.join(metrics)}")
    return primary


def _preprocess(r: Reader) -> dict[str, Any]:
    """The ``preprocess`` hints, checked to make a valid :class:`~retbench.preprocess.Preprocess`."""
    pre = r.sub("preprocess")
    pre.check_unknown(PREPROCESS_KEYS)
    check_preprocess(pre)
    return dict(pre.data)


def _check_protocols(r: Reader, protocols: tuple[str, ...], kind: str) -> None:
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


def _parse_kind_task(r: Reader, path: Path, raw: dict[str, Any], kind: str) -> TaskSpec:
    """A ``retrieval`` or ``vqa`` task: the shared keys plus the kind's own section."""
    from retbench.metrics import METRICS, RANK_METRICS

    if "problem" in raw:
        raise r.fail("problem", f"not used by kind '{kind}' (the kind is the problem)")
    retrieval, vqa = None, None
    if kind == "retrieval":
        classes = parse_classes(r) if "classes" in raw else ()  # optional labels of the pairs
        modality = r.get("modality", str, None, choices=IMAGE_MODALITIES)
        retrieval = parse_retrieval(r.sub("retrieval", ...), modality)
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
        vqa = parse_vqa(r.sub("vqa", ...))
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
    primary = _primary_metric(r, metrics)
    protocols = r.strings("protocols", default_protocols)
    _check_protocols(r, protocols, kind)
    if retrieval is not None and "retrieval.linear_map" in protocols and all(map(retrieval.needs_text,
                                                                                   retrieval.directions)):
        raise r.fail("protocols", "protocol 'retrieval.linear_map' maps image features to image features and needs "
                     "an image-to-image direction")
    preprocess = _preprocess(r)
    src = r.sub("source", ...)
    if kind == "vqa":
        for key in ("bins", "label_column", "label_format"):
            if key in src.data:
                raise src.fail(key, "kind 'vqa' reads its answers per question (vqa.questions[i].column, bins)")
    source = parse_source(src, len(classes))
    allowed_sources = ("csv",) if kind == "retrieval" else ("csv", "folder")
    if source.kind not in allowed_sources:
        raise src.fail("kind", f"got '{source.kind}'; kind '{kind}' reads {' or '.join(allowed_sources)} sources")
    return TaskSpec(
        modality=modality,
        problem=kind,
        source=source,
        classes=classes,
        splits=parse_splits(r.sub("splits")),
        preprocess=preprocess,
        metrics=metrics,
        primary_metric=primary,
        protocols=protocols,
        **_shared_fields(r, path, raw),
        kind=kind,
        retrieval=retrieval,
        vqa=vqa,
    )
