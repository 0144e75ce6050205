"""Task specs: every shipped spec validates; malformed specs fail with one-line, precise errors."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from retbench.errors import SpecError
from retbench.metrics import METRICS
from retbench.protocols import PROTOCOLS
from retbench.spec import MODALITIES, PROBLEMS, load_yaml_with_includes, parse_spec
from retbench.tasks import task_index

VALID = """\
name: toy
version: 2
modality: cfp
problem: multiclass
source:
  kind: csv
  path: toy/labels.csv
classes: [a, b, c]
metrics: [aca, accuracy]
protocols: [linear_probe]
"""


def write(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def spec_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(path)
    msg = str(info.value)
    assert "\n" not in msg, msg  # one line for the user
    assert msg.startswith(str(path)), msg  # names the file first
    return info.value


# ------------------------------------------------------------------ shipped specs


@pytest.mark.parametrize("name", sorted(task_index()))
def test_shipped_spec_validates(name: str) -> None:
    path = task_index()[name]
    spec = parse_spec(path)
    assert spec.name == name
    assert spec.file == str(path)
    assert spec.version and isinstance(spec.version, str)
    assert spec.modality in MODALITIES and spec.problem in PROBLEMS
    assert spec.primary_metric in spec.metrics
    assert all(m in METRICS for m in spec.metrics)
    assert spec.protocols and all(p in PROTOCOLS for p in spec.protocols)
    assert len(spec.classes) >= 2 and len(set(spec.class_names)) == len(spec.classes)
    if spec.problem == "binary":
        assert len(spec.classes) == 2
    if spec.source.bins:
        assert len(spec.source.bins) == len(spec.classes) - 1
    prompts = spec.class_prompts()
    assert len(prompts) == len(spec.classes) and all(p and all(isinstance(t, str) and t for t in p) for p in prompts)
    assert len(spec.spec_hash) == 16


# spec_hash of every shipped spec, recorded before spec defaults and named includes were added: results
# record it, and a changed hash marks every stored result of the task stale.
SHIPPED_SPEC_HASHES = {
    "acrima": "3f7667b1731439ae", "aptos2019": "8df38ceca989a52c", "csdi_cataract_severity": "6472e4ec929b0e60",
    "csdi_retrieval": "743f41aa68ec6e0f", "csdi_vqa": "4ba0f0e5a3271534", "deepdrid": "4cfb5f43d6c513e4",
    "eye4class": "9a7f1889ce49c218", "eye4class_dr_grading": "a6d9f47574a4477d", "eye4class_vqa": "c43805240903516d",
    "fives": "d0e817f645108793", "glaucoma_fundus": "c83ed10aaa0a188d", "idrid": "a9e24e91f8f5941c",
    "jsiec": "c51e8b9dc1f4f0f4", "jsiec20x3": "4edf3d480c183f1b", "messidor": "13603648bbf69b48",
    "messidor2": "24b8e51625fd4577", "mmac": "c6a0d773101d2e75", "mx_dme_cfp_dr": "8ed14f3830891e16",
    "mx_dme_cfp_oct_retrieval": "04a2194af51b76c4", "mx_dme_cfp_vqa": "f679aa7ac6b5223d",
    "mx_dme_oct_dme": "295d24a704609384", "octid": "792f376074295208", "odir200x3": "a47616336fd2dae3",
    "papila": "ebc7b20d058fcf06", "refuge": "914fc442c1abdbcf", "retina": "8e67b12408b49fe2",
    "retinamnist": "3cdcdccd419bd18f",
}


def test_shipped_spec_hashes_are_unchanged() -> None:
    """Parsing changes (defaults, include resolution) must not re-hash a shipped task: stored results would go stale."""
    assert {name: parse_spec(path).spec_hash for name, path in task_index().items()} == SHIPPED_SPEC_HASHES


def test_task_index_finds_bundled_and_public_tasks() -> None:
    names = set(task_index())
    assert {"eye4class", "eye4class_dr_grading", "retinamnist", "mx_dme_oct_dme", "mx_dme_cfp_dr",
            "csdi_cataract_severity"} <= names
    assert {"messidor", "idrid"} <= names
    assert not any(n.startswith("_") for n in names)  # includes are not tasks


def test_bundled_spec_merges_its_includes() -> None:
    spec = parse_spec(task_index()["mx_dme_oct_dme"])
    # from _base/classification.yaml (two levels of include):
    assert spec.metrics[0] == "aca" and "mcc" in spec.metrics
    assert spec.splits.strategy == "stratified" and spec.splits.by_patient is True
    # overridden in the task file, nested key merged:
    assert spec.splits.test_fraction == pytest.approx(0.3)
    assert spec.splits.seed == 0
    # from _base/bundled.yaml, replaced (lists are not merged) by the task's own groups:
    assert spec.groups == ("bundled", "oct")
    assert spec.preprocess == {"resize": "squash"}


# ------------------------------------------------------------------ include / merge


def test_include_merges_depth_first_and_including_file_wins(tmp_path: Path) -> None:
    write(tmp_path / "_base.yaml", """\
        metrics: [aca, mcc]
        protocols: [linear_probe, few_shot]
        splits: {strategy: stratified, test_fraction: 0.4, seed: 5}
        source: {kind: csv, image_column: img}
    """)
    path = write(tmp_path / "child.yaml", """\
        include: _base.yaml
        name: child
        version: 1
        modality: oct
        problem: binary
        classes: [absent, present]
        splits: {seed: 9}
        source: {path: x.csv}
        metrics: [auroc]
    """)
    spec = parse_spec(path)
    assert spec.splits.test_fraction == pytest.approx(0.4)  # from the base
    assert spec.splits.seed == 9  # child wins inside a nested mapping
    assert spec.source.image_column == "img" and spec.source.path == "x.csv"
    assert spec.metrics == ("auroc",)  # lists are replaced, not concatenated
    assert spec.protocols == ("linear_probe", "few_shot")
    assert "include" not in spec.raw
    assert spec.class_names == ["absent", "present"]


def test_spec_hash_changes_with_content(tmp_path: Path) -> None:
    a = parse_spec(write(tmp_path / "a.yaml", VALID))
    b = parse_spec(write(tmp_path / "b.yaml", VALID.replace("[aca, accuracy]", "[aca]")))
    c = parse_spec(write(tmp_path / "c.yaml", VALID))
    assert a.spec_hash == c.spec_hash
    assert a.spec_hash != b.spec_hash


def test_include_cycle_and_missing_include(tmp_path: Path) -> None:
    write(tmp_path / "x.yaml", "include: y.yaml\nname: x\n")
    write(tmp_path / "y.yaml", "include: x.yaml\n")
    with pytest.raises(SpecError, match="include cycle"):
        load_yaml_with_includes(tmp_path / "x.yaml")
    path = write(tmp_path / "m.yaml", "include: nowhere.yaml\n" + VALID)
    err = spec_error_any(path)
    assert "nowhere.yaml" in str(err) and "file not found" in str(err) and err.key == "include"


@pytest.mark.parametrize("inc", ["classification", "classification.yaml", "_base/classification",
                                 "_base/classification.yaml"])
def test_include_a_shipped_base_by_name(tmp_path: Path, inc: str) -> None:
    """A spec outside the repository includes a shipped base by name, resolved from the shipped tasks folder."""
    base = Path(task_index()["eye4class"]).parents[1] / "_base" / "classification.yaml"
    body = VALID.replace("metrics: [aca, accuracy]\nprotocols: [linear_probe]\n", "")
    by_name = parse_spec(write(tmp_path / "a.yaml", f"include: {inc}\n" + body))
    by_path = parse_spec(write(tmp_path / "b.yaml", f"include: {base}\n" + body))
    assert by_name.raw == by_path.raw and by_name.spec_hash == by_path.spec_hash
    assert by_name.splits.by_patient is True and "kappa_quadratic" in by_name.metrics


def test_include_flair_base_by_name(tmp_path: Path) -> None:
    spec = parse_spec(write(tmp_path / "t.yaml", "include: flair\n" + VALID.replace("  kind: csv\n", "")))
    assert spec.groups == ("flair", "public") and spec.source.label_format == "list"  # from _base/flair.yaml


def test_a_local_file_wins_over_a_shipped_base(tmp_path: Path) -> None:
    write(tmp_path / "flair.yaml", "groups: [mine]\n")
    assert parse_spec(write(tmp_path / "t.yaml", "include: flair.yaml\n" + VALID)).groups == ("mine",)


def test_unknown_include_lists_the_shipped_bases(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", "include: clasification\n" + VALID))
    assert err.key == "include" and "'clasification'" in str(err)
    assert "shipped bases: bundled, classification, flair, retfound" in str(err)
    err = spec_error(write(tmp_path / "u.yaml", "include: ../../_base/classification\n" + VALID))
    assert "file not found" in str(err)  # a name never climbs out of the shipped tasks folder


def spec_error_any(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(path)
    assert "\n" not in str(info.value)
    return info.value


# ------------------------------------------------------------------ errors


def test_valid_spec_parses(tmp_path: Path) -> None:
    spec = parse_spec(write(tmp_path / "toy.yaml", VALID))
    assert spec.name == "toy" and spec.version == "2" and spec.class_names == ["a", "b", "c"]
    assert spec.primary_metric == "aca"  # defaults to the first metric
    assert spec.classes[0].match == ("a",) and spec.classes[0].prompts == ("a",)


def test_metrics_and_protocols_default_by_problem(tmp_path: Path) -> None:
    """A spec without metrics/protocols gets those of tasks/_base/classification.yaml (a grading task ranks by
    quadratic kappa, as the shipped grading tasks do); the defaults are hashed as if written out."""
    base = load_yaml_with_includes(Path(task_index()["eye4class"]).parents[1] / "_base" / "classification.yaml")
    bare = VALID.replace("metrics: [aca, accuracy]\nprotocols: [linear_probe]\n", "")
    for problem in ("binary", "multiclass", "ordinal"):
        text = bare.replace("problem: multiclass", f"problem: {problem}").replace("[a, b, c]", "[a, b]")
        spec = parse_spec(write(tmp_path / f"{problem}.yaml", text))
        assert spec.protocols == tuple(base["protocols"])
        assert sorted(spec.metrics) == sorted(base["metrics"])
        assert spec.primary_metric == spec.metrics[0] == ("kappa_quadratic" if problem == "ordinal" else "aca")
        written = text + f"metrics: [{', '.join(spec.metrics)}]\nprotocols: [{', '.join(spec.protocols)}]\n"
        assert parse_spec(write(tmp_path / f"{problem}_written.yaml", written)).spec_hash == spec.spec_hash
    assert tuple(base["metrics"]) == parse_spec(tmp_path / "binary.yaml").metrics


def test_malformed_yaml_names_file_and_line(tmp_path: Path) -> None:
    path = write(tmp_path / "bad.yaml", "name: x\nversion: 1\n  bad: indent\n")
    with pytest.raises(SpecError) as info:
        parse_spec(path)
    msg = str(info.value)
    assert str(path.resolve()) in msg
    assert "line 3" in msg and "malformed YAML" in msg
    assert "\n" not in msg


def test_malformed_included_yaml_names_the_included_file(tmp_path: Path) -> None:
    write(tmp_path / "_inc.yaml", "metrics: [aca\nprotocols: x\n")
    path = write(tmp_path / "t.yaml", "include: _inc.yaml\n" + VALID)
    with pytest.raises(SpecError) as info:
        parse_spec(path)
    assert str((tmp_path / "_inc.yaml").resolve()) in str(info.value)
    assert "line 2" in str(info.value)


def test_non_mapping_root(tmp_path: Path) -> None:
    err = spec_error_any(write(tmp_path / "list.yaml", "- a\n- b\n"))
    assert err.key == "<root>" and "mapping" in str(err)


def test_unknown_top_level_key(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", VALID + "metricz: [aca]\n")
    err = spec_error(path)
    assert err.key == "metricz" and err.file == str(path)
    assert "unknown key" in str(err) and "allowed:" in str(err) and "metrics" in str(err)


def test_unknown_nested_key_gets_dotted_name(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", VALID.replace("  path: toy/labels.csv", "  path: toy/labels.csv\n  colum: x"))
    err = spec_error(path)
    assert err.key == "source.colum"
    assert "label_column" in str(err)


def test_bad_modality_lists_allowed_values(tmp_path: Path) -> None:
    path = write(tmp_path / "t.yaml", VALID.replace("modality: cfp", "modality: fundus"))
    err = spec_error(path)
    assert err.key == "modality"
    assert "'fundus'" in str(err) and "allowed: cfp, oct" in str(err)


def test_bad_problem_lists_allowed_values(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("problem: multiclass", "problem: regression")))
    assert err.key == "problem" and "binary, multiclass, ordinal, multilabel" in str(err)


@pytest.mark.parametrize("key", ["name", "modality", "problem", "classes"])
def test_missing_required_key(tmp_path: Path, key: str) -> None:
    lines = [ln for ln in VALID.splitlines() if not ln.startswith(f"{key}:")]
    err = spec_error(write(tmp_path / "t.yaml", "\n".join(lines) + "\n"))
    assert err.key == key
    assert str(err).endswith(f"key '{key}': is required")


def test_missing_source_path(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("  path: toy/labels.csv\n", "")))
    assert err.key == "source.path" and "required" in str(err)


def test_wrong_type_names_expected_type(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("name: toy", "name: [toy]")))
    assert err.key == "name" and "expected str" in str(err)


def test_unknown_metric_suggests(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("[aca, accuracy]", "[aca, acuracy]")))
    assert err.key == "metrics"
    assert "unknown metric 'acuracy'" in str(err) and "did you mean 'accuracy'" in str(err)


def test_unknown_protocol_suggests(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("[linear_probe]", "[fewshot]")))
    assert err.key == "protocols" and "did you mean 'few_shot'" in str(err)


def test_primary_metric_must_be_listed(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID + "primary_metric: mcc\n"))
    assert err.key == "primary_metric" and "'mcc' is not in metrics: aca, accuracy" in str(err)


def test_binary_with_three_classes(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("problem: multiclass", "problem: binary")))
    assert err.key == "classes"
    assert "exactly 2 classes, got 3" in str(err)


def test_bins_count_mismatch(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("  path: toy/labels.csv", "  path: t.csv\n  bins: [1]")))
    assert err.key == "source.bins"
    assert "3 classes need 2 inner bin edges, got 1" in str(err)


def test_bins_must_increase(tmp_path: Path) -> None:
    text = VALID.replace("  path: toy/labels.csv", "  path: t.csv\n  bins: [5, 1]")
    err = spec_error(write(tmp_path / "t.yaml", text))
    assert err.key == "source.bins" and "increase" in str(err)


def test_duplicate_class_names(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("[a, b, c]", "[a, b, a]")))
    assert err.key == "classes" and "duplicate" in str(err)


def test_split_fraction_out_of_range(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID + "splits: {test_fraction: 1.5}\n"))
    assert err.key == "splits.test_fraction" and "(0, 1)" in str(err)


def test_bad_source_kind(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("kind: csv", "kind: parquet")))
    assert err.key == "source.kind" and "allowed: csv, folder, npz, hf_disk" in str(err)


@pytest.mark.parametrize("classes", ["[no, yes]", "[{name: no}, {name: yes}]"])
def test_yes_no_class_names_are_not_turned_into_booleans(tmp_path: Path, classes: str) -> None:
    """YAML 1.1 reads bare ``no``/``yes`` as booleans; a class must not silently become 'False'/'True'
    (its zero-shot prompt would be the word "False"). Either keep the text or refuse with a hint to quote it."""
    path = write(tmp_path / "t.yaml", VALID.replace("problem: multiclass", "problem: binary")
                 .replace("classes: [a, b, c]", f"classes: {classes}"))
    try:
        spec = parse_spec(path)
    except SpecError as err:
        assert err.key.startswith("classes[0]") and "\n" not in str(err)
    else:
        assert spec.class_names == ["no", "yes"]
        assert spec.class_prompts() == [["no"], ["yes"]]


def test_extra_task_folders_are_indexed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retbench.tasks import get_task, resolve_tasks

    folder = tmp_path / "mytasks"
    folder.mkdir()
    write(folder / "my_toy.yaml", VALID.replace("name: toy", "name: my_toy"))
    write(folder / "_shared.yaml", "metrics: [aca]\n")  # an include, not a task
    monkeypatch.setenv("RETBENCH_TASKS_PATH", str(folder))
    task_index.cache_clear()
    try:
        assert task_index()["my_toy"] == folder / "my_toy.yaml"
        assert "_shared" not in task_index()
        assert get_task("my_toy").name == "my_toy"
        assert resolve_tasks(["my_*", "eye4class", "my_toy"]) == ["my_toy", "eye4class"]
        assert "mx_dme_oct_dme" in resolve_tasks(["@oct"])
    finally:
        monkeypatch.delenv("RETBENCH_TASKS_PATH")
        task_index.cache_clear()
        get_task.cache_clear()
    assert "my_toy" not in task_index()


def test_multilabel_is_refused_until_implemented(tmp_path: Path) -> None:
    err = spec_error(write(tmp_path / "t.yaml", VALID.replace("problem: multiclass", "problem: multilabel")))
    assert err.key == "problem" and "no source reader or protocol implements" in str(err)
