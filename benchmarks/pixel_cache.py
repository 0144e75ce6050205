"""Benchmarks of the preprocessed-pixel cache and JPEG draft decoding (issue 16) on the bundled real data (CPU).

Four figures, each a ratio of two timings taken side by side in this run:

(d) second model, same task, same recipe: the time to get the 120 mx_dme CFP images (1000×1000 JPEG) as
    uint8 tensors — decode, fundus crop, resize, through ``ImageDataset`` as extraction does — for a second model
    whose recipe equals the first's (``timm:resnet18`` then ``timm:resnet34``: pixel cache warm, filled by the
    first) ÷ the first's (cache empty: decode and write). Target ≤ 0.05. The content digests the feature cache
    needs anyway are computed before either timing, as the runner does.
(e) extraction with a warm pixel cache: images/s through ``retbench.features.extract`` ÷ a bare ``model(x)`` loop
    on the same images decoded, preprocessed and normalised in memory (same batch size, interleaved pairs, the
    median ratio; also the ratio of the fastest runs and of this process's CPU time, both less moved by other
    processes on a shared machine) for ``timm:resnet18``
    (target ≥ 0.95) and ``classical`` (≥ 0.9), on eye4class; the same ratio
    without the pixel cache is measured in the same pairs.
(f) a sweep (``retbench.sweep`` in this process, debug executor) of 3 models sharing one recipe (timm
    ``lcnet_050``, ``mobilenetv3_small_050``, ``regnetx_002``, random weights) × the 6 bundled classification
    tasks, ``few_shot`` with 1 seed and k = 1, 4 so that extraction dominates: wall time with the pixel cache
    (empty at the start) ÷ without; fresh result store and feature cache for each.
(g) JPEG draft decoding on the 120 mx_dme CFP: the largest, mean and 99th-percentile |pixel difference| from a
    full decode + resize, and decode + preprocess time full ÷ draft, for ``resize_crop`` 224 px without and with
    the task's fundus crop.

    RETBENCH_DATA=/path/to/data python benchmarks/pixel_cache.py [--quick] [--only defg] [--json out.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):
    if _p not in sys.path:  # run from a source checkout without installing
        sys.path.insert(0, _p)

from run_benchmarks import Table, load, machine, report, subset  # noqa: E402

CFP_TASK = "mx_dme_cfp_dr"
FIRST, SECOND = "timm:resnet18", "timm:resnet34"
EXTRACT_MODELS = (("timm:resnet18", 0.95), ("classical", 0.9))
SWEEP_MODELS = ("timm:lcnet_050", "timm:mobilenetv3_small_050", "timm:regnetx_002")
SWEEP_TASKS = ("csdi_cataract_severity", "eye4class", "eye4class_dr_grading", "mx_dme_cfp_dr", "mx_dme_oct_dme",
               "retinamnist")
FULL = {"images": 512, "extract_seconds": 30, "repeats": 3, "sweep_tasks": SWEEP_TASKS}
QUICK = {"images": 128, "extract_seconds": 8, "repeats": 2,
         "sweep_tasks": ("csdi_cataract_severity", "mx_dme_cfp_dr", "mx_dme_oct_dme")}


def _model(name: str) -> Any:
    from retbench.adapters import load_model

    return load_model(name, "random" if name.startswith("timm:") else None, "cpu")


# --------------------------------------------------------------------------- (d) second model
def bench_second_model(root: str, table: Table) -> dict[str, Any]:
    from retbench.features import ImageDataset, image_content_digest
    from retbench.pixel_cache import PixelCache, recipe_hash
    from retbench.runner import load_task_data

    task = load_task_data(CFP_TASK, root)
    ex = task.examples
    first, second = _model(FIRST), _model(SECOND)
    pre1, pre2 = first.task_preprocess(task.spec.preprocess), second.task_preprocess(task.spec.preprocess)
    assert recipe_hash(pre1) == recipe_hash(pre2), "the two models must share a recipe"
    image_content_digest(ex)  # the runner hashes every file for the feature cache key before extracting
    print(f"(d) second model: {len(ex)} {CFP_TASK} images (1000 px JPEG), recipe {pre1.pixel_recipe()}, load {load()}",
          flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        cache = PixelCache(Path(tmp))
        times = {}
        for label, pre in (("first", pre1), ("second", pre2)):
            dataset = ImageDataset(ex, pre, cache)
            start = time.perf_counter()
            written = sum(dataset[i][3] for i in range(len(ex)))
            times[label] = time.perf_counter() - start
            times[f"{label}_written"] = written
        ratio = times["second"] / times["first"]
    n = len(ex)
    section = "(d) 2nd model, same recipe"
    table.add(section, f"{FIRST}: decode+crop+resize, write (ms/image)", 1000 * times["first"] / n, "{:.2f}")
    table.add(section, f"{SECOND}: read from the pixel cache (ms/image)", 1000 * times["second"] / n, "{:.3f}")
    table.add(section, "second ÷ first decode time", ratio, "{:.4f}", "<= 0.05", ratio <= 0.05)
    return {**times, "ratio": ratio, "images": n}


# --------------------------------------------------------------------------- (e) extraction vs bare model
def bench_extraction(root: str, size: dict[str, Any], table: Table) -> dict[str, Any]:
    import torch

    from retbench.features import ImageDataset, default_workers, extract, image_content_digest
    from retbench.pixel_cache import PixelCache
    from retbench.preprocess import normalize
    from retbench.runner import load_task_data

    task = load_task_data("eye4class", root)
    examples = subset(task.examples, size["images"])
    image_content_digest(examples)
    n, bs = len(examples), 64
    workers = default_workers()
    print(f"(e) extraction: {n} eye4class images, batch {bs}, "
          f"{f'{workers} DataLoader worker(s)' if workers else 'decoding in the main process'}, load {load()}",
          flush=True)
    out: dict[str, Any] = {"images": n, "batch_size": bs, "workers": workers, "models": {}}
    tmp = tempfile.mkdtemp()
    try:
        for name, target in EXTRACT_MODELS:
            if name not in size.get("extract_models", (name,)):
                continue
            adapter = _model(name)
            pre = adapter.task_preprocess(task.spec.preprocess)
            cache = PixelCache(Path(tmp) / name.replace(":", "_"))
            pixels = torch.stack([ImageDataset(examples, pre)[i][1] for i in range(n)])
            x = normalize(pixels, pre)
            warm = extract(adapter, examples, pre, batch_size=bs, pixel_cache=cache)  # fills the cache
            with torch.inference_mode():
                adapter.encode_image(x[:bs])  # warm-up (allocator, kernels) for every path
            shares: list[float] = []  # per cached run: the model's forward time ÷ the whole extract call
            paths = {"bare": functools.partial(_bare_loop, adapter, x, bs),
                     "cached": functools.partial(_model_share, adapter, shares, functools.partial(
                         extract, adapter, examples, pre, batch_size=bs, pixel_cache=cache)),
                     "plain": functools.partial(extract, adapter, examples, pre, batch_size=bs)}
            times, feats = _rounds(paths, size)
            bare_s, cached_s, plain_s = times["bare"], times["cached"], times["plain"]
            assert feats["cached"].values.tobytes() == feats["plain"].values.tobytes() == warm.values.tobytes()
            cached = statistics.median(b / c for b, c in zip(bare_s, cached_s))
            without = statistics.median(b / p for b, p in zip(bare_s, plain_s))
            section = f"(e) {name}"
            table.add(section, "bare model(x) loop (images/s)", n / statistics.median(bare_s), "{:.1f}")
            table.add(section, "extract, warm pixel cache (images/s)", n / statistics.median(cached_s), "{:.1f}")
            table.add(section, "extract, no pixel cache (images/s)", n / statistics.median(plain_s), "{:.1f}")
            table.add(section, f"extract ÷ bare, warm pixel cache ({len(bare_s)} runs)", cached, "{:.3f}",
                      f">= {target}", cached >= target)
            table.add(section, "extract ÷ bare, no pixel cache (same runs)", without, "{:.3f}")
            table.add(section, "fastest extract ÷ fastest bare, warm pixel cache", min(bare_s) / min(cached_s), "{:.3f}")
            table.add(section, "fastest extract ÷ fastest bare, no pixel cache", min(bare_s) / min(plain_s), "{:.3f}")
            table.add(section, f"model's share of extract, warm pixel cache (median of {len(shares)}; instrumented)",
                      statistics.median(shares), "{:.3f}")
            cpu = {k: statistics.median(times[f"{k}_cpu"]) for k in paths}
            table.add(section, "CPU time: bare ÷ extract, warm pixel cache", cpu["bare"] / cpu["cached"], "{:.3f}")
            table.add(section, "CPU time: bare ÷ extract, no pixel cache", cpu["bare"] / cpu["plain"], "{:.3f}")
            out["models"][name] = {"times": times, "ratio": cached, "model_shares": shares,
                                   "ratio_without": without, "features_identical": True}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _model_share(adapter: Any, shares: list[float], run: Any) -> Any:
    """``run()``, appending to ``shares`` the fraction of its wall time spent inside ``adapter.encode_image``.

    The paired ratio extract ÷ bare also carries the model's own run-to-run spread (a cheap model's many small ops
    move by ±20% between runs on two cores); this share, taken within one call, is what the harness adds around
    the forward passes.
    """
    spent = [0.0]
    encode = adapter.encode_image

    def timed(x: Any) -> Any:
        start = time.perf_counter()
        try:
            return encode(x)
        finally:
            spent[0] += time.perf_counter() - start

    adapter.encode_image = timed
    try:
        start = time.perf_counter()
        out = run()
        shares.append(spent[0] / (time.perf_counter() - start))
    finally:
        del adapter.encode_image  # the class's method again
    return out


def _bare_loop(adapter: Any, x: Any, bs: int) -> None:
    import torch

    with torch.inference_mode():
        for i in range(0, len(x), bs):
            adapter.encode_image(x[i:i + bs])


def _rounds(paths: dict[str, Any], size: dict[str, Any]) -> tuple[dict[str, list[float]], dict[str, Any]]:
    """Time every path once per round, the order rotated each round (drift in load hits all alike)."""
    times: dict[str, list[float]] = {k: [] for k in paths}
    times.update({f"{k}_cpu": [] for k in paths})
    outputs: dict[str, Any] = {}
    begun, rounds = time.perf_counter(), 0
    while rounds < size["repeats"] or (time.perf_counter() - begun < size["extract_seconds"] and rounds < 15):
        keys = list(paths)
        for key in keys[rounds % len(keys):] + keys[:rounds % len(keys)]:
            start, cpu = time.perf_counter(), time.process_time()
            outputs[key] = paths[key]()
            times[key].append(time.perf_counter() - start)
            times[f"{key}_cpu"].append(time.process_time() - cpu)
        rounds += 1
    return times, outputs


# --------------------------------------------------------------------------- (f) sweep
def bench_sweep(root: str, size: dict[str, Any], table: Table) -> dict[str, Any]:
    from retbench.sweep.driver import run_sweep
    from retbench.sweep.grid import load_grid

    tasks = size["sweep_tasks"]
    print(f"(f) sweep: {len(SWEEP_MODELS)} models × {len(tasks)} tasks, few_shot (1 seed, k = 1, 4), debug executor, "
          f"load {load()}", flush=True)
    out: dict[str, Any] = {"models": SWEEP_MODELS, "tasks": tasks}
    walls: dict[str, float] = {}
    summaries: dict[str, Any] = {}
    for label, pixel_cache in (("without", False), ("with", True)):
        with tempfile.TemporaryDirectory() as tmp:
            grid_file = Path(tmp) / "grid.yaml"
            models = ", ".join(f"{{name: '{m}', weights: random}}" for m in SWEEP_MODELS)
            grid_file.write_text(
                f"name: pixels-{label}\nmodels: [{models}]\ntasks: [{', '.join(tasks)}]\nprotocols: [few_shot]\n"
                f"seeds: 1\nshots: [1, 4]\ndata_root: {root}\nresults_dir: {tmp}/results\ncache_dir: {tmp}/cache\n"
                f"device: cpu\npixel_cache: {'true' if pixel_cache else 'false'}\nretries: 0\n"
                "executor: {kind: debug}\n")
            grid = load_grid(str(grid_file))
            start = time.perf_counter()
            report = run_sweep(grid, echo=lambda s: None)
            walls[label] = time.perf_counter() - start
            if not report.complete:
                raise RuntimeError(f"sweep {label} the pixel cache did not finish: {report.counts}")
            summaries[label] = _few_shot_numbers(Path(tmp) / "results")
            print(f"  sweep {label} the pixel cache: {walls[label]:.1f} s, load {load()}", flush=True)
    assert summaries["with"] == summaries["without"], "results differ with the pixel cache"
    ratio = walls["with"] / walls["without"]
    section = "(f) sweep 3 models × tasks"
    table.add(section, f"wall without pixel cache ({len(tasks)} tasks) (s)", walls["without"], "{:.1f}")
    table.add(section, "wall with pixel cache, empty at start (s)", walls["with"], "{:.1f}")
    table.add(section, "with ÷ without", ratio, "{:.3f}", "< 1", ratio < 1)
    return {**out, "wall_s": walls, "ratio": ratio, "results_identical": True}


def _few_shot_numbers(results: Path) -> dict[str, Any]:
    """Every result's metrics and per-run predictions (what must not move with the cache), by file."""
    out = {}
    for path in sorted(results.rglob("*.json")):
        if ".sweep" in path.parts:
            continue
        data = json.loads(path.read_text())
        out[str(path.relative_to(results))] = (data.get("metrics"), data.get("runs"))
    return out


