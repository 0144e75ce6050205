"""FLAIR: image-label-text alignment with expert-knowledge descriptions (Silva-Rodríguez et al., MedIA 2025).

Objective (the seed talk's equations 1 and 2; jusiro/FLAIR ``flair/modeling/model.py``): images
and texts are projected (bias-free linear heads, L2-normalised) into a joint space and compared
with a learnable temperature (initialised at 1/0.07, kept at most 100). The text of an image is
its class's name or one of the class's expert-knowledge descriptions (``PretrainItem.texts``),
drawn anew at every step with the torch RNG and put in the caption "A fundus photograph of {}".
Unlike CLIP, every image-text pair whose images carry the same *category* is a positive: the
target matrix is the label-equality matrix normalised per row, and the loss is the soft cross
entropy image→text plus text→image, averaged. Categories are class names, so "normal" images of two
tasks are positives of each other (FLAIR matches category names across its assembled datasets);
images with a text but no label (reports, captions) are their own category, keyed by the text.

Augmentations follow FLAIR's (``flair/pretraining/data/transforms.py``): horizontal flips, a mild
zoom (FLAIR: affine scale 0.9–1, ±5°; here a random crop of 81–100% of the area, no rotation)
and brightness/contrast jitter with probability 0.25.

Text tower (``settings.text_tower``, MiniLM by default) — partly frozen on the CPU preset: its
token embeddings and lower 4 of 6 layers stay fixed, the top 2 and the projections are trained.
The class-description corpus holds a few dozen distinct strings, and the trainer applies one
learning rate to every parameter (no smaller rate for pretrained text weights), so training the
whole tower there mostly erodes the general sentence space that zero-shot on unseen class names
relies on; the frozen lower layers also need no backward pass. The GPU preset fine-tunes the whole
tower at FLAIR's learning rate (1e-4), as FLAIR fine-tunes all of Bio_ClinicalBERT.

Departures from FLAIR: the text embedding is the tower's own (MiniLM: masked mean of the last layer,
normalised) rather than FLAIR's mean of hidden layers 1, 2 and 12 over all positions; random
vision initialisation (no ImageNet weights offline) unless ``--init local:DIR``. The projection's
L2-normalised input (FLAIR normalises before and after a bias-free linear map) is equivalent to
the local format's plain linear map followed by normalisation, so it is exported as such.

Export: the vision encoder, the text tower, both projections and the log-temperature, so the folder
gives zero-shot as ``local:DIR``.
"""

from __future__ import annotations

from typing import Any

import torch

from retbench.pretrain.recipe import Preset, Recipe, color_jitter, flip, random_resized_crop
from retbench.pretrain.recipes._text_common import (
    JointSpace,
    build_text_tower,
    build_vision,
    class_name,
    embed_texts,
    keyed_contrastive_loss,
    sample_texts,
)

CAPTION = "A fundus photograph of {}"
CNN_CPU = {"timm": "resnet18", "kwargs": {}}
CNN_GPU = {"timm": "resnet50", "kwargs": {}}


class Flair(Recipe):
    """FLAIR's label-aware image-text contrastive pretraining."""

    name = "flair"
    description = ("FLAIR (image-label-text alignment): images vs their class's expert-knowledge descriptions in "
                   "'A fundus photograph of {}'; same-category pairs are positives (row-normalised label-equality targets).")
    needs_text = True
    needs_labels = True
    presets = {
        "cpu": Preset(image_size=64, steps=300, batch_size=32, lr=5e-4, vision=CNN_CPU, weight_decay=1e-4,
                      extra={"embed_dim": 256, "text_trainable_layers": 2, "caption": CAPTION, "max_tokens": 48}),
        "gpu": Preset(image_size=224, steps=15000, batch_size=128, lr=1e-4, vision=CNN_GPU, weight_decay=1e-5, amp=True,
                      warmup_frac=0.05,
                      extra={"embed_dim": 512, "text_trainable_layers": None, "caption": CAPTION, "max_tokens": 77}),
    }

    def __init__(self, settings: Any, data: Any) -> None:
        super().__init__(settings, data)
        e = settings.extra
        self.vision, self.vision_cfg = build_vision(settings)
        self.text = build_text_tower(settings.text_tower, e.get("text_trainable_layers"))
        self.joint = JointSpace(self.vision.num_features, self.text.dim, e["embed_dim"])
        self.caption = e.get("caption", CAPTION)
        self.max_tokens = e.get("max_tokens")

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """FLAIR-like light augmentation of [0, 1] images, then ImageNet normalisation."""
        x = random_resized_crop(x, self.settings.image_size, scale=(0.81, 1.0), ratio=(0.9, 1.1))
        x = color_jitter(flip(x), strength=0.2, p=0.25, grey_p=0.0)
        return self.normalize(x)

    def category_keys(self, indices: torch.Tensor, texts: list[str]) -> list[str]:
        """Per image, what decides positives: its class name, or its own text when it has no label."""
        keys = []
        for i, t in zip(indices.tolist(), texts):
            label = self.data.items[i].label
            keys.append(f"class:{class_name(self.data.label_names[label])}" if label >= 0 else f"text:{t}")
        return keys

    def training_loss(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """Label-aware contrastive loss on one sampled description per image."""
        sampled = sample_texts(self.data.items, indices, self.data.label_names, self.caption, add_class_name=True)
        keep = [k for k, t in enumerate(sampled) if t is not None]
        if len(keep) < 2:  # nothing to contrast in this batch (e.g. only unlabelled folder images)
            return {"loss": self.joint.logit_scale * 0.0}
        indices = indices[keep]
        texts = [t for t in sampled if t is not None]
        feats = self.vision(self.augment(self.pixels(indices)))
        img = self.joint.image(feats)
        txt = self.joint.text(embed_texts(self.text, texts, self.max_tokens))
        loss = keyed_contrastive_loss(img, txt, self.joint.scale(), self.category_keys(indices, texts))
        return {"loss": loss}

    def after_step(self, step: int) -> None:
        """Clamp the log-temperature to [0, log 100], as FLAIR does before every step."""
        self.joint.clamp_()

    def export(self) -> dict[str, Any]:
        """Vision encoder, text tower, projections and temperature (zero-shot capable ``local:`` model)."""
        return {"vision": self.vision, "vision_cfg": self.vision_cfg, "text_tower": self.text, **self.joint.export()}


RECIPE = Flair
