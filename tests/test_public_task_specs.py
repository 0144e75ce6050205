"""Specs of the public benchmarks (tasks/flair, tasks/retfound) against FLAIR's partition CSVs.

The images of these benchmarks are not shipped, but FLAIR's CSVs are (``<data root>/flair/dataframes``):
every row must resolve to exactly one class, and the class counts must be the ones recorded in
``flair/SOURCE.txt`` when the CSVs were copied.
"""

from __future__ import annotations

import ast
import json
import os
from collections import Counter
from pathlib import Path

import pandas as pd
import pytest

from retbench.spec import TaskSpec, parse_spec

TASKS = Path(__file__).resolve().parents[1] / "tasks"
DATA = Path(os.environ.get("RETBENCH_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
FLAIR_TASKS = ["messidor", "fives", "refuge", "odir200x3", "jsiec20x3", "acrima", "deepdrid", "mmac"]
RETFOUND_TASKS = ["aptos2019", "messidor2", "idrid", "papila", "glaucoma_fundus", "jsiec", "retina", "octid"]

NO_DR, MILD, MOD, SEV, PDR = (f"{g} diabetic retinopathy" for g in ("no", "mild", "moderate", "severe", "proliferative"))
MM = [f"myopic maculopathy grade {g}" for g in ("cero", "one", "two", "three", "four")]

# Class counts per task, from flair/SOURCE.txt. Where SOURCE.txt gives only a total (DeepDRiD, MMAC), the
# per-class split below was read from the CSVs and the total checked against SOURCE.txt.
EXPECTED_COUNTS = {
    # SOURCE.txt: "no DR+no DME 1017, mild 262, moderate 261+86, severe 33+42, PDR 20+15" sums to 1,736 of the
    # 1,744 rows: it leaves out the 8 rows graded mild DR *with* DME (see EXPECTED_MESSIDOR_PAIRS).
    "messidor": {NO_DR: 1017, MILD: 262 + 8, MOD: 261 + 86, SEV: 33 + 42, PDR: 20 + 15},
    "jsiec20x3": {"normal": 20, "retinitis pigmentosa": 20, "macular hole": 20},
    "odir200x3": {"normal": 200, "cataract": 200, "pathologic myopia": 200},
    "fives": {"age related macular degeneration": 200, "diabetic retinopathy": 200, "glaucoma": 200, "normal": 200},
    "refuge": {"no glaucoma": 360, "glaucoma": 40},
    "acrima": {"no glaucoma": 379, "glaucoma": 367},
    "deepdrid": {NO_DR: 714 + 200, MILD: 186 + 36, MOD: 326 + 72, SEV: 282 + 72, PDR: 92 + 20},  # train + test
    "mmac": {MM[0]: 366 + 70, MM[1]: 379 + 72, MM[2]: 187 + 58, MM[3]: 37 + 8, MM[4]: 21 + 7},  # train + test
}
EXPECTED_ROWS = {  # per CSV, from SOURCE.txt
    "02_MESSIDOR.csv": 1744, "05_20x3.csv": 60, "08_ODIR200x3.csv": 600, "13_FIVES.csv": 800, "25_REFUGE.csv": 400,
    "36_ACRIMA.csv": 746, "37_DeepDRiD_train_eval.csv": 1600, "37_DeepDRiD_test.csv": 400,
    "38_MMAC23A_train.csv": 990, "38_MMAC23A_test.csv": 215,
}
DME, NO_DME = "diabetic macular edema", "no diabetic macular edema"
EXPECTED_MESSIDOR_PAIRS = {
    (NO_DR, NO_DME): 1017, (MILD, NO_DME): 262, (MILD, DME): 8, (MOD, NO_DME): 261, (MOD, DME): 86,
    (SEV, NO_DME): 33, (SEV, DME): 42, (PDR, NO_DME): 20, (PDR, DME): 15,
}
# Categories a CSV may list besides the class: only MESSIDOR's DME status, which the task ignores on purpose.
SECONDARY_CATEGORIES = {"messidor": {DME, NO_DME}}
RETFOUND_CLASS_COUNTS = {"aptos2019": 5, "messidor2": 5, "idrid": 5, "papila": 3, "glaucoma_fundus": 3,
                         "jsiec": 39, "retina": 4, "octid": 5}


def spec_of(name: str) -> TaskSpec:
    """The validated spec of a public task, found by file name."""
    folder = "flair" if name in FLAIR_TASKS else "retfound"
    return parse_spec(TASKS / folder / f"{name}.yaml")


def csv_files(spec: TaskSpec) -> list[Path]:
    """The CSV(s) a FLAIR task reads, under the data root."""
    rels = list(spec.source.files.values()) if spec.source.files else [spec.source.path]
    return [DATA / rel for rel in rels]


def read_categories(spec: TaskSpec) -> list[list[str]]:
    """Each row's category list, over all of the task's CSVs (skips when the data root lacks them)."""
    files = csv_files(spec)
    if not all(f.is_file() for f in files):
        pytest.skip(f"FLAIR partition CSVs not under {DATA} (set RETBENCH_DATA)")
    rows = []
    for f in files:
        frame = pd.read_csv(f)
        assert len(frame) == EXPECTED_ROWS[f.name], f"{f.name}: row count differs from SOURCE.txt"
        rows += [ast.literal_eval(cell) for cell in frame[spec.source.label_column]]
    return rows


@pytest.mark.parametrize("name", FLAIR_TASKS + RETFOUND_TASKS)
def test_public_spec_validates(name: str) -> None:
    spec = spec_of(name)
    assert spec.name == name
    assert "public" in spec.groups
    assert spec.source.layout and spec.source.download and spec.citation
    matches = [m for c in spec.classes for m in c.match]
    assert len(matches) == len(set(matches)), "a raw value is claimed by two classes"


@pytest.mark.parametrize("name", FLAIR_TASKS)
def test_flair_spec_follows_flair(name: str) -> None:
    spec = spec_of(name)
    assert spec.source.kind == "csv" and spec.source.label_format == "list" and spec.source.image_root == "."
    assert all(f.relative_to(DATA).parts[:2] == ("flair", "dataframes") for f in csv_files(spec))
    assert spec.primary_metric == "aca" and "kappa_quadratic" in spec.metrics
    assert bool(spec.preprocess.get("fundus_crop")) == (name == "messidor"), "FLAIR cropped MESSIDOR only"
    assert (spec.splits.strategy == "given") == bool(spec.source.files)


@pytest.mark.parametrize("name", FLAIR_TASKS)
def test_flair_rows_name_exactly_one_class(name: str) -> None:
    spec = spec_of(name)
    values = {m: c.name for c in spec.classes for m in c.match}
    allowed_extra = SECONDARY_CATEGORIES.get(name, set())
    counts: Counter[str] = Counter()
    for i, cats in enumerate(read_categories(spec)):
        hits = [values[c] for c in cats if c in values]
        assert len(hits) == 1, f"{name} row {i}: {cats} names {len(hits)} classes"
        unknown = set(cats) - set(values) - allowed_extra
        assert not unknown, f"{name} row {i}: categories {unknown} are neither a class nor a known extra"
        counts[hits[0]] += 1
    assert dict(counts) == EXPECTED_COUNTS[name]
    assert set(spec.class_names) == set(EXPECTED_COUNTS[name])


def test_messidor_dr_dme_pairs_match_source_txt() -> None:
    spec = spec_of("messidor")
    pairs = Counter((cats[0], cats[1]) for cats in read_categories(spec))
    assert dict(pairs) == EXPECTED_MESSIDOR_PAIRS


@pytest.mark.parametrize("name", FLAIR_TASKS)
def test_flair_prompts_are_flair_descriptions(name: str) -> None:
    path = DATA / "flair" / "text_descriptors.json"
    if not path.is_file():
        pytest.skip(f"{path} not found (set RETBENCH_DATA)")
    definitions = json.loads(path.read_text(encoding="utf-8"))["definitions"]
    spec = spec_of(name)
    assert spec.prompt_template == "{}"
    for c in spec.classes:
        assert list(c.prompts) == definitions.get(c.name, [c.name]), c.name


@pytest.mark.parametrize("name", RETFOUND_TASKS)
def test_retfound_spec_follows_retfound(name: str) -> None:
    spec = spec_of(name)
    assert spec.source.kind == "folder" and spec.splits.strategy == "given"
    assert spec.source.split_dirs == {"train": "train", "val": "val", "test": "test"}
    assert len(spec.classes) == RETFOUND_CLASS_COUNTS[name]
    assert all(len(c.match) == 1 for c in spec.classes)
    folders = [c.match[0] for c in spec.classes]
    assert folders == sorted(folders), "classes must be in ImageFolder (sorted) order to share RETFound's indices"
    assert spec.primary_metric == "auroc" and "kappa_unweighted" in spec.metrics
    assert spec.modality == ("oct" if name == "octid" else "cfp")
