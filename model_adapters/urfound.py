"""UrFound (family ``urfound``): knowledge-guided masked modelling, ViT-B/16, colour fundus and OCT.

Source: yukkai/UrFound (Yu et al., MICCAI 2024). Weights: Hugging Face ``yyyyk/UrFound`` (linked from
the README "Release" section). The file name is NOT verified from an official page: ``urfound_mm.pth``
is the name two independent model inventories report for that repository; if yours differs, pass
``--weights FILE``. Layout (derived from ``util/model_urfound.py``): ``{"model": state dict}`` with the
ViT-B encoder (``cls_token``, ``pos_embed`` [1,197,768], ``patch_embed``, ``blocks.0-11``, ``norm``),
the MAE decoder (``mask_token``, ``decoder_*``, 4 blocks of 768-d) and the text branch
(``bert_encoder.*``, ``bert_mlp`` 768->384), all but the encoder ignored.

Reproduced:

- Architecture: ``finetune/models_vit.py:vit_base_patch16`` (patch 16, 768-d, depth 12, 12 heads,
  ``qkv_bias``, LayerNorm eps 1e-6), 224 px, ``global_pool=True``.
- Load: ``main_finetune.py`` (``checkpoint["model"]``, mismatched head dropped, ``interpolate_pos_embed``,
  ``strict=False``; shared code in ``_mae_vit``).
- Feature: ``fc_norm(mean of patch tokens)`` with a fresh ``fc_norm`` (weight 1, bias 0; the checkpoint's
  ``norm.*`` is ignored), 768-d.
- Preprocessing: ``finetune/datasets_finetune.py:build_transform`` eval branch, Resize(256) bicubic +
  CenterCrop(224), ImageNet mean/std.

Licence: MIT (repository LICENSE; RetFiner's licence table lists the UrFound weights as MIT too).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from retbench.model_adapters._mae_vit import MaeVitAdapter

from retbench.adapters import WeightsTag, register_adapter
from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

TAGS: dict[str, WeightsTag] = {
    "default": WeightsTag(
        "default", "huggingface:yyyyk/UrFound",
        Preprocess(size=224, resize="resize_crop", interpolation="bicubic", crop_pct=224 / 256,
                   mean=IMAGENET_MEAN, std=IMAGENET_STD),
        licence="MIT",
        paper="Yu et al., UrFound: Towards Universal Retinal Foundation Models via Knowledge-Guided Masked "
              "Modeling, MICCAI 2024",
        feature="fc_norm(mean of patch tokens), fresh LayerNorm, final norm dropped (768-d)",
        description="UrFound ViT-B/16, MAE + report MLM pretraining on ~180k colour fundus and OCT images",
        filename="urfound_mm.pth",
        hub_id="yyyyk/UrFound",
        url="https://huggingface.co/yyyyk/UrFound",
        code="yukkai/UrFound: finetune/models_vit.py, main_finetune.py, finetune/datasets_finetune.py, "
             "util/model_urfound.py",
        differs="checkpoint file name 'urfound_mm.pth' is unverified (pass --weights FILE if the hub file differs)",
        options={"arch": "vit_base_patch16", "checkpoint_key": "model", "feature": "gap_fresh_ln"},
    ),
}


@register_adapter
class UrfoundAdapter(MaeVitAdapter):
    """UrFound ViT-B/16 image encoder (vision only; the BERT branch is a pretraining decoder)."""

    family = "urfound"
    # fp16 autocast: yukkai/UrFound finetune/engine_finetune.py evaluate() runs under torch.cuda.amp.autocast()
    autocast_dtype: ClassVar[torch.dtype | None] = torch.float16
    default_tag = "default"
    tags: ClassVar[dict[str, WeightsTag]] = TAGS
