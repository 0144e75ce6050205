"""Sweep grids: a YAML file naming models, tasks, protocols, seeds and how to run them.

A grid expands into :class:`Job` objects, one per (model, task): a job runs every protocol
of the grid that applies to the task, so the model's features for that task are extracted
once (and cached) and reused by every protocol and seed. Each result a job writes is
identified by a *settings hash* (model, weights, task spec hash, protocol and the options
that change the numbers: seeds, shots, bad-image handling); an existing result counts as
finished only when its hash matches the grid's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import hashlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retbench.errors import RetbenchError

EXECUTOR_KINDS = ("debug", "local", "slurm")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


@dataclass(frozen=True)
class ModelEntry:
    """One model of a grid and, optionally, its checkpoint (``--weights``)."""

    name: str
    weights: str | None = None


@dataclass(frozen=True)
class ExecutorSettings:
    """Where and how jobs run: in process (``debug``), local processes, or Slurm through submitit."""

    kind: str = "local"
    parallel: int = 1  # local: processes at once; slurm: array parallelism (jobs running at once)
    timeout_min: int = 240
    gpus: int = 0  # per job (gpus_per_node)
    cpus: int | None = None  # per job (cpus_per_task)
    mem_gb: float | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    job_name: str | None = None  # default: retbench-<sweep name>
    setup: tuple[str, ...] = ()  # shell lines run before each Slurm job (module load ..., conda activate ...)
    sbatch: dict[str, Any] = field(default_factory=dict)  # extra sbatch options, e.g. {mail-type: END, exclude: node7}
    max_requeues: int = 3  # Slurm timeouts survived by requeueing (submitit's max_num_timeout); preemptions do not count
    signal_delay_s: int | None = None  # seconds between Slurm's warning signal and the kill (submitit default 90)
    log_dir: str | None = None  # submitit logs and pickles (default: <results>/.sweep/<name>/submitit)
    poll_s: float | None = None  # how often the driver checks on jobs (default: 1 s local/debug, 30 s slurm)

    @property
    def poll_interval(self) -> float:
        """Seconds between checks on running jobs."""
        return self.poll_s if self.poll_s is not None else (30.0 if self.kind == "slurm" else 1.0)


@dataclass(frozen=True)
class Grid:
    """A validated sweep grid (see ``examples/sweeps/``)."""

    name: str
    models: tuple[ModelEntry, ...]
    tasks: tuple[str, ...]
    protocols: tuple[str, ...] = ()
    seeds: int | None = None
    shots: tuple[int, ...] | None = None
    data_root: str | None = None
    results_dir: str = "results"
    cache_dir: str = ""
    device: str = "auto"
    batch_size: int | None = None
    num_workers: int | None = None
    skip_bad_images: bool = False
    pixel_cache: bool = True  # jobs read/write <cache_dir>/pixels (false, --no-pixel-cache: bypass it)
    retries: int = 2  # a failed job is run again up to this many times (1 + retries attempts)
    lock_timeout_s: float = 600.0  # a job lock not refreshed for this long (heartbeat every 30 s) is stale
    leaderboard: str | None = None  # write leaderboards here when the sweep ends
    env: dict[str, str] = field(default_factory=dict)  # environment variables set in every job
    executor: ExecutorSettings = field(default_factory=ExecutorSettings)
    file: str | None = None

    @property
    def max_attempts(self) -> int:
        """Runs a job may fail before it is given up."""
        return 1 + self.retries

    @property
    def results_root(self) -> Path:
        """The result store as an absolute path."""
        return Path(self.results_dir).expanduser().resolve()

    def to_dict(self) -> dict[str, Any]:
        """Plain data (for the copy kept in the store)."""
        out = dataclasses.asdict(self)
        out.pop("file")
        out["models"] = [{"name": m.name, "weights": m.weights} if m.weights else m.name for m in self.models]
        return out


GRID_KEYS = {f.name for f in dataclasses.fields(Grid)} - {"file"}
EXECUTOR_KEYS = {f.name for f in dataclasses.fields(ExecutorSettings)}


def _fail(file: str, key: str, message: str) -> RetbenchError:
    return RetbenchError(f"{file}: key '{key}': {message}")


def _unknown(file: str, where: str, keys: set[str], allowed: set[str]) -> None:
    for key in sorted(keys - allowed):
        close = difflib.get_close_matches(key, sorted(allowed), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise _fail(file, f"{where}{key}", f"unknown key{hint}; allowed: {', '.join(sorted(allowed))}")


def _str_list(file: str, key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v for v in value.split(",")]
    if not isinstance(value, list) or not all(isinstance(v, str) and v.strip() for v in value):
        raise _fail(file, key, f"expected a list of names, got {value!r}")
    return tuple(v.strip() for v in value)


def _opt_int(file: str, key: str, value: Any, minimum: int = 0) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise _fail(file, key, f"expected an integer >= {minimum}, got {value!r}")
    return value


def _seeds(file: str, value: Any) -> int | None:
    """``seeds: 5`` (seeds 0..4), or the list ``[0, 1, 2, 3, 4]``; results store one value per seed."""
    if isinstance(value, list):
        if value != list(range(len(value))) or not value:
            raise _fail(file, "seeds", f"give the number of seeds (seeds 0..n-1 are used), got {value!r}")
        return len(value)
    return _opt_int(file, "seeds", value, minimum=1)


def _models(file: str, value: Any) -> tuple[ModelEntry, ...]:
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, list) or not value:
        raise _fail(file, "models", f"expected a non-empty list, got {value!r}")
    out = []
    for i, item in enumerate(value):
        if isinstance(item, str) and item.strip():
            out.append(ModelEntry(item.strip()))
        elif isinstance(item, dict) and isinstance(item.get("name"), str):
            _unknown(file, f"models[{i}].", set(item), {"name", "weights"})
            weights = item.get("weights")
            out.append(ModelEntry(item["name"], None if weights is None else str(weights)))
        else:
            raise _fail(file, f"models[{i}]", f"expected a model name or {{name, weights}}, got {item!r}")
    return tuple(out)


def _executor(file: str, value: Any) -> ExecutorSettings:
    if value is None:
        return ExecutorSettings()
    if isinstance(value, str):
        value = {"kind": value}
    if not isinstance(value, dict):
        raise _fail(file, "executor", f"expected a mapping, got {value!r}")
    _unknown(file, "executor.", set(value), EXECUTOR_KEYS)
    kind = value.get("kind", "local")
    if kind not in EXECUTOR_KINDS:
        raise _fail(file, "executor.kind", f"got {kind!r}; allowed: {', '.join(EXECUTOR_KINDS)}")
    kw: dict[str, Any] = {"kind": kind}
    for key in ("parallel", "timeout_min", "max_requeues"):
        if key in value:
            kw[key] = _opt_int(file, f"executor.{key}", value[key], minimum=1 if key != "max_requeues" else 0)
    for key in ("gpus", "cpus", "signal_delay_s"):
        if value.get(key) is not None:
            kw[key] = _opt_int(file, f"executor.{key}", value[key])
    for key in ("mem_gb", "poll_s"):
        if value.get(key) is not None:
            if isinstance(value[key], bool) or not isinstance(value[key], (int, float)) or value[key] <= 0:
                raise _fail(file, f"executor.{key}", f"expected a positive number, got {value[key]!r}")
            kw[key] = float(value[key])
    for key in ("partition", "account", "qos", "constraint", "job_name", "log_dir"):
        if value.get(key) is not None:
            kw[key] = str(value[key])
    if value.get("setup") is not None:
        setup = value["setup"]
        if isinstance(setup, str):
            setup = [setup]
        if not isinstance(setup, list) or not all(isinstance(s, str) for s in setup):
            raise _fail(file, "executor.setup", f"expected a list of shell lines, got {setup!r}")
        kw["setup"] = tuple(setup)
    if value.get("sbatch") is not None:
        if not isinstance(value["sbatch"], dict):
            raise _fail(file, "executor.sbatch", f"expected a mapping of sbatch options, got {value['sbatch']!r}")
        kw["sbatch"] = {str(k).lstrip("-"): v for k, v in value["sbatch"].items()}
    return ExecutorSettings(**kw)


def parse_grid(data: Any, file: str = "<grid>") -> Grid:
    """Validate a grid mapping (as read from YAML); errors name the file and the key."""
    if not isinstance(data, dict):
        raise RetbenchError(f"{file}: a grid must be a mapping with at least 'models' and 'tasks'")
    _unknown(file, "", set(data), GRID_KEYS)
    for key in ("models", "tasks"):
        if key not in data:
            raise _fail(file, key, "missing (required)")
    name = data.get("name") or (Path(file).stem if file != "<grid>" else "sweep")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise _fail(file, "name", f"expected letters, digits, '.', '_' or '-' (not starting with '.'), got {name!r}")
    kw: dict[str, Any] = {"name": name, "models": _models(file, data["models"]), "tasks": _str_list(file, "tasks", data["tasks"])}
    if data.get("protocols") is not None:
        kw["protocols"] = _str_list(file, "protocols", data["protocols"])
    kw["seeds"] = _seeds(file, data.get("seeds"))
    if data.get("shots") is not None:
        shots = data["shots"]
        shots = [shots] if isinstance(shots, int) else shots
        if not isinstance(shots, list) or not shots or not all(_opt_int(file, "shots", k, minimum=1) for k in shots):
            raise _fail(file, "shots", f"expected a list of k values, got {data['shots']!r}")
        kw["shots"] = tuple(shots)
    for key in ("data_root", "results_dir", "cache_dir", "device", "leaderboard"):
        if data.get(key) is not None:
            kw[key] = str(data[key])
    for key in ("batch_size", "num_workers", "retries"):
        if data.get(key) is not None:
            kw[key] = _opt_int(file, key, data[key], minimum=1 if key == "batch_size" else 0)
    if data.get("pixel_cache") is not None:
        if not isinstance(data["pixel_cache"], bool):
            raise _fail(file, "pixel_cache", f"expected true or false, got {data['pixel_cache']!r}")
        kw["pixel_cache"] = data["pixel_cache"]
    if data.get("skip_bad_images") is not None:
        if not isinstance(data["skip_bad_images"], bool):
            raise _fail(file, "skip_bad_images", f"expected true or false, got {data['skip_bad_images']!r}")
        kw["skip_bad_images"] = data["skip_bad_images"]
    if data.get("lock_timeout_s") is not None:
        value = data["lock_timeout_s"]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 10:
            raise _fail(file, "lock_timeout_s", f"expected seconds >= 10, got {value!r}")
        kw["lock_timeout_s"] = float(value)
    if data.get("env") is not None:
        if not isinstance(data["env"], dict):
            raise _fail(file, "env", f"expected a mapping of environment variables, got {data['env']!r}")
        kw["env"] = {str(k): str(v) for k, v in data["env"].items()}
    kw["executor"] = _executor(file, data.get("executor"))
    return Grid(file=file, **kw)


def load_grid(path: str | os.PathLike) -> Grid:
    """Read and validate a grid YAML file."""
    path = Path(path)
    if not path.is_file():
        raise RetbenchError(f"grid file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise RetbenchError(f"{path}: malformed YAML: {exc}") from None
    return parse_grid(data, str(path))


def with_overrides(grid: Grid, **changes: Any) -> Grid:
    """The grid with command-line overrides (``None`` values are ignored; ``executor_*`` keys go to the executor)."""
    ex_changes = {k[len("executor_"):]: v for k, v in changes.items() if k.startswith("executor_") and v is not None}
    top = {k: v for k, v in changes.items() if not k.startswith("executor_") and v is not None}
    if ex_changes.get("kind") is not None and ex_changes["kind"] not in EXECUTOR_KINDS:
        raise RetbenchError(f"executor kind {ex_changes['kind']!r}; allowed: {', '.join(EXECUTOR_KINDS)}")
    executor = dataclasses.replace(grid.executor, **ex_changes) if ex_changes else grid.executor
    return dataclasses.replace(grid, executor=executor, **top)


# ----------------------------------------------------------------------------------------------------------------------
# Jobs


@dataclass(frozen=True)
class Job:
    """One (model, task) of a sweep: all of the grid's protocols that apply, run in one process."""

    model: str  # canonical name (family.tag or family:arg)
    weights: str | None
    task: str  # what get_task() takes: a task name or an absolute spec path
    task_name: str
    spec_hash: str
    protocols: tuple[str, ...]  # protocols that write a result
    hashes: tuple[str, ...]  # settings hash of each protocol's result
    not_applicable: tuple[tuple[str, str], ...] = ()  # (protocol, reason)
    part: str = ""  # a training protocol's own job (its name); "" for the job of the feature protocols

    @property
    def key(self) -> str:
        """File-name-safe job id, the same in every sweep of a store: ``<model>__<task>``, and
        ``<model>__<task>__<protocol>`` for the job of a protocol that trains."""
        from retbench.store import safe_name

        return f"{safe_name(self.model)}__{safe_name(self.task_name)}" + (f"__{safe_name(self.part)}" if self.part else "")

    def result_path(self, results_root: Path, protocol: str) -> Path:
        """Where the job's result for ``protocol`` lives."""
        from retbench.store import result_path

        return result_path(results_root, self.model, self.task_name, protocol)

    def expected_hash(self, protocol: str) -> str:
        """Settings hash the result of ``protocol`` must carry to count as finished."""
        return self.hashes[self.protocols.index(protocol)]


