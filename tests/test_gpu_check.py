"""benchmarks/gpu_check.sh --dry-run: the prepared device check runs end to end on the CPU (issue 16).

The dry run's figures mean nothing (ViT-Ti on 16 images, a 2-step MAE); what is checked is that every part runs
through the same code the GPU run takes and reports every figure it promises, so that a device session spends its
minutes measuring, not debugging.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_dry_run_reports_every_part(data_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "not-yet"  # a missing $OUT folder is made, not a reason to lose the figures at the end
    env = {**os.environ, "RETBENCH_DATA": str(data_root), "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", "benchmarks/gpu_check.sh", "--dry-run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["dry_run"] is True
    figures = {(r["part"], r["figure"]): r["value"] for r in report["figures"]}
    parts = {part for part, _ in figures}
    assert parts == {"tests", "extract", "solver", "mae", "total"}
    assert "skipped" in figures[("tests", "pytest -m gpu")] or "passed" in figures[("tests", "pytest -m gpu")]
    ratios = [v for (part, name), v in figures.items() if part == "extract" and "÷ bare" in name]
    assert len(ratios) == 2 and all(0 < r < 100 for r in ratios)  # cold and warm, for the one dry-run model
    assert sum(part == "solver" and name.endswith("CPU s") for part, name in figures) == 2
    assert figures[("mae", "steps trained (batch 64)")] >= 2
    means = [name for part, name in figures if part == "mae" and "mean of task means" in name]
    assert sorted(means) == ["local:mae_gpu linear probe, mean of task means [CI]",
                             "local:mae_gpu@random linear probe, mean of task means [CI]"]
    for line in proc.stdout.splitlines()[1:]:  # one line per figure, nothing else
        assert " | " in line and ": " in line, line


def test_refuses_without_cuda_unless_dry_run() -> None:
    pytest.importorskip("torch")
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, "benchmarks/gpu_check.py"], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode != 0
    assert proc.stderr.strip().splitlines()[-1] == (
        "gpu_check: no CUDA device here; use --dry-run to check the script on the CPU")
