"""Data loading and splits: the bundled tasks on the real corpus, and precise errors on bad input."""

from __future__ import annotations

import dataclasses
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retbench.data import Examples, load_examples, make_splits
from retbench.data import data_root as resolve_data_root
from retbench.data.examples import FileImages
from retbench.errors import DataError, RetbenchError
from retbench.spec import TaskSpec, parse_spec
from retbench.tasks import get_task, task_index

# ------------------------------------------------------------------ real corpus


@pytest.fixture(scope="module")
def loaded(data_root: Path):
    """Examples of a bundled task, loaded once per module."""
    cache: dict[str, tuple[TaskSpec, object]] = {}

    def load(name: str):
        if name not in cache:
            spec = get_task(name)
            cache[name] = (spec, load_examples(spec, data_root))
        return cache[name]

    return load


def test_eye4class_counts_and_conflicting_duplicates(loaded) -> None:
    spec, ex = loaded("eye4class")
    assert len(ex) == 4213
    assert np.bincount(ex.labels).tolist() == [1036, 1098, 1005, 1074]
    assert sorted(ex.dropped) == ["conflicting_duplicate"]
    assert sorted(ex.dropped["conflicting_duplicate"]) == [
        "cataract/1415_right.jpg", "cataract/625_left.jpg", "glaucoma/1415_right.jpg", "glaucoma/625_left.jpg",
    ]
    assert not set(ex.dropped["conflicting_duplicate"]) & set(ex.ids)
    assert spec.class_names[1] == "diabetic retinopathy"
    assert all(i.startswith("diabetic_retinopathy/") for i in np.array(ex.ids)[ex.labels == 1])


def test_eye4class_dr_grading_drops_the_missing_label(loaded) -> None:
    _, ex = loaded("eye4class_dr_grading")
    assert len(ex) == 1097
    assert ex.dropped == {"missing_label": ["diabetic_retinopathy/10003_left.jpeg"]}
    assert np.bincount(ex.labels).tolist() == [815, 65, 167, 30, 20]
    assert all(p.startswith("eyepacs:") for p in ex.patients)


def test_retinamnist_given_splits(loaded) -> None:
    spec, ex = loaded("retinamnist")
    splits = make_splits(spec, ex)
    assert {k: len(v) for k, v in splits.items()} == {"train": 1080, "val": 120, "test": 400}
    assert len(ex) == 1600 and set(ex.labels.tolist()) == {0, 1, 2, 3, 4}
    img = ex.images.open(ex.ids[int(splits["test"][0])])
    assert img.size == (28, 28) and img.mode == "RGB"


def test_mx_dme_oct_dme(loaded) -> None:
    spec, ex = loaded("mx_dme_oct_dme")
    assert len(ex) == 100 and np.bincount(ex.labels).tolist() == [50, 50]
    assert spec.modality == "oct" and spec.problem == "binary"
    assert 1 < len(set(ex.patients)) < len(ex)  # real patient ids, some with several scans


def test_csdi_bins(loaded) -> None:
    spec, ex = loaded("csdi_cataract_severity")
    assert len(ex) == 187
    assert spec.source.bins == (1.0, 3.0, 5.0, 7.0)
    assert np.bincount(ex.labels, minlength=5).tolist() == [9, 30, 39, 48, 61]


@pytest.mark.parametrize("name", ["mx_dme_oct_dme", "mx_dme_cfp_dr", "eye4class", "eye4class_dr_grading"])
def test_stratified_splits_keep_each_patient_on_one_side(loaded, name: str) -> None:
    spec, ex = loaded(name)
    assert spec.splits.by_patient
    patients = np.asarray(ex.patients, dtype=object)
    assert len(set(ex.patients)) < len(ex)  # otherwise the check below would be vacuous
    splits = make_splits(spec, ex)
    assert sorted(splits) == ["test", "train"]
    train, test = splits["train"], splits["test"]
    assert not set(train) & set(test) and len(train) + len(test) == len(ex)
    assert not set(patients[train]) & set(patients[test])
    # stratified: every class is in both sides, the test share is near the requested one
    assert set(ex.labels[test]) == set(ex.labels) == set(ex.labels[train])
    assert abs(len(test) / len(ex) - spec.splits.test_fraction) < 0.12


@pytest.mark.parametrize("name", ["mx_dme_oct_dme", "eye4class_dr_grading"])
def test_validation_split_is_also_by_patient(loaded, name: str) -> None:
    spec, ex = loaded(name)
    spec = dataclasses.replace(spec, splits=dataclasses.replace(spec.splits, val_fraction=0.2))
    splits = make_splits(spec, ex)
    assert sorted(splits) == ["test", "train", "val"]
    patients = np.asarray(ex.patients, dtype=object)
    sides = [set(patients[splits[s]]) for s in ("train", "val", "test")]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert sorted(np.concatenate(list(splits.values())).tolist()) == list(range(len(ex)))


