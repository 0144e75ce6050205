"""The sweep driver: plan from the store, submit what is left, wait, retry failures, summarise.

The driver holds no state of its own: every decision is re-derived from the store (results
and their settings hashes, job locks, run records), so a driver killed at any moment is
resumed by running it again, from this machine or another one sharing the store.
"""

from __future__ import annotations

import os
import time
import traceback
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retbench.config import default_cache_dir
from retbench.sweep.executors import log_folder, make_executor
from retbench.sweep.grid import Grid, Job, expand_jobs
from retbench.sweep.state import (
    STATUSES,
    JobLock,
    JobStatus,
    Snapshot,
    host_id,
    job_state_path,
    job_status,
    lock_path,
    now_iso,
    read_json,
    result_snapshot,
    slurm_ids_in_flight,
    submit_record_path,
    sweep_dir,
    write_json,
)
from retbench.sweep.worker import JobSettings, SweepJob

Echo = Callable[[str], None]
MAX_ARRAY = 1000  # jobs per Slurm array


@dataclass
class SweepReport:
    """What a sweep did and where it stands."""

    grid: Grid
    statuses: list[JobStatus]
    submitted: int = 0
    elapsed_s: float = 0.0
    leaderboards: list[Path] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, int]:
        """Jobs per status (done, running, queued, failed, pending)."""
        return {s: sum(st.status == s for st in self.statuses) for s in STATUSES}

    @property
    def complete(self) -> bool:
        """Every job done."""
        return all(st.status == "done" for st in self.statuses)


def job_settings(grid: Grid) -> JobSettings:
    """The options every job of ``grid`` runs with, paths made absolute for other machines."""
    data_root = grid.data_root or os.environ.get("RETBENCH_DATA")
    env = dict(grid.env)
    if os.environ.get("RETBENCH_TASKS_PATH") and "RETBENCH_TASKS_PATH" not in env:
        env["RETBENCH_TASKS_PATH"] = os.environ["RETBENCH_TASKS_PATH"]
    return JobSettings(
        sweep=grid.name, results_dir=str(grid.results_root),
        data_root=str(Path(data_root).expanduser().resolve()) if data_root else None,
        cache_dir=str(Path(grid.cache_dir or default_cache_dir()).expanduser().resolve()),
        device=grid.device, batch_size=grid.batch_size, num_workers=grid.num_workers, seeds=grid.seeds,
        shots=grid.shots, skip_bad_images=grid.skip_bad_images, pixel_cache=grid.pixel_cache, lock_timeout_s=grid.lock_timeout_s,
        env=env)


def sweep_status(grid: Grid, jobs: list[Job] | None = None, overwrite: dict[str, Snapshot] | None = None,
                 ended_jobs: set[str] | frozenset[str] = frozenset()) -> list[JobStatus]:
    """Every job's status, read from the store (and ``squeue`` for Slurm submissions).

    ``overwrite``: per job key, result files that count as stale until rewritten (``--overwrite``).
    """
    jobs = expand_jobs(grid) if jobs is None else jobs
    root = grid.results_root
    live = slurm_ids_in_flight(root, grid.name, [j.key for j in jobs])
    overwrite = overwrite or {}
    return [job_status(j, grid.name, root, grid.max_attempts, grid.lock_timeout_s, overwrite.get(j.key), live, ended_jobs)
            for j in jobs]


def save_grid(grid: Grid) -> Path:
    """Keep the resolved grid in the store (``retbench sweep --status`` without a grid file reads it)."""
    path = sweep_dir(grid.results_root, grid.name) / "grid.yaml"
    data = grid.to_dict()
    data["results_dir"] = str(grid.results_root)
    if os.environ.get("RETBENCH_TASKS_PATH"):
        data["env"].setdefault("RETBENCH_TASKS_PATH", os.environ["RETBENCH_TASKS_PATH"])
    data["tasks"] = [str(Path(t).expanduser().resolve()) if t.endswith((".yaml", ".yml")) else t for t in grid.tasks]
    from retbench.atomic_files import atomic_write_bytes

    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())
    return path


