"""``linear_probe.flair`` draws FLAIR's folds: FLAIR's own split code, run on 02_MESSIDOR.csv, picks the same rows.

The reference is ``get_dataloader_splits`` of github.com/jusiro/FLAIR (d6652d5), copied unchanged into
``tests/fixtures/flair_release/flair_dataloader_splits.py`` (Apache-2.0; provenance and licence there), called
as ``main_transferability.py`` calls it for the README's linear probe (``--shots_train 80% --shots_test 20%``,
``seed=iFold`` for folds 0..4). Only the partition CSV is needed, not the images.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from retbench.data.sources import SOURCES
from retbench.protocols import PROTOCOLS
from retbench.protocols.base import Context
from retbench.protocols.linear_probe import flair_fold
from retbench.tasks import get_task

FIXTURE = Path(__file__).parent / "fixtures" / "flair_release" / "flair_dataloader_splits.py"
# local_data/experiments.py (d6652d5), experiment "02_MESSIDOR": FLAIR's label of each row = targets[categories[0]]
MESSIDOR_TARGETS = {"no diabetic retinopathy": 0, "mild diabetic retinopathy": 1, "moderate diabetic retinopathy": 2,
                    "severe diabetic retinopathy": 3, "proliferative diabetic retinopathy": 4}
FOLDS = range(5)


def flair_release():
    spec = importlib.util.spec_from_file_location("flair_release_dataloader_splits", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def messidor(data_root):
    """retbench's MESSIDOR rows (read from the CSV without the images) and FLAIR's splits of the same CSV."""
    spec = get_task("messidor")
    examples = SOURCES.get(spec.source.kind)(spec, data_root)  # no image check: the images are not bundled
    csv = str(data_root / spec.source.path)
    release = flair_release()
    row_of = {image: i for i, image in enumerate(examples.ids)}
    assert len(row_of) == len(examples) == 1744
    splits = {}
    for fold in FOLDS:
        loaders = release.get_dataloader_splits(csv, "", MESSIDOR_TARGETS, shots_train="80%", shots_val="0%",
                                                shots_test="20%", balance=False, seed=fold, task="classification")
        assert loaders["val"] is None
        splits[fold] = {part: np.sort([row_of[d["image_path"]] for d in loaders[part]]) for part in ("train", "test")}
        labels = {part: [d["label"] for d in loaders[part]] for part in ("train", "test")}
        assert [spec.classes[examples.labels[row_of[d["image_path"]]]].name for d in loaders["test"]] == \
            [list(MESSIDOR_TARGETS)[k] for k in labels["test"]]  # both read the same class for every row
    return spec, examples, splits


def test_flair_fold_selects_flairs_rows_on_messidor(messidor):
    _, examples, release = messidor
    for fold in FOLDS:
        train, test = flair_fold(examples.labels, fold)
        np.testing.assert_array_equal(test, release[fold]["test"], err_msg=f"fold {fold} test rows")
        np.testing.assert_array_equal(train, release[fold]["train"], err_msg=f"fold {fold} train rows")
    # int() truncation: per class int(0.2 n) + int(0.8 n) rows, so some rows are in neither split
    counts = np.bincount(examples.labels)
    assert len(release[0]["test"]) == sum(int(20 / 100 * c) for c in counts) == 348
    assert len(examples) - len(release[0]["test"]) - len(release[0]["train"]) == 2
    # the folds differ from one another (a fresh shuffle per seed), as in FLAIR
    assert len(set(release[0]["test"]) & set(release[1]["test"])) < len(release[0]["test"])


def make_context(spec, examples, n_dim: int = 8, valid: np.ndarray | None = None) -> Context:
    gen = np.random.default_rng(0)
    x = gen.normal(size=(len(examples), n_dim)) + 0.5 * examples.labels[:, None]
    ok = np.ones(len(examples), bool) if valid is None else valid
    return Context(spec=spec, examples=examples, splits={}, features=lambda: x, joint_features=None,
                   encode_text=None, device=torch.device("cpu"), valid=lambda: ok)


def test_linear_probe_flair_runs_on_flairs_folds_and_reports_flairs_std(messidor):
    spec, examples, release = messidor
    proto = PROTOCOLS.get("linear_probe.flair")
    out = proto.run(make_context(spec, examples))
    assert [r.seed for r in out.runs] == list(FOLDS)
    for run in out.runs:
        np.testing.assert_array_equal(run.indices, release[run.seed]["test"])
        assert run.extra["n_fit"] == len(release[run.seed]["train"]) and run.extra["C"] == 0.316
    s = out.settings
    assert s["flair_split"] == "release" and s["ignores_patients"] is True and s["patient_grouped"] is False
    assert s["patient_ids"] is False and s["patient_leakage"] is None  # MESSIDOR's CSV names no patients
    assert s["rows_in_no_split"] == 2 and s["unreadable_rows_removed_after_draw"] == 0
    # FLAIR reports np.std over folds (ddof 0): its own average_folds_results on the same fold metrics
    folds = [{"aca": r.metrics["aca"], "kappa": r.metrics["kappa_quadratic"], "f1_avg": r.metrics["f1_macro"]}
             for r in out.runs]
    theirs = flair_release().average_folds_results(folds, "classification")
    std = s["fold_std_population"]
    for ours, name in (("aca", "aca"), ("kappa_quadratic", "kappa"), ("f1_macro", "f1_avg")):
        assert round(std[ours], 3) == pytest.approx(theirs[f"{name}_std"], abs=1e-9)
    values = [r.metrics["aca"] for r in out.runs]
    assert std["aca"] == pytest.approx(np.std(values, ddof=0)) and std["aca"] < np.std(values, ddof=1)


def test_unreadable_rows_leave_the_draw_unchanged(messidor):
    spec, examples, release = messidor
    valid = np.ones(len(examples), bool)
    valid[release[0]["test"][:2]] = False
    out = PROTOCOLS.get("linear_probe.flair").run(make_context(spec, examples, valid=valid))
    np.testing.assert_array_equal(out.runs[0].indices, release[0]["test"][2:])
    for run in out.runs[1:]:
        assert set(run.indices) == set(release[run.seed]["test"]) - set(np.flatnonzero(~valid))
    assert out.settings["unreadable_rows_removed_after_draw"] == 2


def test_patient_leakage_recorded_and_grouped_variant_avoids_it(messidor):
    spec, examples, _ = messidor
    # pretend consecutive rows pair up as one patient's two eyes
    paired = dataclasses.replace(examples, patients=[f"p:{i // 2}" for i in range(len(examples))])
    ctx = make_context(spec, paired)
    out = PROTOCOLS.get("linear_probe.flair").run(ctx)
    leakage = out.settings["patient_leakage"]
    assert out.settings["patient_ids"] is True and [f["fold"] for f in leakage] == list(FOLDS)
    patients = np.array(paired.patients, dtype=object)
    for run, fold in zip(out.runs, leakage):
        train, test = flair_fold(examples.labels, run.seed)
        shared = set(patients[test]) & set(patients[train])
        assert fold["test_patients"] == len(set(patients[test]))
        assert fold["test_patients_in_train"] == len(shared) > 0  # FLAIR's draw splits patients
        assert fold["test_images_of_those"] == sum(p in shared for p in patients[test])
    grouped = PROTOCOLS.get("linear_probe.flair_grouped").run(ctx)
    assert grouped.settings["flair_split"] == "grouped" and grouped.settings["patient_grouped"] is True
    assert all(f["test_patients_in_train"] == 0 for f in grouped.settings["patient_leakage"])
    assert "ignores_patients" not in grouped.settings
