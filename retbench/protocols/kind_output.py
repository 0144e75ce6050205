"""What the retrieval and VQA protocols return, and how their per-run metrics are summarised.

Their runs carry flat metric dictionaries: the headline names (``recall_at_5``, ``accuracy``...)
are means over the task's parts — retrieval directions or question types — and the parts'
own values sit under qualified names ``<part>/<metric>``. Summaries have the classification
results' shape (mean, std, n, values, and a 95% CI), so the store, ``retbench results`` and the
leaderboards read them unchanged.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from retbench.resampling import Interval


@dataclass
class KindOutput:
    """Runs (JSON-ready dicts: seed, k, metrics and the records to recompute them), summaries and settings."""

    runs: list[dict[str, Any]]
    metrics: dict[str, dict[str, Any]]
    settings: dict[str, Any]
    n_test: int
    notes: dict[str, Any] = field(default_factory=dict)
    resampling: dict[str, Any] = field(default_factory=dict)  # the test images' resampling units (Resampling.to_dict)


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


def summarize_flat(run_metrics: list[dict[str, float]], interval: Callable[[str], Interval] | None,
                   names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """Mean and std over runs per stored name, and for ``names`` the 95% CI ``interval(name)`` (the
    bootstrap over test patients × runs of :mod:`retbench.resampling`; no CI from runs alone, which
    share one test set)."""
    summary: dict[str, dict[str, Any]] = {}
    for name in run_metrics[0]:
        arr = np.array([m[name] for m in run_metrics], dtype=float)
        entry: dict[str, Any] = {"mean": float(np.nanmean(arr)) if not np.isnan(arr).all() else float("nan"),
                                 "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0,
                                 "n": int(len(arr)), "values": arr.tolist()}
        if interval is not None and name in names:
            iv = interval(name)
            if np.isfinite(iv.low) and np.isfinite(iv.high):
                entry["ci95"] = [iv.low, iv.high]
                entry["ci_method"] = iv.describe()
        summary[name] = entry
    return summary
