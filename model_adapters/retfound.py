"""RETFound (family ``retfound``): MAE ViT-L/16 and DINOv2 ViT-L/14 retinal foundation models.

Tags and weights (Hugging Face, gated: request access on each page; file ``<repo>.pth``,
fetched by ``hf_hub_download(repo_id=f"YukunZhou/{name}", filename=f"{name}.pth")`` in
rmaphoh/RETFound ``main_finetune.py``):

- ``cfp`` (default), ``oct``: the Nature 2023 models, MAE ViT-L/16 pretrained on 904,170 colour
  fundus photographs / 736,442 OCT B-scans (``YukunZhou/RETFound_mae_natureCFP`` / ``_natureOCT``).
- ``meh``, ``shanghai``: MAE ViT-L/16 checkpoints added in 2025 (``YukunZhou/RETFound_mae_meh`` /
  ``_shanghai``), pretrained on the MEH and Shanghai collections of colour fundus photographs.
- ``dinov2-meh``, ``dinov2-shanghai``: DINOv2 ViT-L/14 (``YukunZhou/RETFound_dinov2_meh`` / ``_shanghai``).
- ``<tag>-latent``: the same weights under the convention of RETFound's feature-export notebook.

Checkpoint layouts: MAE = ``{"model": MAE pretraining state dict}`` (encoder plus ``decoder_*``,
``mask_token``, ``norm.*``); DINOv2 = ``{"teacher": {"backbone.*", "dino_head.*", "ibot_head.*"}}``
(rmaphoh/RETFound issue #46). Loading follows ``main_finetune.py`` (see ``_mae_vit``): ``backbone.``
stripped, ``mlp.w12/w3`` renamed, ``pos_embed`` interpolated (``util/pos_embed.py``), other keys ignored.

Default convention (``cfp`` ... ``dinov2-shanghai``) = the official fine-tuning/linear-probe code
(``main_finetune.py --adaptation lp``, eval transform ``util/datasets.py:build_transform``):
Resize(256) bicubic + CenterCrop(224) (``crop_pct = 224/256`` for ``input_size <= 224``), ImageNet
mean/std. Probe feature: MAE ``models_vit.py`` with ``global_pool=True`` = ``fc_norm(mean of the 196 patch
tokens of the last block)`` with ``fc_norm`` a fresh LayerNorm (weight 1, bias 0; absent from the
checkpoint, whose ``norm.*`` is ignored), 1024-d; DINOv2 = timm ``token`` pool, the CLS token after ``norm``, 1024-d.
It is the default because it is the pipeline the paper's and the README's results come from.

``-latent`` tags follow ``latent_feature.ipynb``: PIL ``resize((224, 224))`` (squash, Pillow's default
bicubic), /255, each image standardised by its own per-channel mean and population std (numpy's
``.std()``), the model run in fp32 (no autocast); features: MAE as above,
DINOv2 = a fresh ``LayerNorm(1024, eps=1e-6)`` of the mean of the post-``norm`` patch tokens. The notebook
loads the DINOv2 ``teacher`` dict without stripping ``backbone.`` and so silently keeps timm's ImageNet
weights (issue #46); retbench loads the retinal weights instead.

Licence: CC BY-NC 4.0 (code and weights; repository LICENSE since Aug 2023).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from retbench.model_adapters._mae_vit import MaeVitAdapter

from retbench.adapters import WeightsTag, register_adapter
from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

CODE = "rmaphoh/RETFound: models_vit.py, main_finetune.py, util/pos_embed.py, util/datasets.py"
NOTEBOOK = "rmaphoh/RETFound: latent_feature.ipynb (models_vit.py, util/pos_embed.py)"
PAPER_MAE = "Zhou et al., A foundation model for generalizable disease detection from retinal images, Nature 2023"
PAPER_DINO = "Zhou et al., Revealing the Impact of Pre-training Data on Medical Foundation Models (2025)"
LICENCE = "CC BY-NC 4.0"

FINETUNE = Preprocess(size=224, resize="resize_crop", interpolation="bicubic", crop_pct=224 / 256,
                      mean=IMAGENET_MEAN, std=IMAGENET_STD)
LATENT = Preprocess(size=224, resize="squash", interpolation="bicubic", normalization="per_image")

MAE_FEATURE = "fc_norm(mean of patch tokens), fresh LayerNorm, final norm dropped (1024-d)"
DINO_FEATURE = "CLS token after the final norm (1024-d)"
DINO_LATENT_FEATURE = "fresh LayerNorm(mean of post-norm patch tokens) (1024-d)"

# tag -> (hub repo, architecture kind, description)
CHECKPOINTS = {
    "cfp": ("RETFound_mae_natureCFP", "mae", "MAE ViT-L/16, 904,170 colour fundus photographs (Nature 2023)"),
    "oct": ("RETFound_mae_natureOCT", "mae", "MAE ViT-L/16, 736,442 OCT B-scans (Nature 2023)"),
    "meh": ("RETFound_mae_meh", "mae", "MAE ViT-L/16, MEH colour fundus collection (2025 checkpoint)"),
    "shanghai": ("RETFound_mae_shanghai", "mae", "MAE ViT-L/16, Shanghai colour fundus collection (2025 checkpoint)"),
    "dinov2-meh": ("RETFound_dinov2_meh", "dinov2", "DINOv2 ViT-L/14, MEH colour fundus collection"),
    "dinov2-shanghai": ("RETFound_dinov2_shanghai", "dinov2", "DINOv2 ViT-L/14, Shanghai colour fundus collection"),
}


def _tag(name: str, repo: str, kind: str, description: str, latent: bool) -> WeightsTag:
    mae = kind == "mae"
    if latent:
        feature = MAE_FEATURE if mae else DINO_LATENT_FEATURE
        differs = ("feature-export notebook convention (squash, per-image z-score) instead of the fine-tuning pipeline; "
                   "the per-image std is the population one as in the notebook (numpy .std()), computed in float32 "
                   "(the notebook: float64) and floored at 1e-6 (a constant channel gives NaN there): rounding-level "
                   "differences; fp32 on CUDA as the notebook (no autocast)")
        if not mae:
            differs += "; loads the retinal weights (the notebook's missing 'backbone.' strip kept timm's ImageNet ones)"
    else:
        feature = MAE_FEATURE if mae else DINO_FEATURE
        differs = ""
    options = {
        "arch": "vit_large_patch16" if mae else "vit_large_patch14_dinov2",
        "checkpoint_key": "model" if mae else "teacher",
        "feature": ("gap_fresh_ln" if mae else ("gap_norm_fresh_ln" if latent else "cls_norm")),
        "convention": "latent_feature.ipynb" if latent else "main_finetune.py",
    }
    if latent:
        options["precision"] = "fp32"  # latent_feature.ipynb runs the model without autocast
    return WeightsTag(
        name, f"huggingface:YukunZhou/{repo}", LATENT if latent else FINETUNE, licence=LICENCE,
        paper=PAPER_MAE if mae else PAPER_DINO, feature=feature,
        description=description + (" - latent_feature.ipynb convention" if latent else ""),
        filename=f"{repo}.pth", hub_id=f"YukunZhou/{repo}", url=f"https://huggingface.co/YukunZhou/{repo}",
        gated=True, code=NOTEBOOK if latent else CODE, differs=differs, options=options,
    )


TAGS: dict[str, WeightsTag] = {}
for _name, (_repo, _kind, _desc) in CHECKPOINTS.items():
    TAGS[_name] = _tag(_name, _repo, _kind, _desc, latent=False)
    TAGS[f"{_name}-latent"] = _tag(f"{_name}-latent", _repo, _kind, _desc, latent=True)


@register_adapter
class RetfoundAdapter(MaeVitAdapter):
    """RETFound MAE / DINOv2 ViT-L image encoders (vision only)."""

    family = "retfound"
    # fp16 autocast: engine_finetune.py evaluate() runs the model under torch.cuda.amp.autocast(); the '-latent'
    # tags run fp32 as latent_feature.ipynb does (their options['precision'])
    autocast_dtype: ClassVar[torch.dtype | None] = torch.float16
    default_tag = "cfp"
    tags: ClassVar[dict[str, WeightsTag]] = TAGS
