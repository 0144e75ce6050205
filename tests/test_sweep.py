"""Sweeps: real submitit debug/local executors on tiny tasks, SIGKILL and resume, two sweeps on one store,
failures and retries, preemption and requeue, and the Slurm submission (sbatch script) checked without Slurm."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_task
from submitit.local.local import LOCAL_REQUEUE_RETURN_CODE

from retbench.errors import RetbenchError
from retbench.sweep import JobLock, add_sweep_parser, cmd_sweep, expand_jobs, load_grid, parse_grid
from retbench.sweep.state import host_id, read_lock
from retbench.sweep.worker import JobSettings, SweepJob

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "sweeps"


# ----------------------------------------------------------------------------------------------------------------------
# helpers


def _tasks(tmp_path: Path, n: int) -> tuple[list[Path], Path]:
    specs = []
    for i in range(n):
        spec, root = make_tiny_task(tmp_path, f"tiny{i}")
        specs.append(spec)
    return specs, root


def _grid(tmp_path: Path, specs: list[Path], root: Path, name: str = "t", models: str = "classical",
          executor: str = "{kind: debug}", file: str | None = None, **extra: object) -> Path:
    data = {"name": name, "models": models.split(","), "tasks": [str(s) for s in specs],
            "protocols": ["linear_probe", "few_shot", "zero_shot"], "seeds": 2, "shots": [1, 2], "data_root": str(root),
            "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"), "retries": 1,
            "executor": yaml.safe_load(executor), **extra}
    path = tmp_path / (file or f"{name}.yaml")
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _sweep(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    parser = argparse.ArgumentParser(prog="retbench")
    add_sweep_parser(parser.add_subparsers(dest="command"))
    code = cmd_sweep(parser.parse_args(["sweep", *argv]))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _status(capsys: pytest.CaptureFixture, grid: Path) -> dict:
    code, out, _ = _sweep(capsys, str(grid), "--status", "--json")
    assert code == 0
    return json.loads(out)


def _results(store: Path) -> dict[Path, dict]:
    """Every result file, parsed (a half-written file would fail here)."""
    return {p: json.loads(p.read_text()) for p in sorted(store.glob("*/*/*.json"))}


def _state(store: Path, sweep: str, key: str) -> dict:
    return json.loads((store / ".sweep" / sweep / "jobs" / f"{key}.json").read_text())


def _runs_by_job(store: Path, sweep: str) -> dict[str, list[dict]]:
    return {p.name: json.loads(p.read_text())["runs"] for p in (store / ".sweep" / sweep / "jobs").glob("*.json")
            if not p.name.endswith(".submit.json")}


def _all_runs(store: Path, sweep: str) -> list[dict]:
    return [r for runs in _runs_by_job(store, sweep).values() for r in runs]


def _no_debris(store: Path) -> None:
    assert not list((store / ".sweep" / ".locks").glob("*")), "job locks left behind"
    assert not [p for p in store.rglob("*.tmp")], "temporary files left behind"


def _wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            log = proc.stderr.read() if proc.stderr else ""
            raise AssertionError(f"process ended (rc {proc.returncode}) before {what}: {log}")
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def _driver(grid: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "retbench.sweep", str(grid), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


# ----------------------------------------------------------------------------------------------------------------------
# grids


def test_grid_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(RetbenchError, match=r"g.yaml: key 'modles': unknown key \(did you mean 'models'\?\)"):
        parse_grid({"modles": ["classical"], "tasks": ["eye4class"]}, "g.yaml")
    with pytest.raises(RetbenchError, match=r"key 'executor.kind': got 'pbs'; allowed: debug, local, slurm"):
        parse_grid({"models": ["classical"], "tasks": ["eye4class"], "executor": {"kind": "pbs"}}, "g.yaml")
    with pytest.raises(RetbenchError, match=r"key 'seeds': give the number of seeds"):
        parse_grid({"models": ["classical"], "tasks": ["eye4class"], "seeds": [3, 7]}, "g.yaml")
    with pytest.raises(RetbenchError, match=r"key 'tasks': missing"):
        parse_grid({"models": ["classical"]}, "g.yaml")
    grid = parse_grid({"models": ["classical", {"name": "tinyclip"}], "tasks": "eye4class", "seeds": [0, 1, 2],
                       "protocols": ["linear_probe"], "executor": "debug"}, "g.yaml")
    assert grid.seeds == 3 and grid.executor.kind == "debug" and grid.name == "g"
    with pytest.raises(RetbenchError, match="unknown protocol|linear_prob"):
        expand_jobs(parse_grid({"models": ["classical"], "tasks": ["eye4class"], "protocols": ["linear_prob"]}, "g.yaml"))
    with pytest.raises(RetbenchError, match="same model"):
        expand_jobs(parse_grid({"models": ["classical", "classical.default"], "tasks": ["eye4class"]}, "g.yaml"))


def test_a_protocol_that_trains_gets_a_job_of_its_own() -> None:
    grid = parse_grid({"models": ["timm:resnet18"], "tasks": ["mx_dme_cfp_dr"],
                       "protocols": ["linear_probe", "finetune", "few_shot", "finetune.lora"]}, "g.yaml")
    jobs = expand_jobs(grid)
    assert [(j.key, j.protocols) for j in jobs] == [
        ("timm_resnet18__mx_dme_cfp_dr", ("linear_probe", "few_shot")),
        ("timm_resnet18__mx_dme_cfp_dr__finetune", ("finetune",)),
        ("timm_resnet18__mx_dme_cfp_dr__finetune.lora", ("finetune.lora",)),
    ]


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_example_grids_expand(example: str) -> None:
    grid = load_grid(EXAMPLES / example)
    jobs = expand_jobs(grid)
    assert jobs and all(j.protocols for j in jobs)
    order = [j.model for j in jobs]
    assert order == sorted(order, key=order.index)  # grouped by model


# ----------------------------------------------------------------------------------------------------------------------
# locks


def test_job_lock_is_exclusive_and_stale_locks_are_taken_over(tmp_path: Path) -> None:
    path = tmp_path / "locks" / "job.lock"
    a, b = JobLock(path, {"who": "a"}, timeout_s=60), JobLock(path, {"who": "b"}, timeout_s=60)
    assert a.acquire() and not b.acquire()
    b.release()  # not ours: must not remove a's lock
    assert read_lock(path).holder["who"] == "a"
    a.release()
    assert read_lock(path) is None and b.acquire()
    b.release()
    # a holder on this host whose process is gone: stale at once
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    path.write_text(json.dumps({"host": host_id(), "pid": int(dead.stdout), "token": "x"}))
    c = JobLock(path, {"who": "c"}, timeout_s=60)
    assert c.acquire() and c.took_over["pid"] == int(dead.stdout)
    c.release()
    # a holder elsewhere: stale when its heartbeat stops, or when its submitit job has ended
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "y", "submitit_job": "77_3"}))
    assert not JobLock(path, {}, timeout_s=60).acquire()
    d = JobLock(path, {}, timeout_s=60)
    assert d.acquire(ended_jobs={"77_3"})
    d.release()
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "token": "z"}))
    os.utime(path, (time.time() - 120, time.time() - 120))
    e = JobLock(path, {}, timeout_s=60)
    assert e.acquire()
    e.release()
    # the heartbeat keeps a held lock fresh
    f = JobLock(path, {}, timeout_s=60, heartbeat_s=0.05)
    assert f.acquire()
    os.utime(path, (time.time() - 120, time.time() - 120))
    time.sleep(0.3)
    assert read_lock(path).age_s < 5
    f.release()


# ----------------------------------------------------------------------------------------------------------------------
# debug executor: run, skip, settings hash, status, failures and retries


def test_debug_sweep_runs_skips_by_settings_hash_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    specs, root = _tasks(tmp_path, 2)
    grid = _grid(tmp_path, specs, root, name="dbg", leaderboard=str(tmp_path / "boards"))
    store = tmp_path / "results"

    code, out, _ = _sweep(capsys, str(grid), "--dry-run", "--json")
    plan = json.loads(out)
    assert code == 0 and [j["job"] for j in plan["jobs"]] == ["classical.default__tiny0", "classical.default__tiny1"]
    assert all(j["will_run"] and j["protocols"] == ["linear_probe", "few_shot"] for j in plan["jobs"])
    assert "no text tower" in plan["jobs"][0]["not_applicable"]["zero_shot"]
    assert not store.exists() or not _results(store)  # a dry run writes nothing

    code, out, err = _sweep(capsys, str(grid))
    assert code == 0, err
    assert "2 done" in err and "## linear_probe" in out and "`classical.default`" in out
    # the summary's CIs say what they resampled, per task (the tiny tasks have no patient ids: images)
    assert re.search(r"percentile bootstrap over tiny0: \d+ test images × 2 runs; tiny1: \d+ test images × 2 runs\.",
                     out), out
    assert (tmp_path / "boards" / "linear_probe.md").exists()  # the summary ends in the leaderboard
    results = _results(store)
    assert len(results) == 4 and {d["config"]["seeds"] for d in results.values()} == {2}
    mtimes = {p: p.stat().st_mtime_ns for p in results}
    run = _state(store, "dbg", "classical.default__tiny0")["runs"][-1]
    assert run["outcome"] == "done" and run["written"] == ["linear_probe", "few_shot"]
    assert run["submitit_job"].startswith("DEBUG_") and run["executor"] == "debug"

    code, _, err = _sweep(capsys, str(grid))  # a rerun finds everything done
    assert code == 0 and "0 submitted" in err
    assert {p: p.stat().st_mtime_ns for p in _results(store)} == mtimes

    # new shots change few_shot's settings hash only: that result is stale, linear_probe is kept
    grid2 = _grid(tmp_path, specs, root, name="dbg", shots=[1], file="dbg2.yaml")
    status = _status(capsys, grid2)
    assert status["counts"]["pending"] == 2 and status["jobs"][0]["stale"] == ["few_shot"]
    code, _, err = _sweep(capsys, str(grid2))
    assert code == 0, err
    run = _state(store, "dbg", "classical.default__tiny0")["runs"][-1]
    assert run["written"] == ["few_shot"] and run["kept"] == ["linear_probe"]
    lp = store / "tiny0" / "linear_probe" / "classical.default.json"
    assert lp.stat().st_mtime_ns == mtimes[lp]

    code, out, _ = _sweep(capsys, "--status", "--results-dir", str(store))  # no grid: every sweep in the store
    assert code == 0 and "sweep dbg" in out and "2 done" in out

    before = {p: p.stat().st_mtime_ns for p in _results(store)}
    code, _, err = _sweep(capsys, str(grid2), "--overwrite")  # recomputes every result, once
    assert code == 0, err
    assert all(p.stat().st_mtime_ns != before[p] for p in before)
    assert _state(store, "dbg", "classical.default__tiny1")["runs"][-1]["written"] == ["linear_probe", "few_shot"]
    _no_debris(store)


def test_failures_are_recorded_with_traceback_and_retried(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    specs, root = _tasks(tmp_path, 1)
    bad = root / "tiny0" / "red" / "red_03.png"
    good = bad.read_bytes()
    bad.write_bytes(b"not a png")
    grid = _grid(tmp_path, specs, root, name="fail", retries=1)
    store = tmp_path / "results"

    code, _, err = _sweep(capsys, str(grid))
    assert code == 1 and "1 failed" in err and "FAILED" in err
    state = _state(store, "fail", "classical.default__tiny0")
    assert state["status"] == "failed" and state["failures"] == 2  # 1 + retries attempts
    assert [r["outcome"] for r in state["runs"]] == ["failed", "failed"]
    assert "red_03.png" in state["error"]["message"] and "Traceback" in state["error"]["traceback"]
    status = _status(capsys, grid)
    assert status["counts"]["failed"] == 1 and "red_03.png" in status["jobs"][0]["error"]["traceback"]
    code, out, _ = _sweep(capsys, str(grid), "--status", "--verbose")
    assert "failed" in out and "Traceback" in out

    bad.write_bytes(good)  # fixed: the next sweep run tries again and succeeds
    code, _, err = _sweep(capsys, str(grid))
    assert code == 0, err
    state = _state(store, "fail", "classical.default__tiny0")
    assert state["status"] == "done" and [r["outcome"] for r in state["runs"]] == ["failed", "failed", "done"]
    assert len(_results(store)) == 2
    _no_debris(store)


# ----------------------------------------------------------------------------------------------------------------------
# interruptions and concurrency


def test_sigkill_then_resume_loses_and_duplicates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    specs, root = _tasks(tmp_path, 2)
    grid = _grid(tmp_path, specs, root, name="kill")
    store = tmp_path / "results"
    proc = _driver(grid)
    _wait_for(lambda: any(store.glob("*/*/*.json")), 120, "the first result", proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _results(store)  # every file present is complete
    assert 1 <= len(before) < 4
    mtimes = {p: p.stat().st_mtime_ns for p in before}
    assert _status(capsys, grid)["counts"]["done"] < 3

    code, _, err = _sweep(capsys, str(grid))
    assert code == 0, err
    after = _results(store)
    assert len(after) == 4
    assert all(p.stat().st_mtime_ns == mtimes[p] for p in before)  # finished work was not redone
    # every result written exactly once, before or after the kill: a job's runs never write a protocol twice, and
    # what they wrote plus what the resumed run found finished ("kept") is all of it (a kill between a result's
    # rename and the state write leaves that result out of "written"; the resumed run keeps it, not redoes it)
    for job_runs in _runs_by_job(store, "kill").values():
        written = [p for r in job_runs for p in r["written"]]
        assert len(written) == len(set(written)), job_runs
        assert set(written) | set(job_runs[-1]["kept"]) == {"linear_probe", "few_shot"}, job_runs
    runs = _all_runs(store, "kill")
    interrupted = [r for r in runs if r.get("took_over")]
    assert interrupted and interrupted[0]["took_over"]["pid"] == proc.pid
    assert _status(capsys, grid)["counts"]["done"] == 2
    _no_debris(store)


def test_two_sweeps_on_one_store_stay_consistent(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The same grid started twice at once (another process, and this one): each job runs once, under its lock."""
    specs, root = _tasks(tmp_path, 3)
    grid = _grid(tmp_path, specs, root, name="twice", executor="{kind: debug, poll_s: 0.2}")
    store = tmp_path / "results"
    proc = _driver(grid)
    _wait_for(lambda: any((store / ".sweep" / ".locks").glob("*.lock")), 120, "the other sweep's first job", proc)
    code, _, err = _sweep(capsys, str(grid))  # runs while the other sweep runs
    assert code == 0, err
    assert proc.wait(timeout=120) == 0, proc.stderr.read()
    results = _results(store)
    assert len(results) == 6 and all(d["config"]["seeds"] == 2 for d in results.values())
    runs = _all_runs(store, "twice")
    written = sorted((r["run"], r["submitit_job"], p) for r in runs for p in r["written"])
    assert len(written) == 6, runs  # no result computed twice
    assert {r["pid"] for r in runs if r["written"]} == {proc.pid, os.getpid()}  # both sweeps did work
    assert all(r["outcome"] == "done" for r in runs)
    assert _status(capsys, grid)["counts"]["done"] == 3
    _no_debris(store)


