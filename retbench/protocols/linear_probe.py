"""Linear probe on frozen features: multinomial logistic regression, batched over seeds × C.

``linear_probe`` (retbench default): fit on the train split; the inverse regularisation C
is searched on a validation split — the task's own, else one carved from train per seed
(stratified, by patient) — then refit on train+val and scored once on test. Features are
standardised with statistics of the rows being fitted only. Test data never enters a fit.

``linear_probe.flair`` reproduces FLAIR's probe: C = 0.316, class-balanced, no search, raw
features, 5 folds drawn exactly as FLAIR draws them (given splits are used as they are).
github.com/jusiro/FLAIR (d6652d5), ``flair/transferability/data/dataloader.py``
``get_dataloader_splits``, called by ``main_transferability.py`` with ``seed=iFold``: the rows
of the partition CSV, in file order, are shuffled with Python's ``random.seed(fold);
random.shuffle``; then, per class, in shuffled order, the first ``int(20/100 * n)`` go to test
and the next ``int(80/100 * n)`` to train (``get_shots``), so a class can leave a row unused.
:func:`flair_fold` computes the same positions (``tests/test_flair_folds.py`` runs FLAIR's own
function on ``02_MESSIDOR.csv`` and compares). FLAIR's draw ignores patients: the result
records, per fold, how many test patients also have images in train (when the task has patient
ids). FLAIR reports mean and ``np.std`` (population, ddof 0) over folds
(``flair/utils/metrics.py`` ``average_folds_results``): recorded as ``fold_std_population``
beside the summary's sample std.

``linear_probe.flair_grouped`` is the same probe on a per-class 80/20 split of retbench's own
(numpy), grouped by patient where ids exist: not FLAIR's folds, but no patient in both.

``linear_probe.retfound`` is the default probe reporting RETFound's metric set
(accuracy, macro F1, macro one-vs-rest AUROC, AUPR, unweighted kappa) as RETFound's
``engine_finetune.py`` computes it: AUPR is ``aupr_retfound``, the mean average precision
over every class's one-hot column (both columns for binary tasks).
"""

from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import numpy as np

from retbench.data.splits import holdout, per_class_holdout
from retbench.metrics import METRICS
from retbench.protocols.base import Context, Probe, ProtocolOutput, evaluate_runs, solve_probes
from retbench.spec import TaskSpec

DEFAULT_CS = tuple(float(c) for c in 10.0 ** np.arange(-4, 2.01, 0.5))
RETFOUND_METRICS = ("accuracy", "f1_macro", "auroc", "aupr_retfound", "kappa_unweighted")


