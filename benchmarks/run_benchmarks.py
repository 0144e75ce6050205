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
    ÷ time of one ``retbench.protocols.base.solve_probes`` call, at equal ACA: every solver is
    held to the converged answer (scikit-learn ``newton-cg`` to tol 1e-10), and scikit-learn's
    loop runs with the first of lbfgs at tol 1e-4 … 1e-7, then newton-cg at tol 1e-4 … 1e-7, that
    brings every problem's ACA within 0.005 of it (lbfgs's default 1e-4 stops up to 0.03 away at
    C = 100, and on some sweeps lbfgs stalls short of 0.005 at any tol). Target ≥ 2×; retbench's own largest
    |ACA difference| from the converged answer, target ≤ 0.005. retbench runs on one thread (its default) and
    again on every core (``RETBENCH_SOLVER_THREADS``); ``--contended`` adds both while another process keeps
    one core busy.
(c) a cold ``retbench.run`` (``timm:resnet18`` × one task × ``linear_probe``, empty cache and
    results) ÷ a rerun with the feature cache warm and ``overwrite=True``. Target ≥ 20×.

The machine's load average and torch's thread count are printed with the figures: on a
small, shared machine every timing moves with what else is running, so compare ratios
taken in one run rather than absolute figures across runs.

(d)-(g) are the pixel cache's and JPEG decoding's figures (``benchmarks/pixel_cache.py``, which documents them);
``--only abcdefg`` runs them in the same process after (a)-(c), into the same table.

    RETBENCH_DATA=/path/to/data python benchmarks/run_benchmarks.py [--quick] [--only abcdefg] [--json out.json]
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
from unittest import mock

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
SECTIONS = "abcdefg"  # a-c here, d-g in pixel_cache.py


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


def _timed_solve(x: Any, y: Any, n_classes: int, probes: list, threads: int,
                 stats: dict[str, Any] | None = None) -> tuple[float, list]:
    """Seconds and probabilities of one solve_probes call with ``RETBENCH_SOLVER_THREADS=threads`` (its solver
    statistics into ``stats``)."""
    import torch

    from retbench.protocols.base import solve_probes

    with mock.patch.dict(os.environ, {"RETBENCH_SOLVER_THREADS": str(threads)}):
        start = time.perf_counter()
        probas = solve_probes(x, y, n_classes, probes, torch.device("cpu"), balanced=True, standardize=True,
                              stats=stats)
        return time.perf_counter() - start, probas


def _contended_solves(x: Any, y: Any, n_classes: int, probes: list, cores: int) -> dict[int, float]:
    """Solve times on 1 and on ``cores`` threads while another process keeps one core busy (a shared machine)."""
    import subprocess

    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        return {threads: _timed_solve(x, y, n_classes, probes, threads)[0] for threads in (1, cores)}
    finally:
        busy.kill()
        busy.wait()


