"""The batched torch logistic regression against scikit-learn's LogisticRegression (lbfgs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

from retbench.errors import RetbenchError
from retbench.protocols.base import Probe, solve_probes
from retbench.solver import balanced_weights, fit_logistic, standardizer

CPU = torch.device("cpu")


def problem(n_classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """600 x 20 imbalanced problem with features on different scales; 400 fit rows, 200 test rows."""
    weights = [0.6, 0.3, 0.1] if n_classes == 3 else [0.7, 0.3]
    x, y = make_classification(600, 20, n_informative=8, n_redundant=4, n_classes=n_classes, weights=weights,
                               class_sep=1.5, random_state=seed)
    x = x * np.linspace(0.5, 2.0, 20) + np.linspace(-1, 1, 20)  # unequal scales and offsets
    return x, y, np.arange(400), np.arange(400, 600)


def sklearn_proba(x, y, fit, test, C: float, balanced: bool, standardize: bool) -> np.ndarray:
    if standardize:
        scaler = StandardScaler().fit(x[fit])
        x = scaler.transform(x)
    clf = LogisticRegression(C=C, class_weight="balanced" if balanced else None, tol=1e-8, max_iter=20000)
    clf.fit(x[fit], y[fit])
    return clf.predict_proba(x[test])


@pytest.mark.parametrize("standardize", [False, True])
@pytest.mark.parametrize("balanced", [True, False])
@pytest.mark.parametrize("C", [0.01, 0.316, 3.0])
def test_multinomial_matches_sklearn(C: float, balanced: bool, standardize: bool) -> None:
    x, y, fit, test = problem()
    (got,) = solve_probes(x, y, 3, [Probe(fit, C, test)], CPU, balanced=balanced, standardize=standardize)
    ref = sklearn_proba(x, y, fit, test, C, balanced, standardize)
    assert got.shape == (200, 3)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-9)
    np.testing.assert_allclose(got, ref, atol=1e-3)
    bacc, ref_bacc = (balanced_accuracy_score(y[test], p.argmax(1)) for p in (got, ref))
    assert abs(bacc - ref_bacc) <= 0.005
    assert bacc > 0.5  # a real fit, not a constant


@pytest.mark.parametrize("C", [0.05, 0.316])
def test_binary_matches_sklearn(C: float) -> None:
    """Two classes: sklearn fits one (binomial) coefficient vector; FLAIR's binary tasks (REFUGE, ACRIMA)
    used exactly that, LogisticRegression(C=0.316, class_weight="balanced"). The same C must give the same model."""
    x, y, fit, test = problem(n_classes=2)
    (got,) = solve_probes(x, y, 2, [Probe(fit, C, test)], CPU, balanced=True, standardize=False)
    ref = sklearn_proba(x, y, fit, test, C, balanced=True, standardize=False)
    np.testing.assert_allclose(got, ref, atol=1e-3)


@pytest.mark.parametrize(("balanced", "standardize"), [(True, True), (False, False)])
def test_batched_equals_each_solved_alone(balanced: bool, standardize: bool) -> None:
    """One batched solve over subsets x C values (as the probes run it) gives each problem's own solution.

    Raw features (``standardize=False``, as ``linear_probe.flair`` uses) with weak and strong regularisation in one
    batch is the hard case: the shared L-BFGS must converge for every problem, not only on average.
    """
    x, y, fit, test = problem()
    rng = np.random.default_rng(0)
    subsets = [np.sort(rng.choice(fit, size=n, replace=False)) for n in (60, 150, 400)]
    probes = [Probe(s, C, test) for s in subsets for C in (0.01, 10.0)]
    batched = solve_probes(x, y, 3, probes, CPU, balanced=balanced, standardize=standardize)
    vs_alone = vs_sklearn = 0.0
    for p, got in zip(probes, batched, strict=True):
        (alone,) = solve_probes(x, y, 3, [p], CPU, balanced=balanced, standardize=standardize)
        ref = sklearn_proba(x, y, p.fit, test, p.C, balanced, standardize)
        # the solver stops at a gradient of 1e-5 (scikit-learn's default is 1e-4; the reference runs to 1e-8)
        np.testing.assert_allclose(alone, ref, atol=5e-3)
        vs_alone = max(vs_alone, float(np.abs(got - alone).max()))
        vs_sklearn = max(vs_sklearn, float(np.abs(got - ref).max()))
    assert vs_alone < 5e-3, f"batched solve differs from the single solves by up to {vs_alone:.4f} in probability"
    assert vs_sklearn < 5e-3, f"batched solve differs from sklearn by up to {vs_sklearn:.4f} in probability"
    # the problems really differ (strong vs weak regularisation)
    assert np.abs(batched[0] - batched[1]).max() > 0.05


def test_predict_rows_are_the_probe_rows() -> None:
    x, y, fit, test = problem()
    subset = test[::7]
    full, part = solve_probes(x, y, 3, [Probe(fit, 1.0, test), Probe(fit, 1.0, subset)], CPU, True, True)
    assert part.shape == (len(subset), 3)
    np.testing.assert_allclose(part, full[::7], atol=1e-4)
    assert solve_probes(x, y, 3, [], CPU, True, True) == []


def test_unused_rows_do_not_change_the_fit() -> None:
    """Rows outside a probe's fit set (e.g. test rows) have no influence, whatever their labels."""
    x, y, fit, test = problem()
    y_flipped = y.copy()
    y_flipped[test] = (y[test] + 1) % 3
    x_noisy = x.copy()
    x_noisy[test] += np.random.default_rng(1).normal(0, 50, size=x[test].shape)
    (a,) = solve_probes(x, y, 3, [Probe(fit, 0.5, fit)], CPU, True, True)
    (b,) = solve_probes(x_noisy, y_flipped, 3, [Probe(fit, 0.5, fit)], CPU, True, True)
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_fit_logistic_direct_interface() -> None:
    x, y, fit, test = problem()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    mask = torch.zeros(2, len(x), dtype=torch.float64)
    mask[:, fit] = 1.0
    models = fit_logistic(xt, yt, mask, torch.tensor([0.1, 0.1]), 3, standardize=True)
    assert models.weight.shape == (2, 20, 3) and models.bias.shape == (2, 3)
    assert models.n_iter > 0
    proba = models.predict_proba(xt[test])
    assert proba.shape == (2, 200, 3)
    np.testing.assert_allclose(proba[0].numpy(), proba[1].numpy(), atol=1e-6)  # same problem twice
    ref = sklearn_proba(x, y, fit, test, 0.1, balanced=False, standardize=True)
    np.testing.assert_allclose(proba[0].numpy(), ref, atol=1e-3)


