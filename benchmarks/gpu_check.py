"""The prepared device check (issue 16): one line per figure, in at most ~8 minutes on one GPU.

Four parts, each printed as ``figure: value`` lines and gathered into ``--json``:

(1) tests     the GPU-marked tests (``pytest -m gpu``): their one-line summary.
(2) extract   for ViT-B/16 and ViT-L/16 at 224 px (timm, random weights, bf16 autocast on CUDA): images/s of
              ``retbench.features.extract`` on eye4class images ÷ images/s of a bare ``model(x)`` loop on the same
              images already decoded, normalised and on the device; cold (decoding the files, no pixel cache)
              and with the pixel cache warm. The feature cache is not involved (``extract`` is called directly).
(3) solver    the batched probe solver on CUDA vs CPU (all CPU threads) on the ViT-L features of (2): a
              linear-probe C search (5 patient-grouped seeds × 13 C) and a few-shot set (k = 1…16 × 10 seeds);
              seconds each, CPU ÷ CUDA, and the largest |ΔACA| between the two (target ≤ 1e-3).
(4) mae       ``retbench pretrain --recipe mae --preset gpu`` for as many steps as fit in ``--mae-minutes``
              (calibrated on a short run first), then ``retbench run -p linear_probe`` of the model and of its
              random-init twin on ``@bundled`` and the leaderboard's paired comparison of the two.

``--dry-run`` runs every part on the CPU at toy sizes (ViT-Ti, 16 images, a few pretraining steps on one task),
so the script is known to work before a GPU is at hand; its figures mean nothing. Without ``--dry-run`` and
without CUDA it refuses to start.

    RETBENCH_DATA=/path/to/data python benchmarks/gpu_check.py [--dry-run] [--only 1234] [--json out.json]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (str(REPO), str(REPO / "benchmarks")):
    if _p not in sys.path:  # run from a source checkout without installing
        sys.path.insert(0, _p)


@dataclass(frozen=True)
class Sizes:
    """How big each part is: the GPU sizes, or toy ones for ``--dry-run``."""

    device: str
    models: tuple[str, ...]
    images: int
    repeats: int
    cs: int
    few_shot_seeds: int
    mae_preset: str
    mae_data: str
    mae_exclude: str
    mae_tasks: str
    mae_seeds: int | None
    calibration_steps: int
    max_steps: int


GPU = Sizes("cuda", ("timm:vit_base_patch16_224", "timm:vit_large_patch16_224"), 2048, 3, 13, 10,
            "gpu", "@bundled", "@all", "@bundled", None, 30, 100_000)
DRY = Sizes("cpu", ("timm:vit_tiny_patch16_224",), 16, 1, 3, 2,
            "cpu", "mx_dme_cfp_dr", "mx_dme_cfp_dr", "mx_dme_cfp_dr", 1, 2, 4)


class Figures:
    """The printed ``part | figure: value`` lines, kept for ``--json``."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def add(self, part: str, figure: str, value: Any, fmt: str = "{}") -> None:
        text = fmt.format(value) if isinstance(value, (int, float)) else str(value)
        self.rows.append({"part": part, "figure": figure, "value": value, "text": text})
        print(f"{part:<8} | {figure}: {text}", flush=True)


# --------------------------------------------------------------------------- (1) GPU-marked tests
def part_tests(figures: Figures) -> None:
    """Run ``pytest -m gpu`` and report its summary line (on a CPU the tests skip, which is what they report)."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                           "tests/test_gpu_decode.py"], cwd=REPO, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    summary = lines[-1].strip("= ") if lines else proc.stderr.strip().splitlines()[-1]
    figures.add("tests", "pytest -m gpu", summary)
    if proc.returncode not in (0, 5):  # 5: nothing collected
        print(proc.stdout[-4000:], proc.stderr[-2000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"gpu_check: the GPU-marked tests failed (pytest exit {proc.returncode})")


# --------------------------------------------------------------------------- (2) extraction vs bare forward
def part_extract(root: str, sizes: Sizes, figures: Figures) -> Any:
    """Extraction ÷ bare forward per model, cold and warm pixel cache; returns the last model's features."""
    from run_benchmarks import subset

    from retbench.features import image_content_digest
    from retbench.runner import load_task_data

    task = load_task_data("eye4class", root)
    examples = subset(task.examples, sizes.images)
    image_content_digest(examples)
    last: Any = None
    for name in sizes.models:
        seconds, last = _time_model(name, task, examples, sizes)
        if sizes.device == "cuda":
            import torch

            torch.cuda.empty_cache()
        n = len(examples)
        best = {k: min(v) for k, v in seconds.items()}
        label = f"{name.split(':', 1)[1]} {'bf16' if sizes.device == 'cuda' else 'fp32'}"
        figures.add("extract", f"{label} bare model(x), {n} images (img/s)", n / best["bare"], "{:.0f}")
        figures.add("extract", f"{label} extract cold ÷ bare (no pixel cache)", best["bare"] / best["cold"], "{:.3f}")
        figures.add("extract", f"{label} extract warm pixel cache ÷ bare", best["bare"] / best["warm"], "{:.3f}")
    return task, examples, last


