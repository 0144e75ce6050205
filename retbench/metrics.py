"""Metrics as pure functions of saved predictions, each declaring ``higher_is_better``.

Every metric takes ``y_true`` (N,) integer labels and ``proba`` (N, K) class
probabilities (or scores) and returns a float, or a list of floats for per-class
metrics. Predicted labels are ``proba.argmax(1)``. The variant is in the name:
``kappa_quadratic`` (FLAIR) vs ``kappa_unweighted`` (RETFound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from retbench.registry import Registry


@dataclass(frozen=True)
class Metric:
    """A registered metric: the function, its direction and a one-line description."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float | list[float]]
    higher_is_better: bool
    description: str
    per_class: bool = False

    def __call__(self, y_true: np.ndarray, proba: np.ndarray) -> float | list[float]:
        return self.fn(np.asarray(y_true), np.asarray(proba))


METRICS: Registry[Metric] = Registry("metric", entry_point_group="retbench.metrics")


def metric(name: str, description: str, higher_is_better: bool = True, per_class: bool = False) -> Callable:
    """Decorator registering a metric function under ``name``."""

    def wrap(fn: Callable[[np.ndarray, np.ndarray], float | list[float]]) -> Callable:
        METRICS.register(name, Metric(name, fn, higher_is_better, description, per_class))
        return fn

    return wrap


def _pred(proba: np.ndarray) -> np.ndarray:
    return proba.argmax(axis=1)


def _labels(proba: np.ndarray) -> np.ndarray:
    return np.arange(proba.shape[1])


@metric("accuracy", "fraction of correct top-1 predictions")
def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.accuracy_score(y, _pred(proba)))


@metric("aca", "average class accuracy = balanced accuracy = mean per-class recall (FLAIR's ACA)")
def aca(y: np.ndarray, proba: np.ndarray) -> float:
    recall = skm.recall_score(y, _pred(proba), labels=np.unique(y), average=None, zero_division=0)
    return float(np.mean(recall))


@metric("f1_macro", "unweighted mean of per-class F1")
def f1_macro(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.f1_score(y, _pred(proba), labels=_labels(proba), average="macro", zero_division=0))


@metric("f1_weighted", "support-weighted mean of per-class F1")
def f1_weighted(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.f1_score(y, _pred(proba), labels=_labels(proba), average="weighted", zero_division=0))


@metric("auroc", "ROC AUC: binary on the positive class, else macro one-vs-rest over classes present")
def auroc(y: np.ndarray, proba: np.ndarray) -> float:
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if proba.shape[1] == 2:
        return float(skm.roc_auc_score(y, proba[:, 1]))
    onehot = y[:, None] == _labels(proba)[None, :]
    return float(np.mean([skm.roc_auc_score(onehot[:, k], proba[:, k]) for k in present]))


@metric("aupr", "average precision: binary on the positive class, else macro one-vs-rest")
def aupr(y: np.ndarray, proba: np.ndarray) -> float:
    present = np.unique(y)
    if proba.shape[1] == 2:
        return float(skm.average_precision_score(y, proba[:, 1])) if len(present) == 2 else float("nan")
    onehot = y[:, None] == _labels(proba)[None, :]
    return float(np.mean([skm.average_precision_score(onehot[:, k], proba[:, k]) for k in present]))


@metric("kappa_quadratic", "Cohen's kappa with quadratic weights (FLAIR, ordinal grading)")
def kappa_quadratic(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.cohen_kappa_score(y, _pred(proba), labels=_labels(proba), weights="quadratic"))


@metric("kappa_unweighted", "Cohen's kappa without weights (RETFound)")
def kappa_unweighted(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.cohen_kappa_score(y, _pred(proba), labels=_labels(proba)))


@metric("mcc", "Matthews correlation coefficient (multiclass generalisation)")
def mcc(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.matthews_corrcoef(y, _pred(proba)))


def _confusion(y: np.ndarray, proba: np.ndarray) -> np.ndarray:
    return skm.confusion_matrix(y, _pred(proba), labels=_labels(proba))


@metric("sensitivity_per_class", "per-class recall (one-vs-rest sensitivity)", per_class=True)
def sensitivity_per_class(y: np.ndarray, proba: np.ndarray) -> list[float]:
    cm = _confusion(y, proba)
    tp, pos = np.diag(cm), cm.sum(axis=1)
    return [float(t / p) if p else float("nan") for t, p in zip(tp, pos)]


@metric("specificity_per_class", "per-class true-negative rate (one-vs-rest specificity)", per_class=True)
def specificity_per_class(y: np.ndarray, proba: np.ndarray) -> list[float]:
    cm = _confusion(y, proba)
    total = cm.sum()
    out = []
    for k in range(cm.shape[0]):
        neg = total - cm[k].sum()
        tn = neg - (cm[:, k].sum() - cm[k, k])
        out.append(float(tn / neg) if neg else float("nan"))
    return out


def compute_metrics(names: list[str] | tuple[str, ...], y_true: np.ndarray, proba: np.ndarray) -> dict:
    """Evaluate each named metric on one set of predictions."""
    return {n: METRICS.get(n)(y_true, proba) for n in names}
