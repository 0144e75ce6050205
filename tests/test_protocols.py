"""Protocols end to end (tiny synthetic task, ``tinyclip`` / ``classical``) and their leakage guarantees."""

from __future__ import annotations

import dataclasses
import json
import shutil
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CLASSES, make_tiny_task

import retbench
import retbench.protocols.linear_probe as linear_probe_module
from retbench.config import RunConfig
from retbench.errors import RetbenchError
from retbench.metrics import compute_metrics
from retbench.protocols import PROTOCOLS
from retbench.protocols.base import Context
from retbench.protocols.few_shot import FEW_SHOT
from retbench.protocols.linear_probe import LINEAR_PROBE
from retbench.runner import load_task_data
from retbench.spec import parse_spec
from retbench.tasks import get_task

CPU = torch.device("cpu")


def options(base: Path, **extra) -> dict:
    """Run options writing only under ``base``; one DataLoader worker, CPU."""
    return {"data_root": str(base / "data"), "results_dir": str(base / "results"), "cache_dir": str(base / "cache"),
            "device": "cpu", "num_workers": 1, **extra}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """One tiny task shared by the module's end-to-end runs: (spec_path, base folder)."""
    base = tmp_path_factory.mktemp("tiny")
    spec_path, _ = make_tiny_task(base)
    return spec_path, base


@pytest.fixture(scope="module")
def tiny_data(tiny):
    spec_path, base = tiny
    return load_task_data(str(spec_path), str(base / "data"))


@pytest.fixture(scope="module")
def lp_result(tiny) -> retbench.Result:
    spec_path, base = tiny
    return retbench.evaluate("tinyclip", str(spec_path), "linear_probe", **options(base, seeds=2))


@pytest.fixture(scope="module")
def fs_result(tiny) -> retbench.Result:
    spec_path, base = tiny
    return retbench.evaluate("tinyclip", str(spec_path), "few_shot", **options(base, seeds=3))


# ------------------------------------------------------------------ linear probe


def test_linear_probe_scores_exactly_the_test_split(lp_result, tiny_data) -> None:
    assert lp_result.status == "done" and lp_result.path.is_file()
    test, train = tiny_data.splits["test"], tiny_data.splits["train"]
    settings = lp_result.data["protocol"]["settings"]
    assert settings["seeds"] == [0, 1]
    runs = lp_result.data["runs"]
    assert [r["seed"] for r in runs] == [0, 1]
    for run in runs:
        assert run["predictions"]["index"] == test.tolist()
        assert run["predictions"]["y_true"] == tiny_data.examples.labels[test].tolist()
        assert run["C"] in settings["Cs"]
        assert run["n_fit"] == len(train)  # refit on train (+ carved validation), never on test
    assert lp_result.data["data"]["n_test"] == len(test)
    assert lp_result.metrics["aca"]["n"] == 2


def _context(data, features: np.ndarray) -> Context:
    return Context(spec=data.spec, examples=data.examples, splits=data.splits, features=lambda: features,
                   joint_features=None, encode_text=None, device=CPU,
                   valid=lambda: np.ones(len(data.examples), dtype=bool))


def _spy_on_probes(monkeypatch: pytest.MonkeyPatch) -> list:
    calls: list = []
    real = linear_probe_module.solve_probes

    def spy(x, y, n_classes, probes, *args, **kwargs):
        calls.append(list(probes))
        return real(x, y, n_classes, probes, *args, **kwargs)

    monkeypatch.setattr(linear_probe_module, "solve_probes", spy)
    return calls


