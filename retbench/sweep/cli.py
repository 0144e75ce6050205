"""``retbench sweep``: run a grid of models × tasks × protocols × seeds, show its status, or list its jobs.

Wired into ``retbench.cli.commands`` by ``add_sweep_parser(sub)`` and ``COMMANDS["sweep"] = cmd_sweep``;
also runnable as ``python -m retbench.sweep``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from retbench.cli.common import add_tasks_path_argument, extra_task_folders
from retbench.errors import RetbenchError

if TYPE_CHECKING:
    from retbench.sweep.grid import Grid
    from retbench.sweep.state import JobStatus

out = Console(width=None if sys.stdout.isatty() else 160, highlight=False)
err = Console(stderr=True, soft_wrap=True, highlight=False)

DESCRIPTION = """\
Run every (model, task) job of a grid file: each job runs all of the grid's protocols on one
task with one model, so features are extracted once and reused by every protocol and seed.
Results go to the shared result store; a rerun skips results whose settings hash matches the
grid, retries failed jobs (up to 'retries' times) and resumes interrupted ones. Job state
lives in <results>/.sweep/, so --status works from any machine that sees the store."""

EPILOG = """\
examples:
  retbench sweep examples/sweeps/bundled.yaml --dry-run
  retbench sweep examples/sweeps/bundled.yaml
  retbench sweep examples/sweeps/slurm.yaml --no-wait      # submit a Slurm array and return
  retbench sweep examples/sweeps/slurm.yaml --status       # done / running / queued / failed / pending
  retbench sweep --status --results-dir /shared/results    # every sweep recorded in a store
