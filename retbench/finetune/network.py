"""An adapter's image encoder as a trainable network: a private copy, a linear head, drop path, layer-wise lr decay,
LoRA, and which parameters train.

Works for every adapter whose network is a torch module held as an attribute (``self.model``, ``self.visual``,
``self.net``, …) and reached by its ``encode_image`` — timm, MAE/RETFound-style ViTs, local models and the image
side of CLIP-style models. The adapter is never modified: its modules are deep-copied per run, and the
``torch.inference_mode`` / ``no_grad`` decorators some adapters put on ``encode_image`` are unwrapped on the copy.
The parameters the encoder actually uses are found by one backward pass (a CLIP model's text tower gets no
gradient and stays frozen).
"""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from retbench.errors import NotApplicableError

if TYPE_CHECKING:
    from retbench.adapters import Adapter
    from retbench.finetune.recipe import FinetuneRecipe

BLOCK = re.compile(r"(?:^|\.)(?:blocks|resblocks|layers)\.(\d+)\.")
"""A parameter inside transformer block N (timm/MAE ``blocks``, open_clip ``resblocks``, Hugging Face ``layers``)."""

NO_WEIGHT_DECAY = {"pos_embed", "cls_token", "dist_token", "reg_token", "class_embedding", "positional_embedding"}
"""Names timm's ``no_weight_decay()`` returns (main_finetune.py:323), and their open_clip spellings."""


class FinetuneNet(nn.Module):
    """``head(encode_image(x))`` over a private copy of the adapter's modules (registered under ``encoder``)."""

    def __init__(self, adapter: Adapter, modules: dict[str, nn.Module], n_classes: int, feature_dim: int) -> None:
        super().__init__()
        self.encoder = nn.ModuleDict(modules)
        self.head = nn.Linear(feature_dim, n_classes)
        self._adapter = adapter
        self._encode = inspect.unwrap(type(adapter).encode_image)  # without inference_mode / no_grad

    def features(self, pixels: torch.Tensor) -> torch.Tensor:
        """The adapter's probe feature of ``pixels``, with gradients."""
        return self._encode(self._adapter, pixels)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """Class logits."""
        return self.head(self.features(pixels).float())


@dataclass
class Built:
    """A network ready to train and what was done to it (recorded in the result)."""

    net: FinetuneNet
    trainable: list[str]
    report: dict[str, Any]


def torch_modules(adapter: Adapter) -> dict[str, nn.Module]:
    """The adapter's torch modules (its attributes that are ``nn.Module``), by attribute name."""
    return {k: v for k, v in vars(adapter).items() if isinstance(v, nn.Module) and not k.startswith("__")}


def build(adapter: Adapter, n_classes: int, image_size: int, recipe: FinetuneRecipe, seed: int) -> Built:
    """A fresh trainable copy of ``adapter``'s image encoder with a head for ``n_classes`` (head seeded by ``seed``)."""
    modules = torch_modules(adapter)
    if not modules:
        raise NotApplicableError(f"finetune: model '{adapter.name}' has no torch network to fine-tune")
    twin = copy.copy(adapter)  # shares nothing trainable with the adapter: its modules are replaced by deep copies
    copies = {k: copy.deepcopy(m).float() for k, m in modules.items()}
    for k, m in copies.items():
        setattr(twin, k, m)
        m.requires_grad_(True)
    device = adapter.device
    reached, dim = _reached(twin, copies, image_size, device)
    report: dict[str, Any] = {"modules": sorted(copies), "feature_dim": dim}
    report["drop_path"] = set_drop_path(copies, recipe.drop_path)
    torch.manual_seed(seed)
    net = FinetuneNet(twin, copies, n_classes, dim).to(device)
    nn.init.trunc_normal_(net.head.weight, std=recipe.head_init_std)
    nn.init.zeros_(net.head.bias)
    names = ["encoder." + n for n in reached]
    if recipe.mode == "lora":
        report["lora"] = add_lora(net, recipe, set(reached))
        trainable = [n for n, _ in net.named_parameters() if "lora_" in n]
    elif recipe.mode == "head":
        trainable = last_block_and_after(names)
    else:
        trainable = names
    trainable = trainable + ["head.weight", "head.bias"]
    keep = set(trainable)
    for n, p in net.named_parameters():
        p.requires_grad_(n in keep)
    report.update(count_parameters(net))
    return Built(net, trainable, report)


