"""Bad input never becomes a wrong number: flags, protocols, specs, sources, the store and read-only folders
each give one clear line naming the flag, file or folder (``error: ...``, exit 2), never a traceback, and leave
nothing half-written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import retbench
from retbench.cli import main
from retbench.config import RunConfig
from retbench.errors import NotApplicableError, RetbenchError
from retbench.store import result_path, write_result
from retbench.tasks import get_task, task_index

CSV_SPEC = """\
name: {name}
version: 1
modality: cfp
problem: binary
source: {{kind: {kind}, path: {path}, image_column: file, label_column: label}}
classes: [{{name: a, match: ["0"]}}, {{name: b, match: ["1"]}}]
splits: {{strategy: stratified, test_fraction: 0.5, seed: 0}}
metrics: [aca]
protocols: [linear_probe]
"""


def _run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def _one_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """Run the CLI; it must fail with exactly one ``error:`` line on stderr and exit 2."""
    code, _, err = _run(capsys, *argv)
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and "Traceback" not in err
    return err


@pytest.fixture
def clean_index():
    """Forget indexed and parsed specs before and after (tests change RETBENCH_TASKS_PATH)."""
    task_index.cache_clear()
    get_task.cache_clear()
    yield
    task_index.cache_clear()
    get_task.cache_clear()


# ------------------------------------------------------------------ 1. flags


@pytest.mark.parametrize(
    ("flags", "needle"),
    [
        (["--shots", "0"], "--shots (shots): every k must be an integer >= 1; got 0"),
        (["--shots", "-1"], "--shots (shots): every k must be an integer >= 1; got -1"),
        (["--shots", "4", "4", "1"], "--shots (shots): k=4 is given twice in 4 4 1"),
        (["--seeds", "-3"], "--seeds (seeds) must be an integer >= 1; got -3"),
        (["--seeds", "0"], "--seeds (seeds) must be an integer >= 1; got 0"),
        (["--batch-size", "-4"], "--batch-size (batch_size) must be an integer >= 1; got -4"),
        (["--workers", "-1"], "--workers (num_workers) must be an integer >= 0; got -1"),
        (["--device", "tpu"], "--device: unknown device 'tpu'; allowed: auto | cpu | cuda | cuda:N | mps"),
        (["--device", "cuda"], "--device cuda: CUDA is not available on this machine"),
        (["--device", "cuda:1"], "--device cuda:1: CUDA is not available on this machine"),
    ],
)
def test_bad_flags_are_one_line(flags: list[str], needle: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _one_error(capsys, "run", "-m", "classical", "-t", "eye4class", "--results-dir", str(tmp_path / "r"),
                     "--cache-dir", str(tmp_path / "c"), *flags)
    assert needle in err
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize(
    ("options", "needle"),
    [
        ({"shots": (0,)}, "every k must be an integer >= 1; got 0"),
        ({"shots": (4, 4, 1)}, "k=4 is given twice"),
        ({"shots": 4}, "must be a list of integers"),
        ({"seeds": 0}, "--seeds (seeds) must be an integer >= 1; got 0"),
        ({"seeds": True}, "--seeds (seeds) must be an integer >= 1; got True"),
        ({"batch_size": 0}, "--batch-size (batch_size) must be an integer >= 1"),
        ({"num_workers": -1}, "--workers (num_workers) must be an integer >= 0"),
    ],
)
def test_bad_run_config(options: dict, needle: str) -> None:
    with pytest.raises(RetbenchError) as info:
        RunConfig(models=("classical",), tasks=("eye4class",), **options)
    assert needle in str(info.value) and "\n" not in str(info.value)


def test_good_run_config_is_unchanged() -> None:
    config = RunConfig(models=("classical",), tasks=("eye4class",), shots=(1, 2, 4), seeds=1, batch_size=1, num_workers=0)
    assert (config.shots, config.seeds, config.batch_size, config.num_workers) == ((1, 2, 4), 1, 1, 0)


@pytest.mark.parametrize(("device", "needle"), [("tpu", "unknown device 'tpu'"), ("cuda", "CUDA is not available"),
                                                ("cpu:x", "unknown device 'cpu:x'")])
def test_evaluate_refuses_bad_device(device: str, needle: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from retbench.environment import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RetbenchError, match=needle):
        retbench.evaluate("classical", "eye4class", "linear_probe", device=device, results_dir=str(tmp_path / "r"))
    assert not (tmp_path / "r").exists()
    assert resolve_device("cpu").type == "cpu" and resolve_device("auto").type == "cpu"


# ------------------------------------------------------------------ 2. protocols that do not apply


def test_protocol_that_does_not_apply(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = _run(capsys, "run", "-m", "classical", "-t", "eye4class", "-p", "retrieval.zero_shot",
                        "--results-dir", str(tmp_path / "r"))
    assert code == 2
    lines = err.strip().splitlines()
    assert lines[0].startswith("skip retrieval.zero_shot: does not apply to task 'eye4class' (classification task; "
                               "its protocols: linear_probe,")
    assert "0 written" in lines[1]
    assert lines[2] == "error: nothing was run: every requested evaluation was skipped (reasons above)"
    assert len(lines) == 3 and not (tmp_path / "r").exists()


def test_protocol_that_does_not_apply_beside_one_that_does(tmp_path: Path, tiny_task: tuple[Path, Path],
                                                          capsys: pytest.CaptureFixture) -> None:
    spec, root = tiny_task
    code, _, err = _run(capsys, "run", "-m", "classical", "-t", str(spec), "-p", "linear_probe,vqa.probe",
                        "--data-root", str(root), "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"),
                        "--seeds", "1")
    assert code == 0, err
    skips = [line for line in err.splitlines() if line.startswith("skip ")]
    assert skips == ["skip vqa.probe: does not apply to task 'tiny' (classification task; its protocols: linear_probe, "
                     "few_shot, zero_shot)"]
    assert "1 written" in err


def test_evaluate_protocol_that_does_not_apply(tmp_path: Path) -> None:
    with pytest.raises(NotApplicableError, match="retrieval.zero_shot: does not apply to task 'eye4class'") as info:
        retbench.evaluate("classical", "eye4class", "retrieval.zero_shot", results_dir=str(tmp_path / "r"))
    assert isinstance(info.value, ValueError)  # what evaluate raised before


# ------------------------------------------------------------------ 3. task spec files


@pytest.mark.parametrize(("include", "needle"), [("5", "got int 5"), ("{a: b}", "got dict {'a': 'b'}"),
                                                 ("[base.yaml, 3]", "got list ['base.yaml', 3]")])
def test_include_of_the_wrong_type(include: str, needle: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "bad.yaml"
    spec.write_text(f"include: {include}\n" + CSV_SPEC.format(name="bad", kind="csv", path="m.csv"), encoding="utf-8")
    code, out, _ = _run(capsys, "validate", str(spec))
    assert code == 1 and f"FAIL {spec}: key 'include': expected a path or a list of paths, got " in out and needle in out
    err = _one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--results-dir", str(tmp_path / "r"))
    assert f"error: {spec}: key 'include': expected a path or a list of paths, got " in err and needle in err


def test_spec_that_is_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec = tmp_path / "latin1.yaml"
    spec.write_bytes(CSV_SPEC.format(name="latin1", kind="csv", path="m.csv").replace("cfp", "cfp # r\xe9tine")
                     .encode("latin-1"))
    err = _one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--results-dir", str(tmp_path / "r"))
    assert f"{spec}: key '<file>': not UTF-8 text (byte 0xe9 at offset" in err and "save the spec as UTF-8" in err


def test_one_bad_spec_on_the_tasks_path_breaks_nothing_else(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                            monkeypatch: pytest.MonkeyPatch, clean_index: None) -> None:
    from retbench.tasks import resolve_tasks

    folder = tmp_path / "mytasks"
    folder.mkdir()
    (folder / "good_one.yaml").write_text(CSV_SPEC.format(name="good_one", kind="csv", path="m.csv"), encoding="utf-8")
    bad = folder / "broken.yaml"
    bad.write_bytes(b"name: broken\nmodality: \xff\xfe\n")
    wrong = folder / "wrong_include.yaml"
    wrong.write_text("include: 7\n" + CSV_SPEC.format(name="wrong_include", kind="csv", path="m.csv"), encoding="utf-8")
    monkeypatch.setenv("RETBENCH_TASKS_PATH", str(folder))

    code, out, err = _run(capsys, "list", "tasks", "--format", "csv")
    assert code == 0
    names = [line.split(",")[0] for line in out.splitlines()[1:]]
    assert "good_one" in names and "eye4class" in names and "broken" not in names and "wrong_include" not in names
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: skipped invalid task spec: ") for w in warnings)
    assert str(bad) in warnings[0] and "not UTF-8" in warnings[0]
    assert str(wrong) in warnings[1] and "key 'include'" in warnings[1]

    code, out, err = _run(capsys, "list", "groups")
    assert code == 0 and "@oct" in out and len(err.strip().splitlines()) == 2
    assert resolve_tasks(["@oct"]) and resolve_tasks(["good_*"]) == ["good_one"]
    err = _one_error(capsys, "run", "-m", "classical", "-t", "broken", "--results-dir", str(tmp_path / "r"))
    assert str(bad) in err and "not UTF-8" in err


# ------------------------------------------------------------------ 4. data sources


def _source_task(tmp_path: Path, kind: str, path: str) -> tuple[Path, Path]:
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    spec = tmp_path / "src.yaml"
    spec.write_text(CSV_SPEC.format(name="src", kind=kind, path=path), encoding="utf-8")
    return spec, root


def test_empty_csv_manifest(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, root = _source_task(tmp_path, "csv", "m.csv")
    (root / "m.csv").write_bytes(b"")
    err = _one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
                     "--results-dir", str(tmp_path / "r"))
    assert f"error: {root / 'm.csv'}: empty CSV (0 bytes, no header row)" in err
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize(("kind", "expected"), [("csv", "is a folder, expected a csv file"),
                                                ("npz", "is a folder, expected a npz file"),
                                                ("folder", "is a file, expected a folder")])
def test_source_path_of_the_wrong_kind(kind: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, root = _source_task(tmp_path, kind, "thing")
    if kind == "folder":
        (root / "thing").write_text("not a folder\n")
    else:
        (root / "thing").mkdir()
    err = _one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
                     "--results-dir", str(tmp_path / "r"))
    assert f"error: task 'src': {root / 'thing'} {expected}" in err


def test_npz_missing_label(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A source that cannot drop rows (npz, folder, hf_disk) names a missing label; it used to end in a TypeError."""
    import numpy as np

    spec, root = _source_task(tmp_path, "npz", "d.npz")
    images = np.zeros((2, 8, 8, 3), dtype=np.uint8)
    np.savez(root / "d.npz", train_images=images, train_labels=np.array([0.0, np.nan]), test_images=images,
             test_labels=np.array([0.0, 1.0]))
    err = _one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
                     "--results-dir", str(tmp_path / "r"))
    assert f"error: {root / 'd.npz'}: train_labels[1]: missing label nan" in err