def test_balanced_weights_match_sklearn_formula() -> None:
    y = torch.tensor([0, 0, 0, 1, 2, 2, 1, 0])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1, 0, 0], [1, 0, 0, 1, 0, 0, 1, 1]], dtype=torch.float64)
    w = balanced_weights(y, mask, 3)
    # problem 0: n=6, counts (3,1,2), 3 classes → n/(3*count)
    np.testing.assert_allclose(w[0].numpy(), [6 / 9, 6 / 9, 6 / 9, 6 / 3, 6 / 6, 6 / 6, 0, 0])
    # problem 1: n=4, counts (2,2,0), 2 classes present → n/(2*count)
    np.testing.assert_allclose(w[1].numpy(), [1, 0, 0, 1, 0, 0, 1, 1])


def test_standardizer_uses_masked_rows_only() -> None:
    x = torch.tensor([[1.0, 10.0], [3.0, 10.0], [100.0, -5.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 0.0]], dtype=torch.float64)
    mean, std = standardizer(x, mask)
    np.testing.assert_allclose(mean.numpy(), [[2.0, 10.0]])
    np.testing.assert_allclose(std.numpy(), [[1.0, 1e-6]])  # population std; constant column clamped


def weak_penalty_problem() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """4 classes, 400 fit rows × 150 features of which 12 informative: at C = 100 nearly separable, the hard case."""
    x, y = make_classification(600, 150, n_informative=12, n_redundant=20, n_classes=4, weights=[0.4, 0.3, 0.2, 0.1],
                               class_sep=0.8, flip_y=0.05, random_state=3)
    return x * np.linspace(0.2, 5.0, 150), y, np.arange(400), np.arange(400, 600)