def _time_model(name: str, task: Any, examples: Any, sizes: Sizes) -> tuple[dict[str, list[float]], Any]:
    """Seconds of the bare loop, cold extraction and warm-pixel-cache extraction (interleaved rounds)."""
    import torch

    from retbench.adapters import load_model
    from retbench.features import ImageDataset, extract
    from retbench.pixel_cache import PixelCache
    from retbench.preprocess import normalize

    cuda = sizes.device == "cuda"
    adapter = load_model(name, "random", sizes.device, precision="bf16")
    pre = adapter.task_preprocess(task.spec.preprocess)
    bs = 256 if cuda else 8
    x = normalize(torch.stack([ImageDataset(examples, pre)[i][1] for i in range(len(examples))]), pre)
    x = x.to(sizes.device)

    def bare() -> None:
        with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=cuda):
            for i in range(0, len(x), bs):
                adapter.encode_image(x[i:i + bs])
        if cuda:
            torch.cuda.synchronize()

    seconds: dict[str, list[float]] = {"bare": [], "cold": [], "warm": []}
    with tempfile.TemporaryDirectory() as tmp:
        cache = PixelCache(Path(tmp))
        bare()  # warm-up: kernels, allocator
        feats = extract(adapter, examples, pre, batch_size=bs, pixel_cache=cache)  # fills the pixel cache
        paths = {"bare": bare, "cold": functools.partial(extract, adapter, examples, pre, batch_size=bs),
                 "warm": functools.partial(extract, adapter, examples, pre, batch_size=bs, pixel_cache=cache)}
        for _ in range(sizes.repeats):
            for key, fn in paths.items():
                start = time.perf_counter()
                fn()
                seconds[key].append(time.perf_counter() - start)
    return seconds, feats  # the model and its tensors go with this frame


# --------------------------------------------------------------------------- (3) probe solver CUDA vs CPU
def part_solver(task: Any, examples: Any, feats: Any, sizes: Sizes, figures: Figures) -> None:
    """The batched torch solver on CUDA vs on the CPU, same problems, same answers."""
    import numpy as np
    import torch
    from sklearn.metrics import balanced_accuracy_score

    from retbench.data.splits import holdout
    from retbench.protocols.base import Probe, solve_probes

    x, y = feats.values.astype(np.float64), np.asarray(examples.labels)
    n_classes = len(task.spec.classes)
    rows = np.flatnonzero(feats.valid)
    groups = np.asarray(examples.patients, dtype=object)
    cs = [float(c) for c in np.logspace(-4, 2, sizes.cs)]
    splits = [holdout(rows, y[rows], groups[rows], 0.2, s) for s in range(5)]
    fit0, val0 = splits[0]
    per_class = [fit0[y[fit0] == k] for k in range(n_classes)]
    shots = [np.sort(np.concatenate([np.random.default_rng(s).choice(idx, min(k, len(idx)), replace=False)
                                     for idx in per_class if len(idx)]))
             for k in (1, 2, 4, 8, 16) for s in range(sizes.few_shot_seeds)]
    sets = {f"C search (5 seeds × {len(cs)} C)": [Probe(f, c, v) for f, v in splits for c in cs],
            f"few-shot (k = 1…16 × {sizes.few_shot_seeds} seeds)": [Probe(s, 1.0, val0) for s in shots]}
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    for label, probes in sets.items():
        seconds, acas = {}, {}
        for device in devices:
            solve_probes(x, y, n_classes, probes[:1], device, True, True, solver="torch")  # one-time costs
            start = time.perf_counter()
            proba = solve_probes(x, y, n_classes, probes, device, True, True, solver="torch")
            seconds[device.type] = time.perf_counter() - start
            acas[device.type] = np.array([balanced_accuracy_score(y[p.predict], q.argmax(1))
                                          for p, q in zip(probes, proba)])
        figures.add("solver", f"{label}, {len(probes)} problems on {len(rows)} × {x.shape[1]}: CPU s",
                    seconds["cpu"], "{:.2f}")
        if "cuda" in seconds:
            figures.add("solver", f"{label}: CUDA s", seconds["cuda"], "{:.2f}")
            figures.add("solver", f"{label}: CPU ÷ CUDA time", seconds["cpu"] / seconds["cuda"], "{:.1f}")
            figures.add("solver", f"{label}: max |ΔACA| CUDA vs CPU (target ≤ 1e-3)",
                        float(np.abs(acas["cuda"] - acas["cpu"]).max()), "{:.4f}")
        else:
            figures.add("solver", f"{label}: CUDA", "no CUDA device (dry run)")


# --------------------------------------------------------------------------- (4) MAE, gpu preset, time-boxed
def _retbench(*args: str, env: dict[str, str]) -> str:
    """Run the ``retbench`` CLI of this checkout; its output, or exit naming the command."""
    proc = subprocess.run([sys.executable, "-m", "retbench", *args], cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        raise SystemExit(f"gpu_check: `retbench {' '.join(args)}` failed (exit {proc.returncode})")
    return proc.stdout


def _card(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "retbench_model.json").read_text())["card"]


