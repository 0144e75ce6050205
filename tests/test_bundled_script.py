"""benchmarks/bundled.sh, the main job: its arguments, and which folders each mode writes and drift-checks.

Nothing here runs the job: the script is copied into a scratch git repository whose ``.ci/setup`` does nothing
and whose ``.venv/bin/retbench`` is a stand-in that logs its arguments and writes one file per leaderboard.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bundled.sh"

FAKE_RETBENCH = """#!/usr/bin/env bash
# stand-in for retbench: log the call; `pretrain` writes a model card, `leaderboard` one board into --out
echo "$*" >> "$(dirname "$0")/../../calls.log"
cmd=$1 out=""
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
case $cmd in
  pretrain) mkdir -p "$out" && touch "$out/retbench_model.json" && echo "${FAKE_WEIGHTS:-w}" > "$out/model.safetensors"
            echo "| trained with | fake cpu; torch 0 |" > "$out/MODEL_CARD.md" ;;
  leaderboard) mkdir -p "$out" && echo "${FAKE_BOARD:-board}" > "$out/linear_probe.md" ;;
esac
"""


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def _bash(args: list[str], cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {k: v for k, v in os.environ.items() if k not in ("RESULTS", "RUNS", "MODELS", "RETBENCH_ALLOW_DRIFT")}
    return subprocess.run(["bash", *args], cwd=cwd, env={**full_env, **env}, capture_output=True, text=True,
                          timeout=60)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    """A git repository holding the script, a no-op set-up, the stand-in retbench and committed leaderboards."""
    r = tmp_path / "repo"
    (r / "benchmarks").mkdir(parents=True)
    shutil.copy(SCRIPT, r / "benchmarks" / "bundled.sh")
    (r / ".ci").mkdir()
    (r / ".ci" / "setup").write_text("#!/usr/bin/env bash\n")
    fake = r / ".venv" / "bin" / "retbench"
    fake.parent.mkdir(parents=True)
    fake.write_text(FAKE_RETBENCH)
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    (r / ".gitignore").write_text(".venv/\n/results/\n/runs/\ncalls.log\n")
    sha = hashlib.sha256(b"w\n").hexdigest()  # the stand-in's default weights
    for board, recipes in (("leaderboards", ("mae", "flair")), ("leaderboards/quick", ("flair",))):
        (r / board).mkdir(parents=True, exist_ok=True)
        (r / board / "linear_probe.md").write_text("board\n")
        (r / board / "pretrained_weights.sha256").write_text("".join(f"{sha}  {x}/model.safetensors\n" for x in recipes))
    _git(r, "init", "-q")
    _git(r, "add", "-A")
    _git(r, "commit", "-q", "-m", "init")
    return r


def test_help_exits_zero_without_running_anything(tmp_path: Path) -> None:
    res = _bash([str(SCRIPT), "--help"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: bash benchmarks/bundled.sh")
    assert "--full" in res.stdout and "leaderboards/quick" in res.stdout
    assert _bash([str(SCRIPT), "-h"], cwd=tmp_path).stdout == res.stdout


def test_unknown_argument_is_an_error_before_any_work(repo: Path) -> None:
    res = _bash(["benchmarks/bundled.sh", "--ful"], cwd=repo)
    assert res.returncode == 2
    assert "unknown argument '--ful'" in res.stderr and "usage:" in res.stderr
    assert not (repo / "calls.log").exists()  # nothing was run


def test_quick_is_the_default_and_writes_only_its_own_folders(repo: Path) -> None:
    res = _bash(["benchmarks/bundled.sh"], cwd=repo)
    assert res.returncode == 0, res.stderr
    assert "leaderboards/quick/ are byte-identical to the committed ones" in res.stdout
    calls = (repo / "calls.log").read_text().splitlines()
    assert calls[0].startswith("pretrain --recipe flair --data @bundled --out runs/quick/flair")
    runs = [c for c in calls if c.startswith("run ")]
    assert len(runs) == 2 and all("--results-dir results/quick" in c for c in runs)
    assert "--weights random" in runs[1] and "mx_dme_oct_dme" in runs[0]
    assert any(c.startswith("leaderboard --results-dir results/quick --out leaderboards/quick") for c in calls)
    assert (repo / "leaderboards" / "linear_probe.md").exists()  # the full study's boards are left alone


def test_full_keeps_the_quick_boards_and_passes_run_arguments(repo: Path) -> None:
    stale = repo / "leaderboards" / "orphan.md"
    stale.write_text("from an earlier store\n")
    res = _bash(["benchmarks/bundled.sh", "--full", "--overwrite", "--", "--device", "cpu"], cwd=repo)
    assert res.returncode == 0, res.stderr
    assert "leaderboards/ are byte-identical to the committed ones" in res.stdout
    assert not stale.exists()  # the full study's folder is regenerated from scratch ...
    assert (repo / "leaderboards" / "quick" / "linear_probe.md").exists()  # ... except the quick job's
    calls = (repo / "calls.log").read_text().splitlines()
    assert [c.split(" --out ")[1] for c in calls if c.startswith("pretrain")] == ["runs/mae", "runs/flair"]
    runs = [c for c in calls if c.startswith("run ")]
    assert len(runs) == 3 and all(c.endswith("--results-dir results --overwrite --device cpu") for c in runs)


@pytest.mark.parametrize("mode, board", [([], "leaderboards/quick"), (["--full"], "leaderboards")])
def test_drift_fails_naming_the_file_unless_allowed(repo: Path, mode: list[str], board: str) -> None:
    res = _bash(["benchmarks/bundled.sh", *mode], cwd=repo, FAKE_BOARD="changed")
    assert res.returncode == 1
    assert f"{board}/ differ from the committed ones" in res.stderr and f"{board}/linear_probe.md" in res.stderr
    other = "leaderboards/linear_probe.md" if mode == [] else "leaderboards/quick/linear_probe.md"
    assert other not in res.stderr  # each mode checks its own folder only
    allowed = _bash(["benchmarks/bundled.sh", *mode], cwd=repo, FAKE_BOARD="changed", RETBENCH_ALLOW_DRIFT="1")
    assert allowed.returncode == 0 and f"{board}/ differ" in allowed.stderr
    assert "cause: the pretrained weights are the committed run's" in res.stderr  # so evaluation changed


@pytest.mark.parametrize("mode, board", [([], "leaderboards/quick"), (["--full"], "leaderboards")])
def test_drift_from_other_pretrained_weights_says_so_with_this_runs_cpu(repo: Path, mode: list[str],
                                                                        board: str) -> None:
    res = _bash(["benchmarks/bundled.sh", *mode], cwd=repo, FAKE_BOARD="changed", FAKE_WEIGHTS="other")
    assert res.returncode == 1
    assert f"{board}/pretrained_weights.sha256" in res.stderr
    assert "cause: pretraining gave other weights" in res.stderr and "| trained with | fake cpu; torch 0 |" in res.stderr