def converged_aca(x, y, fit, test, C: float) -> tuple[float, np.ndarray]:
    """scikit-learn newton-cg run to tol 1e-10: the converged answer."""
    scaler = StandardScaler().fit(x[fit])
    clf = LogisticRegression(C=C, class_weight="balanced", solver="newton-cg", tol=1e-10, max_iter=10000)
    clf.fit(scaler.transform(x[fit]), y[fit])
    proba = clf.predict_proba(scaler.transform(x[test]))
    return balanced_accuracy_score(y[test], proba.argmax(1)), proba


def test_large_c_reaches_the_converged_answer() -> None:
    """Weak regularisation: the gradient tolerance shrinks as 1/C, so C = 100 lands within 0.005 ACA of the converged
    answer (with one tolerance for every C it stopped 0.0064 away on real features)."""
    x, y, fit, test = weak_penalty_problem()
    for C in (10.0, 100.0):
        ref_aca, ref = converged_aca(x, y, fit, test, C)
        (got,) = solve_probes(x, y, 4, [Probe(fit, C, test)], CPU, balanced=True, standardize=True, solver="torch")
        assert abs(balanced_accuracy_score(y[test], got.argmax(1)) - ref_aca) <= 0.005
        np.testing.assert_allclose(got, ref, atol=5e-3)  # one tolerance for all C: 0.033 apart at C = 100
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    mask = torch.zeros(2, len(x), dtype=torch.float64)
    mask[:, fit] = 1.0
    models = fit_logistic(xt, yt, mask, torch.tensor([1.0, 100.0]), 4, standardize=True)
    assert models.tol[1] == pytest.approx(models.tol[0] / 100)  # the per-problem tolerance, 1e-5 · min(1, 1/C)
    assert bool(models.converged.all())


def test_sklearn_backend_agrees_with_torch() -> None:
    """Both solvers of solve_probes solve the same objective to the same tolerance: the same answers."""
    x, y, fit, test = problem()
    probes = [Probe(fit, C, test) for C in (0.01, 1.0, 100.0)] + [Probe(fit[:200], 1.0, test)]
    ours: dict = {}
    theirs: dict = {}
    a = solve_probes(x, y, 3, probes, CPU, True, True, stats=ours, solver="torch")
    b = solve_probes(x, y, 3, probes, CPU, True, True, stats=theirs, solver="sklearn-lbfgs")
    assert (ours["backend"], theirs["backend"]) == ("torch", "sklearn-lbfgs")
    for p, pa, pb in zip(probes, a, b, strict=True):
        aca_a, aca_b = (balanced_accuracy_score(y[p.predict], q.argmax(1)) for q in (pa, pb))
        assert abs(aca_a - aca_b) <= 0.005
        np.testing.assert_allclose(pa, pb, atol=1e-2)


def test_solver_choice() -> None:
    from retbench.protocols.base import choose_solver

    assert choose_solver(torch.device("cuda"), 65, 3000, 1024, 5) == "torch"
    assert choose_solver(CPU, 65, 1300, 712, 4) in ("torch", "sklearn-lbfgs")
    with pytest.raises(ValueError, match="unknown probe solver"):
        solve_probes(*problem()[:2], 3, [Probe(np.arange(10), 1.0, np.arange(5))], CPU, True, True, solver="liblinear")
    # a fit set missing a class goes to the torch solver, which keeps every class's column
    x, y, fit, test = problem()
    stats: dict = {}
    (p,) = solve_probes(x, y, 3, [Probe(fit[y[fit] != 2], 1.0, test)], CPU, True, True, stats, solver="sklearn-lbfgs")
    assert stats["backend"] == "torch" and p.shape == (200, 3)