def part_mae(root: str, sizes: Sizes, minutes: float, work: Path, figures: Figures) -> None:
    """Calibrate the step time, pretrain for ``minutes``, then linear-probe it against its random init."""
    env = {**os.environ, "RETBENCH_DATA": root, "RETBENCH_CACHE": str(work / "cache"), "RETBENCH_QUIET": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    common = ["pretrain", "--recipe", "mae", "--preset", sizes.mae_preset, "--data", sizes.mae_data,
              "--exclude", sizes.mae_exclude, "--device", sizes.device, "--cache-dir", str(work / "cache")]
    calib = work / "mae_calibration"
    _retbench(*common, "--out", str(calib), "--steps", str(sizes.calibration_steps), env=env)
    per_step = _card(calib)["train_seconds"] / sizes.calibration_steps
    steps = int(max(2, min(sizes.max_steps, minutes * 60 / max(per_step, 1e-3))))
    figures.add("mae", f"calibration: s per step ({sizes.calibration_steps} steps, incl. warm-up)", per_step, "{:.3f}")
    out = work / "mae_gpu"
    start = time.perf_counter()
    _retbench(*common, "--out", str(out), "--steps", str(steps), env=env)
    card = _card(out)
    batch = card["settings"]["batch_size"]
    images = card["data"]["images_kept"]
    figures.add("mae", f"steps trained (batch {batch})", card["steps_done"])
    figures.add("mae", f"epochs over the {images} pretraining images", card["steps_done"] * batch / images, "{:.1f}")
    figures.add("mae", "training s (wall incl. data loading)", f"{card['train_seconds']} ({time.perf_counter() - start:.0f})")
    figures.add("mae", "final reconstruction loss", card["final_loss"], "{:.4f}")
    results = work / "results"
    probe = ["run", "-m", f"local:{out}", "-t", sizes.mae_tasks, "-p", "linear_probe", "--results-dir", str(results),
             "--device", sizes.device] + (["--seeds", str(sizes.mae_seeds)] if sizes.mae_seeds else [])
    _retbench(*probe, env=env)
    _retbench(*probe, "--weights", "random", env=env)
    boards = work / "leaderboards"
    _retbench("leaderboard", "--results-dir", str(results), "--out", str(boards), "--protocol", "linear_probe",
              "--baseline", f"local:{out.name}@random", "--no-figures", env=env)
    text = (boards / "linear_probe.md").read_text()
    table, _, comparisons = text.partition("## Paired comparisons")
    rows = [line for line in comparisons.splitlines()
            if re.match(rf"\|\s*`local:{out.name}`\s*\|", line) and "@random" in line]
    for line in rows:
        cells = [c.strip().strip("`") for c in line.strip("|").split("|")]
        figures.add("mae", "linear probe vs random init: pairing, n, wins/ties/losses, median Δ, p",
                    ", ".join(cells[2:6] + [cells[7]]))
    if not rows:
        figures.add("mae", "linear probe vs random init", "no paired comparison in the leaderboard (one task?)")
    for line in table.splitlines():
        if re.match(rf"\|\s*`local:{out.name}(@random)?`( \(baseline\))?\s*\|", line):
            name, *cells = [c.strip() for c in line.strip("|").split("|")]
            name = name.replace(" (baseline)", "").strip("`")
            figures.add("mae", f"{name} linear probe, mean of task means [CI]", cells[-1].replace("<br>", " "))


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="every part on the CPU at toy sizes")
    parser.add_argument("--only", default="1234", help="parts to run, e.g. '23' (default: 1234)")
    parser.add_argument("--mae-minutes", type=float, default=None,
                        help="pretraining time for (4) (default 4 on a GPU, 0.05 with --dry-run)")
    parser.add_argument("--data-root", default=None, help="data root (default: $RETBENCH_DATA, else ../shared/data)")
    parser.add_argument("--json", metavar="PATH", default=None, help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)

    import torch

    os.environ.setdefault("RETBENCH_QUIET", "1")  # figures, not progress bars
    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; use --dry-run to check the script on the CPU")
    sizes = DRY if args.dry_run else GPU
    root = args.data_root or os.environ.get("RETBENCH_DATA") or str(REPO.parent / "shared" / "data")
    minutes = args.mae_minutes if args.mae_minutes is not None else (0.05 if args.dry_run else 4.0)
    figures = Figures()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU (dry run)"
    print(f"gpu_check on {device}, torch {torch.__version__}, {os.cpu_count()} CPU cores, data {root}", flush=True)
    begun = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="retbench-gpu-check-"))
    try:
        if "1" in args.only:
            part_tests(figures)
        if "2" in args.only or "3" in args.only:
            task, examples, feats = part_extract(root, sizes, figures)
            if "3" in args.only:
                part_solver(task, examples, feats, sizes, figures)
        if "4" in args.only:
            part_mae(root, sizes, minutes, work, figures)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    figures.add("total", "wall time (s)", time.perf_counter() - begun, "{:.0f}")
    if args.json:  # its folder made if missing: the figures of a device run must not be lost at its last step
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"device": device, "dry_run": args.dry_run, "figures": figures.rows},
                                              indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