def bench_probes(root: str, size: dict[str, Any], table: Table, cache_dir: str,
                 sklearn_threads: tuple[int | None, ...], contend: bool = False) -> dict[str, Any]:
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

    def sklearn_loop(threads: int | None, **kw: Any) -> tuple[float, np.ndarray, int, int]:
        """Seconds, ACA per problem, most iterations and convergence warnings of a plain scikit-learn loop."""
        acas, iters, warned = [], 0, 0
        start = time.perf_counter()
        with threadpool_limits(threads):
            for p in probes:
                clf = LogisticRegression(C=p.C, class_weight="balanced", **{"max_iter": 1000, **kw})
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    model = make_pipeline(StandardScaler(), clf).fit(x[p.fit], y[p.fit])
                acas.append(balanced_accuracy_score(y[p.predict], model.predict(x[p.predict])))
                iters = max(iters, int(np.max(model[-1].n_iter_)))
                warned += any(issubclass(w.category, ConvergenceWarning) for w in caught)
        return time.perf_counter() - start, np.array(acas), iters, warned

    section = "(b) probe sweep"
    # the converged answer every solver is held to: scikit-learn newton-cg run to tol 1e-10
    ref_s, converged, ref_iters, _ = sklearn_loop(1, solver="newton-cg", tol=1e-10, max_iter=10000)
    table.add(section, "converged reference: sklearn newton-cg tol 1e-10 (s)", ref_s, "{:.1f}")
    # retbench (a tiny warm-up solve takes torch's one-time costs out of the timing)
    solve_probes(x, y, n_classes, probes[:1], torch.device("cpu"), True, True)
    stats: dict[str, Any] = {}
    ours_s, probas = _timed_solve(x, y, n_classes, probes, 1, stats)  # the default: one solver thread
    ours = np.array([balanced_accuracy_score(y[p.predict], pr.argmax(1)) for p, pr in zip(probes, probas)])
    ours_diff = float(np.abs(ours - converged).max())
    table.add(section, f"retbench solve_probes, {stats.get('backend')}, {stats.get('products')} products (s)", ours_s,
              "{:.1f}")
    table.add(section, "  retbench max |ACA diff| vs converged", ours_diff, "{:.4f}", "<= 0.005", ours_diff <= 0.005)
    # the opt-in: as many solver threads as cores (RETBENCH_SOLVER_THREADS), same problems
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threaded_s, threaded_same, contended = None, None, {}
    if cores > 1:
        threaded_s, threaded = _timed_solve(x, y, n_classes, probes, cores)
        threaded_same = float(max(np.abs(a - b).max() for a, b in zip(probas, threaded)))
        table.add(section, f"retbench solve_probes, RETBENCH_SOLVER_THREADS={cores} (s)", threaded_s, "{:.1f}")
        table.add(section, "  its max |probability diff| vs 1 thread", threaded_same, "{:.1e}")
        if contend:
            contended = _contended_solves(x, y, n_classes, probes, cores)
            for threads, seconds in contended.items():
                table.add(section, f"  with one core busy elsewhere, {threads} thread(s) (s)", seconds, "{:.1f}")
            table.add(section, f"  busy core: {cores} threads ÷ 1 thread (time)", contended[cores] / contended[1],
                      "{:.2f}")
    # scikit-learn's lbfgs loop: its default tol, then the loosest tol that reaches equal ACA (within 0.005 of converged)
    sk: dict[str, Any] = {}
    default_s, default_aca, default_iters, default_warned = sklearn_loop(1)
    default_diff = float(np.abs(default_aca - converged).max())
    table.add(section, "sklearn lbfgs loop, tol 1e-4, 1 BLAS thread (s)", default_s, "{:.1f}")
    table.add(section, "  its max |ACA diff| vs converged", default_diff, "{:.4f}")
    sk["default"] = {"1 thread": default_s, "max_abs_aca_diff": default_diff, "iterations": default_iters,
                      "convergence_warnings": default_warned}
    # the cheapest ladder rung of lbfgs, then (where lbfgs stalls short of it, as at C = 100) newton-cg
    equal_tol, equal_solver, equal_s = None, "lbfgs", {}
    ladder = [("lbfgs", t) for t in (1e-4, 1e-5, 1e-6, 1e-7)] + [("newton-cg", t) for t in (1e-4, 1e-5, 1e-6, 1e-7)]
    for solver, tol in ladder:
        if (solver, tol) == ("lbfgs", 1e-4):
            seconds, aca, iters, warned = default_s, default_aca, default_iters, default_warned
        else:
            seconds, aca, iters, warned = sklearn_loop(1, solver=solver, tol=tol, max_iter=10000)
        diff = float(np.abs(aca - converged).max())
        sk[f"{solver} tol {tol:g}"] = {"1 thread": seconds, "max_abs_aca_diff": diff, "iterations": iters,
                                       "convergence_warnings": warned}
        print(f"  sklearn {solver} loop tol {tol:g}: {seconds:.1f} s, max |ACA diff| vs converged {diff:.4f}",
              flush=True)
        if diff <= 0.005:
            equal_tol, equal_solver, equal_s["1 BLAS thread"] = tol, solver, seconds
            break
    out: dict[str, Any] = {
        "features": list(x.shape), "features_from_cache": feats.from_cache, "Cs": Cs, "seeds": size["seeds"],
        "converged_reference_s": ref_s, "converged_reference_iterations": ref_iters, "retbench_s": ours_s,
        "retbench_stats": stats, "retbench_max_abs_aca_diff": ours_diff, "retbench_threaded_s": threaded_s,
        "retbench_threads": cores, "retbench_threaded_max_abs_proba_diff": threaded_same,
        "retbench_contended_s": contended, "sklearn": sk,
        "equal_aca_tol": equal_tol, "equal_aca_solver": equal_solver,
        "aca_retbench": ours.tolist(), "aca_converged": converged.tolist(), "load_after": os.getloadavg(),
    }
    if equal_tol is None:
        table.add(section, "sklearn never reached equal ACA (lbfgs, newton-cg to tol 1e-7)", float("nan"), "{}")
        return out
    if None in sklearn_threads:
        equal_s["default BLAS threads"] = sklearn_loop(None, solver=equal_solver, tol=equal_tol, max_iter=10000)[0]
        sk[f"{equal_solver} tol {equal_tol:g}"]["default threads"] = equal_s["default BLAS threads"]
    for label, seconds in equal_s.items():
        table.add(section, f"sklearn {equal_solver} loop at equal ACA (tol {equal_tol:g}), {label} (s)", seconds, "{:.1f}")
        ratio = seconds / ours_s
        table.add(section, f"  speed-up at equal ACA, {label} ({os.getloadavg()[0]:.2f} load)", ratio, "{:.1f}x",
                  ">= 2x", ratio >= 2)
        if threaded_s is not None:
            ratio = seconds / threaded_s
            table.add(section, f"  same, retbench on {cores} threads", ratio, "{:.1f}x", ">= 2x", ratio >= 2)
    out["equal_aca_sklearn_s"] = equal_s
    out["speedup_equal_aca"] = {k: v / ours_s for k, v in equal_s.items()}
    out["speedup_vs_default_tol_1_thread"] = default_s / ours_s
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
    parser.add_argument("--only", default="abc",
                        help="sections to run, letters of a-g, e.g. 'b' or 'bc' (default: abc); d-g are "
                             "benchmarks/pixel_cache.py's, so --only abcdefg prints every figure of issue 16 in one "
                             "run (the full sweep in (f) alone took 44 minutes on 2 busy cores)")
    parser.add_argument("--data-root", default=None,
                        help="data root (default: $RETBENCH_DATA, else ../shared/data beside the repository)")
    parser.add_argument("--cache-dir", default=None,
                        help="feature cache for (b)'s classical features (default: retbench's cache, "
                             "$RETBENCH_CACHE or ~/.cache/retbench); (c) always uses a fresh temporary one")
    parser.add_argument("--images", type=int, default=None, help="images in (a) (default 512, quick 128)")
    parser.add_argument("--sklearn-threads", choices=("both", "1", "default"), default=None,
                        help="BLAS threads of the scikit-learn loop at equal ACA in (b): 'both' times it with one thread "
                             "(its tolerance ladder always runs on one) and again with the library default, which can "
                             "take minutes when another process is busy (default: both)")
    parser.add_argument("--contended", action="store_true",
                        help="(b) also times the solve on 1 thread and on every core while another process keeps one "
                             "core busy: what RETBENCH_SOLVER_THREADS costs on a shared machine")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all figures as JSON to PATH")
    parser.add_argument("--verbose", action="store_true", help="show retbench's progress bars")
    args = parser.parse_args(argv)
    if not args.only or set(args.only) - set(SECTIONS):
        parser.error(f"--only takes letters of {SECTIONS!r}, not {args.only!r}")

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
        choice = args.sklearn_threads or "both"
        threads = {"both": (1, None), "1": (1,), "default": (None,)}[choice]
        results["probes"] = bench_probes(root, size, table, cache_dir, threads, args.contended)
    if "c" in args.only:
        results["run"] = bench_run(root, size, table)
    if set(args.only) & set("defg"):
        import pixel_cache  # benchmarks/ is on sys.path: this script's folder

        results.update(pixel_cache.run_sections(root, args.only, args.quick, table, args.images))
    report(results, table, started, info, args.json)
    return 0


def report(results: dict[str, Any], table: Table, started: float, info: dict[str, Any], json_path: str | None) -> None:
    """Print the table and the closing line; write ``results`` (with the table) to ``json_path``, its folder made."""
    results["table"] = table.rows
    results["seconds"] = time.perf_counter() - started
    results["load_avg_end"] = os.getloadavg()
    table.print()
    print(f"\nload average at the end {load()}, torch intra-op threads {info['torch_threads']}, "
          f"{results['seconds']:.0f} s in all")
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(results, indent=1, default=float))
        print(f"figures written to {json_path}")


if __name__ == "__main__":
    raise SystemExit(main())
