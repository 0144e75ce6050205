"""Statistics for comparing models: paired tests, corrections, bootstrap intervals and DeLong's test.

Everything here is a pure function of numbers or of stored results:

- :func:`wilcoxon_test` — paired Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) with the
  direction taken from the metric's ``higher_is_better`` and the matched-pairs rank-biserial
  correlation as effect size;
- :func:`adjust_pvalues` — Holm's step-down (default) or Benjamini–Hochberg
  (``scipy.stats.false_discovery_control``) correction for one model compared with many;
- :func:`bootstrap_ci` and :func:`paired_bootstrap` — percentile bootstrap over test images,
  stratified by class, fixed seed (``scipy.stats.bootstrap``, one sample per class): general tools;
  results and leaderboards use :mod:`retbench.resampling` (test patients × runs) instead;
- :func:`delong_test` and :func:`delong_test_ovr` — DeLong, DeLong & Clarke-Pearson (1988) for two
  correlated AUROCs on the same test set, with the midrank algorithm of Sun & Xu (2014);
- :func:`check_comparable` — refuses to compare results made under different task versions,
  splits or protocol settings, naming what differs;
- :func:`summarize` — the summary of a protocol's runs stored with every result (mean, std, runs,
  and the 95% CI it is given), for every kind of task;
- :func:`t_interval` — the Student-t interval of the mean of a few values (few-shot curves).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Callable, Container, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from scipy import stats

from retbench.errors import RetbenchError

if TYPE_CHECKING:
    from retbench.resampling import Interval

CORRECTIONS = ("holm", "bh", "none")
"""Multiple-comparison corrections accepted by :func:`adjust_pvalues`."""

MIN_RESAMPLES = 1000
"""Bootstrap intervals use at least this many resamples."""

MODEL_OWNED_SETTINGS = frozenset({"solver", "prompts", "logit_scale", "renormalize"})
"""Protocol settings that belong to the model or record what happened (solver iterations, a model's
own zero-shot prompts and logit scale); they may differ between results that are still comparable."""


# --------------------------------------------------------------------------------------------
# Paired Wilcoxon signed-rank test
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WilcoxonResult:
    """A paired Wilcoxon signed-rank test of model A against model B.

    Differences are oriented so that a positive difference means A is better (``a - b`` when
    higher is better, ``b - a`` otherwise). ``statistic`` and ``p_value`` are scipy's; ``t_plus`` /
    ``t_minus`` are the rank sums of the differences favouring A / B, and ``effect_size`` is the
    matched-pairs rank-biserial correlation ``(t_plus - t_minus) / (t_plus + t_minus)`` in [-1, 1]
    (positive: A better).
    """

    n: int
    n_nonzero: int
    statistic: float
    p_value: float
    t_plus: float
    t_minus: float
    effect_size: float
    median_difference: float
    mean_difference: float
    wins: int
    ties: int
    losses: int
    zero_method: str
    alternative: str


def oriented_differences(a: Sequence[float], b: Sequence[float], higher_is_better: bool | Sequence[bool] = True) -> np.ndarray:
    """Paired differences with the sign chosen so that positive means ``a`` is better.

    ``higher_is_better`` may be one flag or one per pair (pairs pooled over tasks whose metrics
    point in different directions).
    """
    a_arr, b_arr = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"paired values need two 1-d arrays of equal length, got {a_arr.shape} and {b_arr.shape}")
    if not (np.all(np.isfinite(a_arr)) and np.all(np.isfinite(b_arr))):
        raise ValueError("paired values must be finite")
    sign = np.where(np.broadcast_to(np.asarray(higher_is_better, dtype=bool), a_arr.shape), 1.0, -1.0)
    return sign * (a_arr - b_arr)


def signed_rank_sums(d: np.ndarray, zero_method: str = "wilcox") -> tuple[float, float]:
    """Rank sums ``(T+, T-)`` of the positive and negative differences, midranks for ties.

    ``wilcox`` ranks the non-zero differences only; ``pratt`` ranks all and drops the zeros'
    ranks; ``zsplit`` ranks all and splits the zeros' ranks evenly between the two sums.
    """
    d = np.asarray(d, dtype=float)
    if zero_method == "wilcox":
        d = d[d != 0]
        ranks = stats.rankdata(np.abs(d))
        return float(ranks[d > 0].sum()), float(ranks[d < 0].sum())
    if zero_method not in ("pratt", "zsplit"):
        raise ValueError(f"zero_method must be wilcox, pratt or zsplit, got {zero_method!r}")
    ranks = stats.rankdata(np.abs(d))
    zero_half = ranks[d == 0].sum() / 2 if zero_method == "zsplit" else 0.0
    return float(ranks[d > 0].sum() + zero_half), float(ranks[d < 0].sum() + zero_half)


def wilcoxon_test(a: Sequence[float], b: Sequence[float], higher_is_better: bool | Sequence[bool] = True, *,
                  zero_method: str = "wilcox", alternative: str = "two-sided", method: str = "auto") -> WilcoxonResult:
    """Paired Wilcoxon signed-rank test of ``a`` against ``b`` (``scipy.stats.wilcoxon``).

    ``alternative='greater'`` tests whether ``a`` is better. scipy's ``method='auto'`` gives the
    exact null distribution for up to 50 pairs without ties or zeros, an exhaustive permutation null
    for up to 13 pairs with ties or zeros, and the normal approximation (tie-corrected) otherwise.
    When every difference is zero there is no evidence of a difference: ``p_value`` is 1.
    """
    d = oriented_differences(a, b, higher_is_better)
    if d.size == 0:
        raise ValueError("no pairs to test")
    t_plus, t_minus = signed_rank_sums(d, zero_method)
    nonzero = int(np.count_nonzero(d))
    if nonzero == 0:
        statistic, p_value = 0.0, 1.0
    else:
        res = stats.wilcoxon(d, zero_method=zero_method, alternative=alternative, method=method)
        statistic, p_value = float(res.statistic), float(res.pvalue)
    total = t_plus + t_minus
    return WilcoxonResult(
        n=int(d.size), n_nonzero=nonzero, statistic=statistic, p_value=p_value, t_plus=t_plus, t_minus=t_minus,
        effect_size=float((t_plus - t_minus) / total) if total else 0.0, median_difference=float(np.median(d)),
        mean_difference=float(np.mean(d)), wins=int((d > 0).sum()), ties=int((d == 0).sum()), losses=int((d < 0).sum()),
        zero_method=zero_method, alternative=alternative,
    )


def min_wilcoxon_p(n: int, alternative: str = "two-sided") -> float:
    """Smallest p-value the exact signed-rank test can reach with ``n`` non-zero pairs (all one sign)."""
    one_sided = 0.5 ** n
    return min(1.0, 2 * one_sided) if alternative == "two-sided" else one_sided


# --------------------------------------------------------------------------------------------
# Multiple comparisons
# --------------------------------------------------------------------------------------------


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error rate).

    Sorted ascending, the i-th smallest p (1-based) is multiplied by ``m - i + 1``; adjusted values
    are made non-decreasing in that order and capped at 1. (scipy has no Holm; this is its
    textbook definition, tested against the closed-testing formulation.)
    """
    p = np.asarray(p_values, dtype=float)
    m = p.size
    if m == 0:
        return p.copy()
    order = np.argsort(p, kind="stable")
    scaled = (m - np.arange(m)) * p[order]
    adjusted = np.minimum(1.0, np.maximum.accumulate(scaled))
    out = np.empty(m)
    out[order] = adjusted
    return out


