"""``retbench data prepare`` / ``data check`` on miniature releases built at test time.

No public dataset can be downloaded here, so each test builds a tiny archive in ``tmp_path`` from real images of the
shared corpus (``../shared/data``), stored under the member names of the real release:

- FLAIR tasks (messidor, refuge, odir200x3): the file names are those of FLAIR's partition CSVs (a few rows per class
  of ``flair/dataframes/*.csv``), and the CSV travels in a miniature of FLAIR's repository archive, at the path its
  SOURCE.txt names (``local_data/dataframes/transferability/classification/``). Prepare matches images by file name
  wherever they sit, so the images' folders are the release's grouping where known (MESSIDOR's Base11..Base13 as
  the issue describes the Messidor download; ODIR-5K's ``preprocessed_images/`` named by the spec) and arbitrary
  otherwise (REFUGE's ``Training400/...``: any folder works).
- RETFound tasks (aptos2019, idrid, octid): the tree ``<root>/{train,val,test}/<class folder>/<image>`` of the
  spec's ``source.layout`` (RETFound's BENCHMARK.md split archives), root folder as the task names it (IDRiD: a
  different root, ``IDRID``, to show any root works). The specs give folders and suffix only, so the file names
  inside the class folders are placeholders in the layout's format.

The miniature holds a few images per class, so the spec's manifest (the full release) does not match it: check
reports exactly the count shortfall against the spec's manifest, and is clean against a per-test manifest
(``--manifest``) stating the miniature's counts. Each task then runs end to end with the classical adapter.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import io
import os
import tarfile
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml

from retbench.cli import main
from retbench.data.archives import scan
from retbench.data.prepare import prepare
from retbench.data.reading import patient_of
from retbench.errors import DataError
from retbench.tasks import get_task

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
if not SHARED.is_dir():
    SHARED = Path(os.environ.get("RETBENCH_DATA", "/nonexistent"))
pytestmark = pytest.mark.skipif(not (SHARED / "flair" / "dataframes").is_dir(), reason="needs ../shared/data")
FLAIR_CSV_DIR = "FLAIR-main/local_data/dataframes/transferability/classification"


def _real_images(suffix: str) -> list[Path]:
    """Real bundled images whose format fits a member name ending in ``suffix``."""
    suffix = suffix.lower()
    if suffix == ".png":
        return sorted((SHARED / "eye4class").rglob("*.png"))
    if suffix == ".jpeg":
        return sorted((SHARED / "eye4class").rglob("*.jpeg"))
    return sorted((SHARED / "eye4class" / "normal").glob("*.jpg"))


class Pool:
    """Hands out distinct real images, one per member name (so no two members share content by accident)."""

    def __init__(self) -> None:
        self.used: Counter[str] = Counter()

    def take(self, name: str) -> bytes:
        suffix = Path(name).suffix.lower()
        key = ".jpg" if suffix == ".jpg" else suffix
        path = _real_images(suffix)[self.used[key]]
        self.used[key] += 1
        return path.read_bytes()


def _zip(path: Path, members: dict[str, bytes]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return path


def _label(cell: str, classes: list[str]) -> str:
    return next(c for c in ast.literal_eval(cell) if c in classes)


def _flair_rows(task: str, per_class: int) -> tuple[list[str], list[list[str]]]:
    """The header and ``per_class`` rows per class of the task's real partition CSV (distinct images)."""
    spec = get_task(task)
    with open(SHARED / spec.source.path, newline="") as fh:
        rows = list(csv.reader(fh))
    header, picked, seen = rows[0], [], Counter()
    patients = set()  # one image per patient, so that the by-patient split can stratify the miniature
    for row in rows[1:]:
        label, patient = _label(row[3], spec.class_names), patient_of(spec, row[1])
        if seen[label] < per_class and patient not in patients:
            picked.append(row)
            seen[label] += 1
            patients.add(patient)
    return header, picked


def _csv_bytes(header: list[str], rows: list[list[str]]) -> bytes:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([header, *rows])
    return buf.getvalue().encode()


