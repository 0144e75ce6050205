"""``retbench data prepare``: lay a task's downloaded release out under the data root, as its spec reads it.

Two kinds of task, by their source:

- **CSV tasks** (FLAIR's): the partition CSV lists every image by its data-root-relative path. The CSV itself is
  taken from the sources (FLAIR's repository, zip or folder) when it is not already under the data root; each
  listed image is found in the sources by file name, the member whose folders best match the listed path winning
  (``13_FIVES/train/Original/1_A.png`` vs ``.../test/Original/1_A.png``); where a name is missing and the manifest
  fixes the image's sha256, by content.
- **Folder tasks** (RETFound's): every member ``.../<split>/<class folder>/<image>`` whose split and class folder
  are the task's goes to ``<source.path>/<split>/<class folder>/<image>``, whatever the archive's root folder is.

Everything is planned before anything is written: an unsafe or corrupt archive, an archive that holds nothing the
task needs, two different images claiming one target are each refused with one line naming the file. Files are
then placed one by one, each atomically (a temporary file in the target folder, then ``os.replace``): a hard link
to a file of an unpacked folder where the file system allows, else a symbolic link, and a copy when asked
(``mode="copy"``) or when the file is inside an archive. A second prepare finds every file in place and does
nothing; an interrupted one resumes. The sha256 of every placed file is recorded (see :mod:`.manifest`) and
checked against the manifest's and the earlier record before a file is placed.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from retbench.atomic_files import current_umask
from retbench.data.archives import Member, Reader, file_sha256, scan
from retbench.data.manifest import Manifest, checksum_file, manifest_of, read_checksums, write_checksums
from retbench.data.reading import IMAGE_SUFFIXES
from retbench.data.sources import SOURCES
from retbench.errors import DataError
from retbench.progress import progress_bar
from retbench.spec import TaskSpec

MODES = ("link", "symlink", "copy")


class NothingFoundError(DataError):
    """A task none of whose files is in the sources (skipped, not fatal, when a group is prepared)."""


@dataclass
class Placement:
    """One file to place: its data-root-relative target and the member it comes from."""

    target: str
    member: Member


@dataclass
class Plan:
    """What prepare will do for one task."""

    task: str
    placements: list[Placement] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # targets found in no source and absent from the data root
    used: set[Member] = field(default_factory=set)


@dataclass
class Report:
    """What prepare did for one task."""

    task: str
    placed: int = 0
    in_place: int = 0
    how: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    missing: list[str] = field(default_factory=list)

    def line(self, root: Path) -> str:
        """One summary line."""
        if not self.placed and not self.missing:
            return f"{self.task}: nothing to do: all {self.in_place} files already in place under {root}"
        how = ", ".join(f"{n} {kind}" for kind, n in sorted(self.how.items()))
        line = f"{self.task}: {self.placed} placed ({how or 'none'}), {self.in_place} already in place under {root}"
        if self.missing:
            line += f"; {len(self.missing)} not found in the sources (first: {self.missing[0]})"
        return line


class Sources:
    """The members of every ``--from`` path, indexed by file name (exact and case-folded)."""

    def __init__(self, paths: Iterable[Path]) -> None:
        self.paths = [Path(p) for p in paths]
        self.members: list[Member] = []
        self.by_source: dict[Path, list[Member]] = {}
        for path in self.paths:
            found = scan(path)
            self.by_source[path] = found
            self.members += found
        self.by_name: dict[str, list[Member]] = defaultdict(list)
        self.by_folded: dict[str, list[Member]] = defaultdict(list)
        for m in self.members:
            self.by_name[m.basename].append(m)
            self.by_folded[m.basename.lower()].append(m)
        self.reader = Reader()
        self._sha: dict[Member, str] = {}
        self._by_sha: dict[str, list[Member]] | None = None

    def sha256(self, member: Member) -> str:
        """``member``'s sha256 (computed once)."""
        if member not in self._sha:
            self._sha[member] = self.reader.sha256(member)
        return self._sha[member]

    def by_content(self, digest: str) -> list[Member]:
        """The image members whose sha256 is ``digest`` (hashes every image member the first time)."""
        if self._by_sha is None:
            self._by_sha = defaultdict(list)
            images = [m for m in self.members if PurePosixPath(m.name).suffix.lower() in IMAGE_SUFFIXES]
            with progress_bar("hashing source images", len(images)) as advance:
                for m in images:
                    self._by_sha[self.sha256(m)].append(m)
                    advance()
        return self._by_sha.get(digest, [])

    def candidates(self, target: str) -> list[Member]:
        """The members named like ``target``'s file, those whose folders match ``target``'s the furthest first."""
        name = PurePosixPath(target).name
        found = self.by_name.get(name) or self.by_folded.get(name.lower()) or []
        if len(found) < 2:
            return list(found)
        want = [p.lower() for p in PurePosixPath(target).parts[::-1]]

        def depth(m: Member) -> int:
            have = [p.lower() for p in m.parts[::-1]]
            n = 0
            while n < min(len(want), len(have)) and want[n] == have[n]:
                n += 1
            return n

        best = max(depth(m) for m in found)
        return [m for m in found if depth(m) == best]

    def close(self) -> None:
        """Close the archives."""
        self.reader.close()


