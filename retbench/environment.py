"""What a result records about the software and hardware that produced it."""

from __future__ import annotations

import platform
import subprocess
import sys
from functools import lru_cache
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import torch

PACKAGES = ("retbench", "torch", "torchvision", "timm", "open_clip_torch", "transformers", "numpy", "scipy",
            "scikit-learn", "pandas", "pillow")


def package_versions() -> dict[str, str]:
    """Installed versions of the packages that can change a number."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "not installed"
    return out


@lru_cache(maxsize=1)
def git_hash() -> str:
    """The retbench checkout's commit (``+dirty`` if modified), or 'unknown' outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


DEVICES = "auto | cpu | cuda | cuda:N | mps"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA if available, else MPS, else CPU; a named device must exist on this machine."""
    if name != "auto":
        return _named_device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def _named_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, ``cuda:N`` or ``mps``, checked against what this machine has (one-line errors)."""
    from retbench.errors import RetbenchError

    kind, _, index = str(name).partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise RetbenchError(f"--device: unknown device '{name}'; allowed: {DEVICES}")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise RetbenchError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}, "
                                f"built with CUDA {torch.version.cuda or 'none'}); use --device cpu or auto")
        if index and int(index) >= torch.cuda.device_count():
            raise RetbenchError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s) "
                                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    if kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RetbenchError(f"--device {name}: MPS (Apple GPU) is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def device_description(device: torch.device) -> str:
    """Human-readable device name."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.processor() or platform.machine()} x{torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict[str, Any]:
    """Everything needed to know what produced a result."""
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "packages": package_versions(),
        "git": git_hash(),
        "device": device_description(device),
    }