# ----------------------------------------------------------------------------------------------------------------------
# local executor: real child processes, a worker killed (crash, retried) and one preempted (requeued)


def test_local_executor_crash_retry_and_preemption_requeue(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    specs, root = _tasks(tmp_path, 2)
    grid = _grid(tmp_path, specs, root, name="loc", executor="{kind: local, parallel: 2, poll_s: 0.2}")
    store = tmp_path / "results"
    signalled: dict[str, int] = {}

    def interrupt() -> None:
        """SIGKILL tiny0's worker (a crash) and SIGUSR2 tiny1's (submitit's preemption signal), once each."""
        plan = {"classical.default__tiny0": signal.SIGKILL, "classical.default__tiny1": signal.SIGUSR2}
        end = time.time() + 150
        while len(signalled) < 2 and time.time() < end:
            for key, sig in plan.items():
                path = store / ".sweep" / "loc" / "jobs" / f"{key}.json"
                if key in signalled or not path.exists():
                    continue
                try:
                    state = json.loads(path.read_text())
                except json.JSONDecodeError:
                    continue
                if state["status"] == "running":
                    signalled[key] = state["runs"][-1]["pid"]
                    os.kill(signalled[key], sig)
            time.sleep(0.02)

    thread = threading.Thread(target=interrupt, daemon=True)
    thread.start()
    code, _, err = _sweep(capsys, str(grid))
    thread.join(timeout=5)
    assert len(signalled) == 2
    assert code == 0, err
    assert "CRASHED" in err
    crashed = _state(store, "loc", "classical.default__tiny0")
    assert [r["outcome"] for r in crashed["runs"]] == ["crashed", "done"] and crashed["failures"] == 1
    assert crashed["runs"][0]["pid"] == signalled["classical.default__tiny0"]
    requeued = _state(store, "loc", "classical.default__tiny1")
    assert [r["outcome"] for r in requeued["runs"]] == ["requeued", "done"] and requeued["failures"] == 0
    assert requeued["runs"][0]["submitit_job"] == requeued["runs"][1]["submitit_job"]  # the same submitit job, requeued
    assert len(_results(store)) == 4
    _no_debris(store)


# ----------------------------------------------------------------------------------------------------------------------
# Slurm: the generated sbatch script and a simulated array task, preempted and requeued


FAKE_SBATCH = """#!/bin/sh
cp "$1" "{capture}/$(basename "$1")"
echo "Submitted batch job 4242"
"""
FAKE_SQUEUE = """#!/bin/sh
cat "{capture}/queue" 2>/dev/null
"""
FAKE_SCONTROL = """#!/bin/sh
echo "$@" >> "{capture}/scontrol.log"
"""


def test_slurm_submission_parameters_and_requeue(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from submitit.core import submission

    specs, root = _tasks(tmp_path, 2)
    capture, bin_dir = tmp_path / "captured", tmp_path / "bin"
    capture.mkdir()
    bin_dir.mkdir()
    for name, text in {"sbatch": FAKE_SBATCH, "squeue": FAKE_SQUEUE, "scontrol": FAKE_SCONTROL, "srun": "#!/bin/sh\n"}.items():
        (bin_dir / name).write_text(text.format(capture=capture))
        (bin_dir / name).chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    executor = ("{kind: slurm, partition: gpu, gpus: 1, cpus: 6, mem_gb: 24, timeout_min: 90, parallel: 2, "
                "job_name: rb-test, account: lab, qos: high, constraint: a100, setup: ['module load cuda'], "
                "sbatch: {mail-type: FAIL, exclude: node7}, signal_delay_s: 100}")
    grid = _grid(tmp_path, specs, root, name="slurm", executor=executor)
    store = tmp_path / "results"

    code, out, _ = _sweep(capsys, str(grid), "--dry-run")
    assert code == 0 and "#SBATCH --array=0-1%2" in out and "#SBATCH --partition=gpu" in out

    code, _, err = _sweep(capsys, str(grid), "--no-wait")
    assert code == 0 and "submitted 2 job(s) to Slurm: 4242_0, 4242_1" in err
    (script,) = capture.glob("*.sh")
    lines = set(script.read_text().splitlines())
    for expected in ["--partition=gpu", "--gpus-per-node=1", "--cpus-per-task=6", "--mem=24GB", "--time=90",
                     "--array=0-1%2", "--job-name=rb-test", "--account=lab", "--qos=high", "--constraint=a100",
                     "--mail-type=FAIL", "--exclude=node7", "--signal=USR2@100", "--nodes=1", "--ntasks-per-node=1"]:
        assert f"#SBATCH {expected}" in lines, expected
    assert "module load cuda" in lines
    assert any("submitit.core._submit" in line and line.startswith("srun") for line in lines)

    (capture / "queue").write_text("4242_0\n4242_1\n")  # squeue: both still in the queue
    assert _status(capsys, grid)["counts"]["queued"] == 2
    code, _, err = _sweep(capsys, str(grid), "--no-wait")  # queued jobs are not submitted twice
    assert code == 0 and "submitted" not in err.replace("0 submitted", "")

    # Slurm starts array task 0: run submitit's job entry point here, with the variables Slurm sets
    folder = store / ".sweep" / "slurm" / "submitit" / "%j"
    for var, value in {"SLURM_JOB_ID": "4243", "SLURM_ARRAY_JOB_ID": "4242", "SLURM_ARRAY_TASK_ID": "0", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_NTASKS": "1", "SLURM_JOB_NUM_NODES": "1",
                       "SUBMITIT_EXECUTOR": "slurm"}.items():
        monkeypatch.setenv(var, value)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGUSR2, signal.SIGTERM, signal.SIGCONT)}
    state_file = store / ".sweep" / "slurm" / "jobs" / "classical.default__tiny0.json"

    def preempt() -> None:  # Slurm's preemption warning, once the job is running
        _wait_for(lambda: state_file.exists() and json.loads(state_file.read_text())["status"] == "running", 60, "running")
        os.kill(os.getpid(), signal.SIGUSR2)

    try:
        thread = threading.Thread(target=preempt, daemon=True)
        thread.start()
        with pytest.raises(SystemExit):  # checkpointed, requeued with scontrol, then exits
            submission.process_job(str(folder))
        thread.join(timeout=5)
        assert (capture / "scontrol.log").read_text().split() == ["requeue", "4242_0"]
        assert json.loads(state_file.read_text())["status"] == "requeued"
        submission.process_job(str(folder))  # the requeued job runs again, from the checkpointed pickle
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    state = json.loads(state_file.read_text())
    assert [r["outcome"] for r in state["runs"]] == ["requeued", "done"]
    assert {r["submitit_job"] for r in state["runs"]} == {"4242_0"} and {r["executor"] for r in state["runs"]} == {"slurm"}
    (capture / "queue").write_text("4242_1\n")
    counts = _status(capsys, grid)["counts"]
    assert counts["done"] == 1 and counts["queued"] == 1