def test_solver_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    """$RETBENCH_SOLVER_THREADS sets the torch threads of a CPU solve (default 1), is recorded, and the answers stay."""
    import retbench.solver as solver_module
    from retbench.protocols.base import solver_threads

    seen: list[int] = []
    hvp = solver_module._Solve.hvp

    def spy(self, *args):  # type: ignore[no-untyped-def]
        seen.append(torch.get_num_threads())
        return hvp(self, *args)

    monkeypatch.setattr(solver_module._Solve, "hvp", spy)
    x, y, fit, test = problem()
    x = np.repeat(x, 4, axis=0) + np.random.default_rng(0).normal(0, 0.1, (2400, 20))  # products worth splitting
    y, fit, test = np.repeat(y, 4), np.arange(1600), np.arange(1600, 2400)
    probes = [Probe(fit[s::2], C, test) for s in (0, 1) for C in (0.1, 10.0)]
    previous = torch.get_num_threads()
    runs = {}
    for threads in ("1", "2"):
        monkeypatch.setenv("RETBENCH_SOLVER_THREADS", threads)
        stats: dict = {}
        seen.clear()
        runs[threads] = solve_probes(x, y, 3, probes, CPU, True, True, stats, solver="torch")
        assert stats["threads"] == int(threads) == solver_threads()
        assert set(seen) == {min(int(threads), previous)}
    assert torch.get_num_threads() == previous  # restored
    # X @ V splits its output rows between threads, so the sums (and answers) are the same; MKL's kernels for the
    # transposed products (non-Intel CPUs) also split sums: 3.6e-6 apart here on an AMD EPYC
    atol = 1e-9 if stats["products"] == "rows" else 1e-4
    for a, b in zip(runs["1"], runs["2"], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=atol)
    monkeypatch.delenv("RETBENCH_SOLVER_THREADS")
    assert solver_threads() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("RETBENCH_SOLVER_THREADS", bad)
        with pytest.raises(RetbenchError, match="RETBENCH_SOLVER_THREADS must be a positive integer"):
            solver_threads()


def test_timing_sections() -> None:
    """Sections add up inside the innermost open collection and cost nothing outside one."""
    from retbench.timing import collect, profile_rows, profile_table, timed, timed_calls

    with timed("nowhere"):
        pass
    with collect() as outer:
        with collect() as inner:
            timed_calls(lambda: sum(range(1000)), "forward_s")()
            x, y, fit, test = problem()
            solve_probes(x, y, 3, [Probe(fit, 1.0, test)], CPU, True, True)
        with timed("write_s"):
            pass
    assert set(inner) == {"forward_s", "probe_fit_s"} and inner["probe_fit_s"] > 0
    assert set(outer) == {"write_s"}
    timings = [("m", {"probe_fit_s": 1.0, "total_s": 4.0}), ("m", {"forward_s": 2.0, "total_s": 2.0})]
    (row,) = profile_rows(timings)
    assert row[0] == "m" and row[1] == 2 and row[-1] == 6.0 and row[-2] == 3.0  # other = total - sections
    assert "probe fits" in profile_table(timings)


@pytest.mark.parametrize("n_classes", [2, 3])
def test_both_product_orientations_reach_the_same_answers(monkeypatch: pytest.MonkeyPatch, n_classes: int) -> None:
    """The orientation of the products changes only their rounding, so both solves stop at the gradient tolerance
    (1e-5 × min(1, 1/C)), which at C = 10 leaves probabilities a few 1e-4 apart; the orientation is recorded."""
    import retbench.solver as solver_module

    x, y, fit, test = problem(n_classes)
    probes = [Probe(fit[s::2], C, test) for s in (0, 1) for C in (0.1, 10.0)]
    runs = {}
    for off_intel in (False, True):
        monkeypatch.setattr(solver_module, "_mkl_off_intel", lambda off_intel=off_intel: off_intel)
        stats: dict = {}
        runs[off_intel] = solve_probes(x, y, n_classes, probes, CPU, True, True, stats, solver="torch")
        assert stats["products"] == ("transposed" if off_intel else "rows")
        assert stats["not_converged"] == 0
    for a, b in zip(runs[False], runs[True], strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-3)