def test_splits_are_deterministic_for_a_seed(loaded) -> None:
    spec, ex = loaded("eye4class_dr_grading")
    first, again = make_splits(spec, ex), make_splits(spec, ex)
    for k in first:
        np.testing.assert_array_equal(first[k], again[k])
    other = make_splits(dataclasses.replace(spec, splits=dataclasses.replace(spec.splits, seed=1)), ex)
    assert not np.array_equal(first["test"], other["test"])


def test_every_bundled_task_loads(loaded) -> None:
    bundled = sorted(n for n, p in task_index().items() if p.parent.name == "bundled")
    assert bundled == ["csdi_cataract_severity", "eye4class", "eye4class_dr_grading", "mx_dme_cfp_dr",
                       "mx_dme_oct_dme", "retinamnist"]
    for name in bundled:
        spec, ex = loaded(name)
        assert len(ex) > 0 and ex.images.missing(ex.ids) == []
        assert ex.labels.min() >= 0 and ex.labels.max() < len(spec.classes)


# ------------------------------------------------------------------ bad input (tmp files)

SPEC = """\
name: toy
version: 1
modality: cfp
problem: multiclass
source:
  kind: csv
  path: toy/labels.csv
{source_extra}
classes:
  - {{name: a, match: ["0"]}}
  - {{name: b, match: ["1"]}}
metrics: [aca]
protocols: [linear_probe]
{extra}
"""


def csv_task(tmp_path: Path, csv_text: str, images: list[str], source_extra: str = "", extra: str = "") -> TaskSpec:
    """A CSV task in ``tmp_path/data/toy`` with the given manifest and (tiny) image files."""
    folder = tmp_path / "data" / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "labels.csv").write_text(textwrap.dedent(csv_text), encoding="utf-8")
    for name in images:
        Image.new("RGB", (8, 8), (100, 50, 20)).save(folder / name)
    spec_path = tmp_path / "toy.yaml"
    spec_path.write_text(SPEC.format(source_extra=source_extra, extra=extra), encoding="utf-8")
    return parse_spec(spec_path)


def one_line(exc: pytest.ExceptionInfo) -> str:
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_good_csv_task_loads(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label,pid\ni0.png,0,7\ni1.png,1,7\ni2.png,1,8\n",
                    ["i0.png", "i1.png", "i2.png"], source_extra="  patient_column: pid")
    ex = load_examples(spec, tmp_path / "data")
    assert ex.ids == ["i0.png", "i1.png", "i2.png"]
    assert ex.labels.tolist() == [0, 1, 1]
    assert ex.patients == ["p:7", "p:7", "p:8"]
    assert ex.given_split is None and ex.dropped == {}


