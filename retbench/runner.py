"""Orchestration: models × tasks × protocols → result files (skipping finished work).

Every protocol, whatever the kind of task, goes through :func:`run_protocol`: one
:class:`~retbench.protocols.base.Context`, the protocol's ``run``, one summary
(:func:`retbench.stats.summarize`) and one result record.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from retbench import resampling as rs
from retbench.adapters import Adapter, canonical_model_name, load_model, run_name, weights_to_read
from retbench.config import DEFAULT_PROTOCOLS, RunConfig
from retbench.data import Examples, data_root, load_examples, make_splits
from retbench.environment import environment, resolve_device
from retbench.errors import NotApplicableError, RetbenchError
from retbench.features import FeatureCache, Features, extract, image_content_digest
from retbench.metrics import METRICS
from retbench.pixel_cache import PixelCache, max_bytes_from_env
from retbench.preprocess import Preprocess
from retbench.protocols import PROTOCOLS
from retbench.protocols.base import Context, EvaluationProtocol, ProtocolOutput, Run
from retbench.resampling import Resampling
from retbench.spec import TaskSpec
from retbench.stats import summarize
from retbench.store import result_path, stale_reason, write_result
from retbench.tasks import get_task
from retbench.timing import collect, timed, timed_calls

SCHEMA_VERSION = 1
IMAGE = "image"
"""The image side of classification and VQA tasks (retrieval tasks name theirs)."""


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
    """A task's spec, examples and splits, loaded once and shared by all protocols and models.

    ``splits`` index the evaluated items: images, or the pairs of a retrieval task; ``data`` is
    the task's own structure (retrieval: the :class:`~retbench.data.pairs.PairData`; VQA: the
    :class:`~retbench.data.questions.QuestionData`; classification: None).
    """

    spec: TaskSpec
    examples: Examples
    splits: dict[str, np.ndarray]
    data: Any = None

    @property
    def n_items(self) -> int:
        """How many items are evaluated: pairs (retrieval) or images."""
        return len(self.data) if self.spec.kind == "retrieval" else len(self.examples)

    def split_counts(self) -> dict[str, dict[str, Any]]:
        """Per split, its size and its items per class (VQA: per question, per answer)."""
        spec = self.spec
        if spec.kind == "vqa":
            assert spec.vqa is not None
            answers = self.data.answers
            return {s: {"n": int(len(idx)), "per_question": {
                q.name: np.bincount(answers[idx, i][answers[idx, i] >= 0], minlength=len(q.answers)).tolist()
                for i, q in enumerate(spec.vqa.questions)}} for s, idx in self.splits.items()}
        labels = self.data.labels if spec.kind == "retrieval" else self.examples.labels
        return {s: {"n": int(len(idx)), "per_class": np.bincount(labels[idx], minlength=len(spec.classes)).tolist()}
                for s, idx in self.splits.items()}


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
        use_pixels = self.config.use_cache and self.config.pixel_cache  # --no-cache: no cache of any kind
        pixels = PixelCache(Path(self.config.cache_dir) / "pixels") if use_pixels else None
        with _forward_timed(self.adapter), timed("extract_wall_s"):
            feats = extract(self.adapter, ex, self.preprocess, joint, self.config.batch_size,
                            self.config.num_workers, self.config.skip_bad_images, pixels)
        feats.key = key
        if self.config.use_cache:
            cache.save(key, feats, {"model": self.adapter.name, "task": spec.name, "joint": joint})
        return feats


@contextmanager
def _forward_timed(adapter: Adapter) -> Iterator[None]:
    """The adapter's image encoders timed as section ``forward_s`` while the block runs (then restored)."""
    names = [n for n in ("encode_image", "encode_image_joint") if hasattr(adapter, n)]
    own = {n: adapter.__dict__[n] for n in names if n in adapter.__dict__}
    for n in names:
        setattr(adapter, n, timed_calls(getattr(adapter, n), "forward_s"))
    try:
        yield
    finally:
        for n in names:
            if n in own:
                setattr(adapter, n, own[n])
            else:
                delattr(adapter, n)