def _flair_release(tmp: Path, task: str, per_class: int,
                   folder_of: Callable[[str], tuple[str, str]]) -> tuple[list[Path], dict]:
    """A miniature FLAIR repository zip with the trimmed CSV, and the images' archive(s); plus the test manifest."""
    spec = get_task(task)
    header, rows = _flair_rows(task, per_class)
    csv_name = Path(spec.source.path).name
    sources = [_zip(tmp / "dl" / "FLAIR-main.zip", {f"{FLAIR_CSV_DIR}/{csv_name}": _csv_bytes(header, rows)})]
    pool, archives = Pool(), {}
    for row in rows:
        name = Path(row[1]).name
        archive, folder = folder_of(name)
        archives.setdefault(archive, {})[f"{folder}/{name}" if folder else name] = pool.take(name)
    sources += [_zip(tmp / "dl" / archive, members) for archive, members in archives.items()]
    counts = Counter(_label(r[3], spec.class_names) for r in rows)
    manifest = {"folder": spec.manifest["folder"], "files": len(rows), "classes": dict(counts)}
    return sources, manifest


def _messidor(name: str) -> tuple[str, str]:
    # Messidor's images come grouped Base11..Base34; the extension's *.JPG in another archive
    if name.endswith(".png"):
        base = f"Base1{1 + sum(map(ord, name)) % 3}"
        return f"{base}.zip", base
    return "IMAGES_extension.zip", "IMAGES"


def _refuge(name: str) -> tuple[str, str]:
    return "REFUGE-Training400.zip", f"Training400/{'Glaucoma' if name.startswith('g') else 'Non-Glaucoma'}"


def _odir(name: str) -> tuple[str, str]:
    return "odir5k.zip", "preprocessed_images"


FLAIR_CASES = {"messidor": (_messidor, 5), "refuge": (_refuge, 5), "odir200x3": (_odir, 5)}  # 5: test_fraction 0.2


def _retfound_release(tmp: Path, task: str, root_folder: str, per_split: dict[str, int]) -> tuple[list[Path], dict]:
    spec = get_task(task)
    pool, members, counts = Pool(), {}, Counter()
    suffix = ".jpeg" if task == "octid" else ".png" if task == "aptos2019" else ".jpg"
    n = 0
    for split, k in per_split.items():
        for cls in spec.classes:
            for _ in range(k):
                n += 1
                name = f"{split}/{cls.match[0]}/img{n:04d}{suffix}"
                members[f"{root_folder}/{name}"] = pool.take(name)
                counts[cls.name] += 1
    members[f"{root_folder}/readme.txt"] = b"split of RETFound (miniature)\n"
    archive = _zip(tmp / "dl" / f"{root_folder}.zip", members)
    manifest = {"folder": spec.source.path, "files": n, "classes": dict(counts),
                "splits": {s: k * len(spec.classes) for s, k in per_split.items()}}
    return [archive], manifest


RETFOUND_CASES = {"aptos2019": "APTOS2019", "idrid": "IDRID", "octid": "OCTID"}
SPLITS = {"train": 3, "val": 1, "test": 2}


def _release(tmp: Path, task: str) -> tuple[list[Path], dict]:
    if task in FLAIR_CASES:
        folder_of, k = FLAIR_CASES[task]
        return _flair_release(tmp, task, k, folder_of)
    return _retfound_release(tmp, task, RETFOUND_CASES[task], SPLITS)


def _cli(*argv: str) -> int:
    return main([str(a) for a in argv])