def test_missing_image_file(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label\ni0.png,0\ngone.png,1\ni2.png,1\n", ["i0.png", "i2.png"])
    with pytest.raises(RetbenchError) as info:
        load_examples(spec, tmp_path / "data")
    msg = one_line(info)
    assert isinstance(info.value, DataError)
    assert "1 of 3 images missing" in msg and "gone.png" in msg


def test_label_outside_the_class_list(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label\ni0.png,0\ni1.png,1\ni2.png,7\n", ["i0.png", "i1.png", "i2.png"])
    with pytest.raises(RetbenchError) as info:
        load_examples(spec, tmp_path / "data")
    msg = one_line(info)
    csv_path = tmp_path / "data" / "toy" / "labels.csv"
    assert msg.startswith(f"{csv_path}: row 4:")  # header is line 1: the bad row is the file's 4th line
    assert "label '7' is not in the class list ['0', '1']" in msg


def test_missing_label_without_drop_flag_names_the_row(tmp_path: Path) -> None:
    csv_text = "image,label\ni0.png,0\ni1.png,\ni2.png,1\n"
    spec = csv_task(tmp_path, csv_text, ["i0.png", "i1.png", "i2.png"])
    with pytest.raises(RetbenchError) as info:
        load_examples(spec, tmp_path / "data")
    msg = one_line(info)
    assert "labels.csv: row 3:" in msg and "missing label in column 'label'" in msg


def test_missing_label_with_drop_flag_is_recorded(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label\ni0.png,0\ni1.png,\ni2.png,1\n", ["i0.png", "i1.png", "i2.png"],
                    source_extra="  drop_missing_labels: true")
    ex = load_examples(spec, tmp_path / "data")
    assert ex.ids == ["i0.png", "i2.png"] and ex.dropped == {"missing_label": ["i1.png"]}


def test_data_root_does_not_exist(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = tmp_path / "no_such_root"
    with pytest.raises(RetbenchError, match="data root does not exist") as info:
        resolve_data_root(missing)
    assert str(missing) in one_line(info)
    monkeypatch.delenv("RETBENCH_DATA", raising=False)
    with pytest.raises(RetbenchError, match="no data root"):
        resolve_data_root(None)
    monkeypatch.setenv("RETBENCH_DATA", str(tmp_path))
    assert resolve_data_root(None) == tmp_path


def test_source_file_missing_under_root(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label\ni0.png,0\n", ["i0.png"])
    (tmp_path / "data" / "toy" / "labels.csv").unlink()
    with pytest.raises(DataError) as info:
        load_examples(spec, tmp_path / "data")
    assert "toy/labels.csv" in one_line(info) and "missing" in str(info.value)


def test_empty_given_split(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label,part\ni0.png,0,train\ni1.png,1,training\ni2.png,1,train\n",
                    ["i0.png", "i1.png", "i2.png"], source_extra="  split_column: part",
                    extra="splits: {strategy: given}")
    ex = load_examples(spec, tmp_path / "data")
    assert ex.given_split == ["train", "training", "train"]
    with pytest.raises(RetbenchError) as info:
        make_splits(spec, ex)
    assert one_line(info) == "task 'toy': split 'test' is empty"


def test_unknown_given_split_name(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label,part\ni0.png,0,train\ni1.png,1,holdout\n", ["i0.png", "i1.png"],
                    source_extra="  split_column: part", extra="splits: {strategy: given}")
    with pytest.raises(DataError, match=r"unknown split names \['holdout'\]; allowed: train, val, test"):
        make_splits(spec, load_examples(spec, tmp_path / "data"))


def test_given_strategy_without_split_information(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label\ni0.png,0\ni1.png,1\n", ["i0.png", "i1.png"],
                    extra="splits: {strategy: given}")
    with pytest.raises(DataError, match="gives no split per example"):
        make_splits(spec, load_examples(spec, tmp_path / "data"))


def test_csv_without_the_named_column(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,grade\ni0.png,0\n", ["i0.png"])
    with pytest.raises(RetbenchError) as info:
        load_examples(spec, tmp_path / "data")
    msg = one_line(info)
    assert "labels.csv" in msg and "no column 'label' (columns: image, grade)" in msg


def test_unreadable_csv(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label\n", [])
    (tmp_path / "data" / "toy" / "labels.csv").write_bytes(b"image,label\n\xff\xfe\xfa\x00,\xc3\x28\n")
    with pytest.raises(DataError) as info:
        load_examples(spec, tmp_path / "data")
    assert "labels.csv: unreadable CSV" in one_line(info)


def test_csv_with_no_rows(tmp_path: Path) -> None:
    spec = csv_task(tmp_path, "image,label\n", [])
    with pytest.raises(DataError, match="yields no labelled examples"):
        load_examples(spec, tmp_path / "data")


def test_binned_scores_and_non_numeric_score(tmp_path: Path) -> None:
    names = [f"i{i}.png" for i in range(7)]
    rows = "".join(f"{n},{s}\n" for n, s in zip(names, [0, 0.5, 1, 2.9, 3, 7, 10], strict=True))
    spec = csv_task(tmp_path, "image,label\n" + rows, names, source_extra="  bins: [1]")
    ex = load_examples(spec, tmp_path / "data")
    assert ex.labels.tolist() == [0, 0, 1, 1, 1, 1, 1]  # edge 1 opens the second bin: [1, inf)
    (tmp_path / "data" / "toy" / "labels.csv").write_text("image,label\ni0.png,high\n")
    with pytest.raises(DataError, match=r"row 2: label 'high' is not a number"):
        load_examples(spec, tmp_path / "data")


def test_folder_with_unknown_class_folder(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for cls in ("a", "b", "c"):
        (root / "imgs" / cls).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / "imgs" / cls / "x.png")
    path = tmp_path / "f.yaml"
    path.write_text("name: f\nversion: 1\nmodality: cfp\nproblem: binary\nsource: {kind: folder, path: imgs}\n"
                    "classes: [a, b]\nmetrics: [aca]\nprotocols: [linear_probe]\n")
    with pytest.raises(DataError) as info:
        load_examples(parse_spec(path), root)
    assert str(root / "imgs" / "c") in one_line(info) and "label 'c' is not in the class list" in str(info.value)


def _synthetic(tmp_path: Path, n: int, splits_yaml: str) -> tuple[TaskSpec, Examples]:
    """A spec (no files needed) and ``n`` balanced two-class examples, one patient each."""
    path = tmp_path / "s.yaml"
    path.write_text(SPEC.format(source_extra="", extra=f"splits: {splits_yaml}"), encoding="utf-8")
    ids = [f"i{i}.png" for i in range(n)]
    ex = Examples(ids, np.arange(n) % 2, [f"img:{i}" for i in ids], None, FileImages(tmp_path))
    return parse_spec(path), ex


@pytest.mark.parametrize("fraction", [0.2, 0.25, 0.4, 0.6])
def test_stratified_test_fraction_is_honoured(tmp_path: Path, fraction: float) -> None:
    spec, ex = _synthetic(tmp_path, 200, f"{{test_fraction: {fraction}}}")
    test = make_splits(spec, ex)["test"]
    assert abs(len(test) / 200 - fraction) <= 0.05, f"asked for {fraction:.0%} test, got {len(test) / 200:.1%}"


def test_zero_test_fraction_is_a_user_error(tmp_path: Path) -> None:
    """``test_fraction: 0`` passes the spec's [0, 1) range check; it must fail as a one-line RetbenchError."""
    with pytest.raises(RetbenchError):
        spec, ex = _synthetic(tmp_path, 20, "{test_fraction: 0}")
        make_splits(spec, ex)
