"""VisionFM (family ``visionfm``): one iBOT-pretrained ViT-B/16 encoder per ophthalmic imaging modality.

Qiu et al., "Development and validation of a multimodal multitask vision foundation model for
generalist ophthalmic artificial intelligence", NEJM AI 1(12), 2024. Code and weights: research and
educational use only, no commercial use (README "LICENSE"; the repository's LICENSE file is
CC BY-NC 4.0 per the RetFiner licence table, not re-checked here).

What is reproduced, and where each convention comes from (all in github.com/ABILab-CUHK/VisionFM):

- Architecture (``models/vision_transformer.py``: ``vit_base``): patch 16, width 768, depth 12,
  12 heads, MLP ratio 4, ``qkv_bias=True``, LayerNorm eps 1e-6, exact GELU, no LayerScale
  (``init_values=0``), a class token with a learned position embedding, 224 px. Its parameter
  names equal timm's ``vit_base_patch16_224`` (``patch_embed.proj``, ``blocks.i.{norm1, attn.qkv,
  attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``), which is built here.
- Weights (README "3.1 Download the pretrained weights"): Google Drive files
  ``VFM_<Modality>_weights.pth``; the encoder sits under the key ``teacher`` with iBOT's
  ``backbone.`` prefix (and ``module.`` when saved from DDP), next to the iBOT projection head
  (``head.*``). ``utils.load_pretrained_weights`` takes ``checkpoint["teacher"]`` (the default
  ``--checkpoint_key``), strips ``module.`` and ``backbone.``, resizes ``pos_embed`` bicubically
  (``utils.resize_pos_embed``, ``align_corners=False``) when its grid differs, and loads with
  ``strict=False``. Here every encoder parameter must be present (a missing one is an error, not a
  silently random weight); the projection head and other extra keys are ignored. iBOT-style
  checkpoints also pickle their ``argparse.Namespace`` of arguments: that one class is allowed
  through the otherwise code-free ``torch.load(weights_only=True)``.
- Feature (``evaluation/train_cls_decoder.py`` defaults ``--n_last_blocks 4
  --avgpool_patchtokens 0``; ``get_intermediate_layers``): the class tokens of the last four
  blocks, each passed through the final ``norm``, concatenated in block order (3072-d): the input
  of VisionFM's classification decoder (``models/head.py`` ``ClsHead``).
- Preprocessing (``evaluation/train_cls_decoder.py``, ``evaluation/transforms.py``): PIL image,
  ``Resize((224, 224))`` (squash) with bicubic interpolation, ``ToTensor``, and the modality's
  mean/std from ``utils.get_stats`` ("Fundus", "OCT", "FFA"). No fundus crop.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from retbench.model_adapters._mae_vit import interpolate_pos_embed

from retbench.adapters import Adapter, WeightsTag, register_adapter
from retbench.errors import RetbenchError
from retbench.preprocess import Preprocess
from retbench.weights import load_checkpoint

N_LAST_BLOCKS = 4
DRIVE = "https://drive.google.com/file/d/{}/view"
CODE = ("github.com/ABILab-CUHK/VisionFM: models/vision_transformer.py, utils.py (load_pretrained_weights, "
        "get_stats), evaluation/train_cls_decoder.py, evaluation/transforms.py")
LICENCE = "research and educational use only, non-commercial (VisionFM LICENSE; CC BY-NC 4.0)"
PAPER = "Qiu et al., NEJM AI 1(12):AIoa2300221, 2024"
FEATURE = "concatenated final-norm CLS tokens of the last 4 blocks (3072-d; VisionFM's decoder input)"

# utils.get_stats(modality): (mean, std)
STATS = {
    "Fundus": ((0.423737496137619, 0.2609460651874542, 0.128403902053833),
               (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)),
    "OCT": ((0.21091926, 0.21091926, 0.21091919), (0.17598894, 0.17598891, 0.17598893)),
    "FFA": ((0.2020487, 0.20205145, 0.20201068), (0.17406046, 0.17404206, 0.17401208)),
}


def _tag(name: str, modality: str, drive_id: str, description: str) -> WeightsTag:
    mean, std = STATS[modality]
    return WeightsTag(
        name, f"VisionFM {modality} encoder (Google Drive {drive_id})",
        Preprocess(size=224, resize="squash", interpolation="bicubic", mean=mean, std=std),
        licence=LICENCE, paper=PAPER, feature=FEATURE, description=description,
        filename=f"VFM_{modality}_weights.pth", url=DRIVE.format(drive_id), code=CODE,
        options={"modality": modality, "checkpoint_key": "teacher"},
    )


@register_adapter
class VisionFMAdapter(Adapter):
    """A VisionFM modality encoder; the probe feature is its classification decoder's input."""

    model: Any  # a timm ViT: typed Any, its attributes are the architecture's own (create_model returns nn.Module)
    family = "visionfm"
    # fp32: VisionFM's evaluation/extract_features.py and train_cls_decoder.py use no autocast
    autocast_dtype: ClassVar[torch.dtype | None] = None
    default_tag = "fundus"
    tags: ClassVar[dict[str, WeightsTag]] = {
        "fundus": _tag("fundus", "Fundus", "13uWm0a02dCWyARUcrCdHZIcEgRfBmVA4",
                       "VisionFM colour fundus photograph encoder (ViT-B/16, iBOT)"),
        "oct": _tag("oct", "OCT", "1o6E-ine2QLx2pxap-c77u-SU0FjxwypA",
                    "VisionFM OCT B-scan encoder (ViT-B/16, iBOT); RetFiner-V starts from it"),
        "ffa": _tag("ffa", "FFA", "128izBUNV00Ojb9w9Dq3GhBvhWqzU-mla",
                    "VisionFM fundus fluorescein angiography encoder (ViT-B/16, iBOT). The file name follows the "
                    "README's VFM_<Modality>_weights.pth pattern (the README names the Fundus/OCT/External files)"),
    }

    def build(self) -> None:
        """timm ViT-B/16 on ``self.device``: seeded random init, or the release's teacher encoder."""
        import timm

        path = None if self.random_init else self.weights_file()
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            self.model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=224)
        finally:
            torch.random.set_rng_state(state)
        if path is not None:
            self.model.load_state_dict(visionfm_encoder_state(path, self.model), strict=True)
        self.model.eval().to(self.device)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Final-norm class tokens of the last four blocks, concatenated: (B, 3072)."""
        m = self.model
        x = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(pixels))))
        cls_tokens = []
        first = len(m.blocks) - N_LAST_BLOCKS
        for i, block in enumerate(m.blocks):
            x = block(x)
            if i >= first:
                cls_tokens.append(m.norm(x)[:, 0])
        return torch.cat(cls_tokens, dim=-1).float()


def visionfm_encoder_state(path: str | Path, model: torch.nn.Module, key: str = "teacher") -> dict[str, torch.Tensor]:
    """The encoder state dict inside a VisionFM checkpoint, named and shaped like ``model`` (timm ViT)."""
    obj = load_checkpoint(path)
    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
        obj = obj[key]
    if not isinstance(obj, dict):
        raise RetbenchError(f"{path}: expected a checkpoint dict with key '{key}', got {type(obj).__name__}")
    state = {}
    for name, value in obj.items():
        if isinstance(value, torch.Tensor):
            state[name.removeprefix("module.").removeprefix("backbone.")] = value
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    if missing:
        raise RetbenchError(f"{path}: {len(missing)} VisionFM encoder parameters missing (e.g. {missing[:3]}); "
                            f"expected the iBOT teacher under key '{key}' with backbone.* names")
    state = {k: state[k] for k in own}
    interpolate_pos_embed(model, state)  # bicubic, align_corners=False, class token kept: as VisionFM's utils
    return state
