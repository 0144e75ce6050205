"""The main job's record of its pretrained weights, and its check that the leaderboards match the committed ones.

    python benchmarks/drift_check.py record DIR RUNS RECIPE...   # DIR/pretrained_weights.json
    python benchmarks/drift_check.py check DIR [--exclude SUBDIR]

``record`` writes, per pretrained model, the sha256 of its weights and what its model card says determined them:
the CPU (vendor, model, ISA flags), the MKL branch that really ran, threads and package versions.

``check`` compares DIR (its working tree, minus ``--exclude`` and the record itself) with the commit:

- byte-identical: the leaderboards reproduce;
- different, with the committed run's weights: evaluation code or data changed (fails);
- different, with other weights on the committed run's CPU model: pretraining did not reproduce (fails);
- different, with other weights on **another CPU model**: expected, since pretraining is bitwise reproducible only
  per CPU model (docs/pretraining.md, Determinism). Every leaderboard CSV row that does not come from the
  pretrained weights must then match the committed one within :data:`TOLERANCE` (metrics ±0.01, p ±0.05; other
  cells exactly, except those that compare across models: ``best``, ``best_baseline``, ``p_adjusted``, ``stars``);
  it passes when they do, stating how many moved and how far the pretrained models' rows moved.

Exit 1 on a failing drift unless ``RETBENCH_ALLOW_DRIFT`` is set.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from retbench.atomic_files import atomic_write_json
from retbench.determinism import cpu_label

RECORD = "pretrained_weights.json"
CROSS_MODEL_COLUMNS = ("best", "best_baseline", "p_adjusted", "stars")
"""CSV columns that depend on every model of a table (or every baseline), so on the pretrained ones too, or that
flip between two near-equal baselines."""
TOLERANCE = {"mean": 0.01, "ci_low": 0.01, "ci_high": 0.01, "se": 0.01, "delta": 0.01, "p_value": 0.05}
"""How far a row not from the pretrained weights may move on another CPU model: the CPUs' kernels round
differently (MKL's GEMM branch is not the same), which flips a few near-tie predictions — measured, Intel Xeon vs
AMD EPYC: 2 task rows of ~130 moved, by at most 0.004 (metric) and 0.024 (p); every CI on the boards is wider."""
TOLERANCE_TEXT = "metrics ±0.01, p ±0.05"
ROW_KEY = ("protocol", "model", "task", "metric", "k")



def _sha256(path: Path) -> str:
    """The file's sha256 (not ``retbench.data.archives.file_sha256``: importing ``retbench.data`` takes 1.4 s)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def weights_record(runs: Path, recipes: list[str]) -> dict[str, dict[str, Any]]:
    """Per recipe: the weights' sha256 and the CPU, MKL branch, threads and packages its card recorded."""
    out = {}
    for recipe in recipes:
        folder = runs / recipe
        card = json.loads((folder / "retbench_model.json").read_text(encoding="utf-8")).get("card", {})
        det = card.get("determinism", {})
        out[recipe] = {
            "sha256": _sha256(folder / "model.safetensors"),
            "cpu": cpu_label(det.get("cpu") or {}),
            "mkl_branch": det.get("mkl_branch", "not recorded"),
            "threads": det.get("threads"),
            "packages": ", ".join(f"{k} {v}" for k, v in sorted((det.get("packages") or {}).items())),
        }
    return out


def _git(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["git", *args], capture_output=True, text=True)


def _committed(path: str) -> str | None:
    shown = _git("show", f"HEAD:{path}")
    return shown.stdout if shown.returncode == 0 else None


def _rows(text: str) -> dict[tuple[str, ...], dict[str, str]]:
    return {tuple(r.get(k, "") for k in ROW_KEY): r for r in csv.DictReader(io.StringIO(text))}


def _cell_problem(column: str, old: str, new: str | None) -> str | None:
    """Why a cell of a row not from the pretrained weights differs too much (None when it is within tolerance)."""
    if old == new:
        return None
    if column in TOLERANCE and old and new:
        try:
            gap = abs(float(new) - float(old))
        except ValueError:
            return f"{column} {old!r} → {new!r}"
        return None if gap <= TOLERANCE[column] else f"{column} moved {gap:.4f} (> {TOLERANCE[column]})"
    return f"{column} {old!r} → {new!r}"


def compare_independent_rows(committed: str, current: str,
                             pretrained: set[str]) -> tuple[list[str], list[float], list[float], int]:
    """Problems in the rows not from ``pretrained`` models; |Δ mean| of those rows that moved within tolerance;
    |Δ mean| of the pretrained models' rows; how many committed rows are not the pretrained models'."""
    old, new = _rows(committed), _rows(current)
    problems, nudged, moved = [], [], []
    for key in sorted(set(old) | set(new)):
        name = "/".join(k for k in key if k)
        if key not in old or key not in new:
            problems.append(f"row {name} {'added' if key in new else 'missing'}")
            continue
        gap = abs(float(new[key]["mean"]) - float(old[key]["mean"])) if old[key]["mean"] and new[key]["mean"] else 0.0
        if key[1] in pretrained:
            moved.append(gap)
            continue
        cells = [why for c in old[key] if c not in CROSS_MODEL_COLUMNS
                 and (why := _cell_problem(c, old[key][c], new[key].get(c)))]
        if cells:
            problems.append(f"row {name}: {', '.join(cells)}")
        elif gap:
            nudged.append(gap)
    return problems, nudged, moved, sum(key[1] not in pretrained for key in old)


def _changed(folder: str, exclude: list[str]) -> list[str]:
    """``git status --porcelain`` lines (status code, path) of DIR, minus the exclusions and the weights' record."""
    spec = [folder, *(f":(exclude){e}" for e in exclude), f":(exclude){folder}/{RECORD}"]
    out = _git("status", "--porcelain", "--untracked-files=all", "--", *spec).stdout
    return [line for line in out.splitlines() if line.strip()]


def check(folder: str, exclude: list[str]) -> int:
    """Print what drifted and why; 0 when the leaderboards reproduce (or drift only as another CPU explains)."""
    if _git("rev-parse", "--is-inside-work-tree").returncode != 0:
        return 0
    record_path = f"{folder}/{RECORD}"
    ours = json.loads(Path(record_path).read_text(encoding="utf-8")) if Path(record_path).exists() else {}
    theirs = json.loads(_committed(record_path) or "{}")
    changed = _changed(folder, exclude)
    if not changed:
        print(f"{folder}/ are byte-identical to the committed ones")
        if ours != theirs:
            print(f"note: {record_path} differs from the committed one (the weights' record, not a leaderboard)")
        return 0
    print(f"{folder}/ differ from the committed ones:\n  " + "\n  ".join(line[3:] for line in changed),
          file=sys.stderr)
    if bool(theirs) and all(theirs.get(r, {}).get("sha256") == ours[r]["sha256"] for r in ours):
        print("cause: the pretrained weights are the committed run's, so evaluation code or data changed",
              file=sys.stderr)
        return 1
    this_cpu = "; ".join(sorted({f"{v['cpu']}, MKL branch {v['mkl_branch']}" for v in ours.values()}))
    other_cpu = sorted({theirs[r]["cpu"] for r in ours if r in theirs} - {ours[r]["cpu"] for r in ours})
    if not other_cpu:
        print(f"cause: pretraining gave other weights than the committed run's on the same CPU model ({this_cpu}): "
              f"it did not reproduce (or the committed record has no sha256); compare package versions in "
              f"{record_path} with the committed one", file=sys.stderr)
        return 1
    print(f"cause: this CPU ({this_cpu}) is not the committed run's ({'; '.join(other_cpu)}): pretraining is "
          "bitwise reproducible only per CPU model (docs/pretraining.md, Determinism), so the pretrained models' "
          "rows differ; checking every other row against the committed one", file=sys.stderr)
    return _check_other_rows(folder, changed, {f"local:{r}" for r in ours})


def _check_other_rows(folder: str, changed: list[str], pretrained: set[str]) -> int:
    """Another CPU model: the boards may differ only in their contents (no file added or removed), and every CSV
    row not from ``pretrained`` (``local:<recipe>``, the models' folder names) only within :data:`TOLERANCE`."""
    problems = [f"{line[3:]}: {'added' if line.startswith('??') else 'removed'}" for line in changed
                if line.startswith("??") or "D" in line[:2]]
    nudged: list[float] = []
    moved: list[float] = []
    others = 0
    for csv_path in sorted(Path(folder).glob("*.csv")):
        committed = _committed(str(csv_path))
        if committed is None:
            continue  # reported above as added
        p, n, m, o = compare_independent_rows(committed, csv_path.read_text(encoding="utf-8"), pretrained)
        problems += [f"{csv_path}: {x}" for x in p]
        nudged, moved, others = nudged + n, moved + m, others + o
    if problems:
        print("rows not from the pretrained weights moved beyond the cross-CPU tolerance "
              f"({TOLERANCE_TEXT}), or files came or went, so evaluation changed:\n  " + "\n  ".join(problems),
              file=sys.stderr)
        return 1
    within = (f" and {len(nudged)} moved within the cross-CPU tolerance ({TOLERANCE_TEXT}; largest |Δ mean| "
              f"{max(nudged):.4f}: the CPUs' kernels round differently and flip near-tie predictions)" if nudged else "")
    print(f"of the {others} leaderboard CSV rows not from {', '.join(sorted(pretrained))}, {others - len(nudged)} are "
          f"the committed ones{within}; the pretrained models' {len(moved)} rows moved by |Δ mean| ≤ "
          f"{max(moved, default=0.0):.3f} (median {sorted(moved)[len(moved) // 2] if moved else 0.0:.3f}). The "
          f"committed leaderboards are the committed CPU's: restore them with `git checkout -- {folder}` rather than "
          "committing these.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    rec = sub.add_parser("record", help="write DIR/pretrained_weights.json")
    rec.add_argument("folder")
    rec.add_argument("runs", type=Path)
    rec.add_argument("recipes", nargs="+")
    chk = sub.add_parser("check", help="compare DIR with the commit")
    chk.add_argument("folder")
    chk.add_argument("--exclude", action="append", default=[])
    args = parser.parse_args(argv)
    if args.cmd == "record":
        atomic_write_json(Path(args.folder) / RECORD, weights_record(args.runs, args.recipes))
        return 0
    status = check(args.folder.rstrip("/"), args.exclude)
    if status and os.environ.get("RETBENCH_ALLOW_DRIFT"):
        print("RETBENCH_ALLOW_DRIFT is set: reported, not failed", file=sys.stderr)
        return 0
    return status


if __name__ == "__main__":
    sys.exit(main())