grid keys: name, models, tasks, protocols, seeds, shots, data_root, results_dir, cache_dir, pixel_cache,
  device, batch_size, num_workers, skip_bad_images, retries, lock_timeout_s, leaderboard, env, executor
  (kind: debug|local|slurm, parallel, timeout_min, gpus, cpus, mem_gb, partition, account, qos,
  constraint, job_name, setup, sbatch, max_requeues, signal_delay_s, log_dir, poll_s)."""


def add_sweep_parser(sub: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``sweep`` subcommand to a ``retbench`` subparsers object."""
    p = sub.add_parser("sweep", help="run a grid of models x tasks x protocols x seeds (local or Slurm), resumable",
                       description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(p)
    return p


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    """The ``sweep`` options (shared by ``retbench sweep`` and ``python -m retbench.sweep``)."""
    p.add_argument("grid", nargs="?", help="grid YAML file (optional with --status: every sweep in --results-dir)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="print the job list (and sbatch header) without running")
    mode.add_argument("--status", action="store_true", help="show done / running / queued / failed / pending jobs")
    p.add_argument("--verbose", "-v", action="store_true", help="with --status: print the traceback of failed jobs")
    p.add_argument("--json", action="store_true", help="with --status or --dry-run: JSON on stdout")
    p.add_argument("--results-dir", help="result store (default: the grid's results_dir, else ./results)")
    p.add_argument("--data-root", help="data root (default: the grid's data_root, else $RETBENCH_DATA)")
    p.add_argument("--cache-dir", help="feature cache, shared by all jobs (default: the grid's, else $RETBENCH_CACHE)")
    p.add_argument("--executor", choices=["debug", "local", "slurm"], help="override the grid's executor kind")
    p.add_argument("--parallel", type=int, help="jobs at once (local processes; Slurm array parallelism)")
    p.add_argument("--retries", type=int, help="retry a failed job up to N times (default: the grid's, else 2)")
    p.add_argument("--overwrite", action="store_true", help="recompute the results that exist when the sweep starts (each once)")
    p.add_argument("--no-pixel-cache", action="store_true",
                   help="jobs neither read nor write the cache of preprocessed pixels (also $RETBENCH_NO_PIXEL_CACHE=1, "
                   "or pixel_cache: false in the grid); results are the same either way")
    p.add_argument("--no-wait", action="store_true", help="submit and return (Slurm); run again or --status later")
    p.add_argument("--leaderboard", metavar="DIR", help="write leaderboards into DIR at the end (default: the grid's)")
    add_tasks_path_argument(p)


def cmd_sweep(args: argparse.Namespace) -> int:
    """``retbench sweep``: 0 when every job is done (or with --dry-run/--status/--no-wait), 1 when some are not."""
    from retbench.sweep.grid import load_grid, with_overrides

    if args.grid is None:
        if not args.status:
            raise RetbenchError("give a grid file (only --status works without one)")
        return _status_of_store(Path(args.results_dir or "results"), args)
    grid = with_overrides(load_grid(args.grid), results_dir=args.results_dir, data_root=args.data_root,
                          cache_dir=args.cache_dir, retries=args.retries, leaderboard=args.leaderboard,
                          pixel_cache=False if getattr(args, "no_pixel_cache", False) else None,
                          executor_kind=args.executor, executor_parallel=args.parallel)
    if args.status:
        return _print_status(grid, args)
    if args.dry_run:
        return _dry_run(grid, args)
    return _run(grid, args)


def _run(grid: Grid, args: argparse.Namespace) -> int:
    from retbench.sweep.driver import expand_jobs, results_summary, run_sweep

    report = run_sweep(grid, overwrite=args.overwrite, wait=not args.no_wait, echo=lambda s: err.print(s, markup=False))
    counts = report.counts
    err.print(f"sweep '{grid.name}' in {report.elapsed_s:.0f} s: "
              + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "done")
              + f" ({len(report.statuses)} jobs, {report.submitted} submitted)")
    for st in report.statuses:
        if st.status == "failed":
            err.print(f"[red]failed[/red] {escape(st.key)}: {escape(st.note)}; {escape(_error_line(st))} — see {st.state_path}")
    if args.no_wait:
        err.print(f"check on it with: retbench sweep {args.grid} --status")
        return 0
    for protocol, table in results_summary(grid, expand_jobs(grid)).items():
        sys.stdout.write(f"\n## {protocol}\n\n{table}\n")
    for path in report.leaderboards:
        err.print(f"leaderboard: {path}")
    if grid.leaderboard and not report.leaderboards and not report.submitted:
        err.print(f"leaderboards in {grid.leaderboard} are up to date (nothing new was run)")
    elif not report.leaderboards:
        err.print(f"leaderboards: retbench leaderboard --results-dir {grid.results_root}")
    return 0 if report.complete else 1


def _error_line(st: JobStatus) -> str:
    """``Type: first line of the message`` of a job's last failure."""
    e = st.error or {}
    lines = f"{e.get('type', '')}: {e.get('message', '')}".strip(": ").splitlines()
    return lines[0] if lines else ""


def _print_status(grid: Grid, args: argparse.Namespace) -> int:
    from retbench.sweep.driver import sweep_status

    statuses = sweep_status(grid)
    if args.json:
        sys.stdout.write(json.dumps({"sweep": grid.name, "results_dir": str(grid.results_root),
                                     "counts": _counts(statuses), "jobs": [s.to_dict() for s in statuses]}, indent=1) + "\n")
        return 0
    _status_table(grid.name, grid.results_root, statuses, args.verbose)
    return 0


def _counts(statuses: list[JobStatus]) -> dict[str, int]:
    from retbench.sweep.state import STATUSES

    return {s: sum(st.status == s for st in statuses) for s in STATUSES}


def _status_table(name: str, root: Path, statuses: list[JobStatus], verbose: bool) -> None:
    colour = {"done": "green", "running": "cyan", "queued": "blue", "failed": "red", "pending": "yellow"}
    table = Table("status", "model", "task", "results", "note", title=f"sweep {name} — {root}")
    for st in statuses:
        n = len(st.done) + len(st.stale) + len(st.missing)
        results = f"{len(st.done)}/{n}" + (f" (+{len(st.not_applicable)} n/a)" if st.not_applicable else "")
        note = st.note
        if st.status == "failed":
            note = f"{note}; {_error_line(st)}"
        table.add_row(f"[{colour[st.status]}]{st.status}[/]", escape(st.model), escape(st.task), results, escape(note))
    out.print(table)
    counts = _counts(statuses)
    out.print(f"{len(statuses)} jobs: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    if verbose:
        for st in statuses:
            if st.status == "failed" and st.error:
                out.print(f"\n[red]{escape(st.key)}[/red] ({escape(str(st.state_path))}):")
                out.print(st.error.get("traceback") or st.error.get("message", ""), markup=False)


def _status_of_store(root: Path, args: argparse.Namespace) -> int:
    from retbench.sweep.driver import sweep_status
    from retbench.sweep.grid import load_grid, with_overrides
    from retbench.sweep.state import list_sweeps, sweep_dir

    root = root.expanduser().resolve()
    names = list_sweeps(root)
    if not names:
        err.print(f"no sweeps recorded in {root}")
        return 0
    report = {}
    for name in names:
        grid = with_overrides(load_grid(sweep_dir(root, name) / "grid.yaml"), results_dir=str(root))
        statuses = sweep_status(grid)
        if args.json:
            report[name] = {"counts": _counts(statuses), "jobs": [s.to_dict() for s in statuses]}
        else:
            _status_table(name, root, statuses, args.verbose)
    if args.json:
        sys.stdout.write(json.dumps({"results_dir": str(root), "sweeps": report}, indent=1) + "\n")
    return 0


def _dry_run(grid: Grid, args: argparse.Namespace) -> int:
    from retbench.sweep.driver import sweep_status
    from retbench.sweep.executors import executor_parameters, job_name, log_folder, sbatch_preview
    from retbench.sweep.grid import expand_jobs

    jobs = expand_jobs(grid)
    statuses = sweep_status(grid, jobs)
    todo = [j for j, st in zip(jobs, statuses) if st.needs_run or (args.overwrite and st.status == "done")]
    params = executor_parameters(grid.executor, job_name(grid))
    if args.json:
        sys.stdout.write(json.dumps({
            "sweep": grid.name, "results_dir": str(grid.results_root), "executor": grid.executor.kind,
            "executor_parameters": params, "log_folder": str(log_folder(grid)),
            "jobs": [{"job": j.key, "model": j.model, "weights": j.weights, "task": j.task_name, "protocols": list(j.protocols),
                      "not_applicable": dict(j.not_applicable), "status": st.status, "will_run": j in todo}
                     for j, st in zip(jobs, statuses)]}, indent=1) + "\n")
        return 0
    table = Table("#", "model", "task", "protocols", "status", title=f"sweep {grid.name}: {len(jobs)} jobs, {len(todo)} to run")
    for i, (j, st) in enumerate(zip(jobs, statuses), 1):
        protos = ", ".join(j.protocols) + "".join(f" [dim](n/a {p})[/dim]" for p, _ in j.not_applicable)
        table.add_row(str(i), j.model, j.task_name, protos, st.status + ("" if j in todo else " (skip)"))
    out.print(table)
    out.print(f"executor: {grid.executor.kind}; parameters: {params}; logs: {log_folder(grid)}")
    if grid.executor.kind == "slurm" and todo:
        preview = sbatch_preview(grid, len(todo))
        if preview:
            sys.stdout.write(f"\nsbatch script submitit would write:\n\n{preview}\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m retbench.sweep``: the same as ``retbench sweep``."""
    parser = argparse.ArgumentParser(prog="retbench sweep", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_sweep_arguments(parser)
    args = parser.parse_args(argv)
    try:
        with extra_task_folders(args.tasks_path):
            return cmd_sweep(args)
    except RetbenchError as exc:
        err.print(f"[red]error:[/red] {exc}")
        return 2
