"""Pieces shared by the image-text recipes (``flair``, ``retfiner``, ``eyeclip``).

- the vision encoder: the preset's timm model, or the image encoder of a ``local:DIR`` model
  (``settings.init``), whose architecture then comes from ``DIR/retbench_model.json``;
- the text tower (:func:`retbench.text_towers.load_text_tower`), optionally with its embeddings and
  lower layers frozen, and text embedding of a batch that encodes each distinct string once;
- the joint space: bias-free projections and a learnable log-temperature (CLIP convention:
  initialised at ``log(1/0.07)``, kept within ``[0, log 100]``), exported in the ``local`` format;
- contrastive losses whose target matrix is built from keys (equal keys = positive pairs), which
  covers CLIP (distinct keys), FLAIR (class names) and texts shared by several images.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from retbench.errors import RetbenchError

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

LOGIT_SCALE_INIT = math.log(1 / 0.07)
LOGIT_SCALE_MAX = math.log(100.0)


# ---- vision ------------------------------------------------------------------------------------
def is_vit(module: nn.Module) -> bool:
    """A timm vision transformer (patch embedding + absolute position embedding)."""
    return hasattr(module, "patch_embed") and hasattr(module, "pos_embed")


def build_vision(settings: Any) -> tuple[Any, dict[str, Any]]:
    """The vision encoder and the config that rebuilds it: ``settings.init`` (``local:DIR``) or the preset's.

    The encoder is a timm model, typed ``Any``: its attributes (``num_features``, ``patch_embed``…) depend on
    the architecture (``timm.create_model`` is typed as returning a plain ``nn.Module``).

    ``settings.init`` ``None``/``""``/``"none"`` builds ``settings.vision`` with random weights. With
    ``local:DIR`` the timm name and arguments come from the folder (the preset's architecture is
    ignored) and the weights from its ``model.safetensors`` (``visual.*``); a ViT trained at another
    image size is rebuilt at ``settings.image_size`` with its position embedding resampled.
    """
    import timm

    init = (settings.init or "").strip()
    if init.lower() in ("", "none"):
        v = settings.vision
        return timm.create_model(v["timm"], num_classes=0, **v.get("kwargs", {})), {"timm": v["timm"],
                                                                                      "kwargs": dict(v.get("kwargs", {}))}
    if not init.startswith("local:"):
        raise RetbenchError(f"--init {init!r}: expected local:DIR (a model written by retbench pretrain) or none")
    return load_local_vision(init.removeprefix("local:"), settings.image_size)


def load_local_vision(folder: str, image_size: int) -> tuple[Any, dict[str, Any]]:
    """The image encoder of a ``local:`` model folder, at ``image_size`` for ViTs."""
    import timm

    from retbench.local_model_format import read_local_config
    from retbench.weights import load_checkpoint

    cfg = read_local_config(folder)
    kwargs = dict(cfg.timm_kwargs)
    state = {k.removeprefix("visual."): v for k, v in load_checkpoint(cfg.weights_path).items() if k.startswith("visual.")}
    if not state:
        raise RetbenchError(f"{cfg.weights_path}: no visual.* tensors to initialise the vision encoder from")
    probe: Any = timm.create_model(cfg.timm_name, num_classes=0, **kwargs)  # a timm model (see build_vision)
    if is_vit(probe) and tuple(probe.patch_embed.img_size) != (image_size, image_size):
        kwargs["img_size"] = image_size
        model = timm.create_model(cfg.timm_name, num_classes=0, **kwargs)
        state["pos_embed"] = _resample_pos_embed(state["pos_embed"], model)
    else:
        model = probe
    model.load_state_dict(state)
    return model, {"timm": cfg.timm_name, "kwargs": kwargs}


def _resample_pos_embed(pos: torch.Tensor, model: Any) -> torch.Tensor:
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else model.num_prefix_tokens
    return resample_abs_pos_embed(pos, new_size=list(model.patch_embed.grid_size), num_prefix_tokens=prefix)


def vision_tokens_and_pooled(vision: Any, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One pass of a timm model: its token sequence (B, N, D) (CNN maps flattened) and its pooled feature (B, D)."""
    feats = vision.forward_features(x)
    pooled = vision.forward_head(feats, pre_logits=True)
    tokens = feats.flatten(2).transpose(1, 2) if feats.ndim == 4 else feats
    return tokens, pooled


