"""submitit executors for a sweep: ``debug`` (in this process), ``local`` (child processes) and ``slurm``.

All three are ``submitit.AutoExecutor(folder, cluster=kind)`` with the grid's resources given
as submitit's shared parameters (``timeout_min``, ``gpus_per_node``, ``cpus_per_task``,
``mem_gb``, ``name``) plus Slurm-only ones prefixed ``slurm_`` (partition, account, qos,
constraint, array parallelism, setup lines, extra sbatch options, signal delay), which
submitit ignores on the other executors.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import submitit

from retbench.sweep.grid import ExecutorSettings, Grid


def job_name(grid: Grid) -> str:
    """The Slurm job name: the grid's, else ``retbench-<sweep>``."""
    return grid.executor.job_name or f"retbench-{grid.name}"


def log_folder(grid: Grid) -> Path:
    """Where submitit keeps pickles and logs: the grid's ``executor.log_dir``, else inside the store's sweep folder."""
    from retbench.sweep.state import sweep_dir

    if grid.executor.log_dir:
        return Path(grid.executor.log_dir).expanduser().resolve()
    return sweep_dir(grid.results_root, grid.name) / "submitit"


def executor_parameters(settings: ExecutorSettings, name: str) -> dict[str, Any]:
    """Keyword arguments for ``AutoExecutor.update_parameters`` (``None`` values left out)."""
    params: dict[str, Any] = {
        "name": name, "timeout_min": settings.timeout_min, "nodes": 1, "tasks_per_node": 1,
        "gpus_per_node": settings.gpus if settings.kind != "slurm" else settings.gpus or None,
        "cpus_per_task": settings.cpus, "mem_gb": settings.mem_gb,
    }
    if settings.kind == "slurm":
        params.update({
            "slurm_partition": settings.partition, "slurm_account": settings.account, "slurm_qos": settings.qos,
            "slurm_constraint": settings.constraint, "slurm_array_parallelism": settings.parallel,
            "slurm_setup": list(settings.setup) or None, "slurm_additional_parameters": dict(settings.sbatch) or None,
            "slurm_signal_delay_s": settings.signal_delay_s,
        })
    return {k: v for k, v in params.items() if v is not None}


def make_executor(grid: Grid) -> submitit.AutoExecutor:
    """The submitit executor the grid asks for, with its parameters set."""
    settings = grid.executor
    folder = log_folder(grid)
    folder.mkdir(parents=True, exist_ok=True)
    # %j: one sub-folder per job (Slurm array tasks: <array id>_<index>)
    executor = submitit.AutoExecutor(folder=folder / "%j", cluster=settings.kind,
                                     slurm_max_num_timeout=settings.max_requeues)
    executor.update_parameters(**executor_parameters(settings, job_name(grid)))
    return executor


def sbatch_preview(grid: Grid, n_jobs: int) -> str | None:
    """The ``#SBATCH`` header submitit would write for a Slurm array of ``n_jobs`` (``None`` if it cannot tell).

    Rendered with submitit's own sbatch writer so that ``--dry-run`` shows exactly what would be submitted.
    """
    try:
        from submitit.slurm import slurm as submitit_slurm

        params = executor_parameters(grid.executor, job_name(grid))
        sbatch: dict[str, Any] = {k[len("slurm_"):]: v for k, v in params.items() if k.startswith("slurm_")}
        generic = {"name": "job_name", "timeout_min": "time", "nodes": "nodes", "tasks_per_node": "ntasks_per_node",
                   "gpus_per_node": "gpus_per_node", "cpus_per_task": "cpus_per_task"}
        for key, target in generic.items():
            if key in params:
                sbatch[target] = params[key]
        if "mem_gb" in params:
            sbatch["mem"] = submitit_slurm._convert_mem(params["mem_gb"])
        text = submitit_slurm._make_sbatch_string(
            command=f"{shlex.quote(sys.executable)} -u -m submitit.core._submit {shlex.quote(str(log_folder(grid) / '%j'))}",
            folder=log_folder(grid) / "%j",
            map_count=n_jobs if n_jobs > 1 else None, **sbatch)
    except Exception:  # noqa: BLE001 - a preview only; submitit's private writer may change
        return None
    return text