def _reached(twin: Adapter, modules: dict[str, nn.Module], size: int, device: torch.device) -> tuple[list[str], int]:
    """Names (within ``modules``) of the parameters ``encode_image`` uses, and its feature width (one backward pass)."""
    holder = nn.ModuleDict(modules)
    holder.train(False)
    encode = inspect.unwrap(type(twin).encode_image)
    x = torch.zeros(2, 3, size, size, device=device)
    with torch.enable_grad():
        out = encode(twin, x)
        if not isinstance(out, torch.Tensor) or out.ndim != 2 or not out.requires_grad:
            raise NotApplicableError(f"finetune: model '{twin.name}' gives no differentiable (batch, dim) features")
        out.float().sum().backward()
    names = [n for n, p in holder.named_parameters() if p.grad is not None]
    for p in holder.parameters():
        p.grad = None
    if not names:
        raise NotApplicableError(f"finetune: no parameter of model '{twin.name}' gets a gradient from its features")
    return names, int(out.shape[1])


def set_drop_path(modules: dict[str, nn.Module], rate: float) -> dict[str, Any]:
    """Stochastic depth in the blocks' ``drop_path*`` slots, rising linearly over depth to ``rate`` (timm's rule).

    Adapters build their networks without it (inference); timm/MAE ViTs keep ``drop_path1/2`` slots as
    ``Identity``. Architectures without such slots train without drop path (reported, not hidden).
    """
    from timm.layers import DropPath

    slots: list[tuple[nn.Module, str, int]] = []
    for prefix, module in modules.items():
        for name, sub in module.named_modules():
            for attr, child in list(sub.named_children()):
                if attr.startswith("drop_path") and isinstance(child, (nn.Identity, DropPath)):
                    m = BLOCK.search(f"{prefix}.{name}.{attr}.")
                    slots.append((sub, attr, int(m.group(1)) if m else 0))
    if not slots:
        return {"rate": 0.0, "slots": 0, "note": "the architecture has no stochastic-depth slots: no drop path"}
    depth = max(b for *_, b in slots) + 1
    rates = torch.linspace(0, rate, depth).tolist() if depth > 1 else [rate]
    for sub, attr, b in slots:
        setattr(sub, attr, DropPath(rates[b]) if rates[b] > 0 else nn.Identity())
    return {"rate": rate, "slots": len(slots), "blocks": depth}


def layer_ids(names: list[str]) -> tuple[dict[str, int], int]:
    """Layer of each parameter for layer-wise lr decay, as RETFound's ``get_layer_id_for_vit`` (util/lr_decay.py:62-74):
    parameters before the first block (embeddings, tokens) → 0, block N → N + 1, the rest (final norms, head) →
    ``num_layers`` = blocks + 1. Without blocks every parameter is in the top layer (RETFound's ResNet case)."""
    blocks = {n: int(m.group(1)) for n in names if (m := BLOCK.search(n))}
    num_layers = (max(blocks.values()) + 1 if blocks else 0) + 1
    seen_block = False
    ids: dict[str, int] = {}
    for n in names:
        if n in blocks:
            seen_block = True
            ids[n] = blocks[n] + 1
        else:
            ids[n] = num_layers if (seen_block or not blocks or n.startswith("head.")) else 0
    return ids, num_layers


