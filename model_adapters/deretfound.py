"""DERETFound / RETFound-DE (family ``deretfound``): RETFound's MAE ViT-L/16 pretrained with synthetic fundus images.

Source: Jonlysun/DERETFound (repository name RETFound-DE), Sun et al., "Controllable generative model
enables high data efficiency for building medical foundation model". Weights: Zenodo record 13340936
(also BaiduDisk, code 7n7v), pretraining checkpoint ``checkpoint/PreTraining/checkpoint-best.pth``,
``{"model": MAE state dict}`` with ``norm.*`` (and the MAE decoder, which is ignored).

Reproduced:

- Architecture and load: identical to RETFound MAE (``models_vit.py:vit_large_patch16``, img 224,
  ``global_pool=True``; ``main_finetune.py``: ``checkpoint["model"]``, head dropped on mismatch,
  ``util/pos_embed.py:interpolate_pos_embed``, ``strict=False`` with the missing-keys assertion
  ``{head, fc_norm}``), shared code in ``_mae_vit``.
- Feature: ``fc_norm(mean of patch tokens)`` with ``fc_norm`` a fresh LayerNorm (weight 1, bias 0:
  not in the checkpoint; its ``norm.*`` is ignored), 1024-d.
- Preprocessing: the dataset classes ``main_finetune.py`` uses (``util/data_DRGrading.py``,
  ``data_Glaucoma.py``, ``data_MultiDisease.py``, eval branch): ``transforms.Resize((224, 224))``
  (squash, bilinear), ``ToTensor``, ImageNet mean/std. (``util/datasets.py``'s Resize256+CenterCrop224
  exists in the repository but is not on the main path.)
- Precision: ``engine_finetune.py`` ``evaluate`` runs the model under ``torch.cuda.amp.autocast()`` (fp16),
  retbench's default on CUDA for this family.

``tests/test_adapters_official_code.py`` loads random weights in this layout with DERETFound's own
``models_vit.py`` and ``main_finetune.py`` loading and compares features (and the datasets' evaluation
transform) with retbench's on a real image.

Licence: CC BY-NC 4.0 (repository LICENSE).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from retbench.model_adapters._mae_vit import MaeVitAdapter

from retbench.adapters import WeightsTag, register_adapter
from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

TAGS: dict[str, WeightsTag] = {
    "default": WeightsTag(
        "default", "zenodo:13340936 checkpoint/PreTraining/checkpoint-best.pth",
        Preprocess(size=224, resize="squash", interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD),
        licence="CC BY-NC 4.0",
        paper="Sun et al., Controllable generative model enables high data efficiency for building medical "
              "foundation model (RETFound-DE)",
        feature="fc_norm(mean of patch tokens), fresh LayerNorm, final norm dropped (1024-d)",
        description="RETFound-DE: MAE ViT-L/16 pretrained on real and diffusion-generated colour fundus photographs; "
                    "the record's checkpoint/PreTraining/checkpoint-best.pth, best kept as "
                    "$RETBENCH_WEIGHTS/deretfound/checkpoint-best.pth (the name is generic)",
        filename="checkpoint-best.pth",
        url="https://zenodo.org/records/13340936",
        code="Jonlysun/DERETFound: models_vit.py, main_finetune.py, util/pos_embed.py, util/data_DRGrading.py",
        options={"arch": "vit_large_patch16", "checkpoint_key": "model", "feature": "gap_fresh_ln"},
    ),
}


@register_adapter
class DeretfoundAdapter(MaeVitAdapter):
    """RETFound-DE MAE ViT-L/16 image encoder (vision only)."""

    family = "deretfound"
    # fp16 autocast: Jonlysun/DERETFound engine_finetune.py evaluate() runs under torch.cuda.amp.autocast()
    autocast_dtype: ClassVar[torch.dtype | None] = torch.float16
    default_tag = "default"
    tags: ClassVar[dict[str, WeightsTag]] = TAGS
