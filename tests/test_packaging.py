"""Packaging: everything installs under retbench's name. The wheel maps model_adapters/ to retbench/model_adapters/
and tasks/ to retbench/tasks/, carries the leaderboard template and py.typed, and puts nothing named model_adapters at
the top level; `retbench list tasks` and `list models` work from the installed wheel; the editable install maps the
same names onto this checkout."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("retbench", "model_adapters", "tasks", "pyproject.toml", "README.md", "MANIFEST.in")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A wheel built from a clean copy of the sources (no stale build/ folder can add files)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(out), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return next(out.glob("retbench-*.whl"))


def _expected_files() -> set[str]:
    """Every file the wheel must hold, named as it is installed."""
    names = {f"retbench/{p.relative_to(REPO / 'retbench').as_posix()}" for p in (REPO / "retbench").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
    names |= {f"retbench/model_adapters/{p.name}" for p in (REPO / "model_adapters").glob("*.py")}
    names |= {f"retbench/tasks/{p.relative_to(REPO / 'tasks').as_posix()}" for p in (REPO / "tasks").rglob("*.yaml")}
    return names


def test_wheel_holds_everything_under_retbench(wheel: Path) -> None:
    names = [n for n in zipfile.ZipFile(wheel).namelist() if ".dist-info/" not in n]
    assert {n.split("/")[0] for n in names} == {"retbench"}  # nothing named model_adapters (or else) at the top level
    assert set(names) == _expected_files()  # a package missing from pyproject's list shows up here
    for name in ("retbench/tasks/bundled/eye4class.yaml", "retbench/tasks/_base/classification.yaml",
                 "retbench/model_adapters/classical.py", "retbench/py.typed",
                 "retbench/leaderboard/templates/leaderboard.html", "retbench/cli/__main__.py"):
        assert name in names


def test_list_tasks_and_models_from_installed_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (target / "model_adapters").exists()
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import importlib.util, retbench, retbench.model_adapters as m; "
            "assert retbench.__file__.startswith(sys.argv[1]), retbench.__file__; "
            "assert m.__file__.startswith(sys.argv[1]), m.__file__; "
            "assert importlib.util.find_spec('model_adapters') is None; "
            "from retbench.cli import main; sys.exit(main(['list', 'tasks']) or main(['list', 'models']))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code, str(target)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("eye4class", "retinamnist", "messidor", "aptos2019", "classical.default", "tinyclip.test"):
        assert name in proc.stdout


def test_editable_install_maps_the_adapters_under_retbench(tmp_path: Path) -> None:
    """Outside the checkout (no repository root on sys.path) the adapters import as retbench.model_adapters only."""
    code = ("import importlib.util, json, retbench, retbench.model_adapters as m; "
            "print(json.dumps([retbench.__file__, m.__file__, importlib.util.find_spec('model_adapters') is None]))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120,
                          env=env)
    if proc.returncode != 0 and "No module named 'retbench'" in proc.stderr:
        pytest.skip("retbench is not installed in this environment (pip install -e .)")
    assert proc.returncode == 0, proc.stderr[-2000:]
    import json

    package, adapters, no_top_level = json.loads(proc.stdout)
    if Path(package).resolve() != (REPO / "retbench" / "__init__.py").resolve():
        pytest.skip(f"retbench is installed from elsewhere ({package}), not editable from this checkout")
    assert Path(adapters).resolve() == (REPO / "model_adapters" / "__init__.py").resolve()
    assert no_top_level
