"""What the retrieval and VQA protocols return, and how their per-run metrics are summarised.

Their runs carry flat metric dictionaries: the headline names (``recall_at_5``, ``accuracy``...)
are means over the task's parts — retrieval directions or question types — and the parts'
own values sit under qualified names ``<part>/<metric>``. Summaries have the classification
results' shape (mean, std, n, values, and a 95% CI), so the store, ``retbench results`` and the
leaderboards read them unchanged.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

BOOTSTRAP_RESAMPLES = 1000


@dataclass
class KindOutput:
    """Runs (JSON-ready dicts: seed, k, metrics and the records to recompute them), summaries and settings."""

    runs: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    n_test: int
    notes: dict[str, Any] = field(default_factory=dict)


def part_means(per_part: dict[str, dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    """Flat run metrics: ``<part>/<name>`` for every part, and ``<name>`` = their unweighted mean."""
    out: dict[str, float] = {}
    for name in names:
        values = [per_part[p][name] for p in per_part]
        out[name] = float(np.nanmean(values)) if values and not np.isnan(values).all() else float("nan")
    for part, metrics in per_part.items():
        for name in names:
            out[f"{part}/{name}"] = float(metrics[name])
    return out


def summarize_flat(run_metrics: list[dict[str, float]], bootstrap: Callable[[str], tuple[float, float]] | None,
                   bootstrap_names: tuple[str, ...], bootstrap_method: str) -> dict[str, dict[str, Any]]:
    """Mean, std and 95% CI per stored name: t over seeds, or for one run ``bootstrap(name)`` on ``bootstrap_names``."""
    summary: dict[str, dict[str, Any]] = {}
    for name in run_metrics[0]:
        arr = np.array([m[name] for m in run_metrics], dtype=float)
        entry: dict[str, Any] = {"mean": float(np.nanmean(arr)) if not np.isnan(arr).all() else float("nan"),
                                 "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0,
                                 "n": int(len(arr)), "values": arr.tolist()}
        if len(arr) > 1:
            half = stats.t.ppf(0.975, len(arr) - 1) * entry["std"] / np.sqrt(len(arr))
            entry["ci95"] = [entry["mean"] - half, entry["mean"] + half]
            entry["ci_method"] = "t over seeds"
        elif bootstrap is not None and name in bootstrap_names:
            low, high = bootstrap(name)
            if np.isfinite(low) and np.isfinite(high):
                entry["ci95"] = [low, high]
                entry["ci_method"] = bootstrap_method
        summary[name] = entry
    return summary


def percentile_bootstrap(statistic: Callable[[np.ndarray], float], n: int, seed: int = 0,
                         resamples: int = BOOTSTRAP_RESAMPLES) -> tuple[float, float]:
    """95% percentile interval of ``statistic(indices)`` over ``n`` units resampled with replacement (unstratified)."""
    from retbench import stats as rstats

    if n < 2:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, res = rstats.bootstrap_indices(statistic, np.zeros(n), n_resamples=resamples, seed=seed, stratified=False)
    return float(res.confidence_interval.low), float(res.confidence_interval.high)
