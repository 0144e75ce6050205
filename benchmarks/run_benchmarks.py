"""Performance benchmarks of retbench on the bundled real data (CPU).

Three measurements, each a ratio against a baseline taken in the same run:

(a) extraction: images/s through ``retbench.features.extract`` (DataLoader decode, resize,
    normalise, model) ÷ a bare ``model(x)`` loop over the same images already decoded,
    preprocessed and normalised in memory, same batch size; ``timm:resnet18`` (random
    weights) and the ``classical`` adapter on a fixed random subset of ``eye4class``.
    Target ≥ 0.9.
(b) linear-probe sweep on real features (``classical`` on ``eye4class``, through retbench's
    feature cache): seeds × C values, each problem a class-balanced logistic regression on a
    stratified, patient-grouped train/val split of the train split (as the ``linear_probe``
    protocol carves it), scored by ACA (balanced accuracy) on val. Time of a loop of
    scikit-learn ``make_pipeline(StandardScaler(), LogisticRegression(C, class_weight=
    "balanced", max_iter=1000))`` fits — with one BLAS thread and with the library default —
    ÷ time of one ``retbench.protocols.base.solve_probes`` call (target ≥ 5×), and the
    largest |ACA difference| (target ≤ 0.005). Where that difference exceeds the target,
    the worst problems are refitted by scikit-learn to tol 1e-8, which tells a solver error
    from scikit-learn's own early stop (its default tol is 1e-4).
(c) a cold ``retbench.run`` (``timm:resnet18`` × one task × ``linear_probe``, empty cache and
    results) ÷ a rerun with the feature cache warm and ``overwrite=True``. Target ≥ 20×.

The machine's load average and torch's thread count are printed with the figures: on a
small, shared machine every timing moves with what else is running, so compare ratios
taken in one run rather than absolute figures across runs.

    RETBENCH_DATA=/path/to/data python benchmarks/run_benchmarks.py [--quick] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a source checkout without installing
    sys.path.insert(0, str(REPO))

FULL = {"images": 512, "repeats": 2, "extract_seconds": 30, "probe_images": None, "n_cs": 13, "seeds": 5,
        "run_tasks": ("mx_dme_cfp_dr", "eye4class_dr_grading")}
QUICK = {"images": 128, "repeats": 1, "extract_seconds": 8, "probe_images": 2000, "n_cs": 8, "seeds": 5,
         "run_tasks": ("mx_dme_cfp_dr",)}
EXTRACT_MODELS = ("timm:resnet18", "classical")
RUN_MODEL = "timm:resnet18"
PROBE_MODEL, PROBE_TASK = "classical", "eye4class"


# --------------------------------------------------------------------------- helpers
def load() -> str:
    """The 1, 5 and 15 minute load averages."""
    return "/".join(f"{v:.2f}" for v in os.getloadavg())


def machine() -> dict[str, Any]:
    import torch

    return {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "load_avg": os.getloadavg()}


def subset(examples: Any, n: int | None, seed: int = 0) -> Any:
    """A fixed random subset of ``n`` examples (all when ``n`` is None or too large)."""
    import numpy as np

    from retbench.data.examples import Examples

    if n is None or n >= len(examples):
        return examples
    idx = np.sort(np.random.default_rng(seed).choice(len(examples), n, replace=False))
    return Examples([examples.ids[i] for i in idx], examples.labels[idx], [examples.patients[i] for i in idx],
                    None, examples.images, {})


class Table:
    """Rows of (section, measure, value, target, verdict) printed at the end and returned as JSON."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, section: str, measure: str, value: float, fmt: str = "{:.2f}", target: str = "",
            ok: bool | None = None) -> None:
        self.rows.append({"section": section, "measure": measure, "value": value, "text": fmt.format(value),
                          "target": target, "ok": ok})
        print(f"  {section:<28} {measure:<48} {fmt.format(value):>10} {target}", flush=True)

    def print(self) -> None:
        print()
        print(f"{'section':<28} {'measure':<48} {'value':>10}  {'target':<8} met")
        print("-" * 104)
        for r in self.rows:
            met = "" if r["ok"] is None else ("yes" if r["ok"] else "NO")
            print(f"{r['section']:<28} {r['measure']:<48} {r['text']:>10}  {r['target']:<8} {met}")


