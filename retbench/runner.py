"""Orchestration: models × tasks × protocols → result files (skipping finished work)."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from retbench.adapters import Adapter, canonical_model_name, load_model, run_name, weights_to_read
from retbench.config import DEFAULT_PROTOCOLS, RunConfig
from retbench.data import Examples, data_root, load_examples, make_splits
from retbench.environment import environment, resolve_device
from retbench.errors import NotApplicableError, RetbenchError
from retbench.features import FeatureCache, Features, extract, image_content_digest
from retbench.preprocess import Preprocess
from retbench.protocols import PROTOCOLS
from retbench.protocols.base import Context, Resampling, summarize
from retbench.spec import TaskSpec
from retbench.store import result_path, stale_reason, write_result
from retbench.tasks import get_task

SCHEMA_VERSION = 1


@dataclass
class Result:
    """One stored evaluation (what ``retbench.evaluate`` returns)."""

    data: dict[str, Any]
    path: Path | None = None
    status: str = "done"  # done | existing | skipped
    reason: str = ""

    @property
    def metrics(self) -> dict[str, Any]:
        """Aggregated metrics: name → {mean, std, ci95, values}."""
        return self.data.get("metrics", {})

    @property
    def primary(self) -> float:
        """Mean of the task's primary metric."""
        return self.metrics[self.data["primary_metric"]]["mean"]

    def __repr__(self) -> str:
        if self.status == "skipped":
            return f"Result(skipped: {self.reason})"
        d = self.data
        return (f"Result({d['model']['name']} on {d['task']['name']} / {d['protocol']['name']}: "
                f"{d['primary_metric']}={self.primary:.4f}, path={self.path})")


@dataclass
class TaskData:
    """A task's spec, examples and splits, loaded once and shared by all protocols and models."""

    spec: TaskSpec
    examples: Examples
    splits: dict[str, np.ndarray]
    extra: Any = None  # retrieval: the PairData; vqa: the QuestionData


@dataclass
class FeatureSource:
    """Lazily extracted (or cached) features of one model on one task."""

    adapter: Adapter
    task: TaskData
    preprocess: Preprocess
    config: RunConfig
    _cache: dict[bool, Features] = field(default_factory=dict)

    def get(self, joint: bool = False) -> Features:
        """Features of every example, from the cache when possible."""
        if joint not in self._cache:
            self._cache[joint] = self._load(joint)
        return self._cache[joint]

    def _load(self, joint: bool) -> Features:
        spec, ex = self.task.spec, self.task.examples
        cache = FeatureCache(Path(self.config.cache_dir) / "features")
        key = cache.key(self.adapter, self.preprocess, spec.name, spec.version, ex.image_list_hash(), joint,
                        content=image_content_digest(ex))
        if self.config.use_cache and (hit := cache.load(key, len(ex))) is not None:
            if hit.bad_ids and not self.config.skip_bad_images:
                hit = None  # cached with skipped images; this run must fail on them instead
            else:
                return hit
        feats = extract(self.adapter, ex, self.preprocess, joint, self.config.batch_size,
                        self.config.num_workers, self.config.skip_bad_images)
        feats.key = key
        if self.config.use_cache:
            cache.save(key, feats, {"model": self.adapter.name, "task": spec.name, "joint": joint})
        return feats

    def text(self, texts: list[str]) -> np.ndarray:
        """Text embeddings as numpy."""
        import torch

        with torch.inference_mode():
            return self.adapter.encode_text(texts).float().cpu().numpy()


def load_task_data(name: str, root: str | None) -> TaskData:
    """Spec, examples and splits of a task under the data root (plus its pairs or questions for those kinds)."""
    spec = get_task(name)
    if spec.kind == "retrieval":
        from retbench.data.pairs import load_pairs

        pairs = load_pairs(spec, data_root(root))
        return TaskData(spec, pairs.examples, make_splits(spec, pairs.examples), pairs)
    if spec.kind == "vqa":
        from retbench.data.questions import load_questions

        questions = load_questions(spec, data_root(root))
        return TaskData(spec, questions.examples, make_splits(spec, questions.examples), questions)
    examples = load_examples(spec, data_root(root))
    return TaskData(spec, examples, make_splits(spec, examples))


def select_protocols(spec: TaskSpec, requested: tuple[str, ...]) -> list[str]:
    """Requested protocols the task allows (default: the three standard ones; retrieval and VQA tasks: their own)."""
    wanted = requested or (DEFAULT_PROTOCOLS if spec.kind == "classification" else spec.protocols)
    for p in wanted:
        PROTOCOLS.get(p)  # unknown names fail with suggestions
    return [p for p in wanted if p in spec.protocols]