@pytest.mark.parametrize("task", [*FLAIR_CASES, *RETFOUND_CASES])
def test_prepare_check_and_run_from_a_miniature_release(task: str, tmp_path: Path, capsys) -> None:
    sources, manifest = _release(tmp_path, task)
    root = tmp_path / "root"
    froms = [a for s in sources for a in ("--from", s)]
    assert _cli("data", "prepare", task, *froms, "--data-root", root) == 0
    first = capsys.readouterr().out
    assert f"{task}: " in first and " placed (" in first
    # idempotent: a second run places nothing and says so
    assert _cli("data", "prepare", task, *froms, "--data-root", root) == 0
    assert "nothing to do: all" in capsys.readouterr().out
    # against the full release's manifest, check reports exactly the count shortfall
    assert _cli("data", "check", task, "--data-root", root) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    spec = get_task(task)
    assert lines and all(line.startswith(f"{task}: count: ") for line in lines)
    if spec.manifest.get("files"):
        assert f"{manifest['files']} images, the manifest of {spec.file} expects {spec.manifest['files']}" in lines[0]
    # against the miniature's own manifest it is clean
    mini = tmp_path / "mini_manifest.yaml"
    mini.write_text(yaml.safe_dump({"manifest": manifest}))
    assert _cli("data", "check", task, "--data-root", root, "--manifest", mini) == 0
    assert f"{task}: clean: {manifest['files']} files" in capsys.readouterr().out
    # and the task runs end to end
    assert _cli("run", "--model", "classical", "--task", task, "--protocol", "linear_probe", "--seeds", "1",
                "--data-root", root, "--results-dir", tmp_path / "results", "--cache-dir", tmp_path / "cache") == 0
    assert "1 written" in capsys.readouterr().err


def test_kaggle_aptos_release_is_refused_with_what_the_task_needs(tmp_path: Path) -> None:
    pool = Pool()
    archive = _zip(tmp_path / "aptos2019-blindness-detection.zip",
                   {"train.csv": b"id_code,diagnosis\n000c1434d8d7,2\n",
                    "train_images/000c1434d8d7.png": pool.take("x.png")})
    with pytest.raises(DataError, match="Kaggle's original APTOS 2019 release.*RETFound's released split archive"):
        prepare([get_task("aptos2019")], tmp_path / "root", [archive])
    assert not any((tmp_path / "root").iterdir())


def test_unpacked_folder_is_hard_linked_and_copy_mode_copies(tmp_path: Path, capsys) -> None:
    sources, _ = _release(tmp_path, "octid")
    with zipfile.ZipFile(sources[0]) as zf:
        zf.extractall(tmp_path / "unpacked")
    root = tmp_path / "root"
    prepare([get_task("octid")], root, [tmp_path / "unpacked"], echo=lambda s: None)
    placed = next((root / "OCTID" / "train" / "ANormal").iterdir())
    original = tmp_path / "unpacked" / "OCTID" / "train" / "ANormal" / placed.name
    assert os.path.samefile(placed, original)
    prepare([get_task("octid")], tmp_path / "root2", [tmp_path / "unpacked"], mode="copy", echo=lambda s: None)
    copied = tmp_path / "root2" / placed.relative_to(root)
    assert not os.path.samefile(copied, original) and copied.read_bytes() == original.read_bytes()


def test_interrupted_prepare_resumes_and_leaves_nothing_half_written(tmp_path: Path, monkeypatch) -> None:
    import retbench.data.prepare as prep

    sources, _ = _release(tmp_path, "refuge")
    root = tmp_path / "root"
    real, calls = prep.place, []

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prep, "place", failing)
    with pytest.raises(KeyboardInterrupt):
        prepare([get_task("refuge")], root, sources, echo=lambda s: None)
    monkeypatch.setattr(prep, "place", real)
    assert not [p for p in root.rglob("*.tmp")]
    lines: list[str] = []
    prepare([get_task("refuge")], root, sources, echo=lines.append)
    assert "4 already in place" in lines[0]


# --- bad input: one clear message naming the file, nothing written outside the root, nothing half-written ---


def _refuge_sources(tmp: Path) -> tuple[list[Path], dict]:
    return _release(tmp, "refuge")


def _no_files(root: Path) -> bool:
    return not root.exists() or not [p for p in root.rglob("*") if p.is_file() and ".retbench" not in p.parts]


def test_wrong_archive_is_named(tmp_path: Path) -> None:
    sources, _ = _refuge_sources(tmp_path)
    wrong, _ = _release(tmp_path / "other", "octid")
    with pytest.raises(DataError, match=f"{wrong[0]}: none of its .* files is one that refuge needs"):
        prepare([get_task("refuge")], tmp_path / "root", [*sources, *wrong])
    assert _no_files(tmp_path / "root")


