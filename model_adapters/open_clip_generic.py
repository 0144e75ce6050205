"""Any open_clip model (family ``open_clip``): ``open_clip:ARCH/PRETRAINED`` or ``open_clip:ARCH``.

``ARCH`` is one of open_clip's built-in model configs (``open_clip.list_models()``, e.g.
``ViT-B-32``, ``RN50``, ``ViT-B-16-SigLIP``), ``PRETRAINED`` one of its pretrained tags for
that architecture (``open_clip.list_pretrained_tags_by_model(ARCH)``, e.g. ``openai``,
``laion2b_s34b_b79k``). Examples: ``open_clip:ViT-B-32/laion2b_s34b_b79k``, ``open_clip:RN50/openai``.

Preprocessing comes from the tag's pretrained config (mlfoundations/open_clip
``src/open_clip/pretrained.py``: mean/std, interpolation, ``resize_mode``) with the image size
of the model config (``model_configs/<ARCH>.json``), mapped onto open_clip's eval transform
(``src/open_clip/transform.py:image_transform``): ``shortest`` = shorter side to the size
then centre crop (``crop_pct`` 1); ``squash`` = resize both sides. Without a tag, open_clip's
``PreprocessCfg`` defaults (CLIP mean/std, bicubic, shortest) apply.

Weights: ``--weights FILE|DIR``, ``$RETBENCH_WEIGHTS`` (``/open_clip``, ``/<hub id>``) or the
Hugging Face cache of the tag's hub repo (downloaded when online), under the file names
open_clip's downloader tries (``open_clip_model.safetensors`` first, then
``open_clip_pytorch_model.bin``, or the file the tag names); a tag's legacy URL file (OpenAI
TorchScript ``RN50.pt`` and the like) is accepted too, read without executing code (see
``model_adapters/clip.py``). The state dict goes through open_clip's own compatibility steps
(``factory.py:load_checkpoint``: third-party conversions, old text layout, ``logit_scale``
shape, position-id drop, position-embedding resizing) and is loaded strictly.
``--weights random`` builds the architecture with seeded random weights.

Features: ``encode_image`` (projected, unnormalised) for probes and zero-shot; text through
open_clip's tokenizer for the architecture. Zero-shot follows open_clip and CLIP_benchmark
(template means renormalised, logits × 100), retbench's default.
"""

from __future__ import annotations

import os
from typing import Any, ClassVar

import torch
from retbench.model_adapters.clip import OPEN_CLIP_BIN, OPEN_CLIP_SAFETENSORS, OpenClipModelAdapter

from retbench.adapters import WeightsTag, register_adapter
from retbench.errors import RetbenchError
from retbench.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Interpolation, Preprocess

OPEN_CLIP_CODE = "mlfoundations/open_clip src/open_clip/{factory.py,pretrained.py,transform.py}"


def split_arg(arg: str) -> tuple[str, str | None]:
    """``ARCH/PRETRAINED`` → (arch, tag); ``ARCH`` alone (also ``ViT-B/32`` spelling) → (arch, None)."""
    import open_clip

    models = set(open_clip.list_models())
    if arg in models or arg.replace("/", "-") in models:
        return (arg if arg in models else arg.replace("/", "-")), None
    arch, _, pretrained = arg.rpartition("/")
    arch = arch.replace("/", "-")
    if arch not in models:
        close = [m for m in sorted(models) if arch.split("-")[0].lower() in m.lower()][:6]
        raise RetbenchError(f"open_clip has no model '{arch or arg}'" + (f"; similar: {', '.join(close)}" if close else ""))
    return arch, pretrained


def open_clip_preprocess(arch: str, pretrained_cfg: dict[str, Any]) -> Preprocess:
    """The eval preprocessing open_clip uses for ``arch`` with weights described by ``pretrained_cfg``."""
    import open_clip

    vision = (open_clip.get_model_config(arch) or {}).get("vision_cfg", {})
    size = vision.get("image_size", 224)
    size = int(size[-1] if isinstance(size, (tuple, list)) else size)
    mode = pretrained_cfg.get("resize_mode", "shortest")
    if mode not in ("shortest", "squash"):
        raise RetbenchError(f"open_clip resize_mode '{mode}' of {arch} has no retbench equivalent")
    interp: Interpolation = "bilinear" if pretrained_cfg.get("interpolation") == "bilinear" else "bicubic"  # open_clip's own rule
    return Preprocess(
        size=size, resize="squash" if mode == "squash" else "resize_crop", interpolation=interp, crop_pct=1.0,
        mean=tuple(pretrained_cfg.get("mean", OPENAI_CLIP_MEAN)), std=tuple(pretrained_cfg.get("std", OPENAI_CLIP_STD)),
    )