def adjust_pvalues(p_values: Sequence[float], method: str = "holm") -> np.ndarray:
    """Adjust a family of p-values: ``holm`` (default), ``bh`` (Benjamini–Hochberg) or ``none``.

    NaN entries (tests that could not be run) are left NaN and are not counted in the family.
    """
    if method not in CORRECTIONS:
        raise ValueError(f"correction must be one of {', '.join(CORRECTIONS)}, got {method!r}")
    p = np.asarray(p_values, dtype=float)
    out = np.full(p.shape, np.nan)
    ok = ~np.isnan(p)
    if not ok.any():
        return out
    if method == "holm":
        out[ok] = holm(p[ok])
    elif method == "bh":
        out[ok] = stats.false_discovery_control(p[ok], method="bh")
    else:
        out[ok] = p[ok]
    return out


def correction_name(method: str) -> str:
    """Human-readable name of a correction."""
    return {"holm": "Holm", "bh": "Benjamini–Hochberg", "none": "no correction"}[method]


def stars(p: float | None, thresholds: tuple[float, float] = (0.01, 0.001)) -> str:
    """``*`` for p < 0.01, ``**`` for p < 0.001 (the RetFiner convention), else empty."""
    if p is None or not np.isfinite(p):
        return ""
    return "**" if p < thresholds[1] else "*" if p < thresholds[0] else ""


