"""Sweeps: many models × tasks × protocols × seeds, in process, in local processes or on Slurm, resumable.

``retbench sweep GRID.yaml`` (see :mod:`retbench.sweep.cli`); from Python::

    from retbench.sweep import load_grid, run_sweep, sweep_status
    report = run_sweep(load_grid("examples/sweeps/bundled.yaml"))
"""

from __future__ import annotations

from retbench.sweep.cli import add_sweep_parser, cmd_sweep
from retbench.sweep.driver import SweepReport, run_sweep, sweep_status
from retbench.sweep.grid import ExecutorSettings, Grid, Job, ModelEntry, expand_jobs, load_grid, parse_grid
from retbench.sweep.state import JobLock, JobStatus
from retbench.sweep.worker import JobSettings, SweepJob

__all__ = [
    "ExecutorSettings", "Grid", "Job", "JobLock", "JobSettings", "JobStatus", "ModelEntry", "SweepJob", "SweepReport",
    "add_sweep_parser", "cmd_sweep", "expand_jobs", "load_grid", "parse_grid", "run_sweep", "sweep_status",
]
