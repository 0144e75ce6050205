"""RetFiner (family ``retfiner``): vision-language refined RETFound / UrFound / VisionFM OCT encoders.

Source: ronnief1/RetFiner (Fecso et al., MICCAI 2025). Weights: the GitHub release ``weights``
(README "Model weights"): ``RetFiner_RETFound.pth`` (tag ``r``), ``RetFiner_UrFound.pth`` (``u``),
``RetFiner_VisionFM.pth`` (``v``). Each is a FLAT state dict of the refined vision encoder (the export
script kept ``model.vision_encoder.*`` and stripped that prefix): R also holds ``head.*`` [2,1024] and
``proj.*`` [768,1024], U ``head.*``; V keys may carry ``backbone.``. The BERT text tower is released
separately and is not used.

Reproduced (linear-probing code, ``linear_probing/main/clf_tasks_main.py``, ``src/retfound/vit.py``,
``src/VisionFM_main/models/vision_transformer.py``, ``src/utils/dataset.py``, as summarised in the project's
adapter fact sheet; ``RetFiner/util_funcs.py:load_vision_backbone`` and ``RetFiner/visionfm_hf.py`` checked directly):

- ``r``: RETFound MAE ViT-L/16; ``u``: UrFound ViT-B/16 (both timm ViT, patch 16, LayerNorm eps 1e-6);
  ``v``: VisionFM ViT-B/16 (same parameter names as timm ``vit_base_patch16_224``, no LayerScale).
- Load: delete ``head.*`` and ``proj.*`` (R) / ``head.*`` (U); strip ``backbone.`` (V); ``strict=False``.
- Feature ``representation_method='concat'``: R/U = ``fc_norm(cat[mean(patch tokens), CLS])`` of the last
  block's output, the final ``norm`` deleted, ``fc_norm`` a fresh LayerNorm (2048-d / 1536-d) frozen at its
  initialisation; V = ``cat[CLS, mean(patch tokens)]`` after the final ``norm`` (VisionFM ``feat_concat``), 1536-d.
- Preprocessing (OCT B-scans): ``Resize((224, 224))`` squash bilinear, ``Grayscale`` replicated to 3
  channels, ``ToTensor``; ImageNet mean/std (R, U) or VisionFM's OCT statistics (V). retbench converts
  to grey before resizing (``Preprocess.load``), the release after: the same pixels for grey B-scans,
  at most one grey level apart for colour images.
- Precision: ``linear_probing/src/utils/train_eval.py`` ``evaluate`` runs the encoder under
  ``torch.cuda.amp.autocast()`` (fp16), retbench's default on CUDA for this family.

``tests/test_adapters_official_code.py`` loads random weights in each release layout with RetFiner's own
``vit.py`` / VisionFM ``vision_transformer.py`` and ``clf_tasks_main.py`` loading, and compares features
and preprocessing with retbench's on real images.

Licence: CC BY-NC 4.0 for the code and the three weight files (README licence table).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from retbench.model_adapters._mae_vit import MaeVitAdapter

from retbench.adapters import WeightsTag, register_adapter
from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

RELEASE = "https://github.com/ronnief1/RetFiner/releases/download/weights/"
CODE = ("ronnief1/RetFiner: linear_probing/main/clf_tasks_main.py, linear_probing/src/retfound/vit.py, "
        "linear_probing/src/VisionFM_main/models/vision_transformer.py, linear_probing/src/utils/dataset.py")
PAPER = "Fecso et al., RetFiner: A Vision-Language Refinement Scheme for Retinal Foundation Models, MICCAI 2025"
VISIONFM_OCT_MEAN = (0.21091926, 0.21091926, 0.21091919)
VISIONFM_OCT_STD = (0.17598894, 0.17598891, 0.17598893)
DIFFERS = ("the grey conversion runs before the 224 px resize (the release's transform resizes, then converts): "
           "identical on grey OCT B-scans, at most 1 grey level apart on colour images")


def _pre(mean: tuple[float, float, float], std: tuple[float, float, float]) -> Preprocess:
    return Preprocess(size=224, resize="squash", interpolation="bilinear", grayscale=True, mean=mean, std=std)


def _tag(name: str, filename: str, base: str, pre: Preprocess, feature: str, options: dict) -> WeightsTag:
    return WeightsTag(
        name, f"github-release:ronnief1/RetFiner/{filename}", pre, licence="CC BY-NC 4.0", paper=PAPER,
        feature=feature, description=f"RetFiner-{name.upper()}: {base} refined with OCT image-report pairs",
        filename=filename, url=RELEASE + filename, code=CODE, differs=DIFFERS, options=options,
    )


TAGS: dict[str, WeightsTag] = {
    "r": _tag("r", "RetFiner_RETFound.pth", "RETFound MAE ViT-L/16", _pre(IMAGENET_MEAN, IMAGENET_STD),
              "fresh LayerNorm(cat[mean patch tokens, CLS]) before the final norm (2048-d)",
              {"arch": "vit_large_patch16", "checkpoint_key": None, "feature": "concat_gap_cls_fresh_ln",
               "drop_prefixes": ("head.", "proj.")}),
    "u": _tag("u", "RetFiner_UrFound.pth", "UrFound ViT-B/16", _pre(IMAGENET_MEAN, IMAGENET_STD),
              "fresh LayerNorm(cat[mean patch tokens, CLS]) before the final norm (1536-d)",
              {"arch": "vit_base_patch16", "checkpoint_key": None, "feature": "concat_gap_cls_fresh_ln",
               "drop_prefixes": ("head.",)}),
    "v": _tag("v", "RetFiner_VisionFM.pth", "VisionFM OCT ViT-B/16", _pre(VISIONFM_OCT_MEAN, VISIONFM_OCT_STD),
              "cat[CLS, mean patch tokens] after the final norm (1536-d)",
              {"arch": "vit_base_patch16", "checkpoint_key": None, "feature": "concat_cls_gap_norm",
               "drop_prefixes": ("head.",)}),
}


@register_adapter
class RetfinerAdapter(MaeVitAdapter):
    """RetFiner-refined ViT image encoders (vision only; the text tower is not released with them)."""

    family = "retfiner"
    # fp16 autocast: ronnief1/RetFiner linear_probing/src/utils/train_eval.py evaluate() (also --get-embeddings)
    # runs under torch.cuda.amp.autocast(), for all three encoders
    autocast_dtype: ClassVar[torch.dtype | None] = torch.float16
    default_tag = "r"
    tags: ClassVar[dict[str, WeightsTag]] = TAGS
