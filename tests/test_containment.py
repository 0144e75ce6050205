"""Containment: a task reads nothing outside the data root, retbench writes nothing outside ``--out`` /
``--results-dir``, and what it writes has the user's umask permissions.

- Task sources: a spec path (``source.path``, ``files``, ``image_root``, ``join``, ``split_dirs``) or a CSV image id
  that resolves outside the data root is refused with one line naming the spec file, the key or CSV row and the
  path; a symlink inside the root that points elsewhere is followed as before.
- Names: task names that are paths are refused at parse; model, task and protocol names become one visible path
  component (``safe_name``; every name safe before keeps its file); a stored result whose protocol name is not a
  file name is left out of leaderboards.
- Modes: results and cache files are ``0o666 & ~umask`` (0644 under umask 022), not mkstemp's 0600.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retbench.cli import main
from retbench.data import load_examples
from retbench.errors import DataError, SpecError
from retbench.spec.parse import parse_spec
from retbench.store import result_path, safe_name, write_result

CSV_SPEC = """\
name: {name}
version: 1
modality: cfp
problem: binary
source: {{kind: csv, path: {path}, image_column: file, label_column: label{extra}}}
classes: [{{name: a, match: ["0"]}}, {{name: b, match: ["1"]}}]
splits: {{strategy: stratified, test_fraction: 0.5, seed: 0}}
metrics: [aca]
protocols: [linear_probe]
"""


def one_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The CLI fails with exactly one ``error:`` line (exit 2) and no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


def images(folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name in names:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / name)


def manifest(path: Path, files: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("file,label\n" + "".join(f"{f},{i % 2}\n" for i, f in enumerate(files)))


NAMES = [f"{i}.png" for i in range(8)]


@pytest.fixture
def corpus(tmp_path: Path) -> tuple[Path, Path]:
    """A data root holding a valid manifest, and beside it an ``outside`` folder with one just as valid."""
    root, outside = tmp_path / "data", tmp_path / "outside"
    images(root / "in", NAMES)
    manifest(root / "in" / "labels.csv", NAMES)
    images(outside, NAMES)
    manifest(outside / "labels.csv", NAMES)
    return root, outside


def spec_file(tmp_path: Path, path: str, extra: str = "", name: str = "c") -> Path:
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(CSV_SPEC.format(name=name, path=path, extra=extra), encoding="utf-8")
    return spec


# ------------------------------------------------------------------ 1. task sources stay inside the data root


@pytest.mark.parametrize(("path", "extra", "key", "value"), [
    ("../outside/labels.csv", "", "source.path", "../outside/labels.csv"),
    ("/etc/passwd", "", "source.path", "/etc/passwd"),
    ("in/labels.csv", ", image_root: ../outside", "source.image_root", "../outside"),
    ("''", ", files: {train: in/labels.csv, test: in/../../outside/labels.csv}", "source.files.test",
     "in/../../outside/labels.csv"),
    ("in/labels.csv", ", join: {path: ../outside/labels.csv, key: file}", "source.join.path", "../outside/labels.csv"),
    ("in/labels.csv", ", join: [{path: /etc/passwd, key: file}]", "source.join[0].path", "/etc/passwd"),
])
def test_spec_path_outside_the_data_root(path: str, extra: str, key: str, value: str, corpus: tuple[Path, Path],
                                         tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root, _ = corpus
    spec = spec_file(tmp_path, path, extra)
    with pytest.raises(SpecError) as info:
        load_examples(parse_spec(spec), root)
    assert info.value.key == key
    err = one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
                    "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"))
    assert err.startswith(f"error: {spec}: key '{key}': '{value}' is outside the data root {root} (resolves to ")
    assert not (tmp_path / "r").exists()


def test_folder_split_dir_outside_the_data_root(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    root, _ = corpus
    spec = tmp_path / "f.yaml"
    spec.write_text(CSV_SPEC.format(name="f", path="in", extra="").replace("kind: csv", "kind: folder").replace(
        ", image_column: file, label_column: label", ", split_dirs: {train: ., test: ../../outside}"))
    with pytest.raises(SpecError, match=r"key 'source.split_dirs.test': '../../outside' is outside the data root"):
        load_examples(parse_spec(spec), root)


@pytest.mark.parametrize("bad", ["../outside/3.png", "in/../../outside/3.png", "ABS"])
def test_csv_image_id_outside_the_data_root(bad: str, corpus: tuple[Path, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture) -> None:
    root, outside = corpus
    bad = str(outside / "3.png") if bad == "ABS" else bad
    ids = [f"in/{n}" for n in NAMES]
    ids[3] = bad
    manifest(root / "m.csv", ids)
    spec = spec_file(tmp_path, "m.csv")
    with pytest.raises(DataError) as info:
        load_examples(parse_spec(spec), root)
    message = str(info.value)
    assert message.startswith(f"{root / 'm.csv'}: row 5: image '{bad}' (column 'file') is outside the data root "
                              f"{root} (resolves to {outside / '3.png'}; task spec {spec})"), message
    one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
              "--results-dir", str(tmp_path / "r"), "--cache-dir", str(tmp_path / "c"))
    assert not (tmp_path / "r").exists() and not (tmp_path / "c").exists()


def test_retrieval_and_vqa_image_ids_outside_the_data_root(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    from retbench.data.pairs import read_pairs
    from retbench.data.questions import read_questions

    root, _ = corpus
    (root / "p.csv").write_text("a,b,caption\nin/0.png,in/1.png,x\nin/2.png,../outside/3.png,y\n")
    pairs = tmp_path / "p.yaml"
    pairs.write_text("kind: retrieval\nname: p\nversion: 1\nsource: {kind: csv, path: p.csv}\nretrieval:\n"
                     "  sides: {a: {column: a, modality: cfp}, b: {column: b, modality: cfp}}\n"
                     "  directions: [a_to_b]\n")
    with pytest.raises(DataError, match=r"p.csv: row 3: image '../outside/3.png' \(column 'b'\) is outside the data"):
        read_pairs(parse_spec(pairs), root)
    (root / "q.csv").write_text("file,dr\nin/0.png,0\n/etc/passwd,1\n")
    vqa = tmp_path / "q.yaml"
    vqa.write_text("kind: vqa\nname: q\nversion: 1\nmodality: cfp\nsource: {kind: csv, path: q.csv, image_column: file}\n"
                   "vqa:\n  questions:\n    - {name: dr, question: 'DR?', column: dr, answers: "
                   "[{name: 'no', match: ['0']}, {name: 'yes', match: ['1']}]}\n")
    with pytest.raises(DataError, match=r"q.csv: row 3: image '/etc/passwd' \(column 'file'\) is outside the data"):
        read_questions(parse_spec(vqa), root)


def test_symlinks_and_dotdot_inside_the_root_are_fine(corpus: tuple[Path, Path], tmp_path: Path) -> None:
    root, outside = corpus
    (root / "linked").symlink_to(outside, target_is_directory=True)  # a mount point, a shared image store
    spec = spec_file(tmp_path, "linked/labels.csv")
    assert load_examples(parse_spec(spec), root).ids == NAMES
    manifest(root / "m.csv", [f"in/../linked/{n}" for n in NAMES])
    examples = load_examples(parse_spec(spec_file(tmp_path, "in/../m.csv")), root)
    assert examples.ids == [f"in/../linked/{n}" for n in NAMES]  # ids kept as written: splits and caches unchanged
    linked_root = tmp_path / "root_link"
    linked_root.symlink_to(root, target_is_directory=True)  # the data root itself a symlink
    assert load_examples(parse_spec(spec_file(tmp_path, "in/labels.csv")), linked_root).ids == NAMES


def test_bundled_tasks_read_as_before(data_root: Path) -> None:
    from retbench.tasks import get_task

    for name, n in (("mx_dme_oct_dme", 100), ("csdi_cataract_severity", 187)):
        assert len(load_examples(get_task(name), data_root)) == n


# ------------------------------------------------------------------ 2. names never leave --out / --results-dir


@pytest.mark.parametrize("name", ["../../evil", "..", "a/b", ".hidden", "a\\b", " ", "x\ny"])
def test_task_name_that_is_a_path_is_refused(name: str, corpus: tuple[Path, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    root, _ = corpus
    spec = tmp_path / "evil.yaml"
    spec.write_text(CSV_SPEC.format(name=json.dumps(name), path="in/labels.csv", extra=""), encoding="utf-8")
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert info.value.key == "name" and "\n" not in str(info.value)
    results = tmp_path / "deep" / "er" / "r"
    err = one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
                    "--results-dir", str(results), "--cache-dir", str(tmp_path / "c"))
    assert f"{spec}: key 'name': got {name!r}; a task name names files and folders" in err
    assert not (tmp_path / "deep").exists() and not (tmp_path / "evil").exists()


def test_safe_names_of_today_are_unchanged() -> None:
    today = {"local:mae@random": "local_mae_random", "timm:resnet18": "timm_resnet18",
             "classical.default": "classical.default", "classical": "classical", "tinyclip": "tinyclip",
             "local:flair@random": "local_flair_random", "flair.default": "flair.default",
             "eye4class": "eye4class", "mx_dme_cfp_oct_retrieval": "mx_dme_cfp_oct_retrieval",
             "linear_probe.flair": "linear_probe.flair", "retrieval.zero_shot": "retrieval.zero_shot",
             "few_shot": "few_shot", "local:runs/mae": "local_runs_mae", "hf:org/model-v1.2": "hf_org_model-v1.2"}
    assert {name: safe_name(name) for name in today} == today
    assert result_path(Path("results"), "local:mae@random", "eye4class", "linear_probe") == \
        Path("results/eye4class/linear_probe/local_mae_random.json")


@pytest.mark.parametrize("name", ["..", ".", "", "../../evil", "/", "a/../..", ".hidden", "..\\..\\x", "__",
                                  "local:../../../etc/x", "timm:/abs/path"])
def test_any_name_is_one_visible_component(name: str, tmp_path: Path) -> None:
    out = safe_name(name)
    assert out and "/" not in out and "\\" not in out and not out.startswith(".")
    root = tmp_path / "store"
    path = result_path(root, name, name, name)
    assert path.parent.parent.parent == root and os.path.abspath(path).startswith(str(root) + os.sep)
    write_result(path, {"x": 1})
    assert [p.relative_to(root) for p in root.rglob("*") if p.is_file()] == [path.relative_to(root)]


def test_sweep_job_keys_are_file_names() -> None:
    from retbench.sweep.grid import Job

    for model, task in (("local:../../evil", "../../evil"), ("..", ".."), ("timm:a/b", "x")):
        key = Job(model, None, task, task, "h", (), ()).key
        assert "/" not in key and not key.startswith(".") and key not in ("", ".", "..")


def _result(model: str, task: str, protocol: str) -> dict:
    y, proba = [0, 0, 1, 1], [[0.9, 0.1], [0.4, 0.6], [0.3, 0.7], [0.2, 0.8]]
    return {"schema": 1, "created": "2024-01-01T00:00:00+00:00", "model": {"name": model}, "primary_metric": "accuracy",
            "task": {"name": task, "version": "1", "spec_hash": "s", "classes": ["a", "b"]},
            "protocol": {"name": protocol, "settings": {"seeds": [0]}},
            "data": {"split_strategy": "stratified", "split_seed": 0, "image_list_hash": "h", "n_test": 4,
                     "splits": {"test": {"n": 4}}},
            "headline_k": None, "metrics": {"accuracy": {"mean": 0.75, "std": 0.0, "ci95": [0.5, 1.0]}},
            "runs": [{"seed": 0, "k": None, "metrics": {"accuracy": 0.75},
                      "predictions": {"index": [0, 1, 2, 3], "y_true": y, "proba": proba}}]}


def test_leaderboard_writes_only_under_out(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    store = tmp_path / "a" / "results"
    good = result_path(store, "good.v1", "../../evil", "linear_probe")  # a task name from a hand-written result
    write_result(good, _result("good.v1", "../../evil", "linear_probe"))
    bad = result_path(store, "good.v1", "alpha", "../../../evil")
    write_result(bad, _result("good.v1", "alpha", "../../../evil"))
    before = {p for p in tmp_path.rglob("*")}
    out = tmp_path / "a" / "b" / "boards"
    code = main(["leaderboard", "--results-dir", str(store), "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"warning: {bad}: protocol name '../../../evil' is not a file name" in err
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p == out or out in p.parents or p in out.parents for p in new), sorted(new)
    assert (out / "linear_probe.md").is_file() and (out / "figures" / "linear_probe-confusion-_.._.._evil.png").is_file()


# ------------------------------------------------------------------ 3. files get the user's umask


@pytest.fixture
def umask():
    """Set the umask for one test and restore it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_results_and_cache_files_follow_the_umask(mask: int, mode: int, umask, tmp_path: Path) -> None:
    from retbench.atomic_files import atomic_write_bytes

    umask(mask)
    path = result_path(tmp_path / "r", "timm:resnet18", "eye4class", "linear_probe")
    write_result(path, {"x": 1})
    atomic_write_bytes(tmp_path / "cache" / "k.npy", b"123")
    write_result(path, {"x": 2})  # replacing keeps the mode
    for p in (path, tmp_path / "cache" / "k.npy"):
        assert stat.S_IMODE(p.stat().st_mode) == mode, oct(p.stat().st_mode)
    assert json.loads(path.read_text()) == {"x": 2}
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_umask_read_without_proc_is_restored(umask, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import retbench.atomic_files as rio

    def no_proc(*args, **kwargs):
        raise OSError("no /proc")

    umask(0o022)
    assert rio.current_umask() == 0o022
    monkeypatch.setattr(rio, "open", no_proc, raising=False)  # macOS and other systems without /proc
    assert rio.current_umask() == 0o022
    rio.atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert stat.S_IMODE((tmp_path / "f.json").stat().st_mode) == 0o644
    assert os.umask(0o022) == 0o022  # restored