# ------------------------------------------------------------------ 5. the result store


def _result(model: str) -> dict:
    y, proba = [0, 0, 1, 1], [[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]]
    return {"schema": 1, "created": "2024-01-01T00:00:00+00:00", "model": {"name": model}, "primary_metric": "accuracy",
            "task": {"name": "alpha", "version": "1", "spec_hash": "s", "classes": ["a", "b"]},
            "protocol": {"name": "linear_probe", "settings": {"seeds": [0]}},
            "data": {"split_strategy": "stratified", "split_seed": 0, "image_list_hash": "h", "n_test": 4,
                     "splits": {"test": {"n": 4}}},
            "headline_k": None, "metrics": {"accuracy": {"mean": 0.75, "std": 0.0, "ci95": [0.5, 1.0]}},
            "runs": [{"seed": 0, "k": None, "metrics": {"accuracy": 0.75},
                      "predictions": {"index": [0, 1, 2, 3], "y_true": y, "proba": proba}}]}


@pytest.fixture
def store_with_incomplete_results(tmp_path: Path) -> tuple[Path, list[Path]]:
    store = tmp_path / "results"
    write_result(result_path(store, "good.v1", "alpha", "linear_probe"), _result("good.v1"))
    bad = []
    for model, drop in (("nomodel.v1", "model"), ("nometrics.v1", "metrics")):
        data = _result(model)
        del data[drop]
        bad.append(result_path(store, model, "alpha", "linear_probe"))
        write_result(bad[-1], data)
    return store, bad


