"""Sweep state kept in the result store, so that any machine sharing it sees the same picture.

Layout under ``<results>/.sweep/`` (every file written atomically, or created with ``O_EXCL``)::

    .locks/<job>.lock              who runs (model, task) now: host, pid, submitit job id; heartbeat = mtime
    <sweep>/grid.yaml              the grid as resolved when the sweep last started
    <sweep>/jobs/<job>.json        the job's runs: outcome, results written, failures with their traceback
    <sweep>/jobs/<job>.submit.json when and where the driver last submitted it (Slurm job id)

Locks are per (model, task), not per sweep: two sweeps writing one store never run the same
job at once. A lock is created atomically (hard link of a complete temporary file), refreshed
by a heartbeat thread, and taken over only when stale: its process is gone (same host), its
submitit job has ended, or its heartbeat is older than the grid's ``lock_timeout_s``. Nothing
here lives at ``<results>/*/*/*.json`` depth, where the store looks for results.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Collection
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from retbench.atomic_files import atomic_write_json

if TYPE_CHECKING:
    from retbench.sweep.grid import Job

STATE_DIR = ".sweep"
LOCKS = ".locks"


def now_iso() -> str:
    """UTC time, seconds resolution, ISO 8601."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def parse_iso(value: str | None) -> float | None:
    """POSIX seconds of an ISO time written by :func:`now_iso` (``None`` stays ``None``)."""
    if not value:
        return None
    try:
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        return None


def sweep_dir(results_root: Path, sweep: str) -> Path:
    """Folder of one sweep's state."""
    return results_root / STATE_DIR / sweep


def job_state_path(results_root: Path, sweep: str, key: str) -> Path:
    """The job's run record in ``sweep``."""
    return sweep_dir(results_root, sweep) / "jobs" / f"{key}.json"


def submit_record_path(results_root: Path, sweep: str, key: str) -> Path:
    """The driver's last submission of the job in ``sweep``."""
    return sweep_dir(results_root, sweep) / "jobs" / f"{key}.submit.json"


def lock_path(results_root: Path, key: str) -> Path:
    """The store-wide lock of one (model, task)."""
    return results_root / STATE_DIR / LOCKS / f"{key}.lock"


def list_sweeps(results_root: Path) -> list[str]:
    """Sweeps recorded in a store (those with a saved grid)."""
    root = results_root / STATE_DIR
    if not root.is_dir():
        return []
    return sorted(p.parent.name for p in root.glob("*/grid.yaml") if not p.parent.name.startswith("."))


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON file, or ``None`` when absent or unreadable (state files are rewritten atomically)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Atomic JSON write (readers see the old or the new file)."""
    atomic_write_json(path, data)


# ----------------------------------------------------------------------------------------------------------------------
# Process identity


def host_id() -> str:
    """This machine and PID namespace: two PIDs are comparable only under the same host id."""
    host = socket.gethostname()
    try:
        return f"{host}/pidns:{os.stat('/proc/self/ns/pid').st_ino}"
    except OSError:
        return host


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (on this host)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not alive
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def current_submitit_job() -> tuple[str | None, str | None]:
    """(job id, executor) of the submitit job running this code, or (None, None) outside one."""
    try:
        import submitit

        env = submitit.JobEnvironment()
        return str(env.job_id), env.cluster
    except Exception:  # noqa: BLE001 - not inside a submitit job
        return None, None


# ----------------------------------------------------------------------------------------------------------------------
# Locks


@dataclass
class LockInfo:
    """What a lock file says about its holder."""

    path: Path
    holder: dict[str, Any]
    age_s: float  # seconds since the last heartbeat

    def describe(self) -> str:
        """``host pid N, job J, 12 s ago``."""
        h = self.holder
        parts = [str(h.get("host", "?")).split("/pidns")[0], f"pid {h.get('pid', '?')}"]
        if h.get("submitit_job"):
            parts.append(f"job {h['submitit_job']}")
        return ", ".join(parts) + f", heartbeat {self.age_s:.0f} s ago"


def read_lock(path: Path) -> LockInfo | None:
    """The lock's holder and heartbeat age, or ``None`` when unlocked."""
    try:
        st = path.stat()
        holder = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        try:
            st = path.stat()
        except FileNotFoundError:
            return None
        holder = {}
    return LockInfo(path, holder if isinstance(holder, dict) else {}, max(0.0, time.time() - st.st_mtime))


