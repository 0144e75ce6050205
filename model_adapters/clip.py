"""OpenAI CLIP (family ``clip``): ViT-B/32, ViT-B/16 and ViT-L/14, built with open_clip.

Architecture: ``open_clip.create_model(<arch>, pretrained=None, force_quick_gelu=True)``,
i.e. open_clip's built-in ``ViT-B-32`` / ``ViT-B-16`` / ``ViT-L-14`` configs with QuickGELU,
the activation OpenAI trained with (``quick_gelu=True`` in the ``openai`` entries of
mlfoundations/open_clip ``src/open_clip/pretrained.py``; the config files are
``src/open_clip/model_configs/ViT-*.json``). The BPE tokenizer (context 77) ships inside
open_clip, so text works offline.

Weights, in the order they are looked for (``--weights FILE|DIR``, ``$RETBENCH_WEIGHTS``
[``/clip``, ``/clip.<tag>``, ``/<hub id>``], then the Hugging Face cache):

* ``open_clip_model.safetensors`` from the hub repos open_clip's ``openai`` tag points at
  (``timm/vit_base_patch32_clip_224.openai``, ``timm/vit_base_patch16_clip_224.openai``,
  ``timm/vit_large_patch14_clip_224.openai``); open_clip's downloader
  (``pretrained.py:download_pretrained_from_hf``) prefers this safetensors file;
* ``open_clip_pytorch_model.bin`` from the same repos (a pickled tensor dict, read with
  ``torch.load(weights_only=True)``);
* OpenAI's original TorchScript archives ``ViT-B-32.pt`` / ``ViT-B-16.pt`` / ``ViT-L-14.pt``
  (URLs in ``pretrained.py``; also found in open_clip's download cache ``~/.cache/clip``).

The TorchScript decision: ``torch.jit.load`` compiles the archive's code and may run
TorchScript ``__setstate__`` methods while loading, and ``torch.load(weights_only=True)``
refuses such archives. retbench never calls either on them: :func:`read_torchscript_state_dict`
unpickles the archive's ``data.pkl`` with a restricted unpickler that only materialises
tensors (from the archive's raw storages) and inert stand-ins for the scripted modules; any
other global is refused. The module tree gives the same names as ``ScriptModule.state_dict()``;
``input_resolution``/``context_length``/``vocab_size`` are dropped as open_clip's
``build_model_from_openai_state_dict`` does (``src/open_clip/model.py``). The fp16 tensors of
those archives are cast to the fp32 model on load.

Preprocessing (open_clip ``pretrained.py:_pcfg`` and ``transform.py:image_transform``;
openai/CLIP ``clip/clip.py:_transform``): shortest side resized to 224 (bicubic), centre
crop 224 (``crop_pct`` 1), CLIP mean/std.

Features: ``encode_image`` = ``encode_image_joint`` = ``model.encode_image`` (``ln_post`` of
the class token @ ``visual.proj``, unnormalised; 512/512/768-d), the feature CLIP's linear
probes use. ``encode_text`` = ``ln_final`` of the EOT token @ ``text_projection``.

Zero-shot: retbench's default, which is CLIP's (task prompts, L2-normalised embeddings,
class means renormalised, logits × 100). Both open_clip (``src/open_clip_train/zero_shot.py``)
and LAION-AI/CLIP_benchmark (``clip_benchmark/metrics/zeroshot_classification.py``) use the
fixed factor 100, not the learned ``logit_scale``; for OpenAI CLIP the two coincide
(``exp(logit_scale)`` = 100, the training clamp).
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any, ClassVar

import torch

from retbench.adapters import Adapter, WeightsTag, register_adapter
from retbench.errors import RetbenchError
from retbench.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess
from retbench.weights import load_state_dict

CLIP_PREPROCESS = Preprocess(size=224, resize="resize_crop", interpolation="bicubic", crop_pct=1.0,
                             mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
OPEN_CLIP_SAFETENSORS = "open_clip_model.safetensors"
OPEN_CLIP_BIN = "open_clip_pytorch_model.bin"
# keys of OpenAI's TorchScript state dicts that are not parameters (open_clip pops them too)
OPENAI_NON_PARAMETER_KEYS = ("input_resolution", "context_length", "vocab_size")
OPENAI_CLIP_PAPER = "Radford et al., Learning Transferable Visual Models From Natural Language Supervision, ICML 2021"
OPENAI_CLIP_LICENCE = "MIT (openai/CLIP code and released weights; model card: research use)"
OPEN_CLIP_CODE = ("mlfoundations/open_clip src/open_clip/{model.py,pretrained.py,transform.py}; "
                  "openai/CLIP clip/{model.py,clip.py}")


# --- reading OpenAI's TorchScript archives without executing them ---------------------------

_STORAGE_DTYPES = {
    "HalfStorage": torch.float16, "FloatStorage": torch.float32, "DoubleStorage": torch.float64,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


class _ScriptedModule:
    """Inert stand-in for a scripted module or class: keeps the pickled attribute state only."""

    state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...], stride: tuple[int, ...],
                    requires_grad: bool = False, hooks: Any = None, metadata: Any = None) -> torch.Tensor:
    """A tensor viewing ``storage`` (a flat typed tensor), as ``torch._utils._rebuild_tensor_v2`` does."""
    return torch.as_strided(storage, tuple(size), tuple(stride), offset)


def _identity(value: Any, *_: Any) -> Any:
    return value


_JIT_PICKLE_HELPERS = {"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_genericlist",
                       "restore_type_tag"}


class _TorchScriptUnpickler(pickle.Unpickler):
    """Unpickles a TorchScript ``data.pkl``: tensors and module stand-ins only, everything else refused."""

    def __init__(self, file: Any, archive: zipfile.ZipFile, prefix: str) -> None:
        super().__init__(file)
        self.archive, self.prefix = archive, prefix
        self.storages: dict[str, torch.Tensor] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return _ScriptedModule
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if module == "torch.jit._pickle" and name in _JIT_PICKLE_HELPERS:
            return _identity
        raise pickle.UnpicklingError(f"refusing to load global '{module}.{name}' from a TorchScript archive")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unsupported persistent id in TorchScript archive: {pid!r:.80}")
        _, dtype, key, _location, numel = pid[:5]
        if key not in self.storages:
            raw = self.archive.read(f"{self.prefix}/data/{key}")
            if numel == 0 or not raw:
                self.storages[key] = torch.empty(0, dtype=dtype)
            else:
                self.storages[key] = torch.frombuffer(bytearray(raw), dtype=dtype)[:numel]
        return self.storages[key]


def _archive_prefix(archive: zipfile.ZipFile) -> str | None:
    """The top folder of a TorchScript archive (it holds ``data.pkl`` plus ``constants.pkl`` or ``code/``)."""
    names = archive.namelist()
    for name in names:
        parts = name.split("/")
        if len(parts) == 2 and parts[1] == "data.pkl":
            prefix = parts[0]
            if f"{prefix}/constants.pkl" in names or any(n.startswith(f"{prefix}/code/") for n in names):
                return prefix
    return None


def is_torchscript_archive(path: str | Path) -> bool:
    """Whether ``path`` is a TorchScript archive (``torch.jit.save``), not a ``torch.save`` file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return _archive_prefix(archive) is not None


