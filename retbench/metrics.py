"""Metrics as pure functions of saved predictions, each declaring ``higher_is_better``.

Every metric takes ``y_true`` (N,) integer labels and ``proba`` (N, K) class
probabilities (or scores) and returns a float, or a list of floats for per-class
metrics. Predicted labels are ``proba.argmax(1)``. The variant is in the name:
``kappa_quadratic`` (FLAIR) vs ``kappa_unweighted`` (RETFound); ``aupr`` (binary: the
positive class's average precision) vs ``aupr_retfound`` (RETFound's mean over every class's
one-hot column, both columns for binary tasks).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from sklearn import metrics as skm

from retbench import weighted_metrics as wm
from retbench.registry import Contract, Registry


@dataclass(frozen=True)
class Metric:
    """A registered metric: the function, its direction and a one-line description."""

    name: str
    fn: Callable[[np.ndarray, np.ndarray], float | list[float]]
    higher_is_better: bool
    description: str
    per_class: bool = False
    weighted: wm.WeightedForm | None = None
    """``weighted(y, proba, W)``: the metric under each row of image weights ``W`` (B, N) at once
    (bootstrap replicates); None: resampled by repeating indices."""

    def __call__(self, y_true: np.ndarray, proba: np.ndarray) -> float | list[float]:
        return self.fn(np.asarray(y_true), np.asarray(proba))


METRICS: Registry[Metric] = Registry("metric", entry_point_group="retbench.metrics",
                                     contract=Contract("retbench.metrics.Metric", instance_of=Metric))


def metric(name: str, description: str, higher_is_better: bool = True, per_class: bool = False,
           weighted: wm.WeightedForm | None = None) -> Callable:
    """Decorator registering a metric function under ``name`` (with its vectorised weighted form, if any)."""

    def wrap(fn: Callable[[np.ndarray, np.ndarray], float | list[float]]) -> Callable:
        METRICS.register(name, Metric(name, fn, higher_is_better, description, per_class, weighted))
        return fn

    return wrap


def _pred(proba: np.ndarray) -> np.ndarray:
    return proba.argmax(axis=1)


def _labels(proba: np.ndarray) -> np.ndarray:
    return np.arange(proba.shape[1])


@metric("accuracy", "fraction of correct top-1 predictions", weighted=wm.from_confusion(wm.accuracy_from_confusion))
def accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.accuracy_score(y, _pred(proba)))


@metric("aca", "average class accuracy = balanced accuracy = mean per-class recall (FLAIR's ACA)",
        weighted=wm.from_confusion(wm.balanced_accuracy_from_confusion))
def aca(y: np.ndarray, proba: np.ndarray) -> float:
    recall = skm.recall_score(y, _pred(proba), labels=np.unique(y), average=None, zero_division=0)
    return float(np.mean(recall))


@metric("f1_macro", "unweighted mean of per-class F1", weighted=wm.from_confusion(wm.f1_macro_from_confusion))
def f1_macro(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.f1_score(y, _pred(proba), labels=_labels(proba), average="macro", zero_division=0))


@metric("f1_weighted", "support-weighted mean of per-class F1", weighted=wm.from_confusion(wm.f1_weighted_from_confusion))
def f1_weighted(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.f1_score(y, _pred(proba), labels=_labels(proba), average="weighted", zero_division=0))


@metric("auroc", "ROC AUC: binary on the positive class, else macro one-vs-rest over classes present",
        weighted=wm.auroc_form)
def auroc(y: np.ndarray, proba: np.ndarray) -> float:
    present = np.unique(y)
    if len(present) < 2:
        return float("nan")
    if proba.shape[1] == 2:
        return float(skm.roc_auc_score(y, proba[:, 1]))
    onehot = y[:, None] == _labels(proba)[None, :]
    return float(np.mean([skm.roc_auc_score(onehot[:, k], proba[:, k]) for k in present]))


@metric("aupr", "average precision: binary on the positive class, else macro one-vs-rest", weighted=wm.aupr_form)
def aupr(y: np.ndarray, proba: np.ndarray) -> float:
    present = np.unique(y)
    if proba.shape[1] == 2:
        return float(skm.average_precision_score(y, proba[:, 1])) if len(present) == 2 else float("nan")
    onehot = y[:, None] == _labels(proba)[None, :]
    return float(np.mean([skm.average_precision_score(onehot[:, k], proba[:, k]) for k in present]))


@metric("aupr_retfound", "RETFound's AUPR: average precision of every one-hot column (both columns for binary "
        "tasks), unweighted mean over all K classes; a class absent from the test labels counts as AP 0 "
        "(rmaphoh/RETFound_MAE engine_finetune.py: average_precision_score(one-hot, softmax, average='macro'))",
        weighted=wm.aupr_all_columns_form)
def aupr_retfound(y: np.ndarray, proba: np.ndarray) -> float:
    onehot = (np.asarray(y)[:, None] == _labels(proba)[None, :]).astype(int)
    with warnings.catch_warnings():  # an absent class: scikit-learn warns and scores it 0, as RETFound's numbers do
        warnings.filterwarnings("ignore", message="No positive class found in y_true")
        return float(skm.average_precision_score(onehot, proba, average="macro"))


@metric("kappa_quadratic", "Cohen's kappa with quadratic weights (FLAIR, ordinal grading)",
        weighted=wm.from_confusion(lambda cm: wm.kappa_from_confusion(cm, "quadratic")))
def kappa_quadratic(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.cohen_kappa_score(y, _pred(proba), labels=_labels(proba), weights="quadratic"))


@metric("kappa_unweighted", "Cohen's kappa without weights (RETFound)",
        weighted=wm.from_confusion(lambda cm: wm.kappa_from_confusion(cm, None)))
def kappa_unweighted(y: np.ndarray, proba: np.ndarray) -> float:
    return float(skm.cohen_kappa_score(y, _pred(proba), labels=_labels(proba)))


@metric("mcc", "Matthews correlation coefficient (multiclass generalisation)", weighted=wm.from_confusion(wm.mcc_from_confusion))
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


@metric("balanced_accuracy", "mean per-class recall over the classes present (the number aca is; VQA's name)",
        weighted=wm.from_confusion(wm.balanced_accuracy_from_confusion))
def balanced_accuracy(y: np.ndarray, proba: np.ndarray) -> float:
    return aca(y, proba)


# --------------------------------------------------------------------------------------------
# Rank metrics (retrieval; on class scores: top-k accuracy)
#
# ``y`` is, per query, the column of its relevant gallery item (N,) or a boolean relevance
# matrix (N, G); ``scores`` (N, G) are similarities, higher = closer. Ties are broken uniformly
# at random and every metric is its expectation over the tie-breaks, in closed form: with h
# irrelevant items scoring strictly higher than the query's best relevant item, t irrelevant items
# tied with it and m relevant items at that score, the rank of the first relevant item is
# 1 + h + (a uniform position among the t + m tied items); its expectation is 1 + h + t / (m + 1),
# i.e. "half the ties" when one relevant item is tied (m = 1).
# --------------------------------------------------------------------------------------------


def tie_counts(y: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per query: (h, t, m) = irrelevant items strictly above / tied with the best relevant item, relevant items tied there."""
    scores = np.asarray(scores, dtype=np.float64)
    y = np.asarray(y)
    if y.ndim == 1:
        relevant = np.zeros(scores.shape, dtype=bool)
        relevant[np.arange(len(y)), y.astype(np.int64)] = True
    else:
        relevant = y.astype(bool)
    if relevant.shape != scores.shape or not relevant.any(axis=1).all():
        raise ValueError("every query needs at least one relevant gallery item")
    best = np.where(relevant, scores, -np.inf).max(axis=1, keepdims=True)
    higher = ((scores > best) & ~relevant).sum(axis=1)
    ties = ((scores == best) & ~relevant).sum(axis=1)
    tied_relevant = ((scores == best) & relevant).sum(axis=1)
    return higher, ties, tied_relevant