def run_sweep(grid: Grid, *, overwrite: bool = False, wait: bool = True, echo: Echo = print) -> SweepReport:
    """Run every unfinished job of ``grid``; failed jobs are retried up to ``grid.retries`` times.

    With ``wait=False`` (Slurm), jobs are submitted and the call returns; run it again (or
    ``--status``) later. ``overwrite`` recomputes the results that exist when the call starts, once each.
    """
    start = time.time()
    jobs = expand_jobs(grid)
    snapshot = {j.key: result_snapshot(j, grid.results_root) for j in jobs} if overwrite else {}
    save_grid(grid)
    settings = job_settings(grid)
    executor = make_executor(grid)
    echo(f"sweep '{grid.name}': {len(jobs)} jobs ({grid.executor.kind} executor), store {grid.results_root}")
    submitted, last_message = 0, ""
    ended: set[str] = set()
    base: dict[str, int] | None = None  # failures before this run: each run gives a job 1 + retries attempts
    rounds_left = grid.max_attempts * max(1, len(jobs)) + 5  # submission rounds (a guard: each one makes progress)
    while True:
        statuses = sweep_status(grid, jobs, snapshot, ended)
        if base is None:
            base = {st.key: st.failures for st in statuses}
        todo = [job for job, st in zip(jobs, statuses)
                if st.status == "pending" or (st.status == "failed" and st.failures - base[st.key] < grid.max_attempts)]
        if todo and rounds_left > 0:
            rounds_left -= 1
            if submitted == 0:
                counts = {s: sum(st.status == s for st in statuses) for s in STATUSES}
                echo("to run: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n and s != "done")
                     + f" ({counts['done']} done already)")
            submitted += len(todo)
            ended |= _schedule(grid, executor, todo, settings, snapshot, wait, echo)
            if not wait:
                break
            continue
        waiting = [st for st in statuses if st.status in ("running", "queued")]
        if not waiting or not wait:
            break
        message = (f"waiting for {len(waiting)} job(s) running elsewhere or queued earlier: "
                   + ", ".join(st.key for st in waiting[:5]) + (" ..." if len(waiting) > 5 else ""))
        if message != last_message:
            echo(message)
            last_message = message
        time.sleep(max(grid.executor.poll_interval, 1.0))
    report = SweepReport(grid, sweep_status(grid, jobs, snapshot, ended), submitted, time.time() - start)
    board_dir = Path(grid.leaderboard) if grid.leaderboard else None
    if board_dir is not None and wait and (submitted or not (board_dir / "README.md").exists()):
        from retbench.leaderboard import write_leaderboards

        report.leaderboards = write_leaderboards(grid.results_root, board_dir)
    return report


