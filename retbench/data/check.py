"""``retbench data check``: verify a prepared task against its manifest, one line per problem.

Problems: ``missing`` (a listed file absent, or a dangling link), ``extra`` (a file in the task's folder that the
task does not read), ``count`` (files, examples per class or per split differing from the manifest),
``unreadable`` (not decodable as an image), ``checksum`` (sha256 differing from the manifest's or from the one
recorded at the first prepare), ``duplicate`` (two files of identical content that a split could put on both
sides: across given splits, or anywhere in a task split at run time, unless the manifest lists them as known).
"""

from __future__ import annotations

import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from PIL import Image

from retbench.data.archives import file_sha256
from retbench.data.manifest import Manifest, checksum_file, read_checksums
from retbench.data.reading import IMAGE_SUFFIXES
from retbench.data.sources import SOURCES
from retbench.errors import DataError, RetbenchError
from retbench.progress import progress_bar
from retbench.spec import TaskSpec

IGNORED_FILES = {"readme.txt", "readme.md", "license", "license.txt", ".ds_store", "thumbs.db"}
"""Release notes that may sit in a task's folder without being an ``extra`` file (RETFound's split archives ship a
readme.txt; IDRiD's an IDRID.txt)."""


@dataclass(frozen=True)
class Problem:
    """One problem of a prepared layout."""

    kind: str  # missing, extra, count, unreadable, checksum, duplicate, source
    path: str
    detail: str

    def line(self, task: str) -> str:
        """``task: kind: path: detail``."""
        return f"{task}: {self.kind}: {self.path}: {self.detail}"


@dataclass
class CheckResult:
    """Every problem found and what was looked at."""

    task: str
    files: int = 0
    problems: list[Problem] = field(default_factory=list)

    def summary(self) -> str:
        """One closing line."""
        if not self.problems:
            return f"{self.task}: clean: {self.files} files match the manifest"
        kinds = Counter(p.kind for p in self.problems)
        return (f"{self.task}: {len(self.problems)} problem(s) in {self.files} files: "
                + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))


def check_task(spec: TaskSpec, root: Path, manifest: Manifest, verify_images: bool = True) -> CheckResult:
    """Check ``spec``'s prepared files under ``root`` against ``manifest`` (and the checksums prepare recorded)."""
    if spec.kind != "classification" or spec.source.kind not in ("csv", "folder"):
        raise DataError(f"task '{spec.name}': check covers classification tasks with csv or folder sources (this "
                        f"one: kind {spec.kind}, source {spec.source.kind}); `retbench run` checks the others on load")
    result = CheckResult(spec.name)
    problems = result.problems
    try:
        rows = _csv_rows(spec, root) if spec.source.kind == "csv" else _folder_rows(spec, root)
    except RetbenchError as exc:  # no CSV, no split folder: nothing more can be checked
        problems.append(Problem("missing", spec.source.path, str(exc)))
        return result
    listed = sorted({rel for rel, _, _ in rows})
    result.files = len(listed)
    split_of: dict[str, set[str]] = defaultdict(set)
    for rel, _, split in rows:
        split_of[rel].add(split or "")

    present = []
    for rel in listed:
        path = root / rel
        if not path.exists():
            what = "a dangling link (its source was moved or deleted)" if path.is_symlink() else "not there"
            problems.append(Problem("missing", rel, what))
        else:
            present.append(rel)
    recorded = read_checksums(checksum_file(root, spec.name))
    tables = {os.path.normpath(t) for t in (list(spec.source.files.values()) or [spec.source.path])}
    known = set(listed)
    for rel in sorted((set(recorded) | set(manifest.sha256)) - known - tables):
        if not (root / rel).exists():  # a folder task lists only what is there: the records name what was
            source = "recorded at prepare" if rel in recorded else "listed in the manifest"
            problems.append(Problem("missing", rel, f"{source}, not there any more"))
    _counts(spec, manifest, rows, len(listed), problems)
    _extra(spec, root, manifest, set(listed), problems)

    digests: dict[str, str] = {}
    with progress_bar(f"check {spec.name}", len(present)) as advance:
        for rel in present:
            path = root / rel
            try:
                digests[rel] = digest = file_sha256(path)
            except OSError as exc:
                problems.append(Problem("unreadable", rel, f"cannot read: {exc.strerror or exc}"))
                advance()
                continue
            for where, table in (("the manifest", manifest.sha256), ("the sha256 recorded at prepare", recorded)):
                if rel in table and table[rel] != digest:
                    problems.append(Problem("checksum", rel, f"sha256 {digest[:12]}... differs from {where} "
                                            f"({table[rel][:12]}...)"))
            if verify_images:
                try:
                    with Image.open(path) as im:
                        im.load()
                except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
                    problems.append(Problem("unreadable", rel, f"not a readable image ({type(exc).__name__}: {exc})"))
            advance()
    _duplicates(digests, split_of, manifest, any(split for _, _, split in rows), problems)
    return result


Row = tuple[str, int, "str | None"]
"""(data-root-relative image path, class index, given split or None): one example of the task."""