def _protocol_settings(protocol: str, seeds: int | None, shots: tuple[int, ...] | None) -> dict[str, Any]:
    """The run options that change ``protocol``'s numbers (its ``run_options``, as ``runner.configured_protocol``
    applies them)."""
    from retbench.protocols import PROTOCOLS

    takes = PROTOCOLS.get(protocol).run_options
    out: dict[str, Any] = {}
    if shots and "shots" in takes:
        out["shots"] = sorted(int(k) for k in shots)
    if seeds and "seeds" in takes:
        out["seeds"] = int(seeds)
    return out


def settings_hash(model: str, weights: str | None, task_name: str, spec_hash: str, protocol: str,
                  seeds: int | None, shots: Any, skip_bad_images: bool) -> str:
    """Identity of one result's configuration; equal hashes mean the same computation."""
    shots_t = tuple(int(k) for k in shots) if shots else None
    blob = {"model": model, "weights": weights, "task": task_name, "spec_hash": spec_hash, "protocol": protocol,
            "skip_bad_images": bool(skip_bad_images), **_protocol_settings(protocol, seeds, shots_t)}
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


def result_hash(data: dict[str, Any]) -> str:
    """The settings hash of a stored result (see :func:`settings_hash`)."""
    cfg = data.get("config") or {}
    return settings_hash(data["model"]["name"], cfg.get("weights"), data["task"]["name"], data["task"]["spec_hash"],
                         data["protocol"]["name"], cfg.get("seeds"), cfg.get("shots"), cfg.get("skip_bad_images", False))


