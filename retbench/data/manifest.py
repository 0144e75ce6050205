"""A public task's data manifest: what a complete, correct copy of its release looks like under the data root.

Each public task spec carries a ``manifest:`` mapping (format in docs/adding_a_task.md). It is read here, not by the
spec parser proper, and is no part of ``spec_hash``: recording counts or checksums never makes results stale.
Checksums that no release publishes are recorded by the first ``retbench data prepare`` in
``<data_root>/.retbench/checksums/<task>.sha256`` (``sha256sum`` format) and checked by every later prepare and check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from retbench.atomic_files import atomic_write_bytes
from retbench.errors import DataError, SpecError
from retbench.spec import TaskSpec

CHECKSUM_DIR = ".retbench/checksums"
KEYS = {"source", "folder", "files", "classes", "splits", "sha256", "archives", "known_duplicates", "accepts"}


@dataclass(frozen=True)
class Manifest:
    """The expected content of a task's prepared data (every count optional: None / empty = not known)."""

    folder: str  # "" = unknown; the folder under the data root that prepare fills (FLAIR: the dataset's, e.g. 02_MESSIDOR)
    source: str = ""  # where the facts below come from
    files: int | None = None  # distinct image files
    classes: dict[str, int] = field(default_factory=dict)  # rows (examples) per class name
    splits: dict[str, int] = field(default_factory=dict)  # examples per given split
    sha256: dict[str, str] = field(default_factory=dict)  # data-root-relative path -> sha256, where the release fixes it
    archives: dict[str, str] = field(default_factory=dict)  # release archive file name -> sha256
    known_duplicates: tuple[tuple[str, ...], ...] = ()  # files of identical content the release is known to hold
    accepts: str = ""  # what to pass to --from (human-readable)
    origin: str = ""  # the spec or --manifest file it was read from


def manifest_of(spec: TaskSpec, override: Path | None = None) -> Manifest:
    """``spec``'s manifest, or the one in ``override`` (a YAML file: the mapping itself, or under ``manifest:``).

    A task without one gets an empty manifest (no counts): prepare still works, check compares nothing but files.
    """
    if override is not None:
        try:
            data = yaml.safe_load(override.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            raise DataError(f"--manifest {override}: cannot read it ({exc})") from None
        if isinstance(data, dict) and isinstance(data.get("manifest"), dict):
            data = data["manifest"]
        origin = str(override)
    else:
        data, origin = spec.manifest or {}, spec.file
    if not isinstance(data, dict):
        raise SpecError(origin, "manifest", "expected a mapping")
    unknown = set(data) - KEYS
    if unknown:
        raise SpecError(origin, "manifest", f"unknown key(s) {', '.join(sorted(unknown))}; allowed: {', '.join(sorted(KEYS))}")
    folder = data.get("folder") or default_folder(spec)
    return Manifest(
        folder=str(folder),
        source=str(data.get("source", "")),
        files=_count(origin, "files", data.get("files")),
        classes=_counts(origin, "classes", data.get("classes")),
        splits=_counts(origin, "splits", data.get("splits")),
        sha256={str(k): str(v).lower() for k, v in (data.get("sha256") or {}).items()},
        archives={str(k): str(v).lower() for k, v in (data.get("archives") or {}).items()},
        known_duplicates=tuple(tuple(map(str, group)) for group in data.get("known_duplicates") or ()),
        accepts=str(data.get("accepts", "")),
        origin=origin,
    )


def default_folder(spec: TaskSpec) -> str:
    """The folder prepare fills when the manifest names none: a folder source's path; for a CSV source, "" (check
    then takes the first folder its image paths share)."""
    return spec.source.path if spec.source.kind == "folder" else ""


def _count(origin: str, key: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise SpecError(origin, f"manifest.{key}", f"expected a count (int >= 0), got {value!r}")
    return value


def _counts(origin: str, key: str, value: Any) -> dict[str, int]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise SpecError(origin, f"manifest.{key}", f"expected a mapping name -> count, got {type(value).__name__}")
    return {str(k): _count(origin, f"{key}.{k}", v) or 0 for k, v in value.items()}


def checksum_file(root: Path, task: str) -> Path:
    """Where prepare records the sha256 of each file of ``task`` it placed."""
    return root / CHECKSUM_DIR / f"{task}.sha256"


def read_checksums(path: Path) -> dict[str, str]:
    """``sha256sum``-format lines (``<hex>  <relative path>``) as path -> hex; an absent file is empty."""
    if not path.is_file():
        return {}
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        digest, sep, rel = line.partition("  ")
        if not sep or len(digest) != 64:
            raise DataError(f"{path}: line {n} is not '<sha256>  <path>'")
        out[rel] = digest.lower()
    return out


def write_checksums(path: Path, checksums: dict[str, str]) -> None:
    """Atomically write ``checksums`` in ``sha256sum`` format, sorted by path."""
    atomic_write_bytes(path, "".join(f"{h}  {rel}\n" for rel, h in sorted(checksums.items())).encode())