# --------------------------------------------------------------------------- (a) extraction
def bench_extraction(root: str, size: dict[str, Any], table: Table) -> dict[str, Any]:
    import torch

    from retbench.adapters import load_model
    from retbench.features import ImageDataset, default_workers, extract
    from retbench.preprocess import normalize
    from retbench.runner import load_task_data

    task = load_task_data("eye4class", root)
    examples = subset(task.examples, size["images"])
    n, bs = len(examples), 64
    out: dict[str, Any] = {"images": n, "batch_size": bs, "workers": default_workers(), "models": {}}
    workers = default_workers()
    print(f"(a) extraction: {n} eye4class images, batch {bs}, "
          f"{f'{workers} DataLoader worker(s)' if workers else 'decoding in the main process'}, load {load()}",
          flush=True)
    for name in EXTRACT_MODELS:
        adapter = load_model(name, device="cpu")
        pre = adapter.preprocess.with_hints(task.spec.preprocess)
        dataset = ImageDataset(examples, pre)
        start = time.perf_counter()
        pixels = torch.stack([dataset[i][1] for i in range(n)])
        decode_s = time.perf_counter() - start
        x = normalize(pixels, pre)
        with torch.inference_mode():
            reference = adapter.encode_image(x[:bs])  # warm-up (allocator, kernels) for both paths
        bare_s, extract_s, ratios = [], [], []
        begun = time.perf_counter()
        # interleaved pairs, so both paths see the same machine load; cheap models get more pairs
        while len(ratios) < size["repeats"] or (time.perf_counter() - begun < size["extract_seconds"]
                                                 and len(ratios) < 15):
            start = time.perf_counter()
            with torch.inference_mode():
                for i in range(0, n, bs):
                    adapter.encode_image(x[i:i + bs])
            bare_s.append(time.perf_counter() - start)
            start = time.perf_counter()
            feats = extract(adapter, examples, pre, batch_size=bs)
            extract_s.append(time.perf_counter() - start)
            ratios.append(bare_s[-1] / extract_s[-1])
        same = float((torch.from_numpy(feats.values[:bs]) - reference.float()).abs().max())
        ratio = statistics.median(ratios)
        section = f"(a) {name}"
        table.add(section, "decode+preprocess in one process (ms/image)", 1000 * decode_s / n, "{:.1f}")
        table.add(section, "bare model(x) loop (images/s)", n / statistics.median(bare_s), "{:.1f}")
        table.add(section, "retbench extract (images/s)", n / statistics.median(extract_s), "{:.1f}")
        table.add(section, f"extract / bare throughput (median of {len(ratios)} pairs)", ratio, "{:.3f}", ">= 0.9",
                  ratio >= 0.9)
        out["models"][name] = {"decode_ms_per_image": 1000 * decode_s / n, "bare_s": bare_s, "extract_s": extract_s,
                               "ratios": ratios, "ratio": ratio, "max_abs_feature_difference": same,
                               "load_after": os.getloadavg()}
    return out


# --------------------------------------------------------------------------- (b) probe sweep
def probe_features(root: str, size: dict[str, Any], cache_dir: str) -> tuple[Any, ...]:
    """Classical features of (a subset of) eye4class, through retbench's feature cache."""
    from retbench.adapters import load_model
    from retbench.config import RunConfig
    from retbench.data import make_splits
    from retbench.runner import FeatureSource, TaskData, load_task_data

    task = load_task_data(PROBE_TASK, root)
    if size["probe_images"] is not None:
        examples = subset(task.examples, size["probe_images"])
        task = TaskData(task.spec, examples, make_splits(task.spec, examples))
    adapter = load_model(PROBE_MODEL, device="cpu")
    config = RunConfig(models=(PROBE_MODEL,), tasks=(PROBE_TASK,), data_root=root, cache_dir=cache_dir)
    source = FeatureSource(adapter, task, adapter.preprocess.with_hints(task.spec.preprocess), config)
    start = time.perf_counter()
    feats = source.get()
    return task, feats, time.perf_counter() - start


