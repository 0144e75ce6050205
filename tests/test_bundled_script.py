"""benchmarks/bundled.sh, the main job: its arguments, and which folders each mode writes and drift-checks.

Nothing here runs the job: the script and its drift check are copied into a scratch git repository whose
``.ci/setup`` does nothing and whose ``.venv/bin/retbench`` is a stand-in that logs its arguments, writes weights
and a model card naming a CPU (``FAKE_CPU``), and a leaderboard with one baseline and one pretrained-model row.
The committed boards are what the job wrote on "CPU A".
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bundled.sh"

FAKE_RETBENCH = """#!/usr/bin/env bash
# stand-in for retbench: log the call; `pretrain` writes weights and a card, `leaderboard` a board and a CSV
echo "$*" >> "$(dirname "$0")/../../calls.log"
cmd=$1 out=""
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
case $cmd in
  pretrain) mkdir -p "$out" && echo "${FAKE_WEIGHTS:-w}" > "$out/model.safetensors"
            printf '{"card": {"determinism": {"cpu": {"vendor": "Fake", "model": "%s", "isa_flags": ["avx2"]},
              "mkl_branch": "AVX2", "threads": 2, "packages": {"torch": "0"}}}}' "${FAKE_CPU:-CPU A}" \\
              > "$out/retbench_model.json" ;;
  leaderboard) mkdir -p "$out" && echo "${FAKE_BOARD:-board}" > "$out/linear_probe.md"
               [ -z "${FAKE_EXTRA:-}" ] || echo extra > "$out/extra.md"
               printf 'protocol,model,task,metric,k,mean,best\\n%s\\n%s\\n' \\
                 "linear_probe,classical.default,t,aca,,${FAKE_BASELINE:-0.5},0" \\
                 "linear_probe,local:flair,t,aca,,${FAKE_PRETRAINED:-0.6},1" > "$out/linear_probe.csv" ;;
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
    python = r / ".venv" / "bin" / "python"  # this environment's python (the drift check imports retbench)
    python.write_text(f'#!/usr/bin/env bash\nexec "{sys.executable}" "$@"\n')
    python.chmod(python.stat().st_mode | stat.S_IXUSR)
    shutil.copy(ROOT / "benchmarks" / "drift_check.py", r / "benchmarks" / "drift_check.py")
    (r / ".gitignore").write_text(".venv/\n/results/\n/runs/\ncalls.log\n")
    _git(r, "init", "-q")
    for mode in ([], ["--full"]):  # the committed boards and weights' records: what the job writes
        assert _bash(["benchmarks/bundled.sh", *mode], cwd=r, RETBENCH_ALLOW_DRIFT="1").returncode == 0
    shutil.rmtree(r / "runs")
    (r / "calls.log").unlink()
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
def test_the_weights_record_names_sha256_cpu_and_mkl_branch(repo: Path, mode: list[str], board: str) -> None:
    record = json.loads((repo / board / "pretrained_weights.json").read_text())
    assert set(record) == ({"flair"} if mode == [] else {"mae", "flair"})
    assert record["flair"]["sha256"] == hashlib.sha256(b"w\n").hexdigest()
    assert record["flair"]["cpu"] == "Fake CPU A (avx2)" and record["flair"]["mkl_branch"] == "AVX2"
    assert record["flair"]["threads"] == 2 and record["flair"]["packages"] == "torch 0"


def test_other_weights_on_the_committed_cpu_fail_as_not_reproduced(repo: Path) -> None:
    res = _bash(["benchmarks/bundled.sh"], cwd=repo, FAKE_PRETRAINED="0.7", FAKE_WEIGHTS="other")
    assert res.returncode == 1
    assert "on the same CPU model (Fake CPU A (avx2), MKL branch AVX2): it did not reproduce" in res.stderr


@pytest.mark.parametrize("mode, board", [([], "leaderboards/quick"), (["--full"], "leaderboards")])
def test_another_cpu_passes_when_only_the_pretrained_rows_moved(repo: Path, mode: list[str], board: str) -> None:
    res = _bash(["benchmarks/bundled.sh", *mode], cwd=repo, FAKE_BOARD="changed", FAKE_PRETRAINED="0.65",
                FAKE_WEIGHTS="other", FAKE_CPU="CPU B")
    assert res.returncode == 0, res.stderr
    assert "this CPU (Fake CPU B (avx2), MKL branch AVX2) is not the committed run's (Fake CPU A (avx2))" in res.stderr
    assert "of the 1 leaderboard CSV rows not from local:flair" in res.stdout and "1 are the committed ones" in res.stdout
    assert "moved by |Δ mean| ≤ 0.050" in res.stdout and f"git checkout -- {board}" in res.stdout


@pytest.mark.parametrize("baseline, ok", [("0.503", True), ("0.55", False)])
def test_another_cpu_allows_baseline_rows_only_the_cross_cpu_tolerance(repo: Path, baseline: str, ok: bool) -> None:
    """Rows not from the pretrained weights may move by rounding (±0.01 on a metric), not more."""
    res = _bash(["benchmarks/bundled.sh"], cwd=repo, FAKE_PRETRAINED="0.65", FAKE_BASELINE=baseline,
                FAKE_WEIGHTS="other", FAKE_CPU="CPU B")
    if ok:
        assert res.returncode == 0, res.stderr
        assert "0 are the committed ones and 1 moved within the cross-CPU tolerance" in res.stdout
        assert "largest |Δ mean| 0.0030" in res.stdout
    else:
        assert res.returncode == 1
        assert "rows not from the pretrained weights moved beyond the cross-CPU tolerance" in res.stderr
        assert ("leaderboards/quick/linear_probe.csv: row linear_probe/classical.default/t/aca: mean moved 0.0500 "
                "(> 0.01)") in res.stderr


def test_another_cpu_fails_when_a_board_file_comes_or_goes(repo: Path) -> None:
    res = _bash(["benchmarks/bundled.sh"], cwd=repo, FAKE_PRETRAINED="0.65", FAKE_WEIGHTS="other", FAKE_CPU="CPU B",
                FAKE_EXTRA="1")
    assert res.returncode == 1
    assert "leaderboards/quick/extra.md: added" in res.stderr