# --------------------------------------------------------------------------- (g) draft decoding
def bench_draft(root: str, table: Table) -> dict[str, Any]:
    import numpy as np

    from retbench.preprocess import Preprocess
    from retbench.runner import load_task_data

    ex = load_task_data(CFP_TASK, root).examples
    paths = [ex.images.path(i) for i in ex.ids]
    print(f"(g) JPEG draft: {len(paths)} {CFP_TASK} images (1000 px), load {load()}", flush=True)
    out: dict[str, Any] = {}
    for label, crop in (("224 px", "none"), ("224 px + fundus crop", "threshold")):
        full = Preprocess(size=224, crop_pct=0.95, fundus_crop=crop)
        draft = dataclasses.replace(full, jpeg_draft=True)
        t_full = t_draft = 0.0
        diffs = []
        for path in paths:
            start = time.perf_counter()
            a = full.load(full.open_file(path))
            t_full += time.perf_counter() - start
            start = time.perf_counter()
            b = draft.load(draft.open_file(path))
            t_draft += time.perf_counter() - start
            diffs.append(np.abs(a.numpy().astype(np.int16) - b.numpy().astype(np.int16)))
        d = np.stack(diffs)
        section = f"(g) draft {label}"
        table.add(section, "max |pixel difference| (grey levels)", float(d.max()), "{:.0f}")
        table.add(section, "mean |pixel difference|", float(d.mean()), "{:.3f}")
        table.add(section, "99th percentile |pixel difference|", float(np.percentile(d, 99)), "{:.1f}")
        table.add(section, "pixels that differ (fraction)", float((d > 0).mean()), "{:.3f}")
        table.add(section, "full ÷ draft decode+preprocess time", t_full / t_draft, "{:.2f}")
        out[label] = {"max": int(d.max()), "mean": float(d.mean()), "p99": float(np.percentile(d, 99)),
                      "differ": float((d > 0).mean()), "full_ms": 1000 * t_full / len(paths),
                      "draft_ms": 1000 * t_draft / len(paths)}
    return out