def _collect_tensors(obj: Any, prefix: str, out: dict[str, torch.Tensor], seen: set[int]) -> None:
    if id(obj) in seen:
        return
    seen.add(id(obj))
    state = obj.state if isinstance(obj, _ScriptedModule) else None
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            out[f"{prefix}{name}"] = value
        elif isinstance(value, _ScriptedModule):
            _collect_tensors(value, f"{prefix}{name}.", out, seen)


def read_torchscript_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Parameters and buffers of a TorchScript archive by dotted name, read without running any code."""
    path = Path(path)
    with zipfile.ZipFile(path) as archive:
        prefix = _archive_prefix(archive)
        if prefix is None:
            raise RetbenchError(f"{path}: not a TorchScript archive")
        order = f"{prefix}/byteorder"
        if order in archive.namelist() and archive.read(order).strip() not in (b"little", b""):
            raise RetbenchError(f"{path}: big-endian TorchScript archives are not supported")
        with archive.open(f"{prefix}/data.pkl") as fh:
            try:
                root = _TorchScriptUnpickler(fh, archive, prefix).load()
            except (pickle.UnpicklingError, KeyError, ValueError, TypeError, EOFError) as exc:
                raise RetbenchError(f"cannot read TorchScript archive {path} safely: {exc}") from None
    out: dict[str, torch.Tensor] = {}
    _collect_tensors(root, "", out, set())
    if not out:
        raise RetbenchError(f"{path}: TorchScript archive holds no tensors")
    return out


def read_clip_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A CLIP state dict from safetensors, a ``torch.save`` file (``weights_only``) or a TorchScript archive."""
    state = read_torchscript_state_dict(path) if is_torchscript_archive(path) else load_state_dict(path)
    for key in OPENAI_NON_PARAMETER_KEYS:
        state.pop(key, None)
    return state