def test_archive_holding_none_of_the_images_is_named(tmp_path: Path) -> None:
    sources, _ = _refuge_sources(tmp_path)
    octid, _ = _release(tmp_path / "other", "octid")
    with pytest.raises(DataError, match=f"none of its .* images .* is in .*{octid[0].name}"):
        prepare([get_task("refuge")], tmp_path / "root", [sources[0], *octid])
    assert _no_files(tmp_path / "root")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_partial_download_is_refused(tmp_path: Path, kind: str) -> None:
    sources, _ = _refuge_sources(tmp_path)
    images = sources[1]
    if kind == "tar.gz":
        tgz = tmp_path / "dl" / "images.tar.gz"
        with zipfile.ZipFile(images) as zf, tarfile.open(tgz, "w:gz") as tf:
            for info in zf.infolist():
                data = zf.read(info)
                ti = tarfile.TarInfo(info.filename)
                ti.size = len(data)
                tf.addfile(ti, io.BytesIO(data))
        images.unlink()
        images = tgz
    data = images.read_bytes()
    images.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=f"{images}: not a readable .* archive .*partial download"):
        prepare([get_task("refuge")], tmp_path / "root", [sources[0], images])
    assert _no_files(tmp_path / "root")


def test_corrupt_member_is_named_and_not_left_half_written(tmp_path: Path) -> None:
    sources, _ = _refuge_sources(tmp_path)
    images = sources[1]
    with zipfile.ZipFile(images) as zf:
        victim = zf.infolist()[2]
        payload = zf.read(victim)
    data = bytearray(images.read_bytes())
    at = data.find(payload) + len(payload) // 2
    data[at] ^= 0xFF
    images.write_bytes(bytes(data))
    with pytest.raises(DataError, match=f"{images}:{victim.filename}: corrupt member"):
        prepare([get_task("refuge")], tmp_path / "root", sources, echo=lambda s: None)
    name = Path(victim.filename).name
    assert not list((tmp_path / "root").rglob(name)) and not list((tmp_path / "root").rglob("*.tmp"))


def test_two_images_with_one_name_and_different_content_are_refused(tmp_path: Path) -> None:
    sources, _ = _refuge_sources(tmp_path)
    with zipfile.ZipFile(sources[1]) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".jpg"))
    other = _zip(tmp_path / "dl" / "mirror.zip", {f"Training400/{Path(name).parent.name}/{Path(name).name}":
                                                  _real_images(".jpg")[-1].read_bytes()})
    with pytest.raises(DataError, match=f"two images named '{Path(name).name}' with different content"):
        prepare([get_task("refuge")], tmp_path / "root", [*sources, other])
    assert _no_files(tmp_path / "root")


@pytest.mark.parametrize("member", ["../escape.jpg", "/tmp/abs.jpg", "symlink", "hardlink"])
def test_unsafe_members_are_refused_before_any_write(tmp_path: Path, member: str) -> None:
    sources, _ = _refuge_sources(tmp_path)
    bad = tmp_path / "dl" / "bad.tar"
    with tarfile.open(bad, "w") as tf:
        info = tarfile.TarInfo(member if member.endswith(".jpg") else f"Training400/{member}.jpg")
        if member == "symlink":
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        elif member == "hardlink":
            info.type, info.linkname = tarfile.LNKTYPE, "Training400/other.jpg"
        else:
            info.size = 3
        tf.addfile(info, io.BytesIO(b"abc") if info.isreg() else None)
    with pytest.raises(DataError, match=f"{bad}: member '.*' is .*refusing this archive"):
        prepare([get_task("refuge")], tmp_path / "root", [*sources, bad])
    assert _no_files(tmp_path / "root") and not (tmp_path / "escape.jpg").exists()


def test_zip_traversal_and_symlink_members_are_refused(tmp_path: Path) -> None:
    traversal = _zip(tmp_path / "t.zip", {"images/../../evil.png": b"x"})
    with pytest.raises(DataError, match=r"t.zip: member 'images/../../evil.png' is a path climbing out"):
        scan(traversal)
    link = tmp_path / "l.zip"
    with zipfile.ZipFile(link, "w") as zf:
        info = zipfile.ZipInfo("images/link.png")
        info.external_attr = 0o120777 << 16
        zf.writestr(info, "/etc/passwd")
    with pytest.raises(DataError, match=r"l.zip: member 'images/link.png' is a symbolic link"):
        scan(link)