def _schedule(grid: Grid, executor: Any, todo: list[Job], settings: JobSettings, snapshot: dict[str, Snapshot],
              wait: bool, echo: Echo) -> set[str]:
    """Submit ``todo`` (at most ``parallel`` at once for local/debug; one array for Slurm) and wait for it.

    Returns the submitit ids of the jobs that ended.
    """
    kind = grid.executor.kind
    ended: set[str] = set()
    if kind == "slurm":
        handles = []
        for i in range(0, len(todo), MAX_ARRAY):  # Slurm's MaxArraySize is 1001 by default
            with executor.batch():
                handles += [executor.submit(SweepJob(job, settings, snapshot.get(job.key))) for job in todo[i:i + MAX_ARRAY]]
        for job, handle in zip(todo, handles):
            _record_submission(grid, job, str(handle.job_id))
        echo(f"submitted {len(todo)} job(s) to Slurm: {_id_range([str(h.job_id) for h in handles])}")
        if not wait:
            return ended
        pending = dict(zip([j.key for j in todo], zip(todo, handles)))
        while pending:
            time.sleep(grid.executor.poll_interval)
            for key, (job, handle) in list(pending.items()):
                if handle.done():
                    ended.add(_finish(grid, job, handle, echo))
                    del pending[key]
        return ended
    queue = deque(todo)
    running: dict[str, tuple[Job, Any]] = {}
    limit = 1 if kind == "debug" else max(1, grid.executor.parallel)
    while queue or running:
        while queue and len(running) < limit:
            job = queue.popleft()
            handle = executor.submit(SweepJob(job, settings, snapshot.get(job.key)))
            if kind == "local":
                handle._results_timeout_s = 1  # a crashed child leaves no result file: do not wait 15 s for it
            _record_submission(grid, job, str(handle.job_id))
            running[job.key] = (job, handle)
        finished = False
        for key, (job, handle) in list(running.items()):
            if kind == "debug" or handle.done():
                ended.add(_finish(grid, job, handle, echo))
                del running[key]
                finished = True
        if running and not finished:
            time.sleep(min(grid.executor.poll_interval, 0.5))
    return ended


def _record_submission(grid: Grid, job: Job, submitit_id: str) -> None:
    write_json(submit_record_path(grid.results_root, grid.name, job.key),
               {"at": now_iso(), "executor": grid.executor.kind, "host": host_id(), "driver_pid": os.getpid(),
                "submitit_job": submitit_id, "logs": str(log_folder(grid) / submitit_id)})


def _finish(grid: Grid, job: Job, handle: Any, echo: Echo) -> str:
    """Collect one ended job's outcome (recording a crash the job could not record itself)."""
    jid = str(handle.job_id)
    try:
        outcome = handle.result()
    except Exception as exc:  # noqa: BLE001 - the job process died (killed, out of memory, node failure...)
        outcome = {"outcome": "crashed", "error": _first_line(str(exc))}
        _record_crash(grid, job, jid, exc)
    path = submit_record_path(grid.results_root, grid.name, job.key)
    sub = read_json(path)
    if sub is not None and sub.get("submitit_job") == jid:
        write_json(path, {**sub, "ended": now_iso()})
    echo(_outcome_line(job, outcome if isinstance(outcome, dict) else {"outcome": "done"}, grid))
    return jid


def _record_crash(grid: Grid, job: Job, submitit_id: str, exc: BaseException) -> None:
    """Count a crash as a failed attempt, under the job lock (the crashed job's own lock counts as stale)."""
    lock = JobLock(lock_path(grid.results_root, job.key), {"sweep": grid.name, "job": job.key, "role": "driver"},
                   timeout_s=grid.lock_timeout_s)
    if not lock.acquire(ended_jobs={submitit_id}):
        return  # someone else runs the job now
    try:
        path = job_state_path(grid.results_root, grid.name, job.key)
        state = read_json(path) or {"job": job.key, "sweep": grid.name, "model": job.model, "task": job.task_name,
                                    "failures": 0, "runs": []}
        runs = state.setdefault("runs", [])
        if runs and runs[-1].get("submitit_job") == submitit_id and runs[-1].get("outcome") in ("running", "requeued"):
            run = runs[-1]
        else:
            run = {"run": len(runs) + 1, "submitit_job": submitit_id, "executor": grid.executor.kind, "written": []}
            runs.append(run)
        error = {"type": type(exc).__name__, "message": str(exc), "traceback": "".join(traceback.format_exception(exc)),
                 "run": run["run"], "when": now_iso()}
        run.update(outcome="crashed", ended=now_iso(), error=error)
        state["failures"] = int(state.get("failures", 0)) + 1
        state["error"] = error
        state["status"] = "failed"
        state["updated"] = now_iso()
        write_json(path, state)
    finally:
        lock.release()


def _first_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else ""


