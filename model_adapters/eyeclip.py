"""EyeCLIP (family ``eyeclip``): OpenAI CLIP ViT-B/32 further trained on 11 ophthalmic modalities.

Release: Michi-3000/EyeCLIP. ``eyeclip/model.py`` is OpenAI's CLIP (QuickGELU, fp16 weights
via ``convert_weights``) whose ``VisionTransformer`` also owns an MAE decoder
(``visual.decoder.{decoder_embed, mask_token, decoder_pos_embed, decoder_blocks.0-7,
decoder_norm, decoder_pred}``) used only by the masked-reconstruction pretraining loss
(``CLIP_ft_all_1enc_all.py``); inference (``encode_image``) never runs it, so retbench drops
those keys. Every other key has OpenAI's names, which are open_clip's names for
``ViT-B-32`` with QuickGELU, so the model is open_clip's ``ViT-B-32`` (``force_quick_gelu``).

Checkpoint ``eyeclip_visual.pt`` (Google Drive id 1u_pUJYPppbprVQQ5jaULEKKp-eJqaVw6, linked as
``eyeclip_visual`` from one version of the README; third-party loaders download a 2.14 GB
``eyeclip_visual.pt`` from Drive id 1kWpbDqFCFt4j8RkYqacV4nl-aCKZfqZr, a later link or a copy:
unverified). Pretraining saves
``{'epoch', 'model_state_dict', 'optimizer_state_dict', 'loss'}`` (``CLIP_ft_all_1enc_all.py``)
and the official loaders read ``checkpoint['model_state_dict']`` (``zero_shot.py``); a plain
state dict is accepted too. Tensors may be fp16 (mixed-precision training converts linear,
convolution, attention and projection weights); they are cast to the fp32 model. The file is
read with ``torch.load(weights_only=True)`` (tensors, dicts, numbers and strings only). The
official code loads with ``strict=False`` on top of OpenAI's ViT-B/32 weights; retbench has
no OpenAI weights underneath and therefore requires every CLIP key to be in the file.

Known issue (Michi-3000/EyeCLIP issue #10, closed): users report that the released file's
text tower embeds every text identically (cosine 1 between any texts), i.e. the text weights
in the release may be degenerate; zero-shot numbers from this file can then be chance-level.
Image features (linear probe) are not affected by that report.

Preprocessing, tag ``default``: the zero-shot/pretraining transform, CLIP's ``_transform(224)``
(``eyeclip/clip.py``: shorter side to 224 bicubic, centre crop 224, CLIP mean/std). Tag
``ft-transform``: the fine-tuning evaluation transform of ``main_finetune_opthal.py`` /
``util/datasets.py`` (RETFound's ``build_transform``: shorter side to 256 bicubic, centre
crop 224, ImageNet mean/std).

Features: ``model.visual(x)`` = ``ln_post(CLS) @ proj``, 512-d (the fine-tuning head sits on
it), for probes and zero-shot. Zero-shot (``zero_shot.py``): the bare class names, no template,
one prompt per class, L2-normalised image and text embeddings, logits ``100 · img · txtᵀ``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

import torch
from retbench.model_adapters.clip import CLIP_PREPROCESS, OpenClipModelAdapter

from retbench.adapters import WeightsTag, ZeroShotSetup, register_adapter
from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD, Preprocess

if TYPE_CHECKING:
    from retbench.spec import TaskSpec

EYECLIP_FILE = "eyeclip_visual.pt"
EYECLIP_URL = "https://drive.google.com/file/d/1u_pUJYPppbprVQQ5jaULEKKp-eJqaVw6/view"
EYECLIP_CODE = "Michi-3000/EyeCLIP eyeclip/{model.py,clip.py}, zero_shot.py, CLIP_ft_all_1enc_all.py, util/datasets.py"
EYECLIP_PAPER = ("Shi et al., A multimodal visual-language foundation model for computational ophthalmology, "
                 "npj Digital Medicine 8:381 (2025)")
FT_PREPROCESS = Preprocess(size=224, resize="resize_crop", interpolation="bicubic", crop_pct=224 / 256,
                           mean=IMAGENET_MEAN, std=IMAGENET_STD)
_FEATURE = "model.visual(x): ln_post(CLS) @ proj, 512-d unnormalised (MAE decoder dropped)"
_COMMON: dict[str, Any] = dict(
    licence="unspecified (no LICENSE file in Michi-3000/EyeCLIP; research use assumed)", paper=EYECLIP_PAPER,
    feature=_FEATURE, filename=EYECLIP_FILE, url=EYECLIP_URL, code=EYECLIP_CODE,
    options={"arch": "ViT-B-32", "quick_gelu": True},
)


@register_adapter
class EyeClipAdapter(OpenClipModelAdapter):
    """EyeCLIP's CLIP ViT-B/32 towers (the MAE decoder of its checkpoint is dropped)."""

    family = "eyeclip"
    # fp16 autocast: EyeCLIP's eyeclip.load() (OpenAI's loader) keeps fp16 weights on CUDA (zero_shot.py); its
    # fine-tuning evaluation (engine_finetune_multi.py) runs under torch.cuda.amp.autocast()
    autocast_dtype: ClassVar[torch.dtype | None] = torch.float16
    default_tag = "default"
    tags: ClassVar[dict[str, WeightsTag]] = {
        "default": WeightsTag(
            "default", "EyeCLIP (Michi-3000/EyeCLIP release, eyeclip_visual.pt)", CLIP_PREPROCESS,
            description="EyeCLIP ViT-B/32 with its zero-shot/pretraining transform (CLIP _transform(224)); "
                        "issue #10: the released text tower may embed all texts identically",
            **_COMMON,
        ),
        "ft-transform": WeightsTag(
            "ft-transform", "EyeCLIP (Michi-3000/EyeCLIP release, eyeclip_visual.pt)", FT_PREPROCESS,
            description="EyeCLIP ViT-B/32 with the fine-tuning evaluation transform (Resize256 + CenterCrop224 "
                        "bicubic, ImageNet mean/std, as main_finetune_opthal.py)",
            differs="pretraining and zero-shot used CLIP mean/std with Resize224 + CenterCrop224 (tag 'default'); "
                    "this tag follows the fine-tuning evaluation transform instead",
            **_COMMON,
        ),
    }

    def ignore_prefixes(self) -> tuple[str, ...]:
        """The MAE decoder is a pretraining-only head."""
        return ("visual.decoder.",)

    def zero_shot_setup(self, spec: TaskSpec) -> ZeroShotSetup:
        """EyeCLIP's ``zero_shot.py``: the class names themselves, one prompt each, scale 100."""
        return ZeroShotSetup([[c.name] for c in spec.classes], renormalize=True, logit_scale=100.0)
