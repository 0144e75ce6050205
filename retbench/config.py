"""The one typed configuration object that flows from the CLI (or Python) into a run."""

from __future__ import annotations

import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from retbench.errors import RetbenchError

DEFAULT_PROTOCOLS = ("linear_probe", "few_shot", "zero_shot")
PRECISIONS = ("release", "fp32", "fp16", "bf16")
"""``--precision`` choices (CUDA only): each release's own inference precision, or one forced for every model."""


def default_cache_dir() -> str:
    """``$RETBENCH_CACHE``, else ``~/.cache/retbench``."""
    return os.environ.get("RETBENCH_CACHE") or str(Path.home() / ".cache" / "retbench")


def env_flag(name: str) -> bool:
    """True when the environment variable ``name`` is set to anything but ``""``, ``0``, ``false`` or ``no``."""
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def pixel_cache_allowed() -> bool:
    """False when ``$RETBENCH_NO_PIXEL_CACHE`` is set (:func:`env_flag`)."""
    return not env_flag("RETBENCH_NO_PIXEL_CACHE")


@dataclass(frozen=True)
class RunConfig:
    """Everything a ``retbench run`` needs; recorded (minus paths' machine specifics) in each result."""

    models: tuple[str, ...]
    tasks: tuple[str, ...]
    protocols: tuple[str, ...] = ()
    data_root: str | None = None
    results_dir: str = "results"
    cache_dir: str = ""
    device: str = "auto"
    weights: str | None = None
    batch_size: int | None = None  # None: chosen to fit (features.auto_batch_size)
    num_workers: int | None = None
    overwrite: bool = False
    skip_bad_images: bool = False
    use_cache: bool = True
    pixel_cache: bool = True  # preprocessed pixels under <cache_dir>/pixels (--no-pixel-cache, $RETBENCH_NO_PIXEL_CACHE)
    shots: tuple[int, ...] | None = None
    seeds: int | None = None
    precision: str = "release"  # CUDA autocast: the release's own (per model), or fp32 / fp16 / bf16 for all

    def __post_init__(self) -> None:
        if not self.cache_dir:
            object.__setattr__(self, "cache_dir", default_cache_dir())
        if self.pixel_cache and not pixel_cache_allowed():
            object.__setattr__(self, "pixel_cache", False)
        if self.precision not in PRECISIONS:
            raise RetbenchError(f"precision must be one of {', '.join(PRECISIONS)}; got '{self.precision}'")
        self._check_counts()

    def _check_counts(self) -> None:
        """Shots, seeds, batch size and workers: integers in range, each k once (one-line errors naming the flag)."""
        if self.shots is not None:
            if not isinstance(self.shots, (list, tuple)):
                raise RetbenchError(f"--shots (shots) must be a list of integers >= 1; got {self.shots!r}")
            shots = list(self.shots)
            for k in shots:
                if not _is_int(k) or k < 1:
                    raise RetbenchError(f"--shots (shots): every k must be an integer >= 1; got {k!r}")
            seen: set[int] = set()
            for k in shots:
                if k in seen:
                    raise RetbenchError(f"--shots (shots): k={k} is given twice in {' '.join(map(str, shots))}; "
                                        "give each k once")
                seen.add(k)
        for flag, field, value, low in (("--seeds", "seeds", self.seeds, 1),
                                        ("--batch-size", "batch_size", self.batch_size, 1),
                                        ("--workers", "num_workers", self.num_workers, 0)):
            if value is not None and (not _is_int(value) or value < low):
                raise RetbenchError(f"{flag} ({field}) must be an integer >= {low}; got {value!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view."""
        return asdict(self)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)
