"""One uncertainty method for every protocol: a bootstrap over test patients (and over runs).

What varies between two evaluations of a model on a task is, first, *which test patients* were
sampled: both eyes of one person move together, so patients (the task's split groups: a patient,
or images that show one photograph) are the resampling unit — a cluster bootstrap; an image is its
own unit only where no patient id exists. Second, where a protocol has runs that differ (few-shot
support sets, linear-probe validation carves that select a different C, folds), the runs are
resampled too. A replicate b therefore

1. draws as many clusters as the test set has, with replacement (``rng.integers``, the same draw
   ``scipy.stats.bootstrap`` makes, so one run with one image per cluster reproduces scipy);
2. with S > 1 runs, draws S runs with replacement;
3. takes the mean over the drawn runs of the metric on the drawn patients' images.

The CI is the percentile interval of the replicates (it stays inside the metric's range). The
paired version draws the same patients and runs for two models (runs paired by (seed, k)) and
bootstraps the difference; its two-sided p is twice the smaller share of replicates on either side
of zero, counted with +1 (never 0; at least 2 / 1001 with 1,000 replicates). The point estimate
is the mean over runs of the metric on every test image: the same predictions the replicates
resample.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

if TYPE_CHECKING:  # annotations only: importing this module (ci_over for `retbench results`) stays free of sklearn
    from retbench.data.examples import Examples
    from retbench.metrics import Metric
    from retbench.spec import TaskSpec

RESAMPLES = 1000
"""Bootstrap replicates of every CI and paired test."""

CONFIDENCE = 0.95


@dataclass(frozen=True)
class RunPredictions:
    """One run's test predictions: example indices, labels, probabilities, and its pairing key.

    A run of several parts (VQA: one classification per question type) has them in ``parts``; its
    metric is the unweighted mean of the parts' metrics, and ``index`` is every image it scored.
    """

    key: tuple[int, int]
    index: np.ndarray
    y: np.ndarray
    proba: np.ndarray
    parts: tuple[RunPredictions, ...] = ()

    @classmethod
    def of_parts(cls, key: tuple[int, int], parts: Sequence[RunPredictions]) -> RunPredictions:
        """A run whose metric is the mean over ``parts``."""
        index = np.unique(np.concatenate([p.index for p in parts]))
        return cls(key, index, np.empty(0), np.empty((0, 0)), tuple(parts))

    def leaves(self) -> tuple[RunPredictions, ...]:
        """The parts, or the run itself."""
        return self.parts or (self,)


@dataclass(frozen=True)
class Interval:
    """A bootstrap estimate: point, percentile interval, SE, the replicates and how they were drawn."""

    estimate: float
    low: float
    high: float
    se: float
    n_clusters: int
    n_runs: int
    unit: str
    n_resamples: int
    seed: int
    p_value: float | None = None
    distribution: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)

    def over(self) -> str:
        """What was resampled: ``"61 test patients × 5 runs"`` (the replication unit of the CI)."""
        runs = f" × {self.n_runs} runs" if self.n_runs > 1 else ""
        return f"{self.n_clusters} test {self.unit}s{runs}"

    def describe(self) -> str:
        """One phrase for footnotes and result files (a result's ``ci_method``; :func:`ci_over` reads it back)."""
        return f"percentile bootstrap over {self.over()} ({self.n_resamples} resamples, seed {self.seed})"


def ci_over(method: str) -> str:
    """The replication unit in a stored ``ci_method`` (:meth:`Interval.describe`): ``"61 test patients × 5 runs"``;
    a method phrased otherwise is returned whole, so a CI is never shown without what it varies over."""
    head, sep, rest = method.partition("percentile bootstrap over ")
    if head or not sep or " (" not in rest:
        return method
    return rest.rsplit(" (", 1)[0]


def task_seed(task: str) -> int:
    """The bootstrap seed of a task: fixed, and different between tasks (independent draws per task)."""
    return zlib.crc32(task.encode()) % (2 ** 31)


@dataclass(frozen=True)
class Resampling:
    """How a task's test images group into resampling units: ``cluster_of`` maps an example index to
    its unit (patient), ``unit`` names it; ``seed`` is the task's fixed bootstrap seed."""

    cluster_of: dict[int, Any] | None
    unit: str
    seed: int

    @classmethod
    def of(cls, spec: TaskSpec, examples: Examples) -> Resampling:
        """Patients (the split groups) where the task splits by patient and ids exist, else images."""
        patients = list(examples.patients)
        if spec.splits.by_patient and len(set(patients)) < len(patients):
            return cls(dict(enumerate(patients)), "patient", task_seed(spec.name))
        return cls(None, "image", task_seed(spec.name))

    def to_dict(self, index: Any) -> dict[str, Any]:
        """The units of the test images ``index`` (every image the runs scored), coded in order of first appearance."""
        index = sorted({int(i) for i in index})
        codes: dict[Any, int] = {}
        cluster = [codes.setdefault(self.cluster_of[i] if self.cluster_of else i, len(codes)) for i in index]
        return {"unit": self.unit, "seed": self.seed, "n_units": len(codes), "index": index, "cluster": cluster}


def draw(n_clusters: int, n_runs: int, n_resamples: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Cluster counts (B, C) and run counts (B, S) of ``n_resamples`` replicates."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_clusters, (n_resamples, n_clusters))
    counts = _row_counts(picks, n_clusters)
    if n_runs == 1:
        return counts, np.ones((n_resamples, 1))
    return counts, _row_counts(rng.integers(0, n_runs, (n_resamples, n_runs)), n_runs)


def _row_counts(picks: np.ndarray, n: int) -> np.ndarray:
    rows = np.repeat(np.arange(picks.shape[0]), picks.shape[1])
    out = np.zeros((picks.shape[0], n))
    np.add.at(out, (rows, picks.ravel()), 1.0)
    return out


def replicate_values(metric: Metric, y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``metric`` under each row of image weights (B, N): vectorised where the metric has a weighted form."""
    if metric.weighted is not None:
        return np.asarray(metric.weighted(y, proba, weights), dtype=float)
    out = np.full(len(weights), np.nan)
    for b, w in enumerate(weights.astype(np.int64)):
        rows = np.repeat(np.arange(len(y)), w)
        if len(rows):
            out[b] = float(cast(float, metric(y[rows], proba[rows])))  # a scalar metric: never a per-class one here
    return out


class ClusterMap:
    """Test images → resampling units (clusters), over the union of every run's test images."""

    def __init__(self, cluster_of: Mapping[int, Hashable] | None, indices: Sequence[np.ndarray]) -> None:
        union = np.unique(np.concatenate([np.asarray(i, dtype=np.int64) for i in indices]))
        labels = [cluster_of[int(i)] if cluster_of is not None else int(i) for i in union]
        codes: dict[Hashable, int] = {}
        self.code = dict(zip(union.tolist(), (codes.setdefault(label, len(codes)) for label in labels)))
        self.n = len(codes)

    def of(self, index: np.ndarray) -> np.ndarray:
        """Cluster code of each image index."""
        return np.array([self.code[int(i)] for i in index], dtype=np.int64)


def _percentile(dist: np.ndarray, confidence: float) -> tuple[float, float]:
    ok = dist[np.isfinite(dist)]
    if ok.size == 0:
        return float("nan"), float("nan")
    alpha = (1 - confidence) / 2
    low, high = np.percentile(ok, [100 * alpha, 100 * (1 - alpha)])
    return float(low), float(high)


def _nanmean(values: np.ndarray, axis: int) -> np.ndarray:
    finite = np.isfinite(values)
    total = np.where(finite, values, 0.0).sum(axis=axis)
    count = finite.sum(axis=axis)
    return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def _matrix(metric: Metric, runs: Sequence[RunPredictions], clusters: ClusterMap, counts: np.ndarray) -> np.ndarray:
    """(B, S): each run's metric (mean over its parts) under each replicate's cluster counts."""
    def run_values(run: RunPredictions) -> np.ndarray:
        parts = [replicate_values(metric, p.y, p.proba, counts[:, clusters.of(p.index)]) for p in run.leaves()]
        return _nanmean(np.stack(parts, axis=1), axis=1)

    return np.stack([run_values(r) for r in runs], axis=1)


def run_value(metric: Metric, run: RunPredictions) -> float:
    """A run's metric on all its test images (the mean over its parts)."""
    values = np.array([float(cast(float, metric(p.y, p.proba))) for p in run.leaves()], dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _point(metric: Metric, runs: Sequence[RunPredictions]) -> float:
    values = np.array([run_value(metric, r) for r in runs], dtype=float)
    return float(np.nanmean(values)) if np.isfinite(values).any() else float("nan")


def _mean_over_drawn(matrix: np.ndarray, run_counts: np.ndarray) -> np.ndarray:
    drawn = np.where(run_counts > 0, matrix, 0.0)
    valid = np.where(np.isfinite(drawn), run_counts, 0.0)
    return np.where(valid.sum(axis=1) > 0, (np.nan_to_num(drawn) * valid).sum(axis=1) / valid.sum(axis=1).clip(1e-300),
                    np.nan)


def bootstrap(metric: Metric, runs: Sequence[RunPredictions], cluster_of: Mapping[int, Hashable] | None = None,
              unit: str = "image", *, n_resamples: int = RESAMPLES, seed: int = 0,
              confidence: float = CONFIDENCE) -> Interval:
    """CI of the mean over ``runs`` of ``metric``, resampling test clusters (and runs, when there are several).

    ``cluster_of`` maps each test image's example index to its unit (patient); None: each image is
    its own unit.
    """
    if not runs:
        raise ValueError("no runs to bootstrap")
    clusters = ClusterMap(cluster_of, [r.index for r in runs])
    counts, run_counts = draw(clusters.n, len(runs), n_resamples, seed)
    dist = _mean_over_drawn(_matrix(metric, runs, clusters, counts), run_counts)
    low, high = _percentile(dist, confidence)
    return Interval(_point(metric, runs), low, high, float(np.nanstd(dist, ddof=1)), clusters.n, len(runs), unit,
                    n_resamples, seed, None, dist)


def paired_bootstrap(metric: Metric, runs_a: Sequence[RunPredictions], runs_b: Sequence[RunPredictions],
                     cluster_of: Mapping[int, Hashable] | None = None, unit: str = "image", *,
                     n_resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Bootstrap of ``mean metric(A) - mean metric(B)`` on the same drawn patients and runs.

    Runs are paired by key (seed, k); both models' paired runs must score the same test images.
    The estimate is oriented as ``A - B`` (not by direction); ``p_value`` is two-sided.
    """
    b_of = {r.key: r for r in runs_b}
    keys = [r.key for r in runs_a if r.key in b_of]
    if not keys:
        raise ValueError("no runs with the same seed (and k) in both results")
    a_of = {r.key: r for r in runs_a}
    pa, pb = [a_of[k] for k in keys], [b_of[k] for k in keys]
    for ra, rb in zip(pa, pb):
        same = len(ra.leaves()) == len(rb.leaves()) and all(
            np.array_equal(x.index, z.index) and np.array_equal(x.y, z.y) for x, z in zip(ra.leaves(), rb.leaves()))
        if not same:
            raise ValueError(f"run {ra.key}: the two results score different test images")
    clusters = ClusterMap(cluster_of, [r.index for r in pa])
    counts, run_counts = draw(clusters.n, len(keys), n_resamples, seed)
    dist = (_mean_over_drawn(_matrix(metric, pa, clusters, counts), run_counts)
            - _mean_over_drawn(_matrix(metric, pb, clusters, counts), run_counts))
    low, high = _percentile(dist, confidence)
    p = bootstrap_p(dist)
    return Interval(_point(metric, pa) - _point(metric, pb), low, high, float(np.nanstd(dist, ddof=1)), clusters.n,
                    len(keys), unit, n_resamples, seed, float(p), dist)


def bootstrap_p(differences: np.ndarray) -> float:
    """Two-sided bootstrap p of "no difference": twice the smaller tail share of replicates at or beyond zero,
    counted with the usual +1 (Davison & Hinkley), so it is never 0: at least 2 / (B + 1)."""
    ok = differences[np.isfinite(differences)]
    if not ok.size:
        return float("nan")
    tail = min(int(np.sum(ok <= 0)), int(np.sum(ok >= 0)))
    return min(1.0, 2 * (tail + 1) / (ok.size + 1))


def mean_of_intervals(intervals: Sequence[Interval], confidence: float = CONFIDENCE) -> tuple[float, float, float, float]:
    """Estimate, CI and SE of the mean over tasks: replicate b of the mean is the mean of each task's replicate b.

    Tasks are independent samples (each drew its own patients with its own seed), so averaging
    their replicate distributions is the bootstrap of the mean; with one task it is that task's interval.
    """
    dist = np.mean(np.stack([i.distribution for i in intervals]), axis=0)
    low, high = _percentile(dist, confidence)
    return float(np.mean([i.estimate for i in intervals])), low, high, float(np.nanstd(dist, ddof=1))


def _from_record(key: tuple[int, int], pred: Mapping[str, Any]) -> RunPredictions:
    return RunPredictions(key, np.asarray(pred["index"], dtype=np.int64), np.asarray(pred["y_true"]),
                          np.asarray(pred["proba"], dtype=float))


def predictions_of(run: Mapping[str, Any]) -> RunPredictions | None:
    """A stored run's predictions: a classification run's, or a VQA run's per question (None without them)."""
    key = (int(run.get("seed") or 0), int(run.get("k") or 0))
    if run.get("predictions"):
        return _from_record(key, run["predictions"])
    questions = run.get("questions")
    if questions and all("proba" in q for q in questions.values()):
        return RunPredictions.of_parts(key, [_from_record(key, questions[name]) for name in sorted(questions)])
    return None


def bootstrap_statistic(statistic: Callable[[np.ndarray], float], units: Sequence[Hashable], unit: str = "image", *,
                        n_resamples: int = RESAMPLES, seed: int = 0, confidence: float = CONFIDENCE) -> Interval:
    """Percentile CI of ``statistic(rows)`` over rows grouped into ``units`` (one unit per row), units resampled.

    For statistics without a per-image metric form (retrieval's rank metrics over queries): each
    replicate passes the rows of the drawn units, repeated as drawn.
    """
    codes: dict[Hashable, int] = {}
    of = np.array([codes.setdefault(u, len(codes)) for u in units], dtype=np.int64)
    members = [np.flatnonzero(of == c) for c in range(len(codes))]
    counts, _ = draw(len(codes), 1, n_resamples, seed)
    dist = np.array([statistic(np.concatenate([np.repeat(m, int(n)) for m, n in zip(members, row)]))
                     for row in counts], dtype=float)
    low, high = _percentile(dist, confidence)
    return Interval(float(statistic(np.arange(len(of)))), low, high, float(np.nanstd(dist, ddof=1)), len(codes), 1,
                    unit, n_resamples, seed, None, dist)