# ---- text --------------------------------------------------------------------------------------
def build_text_tower(spec: str, trainable_layers: int | None = None) -> Any:
    """The pretrained text tower ``spec``; with ``trainable_layers`` = k only its top k layers are trained.

    k = ``None`` (or ≥ the depth) trains everything; k < depth freezes the token/position
    embeddings and the lower layers (their activations then need no gradient at all).
    """
    from retbench.text_towers import load_text_tower

    tower = load_text_tower(spec)
    tower.train()
    layers = text_layers(tower)
    if trainable_layers is not None and trainable_layers < len(layers):
        for p in tower.encoder.parameters():
            p.requires_grad_(False)
        for layer in list(layers)[len(layers) - max(0, trainable_layers):]:
            for p in layer.parameters():
                p.requires_grad_(True)
    return tower


def text_layers(tower: Any) -> nn.ModuleList:
    """The transformer blocks of a BERT-like tower (``encoder.encoder.layer``)."""
    try:
        return tower.encoder.encoder.layer
    except AttributeError:
        raise RetbenchError(f"text tower {tower.spec!r} is not a BERT-style encoder (no encoder.layer)") from None


class LayerInputs:
    """Context manager recording the input hidden states of one transformer block at each forward call."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.seen: list[torch.Tensor] = []
        self.handle: RemovableHandle | None = None

    def __enter__(self) -> LayerInputs:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.seen.append(args[0] if args else kwargs["hidden_states"])

        self.handle = self.layer.register_forward_pre_hook(hook, with_kwargs=True)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            self.handle.remove()


def self_attention_mask(key_mask: torch.Tensor, causal: bool, implementation: str | None) -> torch.Tensor:
    """A (B, 1, L, L) mask for a BERT block called directly: padding keys hidden, future keys too when ``causal``.

    Boolean (True = attend) for the ``sdpa`` implementation, additive float otherwise (``eager``).
    """
    b, length = key_mask.shape
    keep = key_mask.bool()[:, None, None, :].expand(b, 1, length, length)
    if causal:
        keep = keep & torch.ones(length, length, dtype=torch.bool, device=key_mask.device).tril()
    if implementation == "sdpa":
        return keep
    return torch.zeros(keep.shape, device=key_mask.device).masked_fill(~keep, torch.finfo(torch.float32).min)


def unique_texts(texts: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    """The distinct strings (first-seen order) and, per input, the index of its string."""
    order: dict[str, int] = {}
    index = [order.setdefault(t, len(order)) for t in texts]
    return list(order), torch.tensor(index, dtype=torch.long)


def embed_texts(tower: Any, texts: Sequence[str], max_tokens: int | None = None) -> torch.Tensor:
    """(N, dim) differentiable tower embeddings; each distinct string is encoded once."""
    distinct, index = unique_texts(texts)
    batch = tokenize(tower, distinct, max_tokens)
    return tower.embed(batch)[index.to(tower.device)]


def tokenize(tower: Any, texts: Sequence[str], max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """Token ids and masks on the tower's device, truncated to ``max_tokens`` (the tower's limit if None)."""
    limit = min(max_tokens or tower.max_length, tower.max_length)
    batch = tower.tokenizer([str(t).strip() for t in texts], padding=True, truncation=True, max_length=limit,
                            return_tensors="pt")
    return {k: v.to(tower.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def sample_texts(items: Sequence[Any], indices: torch.Tensor, label_names: Sequence[str] = (),
                 template: str = "{}", add_class_name: bool = False) -> list[str | None]:
    """One text per image, drawn uniformly (torch RNG) from its texts; ``None`` for an image without any.

    ``add_class_name`` adds the class's own name (``task:class`` → ``class``) to the candidates
    when the descriptions do not contain it (FLAIR samples the name or one of its descriptions).
    """
    out: list[str | None] = []
    for i in indices.tolist():
        it = items[i]
        options = list(it.texts)
        if add_class_name and it.label >= 0 and label_names:
            name = class_name(label_names[it.label])
            if name not in options:
                options.append(name)
        if not options:
            out.append(None)
            continue
        pick = int(torch.randint(len(options), (1,)).item())
        out.append(template.format(options[pick]))
    return out


def class_name(label: str) -> str:
    """``task:class`` → ``class`` (the class's name, shared across tasks)."""
    return label.split(":", 1)[1] if ":" in label else label


# ---- joint space -------------------------------------------------------------------------------
class JointSpace(nn.Module):
    """Bias-free projections of image features and text embeddings, and the log-temperature."""

    def __init__(self, vision_dim: int, text_dim: int, embed_dim: int) -> None:
        super().__init__()
        self.visual_proj = nn.Linear(vision_dim, embed_dim, bias=False)
        self.text_proj = nn.Linear(text_dim, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(LOGIT_SCALE_INIT))

    def image(self, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised image embeddings."""
        return F.normalize(self.visual_proj(features), dim=-1)

    def text(self, embeddings: torch.Tensor) -> torch.Tensor:
        """L2-normalised text embeddings."""
        return F.normalize(self.text_proj(embeddings), dim=-1)

    def scale(self) -> torch.Tensor:
        """The temperature ``exp(logit_scale)``, at most 100."""
        return self.logit_scale.clamp(0.0, LOGIT_SCALE_MAX).exp()

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the stored log-temperature within [0, log 100] (FLAIR and CLIP clamp it every step)."""
        self.logit_scale.clamp_(0.0, LOGIT_SCALE_MAX)

    def export(self) -> dict[str, Any]:
        """The ``save_local_model`` arguments of the joint space."""
        return {"visual_proj": self.visual_proj, "text_proj": self.text_proj,
                "logit_scale": self.logit_scale.detach().clamp(0.0, LOGIT_SCALE_MAX)}


# ---- contrastive losses ------------------------------------------------------------------------
def equality(row_keys: Sequence[Hashable], col_keys: Sequence[Hashable] | None = None) -> torch.Tensor:
    """(R, C) float matrix: 1 where the row key equals the column key."""
    cols = row_keys if col_keys is None else col_keys
    return torch.tensor([[a == b for b in cols] for a in row_keys], dtype=torch.float32)


def key_targets(row_keys: Sequence[Hashable], col_keys: Sequence[Hashable] | None = None) -> torch.Tensor:
    """Target matrix (R, C): 1 where the keys are equal, each row normalised to sum to 1.

    With distinct keys it is the identity (CLIP); with class names as keys, every pair sharing
    a label is a positive and each row spreads its mass evenly over them (FLAIR). Rows without
    any equal key are all zero (such rows must be excluded by the caller).
    """
    return _row_normalise(equality(row_keys, col_keys))


def _row_normalise(eq: torch.Tensor) -> torch.Tensor:
    return eq / eq.sum(dim=1, keepdim=True).clamp_min(1.0)


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over rows of ``-Σ_j targets_ij log softmax(logits_i)_j``."""
    return -(targets * F.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


def keyed_contrastive_loss(a: torch.Tensor, b: torch.Tensor, scale: torch.Tensor, keys: Sequence[Hashable]) -> torch.Tensor:
    """Symmetric contrastive loss between normalised embeddings ``a`` (e.g. images) and ``b`` (texts), row i of each
    carrying ``keys[i]``.

    a→b: for each ``a_i``, the mean over its positives ``b_j`` (equal keys) of ``-log softmax_j(scale a_i·b_j)``;
    b→a likewise with the softmax over the ``a``s (the seed's equations 1 and 2 for FLAIR; CLIP when the
    keys are distinct). Returns the average of the two directions.
    """
    logits = scale * a @ b.t()
    eq = equality(keys).to(logits.device)
    return 0.5 * (soft_cross_entropy(logits, _row_normalise(eq)) + soft_cross_entropy(logits.t(), _row_normalise(eq.t())))
