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
        examples = SOURCES.get(spec.source.kind)(spec, root)
    except RetbenchError as exc:  # no CSV, no split folder: nothing more can be checked
        problems.append(Problem("missing", spec.source.path, str(exc)))
        return result
    base = root if spec.source.kind == "csv" else root / spec.source.path
    image_root = examples.images.root if hasattr(examples.images, "root") else base
    rel_of = {i: os.path.normpath(os.path.relpath(os.path.join(image_root, i), root)) for i in set(examples.ids)}
    listed = sorted(set(rel_of.values()))
    result.files = len(listed)
    split_of: dict[str, set[str]] = defaultdict(set)
    for image_id, split in zip(examples.ids, examples.given_split or [None] * len(examples)):
        split_of[rel_of[image_id]].add(split or "")

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
    _counts(spec, manifest, examples, len(listed), problems)
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
            for where, known in (("the manifest", manifest.sha256), ("the sha256 recorded at prepare", recorded)):
                if rel in known and known[rel] != digest:
                    problems.append(Problem("checksum", rel, f"sha256 {digest[:12]}... differs from {where} "
                                            f"({known[rel][:12]}...)"))
            if verify_images:
                try:
                    with Image.open(path) as im:
                        im.load()
                except Exception as exc:  # noqa: BLE001 - any decoder failure means unreadable
                    problems.append(Problem("unreadable", rel, f"not a readable image ({type(exc).__name__}: {exc})"))
            advance()
    _duplicates(digests, split_of, manifest, examples.given_split is not None, problems)
    return result


def _counts(spec: TaskSpec, manifest: Manifest, examples: object, files: int, problems: list[Problem]) -> None:
    where = f"manifest of {manifest.origin}"
    if manifest.files is not None and files != manifest.files:
        problems.append(Problem("count", "files", f"{files} images, the {where} expects {manifest.files} "
                                f"({_diff(files, manifest.files)})"))
    labels = Counter(int(v) for v in examples.labels)  # type: ignore[attr-defined]
    for name, want in manifest.classes.items():
        if name not in spec.class_names:
            problems.append(Problem("count", f"class '{name}'", f"the {where} names a class the task does not have"))
            continue
        have = labels.get(spec.class_names.index(name), 0)
        if have != want:
            problems.append(Problem("count", f"class '{name}'", f"{have} examples, the {where} expects {want} "
                                    f"({_diff(have, want)})"))
    given = Counter(examples.given_split or [])  # type: ignore[attr-defined]
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
