"""Metrics under many weightings of the test images at once: the bootstrap's inner loop.

A bootstrap replicate that draws test patients with replacement is a weighting of the test images
(how often each image's patient was drawn). ``form(y, proba, W)`` evaluates a metric for every row
of the weight matrix ``W`` (B, N) in one vectorised pass and equals the metric on the images
repeated ``W[b]`` times (tested against the plain metrics, i.e. against scikit-learn):

- metrics of the confusion matrix (accuracy, balanced accuracy, F1, Cohen's kappa, MCC) from the
  weighted confusion matrices ``W @ onehot(y, pred)``;
- AUROC and average precision from weighted cumulative counts over the distinct score levels
  (ties handled as scikit-learn does: a tied positive/negative pair counts half for AUROC, and a
  level's precision is taken after all its images for AP).

A metric without a form here is resampled by repeating indices (correct, slower).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

WeightedForm = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def confusion_matrices(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted confusion matrices (B, K, K): rows true class, columns predicted (argmax) class."""
    k = proba.shape[1]
    cell = np.asarray(y, dtype=np.int64) * k + np.asarray(proba).argmax(axis=1)
    onehot = np.zeros((len(cell), k * k))
    onehot[np.arange(len(cell)), cell] = 1.0
    return (np.asarray(weights, dtype=float) @ onehot).reshape(-1, k, k)


def _divide(num: np.ndarray, den: np.ndarray, fill: float = 0.0) -> np.ndarray:
    out = np.full(np.broadcast(num, den).shape, fill, dtype=float)
    np.divide(num, den, out=out, where=den != 0)
    return out


def _diag(cm: np.ndarray) -> np.ndarray:
    return np.diagonal(cm, axis1=1, axis2=2)


def accuracy_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Share of correct predictions."""
    return _divide(_diag(cm).sum(axis=1), cm.sum(axis=(1, 2)), np.nan)


def balanced_accuracy_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Mean recall over the classes present (those with a true image)."""
    support = cm.sum(axis=2)
    recall = _divide(_diag(cm), support)
    present = support > 0
    return _divide((recall * present).sum(axis=1), present.sum(axis=1), np.nan)


def _f1_per_class(cm: np.ndarray) -> np.ndarray:
    tp = _diag(cm)
    return _divide(2 * tp, cm.sum(axis=2) + cm.sum(axis=1))  # 2tp / (2tp + fp + fn); 0 when undefined


def f1_macro_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Unweighted mean of per-class F1 over all classes (scikit-learn's zero_division=0)."""
    return _f1_per_class(cm).mean(axis=1)


def f1_weighted_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Support-weighted mean of per-class F1."""
    support = cm.sum(axis=2)
    return _divide((_f1_per_class(cm) * support).sum(axis=1), support.sum(axis=1))


def kappa_from_confusion(cm: np.ndarray, weights: str | None) -> np.ndarray:
    """Cohen's kappa as scikit-learn computes it (expected = outer(column sums, row sums) / n)."""
    k = cm.shape[1]
    i, j = np.meshgrid(np.arange(k), np.arange(k), indexing="ij")
    w = (i - j) ** 2 if weights == "quadratic" else (i != j).astype(float)
    expected = np.einsum("bi,bj->bij", cm.sum(axis=1), cm.sum(axis=2)) / cm.sum(axis=(1, 2))[:, None, None]
    return 1.0 - _divide((w * cm).sum(axis=(1, 2)), (w * expected).sum(axis=(1, 2)), np.nan)


def mcc_from_confusion(cm: np.ndarray) -> np.ndarray:
    """Matthews correlation (multiclass, scikit-learn's definition; 0 when undefined)."""
    t, p = cm.sum(axis=2), cm.sum(axis=1)
    n, correct = cm.sum(axis=(1, 2)), _diag(cm).sum(axis=1)
    cov_tp = correct * n - (t * p).sum(axis=1)
    cov_pp = n ** 2 - (p * p).sum(axis=1)
    cov_tt = n ** 2 - (t * t).sum(axis=1)
    den = np.sqrt(cov_tt * cov_pp)
    return _divide(cov_tp, den)


def from_confusion(fn: Callable[[np.ndarray], np.ndarray]) -> WeightedForm:
    """A weighted form computing ``fn`` on the weighted confusion matrices."""

    def form(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
        return fn(confusion_matrices(y, proba, weights))

    return form


def _levels(score: np.ndarray, truth: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted positives and negatives per distinct score level, levels in decreasing score order (B, L)."""
    order = np.argsort(-score, kind="mergesort")
    s, t, w = score[order], truth[order], weights[:, order]
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])  # last image of each level
    pos = np.cumsum(w * t, axis=1)[:, last]
    neg = np.cumsum(w * ~t, axis=1)[:, last]
    return np.diff(pos, axis=1, prepend=0.0), np.diff(neg, axis=1, prepend=0.0)


def binary_auroc(truth: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """AUROC per weighting: P(positive outscores negative), ties half; NaN without both classes."""
    pos, neg = _levels(np.asarray(score, dtype=float), np.asarray(truth, dtype=bool), weights)
    neg_below = neg.sum(axis=1, keepdims=True) - np.cumsum(neg, axis=1)  # levels are in decreasing order
    num = (pos * (neg_below + 0.5 * neg)).sum(axis=1)
    return _divide(num, pos.sum(axis=1) * neg.sum(axis=1), np.nan)


def binary_average_precision(truth: np.ndarray, score: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision per weighting (scikit-learn's step sum over distinct thresholds)."""
    pos, neg = _levels(np.asarray(score, dtype=float), np.asarray(truth, dtype=bool), weights)
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    precision = _divide(tp, tp + fp)
    total = tp[:, -1:]
    return _divide((pos * precision).sum(axis=1, keepdims=True), total, np.nan)[:, 0]


def _present(y: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """(B, K): whether class k has weight in replicate b."""
    onehot = (np.asarray(y)[:, None] == np.arange(k)[None, :]).astype(float)
    return (weights @ onehot) > 0


def auroc_form(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The ``auroc`` metric: binary on column 1, else the mean one-vs-rest AUROC over classes present."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=float)
    k = proba.shape[1]
    present = _present(y, k, weights)
    enough = present.sum(axis=1) >= 2
    if k == 2:
        return np.where(enough, binary_auroc(y == 1, proba[:, 1], weights), np.nan)
    per_class = np.stack([binary_auroc(y == c, proba[:, c], weights) for c in range(k)], axis=1)
    mean = _divide(np.where(present, per_class, 0.0).sum(axis=1), present.sum(axis=1), np.nan)
    return np.where(enough, mean, np.nan)


def aupr_form(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """The ``aupr`` metric: binary AP of column 1 (NaN unless both classes), else the mean OvR AP over classes present."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=float)
    k = proba.shape[1]
    present = _present(y, k, weights)
    if k == 2:
        return np.where(present.sum(axis=1) == 2, binary_average_precision(y == 1, proba[:, 1], weights), np.nan)
    per_class = np.stack([binary_average_precision(y == c, proba[:, c], weights) for c in range(k)], axis=1)
    return _divide(np.where(present, per_class, 0.0).sum(axis=1), present.sum(axis=1), np.nan)


def aupr_all_columns_form(y: np.ndarray, proba: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """``aupr_retfound``: the mean AP over every one-hot column, a column without positives scoring 0."""
    y, proba = np.asarray(y), np.asarray(proba, dtype=float)
    per_class = np.stack([binary_average_precision(y == c, proba[:, c], weights) for c in range(proba.shape[1])], axis=1)
    return np.nan_to_num(per_class, nan=0.0).mean(axis=1)
