"""Any Hugging Face transformers CLIP (family ``hf_clip``): ``hf_clip:<hub id or local folder>``.

Examples: ``hf_clip:openai/clip-vit-base-patch16``, ``hf_clip:/data/models/my-clip`` (a
``save_pretrained`` folder). The model is ``transformers.CLIPModel`` (huggingface/transformers
``src/transformers/models/clip/modeling_clip.py``); features are ``get_image_features``
(``visual_projection`` of the pooled, post-layernorm class token, unnormalised) for probes and
zero-shot, and ``get_text_features`` (``text_projection`` of the EOS token) for text. Texts go
through the folder's own tokenizer (``AutoTokenizer``), padded, truncated to the text
model's ``max_position_embeddings``.

Preprocessing is read from the folder's ``preprocessor_config.json`` (the
``CLIPImageProcessor`` settings, ``image_processing_clip.py``): ``size.shortest_edge`` S and
``crop_size`` C give shorter side → S then centre crop C (``crop_pct`` = C/S); ``resample``
(PIL code) gives the interpolation; ``image_mean``/``image_std`` (identity when
``do_normalize`` is false). A ``{height, width}`` size without crop is a squash. Without the
file (before a hub download) the OpenAI CLIP processor defaults apply. retbench rounds the
resized long side where transformers truncates it: at most one pixel of difference before
the centre crop.

Weights: the arg as a local folder; else ``--weights DIR`` (a ``save_pretrained`` folder; a
file inside one selects that folder); else the hub id's files (``model.safetensors`` or
``pytorch_model.bin``, ``config.json``, ``preprocessor_config.json``, tokenizer files) under
``$RETBENCH_WEIGHTS/<hub id>`` or in the Hugging Face cache (downloaded when online). Loading
uses ``CLIPModel.from_pretrained(folder, local_files_only=True)``, which reads ``.bin`` files
with ``weights_only`` torch loading, and fails if any parameter is missing from the file.
``--weights random``: the config (folder or cached ``config.json``, else the published
configs of the four OpenAI repos) with seeded random weights; without a cached tokenizer the
CLIP BPE tokenizer bundled with open_clip stands in (the same vocabulary as OpenAI's).

Zero-shot: retbench's default (CLIP's: task prompts, class means renormalised, × 100).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, cast

import torch
from retbench.model_adapters.clip import CLIP_PREPROCESS

from retbench.adapters import Adapter, WeightsTag, register_adapter
from retbench.errors import RetbenchError
from retbench.preprocess import Preprocess

if TYPE_CHECKING:
    from transformers import CLIPTextConfig

HF_CODE = "huggingface/transformers src/transformers/models/clip/{modeling_clip.py,image_processing_clip.py}"
WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin", "model.safetensors.index.json", "pytorch_model.bin.index.json")
TOKENIZER_NAMES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic"}
_B = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
_L = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "num_attention_heads": 16}
_TEXT_B = {"hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 12, "num_attention_heads": 8}
_TEXT_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}
# the published config.json of OpenAI's transformers repos, for --weights random without a download
OPENAI_CONFIGS: dict[str, dict[str, Any]] = {
    "openai/clip-vit-base-patch32": {"vision": {**_B, "patch_size": 32, "image_size": 224}, "text": _TEXT_B, "dim": 512},
    "openai/clip-vit-base-patch16": {"vision": {**_B, "patch_size": 16, "image_size": 224}, "text": _TEXT_B, "dim": 512},
    "openai/clip-vit-large-patch14": {"vision": {**_L, "patch_size": 14, "image_size": 224}, "text": _TEXT_L, "dim": 768},
    "openai/clip-vit-large-patch14-336": {"vision": {**_L, "patch_size": 14, "image_size": 336}, "text": _TEXT_L, "dim": 768},
}


def _pair(value: Any, key: str) -> int:
    """A square side from a transformers size entry (int or {height, width}); non-square is refused."""
    if isinstance(value, int):
        return value
    h, w = value.get("height"), value.get("width")
    if h is None or h != w:
        raise RetbenchError(f"preprocessor_config.json: non-square {key} {value} is not supported")
    return int(h)


def processor_preprocess(cfg: dict[str, Any]) -> Preprocess:
    """``CLIPImageProcessor`` settings (a ``preprocessor_config.json`` mapping) as a :class:`Preprocess`."""
    resample = int(cfg.get("resample", 3))
    if resample not in _PIL_RESAMPLE:
        raise RetbenchError(f"preprocessor_config.json: resample={resample} has no retbench equivalent")
    if cfg.get("do_normalize", True):
        mean, std = tuple(cfg.get("image_mean", CLIP_PREPROCESS.mean)), tuple(cfg.get("image_std", CLIP_PREPROCESS.std))
    else:
        mean, std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    size = cfg.get("size", {"shortest_edge": 224})
    if isinstance(size, int):  # old configs: an int is the shortest edge
        size = {"shortest_edge": size}
    crop = _pair(cfg.get("crop_size", 224), "crop_size") if cfg.get("do_center_crop", True) else None
    common: dict[str, Any] = {"interpolation": _PIL_RESAMPLE[resample], "mean": mean, "std": std}
    if "shortest_edge" in size:
        short = int(size["shortest_edge"])
        if crop is None:
            raise RetbenchError("preprocessor_config.json: shortest-edge resize without centre crop gives non-square "
                                "inputs, which retbench does not support")
        return Preprocess(size=crop, resize="resize_crop", crop_pct=crop / short, **common)
    side = _pair(size, "size")
    if crop is not None and crop != side:
        raise RetbenchError(f"preprocessor_config.json: squash to {side} then crop {crop} is not supported")
    return Preprocess(size=side, resize="squash", **common)


def _cached_hub_file(hub_id: str, filename: str) -> Path | None:
    """``filename`` of ``hub_id`` if already in the Hugging Face cache (never downloads)."""
    try:
        from huggingface_hub import hf_hub_download

        cache_dir = os.environ.get("HF_HUB_CACHE") or None  # huggingface_hub reads it only at import
        return Path(hf_hub_download(hub_id, filename, local_files_only=True, cache_dir=cache_dir))
    except Exception:  # noqa: BLE001 - not cached / no such repo: both mean "not here"
        return None


def _default_preprocess(hub_id: str) -> Preprocess:
    known = OPENAI_CONFIGS.get(hub_id)
    size = known["vision"]["image_size"] if known else 224
    return Preprocess(size=size, resize="resize_crop", interpolation="bicubic", crop_pct=1.0,
                      mean=CLIP_PREPROCESS.mean, std=CLIP_PREPROCESS.std)


def hf_clip_tag(arg: str) -> WeightsTag:
    """A tag for a local folder or a hub id; preprocessing from its ``preprocessor_config.json`` when at hand."""
    folder = Path(arg).expanduser()
    local = folder.is_dir()
    if not local and (arg.count("/") != 1 or arg.startswith((".", "/", "~"))):
        raise RetbenchError(f"hf_clip: '{arg}' is neither a folder nor a Hugging Face repo id (org/name)")
    cfg_path = folder / "preprocessor_config.json" if local else _cached_hub_file(arg, "preprocessor_config.json")
    if cfg_path is not None and cfg_path.is_file():
        preprocess = processor_preprocess(json.loads(cfg_path.read_text(encoding="utf-8")))
    else:
        preprocess = _default_preprocess("" if local else arg)
    return WeightsTag(
        arg, f"transformers CLIPModel from {'folder' if local else 'hub repo'} {arg}", preprocess,
        licence="per model (see its model card)", feature="get_image_features (projected pooled CLS, unnormalised)",
        description="transformers CLIPModel with its own image processor settings and tokenizer",
        filename=WEIGHT_NAMES[0], hub_id="" if local else arg, url="" if local else f"https://huggingface.co/{arg}",
        code=HF_CODE, options={"folder": str(folder.resolve()) if local else None},
    )


class _OpenClipTokens:
    """open_clip's CLIP BPE tokenizer behind the transformers call signature (random-init stand-in)."""

    def __init__(self, context: int, vocab_size: int) -> None:
        import open_clip

        self.tokenizer, self.context, self.vocab_size = open_clip.get_tokenizer("ViT-B-32"), context, vocab_size

    def __call__(self, texts: list[str], **_: Any) -> dict[str, torch.Tensor]:
        ids = self.tokenizer(texts, context_length=self.context)
        eot = ids.argmax(dim=-1, keepdim=True)
        mask = (torch.arange(ids.shape[1]).unsqueeze(0) <= eot).long()
        return {"input_ids": ids.clamp_max(self.vocab_size - 1), "attention_mask": mask}


