"""Which probe solver is fastest for which problem size, at equal answers (CPU).

The problem sets are the shapes retbench's probes solve, built from real features (``classical`` on
``eye4class``, 2,000 images, through retbench's feature cache): the ``linear_probe`` C search
(5 seeds × 8 C, 4 classes, ~1,300 fit rows × 712 features), the same on 150 fit rows, on 64
features (a fixed random projection), with 2 classes; the ``few_shot`` sweep (k = 1 … 16 per class
× 10 seeds, C = 1); and the refit (5 problems on ~1,600 rows). Each solver runs on one thread:

- ``torch``: :func:`retbench.protocols.base.solve_probes` with the batched Newton-CG (warm-started C path);
- ``sklearn-lbfgs``: the same call with the scikit-learn backend (lbfgs, warm-started C path, the
  same gradient tolerance 1e-5 × min(1, 1/C));
- ``sklearn lbfgs loop``, tol 1e-4 / 1e-6: a plain loop of ``LogisticRegression`` fits, as a user writes it;
- ``sklearn newton-cholesky loop`` (tol 1e-6), where its Hessian ((D + 1) · K)² is small enough to try.

Figures: seconds, and the largest |ACA difference| from the converged answer (scikit-learn
``newton-cg``, tol 1e-10) over the set's problems; "equal ACA" means within 0.005 of it. Solvers
are timed back to back in one process, so they see about the same load (printed).

    RETBENCH_DATA=/path/to/data python benchmarks/solver_sizes.py [--json out.json] [--only NAME,...]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
if str(REPO / "benchmarks") not in sys.path:
    sys.path.insert(0, str(REPO / "benchmarks"))

EQUAL_ACA = 0.005


def problem_sets(root: str, cache_dir: str) -> dict[str, tuple[Any, ...]]:
    """name → (x, y, n_classes, probes) built on classical eye4class features."""
    import numpy as np
    from run_benchmarks import QUICK, probe_features

    from retbench.data.splits import holdout
    from retbench.protocols.base import Probe

    task, feats, _ = probe_features(root, dict(QUICK), cache_dir)
    x, y = feats.values.astype(np.float64), task.examples.labels
    train = task.splits["train"][feats.valid[task.splits["train"]]]
    groups = np.asarray(task.examples.patients, dtype=object)
    cs = [float(c) for c in np.logspace(-4, 2, 8)]
    splits = [holdout(train, y[train], groups[train], 0.2, s) for s in range(5)]
    rng = np.random.default_rng(0)
    small = [(np.sort(rng.choice(f, 150, replace=False)), v) for f, v in splits]
    proj = x @ rng.normal(size=(x.shape[1], 64)) / np.sqrt(x.shape[1])
    binary = (y > 0).astype(np.int64)
    per_class = {k: splits[0][0][y[splits[0][0]] == k] for k in range(4)}
    shots = [np.sort(np.concatenate([np.random.default_rng(s).choice(idx, k, replace=False) for idx in per_class.values()]))
             for k in (1, 2, 4, 8, 16) for s in range(10)]
    return {
        "search 4 cls, ~1300 x 712, 5 seeds x 8 C": (x, y, 4, [Probe(f, c, v) for f, v in splits for c in cs]),
        "search 4 cls, 150 x 712, 5 seeds x 8 C": (x, y, 4, [Probe(f, c, v) for f, v in small for c in cs]),
        "search 4 cls, ~1300 x 64, 5 seeds x 8 C": (proj, y, 4, [Probe(f, c, v) for f, v in splits for c in cs]),
        "search 2 cls, ~1300 x 712, 5 seeds x 8 C": (x, binary, 2, [Probe(f, c, v) for f, v in splits for c in cs]),
        "few-shot 4 cls, k=1..16 x 10 seeds, 712, C=1": (x, y, 4, [Probe(s, 1.0, splits[0][1]) for s in shots]),
        "refit 4 cls, ~1600 x 712, 5 problems, C=1": (x, y, 4, [Probe(np.sort(np.concatenate([f, v])), 1.0, v)
                                                              for f, v in splits]),
    }


def sklearn_loop(x: Any, y: Any, probes: list[Any], **params: Any) -> list[Any]:
    """Predicted labels of a plain loop of StandardScaler + LogisticRegression fits."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    out = []
    for p in probes:
        fit = np.asarray(p.fit)
        mean, scale = x[fit].mean(0), np.maximum(x[fit].std(0), 1e-6)
        clf = LogisticRegression(C=p.C, class_weight="balanced", **params)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            clf.fit((x[fit] - mean) / scale, y[fit])
        out.append(clf.predict((x[np.asarray(p.predict)] - mean) / scale))
    return out


