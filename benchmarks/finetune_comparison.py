"""Fine-tuning vs linear probe, per model and task, with the leaderboard's statistics (issue 18).

For every (model, task) with both a ``finetune`` and a ``linear_probe`` result in the store: each protocol's
headline value with its stored 95% CI (cluster bootstrap over test patients x runs), the paired difference
finetune - linear probe by the leaderboard's paired cluster bootstrap (same drawn patients for both; runs paired
by seed, so finetune's seed 0 meets the probe's seed 0, fitted on the same train/validation carve), its p, and
finetune's selected epoch and training time. Across tasks: Wilcoxon signed-rank over task values per model
(n = tasks; the smallest possible two-sided p is 2/2^n).

    python benchmarks/finetune_comparison.py RESULTS_DIR [--tasks a,b] [--models m1,m2] [--metric NAME]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from retbench import resampling as rs
from retbench import stats
from retbench.leaderboard.board import resampling_of
from retbench.metrics import METRICS
from retbench.store import iter_results

PROBE, FINETUNE = "linear_probe", "finetune"


def load(root: Path) -> dict[tuple[str, str, str], dict[str, Any]]:
    """(model, task, protocol) -> result."""
    return {(r["model"]["name"], r["task"]["name"], r["protocol"]["name"]): r for r in iter_results(root)}


def fmt(value: float, low: float | None = None, high: float | None = None) -> str:
    """``0.123 [0.045, 0.201]``."""
    if low is None or high is None:
        return f"{value:.3f}"
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


def compare(ft: dict[str, Any], lp: dict[str, Any], metric: str) -> dict[str, Any]:
    """One row: both protocols' values and the paired bootstrap of finetune - linear probe on ``metric``."""
    pa = [rs.predictions_of(r) for r in ft["runs"]]
    pb = [rs.predictions_of(r) for r in lp["runs"]]
    cluster_of, unit, seed = resampling_of(ft)
    diff = rs.paired_bootstrap(METRICS.get(metric), pa, pb, cluster_of, unit, seed=seed)  # type: ignore[arg-type]
    m_ft, m_lp = ft["metrics"][metric], lp["metrics"][metric]
    runs = ft["runs"]
    paired = {r["seed"] for r in runs}
    lp_paired = [r["metrics"][metric] for r in lp["runs"] if r["seed"] in paired]
    return {
        "lp": fmt(m_lp["mean"], *(m_lp.get("ci95") or (None, None))),
        "lp_paired": fmt(float(np.mean(lp_paired))),
        "ft": fmt(m_ft["mean"], *(m_ft.get("ci95") or (None, None))),
        "delta": fmt(diff.estimate, diff.low, diff.high), "p": f"{diff.p_value:.3f}", "n": f"{diff.n_clusters} {unit}s",
        "epoch": ", ".join(f"{r['selected_epoch']}/{r['epochs']}" for r in runs),
        "seconds": f"{ft['timings']['fit_s']:.0f}", "ft_value": m_ft["mean"], "lp_value": m_lp["mean"],
    }


def main() -> None:
    """Print the markdown table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--tasks", default="")
    ap.add_argument("--models", default="")
    ap.add_argument("--metric", default="", help="default: each task's primary metric")
    args = ap.parse_args()
    store = load(args.results)
    tasks = [t for t in args.tasks.split(",") if t] or sorted({t for _, t, _ in store})
    models = [m for m in args.models.split(",") if m] or sorted({m for m, _, _ in store})
    print("| model | task | metric | linear probe, all seeds (95% CI) | probe, finetune's seeds | finetune (95% CI) | "
          "Δ finetune − probe, paired by seed [95% CI] | p | units | selected epoch | finetune s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    per_model: dict[str, list[tuple[float, float]]] = {}
    for model in models:
        for task in tasks:
            ft, lp = store.get((model, task, FINETUNE)), store.get((model, task, PROBE))
            if ft is None or lp is None:
                continue
            metric = args.metric or ft["primary_metric"]
            row = compare(ft, lp, metric)
            per_model.setdefault(model, []).append((row["ft_value"], row["lp_value"]))  # task means, as the leaderboard
            print(f"| {model} | {task} | {metric} | {row['lp']} | {row['lp_paired']} | {row['ft']} | {row['delta']} | "
                  f"{row['p']} | {row['n']} | {row['epoch']} | {row['seconds']} |")
    print()
    for model, pairs in per_model.items():
        if len(pairs) < 2:
            continue
        a, b = zip(*pairs)
        w = stats.wilcoxon_test(list(a), list(b))
        print(f"- {model}: finetune − probe over {len(pairs)} tasks, mean Δ {np.mean(np.subtract(a, b)):+.3f}; Wilcoxon "
              f"signed-rank over task values p = {w.p_value:.3f} (n = {len(pairs)}; smallest possible p "
              f"{stats.min_wilcoxon_p(len(pairs)):.3f})")


if __name__ == "__main__":
    main()