# --- check: one line per problem, exit 1 ---


def test_check_reports_each_kind_of_problem(tmp_path: Path, capsys) -> None:
    sources, manifest = _release(tmp_path, "octid")
    root = tmp_path / "root"
    prepare([get_task("octid")], root, sources, echo=lambda s: None)
    mini = tmp_path / "mini.yaml"
    mini.write_text(yaml.safe_dump({"manifest": manifest}))
    base = root / "OCTID"
    train = sorted((base / "train" / "ARMD").iterdir())
    test = sorted((base / "test" / "CSR").iterdir())
    train[0].unlink()  # missing (and one fewer file than the manifest)
    (base / "train" / "ARMD" / "notes.docx").write_bytes(b"x")  # extra
    (base / "val" / "ANormal" / "stray.png").write_bytes(b"x")  # an image the task reads: unreadable
    test[0].unlink()
    test[0].write_bytes(train[1].read_bytes())  # checksum mismatch and a duplicate across splits
    (base / "val" / "fnoclass").mkdir()
    (base / "val" / "fnoclass" / "x.jpeg").write_bytes(train[2].read_bytes())  # extra: a folder of no class
    assert _cli("data", "check", "octid", "--data-root", root, "--manifest", mini) == 1
    lines = capsys.readouterr().out.strip().splitlines()
    kinds = Counter(line.split(": ")[1] for line in lines)
    assert kinds["checksum"] == 1 and kinds["duplicate"] == 1 and kinds["extra"] == 2 and kinds["unreadable"] == 1
    assert any("fnoclass/x.jpeg: an image the task does not list" in line for line in lines)
    assert kinds["count"] >= 1 and kinds["missing"] == 1
    assert any(f"{train[0].relative_to(root)}: recorded at prepare, not there any more" in line for line in lines)
    assert any("notes.docx" in line and ": extra: " in line for line in lines)
    assert any("stray.png" in line and ": unreadable: " in line for line in lines)
    assert any("in splits test, train" in line for line in lines)


def test_check_reports_a_missing_listed_file_of_a_csv_task(tmp_path: Path, capsys) -> None:
    sources, manifest = _release(tmp_path, "refuge")
    root = tmp_path / "root"
    prepare([get_task("refuge")], root, sources, echo=lambda s: None)
    victim = next((root / "25_REFUGE").rglob("*.jpg"))
    victim.unlink()
    mini = tmp_path / "mini.yaml"
    mini.write_text(yaml.safe_dump({"manifest": manifest}))
    assert _cli("data", "check", "refuge", "--data-root", root, "--manifest", mini) == 1
    out = capsys.readouterr().out
    assert f"refuge: missing: {victim.relative_to(root)}: not there" in out


# --- groups, content matching, checksums ---


def test_group_prepare_skips_tasks_with_no_files_given(tmp_path: Path, capsys) -> None:
    sources, _ = _release(tmp_path, "refuge")
    froms = [a for s in sources for a in ("--from", s)]
    assert _cli("data", "prepare", "@flair", *froms, "--data-root", tmp_path / "root") == 0
    out = capsys.readouterr().out
    assert "refuge: " in out and " placed (" in out
    assert "messidor: skipped: task 'messidor' needs its partition CSV '02_MESSIDOR.csv'" in out
    # a download no task of the group uses is a warning there (it may be for a skipped task), not an error
    octid, _ = _release(tmp_path / "other", "octid")
    assert _cli("data", "prepare", "@flair", *froms, "--from", octid[0], "--data-root", tmp_path / "root") == 0
    assert f"warning: {octid[0]}: none of its" in capsys.readouterr().out