# --------------------------------------------------------------------------------------------
# Bootstrap
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BootstrapResult:
    """A percentile bootstrap interval over test images.

    ``estimate`` is the statistic on the full test set, ``se`` the standard deviation of the
    bootstrap distribution. For a paired difference, ``p_value`` is the two-sided bootstrap p of
    "no difference": twice the smaller share of resampled differences on either side of zero.
    """

    estimate: float
    low: float
    high: float
    se: float
    n_resamples: int
    seed: int
    stratified: bool
    confidence: float
    p_value: float | None = None
    distribution: np.ndarray = field(default_factory=lambda: np.empty(0), repr=False, compare=False)

    def describe(self) -> str:
        """One phrase for footnotes."""
        how = "stratified by class" if self.stratified else "unstratified"
        return f"percentile bootstrap over test images, {how} ({self.n_resamples} resamples, seed {self.seed})"


def class_strata(y: np.ndarray, stratified: bool = True) -> list[np.ndarray]:
    """Indices of each class (in class order), or one stratum with every index."""
    y = np.asarray(y)
    if not stratified:
        return [np.arange(len(y))]
    return [np.flatnonzero(y == c) for c in np.unique(y)]


def _rng_kwargs(seed: int) -> dict[str, Any]:
    generator = np.random.default_rng(seed)
    name = "rng" if "rng" in inspect.signature(stats.bootstrap).parameters else "random_state"  # scipy < 1.15
    return {name: generator}


def bootstrap_indices(statistic: Callable[[np.ndarray], float], y: np.ndarray, *, n_resamples: int = MIN_RESAMPLES,
                      seed: int = 0, confidence: float = 0.95, stratified: bool = True,
                      method: str = "percentile") -> tuple[float, Any]:
    """Bootstrap a statistic of test-image indices with ``scipy.stats.bootstrap``.

    Stratified: each class is passed to scipy as its own sample, and scipy resamples the samples
    independently — every resample keeps the test set's class counts. A class with a single test
    image is kept as is (its only resample is itself). Returns the full-set estimate and scipy's
    result.
    """
    if n_resamples < MIN_RESAMPLES:
        raise ValueError(f"use at least {MIN_RESAMPLES} bootstrap resamples, got {n_resamples}")
    y = np.asarray(y)
    strata = class_strata(y, stratified)
    fixed = np.concatenate([s for s in strata if len(s) < 2] + [np.empty(0, dtype=int)]).astype(int)
    movable = tuple(s for s in strata if len(s) >= 2)
    if not movable:
        raise ValueError("bootstrap needs a stratum with at least two test images")

    def resampled(*samples: np.ndarray) -> float:
        return float(statistic(np.concatenate([np.asarray(s, dtype=int) for s in samples] + [fixed])))

    result = stats.bootstrap(movable, resampled, n_resamples=n_resamples, vectorized=False, paired=False,
                             confidence_level=confidence, method=method, **_rng_kwargs(seed))
    return float(statistic(np.arange(len(y)))), result


def bootstrap_ci(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, proba: np.ndarray, *,
                 n_resamples: int = MIN_RESAMPLES, seed: int = 0, confidence: float = 0.95,
                 stratified: bool = True) -> BootstrapResult:
    """Percentile bootstrap CI of ``metric(y, proba)`` over test images (stratified by class)."""
    y, proba = np.asarray(y), np.asarray(proba)
    estimate, res = bootstrap_indices(lambda i: metric(y[i], proba[i]), y, n_resamples=n_resamples, seed=seed,
                                      confidence=confidence, stratified=stratified)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    return BootstrapResult(estimate, float(res.confidence_interval.low), float(res.confidence_interval.high),
                           float(np.nanstd(dist, ddof=1)), n_resamples, seed, stratified, confidence, None, dist)


