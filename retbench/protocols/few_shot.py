"""Few-shot linear probe: k labelled images per class, many sampled tasks, no validation data.

Following CLAP's point that a realistic few-shot setting has no held-out labelled data,
nothing is tuned: features are standardised with the support set's own statistics and
a class-balanced logistic regression with fixed C = 1.0 is fitted. Every (k, seed) pair
is one problem of a single batched solve; the test split is the task's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from retbench.errors import DataError
from retbench.protocols.base import Context, Probe, ProtocolOutput, evaluate_runs, solve_probes
from retbench.spec import TaskSpec

DEFAULT_SHOTS = (1, 2, 4, 8, 16)


@dataclass(frozen=True)
class FewShot:
    """k-shot probe configuration (k per class × seeds)."""

    name: str = "few_shot"
    description: str = "k in {1,2,4,8,16} per class x 10 seeds; fixed rule (support-set z-score, C=1), mean and 95% CI"
    shots: tuple[int, ...] = DEFAULT_SHOTS
    seeds: tuple[int, ...] = tuple(range(10))
    C: float = 1.0
    strict: bool = False  # True when the user chose the shots: a class with fewer than k examples is an error
    kind: str = "classification"
    run_options: ClassVar[frozenset[str]] = frozenset({"shots", "seeds"})

    def needs_text(self, spec: TaskSpec) -> bool:
        """Never: it fits probes on image features."""
        return False

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The task's metrics."""
        return spec.metrics

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> FewShot:
        """The shots you chose (then strict: a class with fewer than k training examples is an error) and
        seeds ``0 .. seeds - 1``."""
        changes: dict[str, Any] = {}
        if shots:
            changes.update(shots=tuple(shots), strict=True)
        if seeds:
            changes["seeds"] = tuple(range(seeds))
        return dataclasses.replace(self, **changes) if changes else self

    def run(self, ctx: Context) -> ProtocolOutput:
        """Sample supports, fit all in one batch, score on the test split."""
        y, n_classes = ctx.examples.labels, len(ctx.spec.classes)
        train, test = ctx.split("train"), ctx.split("test")
        per_class = {k: train[y[train] == k] for k in range(n_classes)}
        smallest = min(per_class, key=lambda k: len(per_class[k]))
        shots, skipped = [], []
        for k in self.shots:
            if len(per_class[smallest]) >= k:
                shots.append(k)
            elif self.strict:
                raise DataError(
                    f"task '{ctx.spec.name}': class '{ctx.spec.classes[smallest].name}' has only "
                    f"{len(per_class[smallest])} training examples, fewer than k={k}"
                )
            else:
                skipped.append(k)
        if not shots:
            raise DataError(f"task '{ctx.spec.name}': class '{ctx.spec.classes[smallest].name}' has no training example")
        plans = [(k, s, self._support(per_class, k, s)) for k in shots for s in self.seeds]
        probes = [Probe(support, self.C, test) for _, _, support in plans]
        solver: dict[str, int] = {}
        probas = solve_probes(ctx.features(), y, n_classes, probes, ctx.device, balanced=True, standardize=True,
                              stats=solver)
        raw = [(s, k, test, p, {"support": sup.tolist()}) for (k, s, sup), p in zip(plans, probas)]
        runs = evaluate_runs(self.metric_names(ctx.spec), raw, y)
        settings = {"shots": shots, "skipped_shots": skipped, "seeds": list(self.seeds), "C": self.C,
                    "rule": "support-set z-score, class-balanced logistic regression, fixed C; no validation data",
                    "solver": solver}
        return ProtocolOutput(runs, settings)

    @staticmethod
    def _support(per_class: dict[int, np.ndarray], k: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        return np.sort(np.concatenate([rng.choice(idx, size=k, replace=False) for idx in per_class.values()]))


FEW_SHOT = FewShot()