def _one(sources: Sources, target: str, members: list[Member]) -> Member:
    """The member to use for ``target`` among same-named ``members``: refused when their contents differ."""
    if len(members) == 1:
        return members[0]
    first = sources.sha256(members[0])
    other = next((m for m in members[1:] if sources.sha256(m) != first), None)
    if other is not None:
        raise DataError(f"two images named '{PurePosixPath(target).name}' with different content: {members[0]} "
                        f"(sha256 {first[:12]}...) and {other} (sha256 {sources.sha256(other)[:12]}...); pass only "
                        "the right one with --from")
    return members[0]


def _inside(root: Path, target: str) -> Path:
    """``root / target``, refused when it would lie outside ``root``."""
    base = os.path.abspath(root)
    full = os.path.abspath(os.path.join(base, target))
    if not full.startswith(base + os.sep):
        raise DataError(f"'{target}' would be written outside the data root {root}; refused")
    return Path(full)


def plan_csv(spec: TaskSpec, root: Path, sources: Sources, manifest: Manifest, plan: Plan) -> None:
    """Plan a CSV task: its partition CSV(s), then every image they list."""
    tables = list(spec.source.files.values()) or [spec.source.path]
    pending_tables = []
    for rel in tables:
        found = sources.candidates(rel)
        if found:
            pending_tables.append(Placement(rel, _one(sources, rel, found)))
        elif not (root / rel).is_file():
            raise NothingFoundError(f"task '{spec.name}' needs its partition CSV '{PurePosixPath(rel).name}' (at "
                                    f"<data_root>/{rel}): pass --from the folder or zip that holds it"
                                    + (f" ({manifest.accepts})" if manifest.accepts else ""))
    # the image list comes from the CSV: read it from the source when it is not yet under the data root
    staging = None
    try:
        if pending_tables:
            staging = Path(tempfile.mkdtemp(prefix=".retbench-prepare-", dir=root))
            for p in pending_tables:
                dest = _inside(staging, p.target)
                dest.parent.mkdir(parents=True, exist_ok=True)
                with open(dest, "wb") as fh:
                    for chunk in sources.reader.chunks(p.member):
                        fh.write(chunk)
            for rel in tables:  # CSVs already in place are read from the data root
                if not (staging / rel).exists() and (root / rel).is_file():
                    dest = staging / rel
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    dest.write_bytes((root / rel).read_bytes())
        examples = SOURCES.get("csv")(spec, staging or root)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
    plan.placements += pending_tables
    plan.used.update(p.member for p in pending_tables)
    image_root = PurePosixPath(spec.source.image_root or PurePosixPath(tables[0]).parent.as_posix())
    targets = sorted({os.path.normpath((image_root / image_id).as_posix()) for image_id in examples.ids})
    for target in targets:
        _inside(root, target)
        found = sources.candidates(target)
        if not found and target in manifest.sha256:
            found = sources.by_content(manifest.sha256[target])
        if found:
            member = _one(sources, target, found)
            plan.placements.append(Placement(target, member))
            plan.used.add(member)
        elif not (root / target).exists():
            plan.missing.append(target)
    if targets and len(plan.missing) == len(targets):
        raise NothingFoundError(f"task '{spec.name}': none of its {len(targets)} images (e.g. "
                                f"{PurePosixPath(targets[0]).name}) is in {', '.join(map(str, sources.paths))}"
                                + _suffix_hint(sources, plan.missing)
                                + (f"; pass --from {manifest.accepts}" if manifest.accepts else ""))


def _suffix_hint(sources: Sources, missing: list[str]) -> str:
    """A hint when missing images exist in the sources under another suffix (another release's format)."""
    stems: dict[str, str] = {}
    for m in sources.members:
        stems.setdefault(PurePosixPath(m.basename).stem.lower(), m.basename)
    other = [(PurePosixPath(t).name, stems[PurePosixPath(t).stem.lower()]) for t in missing
             if PurePosixPath(t).stem.lower() in stems]
    if not other:
        return ""
    return (f"; {len(other)} of them exist under another suffix (e.g. {other[0][1]} for {other[0][0]}): another "
            "release of the dataset? prepare does not convert images")