def paired_bootstrap(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, proba_a: np.ndarray,
                     proba_b: np.ndarray, *, n_resamples: int = MIN_RESAMPLES, seed: int = 0, confidence: float = 0.95,
                     stratified: bool = True) -> BootstrapResult:
    """Paired bootstrap of ``metric(A) - metric(B)`` on the same resampled test images.

    Both models' predictions must be for the same images in the same order. The interval is the
    percentile interval of the resampled differences; ``p_value`` is the two-sided bootstrap p.
    """
    y, proba_a, proba_b = np.asarray(y), np.asarray(proba_a), np.asarray(proba_b)
    if len(proba_a) != len(y) or len(proba_b) != len(y):
        raise ValueError("paired bootstrap needs both models' predictions on the same test images")
    estimate, res = bootstrap_indices(lambda i: metric(y[i], proba_a[i]) - metric(y[i], proba_b[i]), y,
                                      n_resamples=n_resamples, seed=seed, confidence=confidence, stratified=stratified)
    dist = np.asarray(res.bootstrap_distribution, dtype=float)
    dist_ok = dist[np.isfinite(dist)]
    p = min(1.0, 2 * min(np.mean(dist_ok <= 0), np.mean(dist_ok >= 0))) if dist_ok.size else float("nan")
    return BootstrapResult(estimate, float(res.confidence_interval.low), float(res.confidence_interval.high),
                           float(np.nanstd(dist, ddof=1)), n_resamples, seed, stratified, confidence, float(p), dist)


# --------------------------------------------------------------------------------------------
# DeLong's test (fast midrank algorithm of Sun & Xu 2014)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DeLongComponents:
    """AUROCs of k score vectors on one binary test set and their DeLong structural components.

    ``v10[r, i]`` is, for score vector r, the share of negatives ranked below positive i (ties
    count half); ``v01[r, j]`` the share of positives ranked above negative j. ``covariance`` is
    DeLong's estimate ``S10 / m + S01 / n`` of the AUROCs' covariance matrix.
    """

    auc: np.ndarray
    v10: np.ndarray
    v01: np.ndarray
    covariance: np.ndarray

    @property
    def m(self) -> int:
        """Number of positives."""
        return int(self.v10.shape[1])

    @property
    def n(self) -> int:
        """Number of negatives."""
        return int(self.v01.shape[1])


def delong_components(y: np.ndarray, scores: np.ndarray) -> DeLongComponents:
    """AUROCs and DeLong components of each row of ``scores`` (k, N) for binary labels ``y`` (1 = positive).

    Sun & Xu (2014): with midranks ``tx`` within the positives, ``ty`` within the negatives and
    ``tz`` within all, ``v10 = (tz[pos] - tx) / n`` and ``v01 = 1 - (tz[neg] - ty) / m`` — O(N log N)
    instead of comparing every positive with every negative.
    """
    y = np.asarray(y)
    scores = np.atleast_2d(np.asarray(scores, dtype=float))
    if scores.shape[1] != y.shape[0]:
        raise ValueError(f"scores have {scores.shape[1]} columns for {y.shape[0]} labels")
    if not set(np.unique(y).astype(int).tolist()) <= {0, 1} or not np.all(np.isin(y, [0, 1])):
        raise ValueError("DeLong needs binary labels (0/1)")
    pos, neg = scores[:, y == 1], scores[:, y == 0]
    m, n = pos.shape[1], neg.shape[1]
    if m < 2 or n < 2:
        raise ValueError(f"DeLong needs at least two positives and two negatives, got {m} and {n}")
    tx = stats.rankdata(pos, axis=1)
    ty = stats.rankdata(neg, axis=1)
    tz = stats.rankdata(np.concatenate([pos, neg], axis=1), axis=1)
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return DeLongComponents(auc, v10, v01, cov)


def auroc(truth: np.ndarray, score: np.ndarray) -> float:
    """AUROC as the Mann–Whitney probability that a positive outscores a negative (ties half), from midranks.

    NaN unless both classes are present. Equals ``sklearn.metrics.roc_auc_score`` (tested).
    """
    truth = np.asarray(truth).astype(bool)
    m, n = int(truth.sum()), int((~truth).sum())
    if m == 0 or n == 0:
        return float("nan")
    ranks = stats.rankdata(np.asarray(score, dtype=float))
    return float((ranks[truth].sum() - m * (m + 1) / 2) / (m * n))


