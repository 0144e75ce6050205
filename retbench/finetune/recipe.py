"""The fine-tuning recipe: RETFound's ``main_finetune.py`` defaults, and the two presets.

Every default below follows RETFound's code at commit ``897d71c`` (github.com/rmaphoh/RETFound_MAE; file:line in
:data:`CITATIONS`). Where RETFound's code and its own documentation disagree, the choice is stated:

- ``--smoothing 0.1`` is parsed (``main_finetune.py:69``) but the criterion is a plain ``CrossEntropyLoss``
  (``main_finetune.py:401``): smoothing reaches the loss only through Mixup (``main_finetune.py:293-296``), which
  is off by default (``--mixup 0 --cutmix 0``, ``main_finetune.py:83,85``). The earlier release (commit
  ``f5ab012``, ``main_finetune.py:307-311``) applied ``LabelSmoothingCrossEntropy(0.1)`` without Mixup; retbench
  follows that documented intent (``label_smoothing=0.1``); set it to 0 for the current code's literal behaviour.
- epochs: 50 (``main_finetune.py:36``); the README's example command uses 100.
- input size: the adapter's (224 for RETFound); the parser's default is 256 (``main_finetune.py:43``) but the
  README's commands pass ``--input_size 224``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

RETFOUND_COMMIT = "897d71c"
"""The RETFound_MAE commit the citations refer to (main_finetune.py last changed in 91915d6)."""

CITATIONS: dict[str, str] = {
    "batch_size": "main_finetune.py:34 (128 per GPU); README.md:139 uses 16",
    "epochs": "main_finetune.py:36 (50)",
    "drop_path": "main_finetune.py:45 (0.2); stochastic depth linear over blocks as timm's ViT builds it",
    "clip_grad": "main_finetune.py:49 (None: no clipping)",
    "weight_decay": "main_finetune.py:51 (0.05); no decay for 1-d params and no_weight_decay() (util/lr_decay.py:30)",
    "blr": "main_finetune.py:55 (5e-3); lr = blr * batch / 256 (main_finetune.py:312)",
    "layer_decay": "main_finetune.py:57 (0.65); groups as util/lr_decay.py:17-23,62-74",
    "min_lr": "main_finetune.py:59 (1e-6)",
    "warmup_epochs": "main_finetune.py:61 (10); per-iteration schedule engine_finetune.py:44, util/lr_sched.py:10-19",
    "color_jitter": "main_finetune.py:65 (None)",
    "auto_augment": "main_finetune.py:67 ('rand-m9-mstd0.5-inc1'); train transform util/datasets.py:26-37",
    "label_smoothing": "main_finetune.py:69 (0.1); see the module docstring (applied as in f5ab012:309)",
    "reprob": "main_finetune.py:73 (0.25)",
    "remode": "main_finetune.py:75 ('pixel')",
    "recount": "main_finetune.py:77 (1)",
    "mixup": "main_finetune.py:83 (0: off)",
    "cutmix": "main_finetune.py:85 (0: off)",
    "mixup_prob": "main_finetune.py:89 (1.0)",
    "mixup_switch_prob": "main_finetune.py:91 (0.5)",
    "mixup_mode": "main_finetune.py:93 ('batch')",
    "optimizer": "main_finetune.py:329 (AdamW, torch defaults betas (0.9, 0.999))",
    "head_init_std": "main_finetune.py:218 (trunc_normal_(head.weight, std=2e-5))",
    "drop_last": "main_finetune.py:268 (train loader drop_last=True)",
    "selection": "main_finetune.py:359-363 (best epoch by validation score, strict >), engine_finetune.py:122 "
                 "(score = (F1 + ROC AUC + kappa) / 3: macro F1, macro OvR AUROC, unweighted kappa)",
    "precision": "engine_finetune.py:50 (fp16 autocast with a loss scaler, main_finetune.py:330)",
    "seed": "main_finetune.py:117 (0)",
}
"""Setting → the line of RETFound's code whose default it follows."""

MODES = ("full", "head", "lora")


@dataclass(frozen=True)
class FinetuneRecipe:
    """Every setting of one fine-tuning run (recorded in the result's ``protocol.settings``).

    ``mode``: ``full`` trains the whole image encoder (RETFound), ``head`` the last block, what follows it
    (final norms) and the head, ``lora`` LoRA adapters on the attention projections and the head.
    ``precision``: ``fp32``, ``bf16`` or ``fp16`` autocast (CUDA only; CPU runs fp32).
    """

    preset: str
    mode: str = "full"
    epochs: int = 50
    batch_size: int = 16
    blr: float = 5e-3
    layer_decay: float = 0.65
    weight_decay: float = 0.05
    drop_path: float = 0.2
    warmup_epochs: float = 10
    min_lr: float = 1e-6
    label_smoothing: float = 0.1
    mixup: float = 0.0
    cutmix: float = 0.0
    mixup_prob: float = 1.0
    mixup_switch_prob: float = 0.5
    mixup_mode: str = "batch"
    auto_augment: str | None = "rand-m9-mstd0.5-inc1"
    color_jitter: float | None = None
    reprob: float = 0.25
    remode: str = "pixel"
    recount: int = 1
    clip_grad: float | None = None
    head_init_std: float = 2e-5
    precision: str = "fp32"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.1
    lora_targets: tuple[str, ...] = ("qkv", "proj", "q_proj", "k_proj", "v_proj", "out_proj", "query", "key", "value")
    val_fraction: float = 0.2  # validation carved from train by patient (as linear_probe) where the task has none
    eval_batch_size: int = 64

    @property
    def lr(self) -> float:
        """The absolute peak learning rate: ``blr * batch_size / 256`` (main_finetune.py:312)."""
        return self.blr * self.batch_size / 256

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready, with the derived absolute lr."""
        d = dataclasses.asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        d["lr"] = self.lr
        if self.mode != "lora":
            for k in ("lora_rank", "lora_alpha", "lora_dropout", "lora_targets"):
                d.pop(k)
        return d


GPU = FinetuneRecipe(preset="gpu", batch_size=16, precision="bf16")
"""RETFound's settings (batch 16 as its README's command; bf16 autocast instead of fp16 + loss scaler: the same
mixed precision without overflow on H100-class GPUs; ``precision="fp16"`` is RETFound's exact choice)."""

CPU = FinetuneRecipe(preset="cpu", epochs=8, batch_size=16, warmup_epochs=1, eval_batch_size=32)
"""Minutes on the bundled tasks with tiny models: 8 epochs, 1 warm-up epoch, otherwise RETFound's settings."""

PRESETS: dict[str, FinetuneRecipe] = {"cpu": CPU, "gpu": GPU}


def preset_for(device_type: str) -> str:
    """``gpu`` on CUDA, else ``cpu``."""
    return "gpu" if device_type == "cuda" else "cpu"


def recipe_for(mode: str, preset: str, **overrides: Any) -> FinetuneRecipe:
    """The preset's recipe for ``mode`` (LoRA: no layer decay: every adapter matrix trains at the full lr)."""
    base = PRESETS[preset]
    mode_defaults: dict[str, Any] = {"lora": {"layer_decay": 1.0}}.get(mode, {})
    return dataclasses.replace(base, mode=mode, **{**mode_defaults, **overrides})
