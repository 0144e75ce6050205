"""retbench.stats against its references: scipy, brute-force definitions and published worked examples."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import accuracy_score, roc_auc_score

from retbench import stats
from retbench.errors import RetbenchError
from retbench.metrics import METRICS

# Stata's fuel-economy data ([R] signrank): 12 cars, mpg with and without a fuel treatment.
MPG1 = [20, 23, 21, 25, 18, 17, 18, 24, 20, 24, 23, 19]
MPG2 = [24, 25, 21, 22, 23, 18, 17, 28, 24, 27, 21, 23]
# Hanley & McNeil (1982), Table 1: CT ratings (1 = definitely normal ... 5 = definitely abnormal)
# of 58 truly normal and 51 truly abnormal cases; also Stata's hanley.dta ([R] roctab).
HM_NORMAL = [33, 6, 6, 11, 2]
HM_ABNORMAL = [3, 2, 2, 11, 33]


# ---- Wilcoxon signed-rank -------------------------------------------------------------------


@pytest.mark.parametrize("zero_method", ["wilcox", "pratt", "zsplit"])
@pytest.mark.parametrize("seed", [0, 1])
def test_wilcoxon_matches_scipy(zero_method: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    a = np.round(rng.normal(0.7, 0.1, 30), 2)
    b = np.round(a - rng.normal(0.02, 0.05, 30), 2)  # rounding makes ties and zeros
    ours = stats.wilcoxon_test(a, b, zero_method=zero_method)
    ref = sps.wilcoxon(a, b, zero_method=zero_method)
    assert ours.statistic == pytest.approx(float(ref.statistic))
    assert ours.p_value == pytest.approx(float(ref.pvalue), rel=1e-12)
    assert ours.n == 30 and ours.n_nonzero == int(np.count_nonzero(a - b))
    assert ours.wins + ours.ties + ours.losses == 30


def test_wilcoxon_direction_follows_higher_is_better() -> None:
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=12), rng.normal(size=12)
    up = stats.wilcoxon_test(a, b, higher_is_better=True)
    down = stats.wilcoxon_test(a, b, higher_is_better=False)
    assert down.p_value == pytest.approx(up.p_value)
    assert down.effect_size == pytest.approx(-up.effect_size)
    assert (down.wins, down.losses) == (up.losses, up.wins)
    assert down.median_difference == pytest.approx(-up.median_difference)
    # One-sided: "a better" when lower is better equals scipy's 'less' on a - b.
    one = stats.wilcoxon_test(a, b, higher_is_better=False, alternative="greater")
    assert one.p_value == pytest.approx(float(sps.wilcoxon(a, b, alternative="less").pvalue))
    # Pairs pooled over metrics of both directions: each pair is oriented on its own.
    flags = [True] * 6 + [False] * 6
    pooled = stats.wilcoxon_test(a, b, higher_is_better=flags)
    d = np.where(flags, a - b, b - a)
    assert pooled.p_value == pytest.approx(float(sps.wilcoxon(d).pvalue))


def test_signed_rank_sums_and_effect_size_against_walsh_averages() -> None:
    # Without ties or zeros, T+ is the number of positive Walsh averages (d_i + d_j) / 2, i <= j,
    # and T+ + T- = n (n + 1) / 2: the rank-biserial correlation by complete enumeration.
    rng = np.random.default_rng(3)
    d = rng.normal(0.3, 1.0, 15)
    walsh = [d[i] + d[j] for i, j in itertools.combinations_with_replacement(range(len(d)), 2)]
    positive, negative = sum(w > 0 for w in walsh), sum(w < 0 for w in walsh)
    res = stats.wilcoxon_test(d, np.zeros_like(d))
    assert res.t_plus == positive and res.t_minus == negative
    assert res.effect_size == pytest.approx((positive - negative) / (len(d) * (len(d) + 1) / 2))
    assert min(res.t_plus, res.t_minus) == pytest.approx(res.statistic)


def test_wilcoxon_stata_worked_example() -> None:
    # Stata [R] signrank, mpg1 = mpg2: positive 3 (rank sum 13.5), negative 8 (63.5), zero 1;
    # z = -1.973, Prob > |z| = 0.0485 (zeros ranked and then dropped: scipy's 'pratt').
    res = stats.wilcoxon_test(MPG1, MPG2, zero_method="pratt", method="asymptotic")
    assert (res.wins, res.losses, res.ties) == (3, 8, 1)
    assert (res.t_plus, res.t_minus) == (13.5, 63.5)
    assert round(res.p_value, 4) == 0.0485
    assert res.effect_size == pytest.approx((13.5 - 63.5) / 77)


def test_wilcoxon_edge_cases() -> None:
    assert stats.wilcoxon_test([0.5, 0.5, 0.5], [0.5, 0.5, 0.5]).p_value == 1.0  # no difference at all
    assert stats.min_wilcoxon_p(5) == pytest.approx(float(sps.wilcoxon(np.arange(1.0, 6.0)).pvalue))
    assert stats.min_wilcoxon_p(10) == pytest.approx(float(sps.wilcoxon(np.arange(1.0, 11.0)).pvalue))
    with pytest.raises(ValueError):
        stats.wilcoxon_test([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        stats.wilcoxon_test([1.0, float("nan")], [1.0, 2.0])


# ---- multiple comparisons -------------------------------------------------------------------


def _holm_closed_testing(p: np.ndarray) -> np.ndarray:
    """Holm = closed testing with Bonferroni local tests: the adjusted p of H_i is the largest
    Bonferroni p over all intersections containing i (Marcus, Peritz & Gabriel)."""
    m = len(p)
    out = np.zeros(m)
    for size in range(1, m + 1):
        for subset in itertools.combinations(range(m), size):
            local = min(1.0, size * min(p[list(subset)]))
            for i in subset:
                out[i] = max(out[i], local)
    return out


def _bh_step_up(p: np.ndarray) -> np.ndarray:
    m = len(p)
    order = np.argsort(p)
    return np.array([min(1.0, min(m * p[order[j]] / (j + 1) for j in range(m) if p[order[j]] >= p[i])) for i in range(m)])


@pytest.mark.parametrize("seed", range(4))
def test_holm_and_bh_against_their_definitions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    p = rng.uniform(0, 0.2, 7) ** 2
    assert stats.adjust_pvalues(p, "holm") == pytest.approx(_holm_closed_testing(p))
    assert stats.adjust_pvalues(p, "bh") == pytest.approx(_bh_step_up(p))
    assert stats.adjust_pvalues(p, "bh") == pytest.approx(sps.false_discovery_control(p, method="bh"))
    assert stats.adjust_pvalues(p, "none") == pytest.approx(p)


def test_corrections_worked_example_and_nan() -> None:
    p = [0.01, 0.02, 0.03, 0.04, 0.05]
    # Holm: 5 x 0.01, 4 x 0.02, 3 x 0.03, then kept monotone; BH: every step-up value is 0.05.
    assert stats.adjust_pvalues(p, "holm") == pytest.approx([0.05, 0.08, 0.09, 0.09, 0.09])
    assert stats.adjust_pvalues(p, "bh") == pytest.approx([0.05] * 5)
    with_nan = stats.adjust_pvalues([0.01, float("nan"), 0.04], "holm")
    assert np.isnan(with_nan[1]) and with_nan[[0, 2]] == pytest.approx([0.02, 0.04])  # the NaN is not in the family
    with pytest.raises(ValueError):
        stats.adjust_pvalues(p, "bonferroni")
    assert [stats.stars(x) for x in (0.02, 0.009, 0.0009, float("nan"))] == ["", "*", "**", ""]


# ---- bootstrap ------------------------------------------------------------------------------


def _predictions(n: int = 60, k: int = 3, noise: float = 1.2, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = np.repeat(np.arange(k), n // k)
    logits = np.eye(k)[y] * 1.5 + rng.normal(0, noise, (len(y), k))
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba


def test_unstratified_bootstrap_is_scipys() -> None:
    y, proba = _predictions()
    ours = stats.bootstrap_ci(METRICS.get("accuracy"), y, proba, n_resamples=1000, seed=7, stratified=False)
    correct = (proba.argmax(1) == y).astype(float)
    ref = sps.bootstrap((correct,), np.mean, n_resamples=1000, method="percentile", rng=np.random.default_rng(7))
    assert (ours.low, ours.high) == pytest.approx((ref.confidence_interval.low, ref.confidence_interval.high))
    assert ours.se == pytest.approx(float(np.std(ref.bootstrap_distribution, ddof=1)))
    assert ours.estimate == pytest.approx(accuracy_score(y, proba.argmax(1)))


def test_stratified_bootstrap_keeps_class_counts_and_matches_the_analytic_variance() -> None:
    y, proba = _predictions(n=300)
    share = stats.bootstrap_ci(lambda yy, pp: float(np.mean(yy == 0)), y, proba, n_resamples=1000)
    assert share.low == share.high == pytest.approx(1 / 3)  # every resample keeps the class counts
    # Accuracy under stratified resampling: Var = sum_c (n_c / n)^2 p_c (1 - p_c) / n_c.
    acc = stats.bootstrap_ci(lambda yy, pp: float(np.mean(pp.argmax(1) == yy)), y, proba, n_resamples=2000, seed=1)
    correct = proba.argmax(1) == y
    var = sum((np.sum(y == c) / len(y)) ** 2 * correct[y == c].mean() * (1 - correct[y == c].mean()) / np.sum(y == c)
              for c in range(3))
    assert acc.se == pytest.approx(np.sqrt(var), rel=0.08)
    assert acc.low < acc.estimate < acc.high


def _balanced_accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    """Plain numpy (fast); the bootstrap machinery does not depend on the metric."""
    pred = proba.argmax(1)
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def test_paired_bootstrap_is_the_difference_of_the_same_resamples() -> None:
    y, pa = _predictions(seed=1)
    _, pb = _predictions(noise=2.0, seed=2)
    metric = _balanced_accuracy
    assert metric(y, pa) == pytest.approx(METRICS.get("aca")(y, pa))
    paired = stats.paired_bootstrap(metric, y, pa, pb, n_resamples=1000, seed=3)
    a = stats.bootstrap_ci(metric, y, pa, n_resamples=1000, seed=3)
    b = stats.bootstrap_ci(metric, y, pb, n_resamples=1000, seed=3)
    assert paired.distribution == pytest.approx(a.distribution - b.distribution)
    assert paired.estimate == pytest.approx(metric(y, pa) - metric(y, pb))
    assert (paired.low, paired.high) == pytest.approx(tuple(np.percentile(paired.distribution, [2.5, 97.5])))
    tail = min(np.mean(paired.distribution <= 0), np.mean(paired.distribution >= 0))
    assert paired.p_value == pytest.approx(min(1.0, 2 * tail))
    same = stats.paired_bootstrap(metric, y, pa, pa, n_resamples=1000)
    assert (same.estimate, same.low, same.high, same.p_value) == (0.0, 0.0, 0.0, 1.0)
    with pytest.raises(ValueError, match="at least 1000"):
        stats.bootstrap_ci(metric, y, pa, n_resamples=200)


# ---- DeLong ---------------------------------------------------------------------------------


def _brute_force_delong(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """DeLong et al. (1988) directly: psi over every (positive, negative) pair, O(m n)."""
    aucs, v10s, v01s = [], [], []
    for s in scores:
        x, z = s[y == 1], s[y == 0]
        psi = (x[:, None] > z[None, :]) + 0.5 * (x[:, None] == z[None, :])
        aucs.append(psi.mean())
        v10s.append(psi.mean(axis=1))
        v01s.append(psi.mean(axis=0))
    v10, v01 = np.array(v10s), np.array(v01s)
    m, n = v10.shape[1], v01.shape[1]
    s10 = (v10 - v10.mean(1, keepdims=True)) @ (v10 - v10.mean(1, keepdims=True)).T / (m - 1)
    s01 = (v01 - v01.mean(1, keepdims=True)) @ (v01 - v01.mean(1, keepdims=True)).T / (n - 1)
    return np.array(aucs), v10, v01, s10 / m + s01 / n


@pytest.mark.parametrize("ties", [False, True])
def test_fast_delong_equals_brute_force_and_sklearn(ties: bool) -> None:
    rng = np.random.default_rng(4)
    y = (rng.random(90) < 0.4).astype(int)
    scores = np.vstack([y + rng.normal(0, 1, 90), y + rng.normal(0, 1.6, 90), rng.normal(0, 1, 90)])
    if ties:
        scores = np.round(scores)
    comp = stats.delong_components(y, scores)
    auc, v10, v01, cov = _brute_force_delong(y, scores)
    assert comp.auc == pytest.approx(auc, abs=1e-12)
    assert comp.auc == pytest.approx([roc_auc_score(y, s) for s in scores], abs=1e-12)
    assert comp.v10 == pytest.approx(v10, abs=1e-12) and comp.v01 == pytest.approx(v01, abs=1e-12)
    assert comp.covariance == pytest.approx(cov, rel=1e-10, abs=1e-15)
    perm = rng.permutation(90)  # order of the test images does not matter
    assert stats.delong_components(y[perm], scores[:, perm]).covariance == pytest.approx(cov, rel=1e-10, abs=1e-15)


def test_midrank_auroc_is_the_auroc_metric() -> None:
    rng = np.random.default_rng(8)
    for k in (2, 4):
        y = rng.integers(0, k, 80)
        proba = np.round(rng.dirichlet(np.ones(k), 80), 1)  # rounding makes ties
        assert stats.macro_auroc(y, proba) == pytest.approx(METRICS.get("auroc")(y, proba), abs=1e-12)
    assert np.isnan(stats.auroc(np.ones(5), np.arange(5.0)))


def test_delong_stata_roctab_worked_example() -> None:
    # Stata [R] roctab on hanley.dta (Hanley & McNeil 1982): ROC area 0.8932, Std. Err. 0.0307,
    # asymptotic normal 95% CI 0.83295 to 0.95339 — Stata's default standard error is DeLong's.
    ratings = np.arange(1, 6)
    score = np.r_[np.repeat(ratings, HM_NORMAL), np.repeat(ratings, HM_ABNORMAL)].astype(float)
    y = np.r_[np.zeros(sum(HM_NORMAL)), np.ones(sum(HM_ABNORMAL))].astype(int)
    auc, var = stats.delong_variance(y, score)
    assert round(auc, 4) == 0.8932  # Hanley & McNeil's published area: 0.893
    assert round(np.sqrt(var), 4) == 0.0307
    _, low, high = stats.delong_ci(y, score)
    assert (round(low, 5), round(high, 5)) == (0.83295, 0.95339)


def test_delong_test_statistic() -> None:
    rng = np.random.default_rng(5)
    y = (rng.random(120) < 0.5).astype(int)
    a, b = y + rng.normal(0, 0.8, 120), y + rng.normal(0, 1.5, 120)
    res = stats.delong_test(y, a, b)
    auc, _, _, cov = _brute_force_delong(y, np.vstack([a, b]))
    se = np.sqrt(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1])
    assert res.difference == pytest.approx(auc[0] - auc[1])
    assert res.se == pytest.approx(se, rel=1e-10)
    assert res.z == pytest.approx((auc[0] - auc[1]) / se, rel=1e-10)
    assert res.p_value == pytest.approx(2 * sps.norm.sf(abs(res.z)), rel=1e-10)
    assert (res.low, res.high) == pytest.approx((res.difference - 1.959963985 * se, res.difference + 1.959963985 * se))
    swapped = stats.delong_test(y, b, a)
    assert swapped.z == pytest.approx(-res.z) and swapped.p_value == pytest.approx(res.p_value)
    assert stats.delong_test(y, a, a).p_value == 1.0
    with pytest.raises(ValueError, match="two positives"):
        stats.delong_test(np.array([1, 0, 0, 0]), np.arange(4.0), np.arange(4.0))


def test_delong_one_vs_rest() -> None:
    y, pa = _predictions(n=90, seed=6)
    _, pb = _predictions(n=90, noise=2.0, seed=7)
    tests = stats.delong_test_ovr(y, pa, pb, class_names=["a", "b", "c"])
    assert [t.label for t, _ in tests] == ["a", "b", "c"]
    for c, (res, _) in enumerate(tests):
        ref = stats.delong_test((y == c).astype(int), pa[:, c], pb[:, c])
        assert res.p_value == pytest.approx(ref.p_value) and res.auc_a == pytest.approx(roc_auc_score(y == c, pa[:, c]))
    assert [adj for _, adj in tests] == pytest.approx(stats.holm([t.p_value for t, _ in tests]))


# ---- comparability --------------------------------------------------------------------------


def _result(model: str, **changes: object) -> dict:
    r = {
        "model": {"name": model},
        "task": {"name": "t", "version": "1", "spec_hash": "abc"},
        "protocol": {"name": "linear_probe", "settings": {"seeds": [0, 1], "Cs": [0.1, 1.0], "solver": {"iterations": 3}}},
        "data": {"split_strategy": "stratified", "split_seed": 0, "image_list_hash": "h1", "splits": {"test": {"n": 4}}},
        "runs": [{"seed": 0, "k": None, "predictions": {"index": [1, 2, 3, 4]}}],
    }
    for dotted, value in changes.items():
        *path, last = dotted.split("__")
        target = r
        for key in path:
            target = target[key]
        target[last] = value
    return r


def test_comparability_names_what_differs() -> None:
    base = _result("a")
    assert stats.comparability_problems([base, _result("b")]) == []
    # Model-owned settings (solver statistics, a model's own prompts) do not block a comparison.
    assert stats.comparability_problems([base, _result("b", protocol__settings={"seeds": [0, 1], "Cs": [0.1, 1.0],
                                                                                 "solver": {"iterations": 9},
                                                                                 "prompts": [["x"]]})]) == []
    problems = stats.comparability_problems([base, _result("b", task__version="2"), _result("c")])
    assert problems == ["task version differs (a: 1; b: 2; c: 1)"]
    split = stats.comparability_problems([base, _result("b", data__image_list_hash="h2")])
    assert split and split[0].startswith("image list differs")
    setting = stats.comparability_problems([base, _result("b", protocol__settings={"seeds": [0], "Cs": [0.1, 1.0]})])
    assert setting == ["protocol setting 'seeds' differs (a: [0, 1]; b: [0])"]
    images = stats.comparability_problems([base, _result("b", runs=[{"seed": 0, "k": None,
                                                                      "predictions": {"index": [1, 2, 3, 5]}}])])
    assert images and images[0].startswith("test images per run differs")
    with pytest.raises(RetbenchError, match="cannot compare the results for t / linear_probe: task version differs"):
        stats.check_comparable([base, _result("b", task__version="2")])


# ---- t-interval (few-shot curves) -------------------------------------------------------------


def test_t_interval_is_scipys_student_interval() -> None:
    values = np.array([0.61, 0.58, 0.66, 0.7, 0.55])
    low, high, se = stats.t_interval(values)
    ref = sps.t.interval(0.95, len(values) - 1, loc=values.mean(), scale=sps.sem(values))
    assert (low, high) == pytest.approx(ref) and se == pytest.approx(sps.sem(values))