def lock_is_stale(info: LockInfo, timeout_s: float, ended_jobs: Collection[str] = ()) -> bool:
    """A lock whose process is gone (same host), whose submitit job has ended, or whose heartbeat stopped."""
    h = info.holder
    if h.get("host") == host_id() and isinstance(h.get("pid"), int) and not pid_alive(h["pid"]):
        return True
    if h.get("submitit_job") and str(h["submitit_job"]) in ended_jobs:
        return True
    return info.age_s > timeout_s


def lock_is_live(path: Path, timeout_s: float, ended_jobs: Collection[str] = ()) -> LockInfo | None:
    """The lock's info when someone holds it now, else ``None``."""
    info = read_lock(path)
    return info if info is not None and not lock_is_stale(info, timeout_s, ended_jobs) else None


class JobLock:
    """An exclusive, heart-beating lock file on a shared file system (see the module docstring)."""

    def __init__(self, path: Path, owner: dict[str, Any], timeout_s: float = 600.0, heartbeat_s: float | None = None) -> None:
        self.path = path
        self.timeout_s = timeout_s
        self.heartbeat_s = heartbeat_s if heartbeat_s is not None else max(1.0, min(30.0, timeout_s / 4))
        self.token = uuid.uuid4().hex
        self.owner = {**owner, "host": host_id(), "pid": os.getpid(), "token": self.token, "since": now_iso()}
        self.held = False
        self.lost = False  # set when someone took the lock over while we held it
        self.took_over: dict[str, Any] | None = None  # holder of the stale lock we replaced
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, ended_jobs: Collection[str] = ()) -> bool:
        """Take the lock (replacing a stale one); ``False`` when someone else holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self.held = True
                self._start_heartbeat()
                return True
            info = read_lock(self.path)
            if info is None:
                continue  # released meanwhile: try again
            if not lock_is_stale(info, self.timeout_s, ended_jobs):
                return False
            if self._break(info, ended_jobs):
                self.took_over = info.holder or {"unreadable": True}
        return False

    def _create(self) -> bool:
        """Atomically create the lock with its full content: link a complete temporary file to the lock name."""
        tmp = self.path.with_name(f".{self.path.name}.{self.token}.tmp")
        tmp.write_text(json.dumps(self.owner, sort_keys=True), encoding="utf-8")
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # NFS may report an error although the link was made: trust the link count
            return tmp.stat().st_nlink == 2
        finally:
            tmp.unlink(missing_ok=True)

    def _break(self, stale: LockInfo, ended_jobs: Collection[str]) -> bool:
        """Remove a stale lock, serialised by a short-lived ``.steal`` file so that only one process does it."""
        steal = self.path.with_name(self.path.name + ".steal")
        try:
            fd = os.open(steal, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:  # a stealer that died between create and unlink: its file is tiny and old
                if time.time() - steal.stat().st_mtime > 60:
                    steal.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
            return False
        os.close(fd)
        try:
            again = read_lock(self.path)
            if again is None:
                return False
            same = again.holder.get("token") == stale.holder.get("token")
            if same and lock_is_stale(again, self.timeout_s, ended_jobs):
                self.path.unlink(missing_ok=True)
                return True
            return False
        finally:
            steal.unlink(missing_ok=True)

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name=f"retbench-lock-{self.path.stem}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self._still_mine():
                self.lost = True
                return
            try:
                os.utime(self.path)
            except FileNotFoundError:
                self.lost = True
                return
            except OSError:
                pass

    def _still_mine(self) -> bool:
        info = read_lock(self.path)
        return info is not None and info.holder.get("token") == self.token

    def release(self) -> None:
        """Give the lock back (only if it is still ours); idempotent."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if self.held and self._still_mine():
            self.path.unlink(missing_ok=True)
        self.held = False

    def __enter__(self) -> JobLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