@dataclass(frozen=True)
class LinearProbe:
    """Logistic-regression probe; a frozen, recorded configuration."""

    name: str
    description: str
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    Cs: tuple[float, ...] = DEFAULT_CS
    val_fraction: float = 0.2
    balanced: bool = True
    standardize: bool = True
    flair_folds: bool = False
    flair_split: str = "release"  # with flair_folds: "release" (FLAIR's own draw) or "grouped" (by patient)
    metrics: tuple[str, ...] | None = None
    kind: str = "classification"

    @property
    def run_options(self) -> frozenset[str]:
        """``seeds``, except for FLAIR's folds (their number is FLAIR's)."""
        return frozenset() if self.flair_folds else frozenset({"seeds"})

    def needs_text(self, spec: TaskSpec) -> bool:
        """Never: it fits probes on image features."""
        return False

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The task's metrics, or the preset's set (plus the task's primary metric)."""
        if self.metrics is None:
            return spec.metrics
        return tuple(dict.fromkeys((*self.metrics, spec.primary_metric)))

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> LinearProbe:
        """Seeds ``0 .. seeds - 1`` where it takes them (not FLAIR's folds); shots do not apply."""
        return dataclasses.replace(self, seeds=tuple(range(seeds))) if seeds and "seeds" in self.run_options else self

    def run(self, ctx: Context) -> ProtocolOutput:
        """Fit and evaluate; returns one run per seed."""
        x, y, n_classes = ctx.features(), ctx.examples.labels, len(ctx.spec.classes)
        solver: dict[str, int] = {}
        plans = self._flair_plans(ctx) if self.flair_folds else self._search_plans(ctx, x, y, n_classes, solver)
        probes = [Probe(fit, C, test) for _, fit, C, test in plans]
        probas = solve_probes(x, y, n_classes, probes, ctx.device, self.balanced, self.standardize, solver)
        raw = [(seed, None, test, p, {"C": C, "n_fit": int(len(fit))}) for (seed, fit, C, test), p in zip(plans, probas)]
        runs = evaluate_runs(self.metric_names(ctx.spec), raw, y)
        settings = {"seeds": sorted({r.seed for r in runs}), "Cs": list(self.Cs) if not self.flair_folds else list(self.Cs[:1]),
                    "balanced": self.balanced, "standardize": self.standardize, "val_fraction": self.val_fraction,
                    "flair_folds": self.flair_folds, "patient_grouped": self._grouped(ctx), "solver": solver}
        if self.flair_folds:
            settings.update(self._flair_settings(ctx, plans, runs))
        return ProtocolOutput(runs, settings)

    def _grouped(self, ctx: Context) -> bool:
        if self.flair_folds and self.flair_split == "release":
            return False  # FLAIR's draw never looks at patients
        return ctx.spec.splits.by_patient and len(set(ctx.examples.patients)) < len(ctx.examples)

    def _flair_settings(self, ctx: Context, plans: list[tuple], runs: list) -> dict[str, Any]:
        """The split used, patient leakage per fold, and FLAIR's (population) std over folds."""
        patients = np.asarray(ctx.examples.patients, dtype=object)
        has_ids = any(not str(p).startswith("img:") for p in patients)  # ids from a column or file-name patterns
        leakage = None
        if has_ids:
            leakage = []
            for fold, fit, _, test in plans:
                test_p, fit_p = set(patients[test]), set(patients[fit])
                shared = test_p & fit_p
                leakage.append({"fold": int(fold), "test_patients": len(test_p), "test_patients_in_train": len(shared),
                                "test_images_of_those": int(sum(p in shared for p in patients[test]))})
        per_class = {n for n in self.metric_names(ctx.spec) if METRICS.get(n).per_class}
        std: dict[str, float | None] = {}
        for n in self.metric_names(ctx.spec):
            if n not in per_class:
                value = float(np.std(np.array([r.metrics[n] for r in runs], dtype=float), ddof=0))
                std[n] = None if np.isnan(value) else value
        out: dict[str, Any] = {
            "flair_split": self.flair_split if ctx.spec.splits.strategy != "given" else "given",
            "patient_ids": has_ids,
            "patient_leakage": leakage,
            "fold_std_population": std,
            "fold_std_note": "np.std over folds (ddof 0), as FLAIR's average_folds_results reports; the summary's "
                             "std is the sample std (ddof 1)",
        }
        if self.flair_split == "release" and ctx.spec.splits.strategy != "given":
            out["ignores_patients"] = True
            out["rows_dropped_from_source"] = sum(len(v) for v in ctx.examples.dropped.values())
            out["unreadable_rows_removed_after_draw"] = int((~ctx.valid()).sum())
            counts = np.bincount(ctx.examples.labels)
            out["rows_in_no_split"] = int(sum(c - int(20 / 100 * c) - int(80 / 100 * c) for c in counts))  # int() truncation
        return out

    def _search_plans(self, ctx: Context, x: np.ndarray, y: np.ndarray, n_classes: int, solver: dict) -> list[tuple]:
        train, test = ctx.split("train"), ctx.split("test")
        groups = np.asarray(ctx.examples.patients, dtype=object) if ctx.spec.splits.by_patient else None
        if "val" in ctx.splits:  # a fixed validation split: the deterministic solver makes seeds identical
            carved = {self.seeds[0]: (train, ctx.split("val"))}
        else:
            carved = {s: holdout(train, y[train], None if groups is None else groups[train], self.val_fraction, s)
                      for s in self.seeds}
        search = [Probe(fit, C, val) for fit, val in carved.values() for C in self.Cs]
        probas = solve_probes(x, y, n_classes, search, ctx.device, self.balanced, self.standardize, solver)
        primary = METRICS.get(ctx.spec.primary_metric)
        plans = []
        for i, (seed, (fit, val)) in enumerate(carved.items()):
            scores = [primary(y[val], p) for p in probas[i * len(self.Cs): (i + 1) * len(self.Cs)]]
            scores = np.nan_to_num(np.array(scores), nan=-np.inf if primary.higher_is_better else np.inf)
            best = int(np.argmax(scores) if primary.higher_is_better else np.argmin(scores))  # ties → stronger penalty
            plans.append((seed, np.sort(np.concatenate([fit, val])), self.Cs[best], test))
        return plans

    def _flair_plans(self, ctx: Context) -> list[tuple]:
        y, C = ctx.examples.labels, self.Cs[0]
        if ctx.spec.splits.strategy == "given":
            train = np.concatenate([ctx.split(s) for s in ("train", "val") if s in ctx.splits])
            return [(self.seeds[0], np.sort(train), C, ctx.split("test"))]
        valid = ctx.valid()
        if self.flair_split == "release":  # drawn over every row in source order, as FLAIR does; unreadable rows then left out
            plans = []
            for fold in self.seeds:
                fit, test = flair_fold(y, fold)
                plans.append((fold, fit[valid[fit]], C, test[valid[test]]))
            return plans
        pool = np.flatnonzero(valid)
        plans = []
        for fold in self.seeds:
            if self._grouped(ctx):
                groups = np.asarray(ctx.examples.patients, dtype=object)[pool]
                fit, test = holdout(pool, y[pool], groups, 0.2, fold)
            else:
                fit, test = (pool[i] for i in per_class_holdout(y[pool], 0.2, fold))
            plans.append((fold, fit, C, test))
        return plans


LINEAR_PROBE = LinearProbe(
    "linear_probe",
    "logistic regression on frozen features; C searched on validation (carved from train by patient), 5 seeds",
)
LINEAR_PROBE_FLAIR = LinearProbe(
    "linear_probe.flair",
    "FLAIR's probe: C=0.316, class-balanced, raw features, 5 folds drawn as FLAIR's code draws them "
    "(random.seed(fold) shuffle, first int(20%) of each class to test; patients ignored)",
    Cs=(0.316,), standardize=False, flair_folds=True,
)
LINEAR_PROBE_FLAIR_GROUPED = LinearProbe(
    "linear_probe.flair_grouped",
    "FLAIR's probe (C=0.316, class-balanced, raw features) on retbench's per-class 80/20 split x 5 seeds, "
    "grouped by patient where ids exist (not FLAIR's folds)",
    Cs=(0.316,), standardize=False, flair_folds=True, flair_split="grouped",
)
LINEAR_PROBE_RETFOUND = LinearProbe(
    "linear_probe.retfound",
    "default probe reporting RETFound's metrics: accuracy, macro F1, OvR AUROC, AUPR over all one-hot columns "
    "(aupr_retfound), unweighted kappa",
    metrics=RETFOUND_METRICS,
)


def flair_fold(labels: np.ndarray, fold: int, test_percent: int = 20, train_percent: int = 80) -> tuple[np.ndarray, np.ndarray]:
    """Row positions (train, test) of FLAIR's fold ``fold`` over ``labels`` given in source order.

    The order of the rows is permuted as Python's ``random.seed(fold); random.shuffle(rows)``
    permutes a list of that length; each class then gives its first ``int(test_percent / 100 * n)``
    rows (in permuted order) to test and the next ``int(train_percent / 100 * n)`` to train.
    Both are returned sorted.
    """
    labels = np.asarray(labels)
    order = list(range(len(labels)))
    random.Random(fold).shuffle(order)  # the permutation depends only on the seed and the length
    order_arr = np.asarray(order, dtype=np.int64)
    permuted = labels[order_arr]
    train, test = [], []
    for k in np.unique(labels):
        members = order_arr[np.flatnonzero(permuted == k)]
        n_test, n_train = int(test_percent / 100 * len(members)), int(train_percent / 100 * len(members))
        test.append(members[:n_test])
        train.append(members[n_test:n_test + n_train])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
