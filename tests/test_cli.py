"""The command line, in-process: run → results → leaderboard on a tiny task, listings, validation, errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from retbench.cli import build_parser, main


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("command", ["run", "list", "validate", "results", "leaderboard", "pretrain", "sweep"])
def test_every_command_has_help(command: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    assert len(capsys.readouterr().out.splitlines()) > 5


def test_console_script_help() -> None:
    proc = subprocess.run([sys.executable, "-m", "retbench.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for command in ("run", "list", "validate", "results", "leaderboard"):
        assert command in proc.stdout


def test_run_results_leaderboard(tmp_path: Path, tiny_task: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    spec, root = tiny_task
    store, boards = tmp_path / "results", tmp_path / "boards"
    common = ["--data-root", str(root), "--results-dir", str(store), "--cache-dir", str(tmp_path / "cache")]
    code, out, err = _run(capsys, "run", "-m", "classical,tinyclip", "-t", str(spec), *common,
                          "--shots", "1", "2", "--seeds", "3", "--leaderboard", str(boards))
    assert code == 0, err
    assert "5 written" in err and "1 not applicable" in err  # classical has no text tower: zero-shot skipped
    assert len(list(store.glob("*/*/*.json"))) == 5
    code, _, err = _run(capsys, "run", "-m", "classical", "-t", str(spec), *common)
    assert code == 0 and "0 written, 2 already" in err

    csv = tmp_path / "all.csv"
    code, out, _ = _run(capsys, "results", "--results-dir", str(store), "--csv", str(csv))
    assert code == 0 and "linear_probe" in out
    frame = pd.read_csv(csv)
    assert set(frame["protocol"]) == {"linear_probe", "few_shot", "zero_shot"}
    assert frame["aca"].between(0, 1).all()

    board = (boards / "linear_probe.md").read_text()
    assert "`classical.default`" in board and "`tinyclip.test`" in board and "**" in board
    again = tmp_path / "again"
    assert main(["leaderboard", "--results-dir", str(store), "--out", str(again)]) == 0
    assert (again / "linear_probe.md").read_text() == board  # a pure, deterministic function of the store


def test_list_and_validate(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = _run(capsys, "list", "tasks")
    assert code == 0 and "eye4class" in out and "messidor" in out and "aptos2019" in out
    code, out, _ = _run(capsys, "list", "models")
    assert "classical.default" in out and "tinyclip.test" in out and "timm:" in out
    code, out, _ = _run(capsys, "list", "metrics")
    assert "kappa_quadratic" in out and "kappa_unweighted" in out
    code, out, _ = _run(capsys, "list", "groups")
    assert "@bundled" in out and "@dr_grading" in out
    code, out, _ = _run(capsys, "validate")
    assert code == 0 and " 0 invalid" in out


def test_validate_reports_bad_spec(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nversion: 1\nmodality: fundus\nproblem: binary\nmetrics: [aca]\nprotocols: [zero_shot]\n"
                   "classes: [a, b]\nsource: {kind: csv, path: x.csv}\n", encoding="utf-8")
    code, out, _ = _run(capsys, "validate", str(bad))
    assert code == 1 and "bad.yaml" in out and "modality" in out and "cfp, oct" in out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "-m", "clasical", "-t", "eye4class"], "did you mean 'classical'"),
        (["run", "-m", "classical", "-t", "eye4clas"], "did you mean 'eye4class'"),
        (["run", "-m", "classical", "-t", "@nogroup"], "unknown task group"),
        (["run", "-m", "classical", "-t", "eye4class", "-p", "linear_prob"], "did you mean 'linear_probe'"),
        (["run", "-m", "classical", "-t", "mx_dme_oct_dme", "--data-root", "/no/such/dir"], "does not exist"),
    ],
)
def test_user_errors_are_one_line(argv: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, *argv, "--results-dir", str(tmp_path / "r"))
    assert code == 2
    assert needle in err
    assert len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


def test_public_task_without_images_names_missing_files(tmp_path: Path, data_root: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "run", "-m", "classical", "-t", "messidor", "--data-root", str(data_root),
                        "--results-dir", str(tmp_path / "r"))
    assert code == 2
    assert "1744 of 1744 images missing" in err and "expected layout" in err and "02_MESSIDOR" in err
    assert not (tmp_path / "r").exists()