def test_linear_probe_never_fits_on_test_rows(tiny_data, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _spy_on_probes(monkeypatch)
    n = len(tiny_data.examples)
    feats = np.random.default_rng(0).normal(size=(n, 16)).astype(np.float32)
    probe = dataclasses.replace(LINEAR_PROBE, Cs=(0.1, 1.0), seeds=(0, 1, 2))
    out = probe.run(_context(tiny_data, feats))
    test, train = set(tiny_data.splits["test"].tolist()), set(tiny_data.splits["train"].tolist())
    search, final = calls
    assert len(search) == 3 * 2 and len(final) == 3
    for p in search:  # C search: fit and validate inside train, disjoint
        assert set(p.fit.tolist()) <= train and set(p.predict.tolist()) <= train
        assert not set(p.fit.tolist()) & set(p.predict.tolist())
    for p in final:  # refit on all of train, predict test
        assert set(p.fit.tolist()) == train
        assert set(p.predict.tolist()) == test
    assert [r.extra["C"] for r in out.runs] == [p.C for p in final]
    assert all(p.C in (0.1, 1.0) for p in final)


def test_patient_grouping_in_probe_splits(data_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """mx_dme_oct_dme: carved validation (default probe) and the patient-grouped FLAIR folds never split a patient."""
    data = load_task_data("mx_dme_oct_dme", str(data_root))
    patients = np.asarray(data.examples.patients, dtype=object)
    feats = np.random.default_rng(0).normal(size=(len(patients), 8)).astype(np.float32)
    calls = _spy_on_probes(monkeypatch)
    dataclasses.replace(LINEAR_PROBE, Cs=(1.0,), seeds=(0, 1)).run(_context(data, feats))
    for p in calls[0]:
        assert not set(patients[p.fit]) & set(patients[p.predict])
    calls.clear()
    out = PROTOCOLS.get("linear_probe.flair_grouped").run(_context(data, feats))
    assert out.settings["patient_grouped"] is True and out.settings["Cs"] == [0.316]
    (folds,) = calls
    assert len(folds) == 5
    for p in folds:
        assert p.C == 0.316
        assert not set(p.fit.tolist()) & set(p.predict.tolist())
        assert not set(patients[p.fit]) & set(patients[p.predict])
        assert len(p.fit) + len(p.predict) == len(patients)


# ------------------------------------------------------------------ few-shot


def test_few_shot_supports_come_from_train_only(fs_result, tiny_data) -> None:
    train, test = set(tiny_data.splits["train"].tolist()), tiny_data.splits["test"]
    labels = tiny_data.examples.labels
    settings = fs_result.data["protocol"]["settings"]
    # 6 training images per class: k = 8 and 16 cannot be drawn and are skipped, not padded
    assert settings["shots"] == [1, 2, 4] and settings["skipped_shots"] == [8, 16]
    assert settings["seeds"] == [0, 1, 2]
    runs = fs_result.data["runs"]
    assert sorted((r["k"], r["seed"]) for r in runs) == [(k, s) for k in (1, 2, 4) for s in (0, 1, 2)]
    for run in runs:
        support = run["support"]
        assert len(support) == len(set(support)) == run["k"] * len(TINY_CLASSES)
        assert set(support) <= train and not set(support) & set(test.tolist())
        assert np.bincount(labels[support], minlength=3).tolist() == [run["k"]] * 3
        assert run["predictions"]["index"] == test.tolist()
    by_seed = {r["seed"]: r["support"] for r in runs if r["k"] == 2}
    assert by_seed[0] != by_seed[1]  # seeds draw different supports


def test_few_shot_summaries_per_k(fs_result) -> None:
    data = fs_result.data
    assert sorted(data["metrics_by_k"]) == ["1", "2", "4"]
    assert data["headline_k"] == 4
    assert data["metrics"] == data["metrics_by_k"]["4"]
    for k, summary in data["metrics_by_k"].items():
        values = [r["metrics"]["aca"] for r in data["runs"] if r["k"] == int(k)]
        assert summary["aca"]["values"] == values and summary["aca"]["n"] == 3
        assert summary["aca"]["mean"] == pytest.approx(np.mean(values))


def test_explicit_shots_larger_than_a_class_fail(tiny) -> None:
    spec_path, base = tiny
    opts = options(base, results_dir=str(base / "results_strict"))
    config = RunConfig(models=("tinyclip",), tasks=(str(spec_path),), protocols=("few_shot",), shots=(1000,), **opts)
    with pytest.raises(RetbenchError) as info:
        retbench.run(config)
    msg = str(info.value)
    assert "\n" not in msg
    assert any(f"class '{c}'" in msg for c in TINY_CLASSES), msg
    assert "6 training examples" in msg and "k=1000" in msg
    assert not (base / "results_strict").exists() or not list((base / "results_strict").rglob("*.json"))


def test_few_shot_direct_run_is_strict_only_when_asked(tiny_data) -> None:
    feats = np.random.default_rng(0).normal(size=(len(tiny_data.examples), 8)).astype(np.float32)
    loose = dataclasses.replace(FEW_SHOT, shots=(2, 50), seeds=(0,))
    out = loose.run(_context(tiny_data, feats))
    assert out.settings["shots"] == [2] and out.settings["skipped_shots"] == [50]
    with pytest.raises(RetbenchError, match="fewer than k=50"):
        dataclasses.replace(loose, strict=True).run(_context(tiny_data, feats))


# ------------------------------------------------------------------ zero-shot


def test_zero_shot_needs_a_text_tower(tiny) -> None:
    spec_path, base = tiny
    res = retbench.evaluate("classical", str(spec_path), "zero_shot", **options(base))
    assert res.status == "skipped"
    assert "classical.default" in res.reason and "no text tower" in res.reason
    assert res.path is None
    assert not (base / "results" / "tiny" / "zero_shot" / "classical.default.json").exists()


def test_zero_shot_probabilities(tiny, tiny_data) -> None:
    spec_path, base = tiny
    res = retbench.evaluate("tinyclip", str(spec_path), "zero_shot", **options(base))
    assert res.status == "done"
    (run,) = res.data["runs"]
    proba = np.array(run["predictions"]["proba"])
    assert run["predictions"]["index"] == tiny_data.splits["test"].tolist()
    assert proba.shape == (len(tiny_data.splits["test"]), 3)
    assert (proba >= 0).all()
    np.testing.assert_allclose(proba.sum(1), 1.0, atol=1e-5)
    settings = res.data["protocol"]["settings"]
    assert settings["prompts"] == get_task(str(spec_path)).class_prompts()
    assert settings["prompts"][0] == ["a red image", "reddish"]
    assert res.metrics["aca"]["ci_method"].startswith("percentile bootstrap")


# ------------------------------------------------------------------ result store and cache


def test_result_json_records_provenance(lp_result, tiny) -> None:
    spec_path, _ = tiny
    stored = json.loads(lp_result.path.read_text())
    assert lp_result.path.parent.parts[-2:] == ("tiny", "linear_probe") and lp_result.path.suffix == ".json"
    spec = parse_spec(spec_path)
    assert stored["task"]["name"] == "tiny" and stored["task"]["version"] == "3"
    assert stored["task"]["spec_hash"] == spec.spec_hash
    assert stored["task"]["classes"] == list(TINY_CLASSES)
    assert stored["preprocess"]["size"] == 64 and stored["preprocess"]["resize"] == "pad_canvas"
    assert stored["model"]["name"] == "tinyclip.test"
    assert stored["model"]["weights_identity"] == "random-init(seed=0)"
    packages = stored["environment"]["packages"]
    assert packages["torch"] == version("torch") and packages["numpy"] == version("numpy")
    assert packages["scikit-learn"] == version("scikit-learn")
    assert stored["environment"]["git"]
    assert stored["config"]["models"] is None and stored["config"]["seeds"] == 2
    assert stored["data"]["splits"]["test"]["per_class"] == [2, 2, 2]
    assert stored["primary_metric"] == "aca"
    assert len(stored["runs"]) == 2
    for run in stored["runs"]:
        preds = run["predictions"]
        assert len(preds["index"]) == len(preds["y_true"]) == len(preds["proba"]) == 6
    assert stored["feature_cache_key"]


def test_metrics_recompute_from_stored_predictions(lp_result) -> None:
    stored = json.loads(lp_result.path.read_text())
    names = tuple(stored["runs"][0]["metrics"])
    for run in stored["runs"]:
        preds = run["predictions"]
        again = compute_metrics(names, np.array(preds["y_true"]), np.array(preds["proba"]))
        for name in names:
            np.testing.assert_allclose(again[name], run["metrics"][name], atol=1e-9, err_msg=name)
    for name, summary in stored["metrics"].items():
        if "values" in summary:
            assert summary["values"] == [r["metrics"][name] for r in stored["runs"]]


def test_second_run_skips_and_overwrite_reuses_cached_features(tiny_task) -> None:
    spec_path, root = tiny_task
    base = root.parent
    first = retbench.evaluate("tinyclip", str(spec_path), "few_shot", **options(base, seeds=2))
    assert first.status == "done" and first.data["timings"]["features_from_cache"] is False
    again = retbench.evaluate("tinyclip", str(spec_path), "few_shot", **options(base, seeds=2))
    assert again.status == "existing"
    assert again.path == first.path
    assert again.data["created"] == first.data["created"]  # the file was not rewritten
    assert again.data["runs"] == json.loads(json.dumps(first.data["runs"]))
    redo = retbench.evaluate("tinyclip", str(spec_path), "few_shot", **options(base, seeds=2, overwrite=True))
    assert redo.status == "done"
    assert redo.data["timings"]["features_from_cache"] is True
    assert redo.data["feature_cache_key"] == first.data["feature_cache_key"]
    assert redo.data["metrics"]["aca"]["values"] == first.data["metrics"]["aca"]["values"]


def test_model_alias_finds_the_existing_result(fs_result, tiny) -> None:
    """``tinyclip`` and ``tinyclip.test`` are one model (same weights, same recorded name): one result file."""
    spec_path, base = tiny
    assert fs_result.data["model"]["name"] == "tinyclip.test"
    again = retbench.evaluate("tinyclip.test", str(spec_path), "few_shot", **options(base, seeds=3))
    assert again.status == "existing"
    assert again.path == fs_result.path


def test_num_workers_zero_extracts_in_process(tmp_path: Path) -> None:
    """``--num-workers 0`` (no worker processes) is a valid DataLoader setting and must work."""
    spec_path, _ = make_tiny_task(tmp_path)
    res = retbench.evaluate("tinyclip", str(spec_path), "zero_shot", **options(tmp_path, num_workers=0))
    assert res.status == "done"


# ------------------------------------------------------------------ bad images


def test_skip_bad_images(tiny_task, tmp_path: Path) -> None:
    spec_path, root = tiny_task
    copy = tmp_path / "copy"
    shutil.copytree(root, copy / "data")
    shutil.copy(spec_path, copy / "tiny.yaml")
    bad = copy / "data" / "tiny" / "green" / "green_04.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    results = copy / "results"

    with pytest.raises(RetbenchError) as info:
        retbench.evaluate("tinyclip", str(copy / "tiny.yaml"), "zero_shot", **options(copy))
    msg = str(info.value)
    assert str(bad) in msg and "--skip-bad-images" in msg
    assert not results.exists() or not list(results.rglob("*.json"))  # nothing written

    res = retbench.evaluate("tinyclip", str(copy / "tiny.yaml"), "zero_shot", **options(copy, skip_bad_images=True))
    assert res.status == "done"
    assert res.data["data"]["bad_images"] == ["green/green_04.png"]
    data = load_task_data(str(copy / "tiny.yaml"), str(copy / "data"))
    bad_index = data.examples.ids.index("green/green_04.png")
    assert bad_index in data.splits["test"]  # the corrupt image is a test image
    predicted = res.data["runs"][0]["predictions"]["index"]
    assert bad_index not in predicted
    expected_test = [i for i in data.splits["test"].tolist() if i != bad_index]
    assert predicted == expected_test and res.data["data"]["n_test"] == len(expected_test)


def test_missing_data_root_fails_before_any_work(tiny, tmp_path: Path) -> None:
    spec_path, _ = tiny
    missing = tmp_path / "nowhere"
    with pytest.raises(RetbenchError, match="data root does not exist") as info:
        retbench.evaluate("tinyclip", str(spec_path), "linear_probe", **options(tmp_path, data_root=str(missing)))
    assert str(missing) in str(info.value)
    assert not (tmp_path / "results").exists() and not (tmp_path / "cache").exists()


def test_retfound_preset_reports_its_metric_set(tiny_data) -> None:
    from retbench.protocols.linear_probe import LINEAR_PROBE_RETFOUND, RETFOUND_METRICS

    feats = np.random.default_rng(0).normal(size=(len(tiny_data.examples), 8)).astype(np.float32)
    probe = dataclasses.replace(LINEAR_PROBE_RETFOUND, Cs=(1.0,), seeds=(0,))
    (run,) = probe.run(_context(tiny_data, feats)).runs
    assert tuple(run.metrics) == (*RETFOUND_METRICS, "aca")  # the preset's set plus the task's primary metric


def test_profile_table_and_stored_timings(tiny, capsys) -> None:
    """``retbench run --profile`` prints where the time went per model; the result stores the same sections and
    the solver that ran; writing and the total live in the returned result only."""
    from retbench.cli import main

    spec_path, base = tiny
    results = base / "profile_results"
    argv = ["run", "-m", "tinyclip", "-t", str(spec_path), "-p", "linear_probe", "--seeds", "2", "--data-root",
            str(base / "data"), "--results-dir", str(results), "--cache-dir", str(base / "profile_cache"), "--device",
            "cpu", "--workers", "1", "--profile"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    for header in ("decode + preprocess", "forward", "probe fits", "summary + bootstrap", "writing", "wall time"):
        assert header in printed
    (path,) = results.rglob("*.json")
    stored = json.loads(path.read_text())
    timings = stored["timings"]
    assert timings["forward_s"] > 0 and timings["decode_s"] >= 0 and timings["probe_fit_s"] > 0
    assert timings["bootstrap_s"] > 0 and "write_s" not in timings
    assert stored["protocol"]["settings"]["solver"]["backend"] == "torch"
