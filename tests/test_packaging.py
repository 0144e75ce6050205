"""The wheel carries tasks/ and model_adapters/: `retbench list tasks` works from an installed wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("hatchling")
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("retbench-*.whl"))


def test_wheel_contains_tasks_and_adapters(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    assert "retbench/tasks/bundled/eye4class.yaml" in names
    assert "retbench/tasks/_base/classification.yaml" in names
    assert "model_adapters/classical.py" in names


def test_list_tasks_from_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import retbench; "
            "assert retbench.__file__.startswith(sys.argv[1]), retbench.__file__; "
            "from retbench.cli import main; sys.exit(main(['list', 'tasks']))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for task in ("eye4class", "retinamnist", "messidor", "aptos2019"):
        assert task in proc.stdout
