"""What runs inside each job (in process, in a local process, or on a Slurm node).

:class:`SweepJob` is a ``submitit.helpers.Checkpointable`` callable: on preemption (or a time
limit) submitit calls :meth:`SweepJob.checkpoint`, which records the interruption, releases
the job lock and returns the job itself for requeueing. The requeued run works out again
what is left (results already written with the grid's settings are kept) and continues.
"""

from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import submitit

from retbench.sweep.grid import Job
from retbench.sweep.state import (
    JobLock,
    Snapshot,
    current_submitit_job,
    host_id,
    job_state_path,
    lock_path,
    now_iso,
    read_json,
    result_progress,
    write_json,
)


@dataclass(frozen=True)
class JobSettings:
    """Run options shared by every job of a sweep (absolute paths: jobs may run on other machines)."""

    sweep: str
    results_dir: str
    data_root: str | None
    cache_dir: str
    device: str = "auto"
    batch_size: int | None = None
    num_workers: int | None = None
    seeds: int | None = None
    shots: tuple[int, ...] | None = None
    skip_bad_images: bool = False
    pixel_cache: bool = True
    lock_timeout_s: float = 600.0
    env: dict[str, str] = field(default_factory=dict)


class SweepJob(submitit.helpers.Checkpointable):
    """One (model, task) of a sweep: claims the job lock, runs what is left, records the outcome."""

    def __init__(self, job: Job, settings: JobSettings, overwrite: Snapshot | None = None) -> None:
        self.job = job
        self.settings = settings
        self.overwrite = overwrite or {}  # --overwrite: these result files (by identity) are recomputed
        self._lock: JobLock | None = None
        self._run: dict[str, Any] | None = None
        self._state: dict[str, Any] | None = None
        self._executor: str | None = None
        self._preempted = False  # checkpoint() ran: this process was told to leave (requeued)

    def __getstate__(self) -> dict[str, Any]:
        # the lock (with its heartbeat thread) and the live state belong to one process only
        return {"job": self.job, "settings": self.settings, "overwrite": self.overwrite}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # re-running __init__ on an unpickled instance is deliberate (mypy calls __init__ on an instance unsound)
        self.__init__(state["job"], state["settings"], state.get("overwrite"))  # type: ignore[misc]

    @property
    def results_root(self) -> Path:
        """The shared result store."""
        return Path(self.settings.results_dir)

    @property
    def state_path(self) -> Path:
        """This job's run record in the sweep."""
        return job_state_path(self.results_root, self.settings.sweep, self.job.key)

    def __call__(self) -> dict[str, Any]:
        """Run the job; returns ``{"outcome": done | failed | busy, ...}`` and never raises for job errors."""
        os.environ.update(self.settings.env)
        submitit_job, executor = current_submitit_job()
        self._executor = executor
        lock = JobLock(lock_path(self.results_root, self.job.key),
                       {"sweep": self.settings.sweep, "job": self.job.key, "submitit_job": submitit_job},
                       timeout_s=self.settings.lock_timeout_s)
        self._lock = lock  # set before acquiring: a preemption signal at any point releases it
        try:
            if not lock.acquire():
                from retbench.sweep.state import read_lock

                info = read_lock(lock.path)
                return {"outcome": "busy", "job": self.job.key, "holder": info.holder if info else {}}
            return self._run_locked(lock, submitit_job, executor)
        finally:
            lock.release()
            self._lock = None

    def _run_locked(self, lock: JobLock, submitit_job: str | None, executor: str | None) -> dict[str, Any]:
        start = time.perf_counter()
        state = read_json(self.state_path) or {"job": self.job.key, "sweep": self.settings.sweep, "model": self.job.model,
                                               "task": self.job.task_name, "failures": 0, "runs": []}
        run = {"run": len(state["runs"]) + 1, "started": now_iso(), "host": host_id(), "pid": os.getpid(),
               "submitit_job": submitit_job, "executor": executor, "outcome": "running", "written": [], "kept": []}
        if lock.took_over is not None:
            run["took_over"] = {k: lock.took_over.get(k) for k in ("host", "pid", "submitit_job", "since")}
        state["runs"].append(run)
        self._state, self._run = state, run
        self._save("running")
        try:
            _remove_orphan_temp_files(self.job, self.results_root)
            done, stale, missing = result_progress(self.job, self.results_root, self.overwrite)
            run["kept"] = done
            todo = [p for p in self.job.protocols if p in stale or p in missing]
            if todo:
                self._evaluate(todo, run)
            done, stale, missing = result_progress(self.job, self.results_root, self.overwrite)
            if stale or missing:
                raise RuntimeError(f"after running, results still missing or from other settings: "
                                   f"{', '.join(stale + missing)}")
            run["seconds"] = round(time.perf_counter() - start, 2)
            if lock.lost:
                run["warning"] = "the job lock was taken over while running (raise lock_timeout_s)"
            state.pop("error", None)  # the last failure's details stay in its run record
            self._save("done", outcome="done")
            return {"outcome": "done", "job": self.job.key, "written": run["written"], "kept": run["kept"],
                    "seconds": run["seconds"]}
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, then retried by the driver
            state["failures"] = int(state.get("failures", 0)) + 1
            error = {"type": type(exc).__name__, "message": str(exc), "traceback": traceback.format_exc(),
                     "run": run["run"], "when": now_iso()}
            state["error"] = error
            run["error"] = error
            run["seconds"] = round(time.perf_counter() - start, 2)
            self._save("failed", outcome="failed")
            return {"outcome": "failed", "job": self.job.key, "error": f"{error['type']}: {error['message']}",
                    "failures": state["failures"]}

    def _evaluate(self, protocols: list[str], run: dict[str, Any]) -> None:
        from retbench.config import RunConfig
        from retbench.runner import Result
        from retbench.runner import run as run_config

        s = self.settings
        config = RunConfig(models=(self.job.model,), tasks=(self.job.task,), protocols=tuple(protocols),
                           data_root=s.data_root, results_dir=s.results_dir, cache_dir=s.cache_dir, device=s.device,
                           weights=self.job.weights, batch_size=s.batch_size, num_workers=s.num_workers,
                           overwrite=True, skip_bad_images=s.skip_bad_images, shots=s.shots, seeds=s.seeds,
                           pixel_cache=s.pixel_cache)

        def on_result(result: Result) -> None:
            if result.status == "done":
                run["written"].append(result.data["protocol"]["name"])
            elif result.status == "skipped":
                run.setdefault("skipped", []).append(result.reason)
            self._save("running")

        run_config(config, on_result=on_result)

    def _save(self, status: str, outcome: str | None = None) -> None:
        assert self._state is not None and self._run is not None
        if status != "requeued":
            self._leave_if_preempted()  # never write over the "requeued" that checkpoint() recorded
        self._state["status"] = status
        self._state["updated"] = now_iso()
        if outcome:
            self._run["outcome"] = outcome
            self._run["ended"] = self._state["updated"]
        write_json(self.state_path, self._state)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Preemption or time limit: record it, free the lock, and requeue this job (it resumes from the store)."""
        self._preempted = True
        if self._state is not None and self._run is not None:
            self._save("requeued", outcome="requeued")
        if self._lock is not None:
            self._lock.release()
        return super().checkpoint(*args, **kwargs)

    def _leave_if_preempted(self) -> None:
        """Exit as submitit's signal handler did after :meth:`checkpoint`, if this process is still running.

        The handler ends the process by raising ``SystemExit`` from wherever the main thread was; CPython can lose
        that exception when the signal lands inside a C call (seen: ``compile()`` while importing a module), and
        the job would then run on and record "done" over its "requeued". Called by every state write after it.
        """
        if self._preempted:
            from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

            raise SystemExit(LOCAL_REQUEUE_RETURN_CODE if self._executor == "local" else -1)


def _remove_orphan_temp_files(job: Job, results_root: Path, min_age_s: float = 60.0) -> None:
    """Delete temporary files a killed writer of this job's results left behind (we hold the job lock)."""
    for protocol in job.protocols:
        target = job.result_path(results_root, protocol)
        if not target.parent.is_dir():
            continue
        for tmp in target.parent.glob(f".{target.name}.*.tmp"):
            try:
                if time.time() - tmp.stat().st_mtime > min_age_s:
                    tmp.unlink()
            except FileNotFoundError:
                pass
