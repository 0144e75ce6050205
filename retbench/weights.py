"""Safe checkpoint loading: safetensors, or ``torch.load(weights_only=True)`` — never pickled code."""

from __future__ import annotations

import argparse
import functools
import os
import socket
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from retbench.errors import RetbenchError

NESTED_KEYS = ("model", "state_dict", "model_state_dict", "module")


def load_checkpoint(path: str | Path) -> Any:
    """The object stored at ``path``, read without executing code (safetensors or ``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise RetbenchError(f"weights file not found: {path}")
    if path.stat().st_size == 0:
        raise RetbenchError(f"weights file {path} is empty (0 bytes): an interrupted download or copy?")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001 - SafetensorError for truncated or foreign bytes, OSError
            raise RetbenchError(f"{path}: not a readable safetensors file (truncated or damaged?): "
                                f"{_first_line(exc)}") from None
    try:
        # training scripts (MAE, DINO, iBOT) store their argparse.Namespace beside the weights: a plain attribute bag
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=_is_zip(path))
    except Exception as exc:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        raise RetbenchError(f"cannot load weights {path} safely: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    """``Type: first line of the message`` (some errors have an empty message)."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def _is_zip(path: Path) -> bool:
    """Checkpoints in torch's zip format can be memory-mapped (large files load without a copy)."""
    with open(path, "rb") as fh:
        return fh.read(4) == b"PK\x03\x04"


def load_state_dict(path: str | Path, key: str | None = None) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path``: ``obj[key]`` when given, else unwrap ``model``/``state_dict`` nesting."""
    obj = load_checkpoint(path)
    if key is not None:
        if not isinstance(obj, dict) or key not in obj:
            keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
            raise RetbenchError(f"{path}: checkpoint has no key '{key}' (top-level keys: {keys})")
        obj = obj[key]
    else:
        for nested in NESTED_KEYS:
            if isinstance(obj, dict) and nested in obj and isinstance(obj[nested], dict):
                obj = obj[nested]
    if not isinstance(obj, dict):
        raise RetbenchError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}

RANDOM = "random"


def weights_dir() -> Path | None:
    """The ``RETBENCH_WEIGHTS`` directory, when set."""
    value = os.environ.get("RETBENCH_WEIGHTS")
    return Path(value).expanduser() if value else None


_CACHED_ONLY = False


@contextmanager
def cached_files_only() -> Iterator[None]:
    """Within this block the hub lookup never downloads (finding a file to hash it must not fetch gigabytes)."""
    global _CACHED_ONLY
    before, _CACHED_ONLY = _CACHED_ONLY, True
    try:
        yield
    finally:
        _CACHED_ONLY = before


PROXY_VARIABLES = ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HTTP_PROXY", "http_proxy")
REACH_TIMEOUT_S = 3.0


def hub_online() -> bool:
    """Whether a hub lookup may go to the network: not when ``HF_HUB_OFFLINE`` is set or inside
    :func:`cached_files_only`, nor when no TCP connection to the hub (``HF_ENDPOINT``, default huggingface.co)
    opens within 3 s — asked once per process. Without this, each missing file on a machine with no network
    (an air-gapped cluster node) cost ~26 s of huggingface_hub's retries and ten lines of their messages.
    Behind a proxy (``HTTPS_PROXY`` and the like) the direct connection says nothing, so the hub client decides."""
    if _CACHED_ONLY or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    if any(os.environ.get(v) for v in PROXY_VARIABLES):
        return True
    return _reachable(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")


@functools.cache
def _reachable(endpoint: str) -> bool:
    """Whether a TCP connection to ``endpoint``'s host and port opens within :data:`REACH_TIMEOUT_S`."""
    url = urllib.parse.urlsplit(endpoint)
    port = url.port or (443 if url.scheme == "https" else 80)
    try:
        with socket.create_connection((url.hostname or "", port), timeout=REACH_TIMEOUT_S):
            return True
    except OSError:  # no route, no name resolution, refused, timed out
        return False


def _hub_file(hub_id: str, filename: str) -> Path | None:
    """``filename`` of hub repo ``hub_id`` from the Hugging Face cache, downloading only when :func:`hub_online`."""
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:  # pragma: no cover - transformers depends on it
        return None
    cache_dir = os.environ.get("HF_HUB_CACHE") or None  # read now: huggingface_hub reads it once, at import
    for local_only in (True, False):  # the cache first; the network only for what it lacks, and only if it answers
        if not local_only and not hub_online():
            break
        try:
            return Path(hf_hub_download(hub_id, filename, local_files_only=local_only, cache_dir=cache_dir))
        except Exception:  # noqa: BLE001 - not cached, gated, offline: all mean "not available here"
            continue
    return None


def resolve_file(
    model: str,
    filename: str,
    *,
    explicit: str | None = None,
    hub_id: str = "",
    url: str = "",
    subdirs: tuple[str, ...] = (),
    what: str = "weights",
    gated: bool = False,
) -> Path:
    """Find ``filename`` for ``model``: an explicit path, then ``RETBENCH_WEIGHTS``, then the hub cache.

    ``explicit`` may be a file or a directory holding ``filename``. Under ``RETBENCH_WEIGHTS``
    the file may sit at the top, under any of ``subdirs`` or under the hub id. When nothing
    is found, the error names the file, where to download it and where to put it.
    """
    if explicit:
        path = Path(explicit).expanduser()
        if path.is_dir() and filename:
            path = path / filename
        if not path.exists():
            raise RetbenchError(f"{what} file not found: {path}")
        return path
    root = weights_dir()
    if root is not None:
        for sub in (*subdirs, hub_id, ""):  # model folders first: a top-level vocab.txt may be another model's
            candidate = root / sub / filename if sub else root / filename
            if candidate.exists():
                return candidate
    if hub_id:
        found = _hub_file(hub_id, filename)
        if found is not None:
            return found
    raise WeightsMissingError(model, filename, hub_id=hub_id, url=url, root=root, what=what, gated=gated)


class WeightsMissingError(RetbenchError):
    """A checkpoint (or tokenizer file) is not available offline; says what to fetch and where to put it."""

    def __init__(self, model: str, filename: str, *, hub_id: str, url: str, root: Path | None, what: str,
                 gated: bool) -> None:
        where = url or (f"https://huggingface.co/{hub_id}" if hub_id else "its authors' release page")
        if gated:
            where += " (gated: request access on that page first)"
        dest = f"$RETBENCH_WEIGHTS ({root})" if root else "a folder named by $RETBENCH_WEIGHTS"
        super().__init__(
            f"model '{model}' needs {what} '{filename}', not found offline: download it from {where}, put it in "
            f"{dest} and run again, or pass --weights PATH (--weights random builds the architecture untrained)"
        )
        self.filename = filename