def test_product_orientation_follows_the_cpu_vendor(monkeypatch: pytest.MonkeyPatch) -> None:
    """Transposed only with MKL on a CPU that is not Intel's, and never off the CPU."""
    import retbench.determinism
    from retbench.solver import _mkl_off_intel, product_orientation

    try:
        for vendor, mkl, expected in [("GenuineIntel", True, "rows"), ("AuthenticAMD", True, "transposed"),
                                      ("AuthenticAMD", False, "rows")]:
            monkeypatch.setattr(retbench.determinism, "cpu_description", lambda vendor=vendor: {"vendor": vendor})
            monkeypatch.setattr(torch.backends.mkl, "is_available", lambda mkl=mkl: mkl)
            _mkl_off_intel.cache_clear()
            assert product_orientation(CPU) == expected, (vendor, mkl)
            assert product_orientation(torch.device("cuda")) == "rows"
    finally:
        _mkl_off_intel.cache_clear()


@pytest.mark.parametrize("standardize", [False, True])
def test_shared_designs_leave_every_answer_unchanged(standardize: bool) -> None:
    """A C sweep standardises its rows once (Designs) instead of once per C: bit-identical fits, and reused.

    A second row set replaces the kept design (and is again identical to a fresh one)."""
    from retbench.solver import Designs

    x, y, fit, _ = problem()
    xt, yt = torch.as_tensor(x), torch.as_tensor(y)
    first = torch.zeros(2, 600, dtype=torch.float64)
    first[0, fit[::2]] = first[1, fit[1::2]] = 1.0  # two fit sets, as two seeds' problems
    other = torch.zeros(1, 600, dtype=torch.float64)
    other[0, fit[:300]] = 1.0
    designs = Designs()
    for mask, C in ((first, [0.1, 0.1]), (first, [10.0, 10.0]), (other, [1.0]), (first, [100.0, 100.0])):
        weights = balanced_weights(yt, mask, 3)
        fresh = fit_logistic(xt, yt, weights, torch.tensor(C), 3, standardize=standardize)
        shared = fit_logistic(xt, yt, weights, torch.tensor(C), 3, standardize=standardize, designs=designs)
        assert torch.equal(fresh.weight, shared.weight) and torch.equal(fresh.bias, shared.bias)
        assert bool(fresh.converged.all())
    assert designs.hits == 1  # C = 10 reused C = 0.1's rows; the other row set and the return to the first rebuilt


def test_single_precision_solves_reach_the_double_precision_answers(monkeypatch: pytest.MonkeyPatch) -> None:
    """A GPU solves in the CPU's precisions (float64 objective and gradient, float32 Hessian products); only MPS,
    which has no float64, runs float32 throughout. That path, forced here on the CPU, still converges (binary and
    multinomial, weak and strong regularisation) to probabilities within 5e-4 of the double-precision solve."""
    import retbench.protocols.base as base_module
    import retbench.solver as solver_module
    from retbench.solver import solver_dtype

    assert solver_dtype(CPU) == solver_dtype(torch.device("cuda")) == torch.float64
    assert solver_dtype(torch.device("mps")) == torch.float32
    for n_classes in (2, 3):
        x, y, fit, test = problem(n_classes)
        probes = [Probe(fit[s::2], C, test) for s in (0, 1) for C in (0.01, 1.0, 100.0)]
        double = solve_probes(x, y, n_classes, probes, CPU, True, True, solver="torch")
        for module in (solver_module, base_module):
            monkeypatch.setattr(module, "solver_dtype", lambda device: torch.float32)
        stats: dict = {}
        single = solve_probes(x, y, n_classes, probes, CPU, True, True, stats, solver="torch")
        monkeypatch.undo()
        assert stats["not_converged"] == 0
        for a, b in zip(double, single, strict=True):
            assert b.dtype == np.float32 and a.dtype == np.float64
            np.testing.assert_allclose(a, b, rtol=0, atol=5e-4)  # 6e-5 apart at most when written