# --- building and loading open_clip models ---------------------------------------------------

@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """Silence open_clip's root-logger warnings (``Model initialized randomly``) while building."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


_INITIALISERS = ("uniform_", "normal_", "trunc_normal_", "constant_", "ones_", "zeros_", "eye_", "dirac_", "xavier_uniform_",
                 "xavier_normal_", "kaiming_uniform_", "kaiming_normal_", "orthogonal_", "sparse_")


@contextmanager
def _skipped_init() -> Iterator[None]:
    """``torch.nn.init`` initialisers become no-ops (as transformers' ``no_init_weights`` does).

    Only for models whose every parameter and persistent buffer is overwritten next by a
    strict load; non-persistent buffers (the causal text mask) are computed, not initialised.
    Saves 1-4 s of CPU per model (ViT-B/32 to ViT-L/14).
    """
    saved = {name: getattr(torch.nn.init, name) for name in _INITIALISERS if hasattr(torch.nn.init, name)}
    for name in saved:
        setattr(torch.nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(torch.nn.init, name, fn)


def create_open_clip(arch: str, *, quick_gelu: bool, init: bool = True, **kwargs: Any) -> torch.nn.Module:
    """An open_clip model of ``arch``: seeded random weights (seed 0, global RNG left as it was), or
    uninitialised memory when ``init`` is false (the caller loads every parameter next)."""
    import open_clip

    with torch.random.fork_rng(devices=[]), _quiet_open_clip(), (nullcontext() if init else _skipped_init()):
        torch.manual_seed(0)
        try:
            model = open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu, **kwargs)
        except (OSError, RuntimeError, ValueError) as exc:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise RetbenchError(f"open_clip cannot build '{arch}' offline: {msg}") from None
    return model.eval()


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str | Path,
                ignore_prefixes: Sequence[str] = ()) -> None:
    """Load ``state`` into ``model``: every parameter must be present with its shape; extra keys are errors.

    Keys under ``ignore_prefixes`` (e.g. EyeCLIP's MAE decoder) are dropped first; so are
    TorchScript-only attributes the model does not own as parameters or persistent buffers.
    """
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.startswith(tuple(ignore_prefixes))}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own and not k.endswith("attn_mask")]
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own
             if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[0]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[0]})")
        if wrong:
            parts.append(f"{len(wrong)} with another shape (e.g. {wrong[0]})")
        raise RetbenchError(f"{source}: does not match the architecture: {'; '.join(parts)}")
    model.load_state_dict({k: state[k] for k in own}, strict=True)


class OpenClipModelAdapter(Adapter):
    """Shared machinery of adapters around an open_clip ``CLIP`` model (not registered itself).

    Subclasses say which architecture to build (:meth:`arch`) and which checkpoint files to
    accept (:meth:`checkpoint_names`); they may rewrite the raw state dict (:meth:`prepare_state`).
    """

    model: Any  # an open_clip CLIP: typed Any, its attributes are the architecture's own (create_open_clip returns nn.Module)
    has_text: ClassVar[bool] = True

    def arch(self) -> tuple[str, dict[str, Any]]:
        """open_clip model name and extra ``create_model`` arguments (QuickGELU by default)."""
        return self.tag.options["arch"], {"quick_gelu": bool(self.tag.options.get("quick_gelu", True))}

    def checkpoint_names(self) -> list[str]:
        """Accepted checkpoint file names, preferred first (the first is ``tag.filename``)."""
        return [self.tag.filename, *self.tag.options.get("alternatives", ())]

    def extra_locations(self) -> list[Path]:
        """Further places a checkpoint may already sit (e.g. open_clip's own download cache)."""
        legacy = self.tag.options.get("legacy_file")
        return [Path("~/.cache/clip").expanduser() / legacy] if legacy else []

    def prepare_state(self, state: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
        """Hook for release-specific key handling before the strict load."""
        return state

    def ignore_prefixes(self) -> tuple[str, ...]:
        """Checkpoint keys dropped before loading (parts of a release that inference does not use)."""
        return ()

    def find_checkpoint(self) -> Path:
        """The first accepted checkpoint found; otherwise the one-line error for the preferred file.

        ``--weights FILE`` is taken as is; ``--weights DIR`` must hold one of the accepted names.
        """
        names = self.checkpoint_names()
        if self.weights:
            given = Path(self.weights).expanduser()
            found = given if given.is_file() else next((given / n for n in names if (given / n).is_file()), None)
            if found is None:
                what = f"weights folder {given} holds none of {', '.join(names)}" if given.is_dir() else \
                    f"weights file not found: {given}"
                raise RetbenchError(what)
            self.weights_path = found
            return found
        first: RetbenchError | None = None
        for name in names:
            try:
                path = self.weights_file(name)
            except RetbenchError as exc:
                first = first or exc
                continue
            self.weights_path = path  # alternative names count as the checkpoint too
            return path
        for path in self.extra_locations():
            if path.is_file():
                self.weights_path = path
                return path
        assert first is not None
        if len(names) > 1:
            first.args = (f"{first.args[0]}; also accepted in its place: {', '.join(names[1:])}",)
        raise first

    def checkpoint(self) -> Path | None:
        """The file :meth:`build` reads (:meth:`find_checkpoint`), found without building."""
        return None if self.random_init else self.find_checkpoint()

    def build(self) -> None:
        """The architecture with seeded random weights, then the checkpoint (unless ``--weights random``)."""
        path = None if self.random_init else self.find_checkpoint()  # fail fast, before building
        arch, kwargs = self.arch()
        self.model = create_open_clip(arch, init=path is None, **kwargs)
        if path is not None:
            state = self.prepare_state(read_clip_checkpoint(path), path)
            load_strict(self.model, state, path, self.ignore_prefixes())
        self.model.to(self.device).eval()
        self._tokenizer: Any = None

    @property
    def tokenizer(self) -> Any:
        """open_clip's tokenizer for the architecture, made on first use (some need hub files)."""
        if self._tokenizer is None:
            import open_clip

            arch = self.arch()[0]
            try:
                self._tokenizer = open_clip.get_tokenizer(arch)
            except (OSError, RuntimeError, ValueError) as exc:
                msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                raise RetbenchError(f"model '{self.name}': open_clip cannot make the {arch} tokenizer offline: {msg}") from None
        return self._tokenizer

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``model.encode_image``: the projected image embedding, unnormalised."""
        return self.model.encode_image(pixels).float()

    def encode_image_joint(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same projected embedding (the probe feature is the joint-space one)."""
        return self.encode_image(pixels)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``model.encode_text`` of the open_clip-tokenised texts, unnormalised."""
        tokens = self.tokenizer(list(texts)).to(self.device)
        return self.model.encode_text(tokens).float()


# --- the clip family -------------------------------------------------------------------------

def _openai_tag(name: str, arch: str, hub_id: str, sha: str, dim: int, width: int) -> WeightsTag:
    legacy = f"{arch}.pt"
    legacy_url = f"https://openaipublic.azureedge.net/clip/models/{sha}/{legacy}"
    return WeightsTag(
        name, f"OpenAI CLIP {arch} (open_clip 'openai' release)", CLIP_PREPROCESS,
        licence=OPENAI_CLIP_LICENCE, paper=OPENAI_CLIP_PAPER,
        feature=f"encode_image: ln_post(CLS) @ visual.proj, {dim}-d unnormalised (vision width {width}); "
                f"text: ln_final(EOT) @ text_projection",
        description=f"OpenAI CLIP {arch} (QuickGELU) via open_clip; also reads OpenAI's TorchScript {legacy} "
                    f"({legacy_url}) without executing it",
        filename=OPEN_CLIP_SAFETENSORS, hub_id=hub_id, url=f"https://huggingface.co/{hub_id}", code=OPEN_CLIP_CODE,
        options={"arch": arch, "quick_gelu": True, "alternatives": (OPEN_CLIP_BIN, legacy), "legacy_file": legacy,
                 "legacy_url": legacy_url},
    )


@register_adapter
class ClipAdapter(OpenClipModelAdapter):
    """OpenAI CLIP image and text towers (open_clip implementation)."""

    family = "clip"
    # fp16 autocast: openai/CLIP clip.load() keeps the released fp16 weights on CUDA (LayerNorm computed in fp32)
    autocast_dtype: ClassVar[torch.dtype | None] = torch.float16
    default_tag = "vit-b-32"
    tags: ClassVar[dict[str, WeightsTag]] = {
        "vit-b-32": _openai_tag("vit-b-32", "ViT-B-32", "timm/vit_base_patch32_clip_224.openai",
                                "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af", 512, 768),
        "vit-b-16": _openai_tag("vit-b-16", "ViT-B-16", "timm/vit_base_patch16_clip_224.openai",
                                "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f", 512, 768),
        "vit-l-14": _openai_tag("vit-l-14", "ViT-L-14", "timm/vit_large_patch14_clip_224.openai",
                                "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836", 768, 1024),
    }