def not_applicable_reason(spec: TaskSpec, protocol: str) -> str:
    """Why an explicitly requested ``protocol`` is not run on ``spec``'s task (one line)."""
    return (f"{protocol}: does not apply to task '{spec.name}' ({spec.kind} task; its protocols: "
            f"{', '.join(spec.protocols)})")


def check_writable(folder: str | Path, what: str) -> None:
    """Fail with one line unless ``folder`` (or, while it does not exist yet, its nearest existing parent) is a writable
    folder; creates nothing."""
    import os

    path = Path(folder).expanduser()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise RetbenchError(f"{what} {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "" if probe == path else f" (its parent {probe} is read-only)"
        raise RetbenchError(f"{what} {path} is not writable{where}; choose another folder or fix its permissions")


def configured_protocol(name: str, config: RunConfig) -> Any:
    """The registered protocol with CLI overrides (shots, number of seeds) applied."""
    proto = PROTOCOLS.get(name)
    changes: dict[str, Any] = {}
    if config.shots and hasattr(proto, "shots"):
        changes.update(shots=tuple(config.shots), strict=True)
    if config.seeds and hasattr(proto, "seeds") and not getattr(proto, "flair_folds", False):
        changes["seeds"] = tuple(range(config.seeds))
    return dataclasses.replace(proto, **changes) if changes else proto


def run(config: RunConfig, on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run every (model, task, protocol) of ``config``; finished results are skipped unless ``overwrite``."""
    config = dataclasses.replace(config, models=tuple(canonical_model_name(m) for m in config.models))
    device = resolve_device(config.device)
    check_writable(config.results_dir, "results folder (--results-dir)")
    if config.use_cache:
        check_writable(config.cache_dir, "feature cache folder (--cache-dir / $RETBENCH_CACHE)")
    results_root = Path(config.results_dir)
    out: list[Result] = []
    tasks: dict[str, TaskData] = {}
    not_applicable: set[tuple[str, str]] = set()
    for model in config.models:
        adapter: Adapter | None = None
        stored_as = run_name(model, config.weights)
        checkpoint: list[Path | None] = []  # the file this model reads, found (once) when a result already exists
        for task_name in config.tasks:
            spec = get_task(task_name)
            allowed = select_protocols(spec, config.protocols)
            for p in config.protocols:
                if p not in allowed and (spec.name, p) not in not_applicable:  # one line per (task, protocol)
                    not_applicable.add((spec.name, p))
                    out.append(_report(Result({}, None, "skipped", not_applicable_reason(spec, p)), on_result))
            pending = []
            for p in allowed:
                path = result_path(results_root, stored_as, spec.name, p)
                if path.exists() and not config.overwrite:
                    if not checkpoint:
                        checkpoint.append(weights_to_read(model, config.weights))
                    if reason := stale_reason(path, spec.spec_hash, checkpoint[0]):
                        raise RetbenchError(reason)
                    out.append(_report(Result({}, path, "existing", "result exists (use --overwrite)"), on_result))
                else:
                    pending.append((p, path))
            if not pending:
                continue
            if task_name not in tasks:
                tasks[task_name] = load_task_data(task_name, config.data_root)
            adapter = adapter or load_model(model, config.weights, str(device), config.precision)
            if spec.kind != "classification":
                for p, path in pending:
                    out.append(_report(_run_kind(adapter, tasks[task_name], p, path, config, device), on_result))
                continue
            source = FeatureSource(adapter, tasks[task_name], adapter.task_preprocess(spec.preprocess), config)
            for p, path in pending:
                out.append(_report(_run_one(source, p, path, config, device), on_result))
    return out


def _report(result: Result, on_result: Callable[[Result], None] | None) -> Result:
    if on_result:
        on_result(result)
    return result


def _run_one(source: FeatureSource, protocol_name: str, path: Path, config: RunConfig, device: Any) -> Result:
    protocol = configured_protocol(protocol_name, config)
    adapter, task = source.adapter, source.task
    if protocol.needs_text and not adapter.has_text:
        return Result({}, None, "skipped", f"{protocol_name}: model '{adapter.name}' has no text tower")
    start = time.perf_counter()
    features = source.get(joint=protocol.needs_text)
    extract_s = time.perf_counter() - start
    ctx = Context(
        spec=task.spec, examples=task.examples, splits=task.splits,
        features=lambda: source.get(False).values,
        joint_features=(lambda: source.get(True).values) if adapter.has_text else None,
        encode_text=source.text if adapter.has_text else None,
        device=device, valid=lambda: features.valid,
        zero_shot=adapter.zero_shot_setup(task.spec) if adapter.has_text else None,
    )
    fit_start = time.perf_counter()
    output = protocol.run(ctx)
    fit_s = time.perf_counter() - fit_start
    metric_names = tuple(output.runs[0].metrics)
    data = _result_dict(source, protocol, output, metric_names, features, config, device,
                        {"extract_s": extract_s, "features_from_cache": features.from_cache,
                         "extract_s_original": features.seconds, "fit_s": fit_s})
    data = write_result(path, data)  # as stored: paths portable
    return Result(data, path)


def _result_dict(source: FeatureSource, protocol: Any, output: Any, metric_names: tuple[str, ...],
                 features: Features, config: RunConfig, device: Any, timings: dict[str, Any]) -> dict[str, Any]:
    spec, ex, splits = source.task.spec, source.task.examples, source.task.splits
    resampling = Resampling.of(spec, ex)
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": source.adapter.describe(),
        "task": {"name": spec.name, "version": spec.version, "spec_hash": spec.spec_hash, "file": spec.file,
                 "modality": spec.modality, "problem": spec.problem, "classes": spec.class_names},
        "protocol": {"name": protocol.name, "description": protocol.description, "settings": output.settings},
        "preprocess": source.preprocess.to_dict(),
        "primary_metric": spec.primary_metric,
        **_summaries(output.runs, metric_names, spec.primary_metric, resampling),
        "resampling": resampling.to_dict(i for r in output.runs for i in r.indices),
        "data": _data_summary(spec, ex, splits, features),
        "runs": [r.to_dict() for r in output.runs],
        "environment": environment(device),
        "timings": timings,
        "config": {**config.to_dict(), "models": None, "tasks": None},
        "feature_cache_key": features.key,
    }


def _summaries(runs: list, metric_names: tuple[str, ...], primary: str, resampling: Resampling) -> dict[str, Any]:
    """Headline metrics (few-shot: the largest k) and, for few-shot, a summary per k."""
    ks = sorted({r.k for r in runs if r.k is not None})
    if not ks:
        return {"metrics": summarize(runs, metric_names, primary, resampling)}
    by_k = {str(k): summarize([r for r in runs if r.k == k], metric_names, primary, resampling) for k in ks}
    return {"metrics": by_k[str(ks[-1])], "metrics_by_k": by_k, "headline_k": ks[-1]}


def _data_summary(spec: TaskSpec, ex: Examples, splits: dict[str, np.ndarray], features: Features) -> dict[str, Any]:
    per_split = {s: {"n": int(len(idx)), "per_class": np.bincount(ex.labels[idx], minlength=len(spec.classes)).tolist()}
                 for s, idx in splits.items()}
    return {"n_examples": len(ex), "n_test": int(features.valid[splits["test"]].sum()), "splits": per_split,
            "split_strategy": spec.splits.strategy, "split_seed": spec.splits.seed, "by_patient": spec.splits.by_patient,
            "n_patients": len(set(ex.patients)), "near_duplicate_pairs": ex.near_duplicate_pairs,
            "image_list_hash": ex.image_list_hash(), "dropped": ex.dropped,
            "bad_images": features.bad_ids, **({"warnings": list(ex.warnings)} if ex.warnings else {})}


def _run_kind(adapter: Adapter, task: TaskData, protocol_name: str, path: Path, config: RunConfig, device: Any) -> Result:
    """One retrieval or VQA protocol run: features per image side (extracted lazily, cached), then the protocol."""
    from retbench.protocols.retrieval import RetrievalContext
    from retbench.protocols.vqa import VQAContext

    protocol = configured_protocol(protocol_name, config)
    spec = task.spec
    requires_text = getattr(protocol, "requires_text", lambda _spec: protocol.needs_text)(spec)
    if requires_text and not adapter.has_text:
        return Result({}, None, "skipped", f"{protocol_name}: model '{adapter.name}' has no text tower "
                      f"(task '{spec.name}' scores texts)")
    timer = {"extract_s": 0.0}

    def timed(source: FeatureSource, joint: bool) -> Features:
        start = time.perf_counter()
        feats = source.get(joint)
        timer["extract_s"] += time.perf_counter() - start
        return feats

    if spec.kind == "retrieval":
        sources = {side.spec.name: FeatureSource(adapter, TaskData(spec, side.examples, {}),
                                                 adapter.task_preprocess({**spec.preprocess, **side.spec.preprocess}),
                                                 config)
                   for side in task.extra.image_sides() if side.examples is not None}
        text = next(iter(sources.values())).text if adapter.has_text else None
        ctx: Any = RetrievalContext(spec, task.extra, lambda side, joint: timed(sources[side], joint).values, text, device)
        preprocess: dict[str, Any] = {name: s.preprocess.to_dict() for name, s in sources.items()}
    else:
        source = FeatureSource(adapter, task, adapter.task_preprocess(spec.preprocess), config)
        sources = {"image": source}
        ctx = VQAContext(spec, task.extra, task.splits, lambda: timed(source, False).values,
                         (lambda: timed(source, True).values) if adapter.has_text else None,
                         source.text if adapter.has_text else None, device,
                         lambda: timed(source, protocol.needs_text).valid)
        preprocess = source.preprocess.to_dict()
    start = time.perf_counter()
    output = protocol.run(ctx)
    total = time.perf_counter() - start
    used = {(name, joint): feats for name, s in sources.items() for joint, feats in s._cache.items()}
    timings = {"extract_s": timer["extract_s"], "features_from_cache": all(f.from_cache for f in used.values()),
               "extract_s_original": sum(f.seconds for f in used.values()), "fit_s": total - timer["extract_s"]}
    keys = {f"{name}:{'joint' if joint else 'features'}": f.key for (name, joint), f in sorted(used.items())}
    data = {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": adapter.describe(),
        "task": {"name": spec.name, "version": spec.version, "spec_hash": spec.spec_hash, "file": spec.file,
                 "modality": spec.modality, "problem": spec.problem, "kind": spec.kind, "classes": spec.class_names,
                 "parts": _parts(spec)},
        "protocol": {"name": protocol.name, "description": protocol.description, "settings": output.settings},
        "preprocess": preprocess,
        "primary_metric": spec.primary_metric,
        "metrics": output.metrics,
        **({"resampling": output.resampling} if output.resampling else {}),
        "data": _kind_data_summary(task, output, sorted({b for f in used.values() for b in f.bad_ids})),
        "runs": output.runs,
        "environment": environment(device),
        "timings": timings,
        "config": {**config.to_dict(), "models": None, "tasks": None},
        "feature_cache_key": next(iter(keys.values())) if len(keys) == 1 else keys,
    }
    data = write_result(path, data)  # as stored: paths portable
    return Result(data, path)


def _parts(spec: TaskSpec) -> dict[str, Any]:
    """What the qualified metric names refer to: retrieval directions or VQA questions."""
    if spec.retrieval is not None:
        return {"directions": {d.name: {"query": d.query, "gallery": d.gallery} for d in spec.retrieval.directions},
                "sides": {s.name: {"type": s.type, "column": s.column, "modality": s.modality}
                          for s in spec.retrieval.sides}}
    assert spec.vqa is not None
    return {"questions": {q.name: {"question": q.question, "column": q.column, "answers": [a.name for a in q.answers]}
                          for q in spec.vqa.questions}, "answer_template": spec.vqa.answer_template}


def _kind_data_summary(task: TaskData, output: Any, bad_images: list[str]) -> dict[str, Any]:
    spec, extra = task.spec, task.extra
    if spec.kind == "retrieval":
        unit, n, splits = "pair", len(extra), {
            s: {"n": int(len(idx)), "per_class": np.bincount(extra.labels[idx], minlength=len(spec.classes)).tolist()}
            for s, idx in extra.splits.items()}
    else:
        assert spec.vqa is not None
        unit, n, splits = "image", len(extra.examples), {
            s: {"n": int(len(idx)), "per_question": {
                q.name: np.bincount(extra.answers[idx, i][extra.answers[idx, i] >= 0], minlength=len(q.answers)).tolist()
                for i, q in enumerate(spec.vqa.questions)}}
            for s, idx in task.splits.items()}
    ex = task.examples
    return {"unit": unit, "n_examples": n, "n_test": output.n_test, "splits": splits,
            "split_strategy": spec.splits.strategy, "split_seed": spec.splits.seed, "by_patient": spec.splits.by_patient,
            "n_patients": len(set(ex.patients)), "near_duplicate_pairs": ex.near_duplicate_pairs,
            "image_list_hash": ex.image_list_hash(), "dropped": ex.dropped,
            "bad_images": bad_images, **({"warnings": list(ex.warnings)} if ex.warnings else {}), **output.notes}


def evaluate(model: str, task: str, protocol: str = "linear_probe", **options: Any) -> Result:
    """Evaluate one model on one task with one protocol; options are :class:`RunConfig` fields.

    >>> retbench.evaluate(model="classical", task="eye4class", protocol="linear_probe")  # doctest: +SKIP
    """
    config = RunConfig(models=(model,), tasks=(task,), protocols=(protocol,), **options)
    spec = get_task(task)
    if protocol not in select_protocols(spec, (protocol,)):
        raise NotApplicableError(not_applicable_reason(spec, protocol))
    res = run(config)[0]
    if res.status == "existing":
        import json

        res = Result(json.loads(res.path.read_text()), res.path, "existing")
    return res
