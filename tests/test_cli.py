"""The command line, in-process: run → results → leaderboard on a tiny task, listings, validation, errors."""

from __future__ import annotations

import json
import re
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
    shown = [line for line in out.splitlines() if "95% CI" in line]
    assert len(shown) == 5, out  # every CI printed says what it resampled: the tiny task has no patient ids
    assert all(re.search(r"95% CI -?[\d.]+–[\d.]+ over 6 test images( × 3 runs)?\)", line) for line in shown), out
    code, _, err = _run(capsys, "run", "-m", "classical", "-t", str(spec), *common)
    assert code == 0 and "0 written, 2 already" in err

    csv = tmp_path / "all.csv"
    code, out, _ = _run(capsys, "results", "--results-dir", str(store), "--csv", str(csv))
    assert code == 0 and "linear_probe" in out
    frame = pd.read_csv(csv)
    assert set(frame["protocol"]) == {"linear_probe", "few_shot", "zero_shot"}
    assert frame["aca"].between(0, 1).all()
    assert frame["primary_ci_over"].str.fullmatch(r"6 test images( × 3 runs)?").all()
    assert "CI over" in out and "test images" in out

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


def test_tasks_path_flag_adds_task_folders_for_one_command(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """``--tasks-path DIR`` (repeatable or os.pathsep-separated) adds folders searched for task YAMLs, after
    ``$RETBENCH_TASKS_PATH``'s, for run, list, validate and sweep; the variable and the task index are as before
    once the command is done."""
    import os

    import yaml
    from conftest import make_tiny_task

    from retbench.tasks import get_task, task_index

    folders = {}
    for name in ("tiny_a", "tiny_b", "tiny_c"):
        spec, root = make_tiny_task(tmp_path / name, name)
        folders[name] = spec.parent
    monkeypatch.delenv("RETBENCH_TASKS_PATH", raising=False)
    task_index.cache_clear()
    get_task.cache_clear()

    def listed(*argv: str) -> set[str]:
        code, out, err = _run(capsys, "list", "tasks", "--format", "json", *argv)
        assert code == 0, err
        return {row["task"] for row in json.loads(out)}

    both = f"{folders['tiny_b']}{os.pathsep}{folders['tiny_c']}"
    names = listed("--tasks-path", str(folders["tiny_a"]), "--tasks-path", both)
    assert {"tiny_a", "tiny_b", "tiny_c", "eye4class"} <= names
    assert "RETBENCH_TASKS_PATH" not in os.environ and "tiny_a" not in task_index()  # only for that command
    assert not {"tiny_a", "tiny_b", "tiny_c"} & listed()

    monkeypatch.setenv("RETBENCH_TASKS_PATH", str(folders["tiny_c"]))  # beside the variable, not instead of it
    assert {"tiny_a", "tiny_c"} <= listed("--tasks-path", str(folders["tiny_a"])) and "tiny_b" not in listed()
    assert os.environ["RETBENCH_TASKS_PATH"] == str(folders["tiny_c"])
    code, _, err = _run(capsys, "list", "tasks", "--tasks-path", str(folders["tiny_c"]))  # same folder twice: no clash
    assert code == 0, err
    twin = tmp_path / "twin"
    twin.mkdir()
    (twin / "tiny_c.yaml").write_text((folders["tiny_c"] / "tiny_c.yaml").read_text(), encoding="utf-8")
    code, _, err = _run(capsys, "list", "tasks", "--tasks-path", str(twin))
    assert code == 2 and "task 'tiny_c' is defined twice" in err  # the variable's rule, one line
    monkeypatch.delenv("RETBENCH_TASKS_PATH")
    task_index.cache_clear()

    code, out, _ = _run(capsys, "validate", "--tasks-path", str(folders["tiny_a"]))
    assert code == 0 and "ok   tiny_a v" in out and "0 invalid" in out
    code, _, err = _run(capsys, "list", "tasks", "--tasks-path", str(tmp_path / "nowhere"))
    assert code == 2 and err.strip() == f"error: --tasks-path {tmp_path / 'nowhere'}: no such folder"

    root = folders["tiny_a"] / "data"
    code, _, err = _run(capsys, "run", "-m", "classical", "-t", "tiny_a", "-p", "linear_probe", "--seeds", "1",
                        "--data-root", str(root), "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
                        "--tasks-path", str(folders["tiny_a"]))
    assert code == 0 and "1 written" in err, err
    assert (tmp_path / "r" / "tiny_a" / "linear_probe" / "classical.default.json").is_file()
    code, _, err = _run(capsys, "run", "-m", "classical", "-t", "tiny_a", "--results-dir", str(tmp_path / "r"))
    assert code == 2 and "tiny_a" in err  # without the flag the task is unknown again

    grid = tmp_path / "grid.yaml"
    grid.write_text(yaml.safe_dump({"name": "g", "models": ["classical"], "tasks": ["tiny_b"], "protocols": ["linear_probe"],
                                    "data_root": str(folders["tiny_b"] / "data"), "results_dir": str(tmp_path / "r"),
                                    "executor": {"kind": "debug"}}), encoding="utf-8")
    code, out, err = _run(capsys, "sweep", str(grid), "--dry-run", "--json", "--tasks-path", str(folders["tiny_b"]))
    assert code == 0, err
    assert [job["task"] for job in json.loads(out)["jobs"]] == ["tiny_b"]
    args = build_parser().parse_args(["pretrain", "--recipe", "mae", "--data", "tiny_a", "--out", "x",
                                      "--tasks-path", str(folders["tiny_a"])])
    assert args.tasks_path == [str(folders["tiny_a"])]