def test_cli_wiring(capsys: pytest.CaptureFixture) -> None:
    """Once retbench.cli registers the subcommand, ``retbench sweep`` is this module's command."""
    from retbench import cli

    assert "sweep" in cli.COMMANDS
    with pytest.raises(SystemExit) as exc:
        cli.build_parser().parse_args(["sweep", "--help"])
    out = capsys.readouterr().out
    assert exc.value.code == 0 and "--dry-run" in out and "--status" in out and "slurm" in out


@pytest.mark.parametrize(("executor", "code"), [("local", LOCAL_REQUEUE_RETURN_CODE), ("slurm", -1)])
def test_a_preempted_job_leaves_even_if_the_handlers_exit_was_lost(tmp_path: Path, executor: str, code: int) -> None:
    """submitit's handler exits by raising SystemExit from wherever the job was; CPython can lose it inside a C
    call, so the job leaves at its next state write instead of running on and recording "done"."""

    job = expand_jobs(parse_grid({"models": ["classical"], "tasks": ["eye4class"]}, "g.yaml"))[0]
    worker = SweepJob(job, JobSettings(sweep="g", results_dir=str(tmp_path), data_root=None, cache_dir=str(tmp_path)))
    worker._executor = executor
    worker._leave_if_preempted()  # not preempted: nothing happens
    worker.checkpoint()  # what submitit's handler calls on SIGUSR2, before its (here lost) exit
    with pytest.raises(SystemExit) as left:
        worker._leave_if_preempted()
    assert left.value.code == code
