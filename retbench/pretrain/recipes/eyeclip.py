"""EyeCLIP: image-text contrast, cross-modal image-image contrast and masked reconstruction (Shi et al., 2024).

The seed (EyeCLIP summary, "Method Summary") combines three objectives on one shared ViT image
encoder and a text encoder: "image-text contrastive loss (0.75), image-image contrastive loss
(0.75), and reconstruction loss (1.0)". Here the total is therefore
``0.75·ITC + 0.75·IIC + 1.0·MAE`` (``extra["weights"]``). (The public training script
Michi-3000/EyeCLIP ``CLIP_ft_all_1enc_all.py`` sums the three with unit weights; the seed's
weights are followed.)

- **ITC**: the image's pooled feature and the text tower's embedding of one of its class's
  descriptions (``PretrainItem.texts``, drawn per step with the torch RNG, used as they are — the
  ``local`` adapter's zero-shot uses the task prompts bare too), projected and L2-normalised, CLIP
  loss with a learnable temperature (1/0.07 initially, at most 100). Identical texts (two images of
  one class drawing the same description) are positives of each other rather than contradictory
  negatives.
- **IIC**: images of the *same eye* in *different modalities* (``PretrainItem.eye``; e.g. the CFP and
  the OCT B-scan of one patient's eye in ``mx_dme_cfp_dr`` + ``mx_dme_oct_dme``) are positive pairs, the
  other eyes' images negatives; CLIP loss in the same joint space and temperature. As EyeCLIP draws
  its image pairs from a separate stream of multi-modal examinations, each step draws up to
  ``pair_batch`` distinct eyes among those with at least two modalities, two of their modalities,
  and one image of each. Eyes are keyed by dataset folder and patient/eye, so patient numbers of
  unrelated datasets never pair. Data without such eyes leaves IIC at 0.
- **MAE**: the step's images, 75% of the patches masked, a light decoder (fixed 2-D sin-cos positions,
  shared mask token) predicting per-patch-normalised pixels of the masked patches (as the ``mae``
  recipe; EyeCLIP's ViT owns such a decoder only for this loss).

Text tower (MiniLM by default) partly frozen on the CPU preset (token embeddings and lower 4 of 6
layers fixed) for the reasons given in the ``flair`` recipe; the GPU preset fine-tunes it whole, as
EyeCLIP fine-tunes CLIP's text encoder. ``settings.init = local:DIR`` starts the ViT from a ``local``
model (e.g. one written by ``mae``). Export: the ViT, text tower, projections and temperature.
"""

from __future__ import annotations

from functools import cache
from pathlib import PurePosixPath
from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from retbench.errors import RetbenchError
from retbench.pretrain.recipe import Preset, Recipe, flip, random_resized_crop
from retbench.pretrain.recipes._text_common import (
    JointSpace,
    build_text_tower,
    build_vision,
    embed_texts,
    is_vit,
    keyed_contrastive_loss,
    sample_texts,
)
from retbench.pretrain.recipes.mae import VIT_CPU, VIT_GPU, patchify, sincos_2d

WEIGHTS = {"itc": 0.75, "iic": 0.75, "mae": 1.0}