def plan_folder(spec: TaskSpec, root: Path, sources: Sources, manifest: Manifest, plan: Plan) -> None:
    """Plan a folder task: ``.../<split>/<class folder>/<image>`` members, wherever the archive's root is."""
    splits = set(spec.source.split_dirs.values()) if spec.source.split_dirs else set()
    class_dirs = {m for c in spec.classes for m in (c.match or (c.name,))}
    by_target: dict[str, list[Member]] = defaultdict(list)
    for m in sources.members:
        parts = m.parts
        if PurePosixPath(m.name).suffix.lower() not in IMAGE_SUFFIXES or len(parts) < (3 if splits else 2):
            continue
        if splits:
            split, cls = parts[-3], parts[-2]
            if split in splits and cls in class_dirs:
                by_target[f"{spec.source.path}/{split}/{cls}/{parts[-1]}"].append(m)
        elif parts[-2] in class_dirs:
            by_target[f"{spec.source.path}/{parts[-2]}/{parts[-1]}"].append(m)
    if not by_target:
        hint = _release_hint(spec, sources)
        raise NothingFoundError(f"task '{spec.name}': none of the {len(sources.members)} files in "
                                f"{', '.join(map(str, sources.paths))} fits its layout "
                                f"{spec.source.layout or spec.source.path}" + (f"; {hint}" if hint else "")
                                + (f"; pass --from {manifest.accepts}" if manifest.accepts else ""))
    for target, members in sorted(by_target.items()):
        _inside(root, target)
        member = _one(sources, target, members)
        plan.placements.append(Placement(target, member))
        plan.used.add(member)


def _release_hint(spec: TaskSpec, sources: Sources) -> str:
    """A hint when the sources look like a dataset's original release rather than the split archive a task needs."""
    if spec.source.path != "APTOS2019":
        return ""
    names = {m.basename.lower() for m in sources.members}
    folders = {p.lower() for m in sources.members for p in m.parts[:-1]}
    if "train.csv" in names and "train_images" in folders:
        return ("this looks like Kaggle's original APTOS 2019 release (train_images/ + train.csv); RETFound's task "
                "needs RETFound's released split archive (APTOS2019/{train,val,test}/<class>/), whose images are "
                "AutoMorph-cropped and resized, so they cannot be rebuilt from the original")
    return ""


def plan_task(spec: TaskSpec, root: Path, sources: Sources, manifest: Manifest) -> Plan:
    """What prepare must do for ``spec``."""
    if spec.kind != "classification" or spec.source.kind not in ("csv", "folder"):
        raise DataError(f"task '{spec.name}': prepare handles classification tasks with a csv or folder source "
                        f"(this one: kind {spec.kind}, source {spec.source.kind}); lay its files out by hand")
    plan = Plan(spec.name)
    (plan_csv if spec.source.kind == "csv" else plan_folder)(spec, root, sources, manifest, plan)
    return plan


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _temp_beside(dest: Path) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    os.close(fd)
    os.unlink(tmp)
    return Path(tmp)


def _expect(target: str, digest: str, known: dict[str, str], where: str) -> None:
    if target in known and known[target] != digest:
        raise DataError(f"{target}: sha256 {digest[:12]}... differs from the {where} ({known[target][:12]}...); "
                        "a different release or a corrupt download: not placed")


def place(sources: Sources, p: Placement, root: Path, mode: str, expected: dict[str, dict[str, str]]) -> tuple[str, str]:
    """Place one file atomically; returns (how, sha256). ``expected``: where -> {target: sha256} to check first."""
    dest = _inside(root, p.target)
    m = p.member
    if m.kind == "file":
        digest = sources.sha256(m)
        for where, known in expected.items():
            _expect(p.target, digest, known, where)
        tmp = _temp_beside(dest)
        how = mode
        try:
            if mode == "link":
                try:
                    os.link(m.path, tmp)
                    how = "hard links"
                except OSError:  # another file system, or links not allowed: a symbolic link instead
                    os.symlink(os.path.abspath(m.path), tmp)
                    how = "symbolic links"
            elif mode == "symlink":
                os.symlink(os.path.abspath(m.path), tmp)
                how = "symbolic links"
            else:
                _stream(sources.reader.chunks(m), tmp)
                how = "copies"
            os.replace(tmp, dest)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return how, digest
    tmp = _temp_beside(dest)
    try:
        digest = _stream(sources.reader.chunks(m), tmp)
        for where, known in expected.items():
            _expect(p.target, digest, known, where)
        os.replace(tmp, dest)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return "extracted", digest