def text_encoder(adapter: Adapter) -> Callable[[list[str]], np.ndarray] | None:
    """The model's text embeddings as numpy (None without a text tower)."""
    if not adapter.has_text:
        return None

    def encode(texts: list[str]) -> np.ndarray:
        import torch

        with torch.inference_mode():
            return adapter.encode_text(texts).float().cpu().numpy()

    return encode


def load_task_data(name: str, root: str | None) -> TaskData:
    """Spec, examples and splits of a task under the data root (plus its pairs or questions for those kinds)."""
    spec = get_task(name)
    if spec.kind == "retrieval":
        from retbench.data.pairs import load_pairs

        pairs = load_pairs(spec, data_root(root))
        return TaskData(spec, pairs.examples, pairs.splits, pairs)
    if spec.kind == "vqa":
        from retbench.data.questions import load_questions

        questions = load_questions(spec, data_root(root))
        return TaskData(spec, questions.examples, make_splits(spec, questions.examples), questions)
    examples = load_examples(spec, data_root(root))
    return TaskData(spec, examples, make_splits(spec, examples))

def select_protocols(spec: TaskSpec, requested: tuple[str, ...]) -> list[str]:
    """Requested protocols the task allows (default: the three standard ones; retrieval and VQA tasks: their own).

    A protocol marked ``opt_in`` (the ``finetune*`` protocols, which train) applies to every task of its kind when
    asked for by name, without being listed in the task's spec, and never runs by default.
    """
    wanted = requested or (DEFAULT_PROTOCOLS if spec.kind == "classification" else spec.protocols)
    found = {p: PROTOCOLS.get(p) for p in wanted}  # unknown names fail with suggestions
    return [p for p in wanted if p in spec.protocols
            or (requested and getattr(found[p], "opt_in", False) and found[p].kind == spec.kind)]


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


def configured_protocol(name: str, config: RunConfig) -> EvaluationProtocol:
    """The registered protocol with the run's options (``--shots``, ``--seeds``) applied where it takes them."""
    return PROTOCOLS.get(name).with_options(tuple(config.shots) if config.shots else None, config.seeds or None)


def run(config: RunConfig, on_result: Callable[[Result], None] | None = None) -> list[Result]:
    """Run every (model, task, protocol) of ``config``; finished results are skipped unless ``overwrite``."""
    config = dataclasses.replace(config, models=tuple(canonical_model_name(m) for m in config.models))
    device = resolve_device(config.device)
    check_writable(config.results_dir, "results folder (--results-dir)")
    if config.use_cache:
        check_writable(config.cache_dir, "feature cache folder (--cache-dir / $RETBENCH_CACHE)")
    if config.use_cache and config.pixel_cache:
        max_bytes_from_env()  # a malformed $RETBENCH_PIXEL_CACHE_MAX_GB fails now, in one line
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
            sources = feature_sources(adapter, tasks[task_name], config)
            for p, path in pending:
                out.append(_report(run_protocol(adapter, tasks[task_name], sources, p, path, config, device), on_result))
    return out


def _report(result: Result, on_result: Callable[[Result], None] | None) -> Result:
    if on_result:
        on_result(result)
    return result


def feature_sources(adapter: Adapter, task: TaskData, config: RunConfig) -> dict[str, FeatureSource]:
    """The model's features of the task's images by image side: ``image`` (classification, VQA), or one
    per image side of a retrieval task (each with its side's preprocessing, one row per pair)."""
    spec = task.spec
    if spec.kind != "retrieval":
        return {IMAGE: FeatureSource(adapter, task, adapter.task_preprocess(spec.preprocess), config)}
    return {side.spec.name: FeatureSource(adapter, TaskData(spec, side.examples, {}),
                                          adapter.task_preprocess({**spec.preprocess, **side.spec.preprocess}), config)
            for side in task.data.image_sides() if side.examples is not None}


