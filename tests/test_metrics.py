"""Every registered metric against its scikit-learn reference."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm
from sklearn.preprocessing import label_binarize

from retbench.errors import RetbenchError, UnknownNameError
from retbench.metrics import METRICS, RANK_METRICS, compute_metrics


def _data(n_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Labels and informative-but-noisy probabilities (every class present in both)."""
    rng = np.random.default_rng(seed)
    n = 300
    y = np.concatenate([np.arange(n_classes), rng.integers(0, n_classes, n - n_classes)])
    logits = rng.normal(size=(n, n_classes)) + 1.2 * np.eye(n_classes)[y]
    proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return y, proba


def _per_class_recall(y: np.ndarray, pred: np.ndarray, k: int) -> list[float]:
    cm = skm.confusion_matrix(y, pred, labels=np.arange(k))
    return list(np.diag(cm) / cm.sum(1))


def _per_class_specificity(y: np.ndarray, pred: np.ndarray, k: int) -> list[float]:
    cm = skm.confusion_matrix(y, pred, labels=np.arange(k))
    out = []
    for c in range(k):
        tn = cm.sum() - cm[c].sum() - cm[:, c].sum() + cm[c, c]
        fp = cm[:, c].sum() - cm[c, c]
        out.append(tn / (tn + fp))
    return out


def _auroc(y: np.ndarray, proba: np.ndarray) -> float:
    if proba.shape[1] == 2:
        return skm.roc_auc_score(y, proba[:, 1])
    return skm.roc_auc_score(y, proba, multi_class="ovr", average="macro")


def _aupr(y: np.ndarray, proba: np.ndarray) -> float:
    if proba.shape[1] == 2:
        return skm.average_precision_score(y, proba[:, 1])
    return skm.average_precision_score(label_binarize(y, classes=np.arange(proba.shape[1])), proba, average="macro")


def _top_k(y: np.ndarray, proba: np.ndarray, k: int) -> float:
    if k >= proba.shape[1]:
        return 1.0  # every class is in the top k (scikit-learn says so with a warning)
    if proba.shape[1] == 2:  # scikit-learn wants the positive class's scores for binary problems
        return skm.top_k_accuracy_score(y, proba[:, 1], k=k, labels=[0, 1])
    return skm.top_k_accuracy_score(y, proba, k=k, labels=np.arange(proba.shape[1]))