def _stream(chunks: Iterable[bytes], tmp: Path) -> str:
    """Write ``chunks`` to the new file ``tmp`` (mode as ``open`` would give it), fsynced; returns their sha256."""
    h = hashlib.sha256()
    with open(tmp, "xb") as fh:
        os.fchmod(fh.fileno(), 0o666 & ~current_umask())
        for chunk in chunks:
            h.update(chunk)
            fh.write(chunk)
        fh.flush()
        os.fsync(fh.fileno())
    return h.hexdigest()


def _in_place(sources: Sources, p: Placement, root: Path, recorded: dict[str, str]) -> bool:
    """Whether ``p``'s target already holds its member's content (cheaply: same file, or recorded and same size)."""
    dest = root / p.target
    if not dest.exists():
        return False
    if p.member.kind == "file" and _same_file(dest, p.member.path):
        return True
    if p.target in recorded and dest.stat().st_size == p.member.size:
        return True
    if file_sha256(dest) == sources.sha256(p.member):
        return True
    raise DataError(f"{dest}: already there with different content than {p.member}; remove it (or the wrong "
                    "--from) and prepare again")


def prepare(specs: list[TaskSpec], root: Path, paths: list[Path], mode: str = "link",
            manifest_file: Path | None = None, echo: Callable[[str], None] = print) -> list[Report]:
    """Prepare every task of ``specs`` under ``root`` from the ``--from`` ``paths``; one report per task.

    Raises :class:`DataError` (one line naming the file) on bad input before anything is written, and after
    placing what it found when some files are in none of the sources.
    """
    if mode not in MODES:
        raise DataError(f"unknown mode '{mode}'; one of {', '.join(MODES)}")
    if not paths:
        raise DataError("nothing to prepare from: pass --from PATH (an archive or a folder; repeatable)")
    root.mkdir(parents=True, exist_ok=True)
    sources = Sources(paths)
    try:
        plans = []
        for spec in specs:
            manifest = manifest_of(spec, manifest_file)
            try:
                plan = plan_task(spec, root, sources, manifest)
            except NothingFoundError as exc:
                if len(specs) == 1:
                    raise
                echo(f"{spec.name}: skipped: {exc}")
                continue
            plans.append((spec, manifest, plan))
        if not plans:
            raise DataError(f"none of the {len(specs)} tasks has a file in the sources: nothing was written")
        for _, manifest, _ in plans:
            _check_archives(sources, manifest)
        used = set().union(*(plan.used for _, _, plan in plans))
        for path, members in sources.by_source.items():
            if not any(m in used for m in members):
                names = ", ".join(s.name for s, _, _ in plans)
                message = f"{path}: none of its {len(members)} files is one that {names} needs: the wrong archive or folder?"
                if len(specs) == 1:
                    raise DataError(message + " (nothing was written)")
                echo(f"warning: {message}")  # a group: that download may be for a task skipped above
        reports = []
        for spec, manifest, plan in plans:
            reports.append(_execute(spec, manifest, plan, root, sources, mode))
            echo(reports[-1].line(root))
        missing = [(r.task, r.missing) for r in reports if r.missing]
        if missing:
            task, files = missing[0]
            raise DataError(f"{task}: {len(files)} file(s) listed by the task are in none of the sources (first: "
                            f"{files[0]}); pass the missing archive(s) with --from and rerun (placed files are kept)")
        return reports
    finally:
        sources.close()


def _check_archives(sources: Sources, manifest: Manifest) -> None:
    """Each ``--from`` archive that the manifest knows by name must have the release's sha256."""
    for path in sources.paths:
        want = manifest.archives.get(path.name)
        if want and path.is_file() and (have := file_sha256(path)) != want:
            raise DataError(f"{path}: sha256 {have[:12]}... is not the release's ({want[:12]}..., {manifest.origin}): "
                            "a partial or different download; download it again")


def _execute(spec: TaskSpec, manifest: Manifest, plan: Plan, root: Path, sources: Sources, mode: str) -> Report:
    report = Report(spec.name, missing=list(plan.missing))
    record_path = checksum_file(root, spec.name)
    recorded = read_checksums(record_path)
    checksums = dict(recorded)
    expected = {"manifest's sha256": manifest.sha256, f"sha256 recorded in {record_path}": recorded}
    try:
        with progress_bar(f"prepare {spec.name}", len(plan.placements)) as advance:
            for p in plan.placements:
                if _in_place(sources, p, root, recorded):
                    report.in_place += 1
                    if p.target not in checksums:
                        checksums[p.target] = file_sha256(root / p.target)
                else:
                    how, digest = place(sources, p, root, mode, expected)
                    report.how[how] += 1
                    report.placed += 1
                    checksums[p.target] = digest
                advance()
    finally:
        if checksums != recorded:
            write_checksums(record_path, checksums)
    return report