class _FeatureUse:
    """The features one protocol run reads, by (side, joint), and the time spent getting them (a side of
    None: the task's only image side)."""

    def __init__(self, task: TaskData, sources: dict[str, FeatureSource]) -> None:
        self.task, self.sources = task, sources
        self.used: dict[tuple[str, bool], Features] = {}
        self.seconds = 0.0

    def get(self, side: str | None, joint: bool) -> Features:
        """The features of ``side`` (probe or, with ``joint``, image-text), extracted or read on first use."""
        if side is None:
            if len(self.sources) != 1:
                raise RetbenchError(f"task '{self.task.spec.name}' has image sides {', '.join(self.sources)}: "
                                    "a protocol must name the side it reads")
            side = next(iter(self.sources))
        if side not in self.sources:
            raise RetbenchError(f"task '{self.task.spec.name}' has no image side '{side}' "
                                f"(its image sides: {', '.join(self.sources)})")
        start = time.perf_counter()
        feats = self.sources[side].get(joint)
        self.seconds += time.perf_counter() - start
        self.used[(side, joint)] = feats
        return feats


def run_protocol(adapter: Adapter, task: TaskData, sources: dict[str, FeatureSource], protocol_name: str, path: Path,
                 config: RunConfig, device: Any) -> Result:
    """One protocol on one task for one model, whatever the kind of task: build the :class:`Context`, run
    the protocol, summarise its runs and write the result to ``path`` (skipped when it needs a text tower
    the model lacks)."""
    protocol = configured_protocol(protocol_name, config)
    spec = task.spec
    if protocol.needs_text(spec) and not adapter.has_text:
        return Result({}, None, "skipped", f"{protocol_name}: model '{adapter.name}' has no text tower "
                      f"(task '{spec.name}' scores texts)")
    use = _FeatureUse(task, sources)
    scored_space = protocol.needs_text(spec)  # the features whose unreadable rows a protocol leaves out
    ctx = Context(
        spec=spec, examples=task.examples, splits=task.splits,
        features=lambda side=None: use.get(side, False).values,
        joint_features=(lambda side=None: use.get(side, True).values) if adapter.has_text else None,
        encode_text=text_encoder(adapter), device=device,
        valid=lambda side=None: use.get(side, scored_space).valid,
        # a model's zero-shot convention is for class prompts; VQA and retrieval protocols score their own texts
        zero_shot=adapter.zero_shot_setup(spec) if adapter.has_text and spec.kind == "classification" else None,
        data=task.data,
        model=adapter, preprocess=sources[IMAGE].preprocess if IMAGE in sources else None,
        artifacts=path.with_suffix(""), skip_bad_images=config.skip_bad_images,
    )
    begun = start = time.perf_counter()
    with collect() as sections:
        output = protocol.run(ctx)
        total = time.perf_counter() - start
        _check_output(protocol, spec, output)
        n_test = output.n_test if output.n_test is not None else int(ctx.valid()[task.splits["test"]].sum())
        used = dict(sorted(use.used.items()))
        timings = {"extract_s": use.seconds, "features_from_cache": all(f.from_cache for f in used.values()),
                   "extract_s_original": sum(f.seconds for f in used.values()), "fit_s": total - use.seconds}
        data = _result_dict(adapter, task, sources, protocol, output, n_test, used, config, device, timings)
    timings.update(_sections(sections))
    start = time.perf_counter()
    data = write_result(path, data)  # as stored: paths portable
    # the file cannot hold the time of its own writing: these two live in the returned result only
    data["timings"] = {**data["timings"], "write_s": time.perf_counter() - start,
                       "total_s": time.perf_counter() - begun}
    return Result(data, path)