class MaskedReconstruction(nn.Module):
    """MAE decoder for a timm ViT: encode a random 25% of the patches, predict the pixels of the others.

    ``encoder`` is that ViT, typed ``Any``: its attributes (``patch_embed``, ``blocks``…) are the architecture's own.
    """

    pos: torch.Tensor  # a buffer registered in __init__

    def __init__(self, encoder: Any, image_size: int, dim: int, depth: int, heads: int, mask_ratio: float) -> None:
        super().__init__()
        if not is_vit(encoder):
            raise RetbenchError("eyeclip's masked reconstruction needs a ViT image encoder (patch_embed + pos_embed)")
        self.patch = encoder.patch_embed.patch_size[0]
        self.mask_ratio = mask_ratio
        grid = image_size // self.patch
        self.embed = nn.Linear(encoder.embed_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos", torch.cat([torch.zeros(1, dim), sincos_2d(dim, grid)])[None], persistent=False)
        self.blocks = nn.ModuleList(Block(dim, heads, 4.0, qkv_bias=True) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.pred = nn.Linear(dim, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode_visible(self, encoder: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The encoder on the kept patches (+ class token); the mask (1 = hidden) and the order restoring shuffle."""
        tokens = encoder.patch_embed(x) + encoder.pos_embed[:, encoder.num_prefix_tokens:]
        b, n, d = tokens.shape
        keep = max(1, int(n * (1 - self.mask_ratio)))
        shuffle = torch.rand(b, n, device=x.device).argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        prefix = (encoder.cls_token + encoder.pos_embed[:, :1]).expand(b, -1, -1)
        h = torch.cat([prefix, visible], dim=1)
        for blk in encoder.blocks:
            h = blk(h)
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return encoder.norm(h), torch.gather(mask, 1, restore), restore

    def loss(self, encoder: Any, x: torch.Tensor) -> torch.Tensor:
        """Mean squared error on the masked patches of per-patch-normalised (ImageNet-standardised) pixels."""
        h, mask, restore = self.encode_visible(encoder, x)
        h = self.embed(h)
        b, n = restore.shape
        seq = torch.cat([h[:, 1:], self.mask_token.expand(b, n + 1 - h.shape[1], -1)], dim=1)
        seq = torch.gather(seq, 1, restore[:, :, None].expand(-1, -1, h.shape[2]))
        seq = torch.cat([h[:, :1], seq], dim=1) + self.pos
        for blk in self.blocks:
            seq = blk(seq)
        pred = self.pred(self.norm(seq))[:, 1:]
        target = patchify(x, self.patch)
        target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6).sqrt()
        return (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()


@cache
def dataset_of(source: str) -> str:
    """The data folder behind a pretraining source (a task's source path's first part), else the source's name."""
    try:
        from retbench.tasks import get_task

        return PurePosixPath(str(get_task(source).source.path)).parts[0]
    except Exception:  # noqa: BLE001 - not a task (folder, captions, csdi-reports): the name namespaces it
        return source


def multimodal_eyes(items: list[Any]) -> list[dict[str, list[int]]]:
    """Per eye seen in at least two modalities (sorted by key): modality → indices of its images."""
    eyes: dict[str, dict[str, list[int]]] = {}
    for i, it in enumerate(items):
        if it.eye:
            eyes.setdefault(f"{dataset_of(it.item.source)}|{it.eye}", {}).setdefault(it.modality, []).append(i)
    return [{m: eyes[k][m] for m in sorted(eyes[k])} for k in sorted(eyes) if len(eyes[k]) >= 2]


def sample_pairs(eyes: list[dict[str, list[int]]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``n`` distinct eyes; for each, two different modalities and one image of each (torch RNG)."""
    a, b = [], []
    for e in torch.randperm(len(eyes))[:n].tolist():
        modalities = list(eyes[e].values())
        first, second = torch.randperm(len(modalities))[:2].tolist()
        a.append(modalities[first][int(torch.randint(len(modalities[first]), (1,)))])
        b.append(modalities[second][int(torch.randint(len(modalities[second]), (1,)))])
    return torch.tensor(a, dtype=torch.long), torch.tensor(b, dtype=torch.long)


class EyeCLIP(Recipe):
    """Image-text + cross-modal image-image contrastive learning with masked reconstruction on one ViT."""

    name = "eyeclip"
    description = ("EyeCLIP: 0.75 image-text contrastive (class descriptions) + 0.75 image-image contrastive "
                   "(same eye across modalities) + 1.0 masked reconstruction, one shared ViT.")
    needs_text = True
    presets = {
        "cpu": Preset(image_size=64, steps=200, batch_size=24, lr=5e-4, vision=VIT_CPU,
                      extra={"embed_dim": 256, "pair_batch": 12, "mask_ratio": 0.75, "decoder_dim": 128,
                             "decoder_depth": 2, "decoder_heads": 4, "weights": WEIGHTS, "text_trainable_layers": 2,
                             "max_tokens": 48}),
        "gpu": Preset(image_size=224, steps=20000, batch_size=128, lr=1.5e-4, vision=VIT_GPU, amp=True, warmup_frac=0.05,
                      extra={"embed_dim": 512, "pair_batch": 64, "mask_ratio": 0.75, "decoder_dim": 512,
                             "decoder_depth": 8, "decoder_heads": 16, "weights": WEIGHTS, "text_trainable_layers": None,
                             "max_tokens": 77}),
    }

    def __init__(self, settings: Any, data: Any) -> None:
        super().__init__(settings, data)
        e = settings.extra
        self.vision, self.vision_cfg = build_vision(settings)
        self.text = build_text_tower(settings.text_tower, e.get("text_trainable_layers"))
        self.joint = JointSpace(self.vision.num_features, self.text.dim, e["embed_dim"])
        self.reconstruction = MaskedReconstruction(self.vision, settings.image_size, e["decoder_dim"], e["decoder_depth"],
                                                   e["decoder_heads"], e["mask_ratio"])
        self.weights = {**WEIGHTS, **e.get("weights", {})}
        self.pair_batch, self.max_tokens = int(e["pair_batch"]), e.get("max_tokens")
        self.eyes = multimodal_eyes(data.items)

    def view(self, indices: torch.Tensor) -> torch.Tensor:
        """A contrastive view: random crop of 60–100% of the area and a flip, ImageNet-normalised."""
        x = random_resized_crop(self.pixels(indices), self.settings.image_size, scale=(0.6, 1.0))
        return self.normalize(flip(x))

    def embed_images(self, indices: torch.Tensor) -> torch.Tensor:
        """Normalised joint-space embeddings of one view of each image."""
        return self.joint.image(self.vision(self.view(indices)))

    def training_loss(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """0.75 · image-text + 0.75 · image-image (cross-modal, same eye) + 1.0 · masked reconstruction."""
        x = flip(random_resized_crop(self.pixels(indices), self.settings.image_size, scale=(0.2, 1.0)))
        parts = {"mae": self.reconstruction.loss(self.vision, self.normalize(x))}
        scale = self.joint.scale()
        sampled = sample_texts(self.data.items, indices)
        keep = [k for k, t in enumerate(sampled) if t is not None]
        if keep:
            texts = [t for t in sampled if t is not None]
            img = self.embed_images(indices[keep])
            txt = self.joint.text(embed_texts(self.text, texts, self.max_tokens))
            parts["itc"] = keyed_contrastive_loss(img, txt, scale, texts)
        else:
            parts["itc"] = scale * 0.0
        a, b = sample_pairs(self.eyes, self.pair_batch)
        if len(a) >= 2:
            both = self.embed_images(torch.cat([a, b]))
            parts["iic"] = keyed_contrastive_loss(both[: len(a)], both[len(a):], scale, list(range(len(a))))
        else:
            parts["iic"] = scale * 0.0
        loss = sum(self.weights[k] * parts[k] for k in ("itc", "iic", "mae"))
        return {"loss": loss, **{k: parts[k].detach() for k in ("itc", "iic", "mae")}}

    def after_step(self, step: int) -> None:
        """Keep the log-temperature within [0, log 100]."""
        self.joint.clamp_()

    def export(self) -> dict[str, Any]:
        """The ViT with the text tower, projections and temperature (zero-shot capable ``local:`` model)."""
        return {"vision": self.vision, "vision_cfg": self.vision_cfg, "text_tower": self.text, **self.joint.export()}


RECIPE = EyeCLIP