def _onehot(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    return np.eye(proba.shape[1], dtype=int)[y]


REFERENCES = {
    "accuracy": lambda y, p, pred: skm.accuracy_score(y, pred),
    "aca": lambda y, p, pred: skm.balanced_accuracy_score(y, pred),
    "f1_macro": lambda y, p, pred: skm.f1_score(y, pred, average="macro"),
    "f1_weighted": lambda y, p, pred: skm.f1_score(y, pred, average="weighted"),
    "auroc": lambda y, p, pred: _auroc(y, p),
    "aupr": lambda y, p, pred: _aupr(y, p),
    # RETFound engine_finetune.py: average_precision_score(one-hot targets, softmax, average="macro")
    "aupr_retfound": lambda y, p, pred: skm.average_precision_score(_onehot(y, p), p, average="macro"),
    "kappa_quadratic": lambda y, p, pred: skm.cohen_kappa_score(y, pred, weights="quadratic"),
    "kappa_unweighted": lambda y, p, pred: skm.cohen_kappa_score(y, pred),
    "mcc": lambda y, p, pred: skm.matthews_corrcoef(y, pred),
    "sensitivity_per_class": lambda y, p, pred: _per_class_recall(y, pred, p.shape[1]),
    "specificity_per_class": lambda y, p, pred: _per_class_specificity(y, pred, p.shape[1]),
    "balanced_accuracy": lambda y, p, pred: skm.balanced_accuracy_score(y, pred),
    # rank metrics on class scores (no ties in these data; ties: tests/test_retrieval.py)
    "recall_at_1": lambda y, p, pred: _top_k(y, p, 1),
    "recall_at_5": lambda y, p, pred: _top_k(y, p, 5),
    "recall_at_10": lambda y, p, pred: _top_k(y, p, 10),
    "mean_rank": lambda y, p, pred: skm.coverage_error(_onehot(y, p), p),
    "median_rank": lambda y, p, pred: np.median((p > p[np.arange(len(y)), y][:, None]).sum(1) + 1),
    "mrr": lambda y, p, pred: skm.label_ranking_average_precision_score(_onehot(y, p), p),
}


def test_every_registered_metric_has_a_reference() -> None:
    assert set(METRICS.names()) == set(REFERENCES)


@pytest.mark.parametrize("n_classes", [2, 5])
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_metric_matches_sklearn(name: str, n_classes: int, seed: int) -> None:
    y, proba = _data(n_classes, seed)
    expected = REFERENCES[name](y, proba, proba.argmax(1))
    got = METRICS.get(name)(y, proba)
    if METRICS.get(name).per_class:
        assert isinstance(got, list) and len(got) == n_classes
        np.testing.assert_allclose(got, expected, rtol=0, atol=1e-12)
    else:
        assert isinstance(got, float)
        assert got == pytest.approx(float(expected), abs=1e-12)
        if name not in RANK_METRICS:  # ranks start at 1; top-5 of 2 or 5 classes is always right
            assert 0.0 < abs(got) < 1.0  # informative but imperfect data: a constant would not pass


def test_perfect_and_inverted_predictions() -> None:
    y = np.array([0, 0, 1, 1, 2, 2])
    perfect = np.eye(3)[y] * 0.9 + 0.1 / 3
    for name in ("accuracy", "aca", "f1_macro", "auroc", "aupr", "kappa_quadratic", "kappa_unweighted", "mcc"):
        assert METRICS.get(name)(y, perfect) == pytest.approx(1.0), name
    assert METRICS.get("sensitivity_per_class")(y, perfect) == [1.0, 1.0, 1.0]
    assert METRICS.get("specificity_per_class")(y, perfect) == [1.0, 1.0, 1.0]
    inverted = perfect[::-1].copy()  # predicts 2,2,1,1,0,0
    assert METRICS.get("kappa_quadratic")(y, inverted) == pytest.approx(-1.0)
    assert METRICS.get("sensitivity_per_class")(y, inverted) == [0.0, 1.0, 0.0]


def test_auroc_is_nan_with_one_class_present() -> None:
    y = np.zeros(4, dtype=int)
    assert np.isnan(METRICS.get("auroc")(y, np.full((4, 2), 0.5)))


@pytest.mark.parametrize("name", sorted(REFERENCES))
def test_declares_direction_and_description(name: str) -> None:
    m = METRICS.get(name)
    assert m.name == name
    assert type(m.higher_is_better) is bool
    assert m.higher_is_better is (name not in ("mean_rank", "median_rank"))  # every other metric is a score
    assert isinstance(m.description, str) and m.description


def test_compute_metrics_returns_each_named_metric() -> None:
    y, proba = _data(5, 3)
    out = compute_metrics(("aca", "mcc"), y, proba)
    assert list(out) == ["aca", "mcc"]
    assert out["aca"] == pytest.approx(skm.balanced_accuracy_score(y, proba.argmax(1)))


def test_unknown_metric_suggests_close_names() -> None:
    with pytest.raises(UnknownNameError) as info:
        METRICS.get("acuracy")
    msg = str(info.value)
    assert isinstance(info.value, RetbenchError)
    assert "unknown metric 'acuracy'" in msg and "did you mean" in msg and "'accuracy'" in msg
    assert "\n" not in msg
    with pytest.raises(UnknownNameError, match="did you mean 'kappa_quadratic'"):
        compute_metrics(("kappa_quadratc",), np.array([0, 1]), np.eye(2))