def hub_location(pretrained_cfg: dict[str, Any]) -> tuple[str, list[str]]:
    """(hub repo id, file names to try) of a pretrained config, the way open_clip's downloader reads it."""
    hub = pretrained_cfg.get("hf_hub", "")
    if not hub:
        return "", []
    model_id, filename = os.path.split(hub)  # "org/repo/" → ("org/repo", ""): the default file name
    if not filename:
        return model_id, [OPEN_CLIP_SAFETENSORS, OPEN_CLIP_BIN]
    if filename == OPEN_CLIP_BIN:
        return model_id, [OPEN_CLIP_SAFETENSORS, OPEN_CLIP_BIN]
    if filename.endswith((".bin", ".pth")):
        return model_id, [filename[:-4] + ".safetensors", filename]
    return model_id, [filename]


def open_clip_tag(arg: str) -> WeightsTag:
    """A weights tag for ``ARCH[/PRETRAINED]``."""
    from open_clip import pretrained as oc_pretrained

    arch, pretrained = split_arg(arg)
    cfg: dict[str, Any] = {}
    if pretrained is not None:
        cfg = oc_pretrained.get_pretrained_cfg(arch, pretrained)
        if not cfg:
            tags = oc_pretrained.list_pretrained_tags_by_model(arch)
            raise RetbenchError(f"open_clip has no pretrained tag '{pretrained}' for {arch}; tags: "
                                + (", ".join(tags) if tags else "none (use open_clip:" + arch + " with --weights FILE)"))
    hub_id, names = hub_location(cfg)
    url = cfg.get("url", "")
    legacy = os.path.basename(url) if url else ""
    if legacy and legacy not in names:
        names.append(legacy)
    where = f"https://huggingface.co/{hub_id}" if hub_id else url
    return WeightsTag(
        arg, f"open_clip {arch}" + (f" pretrained '{pretrained}'" if pretrained else " (no pretrained tag)"),
        open_clip_preprocess(arch, cfg), licence="per release (see its open_clip pretrained entry / model card)",
        feature="encode_image (projected, unnormalised)",
        description=f"open_clip create_model('{arch}') + weights of tag '{pretrained}'" if pretrained else
        f"open_clip create_model('{arch}'); weights only from --weights FILE",
        filename=names[0] if names else "", hub_id=hub_id, url=where, code=OPEN_CLIP_CODE,
        options={"arch": arch, "pretrained": pretrained, "quick_gelu": bool(cfg.get("quick_gelu", False)),
                 "alternatives": tuple(names[1:]), "legacy_file": legacy},
    )


@register_adapter
class OpenClipAdapter(OpenClipModelAdapter):
    """Any architecture and pretrained tag open_clip knows."""

    family = "open_clip"
    # fp32: open_clip create_model(precision='fp32') is the library's default
    autocast_dtype: ClassVar[torch.dtype | None] = None
    open_ended = True
    example_arg = "RN50/openai"
    tags: ClassVar[dict[str, WeightsTag]] = {
        "<arch>/<pretrained>": WeightsTag(
            "<arch>/<pretrained>", "open_clip (--weights FILE | $RETBENCH_WEIGHTS | hub cache | --weights random)",
            licence="per release", feature="encode_image (projected, unnormalised)", code=OPEN_CLIP_CODE),
    }

    @classmethod
    def resolve_tag(cls, name: str) -> WeightsTag:
        """Build the tag of ``ARCH[/PRETRAINED]`` from open_clip's configs."""
        return open_clip_tag(name)

    def checkpoint_names(self) -> list[str]:
        """The names open_clip's downloader would fetch, then the tag's legacy URL file."""
        names = [self.tag.filename, *self.tag.options.get("alternatives", ())]
        names = [n for n in names if n]
        if not names and not self.weights:
            raise RetbenchError(f"model '{self.name}' has no pretrained tag: pass --weights FILE "
                                "(or name a tag, e.g. open_clip:ViT-B-32/openai)")
        return names or [OPEN_CLIP_SAFETENSORS]

    def arch(self) -> tuple[str, dict[str, Any]]:
        """The open_clip model name; QuickGELU when the tag was trained with it."""
        return self.tag.options["arch"], {"quick_gelu": bool(self.tag.options.get("quick_gelu"))}

    def prepare_state(self, state: dict[str, torch.Tensor], path: Any) -> dict[str, torch.Tensor]:
        """open_clip's own compatibility steps of ``factory.py:load_checkpoint``, applied to the read state."""
        from open_clip.convert import convert_state_dict
        from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

        model = self.model
        state = convert_state_dict(model, dict(state))
        if "positional_embedding" in state and not hasattr(model, "positional_embedding"):
            state = convert_to_custom_text_state_dict(state)
        for key in ("logit_scale", "logit_bias"):
            own = getattr(model, key, None)
            if key in state and own is not None and own.ndim != state[key].ndim:
                state[key] = state[key].reshape(own.shape)
        if "logit_bias" not in state and getattr(model, "logit_bias", None) is not None and "logit_scale" in state:
            state["logit_bias"] = torch.zeros_like(state["logit_scale"])
        position_ids = "text.transformer.embeddings.position_ids"
        if position_ids in state and position_ids not in model.state_dict():
            del state[position_ids]
        resize_pos_embed(state, model)
        resize_text_pos_embed(state, model)
        return state
