"""The batched torch logistic regression against scikit-learn's LogisticRegression (lbfgs)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import balanced_accuracy_score
from sklearn.preprocessing import StandardScaler

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