@register_adapter
class HfClipAdapter(Adapter):
    """transformers ``CLIPModel`` from a folder or the hub cache."""

    family = "hf_clip"
    # fp32: transformers loads CLIPModel in float32 unless told otherwise
    autocast_dtype: ClassVar[torch.dtype | None] = None
    open_ended = True
    has_text = True
    example_arg = "openai/clip-vit-base-patch32"
    tags: ClassVar[dict[str, WeightsTag]] = {
        "<hub id or folder>": WeightsTag(
            "<hub id or folder>", "transformers CLIPModel (folder | $RETBENCH_WEIGHTS | hub cache | --weights random)",
            licence="per model", feature="get_image_features (projected pooled CLS, unnormalised)", code=HF_CODE),
    }

    @classmethod
    def resolve_tag(cls, name: str) -> WeightsTag:
        """A tag for ``hf_clip:<hub id or folder>``."""
        return hf_clip_tag(name)

    # -- locating files ------------------------------------------------------------------------
    def _folder(self) -> Path:
        """The ``save_pretrained`` folder to load: explicit ``--weights``, the arg's folder, or the hub files' folder."""
        if self.weights:
            path = Path(self.weights).expanduser()
            if not path.exists():
                raise RetbenchError(f"weights folder not found: {path}")
            if path.is_file():
                self.weights_path = path
            return path if path.is_dir() else path.parent
        if self.tag.options.get("folder"):
            return Path(self.tag.options["folder"])
        weights = self._hub_weights()
        config = self.weights_file("config.json", what="model config")
        if config.parent != weights.parent:
            raise RetbenchError(f"model '{self.name}': {weights.name} and config.json were found in different folders "
                                f"({weights.parent}, {config.parent}); keep a repo's files together")
        for name in ("preprocessor_config.json", *TOKENIZER_NAMES):  # whichever exist (fetched when online)
            try:
                self.weights_file(name, what="tokenizer or processor config")
            except RetbenchError:
                continue
        self.weights_path = weights
        return weights.parent

    def checkpoint(self) -> Path | None:
        """The weights file :meth:`build` reads, found without building (None for a sharded or random model)."""
        if self.random_init:
            return None
        if self.weights:
            folder = Path(self.weights).expanduser()
            if folder.is_file():
                return folder
            if not folder.exists():
                raise RetbenchError(f"weights folder not found: {folder}")
        elif self.tag.options.get("folder"):
            folder = Path(self.tag.options["folder"])
        else:
            return self._hub_weights()
        return next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)

    def _hub_weights(self) -> Path:
        first: RetbenchError | None = None
        for name in WEIGHT_NAMES:
            try:
                return self.weights_file(name)
            except RetbenchError as exc:
                first = first or exc
        assert first is not None
        first.args = (f"{first.args[0]}; also accepted in its place: {', '.join(WEIGHT_NAMES[1:])}",)
        raise first

    def _random_config(self) -> Any:
        from transformers import CLIPConfig

        folder = self.tag.options.get("folder")
        path = Path(folder) / "config.json" if folder else _cached_hub_file(self.tag.name, "config.json")
        if path is not None and path.is_file():
            return CLIPConfig.from_pretrained(str(path.parent), local_files_only=True)
        known = OPENAI_CONFIGS.get(self.tag.name)
        if known is None:
            raise RetbenchError(f"model '{self.name}' with --weights random needs its config.json (pass the folder, or "
                                f"download the hub repo once); built-in configs: {', '.join(OPENAI_CONFIGS)}")
        return CLIPConfig(text_config=known["text"], vision_config=known["vision"], projection_dim=known["dim"])

    def _tokenizer_from(self, folder: Path | None) -> Any:
        from transformers import AutoTokenizer

        if folder is None:
            return None
        try:
            return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError, TypeError) as exc:
            if self.random_init:
                return None
            raise RetbenchError(f"model '{self.name}': no usable tokenizer in {folder}: {str(exc).splitlines()[0]}") from None

    # -- building ------------------------------------------------------------------------------
    def build(self) -> None:
        """``CLIPModel.from_pretrained`` on the folder (strict), or the config with seeded random weights."""
        from transformers import CLIPModel

        folder: Path | None
        if self.random_init:
            config = self._random_config()
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model = CLIPModel(config)
            folder = Path(self.tag.options["folder"]) if self.tag.options.get("folder") else None
            if folder is None:
                cached = _cached_hub_file(self.tag.name, "tokenizer_config.json")
                folder = cached.parent if cached else None
        else:
            folder = self._folder()
            try:
                # with output_loading_info=True it returns (model, info); transformers' hints give only the model
                loaded: tuple[CLIPModel, dict[str, Any]] = CLIPModel.from_pretrained(  # type: ignore[assignment]
                    str(folder), local_files_only=True, output_loading_info=True, dtype=torch.float32)
                self.model, info = loaded
            except (OSError, ValueError) as exc:
                raise RetbenchError(f"model '{self.name}': cannot load a CLIPModel from {folder}: "
                                    f"{str(exc).splitlines()[0]}") from None
            missing = [k for k in info.get("missing_keys", ()) if not k.endswith("position_ids")]
            if missing:
                raise RetbenchError(f"{folder}: {len(missing)} CLIP parameters missing from the checkpoint, e.g. {missing[0]}")
            if self.weights_path is None:
                self.weights_path = next((folder / n for n in WEIGHT_NAMES if (folder / n).is_file()), None)
            processor = folder / "preprocessor_config.json"
            if processor.is_file():
                self.preprocess = processor_preprocess(json.loads(processor.read_text(encoding="utf-8")))
        self.model.eval().to(self.device)
        text_cfg = cast("CLIPTextConfig", self.model.config.text_config)  # CLIPConfig makes one from a dict or None
        self.context = int(text_cfg.max_position_embeddings)
        self.tokenizer = self._tokenizer_from(folder) or _OpenClipTokens(self.context, int(text_cfg.vocab_size))

    # -- encoding ------------------------------------------------------------------------------
    @staticmethod
    def _pooled(out: Any) -> torch.Tensor:
        """transformers ≥ 5 returns a model output whose ``pooler_output`` is projected; 4.x a tensor."""
        return (out if isinstance(out, torch.Tensor) else out.pooler_output).float()

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """``get_image_features``: the projected image embedding, unnormalised."""
        return self._pooled(self.model.get_image_features(pixel_values=pixels))

    def encode_image_joint(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same projected embedding."""
        return self.encode_image(pixels)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """``get_text_features`` of the tokenised texts (padded to the longest, truncated to the context)."""
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.context, return_tensors="pt")
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        return self._pooled(self.model.get_text_features(input_ids=ids, attention_mask=mask))