def test_renamed_image_is_found_by_the_manifest_checksum(tmp_path: Path) -> None:
    sources, manifest = _release(tmp_path, "refuge")
    with zipfile.ZipFile(sources[1]) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    name = sorted(members)[0]
    data = members.pop(name)
    members["renamed_in_a_later_release.jpg"] = data  # the same image under another name
    _zip(sources[1], members)
    target = f"25_REFUGE/train/Images/{Path(name).name}"
    manifest["sha256"] = {target: hashlib.sha256(data).hexdigest()}
    mini = tmp_path / "mini.yaml"
    mini.write_text(yaml.safe_dump({"manifest": manifest}))
    root = tmp_path / "root"
    prepare([get_task("refuge")], root, sources, manifest_file=mini, echo=lambda s: None)
    assert (root / target).read_bytes() == data


def test_a_later_prepare_refuses_content_differing_from_the_recorded_checksum(tmp_path: Path) -> None:
    sources, _ = _release(tmp_path, "octid")
    root = tmp_path / "root"
    prepare([get_task("octid")], root, sources, echo=lambda s: None)
    assert (root / ".retbench" / "checksums" / "octid.sha256").is_file()
    victim = sorted((root / "OCTID" / "test" / "CSR").iterdir())[0]
    victim.unlink()  # deleted by hand; the source now holds another image under its name
    with zipfile.ZipFile(sources[0]) as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    members[f"OCTID/test/CSR/{victim.name}"] = _real_images(".jpeg")[-1].read_bytes()
    _zip(sources[0], members)
    with pytest.raises(DataError, match=f"OCTID/test/CSR/{victim.name}: sha256 .* differs from the sha256 recorded"):
        prepare([get_task("octid")], root, sources, echo=lambda s: None)
    assert not victim.exists() and not list(root.rglob("*.tmp"))


def test_archive_with_a_wrong_release_checksum_is_refused(tmp_path: Path) -> None:
    sources, manifest = _release(tmp_path, "octid")
    manifest["archives"] = {sources[0].name: "0" * 64}
    mini = tmp_path / "mini.yaml"
    mini.write_text(yaml.safe_dump({"manifest": manifest}))
    with pytest.raises(DataError, match=f"{sources[0]}: sha256 .* is not the release's"):
        prepare([get_task("octid")], tmp_path / "root", sources, manifest_file=mini)
    assert _no_files(tmp_path / "root")


def test_missing_archive_is_reported_and_a_rerun_with_it_completes(tmp_path: Path) -> None:
    sources, manifest = _release(tmp_path, "messidor")
    csv_zip, images = sources[0], sources[1:]
    assert len(images) >= 2
    root = tmp_path / "root"
    with pytest.raises(DataError, match=r"messidor: \d+ file\(s\) listed by the task are in none of the sources"):
        prepare([get_task("messidor")], root, [csv_zip, *images[:-1]], echo=lambda s: None)
    lines: list[str] = []
    prepare([get_task("messidor")], root, sources, echo=lines.append)
    with zipfile.ZipFile(images[-1]) as zf:
        assert f"{len(zf.namelist())} placed" in lines[0] and "already in place" in lines[0]


def test_original_messidor_tiffs_are_named_as_another_release(tmp_path: Path) -> None:
    sources, _ = _release(tmp_path, "messidor")
    tiffs = {}
    for archive in sources[1:]:
        with zipfile.ZipFile(archive) as zf:
            tiffs.update({str(Path(n).with_suffix(".tif")): zf.read(n) for n in zf.namelist()})
        archive.unlink()
    original = _zip(tmp_path / "dl" / "Base11.zip", tiffs)
    with pytest.raises(DataError, match=r"exist under another suffix \(e\.g\. \S+\.tif for \S+\.(png|JPG)\)"):
        prepare([get_task("messidor")], tmp_path / "root", [sources[0], original])


def test_partition_csv_already_under_the_data_root_is_used(tmp_path: Path, capsys) -> None:
    sources, _ = _release(tmp_path, "refuge")
    root = tmp_path / "root"
    with zipfile.ZipFile(sources[0]) as zf:
        table = zf.read(f"{FLAIR_CSV_DIR}/25_REFUGE.csv")
    (root / "flair" / "dataframes").mkdir(parents=True)
    (root / "flair" / "dataframes" / "25_REFUGE.csv").write_bytes(table)
    assert _cli("data", "prepare", "refuge", "--from", sources[1], "--data-root", root) == 0
    assert "refuge: 10 placed (10 extracted)" in capsys.readouterr().out