# ----------------------------------------------------------------------------------------------------------------------
# Slurm queue


def slurm_queued(job_ids: Collection[str]) -> set[str] | None:
    """Which of these Slurm job ids (``123`` or array tasks ``123_4``) are still pending or running.

    ``None`` when ``squeue`` is unavailable or fails (the caller then cannot tell).
    """
    if not job_ids:
        return set()
    if shutil.which("squeue") is None:
        return None
    bases = sorted({j.split("_")[0] for j in job_ids})
    try:
        proc = subprocess.run(["squeue", "--noheader", "--array", "--format=%i", f"--jobs={','.join(bases)}"],
                              capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        # squeue exits 1 with "Invalid job id specified" once every listed job has left the queue
        return set() if "Invalid job id" in proc.stderr else None
    listed = {line.strip() for line in proc.stdout.splitlines() if line.strip()}
    return {j for j in job_ids if j in listed}


# ----------------------------------------------------------------------------------------------------------------------
# Status


STATUSES = ("done", "running", "queued", "failed", "pending")


@dataclass
class JobStatus:
    """Where one job stands, from the store alone."""

    key: str
    model: str
    task: str
    status: str  # done | running | queued | failed | pending
    done: list[str] = field(default_factory=list)  # protocols with a matching result
    stale: list[str] = field(default_factory=list)  # present, but from other settings (or not yet rewritten by --overwrite)
    missing: list[str] = field(default_factory=list)
    not_applicable: list[tuple[str, str]] = field(default_factory=list)
    failures: int = 0  # failed attempts over all runs of the sweep
    max_attempts: int = 1
    note: str = ""
    error: dict[str, Any] | None = None
    lock: LockInfo | None = None
    state_path: Path | None = None

    @property
    def needs_run(self) -> bool:
        """What a new sweep run starts: pending and failed jobs."""
        return self.status in ("pending", "failed")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (``retbench sweep --status --json``)."""
        return {"job": self.key, "model": self.model, "task": self.task, "status": self.status, "done": self.done,
                "stale": self.stale, "missing": self.missing, "not_applicable": dict(self.not_applicable),
                "failures": self.failures, "max_attempts": self.max_attempts,
                "note": self.note, "error": self.error, "state": str(self.state_path) if self.state_path else None,
                "lock": self.lock.holder if self.lock else None}


Snapshot = dict[str, tuple[int, int, int]]  # protocol → (inode, mtime_ns, size) of its result file


_HASH_CACHE: dict[tuple[str, int, int, int], str] = {}


def file_identity(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime_ns, size): changes whenever the file is replaced (atomic writes rename a new inode in)."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def stored_hash(path: Path) -> str | None:
    """Settings hash of a stored result, cached by file identity; ``None`` when absent."""
    ident = file_identity(path)
    if ident is None:
        return None
    key = (str(path), *ident)
    if key not in _HASH_CACHE:
        from retbench.sweep.grid import result_hash

        try:
            _HASH_CACHE[key] = result_hash(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:  # replaced or removed since the stat: look again next time
            return stored_hash(path) if path.exists() else None
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            _HASH_CACHE[key] = "unreadable"  # counts as stale: the job rewrites it
    return _HASH_CACHE[key]


def result_snapshot(job: Job, results_root: Path) -> Snapshot:
    """Identity of the job's existing results (``--overwrite`` recomputes exactly these files)."""
    out = {}
    for protocol in job.protocols:
        ident = file_identity(job.result_path(results_root, protocol))
        if ident is not None:
            out[protocol] = ident
    return out


def result_progress(job: Job, results_root: Path, overwrite: Snapshot | None = None) -> tuple[list[str], list[str], list[str]]:
    """(done, stale, missing) protocols of a job.

    Stale: a result with another settings hash, or one still identical to the ``overwrite`` snapshot
    (a file not rewritten since ``--overwrite`` asked for it; no clocks are compared).
    """
    done, stale, missing = [], [], []
    for protocol in job.protocols:
        path = job.result_path(results_root, protocol)
        h = stored_hash(path)
        if h is None:
            missing.append(protocol)
        elif h != job.expected_hash(protocol) or (overwrite and overwrite.get(protocol) == file_identity(path)):
            stale.append(protocol)
        else:
            done.append(protocol)
    return done, stale, missing


def job_status(job: Job, sweep: str, results_root: Path, max_attempts: int, lock_timeout_s: float,
               overwrite: Snapshot | None = None, slurm_live: set[str] | None = None,
               ended_jobs: Collection[str] = ()) -> JobStatus:
    """Classify one job as done, running, queued, failed or pending (see :data:`STATUSES`)."""
    done, stale, missing = result_progress(job, results_root, overwrite)
    state_path = job_state_path(results_root, sweep, job.key)
    st = JobStatus(job.key, job.model, job.task_name, "pending", done, stale, missing, list(job.not_applicable),
                   max_attempts=max_attempts, state_path=state_path)
    state = read_json(state_path) or {}
    st.failures = int(state.get("failures", 0))
    st.error = state.get("error")
    if not stale and not missing:
        st.status = "done"
        return st
    sub = read_json(submit_record_path(results_root, sweep, job.key)) or {}
    if slurm_live is not None and sub.get("executor") == "slurm" and sub.get("submitit_job") not in slurm_live:
        ended_jobs = {*ended_jobs, str(sub.get("submitit_job"))}  # gone from the queue: its lock cannot be live
    lock = lock_is_live(lock_path(results_root, job.key), lock_timeout_s, ended_jobs)
    if lock is not None:
        st.status, st.lock = "running", lock
        st.note = f"{len(done)}/{len(job.protocols)} results; " + lock.describe()
        return st
    if _still_queued(sub, state, slurm_live):
        st.status = "queued"
        st.note = f"submitted {sub.get('at', '?')} ({sub.get('executor', '?')}" + (
            f" job {sub['submitit_job']})" if sub.get("submitit_job") else ")")
        return st
    if state.get("status") == "failed":
        st.status = "failed"
        st.note = f"{st.failures} failed attempt{'s' if st.failures != 1 else ''} (a sweep run makes up to {max_attempts})"
        return st
    if state.get("status") in ("running", "requeued"):
        last = (state.get("runs") or [{}])[-1]
        st.note = f"interrupted: run {len(state.get('runs', []))} on {str(last.get('host', '?')).split('/pidns')[0]} " \
                  f"(pid {last.get('pid', '?')}) stopped without finishing"
    elif stale:
        st.note = f"results from other settings: {', '.join(stale)}"
    return st


def _still_queued(sub: dict[str, Any], state: dict[str, Any], slurm_live: set[str] | None) -> bool:
    """A submission newer than the job's last run that has not started yet (and can still start)."""
    if not sub or sub.get("ended"):
        return False
    submitted = parse_iso(sub.get("at")) or 0
    last_run = parse_iso(state.get("updated")) or 0
    if state.get("status") != "requeued" and last_run >= submitted:
        return False
    if sub.get("executor") == "slurm":
        jid = sub.get("submitit_job") or ""
        return slurm_live is not None and jid in slurm_live
    # debug/local jobs live as long as their driver does (local jobs are its child processes)
    return sub.get("host") == host_id() and pid_alive(int(sub.get("driver_pid", -1)))


def slurm_ids_in_flight(results_root: Path, sweep: str, keys: Collection[str]) -> set[str] | None:
    """Slurm job ids of this sweep's submissions that are still in the queue (``None``: cannot tell)."""
    ids = set()
    for key in keys:
        sub = read_json(submit_record_path(results_root, sweep, key)) or {}
        if sub.get("executor") == "slurm" and sub.get("submitit_job"):
            ids.add(str(sub["submitit_job"]))
    return slurm_queued(ids) if ids else set()
