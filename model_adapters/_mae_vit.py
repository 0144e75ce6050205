"""Shared machinery of the MAE-style ViT families (RETFound, DERETFound, UrFound, RetFiner).

Private module (leading underscore: not auto-registered). It builds the timm
``VisionTransformer`` each release uses, loads a checkpoint the way the releases' own
fine-tuning code does, and pools the token sequence into the feature their linear probes use.

Conventions reproduced (each verified in the official code; retbench re-implements, nothing is copied):

- Architectures: MAE ViT-L/16 and ViT-B/16 = timm ``VisionTransformer`` with patch 16, mlp ratio 4,
  ``qkv_bias=True``, LayerNorm eps 1e-6, 224 px (rmaphoh/RETFound_MAE ``models_vit.py``;
  yukkai/UrFound ``finetune/models_vit.py``; Jonlysun/DERETFound ``models_vit.py``). VisionFM's
  ViT-B/16 has the same parameter names and no LayerScale (ronnief1/RetFiner ``RetFiner/visionfm_hf.py``).
  RETFound-DINOv2 = timm ``vit_large_patch14_dinov2`` created with ``img_size=224`` (RETFound
  ``models_vit.py:RETFound_dinov2``); retbench builds it with random init, never downloading timm's
  ``lvd142m`` weights that the official factory fetches before overwriting them.
- Loading (RETFound ``main_finetune.py``, same block in DERETFound/UrFound ``main_finetune.py``):
  take ``checkpoint["model"]`` (MAE) or ``checkpoint["teacher"]`` (DINOv2); strip ``backbone.``;
  rename ``mlp.w12.``/``mlp.w3.`` to ``mlp.fc1.``/``mlp.fc2.``; interpolate ``pos_embed`` with
  ``util/pos_embed.py:interpolate_pos_embed`` (extra tokens kept, the patch grid resized bicubic,
  ``align_corners=False``); ``load_state_dict(strict=False)``, so decoder, ``mask_token``, text-branch
  and projection-head keys are ignored. The old code asserted that only ``head.*``/``fc_norm.*`` were
  missing; retbench keeps that check (every encoder weight must be in the file, an error otherwise)
  instead of silently running with random weights where a checkpoint does not match.
- Features (``models_vit.py:forward_features`` with ``global_pool=True``): the final ``norm`` is
  deleted and a FRESH ``fc_norm`` LayerNorm is created; it is absent from every pretraining
  checkpoint, so a frozen probe sees it at its init (weight 1, bias 0): LayerNorm without effective
  affine of the mean of the patch tokens, and the checkpoint's ``norm.*`` is ignored.

Checkpoints are read with ``torch.load(weights_only=True)`` (``retbench.weights.load_checkpoint``),
allowing only ``argparse.Namespace`` beyond tensors and containers: MAE-style training checkpoints
store their ``args`` next to ``model``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from retbench.adapters import Adapter
from retbench.errors import RetbenchError
from retbench.weights import load_state_dict

LN_EPS = 1e-6

# timm VisionTransformer arguments of the MAE-style encoders; the DINOv2 one is timm's own config
ARCHS: dict[str, dict[str, Any]] = {
    "vit_large_patch16": dict(patch_size=16, embed_dim=1024, depth=24, num_heads=16),
    "vit_base_patch16": dict(patch_size=16, embed_dim=768, depth=12, num_heads=12),
    "vit_large_patch14_dinov2": {},
}


@dataclass(frozen=True)
class FeatureRule:
    """How the token sequence becomes the probe feature.

    ``final_norm``: whether the encoder's last LayerNorm is applied (False: the official code
    deleted it, tokens come straight from the last block). ``parts``: what is concatenated, in
    order, from ``gap`` (mean of the patch tokens) and ``cls`` (the class token). ``fresh_ln``:
    a LayerNorm at its initialisation (weight 1, bias 0, eps 1e-6) applied to the result.
    """

    final_norm: bool
    parts: tuple[str, ...]
    fresh_ln: bool

    def dim(self, width: int) -> int:
        """Feature dimension for an encoder of ``width`` channels."""
        return width * len(self.parts)


FEATURES: dict[str, FeatureRule] = {
    # RETFound/DERETFound/UrFound global_pool=True: fc_norm(mean of patch tokens), norm deleted
    "gap_fresh_ln": FeatureRule(final_norm=False, parts=("gap",), fresh_ln=True),
    # RETFound-DINOv2 official probe (timm 'token' pool): CLS after the final norm
    "cls_norm": FeatureRule(final_norm=True, parts=("cls",), fresh_ln=False),
    # RETFound latent_feature.ipynb, DINOv2 branch: fresh LayerNorm of the mean of post-norm patch tokens
    "gap_norm_fresh_ln": FeatureRule(final_norm=True, parts=("gap",), fresh_ln=True),
    # RetFiner-R/-U 'concat': fc_norm(cat[mean patch, CLS]) before the (deleted) final norm
    "concat_gap_cls_fresh_ln": FeatureRule(final_norm=False, parts=("gap", "cls"), fresh_ln=True),
    # RetFiner-V (VisionFM feat_concat): cat[CLS, mean patch] after the final norm
    "concat_cls_gap_norm": FeatureRule(final_norm=True, parts=("cls", "gap"), fresh_ln=False),
}


def build_vit(arch: str, *, final_norm: bool, meta: bool = False) -> nn.Module:
    """The timm ViT for ``arch`` at 224 px without head; ``final_norm=False`` replaces ``norm`` by Identity.

    ``meta=True`` creates it without memory or initialisation, for :func:`load_encoder` to fill
    (building a ViT-L on the CPU costs seconds that a checkpoint load would throw away). Otherwise
    the weights are timm's initialisation, which the caller seeds.
    """
    import timm
    from timm.models.vision_transformer import VisionTransformer

    if arch not in ARCHS:
        raise RetbenchError(f"unknown MAE-ViT architecture '{arch}'; known: {', '.join(ARCHS)}")
    common: dict[str, Any] = dict(img_size=224, num_classes=0, dynamic_img_size=True)
    if meta:
        common["weight_init"] = "skip"
    with torch.device("meta") if meta else torch.device("cpu"):
        if arch == "vit_large_patch14_dinov2":
            model = timm.create_model(arch, pretrained=False, **common)
        else:
            model = VisionTransformer(
                **ARCHS[arch], mlp_ratio=4.0, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=LN_EPS),
                global_pool="", **common,
            )
    if not final_norm:
        model.norm = nn.Identity()  # the official global_pool model deletes it; its weights are ignored
    return model


def read_state_dict(path: str | Path, key: str | None) -> dict[str, torch.Tensor]:
    """The tensors of ``checkpoint[key]`` (``key=None``: a flat file, common wrappers unwrapped), official renames applied.

    Renames (RETFound ``main_finetune.py``): drop a leading ``module.``, strip ``backbone.``,
    ``mlp.w12.`` -> ``mlp.fc1.``, ``mlp.w3.`` -> ``mlp.fc2.``.
    """
    out: dict[str, torch.Tensor] = {}
    for name, value in load_state_dict(path, key).items():  # safe load, wrappers and ``module.`` handled there
        name = name.replace("backbone.", "").replace("mlp.w12.", "mlp.fc1.").replace("mlp.w3.", "mlp.fc2.")
        out[name] = value
    return out


def interpolate_pos_embed(model: Any, state: dict[str, torch.Tensor]) -> bool:
    """RETFound's ``interpolate_pos_embed``: resize the checkpoint's patch grid to the model's, in place.

    The extra (class) tokens are kept as they are; the square grid of patch positions is resized
    with bicubic interpolation (``align_corners=False``, no antialiasing). Returns whether it resized.
    """
    if "pos_embed" not in state:
        return False
    saved = state["pos_embed"]
    num_patches = model.patch_embed.num_patches
    extra = model.pos_embed.shape[-2] - num_patches
    old = int((saved.shape[-2] - extra) ** 0.5)
    new = int(num_patches ** 0.5)
    if old == new:
        return False
    width = saved.shape[-1]
    grid = saved[:, extra:].float().reshape(-1, old, old, width).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    state["pos_embed"] = torch.cat([saved[:, :extra].float(), grid.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
    return True


def load_encoder(model: nn.Module, state: dict[str, torch.Tensor], *, source: str,
                 drop_prefixes: tuple[str, ...] = ()) -> list[str]:
    """Load ``state`` into ``model`` (possibly on the meta device) the official way; returns the ignored keys.

    ``drop_prefixes`` are deleted first (the releases' own deletions, e.g. RetFiner-R's ``head.``
    and ``proj.``); ``pos_embed`` is interpolated; keys the encoder does not have are ignored
    (``strict=False``); every encoder weight must be present with its shape.
    """
    state = {k: v for k, v in state.items() if not k.startswith(drop_prefixes)}
    interpolate_pos_embed(model, state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        shown = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise RetbenchError(
            f"{source}: {len(missing)} of the encoder's {len(own)} weights are missing from the checkpoint "
            f"({shown}); is it the right file for this model?"
        )
    wrong = [f"{k} {tuple(state[k].shape)} != {tuple(own[k].shape)}" for k in own if state[k].shape != own[k].shape]
    if wrong:
        raise RetbenchError(f"{source}: checkpoint shapes do not fit the encoder: {'; '.join(wrong[:3])}")
    chosen = {k: state[k].detach().to(torch.float32).contiguous() for k in own}
    model.load_state_dict(chosen, strict=True, assign=True)
    return sorted(set(state) - set(own))


def pool_tokens(tokens: torch.Tensor, rule: FeatureRule, num_prefix: int, fresh_ln: nn.Module | None) -> torch.Tensor:
    """(B, N, D) tokens -> (B, D * len(rule.parts)) feature following ``rule``."""
    pieces = {"gap": lambda: tokens[:, num_prefix:].mean(dim=1), "cls": lambda: tokens[:, 0]}
    feats = [pieces[p]() for p in rule.parts]
    out = feats[0] if len(feats) == 1 else torch.cat(feats, dim=1)
    if rule.fresh_ln:
        assert fresh_ln is not None
        out = fresh_ln(out)
    return out


def fresh_layer_norm(dim: int) -> nn.LayerNorm:
    """The official ``fc_norm`` as a frozen probe sees it: a new LayerNorm (weight 1, bias 0, eps 1e-6)."""
    ln = nn.LayerNorm(dim, eps=LN_EPS)
    ln.requires_grad_(False)
    return ln


class MaeVitAdapter(Adapter):
    """Base adapter of the MAE-style ViT families; each tag's ``options`` say how to build and pool.

    ``options``: ``arch`` (a key of :data:`ARCHS`), ``checkpoint_key`` (``"model"``, ``"teacher"`` or
    ``None`` for a flat state dict), ``feature`` (a key of :data:`FEATURES`) and optionally
    ``drop_prefixes`` (key prefixes the release deletes before loading).
    """

    model: Any  # a timm ViT: typed Any, its attributes are the architecture's own (build_vit returns nn.Module)

    def build(self) -> None:
        """Build the encoder: seeded random init, or the tag's checkpoint loaded the official way."""
        opts = self.tag.options
        self.rule = FEATURES[opts["feature"]]
        if self.random_init:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                self.model = build_vit(opts["arch"], final_norm=self.rule.final_norm)
            self.ignored_keys: list[str] = []
        else:
            path = self.weights_file()
            state = read_state_dict(path, opts.get("checkpoint_key"))
            self.model = build_vit(opts["arch"], final_norm=self.rule.final_norm, meta=True)
            self.ignored_keys = load_encoder(self.model, state, source=str(path),
                                             drop_prefixes=tuple(opts.get("drop_prefixes", ())))
            del state
        width = self.model.embed_dim
        self.fc_norm = fresh_layer_norm(self.rule.dim(width)) if self.rule.fresh_ln else None
        self.model.eval().to(self.device)
        if self.fc_norm is not None:
            self.fc_norm.eval().to(self.device)

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The release's linear-probe feature of normalised pixels (B, 3, 224, 224) -> (B, D)."""
        tokens = self.model.forward_features(pixels)
        return pool_tokens(tokens, self.rule, self.model.num_prefix_tokens, self.fc_norm).float()