def _csv_rows(spec: TaskSpec, root: Path) -> list[Row]:
    """The examples the task's CSV(s) list, whether or not their images are there."""
    examples = SOURCES.get("csv")(spec, root)
    image_root = examples.images.root  # type: ignore[union-attr]  # a csv source reads files
    splits: list[str | None] = list(examples.given_split) if examples.given_split else [None] * len(examples)
    return [(os.path.normpath(os.path.relpath(os.path.join(image_root, i), root)), int(label), split)
            for i, label, split in zip(examples.ids, examples.labels, splits)]


def _folder_rows(spec: TaskSpec, root: Path) -> list[Row]:
    """The images in the task's ``<split>/<class folder>/`` folders (a folder of no class is left to ``extra``)."""
    base = root / spec.source.path
    if not base.is_dir():
        raise DataError(f"no folder {base}")
    class_of = {m: i for i, c in enumerate(spec.classes) for m in (c.match or (c.name,))}
    rows: list[Row] = []
    split_dirs: dict[str | None, str] = {None: ""}
    if spec.source.split_dirs:
        split_dirs = dict(spec.source.split_dirs.items())
    for split, sub in split_dirs.items():
        split_root = base / sub
        if not split_root.is_dir():
            raise DataError(f"no split folder {split_root}")
        for class_dir in sorted(p for p in split_root.iterdir() if p.is_dir() and p.name in class_of):
            for img in sorted(p for p in class_dir.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
                rows.append((os.path.relpath(img, root), class_of[class_dir.name], split))
    return rows


def _counts(spec: TaskSpec, manifest: Manifest, rows: list[Row], files: int, problems: list[Problem]) -> None:
    where = f"manifest of {manifest.origin}"
    if manifest.files is not None and files != manifest.files:
        problems.append(Problem("count", "files", f"{files} images, the {where} expects {manifest.files} "
                                f"({_diff(files, manifest.files)})"))
    labels = Counter(label for _, label, _ in rows)
    for name, want in manifest.classes.items():
        if name not in spec.class_names:
            problems.append(Problem("count", f"class '{name}'", f"the {where} names a class the task does not have"))
            continue
        have = labels.get(spec.class_names.index(name), 0)
        if have != want:
            problems.append(Problem("count", f"class '{name}'", f"{have} examples, the {where} expects {want} "
                                    f"({_diff(have, want)})"))
    given = Counter(split for _, _, split in rows if split is not None)
    for split, want in manifest.splits.items():
        if given.get(split, 0) != want:
            problems.append(Problem("count", f"split '{split}'", f"{given.get(split, 0)} examples, the {where} "
                                    f"expects {want} ({_diff(given.get(split, 0), want)})"))


def _diff(have: int, want: int) -> str:
    return f"{want - have} fewer" if have < want else f"{have - want} more"


def _extra(spec: TaskSpec, root: Path, manifest: Manifest, listed: set[str], problems: list[Problem]) -> None:
    """Files in the task's folder that the task does not read."""
    folder = manifest.folder or _common_folder(listed)
    if not folder or not (root / folder).is_dir():
        return
    tables = {os.path.normpath(t) for t in (list(spec.source.files.values()) or [spec.source.path])}
    for dirpath, dirnames, filenames in os.walk(root / folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".retbench"))
        for fn in sorted(filenames):
            rel = os.path.normpath(os.path.relpath(os.path.join(dirpath, fn), root))
            if rel in listed or rel in tables or fn.lower() in IGNORED_FILES:
                continue
            if fn.startswith(".") and fn.endswith(".tmp"):
                problems.append(Problem("extra", rel, "a temporary file of an interrupted prepare (delete it)"))
            elif PurePosixPath(fn).suffix.lower() in IMAGE_SUFFIXES:
                problems.append(Problem("extra", rel, "an image the task does not list (wrong class or split folder?)"))
            else:
                problems.append(Problem("extra", rel, "a file the task does not read"))


def _common_folder(listed: set[str]) -> str:
    firsts = {PurePosixPath(p).parts[0] for p in listed if len(PurePosixPath(p).parts) > 1}
    return firsts.pop() if len(firsts) == 1 else ""


def _duplicates(digests: dict[str, str], split_of: dict[str, set[str]], manifest: Manifest, given: bool,
                problems: list[Problem]) -> None:
    known = {frozenset(g) for g in manifest.known_duplicates}
    groups: dict[str, list[str]] = defaultdict(list)
    for rel, digest in digests.items():
        groups[digest].append(rel)
    for digest, rels in sorted(groups.items(), key=lambda kv: sorted(kv[1])):
        if len(rels) < 2 or frozenset(rels) in known:
            continue
        rels = sorted(rels)
        if given:
            splits = set().union(*(split_of[r] for r in rels))
            if len(splits) < 2:
                continue
            detail = f"same content (sha256 {digest[:12]}...) in splits {', '.join(sorted(splits))}: " + ", ".join(rels[1:])
        else:
            detail = f"same content (sha256 {digest[:12]}...) as " + ", ".join(rels[1:]) + " (a split may separate them)"
        problems.append(Problem("duplicate", rels[0], detail))
