"""The one uncertainty method (retbench.resampling) against scipy, scikit-learn and brute force, and its
calibration under a simulated null: two equal models must not be called different more often than α."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy import stats as sps

from retbench import resampling as rs
from retbench.metrics import METRICS
from retbench.stats import wilcoxon_test

WEIGHTED = ("accuracy", "aca", "balanced_accuracy", "f1_macro", "f1_weighted", "auroc", "aupr", "kappa_quadratic",
            "kappa_unweighted", "mcc", "aupr_retfound")


@pytest.mark.parametrize("k", [2, 3, 5])
def test_weighted_forms_equal_the_metrics_on_repeated_images(k: int) -> None:
    """Every vectorised form equals the scikit-learn-based metric on the images repeated W[b] times
    (ties in the scores, absent classes and empty rows included)."""
    rng = np.random.default_rng(k)
    for trial in range(12):
        n = int(rng.integers(4, 50))
        y = rng.integers(0, k, n)
        proba = rng.random((n, k))
        if trial % 3 == 0:
            proba = np.round(proba, 1)  # ties
        weights = rng.integers(0, 3, (6, n)).astype(float)
        for name in WEIGHTED:
            metric = METRICS.get(name)
            got = metric.weighted(y, proba, weights)
            for b in range(len(weights)):
                rows = np.repeat(np.arange(n), weights[b].astype(int))
                if not len(rows):
                    continue
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        expected = float(metric(y[rows], proba[rows]))
                    except ValueError:
                        expected = float("nan")
                assert got[b] == pytest.approx(expected, abs=1e-12, nan_ok=True), (name, trial, b)


def brute_force(metric, runs, cluster_of, n_resamples, seed):  # noqa: ANN001, ANN201
    """Reference: draw clusters and runs with the generator, concatenate the drawn clusters' images, compute."""
    rng = np.random.default_rng(seed)
    union = sorted({int(i) for r in runs for i in r.index})
    labels = list(dict.fromkeys(cluster_of[i] if cluster_of else i for i in union))
    picks = rng.integers(0, len(labels), (n_resamples, len(labels)))
    run_picks = rng.integers(0, len(runs), (n_resamples, len(runs))) if len(runs) > 1 else np.zeros((n_resamples, 1), int)
    out = []
    for b in range(n_resamples):
        values = []
        for s in run_picks[b]:
            run = runs[s]
            of = np.array([labels.index(cluster_of[int(i)] if cluster_of else int(i)) for i in run.index])
            rows = np.concatenate([np.flatnonzero(of == c) for c in picks[b]])
            values.append(metric(run.y[rows], run.proba[rows]))
        out.append(np.mean(values))
    return np.array(out)


def _runs(rng: np.random.Generator, n_runs: int, n: int, k: int, shift: float = 0.0) -> list[rs.RunPredictions]:
    y = rng.integers(0, k, n)
    index = np.sort(rng.choice(1000, n, replace=False))
    out = []
    for s in range(n_runs):
        logits = (1.0 + shift) * np.eye(k)[y] + rng.normal(0, 1, (n, k))
        proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        out.append(rs.RunPredictions((s, 0), index, y, proba))
    return out


def test_cluster_bootstrap_equals_brute_force() -> None:
    rng = np.random.default_rng(0)
    runs = _runs(rng, 4, 60, 3)
    cluster_of = {int(i): f"patient{j // 2}" for j, i in enumerate(runs[0].index)}  # two eyes per patient
    metric = METRICS.get("kappa_quadratic")
    iv = rs.bootstrap(metric, runs, cluster_of, "patient", n_resamples=1000, seed=7)
    ref = brute_force(metric, runs, cluster_of, 1000, 7)
    assert np.allclose(iv.distribution, ref, atol=1e-12)
    assert (iv.low, iv.high) == pytest.approx(tuple(np.percentile(ref, [2.5, 97.5])))
    assert iv.n_clusters == 30 and iv.n_runs == 4 and "30 test patients × 4 runs" in iv.describe()
    assert rs.ci_over(iv.describe()) == iv.over() == "30 test patients × 4 runs"  # read back from a result file
    assert rs.ci_over("bootstrap") == "bootstrap"  # a phrase it cannot read is shown whole, never dropped
    assert iv.estimate == pytest.approx(np.mean([metric(r.y, r.proba) for r in runs]))


def test_one_run_one_image_per_unit_equals_scipy_bootstrap() -> None:
    rng = np.random.default_rng(1)
    run = _runs(rng, 1, 80, 2)[0]
    metric = METRICS.get("aca")
    iv = rs.bootstrap(metric, [run], None, n_resamples=1000, seed=3)
    ref = sps.bootstrap((np.arange(80),), lambda i: metric(run.y[i], run.proba[i]), n_resamples=1000,
                        vectorized=False, method="percentile", rng=np.random.default_rng(3))
    assert iv.low == pytest.approx(ref.confidence_interval.low, abs=1e-12)
    assert iv.high == pytest.approx(ref.confidence_interval.high, abs=1e-12)
    assert iv.se == pytest.approx(ref.standard_error, abs=1e-12)


def test_identical_runs_do_not_narrow_the_interval() -> None:
    """Five copies of one run (a probe whose seeds all pick the same C) have the one run's interval, not width 0."""
    rng = np.random.default_rng(2)
    run = _runs(rng, 1, 120, 4)[0]
    copies = [rs.RunPredictions((s, 0), run.index, run.y, run.proba) for s in range(5)]
    metric = METRICS.get("aca")
    one, five = rs.bootstrap(metric, [run], None, seed=0), rs.bootstrap(metric, copies, None, seed=0)
    assert five.high - five.low > 0.05
    assert np.allclose(one.distribution, rs.bootstrap(metric, copies[:1], None, seed=0).distribution)
    assert five.high - five.low == pytest.approx(one.high - one.low, rel=0.15)