def test_results_reports_incomplete_files_and_writes_csv_into_a_new_folder(
        store_with_incomplete_results: tuple[Path, list[Path]], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store, (no_model, no_metrics) = store_with_incomplete_results
    csv = tmp_path / "out" / "missing_dir" / "x.csv"
    code, out, err = _run(capsys, "results", "--results-dir", str(store), "--csv", str(csv))
    assert code == 0 and "good.v1" in out
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert warnings == [f"warning: {no_metrics}: not a complete result (no key 'metrics'); left out (delete it or rerun "
                        "with --overwrite)",
                        f"warning: {no_model}: not a complete result (no key 'model.name'); left out (delete it or rerun "
                        "with --overwrite)"]
    lines = csv.read_text().splitlines()
    assert len(lines) == 2 and lines[1].startswith("good.v1,alpha,1,linear_probe,accuracy,0.75,")
    assert [p.name for p in csv.parent.iterdir()] == ["x.csv"]  # no temporary file left


def test_results_csv_that_cannot_be_written(store_with_incomplete_results: tuple[Path, list[Path]], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    store, _ = store_with_incomplete_results
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(capsys, "results", "--results-dir", str(store), "--csv", str(tmp_path / "afile" / "x.csv"))
    assert code == 2 and f"error: --csv {tmp_path / 'afile' / 'x.csv'}: cannot write:" in err


def test_leaderboard_reports_incomplete_files(store_with_incomplete_results: tuple[Path, list[Path]], tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    store, bad = store_with_incomplete_results
    code, out, err = _run(capsys, "leaderboard", "--results-dir", str(store), "--out", str(tmp_path / "boards"),
                          "--no-figures")
    assert code == 0, err
    warnings = err.strip().splitlines()
    assert len(warnings) == 2 and all(w.startswith("warning: ") and "not a complete result" in w for w in warnings)
    assert {str(p) for p in bad} == {w.split(": ")[1] for w in warnings}
    board = (tmp_path / "boards" / "linear_probe.md").read_text()
    assert "good.v1" in board and "nomodel" not in board and "nometrics" not in board


def test_result_that_is_not_an_object(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "results"
    path = result_path(store, "list.v1", "alpha", "linear_probe")
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps([1, 2]))
    code, _, err = _run(capsys, "results", "--results-dir", str(store))
    assert code == 0 and f"warning: {path}: not a complete result (no key '<root> (not a JSON object)')" in err
    assert "no results in" in err


# ------------------------------------------------------------------ 6. read-only folders


@pytest.mark.parametrize("flag", ["--results-dir", "--cache-dir"])
def test_folder_under_a_file(flag: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    target = tmp_path / "afile" / "sub"
    other = {"--results-dir": "--cache-dir", "--cache-dir": "--results-dir"}[flag]
    err = _one_error(capsys, "run", "-m", "classical", "-t", "eye4class", flag, str(target),
                     other, str(tmp_path / "other"))
    assert f"{target}: {tmp_path / 'afile'} is a file, not a folder" in err
    assert not (tmp_path / "other").exists()


@pytest.mark.parametrize(("flag", "what"), [("--results-dir", "results folder (--results-dir)"),
                                            ("--cache-dir", "feature cache folder (--cache-dir / $RETBENCH_CACHE)")])
def test_read_only_folder(flag: str, what: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    locked = tmp_path / "locked"
    locked.mkdir()
    real_access = os.access
    # root writes through permission bits, so read-only is simulated the way a read-only mount answers access(2)
    monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if Path(p) == locked else real_access(p, mode, **kw))
    other = {"--results-dir": "--cache-dir", "--cache-dir": "--results-dir"}[flag]
    for target, suffix in ((locked, ""), (locked / "new", f" (its parent {locked} is read-only)")):
        err = _one_error(capsys, "run", "-m", "classical", "-t", "eye4class", flag, str(target),
                         other, str(tmp_path / "other"))
        assert f"error: {what} {target} is not writable{suffix}; choose another folder" in err
    assert list(locked.iterdir()) == [] and not (tmp_path / "other").exists()
    with pytest.raises(RetbenchError, match="is not writable"):
        retbench.evaluate("classical", "eye4class", "linear_probe", **{flag[2:].replace("-", "_"): str(locked)})


def test_no_cache_skips_the_cache_check(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    code, _, err = _run(capsys, "run", "-m", "classical", "-t", "eye4class", "-p", "retrieval.zero_shot", "--no-cache",
                        "--cache-dir", str(tmp_path / "afile" / "c"), "--results-dir", str(tmp_path / "r"))
    assert "does not apply" in err and "is a file" not in err  # got past the folder checks


# ------------------------------------------------------------------ 7. damaged checkpoints and a full disk


@pytest.fixture(scope="module")
def resnet18_state() -> dict:
    import timm

    return {k: v.contiguous() for k, v in timm.create_model("resnet18", pretrained=False).state_dict().items()}


def _damaged(kind: str, folder: Path, state: dict) -> Path:
    import torch
    from safetensors.torch import save

    blob = save(state)
    files = {"truncated.safetensors": blob[: len(blob) // 2], "garbage.safetensors": b"not a safetensors file at all",
             "empty.pth": b"", "empty.safetensors": b""}
    path = folder / kind
    if kind == "wrong_shapes.pth":
        torch.save({**state, "conv1.weight": torch.zeros(64, 3, 3, 3)}, path)
    else:
        path.write_bytes(files[kind])
    return path


@pytest.mark.parametrize(("kind", "needle"), [
    ("truncated.safetensors", "not a readable safetensors file (truncated or damaged?): SafetensorError"),
    ("garbage.safetensors", "not a readable safetensors file (truncated or damaged?): SafetensorError"),
    ("empty.pth", "is empty (0 bytes): an interrupted download or copy?"),
    ("empty.safetensors", "is empty (0 bytes)"),
    ("wrong_shapes.pth", "tensor 'conv1.weight' has shape (64, 3, 3, 3), timm:resnet18 expects (64, 3, 7, 7)"),
])
def test_damaged_checkpoint_is_one_line(kind: str, needle: str, resnet18_state: dict, tmp_path: Path,
                                        tiny_task: tuple[Path, Path], capsys: pytest.CaptureFixture) -> None:
    path = _damaged(kind, tmp_path, resnet18_state)
    spec, root = tiny_task
    err = _one_error(capsys, "run", "-m", "timm:resnet18", "--weights", str(path), "-t", str(spec), "--data-root",
                     str(root), "-p", "linear_probe", "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"))
    assert str(path) in err and needle in err
    assert not (tmp_path / "r").exists()


def test_full_disk_is_one_line_and_leaves_nothing_half_written(tmp_path: Path, tiny_task: tuple[Path, Path],
                                                               capsys: pytest.CaptureFixture,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import retbench.atomic_files

    spec, root = tiny_task
    argv = ["run", "-m", "classical", "-t", str(spec), "-p", "linear_probe", "--seeds", "1", "--data-root", str(root),
            "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c")]

    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(retbench.atomic_files.os, "fsync", full)
    err = _one_error(capsys, *argv)
    assert "error: cannot write " in err and "No space left on device; nothing was half-written" in err
    leftovers = [p for p in tmp_path.rglob("*") if p.is_file() and p.parent != root and root not in p.parents
                 and p != spec]
    assert leftovers == []  # no temporary file, no partial cache entry, no result
    monkeypatch.undo()  # space freed: the same command finishes
    code, _, err = _run(capsys, *argv)
    assert code == 0 and "1 written" in err, err