def macro_auroc(y: np.ndarray, proba: np.ndarray) -> float:
    """The ``auroc`` metric without sklearn's per-call overhead (used for figure legends).

    Binary: AUROC of column 1; more classes: the mean one-vs-rest AUROC over the classes present.
    """
    y, proba = np.asarray(y), np.asarray(proba, dtype=float)
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if proba.shape[1] == 2:
        return auroc(y == 1, proba[:, 1])
    return float(np.mean([auroc(y == c, proba[:, c]) for c in present]))


def delong_variance(y: np.ndarray, score: np.ndarray) -> tuple[float, float]:
    """AUROC of one score vector and DeLong's estimate of its variance."""
    comp = delong_components(y, np.asarray(score, dtype=float)[None, :])
    return float(comp.auc[0]), float(comp.covariance[0, 0])


def delong_ci(y: np.ndarray, score: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """AUROC and its asymptotic normal CI with DeLong's standard error (clipped to [0, 1])."""
    auc, var = delong_variance(y, score)
    half = float(stats.norm.ppf(0.5 + confidence / 2) * np.sqrt(var))
    return auc, max(0.0, auc - half), min(1.0, auc + half)


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of AUROC(A) = AUROC(B) on the same test images (two-sided, normal)."""

    auc_a: float
    auc_b: float
    difference: float
    se: float
    z: float
    p_value: float
    low: float
    high: float
    n_positive: int
    n_negative: int
    label: str | None = None


def delong_test(y: np.ndarray, score_a: np.ndarray, score_b: np.ndarray, confidence: float = 0.95,
                label: str | None = None) -> DeLongResult:
    """DeLong's test for two correlated AUROCs: ``z = (A - B) / sqrt(var A + var B - 2 cov)``."""
    comp = delong_components(y, np.vstack([np.asarray(score_a, dtype=float), np.asarray(score_b, dtype=float)]))
    c = comp.covariance
    diff = float(comp.auc[0] - comp.auc[1])
    var = float(c[0, 0] + c[1, 1] - 2 * c[0, 1])
    se = float(np.sqrt(max(var, 0.0)))
    if se == 0.0:
        z, p = (0.0, 1.0) if diff == 0 else (float(np.sign(diff) * np.inf), 0.0)
    else:
        z = diff / se
        p = float(2 * stats.norm.sf(abs(z)))
    half = float(stats.norm.ppf(0.5 + confidence / 2)) * se
    return DeLongResult(float(comp.auc[0]), float(comp.auc[1]), diff, se, float(z), p, diff - half, diff + half,
                        comp.m, comp.n, label)


def delong_test_ovr(y: np.ndarray, proba_a: np.ndarray, proba_b: np.ndarray, class_names: Sequence[str] | None = None,
                    correction: str = "holm") -> list[tuple[DeLongResult, float]]:
    """One-vs-rest DeLong tests, one per class present with ≥ 2 positives and ≥ 2 negatives.

    Class c's scores are column c of each model's probabilities. Returns ``(result, adjusted p)``
    pairs, the p-values adjusted over the classes tested.
    """
    y = np.asarray(y)
    proba_a, proba_b = np.asarray(proba_a, dtype=float), np.asarray(proba_b, dtype=float)
    tests = []
    for c in range(proba_a.shape[1]):
        positives = int((y == c).sum())
        if positives < 2 or len(y) - positives < 2:
            continue
        name = class_names[c] if class_names is not None else str(c)
        tests.append(delong_test((y == c).astype(int), proba_a[:, c], proba_b[:, c], label=name))
    adjusted = adjust_pvalues([t.p_value for t in tests], correction)
    return list(zip(tests, adjusted.tolist()))


# --------------------------------------------------------------------------------------------
# Comparability of stored results
# --------------------------------------------------------------------------------------------


class IncomparableResultsError(RetbenchError):
    """Results of one task and protocol were produced under different conditions."""


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _test_images(result: Mapping[str, Any]) -> str | None:
    """A digest of the test-image indices of every run (seed, k), or None without predictions."""
    runs = result.get("runs") or []
    if not runs or any("predictions" not in r for r in runs):
        return None
    return _digest(sorted((r.get("seed"), r.get("k") or 0, r["predictions"]["index"]) for r in runs))


def comparability_fields(result: Mapping[str, Any]) -> dict[str, Any]:
    """What must be equal for two results to be compared, by a readable name."""
    task, data, protocol = result.get("task", {}), result.get("data", {}), result.get("protocol", {})
    settings = protocol.get("settings", {}) or {}
    fields: dict[str, Any] = {
        "task": task.get("name"),
        "task version": task.get("version"),
        "task spec hash": task.get("spec_hash"),
        "protocol": protocol.get("name"),
        "split strategy": data.get("split_strategy"),
        "split seed": data.get("split_seed"),
        "image list": data.get("image_list_hash"),
        "split sizes": _digest(data.get("splits")) if data.get("splits") is not None else None,
        "headline k": result.get("headline_k"),
    }
    for key in sorted(set(settings) - MODEL_OWNED_SETTINGS):
        fields[f"protocol setting '{key}'"] = settings[key]
    images = _test_images(result)
    if images is not None:
        fields["test images per run"] = images
    return fields


def comparability_problems(results: Sequence[Mapping[str, Any]]) -> list[str]:
    """What differs between ``results`` (empty when they may be compared), one phrase per field."""
    if len(results) < 2:
        return []
    per_result = [(str(r.get("model", {}).get("name", "?")), comparability_fields(r)) for r in results]
    names = sorted({k for _, f in per_result for k in f})
    problems = []
    for name in names:
        values = [(model, f.get(name, "(absent)")) for model, f in per_result]
        if len({json.dumps(v, sort_keys=True, default=str) for _, v in values}) > 1:
            shown = "; ".join(f"{model}: {_short(v)}" for model, v in values)
            problems.append(f"{name} differs ({shown})")
    return problems


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str) if not isinstance(value, str) else value
    return text if len(text) <= 60 else text[:57] + "..."


