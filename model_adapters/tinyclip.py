"""A tiny CLIP-like model with fixed random weights (family ``tinyclip``), for tests and demos.

Image tower: a 3-layer CNN with global pooling; text tower: hashed character trigrams
through an embedding bag; both projected to a 64-d joint space. Weights are drawn from a
fixed seed, so every build is identical. It has no knowledge: its zero-shot numbers are
chance-level by construction and exercise the text path of the pipeline only.
"""

from __future__ import annotations

import zlib
from typing import ClassVar

import torch
from torch import nn

from retbench.adapters import Adapter, WeightsTag, register_adapter
from retbench.preprocess import Preprocess
from retbench.weights import load_state_dict

N_BUCKETS = 4096


def trigram_ids(text: str) -> list[int]:
    """Stable hashed character trigrams of ``text`` (crc32, not Python's salted hash)."""
    padded = f"  {text.lower()}  "
    return [zlib.crc32(padded[i: i + 3].encode()) % N_BUCKETS for i in range(len(padded) - 2)]


class TinyClipNet(nn.Module):
    """The two towers and projections."""

    def __init__(self, width: int = 32, embed: int = 64) -> None:
        super().__init__()
        self.visual = nn.Sequential(
            nn.Conv2d(3, width, 5, stride=4, padding=2), nn.GELU(),
            nn.Conv2d(width, width * 2, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(width * 2, width * 4, 3, stride=2, padding=1), nn.GELU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.image_proj = nn.Linear(width * 4, embed, bias=False)
        self.text_embed = nn.EmbeddingBag(N_BUCKETS, embed * 2, mode="mean")
        self.text_proj = nn.Linear(embed * 2, embed, bias=False)


@register_adapter
class TinyClipAdapter(Adapter):
    """Deterministic tiny image-text model."""

    family = "tinyclip"
    # fp32: retbench's own test model
    autocast_dtype: ClassVar[torch.dtype | None] = None
    has_text = True
    default_tag = "test"
    default_random = True
    tags: ClassVar[dict[str, WeightsTag]] = {
        "test": WeightsTag("test", "random init (seed 0)", Preprocess(size=64, resize="pad_canvas", interpolation="bilinear"),
                           licence="Apache-2.0 (retbench)", feature="pooled CNN features (128-d); joint 64-d"),
    }

    def build(self) -> None:
        """Seeded random weights, or a local state dict."""
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(0)
        self.net = TinyClipNet()
        torch.random.set_rng_state(gen_state)
        if self.weights and not self.random_init:
            self.net.load_state_dict(load_state_dict(self.weights_file()))
        self.net.eval().to(self.device)

    def weights_identity(self) -> str:
        """sha256 of local weights, else the seed."""
        return super().weights_identity() if self.weights and not self.random_init else "random-init(seed=0)"

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """Un-projected pooled CNN features."""
        return self.net.visual(pixels)

    def encode_image_joint(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings."""
        return self.net.image_proj(self.net.visual(pixels))

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected text embeddings of hashed trigrams."""
        ids = [trigram_ids(t) for t in texts]
        flat = torch.tensor([i for seq in ids for i in seq], device=self.device)
        offsets = torch.tensor([0] + [len(s) for s in ids[:-1]], device=self.device).cumsum(0)
        return self.net.text_proj(self.net.text_embed(flat, offsets))