def bench_probes(root: str, size: dict[str, Any], table: Table, cache_dir: str,
                 sklearn_threads: tuple[int | None, ...]) -> dict[str, Any]:
    import numpy as np
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    from retbench.data.splits import holdout
    from retbench.protocols.base import Probe, solve_probes
    from retbench.protocols.linear_probe import DEFAULT_CS

    task, feats, feat_s = probe_features(root, size, cache_dir)
    x, y = feats.values, task.examples.labels
    n_classes = len(task.spec.classes)
    valid = feats.valid
    train = task.splits["train"][valid[task.splits["train"]]]
    groups = np.asarray(task.examples.patients, dtype=object)
    Cs = list(DEFAULT_CS) if size["n_cs"] == len(DEFAULT_CS) else [float(c) for c in np.logspace(-4, 2, size["n_cs"])]
    splits = [holdout(train, y[train], groups[train], 0.2, seed) for seed in range(size["seeds"])]
    probes = [Probe(fit, C, val) for fit, val in splits for C in Cs]
    print(f"(b) probe sweep: {PROBE_MODEL} features of {PROBE_TASK}, {x.shape[0]} x {x.shape[1]} "
          f"({'cache' if feats.from_cache else f'extracted in {feat_s:.0f} s'}), {size['seeds']} seeds x {len(Cs)} C "
          f"= {len(probes)} problems, ~{len(splits[0][0])} fit / {len(splits[0][1])} val rows, load {load()}",
          flush=True)

    def sklearn_fit(p: Probe, **kw: Any) -> tuple[float, int, bool]:
        clf = LogisticRegression(C=p.C, class_weight="balanced", max_iter=kw.pop("max_iter", 1000), **kw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            model = make_pipeline(StandardScaler(), clf).fit(x[p.fit], y[p.fit])
        aca = balanced_accuracy_score(y[p.predict], model.predict(x[p.predict]))
        return aca, int(np.max(model[-1].n_iter_)), any(issubclass(w.category, ConvergenceWarning) for w in caught)

    # retbench first (a tiny warm-up solve takes torch's one-time costs out of the timing)
    solve_probes(x, y, n_classes, probes[:1], torch.device("cpu"), True, True)
    stats: dict[str, int] = {}
    start = time.perf_counter()
    probas = solve_probes(x, y, n_classes, probes, torch.device("cpu"), balanced=True, standardize=True, stats=stats)
    ours_s = time.perf_counter() - start
    ours = np.array([balanced_accuracy_score(y[p.predict], pr.argmax(1)) for p, pr in zip(probes, probas)])
    # scikit-learn loops: one BLAS thread (its fastest setting on a small shared machine; the ACA reference),
    # then the library default, timed only
    section = "(b) probe sweep"
    table.add(section, "retbench solve_probes (s)", ours_s, "{:.1f}")
    ref, iters, unconverged, sk_times = [], [], 0, {}
    for threads in sklearn_threads:
        label = "1 BLAS thread" if threads == 1 else ("default BLAS threads" if threads is None else
                                                        f"{threads} BLAS threads")
        start = time.perf_counter()
        with threadpool_limits(threads):
            for p in probes:
                aca, it, warned = sklearn_fit(p)
                if len(ref) < len(probes):  # the first loop gives the ACA reference
                    ref.append(aca)
                    iters.append(it)
                    unconverged += warned
        sk_times[label] = time.perf_counter() - start
        table.add(section, f"scikit-learn loop, {len(probes)} fits, {label} (s)", sk_times[label], "{:.1f}")
        table.add(section, f"speed-up vs that loop ({os.getloadavg()[0]:.2f} load)", sk_times[label] / ours_s,
                  "{:.1f}x", ">= 5x", sk_times[label] / ours_s >= 5)
    sk_s = next(iter(sk_times.values()))
    ref_arr = np.array(ref)
    diff = np.abs(ours - ref_arr)
    speedup = sk_s / ours_s
    table.add(section, "max |ACA diff| vs scikit-learn (default tol 1e-4)", float(diff.max()), "{:.4f}", "<= 0.005",
              bool(diff.max() <= 0.005))
    table.add(section, "problems with |ACA diff| > 0.005", float((diff > 0.005).sum()), "{:.0f}")
    out: dict[str, Any] = {
        "features": list(x.shape), "features_from_cache": feats.from_cache, "Cs": Cs, "seeds": size["seeds"],
        "sklearn_s": sk_times, "sklearn_threads": list(sklearn_threads), "sklearn_iterations": iters,
        "sklearn_convergence_warnings": unconverged, "retbench_s": ours_s, "retbench_stats": stats,
        "speedup": speedup, "aca_retbench": ours.tolist(), "aca_sklearn": ref, "max_abs_aca_diff": float(diff.max()),
        "load_after": os.getloadavg(),
    }
    if diff.max() > 0.005:  # scikit-learn's default tol (1e-4) or ours? refit the worst problems to tol 1e-8
        worst = [int(i) for i in np.argsort(-diff)[:3] if diff[i] > 0.005]
        checks = []
        with threadpool_limits(1):
            for i in worst:
                tight, it, _ = sklearn_fit(probes[i], solver="newton-cg", tol=1e-8, max_iter=10000)
                checks.append({"seed": i // len(Cs), "C": probes[i].C, "aca_retbench": float(ours[i]),
                               "aca_sklearn_default": float(ref_arr[i]), "aca_sklearn_tol1e-8": tight,
                               "sklearn_tight_iterations": it})
        out["converged_check"] = checks
        worst_tight = max(abs(c["aca_retbench"] - c["aca_sklearn_tol1e-8"]) for c in checks)
        worst_default = max(abs(c["aca_sklearn_default"] - c["aca_sklearn_tol1e-8"]) for c in checks)
        cs = ", ".join(f"{c['C']:.3g}" for c in checks)
        table.add(section, f"  worst {len(checks)} (C={cs}): retbench vs sklearn tol 1e-8", worst_tight, "{:.4f}",
                  "<= 0.005", bool(worst_tight <= 0.005))
        table.add(section, "  same: sklearn tol 1e-4 vs sklearn tol 1e-8", worst_default, "{:.4f}")
    return out


# --------------------------------------------------------------------------- (c) cold vs cached run
def bench_run(root: str, size: dict[str, Any], table: Table) -> list[dict[str, Any]]:
    from retbench.adapters import load_model

    load_model(RUN_MODEL, device="cpu")  # imports (timm, ...) are not what "cold" means: both runs start warm
    return [bench_run_task(root, task, table) for task in size["run_tasks"]]


def bench_run_task(root: str, task: str, table: Table) -> dict[str, Any]:
    import retbench
    from retbench.config import RunConfig

    with tempfile.TemporaryDirectory(prefix="retbench-bench-") as tmp:
        config = RunConfig(models=(RUN_MODEL,), tasks=(task,), protocols=("linear_probe",), data_root=root,
                           results_dir=str(Path(tmp) / "results"), cache_dir=str(Path(tmp) / "cache"), device="cpu")
        print(f"(c) run: {RUN_MODEL} x {task} x linear_probe, empty cache and results, load {load()}", flush=True)
        start = time.perf_counter()
        (cold,) = retbench.run(config)
        cold_s = time.perf_counter() - start
        start = time.perf_counter()
        (warm,) = retbench.run(dataclasses.replace(config, overwrite=True))
        warm_s = time.perf_counter() - start
    ct, wt = cold.data["timings"], warm.data["timings"]
    ratio = cold_s / warm_s
    section = f"(c) {task}"
    table.add(section, f"cold run, {cold.data['data']['n_examples']} images (s)", cold_s, "{:.1f}")
    table.add(section, "  of which feature extraction (s)", ct["extract_s"], "{:.1f}")
    table.add(section, "  of which probe fitting (s)", ct["fit_s"], "{:.1f}")
    table.add(section, "rerun, features cached, --overwrite (s)", warm_s, "{:.2f}")
    table.add(section, "  of which probe fitting (s)", wt["fit_s"], "{:.2f}")
    table.add(section, "  of which the rest (load task, model, cache, write)", warm_s - wt["fit_s"] - wt["extract_s"],
              "{:.2f}")
    table.add(section, "cold / rerun", ratio, "{:.1f}x", ">= 20x", ratio >= 20)
    return {"task": task, "model": RUN_MODEL, "cold_s": cold_s, "rerun_s": warm_s, "ratio": ratio,
            "cold_timings": ct, "rerun_timings": wt, "rerun_from_cache": wt["features_from_cache"],
            "load_after": os.getloadavg()}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true",
                        help="smaller sizes: 128 images in (a), 2000 images x 8 C in (b), mx_dme_cfp_dr only in (c)")
    parser.add_argument("--only", default="abc", help="sections to run, e.g. 'a' or 'bc' (default: abc)")
    parser.add_argument("--data-root", default=None,
                        help="data root (default: $RETBENCH_DATA, else ../shared/data beside the repository)")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache for (b)'s classical features (default: retbench's cache, "
                             "$RETBENCH_CACHE or ~/.cache/retbench); (c) always uses a fresh temporary one")
    parser.add_argument("--images", type=int, default=None, help="images in (a) (default 512, quick 128)")
    parser.add_argument("--sklearn-threads", choices=("both", "1", "default"), default=None,
                        help="BLAS threads of the scikit-learn loop in (b): 'both' times it with one thread (the ACA "
                             "reference; fastest on a small shared machine) and with the library default, which can "
                             "take minutes when another process is busy (default: both; --quick: 1)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all figures as JSON to PATH")
    parser.add_argument("--verbose", action="store_true", help="show retbench's progress bars")
    args = parser.parse_args(argv)

    if not args.verbose:
        os.environ.setdefault("RETBENCH_QUIET", "1")
    root = args.data_root or os.environ.get("RETBENCH_DATA") or str(REPO.parent / "shared" / "data")
    if not Path(root).is_dir():
        parser.error(f"data root {root} does not exist: pass --data-root or set RETBENCH_DATA")
    from retbench.config import default_cache_dir

    cache_dir = args.cache_dir or default_cache_dir()
    size = dict(QUICK if args.quick else FULL)
    if args.images:
        size["images"] = args.images
    info = machine()
    print(f"retbench benchmarks ({'quick' if args.quick else 'full'}): data {root}, {info['cpus']} CPUs, "
          f"torch {info['torch']} with {info['torch_threads']} intra-op threads, load average {load()}", flush=True)
    table = Table()
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": info, "sizes": size}
    started = time.perf_counter()
    if "a" in args.only:
        results["extraction"] = bench_extraction(root, size, table)
    if "b" in args.only:
        choice = args.sklearn_threads or ("1" if args.quick else "both")
        threads = {"both": (1, None), "1": (1,), "default": (None,)}[choice]
        results["probes"] = bench_probes(root, size, table, cache_dir, threads)
    if "c" in args.only:
        results["run"] = bench_run(root, size, table)
    results["table"] = table.rows
    results["seconds"] = time.perf_counter() - started
    results["load_avg_end"] = os.getloadavg()
    table.print()
    print(f"\nload average at the end {load()}, torch intra-op threads {info['torch_threads']}, "
          f"{results['seconds']:.0f} s in all")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1, default=float))
        print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