def param_groups(net: nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups with ``lr_scale = layer_decay ** (num_layers - layer)`` and no decay on 1-d parameters and
    position/class tokens (util/lr_decay.py:9-59)."""
    params = [(n, p) for n, p in net.named_parameters() if p.requires_grad]
    ids, num_layers = layer_ids([n.removeprefix("encoder.") if n.startswith("encoder.") else n for n, _ in params])
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for (n, p), layer in zip(params, ids.values()):
        no_decay = p.ndim <= 1 or n.split(".")[-1] in NO_WEIGHT_DECAY
        g = groups.setdefault((layer, no_decay), {"params": [], "lr_scale": layer_decay ** (num_layers - layer),
                                                  "weight_decay": 0.0 if no_decay else weight_decay})
        g["params"].append(p)
    return [groups[k] for k in sorted(groups)]


def last_block_and_after(names: list[str]) -> list[str]:
    """The parameters of the last block and of everything after it (final norms): ``finetune.head``'s encoder part."""
    ids, num_layers = layer_ids(names)
    top = num_layers - 1
    return [n for n, layer in ids.items() if layer >= top]


def attention_projections(encoder: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Names (within ``encoder``) of the ``nn.Linear`` attention projections LoRA wraps: modules under an
    ``attn``/``attention`` module whose own name is one of ``targets``."""
    out = []
    for name, module in encoder.named_modules():
        parts = name.split(".")
        if isinstance(module, nn.Linear) and parts[-1] in targets and any("attn" in p or "attention" in p for p in parts[:-1]):
            out.append(name)
    return out


def add_lora(net: FinetuneNet, recipe: FinetuneRecipe, reached: set[str]) -> dict[str, Any]:
    """LoRA (peft) on the attention projections of the image path (``reached``: the parameter names the features
    use, so a CLIP model's text tower gets none); returns what was wrapped. open_clip's fused
    ``nn.MultiheadAttention`` exposes only ``out_proj`` as a Linear: its packed q/k/v projection is not wrapped."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:  # pragma: no cover - peft is in the finetune extra
        raise NotApplicableError("finetune.lora needs peft: pip install 'retbench[finetune]'") from None
    targets = [t for t in attention_projections(net.encoder, recipe.lora_targets) if f"{t}.weight" in reached]
    if not targets:
        raise NotApplicableError("finetune.lora: the image encoder has no nn.Linear attention projections "
                                 f"named {', '.join(recipe.lora_targets)}")
    config = LoraConfig(r=recipe.lora_rank, lora_alpha=recipe.lora_alpha, lora_dropout=recipe.lora_dropout,
                        target_modules=targets, bias="none")
    inject_adapter_in_model(config, net.encoder)
    import peft

    return {"targets": len(targets), "example": targets[0], "peft": peft.__version__}


def count_parameters(net: nn.Module) -> dict[str, int]:
    """Total, trainable, head and LoRA parameter counts."""
    total = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    lora = sum(p.numel() for n, p in net.named_parameters() if "lora_" in n)
    head = sum(p.numel() for n, p in net.named_parameters() if n.startswith("head."))
    return {"parameters": total, "trainable_parameters": trainable, "head_parameters": head, "lora_parameters": lora}


def trainable_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable tensors (what the kept checkpoint holds), detached, contiguous, on the CPU."""
    return {n: p.detach().cpu().contiguous().clone() for n, p in net.named_parameters() if p.requires_grad}


def load_trainable(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy ``state`` (from :func:`trainable_state`) into the network's trainable parameters."""
    params = dict(net.named_parameters())
    with torch.no_grad():
        for n, t in state.items():
            params[n].copy_(t.to(params[n].device))


def autocast_for(device: torch.device, precision: str) -> Callable[[], Any]:
    """A context factory: autocast in ``precision`` on CUDA, nothing elsewhere."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    enabled = device.type == "cuda" and dtype is not None
    return lambda: torch.autocast("cuda", dtype=dtype or torch.float32, enabled=enabled)