def _weights(value: str | None) -> str | None:
    """Checkpoint paths made absolute (jobs may run elsewhere); keywords such as ``random`` or ``hub`` kept."""
    if value is None:
        return None
    path = Path(value).expanduser()
    return str(path.resolve()) if path.exists() else value


def expand_jobs(grid: Grid) -> list[Job]:
    """Every (model, task) job of the grid, grouped by model, plus one (model, task, protocol) job per protocol that
    trains; unknown names fail with suggestions."""
    from retbench.adapters import ADAPTERS, canonical_model_name, split_model_name
    from retbench.protocols import PROTOCOLS
    from retbench.runner import select_protocols
    from retbench.tasks import get_task, resolve_tasks

    selectors = [str(Path(t).expanduser().resolve()) if t.endswith((".yaml", ".yml")) else t for t in grid.tasks]
    with _env(grid.env):
        task_names = resolve_tasks(selectors)
        specs = [(t, get_task(t)) for t in task_names]
    seen: dict[str, str] = {}
    jobs = []
    for entry in grid.models:
        model = canonical_model_name(entry.name)
        if model in seen:
            raise RetbenchError(f"{grid.file}: key 'models': '{entry.name}' and '{seen[model]}' are the same model "
                                f"({model}); results are stored per model name")
        seen[model] = entry.name
        has_text = ADAPTERS.get(split_model_name(model)[0]).has_text
        weights = _weights(entry.weights)
        for task, spec in specs:
            allowed = select_protocols(spec, grid.protocols)  # unknown protocol names fail here
            wanted = grid.protocols or tuple(allowed)
            protocols, na = [], []
            for p in wanted:
                if p not in allowed:
                    na.append((p, f"task '{spec.name}' does not allow {p}"))
                elif PROTOCOLS.get(p).needs_text(spec) and not has_text:
                    na.append((p, f"model '{model}' has no text tower"))
                else:
                    protocols.append(p)
            # a protocol that trains (finetune*) is a job of its own: hours on a GPU, and its own requeues
            trains = [p for p in protocols if getattr(PROTOCOLS.get(p), "trains", False)]
            rest = [p for p in protocols if p not in trains]
            parts = ([("", rest)] if rest or not trains else []) + [(p, [p]) for p in trains]
            for i, (part, ps) in enumerate(parts):
                hashes = tuple(settings_hash(model, weights, spec.name, spec.spec_hash, p, grid.seeds, grid.shots,
                                             grid.skip_bad_images) for p in ps)
                jobs.append(Job(model, weights, task, spec.name, spec.spec_hash, tuple(ps), hashes,
                                tuple(na) if i == 0 else (), part))
    keys: dict[str, Job] = {}
    for job in jobs:
        if job.key in keys:
            raise RetbenchError(f"{grid.file}: two tasks named '{job.task_name}' ({keys[job.key].task} and {job.task})")
        keys[job.key] = job
    return jobs


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    """Temporarily set environment variables (the grid's ``env``) while resolving tasks."""
    from retbench.tasks import task_index

    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    if "RETBENCH_TASKS_PATH" in values:
        task_index.cache_clear()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if "RETBENCH_TASKS_PATH" in values:
            task_index.cache_clear()
