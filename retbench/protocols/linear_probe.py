"""Linear probe on frozen features: multinomial logistic regression, batched over seeds × C.

``linear_probe`` (retbench default): fit on the train split; the inverse regularisation C
is searched on a validation split — the task's own, else one carved from train per seed
(stratified, by patient) — then refit on train+val and scored once on test. Features are
standardised with statistics of the rows being fitted only. Test data never enters a fit.

``linear_probe.flair`` reproduces FLAIR's probe: C = 0.316, class-balanced, no search, raw
features, 5 folds with seed = fold of a per-class 80/20 split (given splits are used as
they are). Where patient ids exist the 80/20 split is grouped by patient (a deviation
from FLAIR, recorded in the result).

``linear_probe.retfound`` is the default probe reporting RETFound's metric set
(accuracy, macro F1, macro one-vs-rest AUROC, AUPR, unweighted kappa).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retbench.data.splits import holdout, per_class_holdout
from retbench.metrics import METRICS
from retbench.protocols.base import Context, Probe, ProtocolOutput, evaluate_runs, solve_probes

DEFAULT_CS = tuple(float(c) for c in 10.0 ** np.arange(-4, 2.01, 0.5))
RETFOUND_METRICS = ("accuracy", "f1_macro", "auroc", "aupr", "kappa_unweighted")


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
    metrics: tuple[str, ...] | None = None
    needs_text: bool = False

    def metric_names(self, ctx: Context) -> tuple[str, ...]:
        """The task's metrics, or the preset's set (plus the task's primary metric)."""
        if self.metrics is None:
            return ctx.spec.metrics
        return tuple(dict.fromkeys((*self.metrics, ctx.spec.primary_metric)))

    def run(self, ctx: Context) -> ProtocolOutput:
        """Fit and evaluate; returns one run per seed."""
        x, y, n_classes = ctx.features(), ctx.examples.labels, len(ctx.spec.classes)
        solver: dict[str, int] = {}
        plans = self._flair_plans(ctx) if self.flair_folds else self._search_plans(ctx, x, y, n_classes, solver)
        probes = [Probe(fit, C, test) for _, fit, C, test in plans]
        probas = solve_probes(x, y, n_classes, probes, ctx.device, self.balanced, self.standardize, solver)
        raw = [(seed, None, test, p, {"C": C, "n_fit": int(len(fit))}) for (seed, fit, C, test), p in zip(plans, probas)]
        runs = evaluate_runs(self.metric_names(ctx), raw, y)
        settings = {"seeds": sorted({r.seed for r in runs}), "Cs": list(self.Cs) if not self.flair_folds else list(self.Cs[:1]),
                    "balanced": self.balanced, "standardize": self.standardize, "val_fraction": self.val_fraction,
                    "flair_folds": self.flair_folds, "patient_grouped": self._grouped(ctx), "solver": solver}
        return ProtocolOutput(runs, settings)

    def _grouped(self, ctx: Context) -> bool:
        return ctx.spec.splits.by_patient and len(set(ctx.examples.patients)) < len(ctx.examples)

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
        pool = np.flatnonzero(ctx.valid())
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
    "FLAIR's probe: C=0.316, class-balanced, raw features, per-class 80/20 split x 5 folds (seed = fold)",
    Cs=(0.316,), standardize=False, flair_folds=True,
)
LINEAR_PROBE_RETFOUND = LinearProbe(
    "linear_probe.retfound",
    "default probe reporting RETFound's metrics: accuracy, macro F1, OvR AUROC, AUPR, unweighted kappa",
    metrics=RETFOUND_METRICS,
)