# --------------------------------------------------------------------------- main
SECTIONS = "defg"


def run_sections(root: str, only: str, quick: bool, table: Table, images: int | None = None,
                 extract_models: tuple[str, ...] | None = None) -> dict[str, Any]:
    """The sections of ``only`` among d-g, into ``table``; their figures by name (also run by run_benchmarks.py)."""
    os.environ.pop("RETBENCH_NO_PIXEL_CACHE", None)  # the cache's own benchmark needs it on
    size = dict(QUICK if quick else FULL)
    if images:
        size["images"] = images
    if extract_models:
        size["extract_models"] = extract_models
    results: dict[str, Any] = {}
    if "d" in only:
        results["second_model"] = bench_second_model(root, table)
    if "e" in only:
        results["extraction_pixel_cache"] = bench_extraction(root, size, table)
    if "f" in only:
        results["sweep"] = bench_sweep(root, size, table)
    if "g" in only:
        results["draft"] = bench_draft(root, table)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer images and 3 small tasks in the sweep")
    parser.add_argument("--only", default=SECTIONS, help="sections to run, e.g. 'd' or 'eg' (default: defg)")
    parser.add_argument("--data-root", default=None,
                        help="data root (default: $RETBENCH_DATA, else ../shared/data beside the repository)")
    parser.add_argument("--images", type=int, default=None, help="eye4class images in (e) (default 512, quick 128)")
    parser.add_argument("--extract-models", default=None,
                        help="comma-separated subset of (e)'s models (default: timm:resnet18,classical)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write all figures as JSON to PATH")
    args = parser.parse_args(argv)
    if not args.only or set(args.only) - set(SECTIONS):
        parser.error(f"--only takes letters of {SECTIONS!r}, not {args.only!r} (a-c are run_benchmarks.py's)")
    os.environ.setdefault("RETBENCH_QUIET", "1")
    root = args.data_root or os.environ.get("RETBENCH_DATA") or str(REPO.parent / "shared" / "data")
    if not Path(root).is_dir():
        parser.error(f"data root {root} does not exist: pass --data-root or set RETBENCH_DATA")
    info = machine()
    print(f"retbench pixel-cache benchmarks ({'quick' if args.quick else 'full'}): data {root}, {info['cpus']} CPUs, "
          f"torch {info['torch']} with {info['torch_threads']} intra-op threads, load average {load()}", flush=True)
    table = Table()
    results: dict[str, Any] = {"mode": "quick" if args.quick else "full", "machine": info}
    started = time.perf_counter()
    models = tuple(args.extract_models.split(",")) if args.extract_models else None
    results.update(run_sections(root, args.only, args.quick, table, args.images, models))
    report(results, table, started, info, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