def _none_in_first(t: int, m: int, j: int) -> float:
    """P(the first j of t irrelevant + m relevant tied items, in random order, are all irrelevant)."""
    if j <= 0:
        return 1.0
    if j > t:
        return 0.0
    return math.comb(t, j) / math.comb(t + m, j)


def expected_rank(h: np.ndarray, t: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Expected rank of the first relevant item: 1 + h + t / (m + 1)."""
    return 1.0 + np.asarray(h, dtype=float) + np.asarray(t, dtype=float) / (np.asarray(m, dtype=float) + 1.0)


def recall_within(h: np.ndarray, t: np.ndarray, m: np.ndarray, k: int) -> np.ndarray:
    """Per query, P(a relevant item is in the top k) over random tie-breaks."""
    return np.array([1.0 - _none_in_first(int(ti), int(mi), k - int(hi)) if k > hi else 0.0
                     for hi, ti, mi in zip(h, t, m)], dtype=float)


def reciprocal_rank(h: np.ndarray, t: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per query, E[1 / rank of the first relevant item] over random tie-breaks."""
    out = []
    for hi, ti, mi in zip(h, t, m):
        hi, ti, mi = int(hi), int(ti), int(mi)
        out.append(sum((_none_in_first(ti, mi, p - 1) - _none_in_first(ti, mi, p)) / (hi + p) for p in range(1, ti + 2)))
    return np.array(out, dtype=float)


def rank_values(name: str, h: np.ndarray, t: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Per-query values whose mean (median for ``median_rank``) is rank metric ``name``."""
    if name.startswith("recall_at_"):
        return recall_within(h, t, m, int(name.removeprefix("recall_at_")))
    if name in ("mean_rank", "median_rank"):
        return expected_rank(h, t, m)
    if name == "mrr":
        return reciprocal_rank(h, t, m)
    raise ValueError(f"'{name}' is not a rank metric")


def rank_metric(name: str, values: np.ndarray) -> float:
    """Aggregate per-query :func:`rank_values` into the metric (median for ``median_rank``, else mean)."""
    return float(np.median(values) if name == "median_rank" else np.mean(values))


def _rank_metric(name: str) -> Callable[[np.ndarray, np.ndarray], float]:
    def fn(y: np.ndarray, scores: np.ndarray) -> float:
        return rank_metric(name, rank_values(name, *tie_counts(y, scores)))

    fn.__name__ = name
    return fn


for _k in (1, 5, 10):
    metric(f"recall_at_{_k}", f"share of queries with a relevant item in the top {_k} (expected over random tie-breaks); "
           f"top-{_k} accuracy on class scores")(_rank_metric(f"recall_at_{_k}"))
metric("mean_rank", "mean rank of the first relevant item (1 = best; ties: 1 + higher + tied / (relevant tied + 1))",
       higher_is_better=False)(_rank_metric("mean_rank"))
metric("median_rank", "median over queries of the (expected) rank of the first relevant item (1 = best)",
       higher_is_better=False)(_rank_metric("median_rank"))
metric("mrr", "mean reciprocal rank of the first relevant item (expected over random tie-breaks)")(_rank_metric("mrr"))

RANK_METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "median_rank", "mean_rank", "mrr")
"""The rank metrics: they also take a boolean relevance matrix as ``y`` (retrieval with several relevant items)."""


def metric_for(name: str) -> Metric:
    """The registered metric behind a stored metric name, qualified ones included
    (``image_to_text/recall_at_1``, ``dme/balanced_accuracy``)."""
    return METRICS.get(name.rsplit("/", 1)[-1])


def compute_metrics(names: list[str] | tuple[str, ...], y_true: np.ndarray, proba: np.ndarray) -> dict:
    """Evaluate each named metric on one set of predictions."""
    return {n: METRICS.get(n)(y_true, proba) for n in names}