def _outcome_line(job: Job, outcome: dict[str, Any], grid: Grid) -> str:
    what = f"{job.model} × {job.task_name}"
    kind = outcome.get("outcome")
    if kind == "done":
        parts = [f"{len(outcome.get('written', []))} written"]
        if outcome.get("kept"):
            parts.append(f"{len(outcome['kept'])} kept")
        if job.not_applicable:
            parts.append(f"{len(job.not_applicable)} n/a")
        return f"done     {what}: {', '.join(parts)} ({outcome.get('seconds', 0):.1f} s)"
    if kind == "busy":
        holder = outcome.get("holder", {})
        return f"busy     {what}: run by {str(holder.get('host', '?')).split('/pidns')[0]} pid {holder.get('pid', '?')}"
    failures = outcome.get("failures")
    tries = f" (failed attempts: {failures})" if failures else ""
    return f"{'FAILED' if kind == 'failed' else 'CRASHED'}  {what}{tries}: {outcome.get('error', '')}"


def _id_range(ids: list[str]) -> str:
    if len(ids) > 3:
        return f"{ids[0]} … {ids[-1]}"
    return ", ".join(ids)


# ----------------------------------------------------------------------------------------------------------------------
# Summary


def results_summary(grid: Grid, jobs: list[Job]) -> dict[str, str]:
    """Per protocol, a markdown table of the sweep's results: models × tasks, primary metric mean (95% CI), and the mean."""
    import pandas as pd
    from tabulate import tabulate

    from retbench.store import results_table

    if not grid.results_root.is_dir():
        return {}
    frame = results_table(grid.results_root)
    if frame.empty:
        return {}
    frame = frame[frame["model"].isin({j.model for j in jobs}) & frame["task"].isin({j.task_name for j in jobs})]
    tables = {}
    for protocol in sorted(frame["protocol"].unique()):
        sub = frame[frame["protocol"] == protocol]
        tasks = sorted(sub["task"].unique())
        metric_of = {r["task"]: r["primary_metric"] + (f", k={int(r['k'])}" if pd.notna(r.get("k")) else "")
                     for r in sub.to_dict("records")}
        rows = []
        for model in sorted(sub["model"].unique()):
            cells, values = [f"`{model}`"], []
            for task in tasks:
                hit = sub[(sub["model"] == model) & (sub["task"] == task)]
                if hit.empty:
                    cells.append("–")
                    continue
                r = hit.iloc[0].to_dict()
                low, high = r.get(f"{r['primary_metric']}_ci_low"), r.get(f"{r['primary_metric']}_ci_high")
                ci = f" ({low:.3f}–{high:.3f})" if low is not None and pd.notna(low) else ""
                cells.append(f"{r['primary']:.3f}{ci}")
                values.append(r["primary"])
            cells.append(f"{sum(values) / len(values):.3f}" if len(values) == len(tasks) else "–")
            rows.append(cells)
        header = ["model"] + [f"{t} ({metric_of[t]})" for t in tasks] + ["mean"]
        tables[protocol] = tabulate(rows, headers=header, tablefmt="github", disable_numparse=True) + _ci_note(sub)
    return tables


def _ci_note(sub: Any) -> str:
    """The line under a summary table that says what each task's CIs resampled (their replication unit)."""
    units = {task: " / ".join(sorted(set(group["primary_ci_over"]) - {""}))
             for task, group in sub.groupby("task", sort=True)}
    units = {task: unit for task, unit in units.items() if unit}
    if not units:
        return ""
    return ("\n\n95% CIs in parentheses: percentile bootstrap over "
            + "; ".join(f"{task}: {unit}" for task, unit in units.items()) + ". The mean has no CI here.")


def state_files(grid: Grid, jobs: list[Job]) -> list[Path]:
    """The run records that exist for ``jobs``."""
    return [p for j in jobs if (p := job_state_path(grid.results_root, grid.name, j.key)).exists()]