def _sections(sections: dict[str, float]) -> dict[str, float]:
    """The stored profile of one protocol run: ``decode_s`` (feature extraction outside the model: reading,
    decoding, preprocessing, batching, caching), ``forward_s`` (the model), ``probe_fit_s`` (probe solves)
    and ``bootstrap_s`` (summaries and their confidence intervals); zeros where nothing ran."""
    forward = sections.get("forward_s", 0.0)
    return {"decode_s": max(sections.get("extract_wall_s", 0.0) - forward, 0.0), "forward_s": forward,
            "probe_fit_s": sections.get("probe_fit_s", 0.0), "bootstrap_s": sections.get("bootstrap_s", 0.0)}


def _check_output(protocol: EvaluationProtocol, spec: TaskSpec, output: ProtocolOutput) -> None:
    """Refuse an output without runs or without one of the protocol's headline metrics (one line)."""
    if not output.runs:
        raise RetbenchError(f"protocol '{protocol.name}' returned no runs on task '{spec.name}'")
    missing = [n for n in protocol.metric_names(spec) if n not in output.runs[0].metrics]
    if missing:
        raise RetbenchError(f"protocol '{protocol.name}' returned no '{missing[0]}' on task '{spec.name}' "
                            f"(its metric_names: {', '.join(protocol.metric_names(spec))})")


def _result_dict(adapter: Adapter, task: TaskData, sources: dict[str, FeatureSource], protocol: EvaluationProtocol,
                 output: ProtocolOutput, n_test: int, used: dict[tuple[str, bool], Features], config: RunConfig,
                 device: Any, timings: dict[str, Any]) -> dict[str, Any]:
    spec = task.spec
    resampling = Resampling.of(spec, task.examples)
    scored = [i for r in output.runs if r.predictions is not None for i in r.predictions.index]
    keys = {f"{side}:{'joint' if joint else 'features'}": f.key for (side, joint), f in used.items()}
    with timed("bootstrap_s"):
        summaries = _summaries(protocol, output, spec, resampling)
    return {
        "schema": SCHEMA_VERSION,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": adapter.describe(),
        "task": _task_record(spec),
        "protocol": {"name": protocol.name, "description": protocol.description, "settings": output.settings},
        "preprocess": ({side: s.preprocess.to_dict() for side, s in sources.items()} if spec.kind == "retrieval"
                       else sources[IMAGE].preprocess.to_dict()),
        "primary_metric": spec.primary_metric,
        **summaries,
        **({"resampling": resampling.to_dict(scored)} if scored else {}),
        "data": _data_summary(task, n_test, used, output.notes),
        "runs": [r.to_dict() for r in output.runs],
        "environment": environment(device),
        "timings": timings,
        "config": {**config.to_dict(), "models": None, "tasks": None},
        "feature_cache_key": next(iter(keys.values())) if len(keys) == 1 else keys,
    }


def _summaries(protocol: EvaluationProtocol, output: ProtocolOutput, spec: TaskSpec,
               resampling: Resampling) -> dict[str, Any]:
    """Headline metrics (few-shot: the largest k) and, for few-shot, a summary per k.

    The protocol's headline metrics (``metric_names``) get a 95% CI: the protocol's own ``interval``
    where it brings one, else the cluster bootstrap over test units × runs of the runs' predictions
    (:mod:`retbench.resampling`, the leaderboard's computation, so stored and published intervals
    agree) — for metrics without a vectorised weighted form only when primary (resampling them by
    repeated indices is slow).
    """
    headline = set(protocol.metric_names(spec))
    per_class = {n for n in output.runs[0].metrics if n in METRICS and METRICS.get(n).per_class}

    def summary(runs: list[Run]) -> dict[str, Any]:
        interval = output.interval or _prediction_interval(runs, spec.primary_metric, resampling)
        return summarize([r.metrics for r in runs], lambda name: interval(name) if name in headline else None,
                         per_class)

    ks = sorted({r.k for r in output.runs if r.k is not None})
    if not ks:
        return {"metrics": summary(output.runs)}
    by_k = {str(k): summary([r for r in output.runs if r.k == k]) for k in ks}
    return {"metrics": by_k[str(ks[-1])], "metrics_by_k": by_k, "headline_k": ks[-1]}


