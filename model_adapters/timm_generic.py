"""Any timm architecture (family ``timm``): ``timm:<model name>``.

Random initialisation by default (offline-safe, seeded), local weights with
``--weights FILE`` (safetensors or a torch state dict; classifier heads are dropped, any other tensor the
model lacks is an error), or
``--weights hub`` for timm's own pretrained download. Preprocessing comes from the
model's timm pretrained config (input size, interpolation, crop_pct, mean/std), so it
matches the weights. Features: timm's pooled pre-logits (``num_classes=0``).
"""

from __future__ import annotations

from typing import ClassVar, cast

import torch

from retbench.adapters import Adapter, WeightsTag, register_adapter
from retbench.errors import RetbenchError
from retbench.preprocess import Interpolation, Preprocess
from retbench.weights import load_state_dict

RGB = tuple[float, float, float]  # a per-channel mean or std


def timm_preprocess(name: str) -> Preprocess:
    """The preprocessing timm's pretrained config declares for ``name``."""
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        return Preprocess()
    size = cfg.input_size[-1]
    return Preprocess(
        size=size, resize="resize_crop", interpolation=cast(Interpolation, cfg.interpolation) if cfg.interpolation in (
            "bicubic", "bilinear", "nearest") else "bicubic",
        crop_pct=cfg.crop_pct or 1.0, mean=cast(RGB, tuple(cfg.mean)), std=cast(RGB, tuple(cfg.std)),  # 3 channels: RGB models
    )


HEAD_PREFIXES = ("classifier", "fc", "head", "head_dist", "last_linear")
"""Top-level modules of timm classifier heads: absent with ``num_classes=0``, so a checkpoint's are dropped."""


def checked_state(path: str, model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """The tensors of checkpoint ``path`` for timm model ``name``, less its classifier head.

    Every parameter and buffer of ``model`` must be there with its shape; a tensor that is neither
    one of them nor under a classifier head (:data:`HEAD_PREFIXES`, or the head timm's pretrained
    config names) is an error: the checkpoint is of another architecture (resnet34 weights hold all
    of resnet18's keys and more), and keeping only the matching keys would evaluate a different network.
    """
    import timm

    state = load_state_dict(path)
    own = model.state_dict()
    cfg = timm.models.get_pretrained_cfg(name)
    named = getattr(cfg, "classifier", None)
    heads = set(HEAD_PREFIXES) | ({named} if isinstance(named, str) else set(named or ()))
    unexpected = [k for k in state if k not in own and not any(k == h or k.startswith(h + ".") for h in heads)]
    if unexpected:
        raise RetbenchError(f"{path}: {len(unexpected)} tensors are not parameters of timm:{name} (first: "
                            f"{', '.join(unexpected[:3])}); a checkpoint of another architecture? (only classifier "
                            "heads are dropped)")
    missing = [k for k in own if k not in state]
    if missing:
        raise RetbenchError(f"{path}: {len(missing)} parameters of {name} missing, e.g. {missing[0]}")
    wrong = [k for k in own if tuple(state[k].shape) != tuple(own[k].shape)]
    if wrong:
        raise RetbenchError(f"{path}: tensor '{wrong[0]}' has shape {tuple(state[wrong[0]].shape)}, timm:{name} expects "
                            f"{tuple(own[wrong[0]].shape)} ({len(wrong)} such); a checkpoint of another architecture?")
    return {k: state[k] for k in own}


@register_adapter
class TimmAdapter(Adapter):
    """Generic timm image encoder."""

    family = "timm"
    # fp32: timm's own inference/validation scripts run fp32 unless --amp is given
    autocast_dtype: ClassVar[torch.dtype | None] = None
    open_ended = True
    example_arg = "resnet18"
    default_random = True
    channels_last = True
    tags: ClassVar[dict[str, WeightsTag]] = {
        "<any timm model>": WeightsTag("<any timm model>", "timm (random init | --weights FILE | --weights hub)",
                                       licence="per model", feature="pooled pre-logits"),
    }

    @classmethod
    def resolve_tag(cls, name: str) -> WeightsTag:
        """Build a tag for any model name timm knows."""
        import timm

        if not timm.is_model(name):
            close = timm.list_models(f"*{name.split('.')[0][:6]}*")[:5]
            raise RetbenchError(f"timm has no model '{name}'" + (f"; similar: {', '.join(close)}" if close else ""))
        return WeightsTag(name, "timm", timm_preprocess(name), licence="per model", feature="pooled pre-logits")

    def build(self) -> None:
        """Create the model; load local or hub weights when asked."""
        import timm

        torch.manual_seed(0)
        hub = self.weights == "hub"
        self.model = timm.create_model(self.tag.name, pretrained=hub, num_classes=0)
        if self.weights and not hub and not self.random_init:
            self.model.load_state_dict(checked_state(self.weights, self.model, self.tag.name))
        self.model.eval().to(self.device)

    def weights_identity(self) -> str:
        """sha256 of local weights; otherwise random-init seed or hub tag."""
        if self.weights == "hub":
            return f"timm-hub:{self.tag.name}"
        if not self.weights or self.random_init:
            return f"random-init(seed=0):{self.tag.name}"
        return super().weights_identity()

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features."""
        return self.model(pixels)
