"""Masked autoencoding (RETFound's recipe; He et al. 2022, "Masked Autoencoders Are Scalable Vision Learners").

A ViT encoder sees a random 25% of the patches (75% masked per image, by argsort of uniform
noise); a lighter decoder (narrower, fewer blocks, fixed 2-D sin-cos positions) receives the
encoded visible tokens plus a shared learned mask token at every masked position and predicts
the pixels of each patch; the loss is the mean squared error on masked patches only, against
per-patch normalised pixels (``norm_pix_loss``, as RETFound trained). The exported model is the
encoder; its probe feature is the mean of the final-normed patch tokens (timm ``global_pool='avg'``
with ``fc_norm=False``).
"""

from __future__ import annotations

from typing import Any

import torch
from timm.models.vision_transformer import Block
from torch import nn

from retbench.pretrain.recipe import Preset, Recipe, flip, random_resized_crop

VIT_CPU = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 64, "patch_size": 8, "depth": 6,
                                                      "global_pool": "avg", "fc_norm": False}}
# MAE's CPU encoder: ViT-Ti/16 (6 blocks) at 128 px = 64 patches, as many as ViT-Ti/8 at 64 px. With 8-px patches
# the patch embedding maps 192 pixel values to 192 dims, so even a random one keeps every pixel (invertible) and a
# random ViT is a strong probe baseline; with 16-px patches (768 values -> 192) what the embedding keeps is learnt.
VIT_CPU_MAE = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 128, "patch_size": 16, "depth": 6,
                                                          "global_pool": "avg", "fc_norm": False}}
VIT_GPU = {"timm": "vit_base_patch16_224", "kwargs": {"img_size": 224, "global_pool": "avg", "fc_norm": False}}


def sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embeddings, (grid², dim): half the channels per axis."""
    if dim % 4:
        raise ValueError(f"sin-cos embedding needs a width divisible by 4, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))
    ys, xs = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64), indexing="ij")

    def axis(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega[None]
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([axis(ys), axis(xs)], dim=1).float()


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) → (B, L, p·p·3) patches in row-major order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


class MAE(Recipe):
    """Masked autoencoder pretraining of a timm ViT."""

    name = "mae"
    description = ("Masked autoencoder (RETFound's recipe): ViT encoder on 25% of the patches, light decoder, "
                   "MSE on per-patch-normalised pixels of the masked 75%.")
    presets = {
        "cpu": Preset(image_size=128, steps=1500, batch_size=64, lr=1.5e-3, vision=VIT_CPU_MAE,
                      extra={"mask_ratio": 0.75, "decoder_dim": 128, "decoder_depth": 4, "decoder_heads": 4,
                             "norm_pix_loss": True}),
        "gpu": Preset(image_size=224, steps=20000, batch_size=256, lr=1.5e-4 * 256 / 256 * 4, vision=VIT_GPU, amp=True,
                      warmup_frac=0.05,
                      extra={"mask_ratio": 0.75, "decoder_dim": 512, "decoder_depth": 8, "decoder_heads": 16,
                             "norm_pix_loss": True}),
    }

    encoder: Any  # a timm ViT: typed Any, as timm.create_model returns a plain nn.Module
    decoder_pos: torch.Tensor  # a buffer registered in __init__

    def __init__(self, settings: Any, data: Any) -> None:
        super().__init__(settings, data)
        import timm

        v = settings.vision
        self.encoder = timm.create_model(v["timm"], num_classes=0, **v.get("kwargs", {}))
        e = settings.extra
        self.patch = self.encoder.patch_embed.patch_size[0]
        grid = settings.image_size // self.patch
        width, dec = self.encoder.embed_dim, e["decoder_dim"]
        self.mask_ratio = e["mask_ratio"]
        self.decoder_embed = nn.Linear(width, dec)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dec))
        self.register_buffer("decoder_pos", torch.cat([torch.zeros(1, dec), sincos_2d(dec, grid)])[None], persistent=False)
        self.decoder_blocks = nn.ModuleList(Block(dec, e["decoder_heads"], 4.0, qkv_bias=True) for _ in range(e["decoder_depth"]))
        self.decoder_norm = nn.LayerNorm(dec)
        self.decoder_pred = nn.Linear(dec, self.patch * self.patch * 3)
        nn.init.normal_(self.mask_token, std=0.02)

    def encode_visible(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encode a random (1 - mask_ratio) subset of patches; returns tokens, mask (1 = masked), restore order."""
        enc = self.encoder
        tokens = enc.patch_embed(x) + enc.pos_embed[:, enc.num_prefix_tokens:]
        b, n, d = tokens.shape
        keep = max(1, int(n * (1 - self.mask_ratio)))
        noise = torch.rand(b, n, device=x.device)
        shuffle = noise.argsort(dim=1)
        restore = shuffle.argsort(dim=1)
        visible = torch.gather(tokens, 1, shuffle[:, :keep, None].expand(-1, -1, d))
        cls = (enc.cls_token + enc.pos_embed[:, :1]).expand(b, -1, -1)
        h = torch.cat([cls, visible], dim=1)
        for blk in enc.blocks:
            h = blk(h)
        h = enc.norm(h)
        mask = torch.ones(b, n, device=x.device)
        mask[:, :keep] = 0
        return h, torch.gather(mask, 1, restore), restore

    def decode(self, h: torch.Tensor, restore: torch.Tensor) -> torch.Tensor:
        """Predicted pixels of every patch, (B, L, p·p·3)."""
        h = self.decoder_embed(h)
        b, n = restore.shape
        masked = self.mask_token.expand(b, n + 1 - h.shape[1], -1)
        seq = torch.cat([h[:, 1:], masked], dim=1)
        seq = torch.gather(seq, 1, restore[:, :, None].expand(-1, -1, h.shape[2]))
        seq = torch.cat([h[:, :1], seq], dim=1) + self.decoder_pos
        for blk in self.decoder_blocks:
            seq = blk(seq)
        return self.decoder_pred(self.decoder_norm(seq))[:, 1:]

    def training_loss(self, indices: torch.Tensor) -> dict[str, torch.Tensor]:
        """MSE on masked patches of normalised pixels, for RandomResizedCrop(0.2–1) + flip views."""
        x = flip(random_resized_crop(self.pixels(indices), self.settings.image_size, scale=(0.2, 1.0)))
        x = self.normalize(x)
        h, mask, restore = self.encode_visible(x)
        pred = self.decode(h, restore)
        target = patchify(x, self.patch)
        if self.settings.extra.get("norm_pix_loss", True):
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            target = (target - mean) / (var + 1e-6).sqrt()
        per_patch = ((pred - target) ** 2).mean(-1)
        loss = (per_patch * mask).sum() / mask.sum()
        return {"loss": loss}

    def export(self) -> dict[str, Any]:
        """The encoder, as the timm model the config rebuilds."""
        return {"vision": self.encoder, "vision_cfg": self.settings.vision}


RECIPE = MAE