def test_paired_bootstrap_equals_brute_force_difference() -> None:
    rng = np.random.default_rng(4)
    runs_a = _runs(rng, 3, 50, 3, shift=0.5)
    runs_b = [rs.RunPredictions(r.key, r.index, r.y, _runs(rng, 1, 50, 3)[0].proba) for r in runs_a]
    cluster_of = {int(i): j // 3 for j, i in enumerate(runs_a[0].index)}
    metric = METRICS.get("accuracy")
    iv = rs.paired_bootstrap(metric, runs_a, runs_b, cluster_of, "patient", seed=5)
    ref = brute_force(metric, runs_a, cluster_of, 1000, 5) - brute_force(metric, runs_b, cluster_of, 1000, 5)
    assert np.allclose(iv.distribution, ref, atol=1e-12)
    tail = min(np.sum(ref <= 0), np.sum(ref >= 0))
    assert iv.p_value == pytest.approx(min(1.0, 2 * (tail + 1) / 1001))
    assert rs.bootstrap_p(np.full(1000, 0.3)) == pytest.approx(2 / 1001)  # never 0


def test_mean_of_one_task_is_that_task() -> None:
    rng = np.random.default_rng(5)
    iv = rs.bootstrap(METRICS.get("aca"), _runs(rng, 5, 90, 4), None, seed=rs.task_seed("eye4class"))
    est, low, high, se = rs.mean_of_intervals([iv])
    assert (est, low, high, se) == (iv.estimate, iv.low, iv.high, iv.se)


# ----------------------------------------------------------------------------------------------
# Calibration under the null
# ----------------------------------------------------------------------------------------------


def _null_task(rng: np.random.Generator, n_patients: int = 40, n_seeds: int = 10) -> tuple[list, list, dict]:
    """Two equal models on a fresh test set of patients with two eyes each.

    Variance components in the spirit of the bundled tasks: a patient's difficulty shared by both
    eyes (sd 1.0), each model's own error on each image (sd 1.0), and a small seed effect (sd 0.15:
    runs that mostly pick the same C). Both models have the same expected accuracy.
    """
    n = 2 * n_patients
    y = rng.integers(0, 3, n)
    difficulty = np.repeat(rng.normal(0, 1.0, n_patients), 2)
    cluster_of = {i: i // 2 for i in range(n)}
    index = np.arange(n)
    models = []
    for _ in range(2):
        own = rng.normal(0, 1.0, (n, 3))
        runs = []
        for s in range(n_seeds):
            logits = (1.0 + difficulty)[:, None] * np.eye(3)[y] + own + rng.normal(0, 0.15, (n, 3))
            runs.append(rs.RunPredictions((s, 0), index, y, logits))
        models.append(runs)
    return models[0], models[1], cluster_of


def test_equal_models_are_rejected_at_about_alpha() -> None:
    """Per task, the paired patient × run bootstrap rejects equal models at about α; pooling
    task × seed runs as if independent (the old pairing) rejects far more often."""
    rng = np.random.default_rng(11)
    metric = METRICS.get("accuracy")
    sims, alpha = 150, 0.05
    rejected, pooled_rejected = 0, 0
    for sim in range(sims):
        tasks = [_null_task(rng) for _ in range(3)]
        # the per-task test on one task (its p is all the rate needs); all three tasks feed the pooled test
        rejected += rs.paired_bootstrap(metric, *tasks[0], "patient", n_resamples=1000, seed=sim).p_value < alpha
        xs = [metric(r.y, r.proba) for a, _, _ in tasks for r in a]
        ys = [metric(r.y, r.proba) for _, b, _ in tasks for r in b]
        pooled_rejected += wilcoxon_test(xs, ys).p_value < alpha
    rate, pooled = rejected / sims, pooled_rejected / sims
    assert rate <= 0.10, rate  # nominal 0.05; binomial sd at 150 simulations is 0.018
    assert pooled >= 0.4, pooled  # 30 near-copies per comparison: the defect this method replaces


def test_task_mean_wilcoxon_cannot_reject_with_few_tasks() -> None:
    """Across tasks the unit is the task: with 6 tasks the smallest two-sided p is 1/32, whatever the runs."""
    rng = np.random.default_rng(3)
    a, b = rng.random(6) + 1.0, rng.random(6)
    assert wilcoxon_test(a, b).p_value == pytest.approx(0.03125)


@pytest.mark.parametrize("name", ["aca", "auroc", "balanced_accuracy", "aupr"])
@pytest.mark.parametrize("shift", [-0.9, 6.0])  # a model at chance, one nearly perfect
def test_interval_stays_inside_the_metric_range(name: str, shift: float) -> None:
    """A t interval over 3 few-shot seeds put ACA at 0.225–1.132 and AUROC below 0; a percentile bootstrap of
    metric values cannot leave [0, 1], even on 12 test images with seeds far apart."""
    rng = np.random.default_rng(7)
    runs = _runs(rng, 3, 12, 2, shift)
    runs[0] = rs.RunPredictions(runs[0].key, runs[0].index, runs[0].y, runs[0].proba[:, ::-1].copy())  # one bad seed
    iv = rs.bootstrap(METRICS.get(name), runs, None, seed=0)
    assert 0.0 <= iv.low <= iv.high <= 1.0
    assert np.nanmin(iv.distribution) >= 0.0 and np.nanmax(iv.distribution) <= 1.0
