"""The on-disk format of models trained by retbench itself, evaluated as ``local:PATH``.

A model is a folder::

    DIR/retbench_model.json    what to build (below)
    DIR/model.safetensors      the weights
    DIR/text/                  the text tower's config.json and tokenizer files (text models only)

``retbench_model.json``::

    {
      "format": "retbench.local/1",
      "vision": {"timm": "<timm model name>", "kwargs": {...}, "feature_dim": 192},
      "text": null | {"tower": "minilm" | "hf:<id>", "pooling": "mean" | "cls", "normalize": bool,
                      "max_length": int, "files": "text", "dim": 384},
      "embed_dim": null | int,
      "visual_proj": null | {"bias": bool},
      "text_proj": null | {"bias": bool},
      "preprocess": {<retbench.preprocess.Preprocess fields>},
      "recipe": "<how it was trained>",
      "created": "<ISO 8601 UTC>",
      "retbench_version": "<version that wrote it>",
      "card": {<free metadata: data, epochs, licence, ...>}
    }

``feature_dim`` and ``text.dim`` are informational (the widths the writer saw); the reader
rebuilds the modules and checks the tensors instead. ``model.safetensors`` keys: ``visual.*`` (the timm model built by
``timm.create_model(vision.timm, num_classes=0, **vision.kwargs)``), ``visual_proj.weight``
[embed_dim, feature_dim] (+ ``.bias``), ``text.*`` (the :class:`~retbench.text_towers.TextTower`
state dict), ``text_proj.weight`` [embed_dim, text dim] (+ ``.bias``) and an optional scalar
``logit_scale`` (the log of the zero-shot temperature, CLIP style).

The image feature for probes is the timm model's pooled output; the image-text embeddings are
``visual_proj(feature)`` and ``text_proj(text_tower(texts))`` (a missing projection is the
identity, so the two widths must then agree). The preprocessing is part of the model: a model
trained at 64 px is evaluated at 64 px.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from torch import nn

from retbench.errors import RetbenchError
from retbench.preprocess import Preprocess

FORMAT = "retbench.local/1"
CONFIG_FILE = "retbench_model.json"
WEIGHTS_FILE = "model.safetensors"
TEXT_FILES = "text"
PREFIXES = ("visual.", "visual_proj.", "text.", "text_proj.")
CODE_ID = "retbench.local_format"
"""What a ``local:`` model's results record as ``model.code``: an identifier of this format, not an import path.
It is the module's name before the rename to ``local_model_format`` and stays as it is, so results (and the
leaderboards built from them) of the same model stay byte-identical."""


class LocalFormatError(RetbenchError):
    """A local model folder is malformed: one line naming the file and the key at fault."""

    def __init__(self, file: str | Path, key: str, message: str) -> None:
        self.file, self.key = str(file), key
        super().__init__(f"{file}: key '{key}': {message}")


@dataclass(frozen=True)
class TextConfig:
    """The text tower of a local model."""

    tower: str
    pooling: str = "mean"
    normalize: bool = True
    max_length: int | None = 256  # null: the tokenizer's own limit (at most 512)
    files: str = TEXT_FILES


@dataclass(frozen=True)
class LocalModelConfig:
    """A validated ``retbench_model.json``."""

    folder: Path
    timm_name: str
    timm_kwargs: dict[str, Any]
    preprocess: Preprocess
    text: TextConfig | None = None
    embed_dim: int | None = None
    visual_proj_bias: bool | None = None  # None: no visual projection
    text_proj_bias: bool | None = None  # None: no text projection
    recipe: str = ""
    created: str = ""
    card: dict[str, Any] = field(default_factory=dict)
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def config_path(self) -> Path:
        """``DIR/retbench_model.json``."""
        return self.folder / CONFIG_FILE

    @property
    def weights_path(self) -> Path:
        """``DIR/model.safetensors``."""
        return self.folder / WEIGHTS_FILE


class _Fields:
    """Typed access to a JSON mapping whose errors name the file and the dotted key."""

    def __init__(self, file: Path, data: dict[str, Any], prefix: str = "") -> None:
        self.file, self.data, self.prefix = file, data, prefix

    def fail(self, key: str, message: str) -> LocalFormatError:
        return LocalFormatError(self.file, f"{self.prefix}{key}", message)

    def get(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, what: str = "") -> Any:
        if key not in self.data:
            if default is ...:
                raise self.fail(key, "missing")
            return default
        value = self.data[key]
        if isinstance(value, bool) and kind in (int, float):  # JSON true is not a number here
            raise self.fail(key, f"expected {what or kind.__name__}, got {value!r}")
        if not isinstance(value, kind):
            raise self.fail(key, f"expected {what or getattr(kind, '__name__', kind)}, got {type(value).__name__} {value!r}")
        return value

    def mapping(self, key: str, default: Any = ...) -> _Fields | None:
        value = self.get(key, (dict, type(None)), default, what="a mapping or null")
        return None if value is None else _Fields(self.file, value, f"{self.prefix}{key}.")

    def positive_int(self, key: str, default: Any = ...) -> int | None:
        value = self.get(key, (int, type(None)), default, what="a positive integer or null")
        if isinstance(value, bool) or (value is not None and value <= 0):
            raise self.fail(key, f"expected a positive integer, got {value!r}")
        return value

    def projection(self, key: str) -> bool | None:
        proj = self.mapping(key, None)
        return None if proj is None else bool(proj.get("bias", bool, False))


def read_local_config(folder: str | Path) -> LocalModelConfig:
    """Read and validate ``DIR/retbench_model.json`` (errors name the file and the key)."""
    folder = Path(folder).expanduser()
    path = folder / CONFIG_FILE
    if not folder.is_dir():
        raise RetbenchError(f"local model folder not found: {folder}")
    if not path.is_file():
        raise RetbenchError(f"{folder} is not a retbench local model: {CONFIG_FILE} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise LocalFormatError(path, "(file)", f"not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise LocalFormatError(path, "(file)", f"expected a JSON object, got {type(data).__name__}")
    top = _Fields(path, data)
    fmt = top.get("format", str)
    if fmt != FORMAT:
        raise top.fail("format", f"unsupported format {fmt!r} (this retbench reads {FORMAT!r})")
    return LocalModelConfig(
        folder=folder, **_vision(top), preprocess=_preprocess(top), text=_text(top),
        embed_dim=top.positive_int("embed_dim", None), visual_proj_bias=top.projection("visual_proj"),
        text_proj_bias=top.projection("text_proj"), recipe=top.get("recipe", str, ""),
        created=top.get("created", str, ""), card=top.get("card", dict, {}), raw=data,
    )


def _vision(top: _Fields) -> dict[str, Any]:
    import timm

    vision = top.mapping("vision")
    if vision is None:
        raise top.fail("vision", "a local model needs an image encoder")
    name = vision.get("timm", str, what="a timm model name")
    if not timm.is_model(name):
        raise vision.fail("timm", f"timm has no model {name!r}")
    return {"timm_name": name, "timm_kwargs": dict(vision.get("kwargs", dict, {}))}


def _text(top: _Fields) -> TextConfig | None:
    from retbench.text_towers import MINILM, POOLINGS

    text = top.mapping("text", None)
    if text is None:
        return None
    tower = text.get("tower", str)
    if tower != MINILM and not (tower.startswith("hf:") and len(tower) > 3):
        raise text.fail("tower", f"expected 'minilm' or 'hf:<id>', got {tower!r}")
    pooling = text.get("pooling", str, "mean")
    if pooling not in POOLINGS:
        raise text.fail("pooling", f"expected one of {', '.join(POOLINGS)}, got {pooling!r}")
    files = text.get("files", str, TEXT_FILES)
    if not (text.file.parent / files / "config.json").is_file():
        raise text.fail("files", f"text tower files not found: {text.file.parent / files / 'config.json'}")
    return TextConfig(tower, pooling, text.get("normalize", bool, True), text.positive_int("max_length", 256), files)


def _preprocess(top: _Fields) -> Preprocess:
    pre = top.mapping("preprocess")
    if pre is None:
        raise top.fail("preprocess", "the model's preprocessing is required")
    known = set(Preprocess.__dataclass_fields__)
    for key in pre.data:
        if key not in known:
            raise pre.fail(key, f"unknown preprocessing field (known: {', '.join(sorted(known))})")
    values = dict(pre.data)
    for key in ("mean", "std"):
        if key in values:
            seq = values[key]
            if not (isinstance(seq, list) and len(seq) == 3 and all(isinstance(x, (int, float)) for x in seq)):
                raise pre.fail(key, f"expected 3 numbers, got {seq!r}")
            values[key] = tuple(float(x) for x in seq)
    if "size" in values:
        pre.positive_int("size")
    try:
        return Preprocess(**values)
    except (TypeError, ValueError) as exc:
        raise pre.fail("(fields)", str(exc)) from None


def save_local_model(
    folder: str | Path,
    vision: nn.Module,
    vision_cfg: dict[str, Any],
    preprocess: Preprocess,
    *,
    text_tower: Any | None = None,
    visual_proj: nn.Linear | None = None,
    text_proj: nn.Linear | None = None,
    logit_scale: float | torch.Tensor | None = None,
    recipe: str = "",
    card: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a model in the ``retbench.local/1`` format; readers see the old folder or the complete new one.

    ``vision`` must be the timm model ``timm.create_model(vision_cfg["timm"], num_classes=0,
    **vision_cfg.get("kwargs", {}))`` (its keys are checked against a fresh build);
    ``text_tower`` a :class:`~retbench.text_towers.TextTower`; ``logit_scale`` the *log*
    temperature. Everything is written to a temporary sibling folder that is renamed into
    place at the end. Returns the folder.
    """
    from safetensors.torch import save_file

    folder = Path(folder).expanduser().resolve()
    if folder.exists() and not overwrite:
        raise RetbenchError(f"{folder} already exists (pass overwrite=True to replace it)")
    name, kwargs = _check_vision(vision, vision_cfg)
    tensors = _prefixed("visual.", vision)
    config: dict[str, Any] = {
        "format": FORMAT,
        "vision": {"timm": name, "kwargs": kwargs, "feature_dim": int(getattr(vision, "num_features", 0)) or None},
        "text": None, "embed_dim": None, "visual_proj": None, "text_proj": None,
        "preprocess": preprocess.to_dict(), "recipe": recipe,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "retbench_version": _version(), "card": dict(card or {}),
    }
    for key, proj in (("visual_proj", visual_proj), ("text_proj", text_proj)):
        if proj is not None:
            if not isinstance(proj, nn.Linear):
                raise RetbenchError(f"{key} must be a torch.nn.Linear, got {type(proj).__name__}")
            tensors.update(_prefixed(f"{key}.", proj))
            config[key] = {"bias": proj.bias is not None}
            config["embed_dim"] = int(proj.out_features)
    if text_tower is not None:
        tensors.update(_prefixed("text.", text_tower))
        config["text"] = {**text_tower.settings(), "files": TEXT_FILES, "dim": int(text_tower.dim)}
    if logit_scale is not None:
        tensors["logit_scale"] = torch.as_tensor(logit_scale, dtype=torch.float32).detach().reshape(()).cpu().clone()
    json.dumps(config)  # fail before writing anything if the card is not JSON-serialisable
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".tmp", dir=folder.parent))
    try:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT})
        if text_tower is not None:
            text_tower.save_files(tmp / TEXT_FILES)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        _fsync_dir(tmp)
        _swap_into_place(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _check_vision(vision: nn.Module, vision_cfg: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The vision config must rebuild exactly ``vision``'s parameter names and shapes."""
    import timm

    name = vision_cfg.get("timm") if isinstance(vision_cfg, dict) else None
    if not isinstance(name, str) or not timm.is_model(name):
        raise RetbenchError(f"vision_cfg['timm'] must name a timm model, got {name!r}")
    kwargs = dict(vision_cfg.get("kwargs") or {})
    kwargs.pop("num_classes", None)
    try:
        json.dumps(kwargs)
    except TypeError as exc:
        raise RetbenchError(f"vision_cfg['kwargs'] must be JSON-serialisable: {exc}") from None
    try:
        with torch.device("meta"):  # shapes only: no memory, no init time
            fresh = timm.create_model(name, num_classes=0, **kwargs)
    except Exception:  # noqa: BLE001 - bad kwargs, or a model whose init needs real tensors
        try:
            fresh = timm.create_model(name, num_classes=0, **kwargs)
        except Exception as exc:  # noqa: BLE001 - reported in one line
            raise RetbenchError(f"timm.create_model({name!r}, num_classes=0, **{kwargs}) failed: {exc}") from None
    want = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in vision.state_dict().items()}
    if want != have:
        diff = sorted(set(want) ^ set(have)) or sorted(k for k in want if want[k] != have[k])
        raise RetbenchError(f"the vision module is not timm.create_model({name!r}, num_classes=0, **{kwargs}): "
                            f"{len(diff)} parameter(s) differ, e.g. {diff[0]}")
    return name, kwargs


def _prefixed(prefix: str, module: nn.Module) -> dict[str, torch.Tensor]:
    # cloned so tied parameters become separate tensors (safetensors refuses shared storage)
    return {prefix + k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def _swap_into_place(tmp: Path, folder: Path) -> None:
    if not folder.exists():
        os.replace(tmp, folder)
        return
    old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
    os.replace(folder, old)
    try:
        os.replace(tmp, folder)
    except BaseException:
        os.replace(old, folder)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as fh:
                os.fsync(fh.fileno())


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("retbench")
    except Exception:  # noqa: BLE001 - not installed (source checkout)
        return "unknown"
