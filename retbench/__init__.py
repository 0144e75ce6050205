"""retbench: a benchmark and evaluation harness for retinal foundation models.

``retbench.evaluate``, ``retbench.run`` and ``retbench.Result`` (from :mod:`retbench.runner`) are
imported on first use, so ``import retbench`` (and the command line's ``--help``) does not load torch.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"
__all__ = ["Result", "evaluate", "run", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("Result", "evaluate", "run"):
        from retbench import runner

        return getattr(runner, name)
    raise AttributeError(f"module 'retbench' has no attribute {name!r}")