def _prediction_interval(runs: list[Run], primary: str, resampling: Resampling) -> Callable[[str], rs.Interval | None]:
    """The bootstrap CI of a metric over the runs' predictions (None: no predictions, per-class metrics, and
    metrics without a weighted form that are not primary)."""
    predictions = [r.predictions for r in runs]

    def interval(name: str) -> rs.Interval | None:
        metric = METRICS.get(name)
        present = [p for p in predictions if p is not None]
        if len(present) < len(predictions) or metric.per_class or (metric.weighted is None and name != primary):
            return None
        return rs.bootstrap(metric, present, resampling.cluster_of, resampling.unit, seed=resampling.seed)

    return interval


def _task_record(spec: TaskSpec) -> dict[str, Any]:
    """The task as stored: its identity and classes; retrieval and VQA tasks add their kind and parts."""
    record = {"name": spec.name, "version": spec.version, "spec_hash": spec.spec_hash, "file": spec.file,
              "modality": spec.modality, "problem": spec.problem}
    if spec.kind == "classification":
        return {**record, "classes": spec.class_names}
    return {**record, "kind": spec.kind, "classes": spec.class_names, "parts": _parts(spec)}


def _parts(spec: TaskSpec) -> dict[str, Any]:
    """What the qualified metric names refer to: retrieval directions or VQA questions."""
    if spec.retrieval is not None:
        return {"directions": {d.name: {"query": d.query, "gallery": d.gallery} for d in spec.retrieval.directions},
                "sides": {s.name: {"type": s.type, "column": s.column, "modality": s.modality}
                          for s in spec.retrieval.sides}}
    assert spec.vqa is not None
    return {"questions": {q.name: {"question": q.question, "column": q.column, "answers": [a.name for a in q.answers]}
                          for q in spec.vqa.questions}, "answer_template": spec.vqa.answer_template}


def _data_summary(task: TaskData, n_test: int, used: dict[tuple[str, bool], Features],
                  notes: dict[str, Any]) -> dict[str, Any]:
    """Sizes, splits, patients, duplicates and unreadable images of the task as evaluated."""
    spec, ex = task.spec, task.examples
    bad = [b for f in used.values() for b in f.bad_ids]
    # classification results list unreadable images in example order, retrieval and VQA results sorted
    bad_images = list(dict.fromkeys(bad)) if spec.kind == "classification" else sorted(set(bad))
    unit = {"retrieval": "pair", "vqa": "image"}.get(spec.kind)  # the evaluated item (classification: images, unnamed)
    return {**({"unit": unit} if unit else {}), "n_examples": task.n_items, "n_test": n_test,
            "splits": task.split_counts(), "split_strategy": spec.splits.strategy, "split_seed": spec.splits.seed,
            "by_patient": spec.splits.by_patient, "n_patients": len(set(ex.patients)),
            "near_duplicate_pairs": ex.near_duplicate_pairs, "image_list_hash": ex.image_list_hash(),
            "dropped": ex.dropped, "bad_images": bad_images, **({"warnings": list(ex.warnings)} if ex.warnings else {}),
            **notes}


def evaluate(model: str, task: str, protocol: str = "linear_probe", **options: Any) -> Result:
    """Evaluate one model on one task with one protocol; options are :class:`RunConfig` fields.

    >>> retbench.evaluate(model="classical", task="eye4class", protocol="linear_probe")  # doctest: +SKIP
    """
    config = RunConfig(models=(model,), tasks=(task,), protocols=(protocol,), **options)
    spec = get_task(task)
    if protocol not in select_protocols(spec, (protocol,)):
        raise NotApplicableError(not_applicable_reason(spec, protocol))
    res = run(config)[0]
    if res.status == "existing" and res.path is not None:  # an existing result always has its path
        import json

        res = Result(json.loads(res.path.read_text()), res.path, "existing")
    return res