def measure(x: Any, y: Any, n_classes: int, probes: list[Any]) -> list[dict[str, Any]]:
    """Seconds and max |ΔACA| from the converged answer for each solver on one problem set (one thread)."""
    import numpy as np
    import torch
    from sklearn.metrics import balanced_accuracy_score
    from threadpoolctl import threadpool_limits

    from retbench.protocols.base import solve_probes

    def aca(labels: list[Any]) -> Any:
        return np.array([balanced_accuracy_score(y[p.predict], lab) for p, lab in zip(probes, labels)])

    cpu = torch.device("cpu")
    with threadpool_limits(1):
        start = time.perf_counter()
        ref = aca(sklearn_loop(x, y, probes, solver="newton-cg", tol=1e-10, max_iter=10000))
        ref_s = time.perf_counter() - start
    rows = [{"solver": "reference: sklearn newton-cg loop, tol 1e-10", "s": ref_s, "max_d_aca": 0.0}]
    solve_probes(x, y, n_classes, probes[:1], cpu, True, True, solver="torch")  # torch's one-time costs
    runs: list[tuple[str, Any]] = [
        ("retbench torch (batched Newton-CG)",
         lambda: [p.argmax(1) for p in solve_probes(x, y, n_classes, probes, cpu, True, True, solver="torch")]),
        ("retbench sklearn-lbfgs backend (warm C path)",
         lambda: [p.argmax(1) for p in solve_probes(x, y, n_classes, probes, cpu, True, True, solver="sklearn-lbfgs")]),
        ("sklearn lbfgs loop, tol 1e-4 (default)", lambda: sklearn_loop(x, y, probes, max_iter=1000)),
        ("sklearn lbfgs loop, tol 1e-6", lambda: sklearn_loop(x, y, probes, tol=1e-6, max_iter=10000)),
    ]
    if (x.shape[1] + 1) * (1 if n_classes == 2 else n_classes) <= 800:
        runs.append(("sklearn newton-cholesky loop, tol 1e-6",
                     lambda: sklearn_loop(x, y, probes, solver="newton-cholesky", tol=1e-6, max_iter=200)))
    for name, fn in runs:
        with threadpool_limits(1):
            torch_threads = torch.get_num_threads()
            torch.set_num_threads(1)
            start = time.perf_counter()
            labels = fn()
            seconds = time.perf_counter() - start
            torch.set_num_threads(torch_threads)
        rows.append({"solver": name, "s": seconds, "max_d_aca": float(np.abs(aca(labels) - ref).max())})
    return rows


def main(argv: list[str] | None = None) -> int:
    from tabulate import tabulate

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-root", default=None, help="data root (default: $RETBENCH_DATA)")
    parser.add_argument("--cache-dir", default=None, help="feature cache (default: retbench's)")
    parser.add_argument("--only", default=None, help="comma-separated substrings of the problem sets to run")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    os.environ.setdefault("RETBENCH_QUIET", "1")
    from retbench.config import default_cache_dir

    root = args.data_root or os.environ.get("RETBENCH_DATA") or str(REPO.parent / "shared" / "data")
    sets = problem_sets(root, args.cache_dir or default_cache_dir())
    if args.only:
        sets = {k: v for k, v in sets.items() if any(s in k for s in args.only.split(","))}
    out: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sets": {}}
    table = []
    for name, (x, y, n_classes, probes) in sets.items():
        load = "/".join(f"{v:.1f}" for v in os.getloadavg())
        rows = measure(x, y, n_classes, probes)
        torch_s = rows[1]["s"]
        for r in rows:
            equal = r["max_d_aca"] <= EQUAL_ACA
            table.append([name, r["solver"], f"{r['s']:.2f}", f"{r['max_d_aca']:.4f}", "yes" if equal else "no",
                          f"{r['s'] / torch_s:.2f}" if r is not rows[0] else "", load])
            name = ""
        out["sets"][table[-len(rows)][0]] = {"rows": rows, "load_before": load, "problems": len(probes)}
        print(tabulate(table[-len(rows):], tablefmt="plain"), flush=True)
    print()
    print(tabulate(table, headers=["problem set", "solver (1 thread)", "s", "max |dACA|", "equal ACA",
                                   "s / torch", "load"], tablefmt="github"))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
