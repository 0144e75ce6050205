"""RETFound-Green (family ``retfound_green``): a ViT-S/14 (4 registers) retinal encoder at 392 px.

Engelmann & Bernabeu, "Training a high-performance retinal foundation model with half-the-data and
400 times less compute", Nature Communications 16, 2025 (doi:10.1038/s41467-025-62123-z). Licence: Justin's Custom Non-Commercial
Research Licence (CNCRL; repository LICENSE): non-commercial research only, no industry-involved
projects without written permission.

What is reproduced, and where each convention comes from (all in github.com/justinengelmann/RETFound_Green):

- Architecture and loading (``README.md`` "Basic useage"): ``timm.create_model(
  'vit_small_patch14_reg4_dinov2', img_size=(392, 392), num_classes=0, checkpoint_path=...)``, then
  ``model.global_pool = 'avg'``. The checkpoint ``retfoundgreen_statedict.pth`` (GitHub release
  ``v0.1``) is a flat timm state dict, loaded strictly by timm's ``load_checkpoint``. Because the
  model is created with the default ``token`` pool, the final ``norm`` is kept and ``fc_norm`` is
  Identity; setting ``'avg'`` afterwards makes the output the mean of the 784 patch tokens after the
  final norm, the class token and 4 register tokens excluded (384-d).
- Preprocessing (``README.md``; ``Training_and_eval_code/data.py``: ``get_default_transforms``):
  ``read_image`` (uint8 RGB), ``Resize((392, 392), antialias=True)`` (squash, bilinear),
  ``ToDtype(float32, scale=True)``, ``Normalize(0.5, 0.5)``.
- Fundus crop: the *training* images were cropped offline by
  ``data_preprocessing_splits_and_subsamples/preprocess_imgs.py`` (``preprocess_img``: row/column
  means of the background-subtracted intensity, 2.5% margin, black padding to a square, LANCZOS to
  1024 px; ``preprocess_img_mp``: on failure a plain LANCZOS resize to 1024 px, then
  ``save(<source name>, quality=90, subsampling=0)``; ``data.py``'s training loader reads ``*.jpg``
  files only, so every training image went through a JPEG q90 4:4:4 encoding); ``data.py`` adds
  random black side padding in training "to be robust in case users forget to do this". The
  README's usage and the paper's evaluation notebooks (``Ours_IDRID_Inference.ipynb``: IDRiD
  "1. Original Images") feed uncropped images, so the default here is no crop; a task's
  ``fundus_crop: true`` (or ``mean_bbox``) runs all of the release's offline steps
  (:class:`GreenPreprocess`: retbench's ``mean_bbox`` crop, which gives the release's
  ``preprocess_img`` output pixel for pixel after the LANCZOS resize, then the JPEG q90 4:4:4
  round trip in memory) before the 392 px resize.
- Tag ``notebook``: the evaluation notebooks' feature ``model.forward_features(x).mean(1)``, the
  mean over all 789 tokens (class + 4 registers + 784 patches) after the final norm, which is what
  the paper's linear-probe numbers were computed from.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, fields, replace
from typing import Any, ClassVar

import torch
from PIL import Image

from retbench.adapters import Adapter, WeightsTag, register_adapter
from retbench.errors import RetbenchError
from retbench.preprocess import Preprocess, crop_fundus_mean_bbox
from retbench.weights import load_state_dict

ARCH = "vit_small_patch14_reg4_dinov2"
SIZE = 392
URL = "https://github.com/justinengelmann/RETFound_Green/releases/download/v0.1/retfoundgreen_statedict.pth"
PRE = Preprocess(size=SIZE, resize="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5),
                 fundus_crop="none")
COMMON: dict[str, Any] = {
    "licence": "Justin's Custom Non-Commercial Research Licence (CNCRL; non-commercial research only)",
    "paper": "Engelmann & Bernabeu, Nature Communications 16, 2025 (doi:10.1038/s41467-025-62123-z)",
    "filename": "retfoundgreen_statedict.pth",
    "url": URL,
    "code": "github.com/justinengelmann/RETFound_Green: README.md, Training_and_eval_code/data.py, "
            "Training_and_eval_code/data_preprocessing_splits_and_subsamples/{preprocess_imgs.py,Ours_IDRID_Inference.ipynb}",
}
OFFLINE_SIZE = 1024  # preprocess_imgs.py: res=1024, LANCZOS
OFFLINE_JPEG_QUALITY = 90  # preprocess_imgs.py: save(..., quality=90, subsampling=0)
DIFFERS = ("Images are resized with PIL bilinear (antialiased) on uint8; the release uses torchvision v2 Resize "
           "(antialias=True) on uint8 tensors: at most 1 grey level apart. The training-time offline preprocessing "
           "(crop, LANCZOS to 1024 px, JPEG q90) is applied only when a task asks for a fundus crop (the README and "
           "evaluation notebooks do not crop).")


def release_offline_preprocess(image: Image.Image) -> Image.Image:
    """RETFound-Green's offline preprocessing of a training image (``preprocess_imgs.py``), in memory.

    The ``mean_bbox`` crop (bounding box + 2.5% margin + centred black square padding; an image
    without foreground is left whole, as the release's fallback does), LANCZOS to 1024 x 1024, then
    a JPEG encoding at quality 90 without chroma subsampling, decoded again.
    """
    square = crop_fundus_mean_bbox(image.convert("RGB"))
    resized = square.resize((OFFLINE_SIZE, OFFLINE_SIZE), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    resized.save(buffer, format="JPEG", quality=OFFLINE_JPEG_QUALITY, subsampling=0)
    buffer.seek(0)
    with Image.open(buffer) as decoded:
        return decoded.convert("RGB")


@dataclass(frozen=True)
class GreenPreprocess(Preprocess):
    """:class:`Preprocess` whose ``mean_bbox`` crop runs all of RETFound-Green's offline steps.

    The two extra fields are recorded with every result (and key the feature cache).
    """

    offline_size: int = OFFLINE_SIZE
    offline_jpeg_quality: int = OFFLINE_JPEG_QUALITY

    @classmethod
    def of(cls, pre: Preprocess) -> GreenPreprocess:
        """``pre`` with the offline steps attached to its ``mean_bbox`` crop."""
        return cls(**{f.name: getattr(pre, f.name) for f in fields(Preprocess)})

    def load(self, image: Image.Image) -> torch.Tensor:
        """Offline steps (when cropping with ``mean_bbox``), then the usual resize to a ``uint8`` tensor."""
        if self.fundus_crop != "mean_bbox":
            return super().load(image)
        plain = Preprocess(**{f.name: getattr(self, f.name) for f in fields(Preprocess)})
        return replace(plain, fundus_crop="none").load(release_offline_preprocess(image))


@register_adapter
class RetfoundGreenAdapter(Adapter):
    """RETFound-Green: timm ViT-S/14-reg4 at 392 px; mean-pooled tokens after the final norm."""

    model: Any  # a timm ViT: typed Any, its attributes are the architecture's own (create_model returns nn.Module)
    family = "retfound_green"
    # fp32: the README's usage and the evaluation notebooks use no autocast
    autocast_dtype: ClassVar[torch.dtype | None] = None
    fundus_crop_method = "mean_bbox"
    tags: ClassVar[dict[str, WeightsTag]] = {
        "default": WeightsTag(
            "default", "GitHub release v0.1 (retfoundgreen_statedict.pth)", PRE,
            feature="mean of the 784 patch tokens after the final norm, prefix tokens excluded (384-d; README)",
            description="RETFound-Green as its README loads it (timm global_pool='avg')",
            differs=DIFFERS, options={"pool": "patch_mean"}, **COMMON,
        ),
        "notebook": WeightsTag(
            "notebook", "GitHub release v0.1 (retfoundgreen_statedict.pth)", PRE,
            feature="mean of all 789 tokens (class + 4 registers + patches) after the final norm (384-d; the "
                    "paper's evaluation notebooks)",
            description="RETFound-Green with the feature of its paper's evaluation notebooks "
                        "(forward_features(x).mean(1)); same weights as the default tag",
            differs=DIFFERS, options={"pool": "all_tokens_mean"}, **COMMON,
        ),
    }

    def task_preprocess(self, hints: dict[str, Any]) -> Preprocess:
        """The task's hints applied; a ``mean_bbox`` crop brings the release's LANCZOS-1024 and JPEG-q90 steps."""
        pre = super().task_preprocess(hints)
        return GreenPreprocess.of(pre) if pre.fundus_crop == "mean_bbox" else pre

    def build(self) -> None:
        """The timm model on ``self.device``: seeded random init, or the released flat state dict (strict)."""
        import timm

        path = None if self.random_init else self.weights_file()
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            self.model = timm.create_model(ARCH, pretrained=False, img_size=(SIZE, SIZE), num_classes=0)
        finally:
            torch.random.set_rng_state(state)
        if path is not None:
            checkpoint = load_state_dict(path)
            own = self.model.state_dict()
            missing = [k for k in own if k not in checkpoint]
            unexpected = [k for k in checkpoint if k not in own]
            if missing or unexpected:
                raise RetbenchError(f"{path}: not the RETFound-Green timm state dict ({len(missing)} missing, e.g. "
                                    f"{missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})")
            self.model.load_state_dict(checkpoint, strict=True)
        self.model.global_pool = "avg"  # as the README does after creation: norm kept, fc_norm Identity
        self.model.eval().to(self.device)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 384): patch-token mean (``default``) or all-token mean (``notebook``) after the final norm."""
        if self.tag.options["pool"] == "all_tokens_mean":
            return self.model.forward_features(pixels).mean(dim=1).float()
        return self.model(pixels).float()
