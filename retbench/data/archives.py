"""What the user downloaded, read without unpacking: folders, zip and tar archives, as one list of members.

``retbench data prepare`` matches the files a task needs against these members. Every archive is scanned
before anything is written, and refused whole, with one line naming the archive and the member, when a member
could write outside the folder it is unpacked into (``../``, an absolute path, a drive letter), is a link
(tar symlink or hard link, zip symlink), a device or a fifo; a truncated or corrupt archive is refused the same
way. Members are only ever streamed into files whose paths prepare chose itself, never extracted by name.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO

from retbench.errors import DataError

TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
ARCHIVE_SUFFIXES = (".zip",) + TAR_SUFFIXES
CHUNK = 1 << 20
IMAGE_FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp")


@dataclass(frozen=True)
class Member:
    """One regular file of a source: a file in a folder, or a member of a zip or tar archive."""

    source: Path  # the folder or archive it came from (as given by the user)
    name: str  # posix path inside the source
    size: int
    kind: str  # "file" (a plain file on disk: ``source / name``), "zip" or "tar"

    @property
    def basename(self) -> str:
        """The file name without folders."""
        return PurePosixPath(self.name).name

    @property
    def parts(self) -> tuple[str, ...]:
        """The path components inside the source."""
        return PurePosixPath(self.name).parts

    @property
    def path(self) -> Path:
        """The file on disk (``kind == "file"`` only)."""
        return self.source / self.name

    def __str__(self) -> str:
        return str(self.path) if self.kind == "file" else f"{self.source}:{self.name}"


def is_archive(path: Path) -> bool:
    """Whether ``path``'s name ends like a zip or tar archive."""
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def unsafe_reason(name: str) -> str | None:
    """Why an archive member name could write outside the unpacking folder, or None when it cannot."""
    if name.startswith(("/", "\\")) or PurePosixPath(name).is_absolute():
        return "an absolute path"
    if len(name) > 1 and name[1] == ":":
        return "a drive-letter path"
    if ".." in name.replace("\\", "/").split("/"):
        return "a path climbing out of the archive ('..')"
    return None


def _refuse(archive: Path, name: str, why: str) -> DataError:
    return DataError(f"{archive}: member '{name}' is {why}; refusing this archive (nothing was written from it)")


def scan(path: Path) -> list[Member]:
    """Every regular file of ``path`` (a folder, a zip or a tar archive), each archive checked whole first.

    A folder's archives (``*.zip``, ``*.tar.gz``, ...) are scanned too, so that ``--from ~/Downloads/messidor``
    reads ``Base11.zip`` ... ``Base34.zip`` inside it; a single CSV or image file is a source of one member.
    """
    if path.is_dir():
        return _scan_folder(path)
    if not path.is_file():
        raise DataError(f"--from {path}: no such file or folder")
    name = path.name.lower()
    if name.endswith(".zip"):
        return _scan_zip(path)
    if name.endswith(TAR_SUFFIXES):
        return _scan_tar(path)
    if name.endswith((".7z", ".rar")):
        raise DataError(f"{path}: 7z/rar archives are not read (no stdlib reader); unpack it and pass the folder")
    if path.name.lower().endswith((".csv", ".json")) or path.suffix.lower() in IMAGE_FILE_SUFFIXES:
        return [Member(path.parent, path.name, path.stat().st_size, "file")]  # one file: a partition CSV, an image
    raise DataError(f"{path}: neither a folder, a .zip / .tar(.gz|.bz2|.xz) archive, nor a CSV or image file")


def _scan_folder(folder: Path) -> list[Member]:
    members: list[Member] = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for fn in sorted(filenames):
            full = Path(dirpath) / fn
            if fn.startswith(".") and fn.endswith(".tmp"):
                continue  # a temporary file of an interrupted prepare
            if is_archive(full):
                members += scan(full)
                continue
            try:
                st = full.stat()
            except OSError:
                continue  # a dangling symlink: nothing to read
            if stat.S_ISREG(st.st_mode):
                members.append(Member(folder, full.relative_to(folder).as_posix(), st.st_size, "file"))
    return members


def _scan_zip(path: Path) -> list[Member]:
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable zip archive ({exc}); a partial download? "
                        "download it again") from None
    members = []
    for info in infos:
        if (why := unsafe_reason(info.filename)) is not None:
            raise _refuse(path, info.filename, why)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise _refuse(path, info.filename, "a symbolic link")
        if info.is_dir():
            continue
        if info.flag_bits & 0x1:
            raise _refuse(path, info.filename, "encrypted")
        members.append(Member(path, info.filename, info.file_size, "zip"))
    return members


def _scan_tar(path: Path) -> list[Member]:
    try:
        with tarfile.open(path, "r:*") as tf:
            infos = tf.getmembers()  # reads the whole archive: a truncated one fails here, before any write
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc}); a partial download? "
                        "download it again") from None
    members = []
    for info in infos:
        if (why := unsafe_reason(info.name)) is not None:
            raise _refuse(path, info.name, why)
        if info.issym() or info.islnk():
            raise _refuse(path, info.name, f"a {'symbolic' if info.issym() else 'hard'} link (to '{info.linkname}')")
        if info.isdir():
            continue
        if not info.isreg():
            raise _refuse(path, info.name, "a device, fifo or other special file")
        members.append(Member(path, info.name, info.size, "tar"))
    return members


class Reader:
    """Opens members for reading, keeping each archive open once (tar members are read in archive order best)."""

    def __init__(self) -> None:
        self._zips: dict[Path, zipfile.ZipFile] = {}
        self._tars: dict[Path, tarfile.TarFile] = {}

    def open(self, member: Member) -> IO[bytes]:
        """A binary stream of ``member``'s bytes (the caller closes it); an unreadable one raises :class:`DataError`."""
        try:
            if member.kind == "file":
                return open(member.path, "rb")
            if member.kind == "zip":
                if member.source not in self._zips:
                    self._zips[member.source] = zipfile.ZipFile(member.source)
                return self._zips[member.source].open(member.name)
            if member.source not in self._tars:
                self._tars[member.source] = tarfile.open(member.source, "r:*")  # noqa: SIM115 - closed by close()
            fh = self._tars[member.source].extractfile(member.name)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, RuntimeError, ValueError, KeyError) as exc:
            raise DataError(f"{member}: unreadable member ({exc}); download the archive again") from None
        if fh is None:
            raise DataError(f"{member}: not a regular file")
        return fh

    def chunks(self, member: Member) -> Iterator[bytes]:
        """``member``'s bytes in chunks; a corrupt member (bad CRC, truncated data) raises :class:`DataError`."""
        with self.open(member) as fh:
            while True:
                try:
                    chunk = fh.read(CHUNK)
                except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
                    raise DataError(f"{member}: corrupt member ({exc}); download the archive again") from None
                if not chunk:
                    return
                yield chunk

    def sha256(self, member: Member) -> str:
        """The sha256 of ``member``'s bytes (a zip member's CRC is checked on the way)."""
        h = hashlib.sha256()
        for chunk in self.chunks(member):
            h.update(chunk)
        return h.hexdigest()

    def close(self) -> None:
        """Close every archive opened."""
        for zf in self._zips.values():
            zf.close()
        for tf in self._tars.values():
            tf.close()
        self._zips.clear()
        self._tars.clear()


def file_sha256(path: Path) -> str:
    """The sha256 of a file on disk."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            h.update(chunk)
    return h.hexdigest()
