"""Safe checkpoint loading: safetensors, or ``torch.load(weights_only=True)`` — never pickled code."""

from __future__ import annotations

from pathlib import Path

import torch

from retbench.errors import RetbenchError

NESTED_KEYS = ("model", "state_dict", "model_state_dict", "module")


def load_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a state dict from ``path`` (unwrapping ``model`` / ``state_dict`` nesting)."""
    path = Path(path)
    if not path.is_file():
        raise RetbenchError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - unpickling refusals and corrupt files alike
        raise RetbenchError(f"cannot load weights {path} safely: {type(exc).__name__}: {exc}") from None
    for key in NESTED_KEYS:
        if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
            obj = obj[key]
    if not isinstance(obj, dict):
        raise RetbenchError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