def check_comparable(results: Sequence[Mapping[str, Any]]) -> None:
    """Raise :class:`IncomparableResultsError` naming every difference in task version, split or
    protocol configuration between ``results`` (typically one task and protocol, several models)."""
    problems = comparability_problems(results)
    if problems:
        first = results[0]
        where = f"{first.get('task', {}).get('name', '?')} / {first.get('protocol', {}).get('name', '?')}"
        raise IncomparableResultsError(
            f"cannot compare the results for {where}: " + "; ".join(problems)
            + ". Rerun the outdated results with `retbench run ... --overwrite`."
        )


# --------------------------------------------------------------------------------------------
# Summaries of runs, and the t-interval of a few values
# --------------------------------------------------------------------------------------------


def summarize(run_metrics: Sequence[Mapping[str, Any]], interval: Callable[[str], Interval | None] | None = None,
              per_class: Container[str] = ()) -> dict[str, dict[str, Any]]:
    """The summary stored with every result: per metric name of the runs, the mean over runs (NaN runs
    left out), the std between runs (sample, ddof 1; 0 for one run), the number of runs and their values.

    ``interval(name)``, where it returns one (a :class:`retbench.resampling.Interval`) with finite
    bounds, adds its 95% CI (``ci95``) and how it was made (``ci_method``); runs share one test set, so
    there is no CI from the runs alone. Names in ``per_class`` hold one value per class in each run:
    they get the per-class mean only.
    """
    summary: dict[str, dict[str, Any]] = {}
    for name in run_metrics[0]:
        values = [m[name] for m in run_metrics]
        if name in per_class:
            summary[name] = {"mean": np.nanmean(np.array(values, dtype=float), axis=0).tolist()}
            continue
        arr = np.array(values, dtype=float)
        entry: dict[str, Any] = {"mean": float(np.nanmean(arr)) if not np.isnan(arr).all() else float("nan"),
                                 "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0,
                                 "n": int(len(arr)), "values": arr.tolist()}
        ci = interval(name) if interval is not None else None
        if ci is not None and np.isfinite(ci.low) and np.isfinite(ci.high):
            entry["ci95"] = [ci.low, ci.high]
            entry["ci_method"] = ci.describe()
        summary[name] = entry
    return summary


def t_interval(values: Sequence[float] | np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Student-t interval of the mean of a few values: ``(low, high, standard error)``.

    For spreads without test predictions to resample (a few-shot curve's support sets per k);
    results and leaderboards take their CIs from :mod:`retbench.resampling`.
    """
    arr = np.asarray(values, dtype=float)
    n = len(arr)
    se = float(np.std(arr, ddof=1) / math.sqrt(n))
    half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * se
    mean = float(np.mean(arr))
    return mean - half, mean + half, se
