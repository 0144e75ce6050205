"""The fine-tuning loop of one seed: seeded, checkpointed every epoch, resumable, best epoch chosen on validation.

Folder of one seed (beside the result, ``<results>/<task>/<protocol>/<model>/seed<N>/``)::

    last.pt             resume point, written atomically after every epoch (trainable weights, optimizer, history)
    best.safetensors    the trainable weights (head, LoRA or whole encoder) of the selected epoch: the kept checkpoint

Determinism: an epoch's order is a permutation seeded by (seed, epoch), each augmented image is drawn from
generators seeded by (seed, epoch, image), and each step seeds torch and NumPy (drop path, LoRA dropout, Mixup)
by (seed, step). A run killed after any epoch's checkpoint and resumed therefore computes the uninterrupted run's
losses bit for bit on the same device and thread count. A checkpoint written for other settings, weights, task or
split (its fingerprint differs) is not resumed: training starts over.
"""

from __future__ import annotations

import io
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from retbench.atomic_files import atomic_write_bytes
from retbench.errors import RetbenchError
from retbench.finetune.data import eval_batches, seeded, train_batches
from retbench.finetune.network import Built, autocast_for, load_trainable, param_groups, trainable_state
from retbench.finetune.recipe import FinetuneRecipe
from retbench.metrics import METRICS
from retbench.preprocess import Preprocess
from retbench.progress import progress_bar

LAST = "last.pt"
BEST = "best.safetensors"
SELECTION_METRICS = ("f1_macro", "auroc", "kappa_unweighted")
"""RETFound's validation score is their mean (engine_finetune.py:122)."""

CHECKPOINT_HOOKS: list[Callable[[Path, int], None]] = []
"""Called with (seed folder, epochs done) right after each epoch's checkpoint is written (tests kill the process here)."""


@dataclass
class SplitPixels:
    """Decoded images and labels of one seed's train, validation and test rows."""

    train: torch.Tensor
    train_y: np.ndarray
    val: torch.Tensor
    val_y: np.ndarray
    test: torch.Tensor


@dataclass
class SeedResult:
    """One trained seed: its selected epoch, curve and test probabilities."""

    seed: int
    selected_epoch: int
    epochs: int
    curve: list[dict[str, Any]]
    test_proba: np.ndarray
    val_score: float
    resumed_from: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def learning_rate(recipe: FinetuneRecipe, t: float) -> float:
    """Linear warm-up from 0, then a half cosine to ``min_lr``, at fractional epoch ``t`` (util/lr_sched.py:10-14)."""
    if t < recipe.warmup_epochs:
        return recipe.lr * t / recipe.warmup_epochs
    span = max(recipe.epochs - recipe.warmup_epochs, 1e-12)
    return recipe.min_lr + (recipe.lr - recipe.min_lr) * 0.5 * (1.0 + math.cos(math.pi * (t - recipe.warmup_epochs) / span))


def selection_score(y: np.ndarray, proba: np.ndarray) -> tuple[float, dict[str, float]]:
    """RETFound's validation score, (macro F1 + macro OvR AUROC + unweighted kappa) / 3, and its parts
    (a part that is undefined on this validation set, e.g. AUROC without one class, is left out of the mean)."""
    parts = {n: float(cast(float, METRICS.get(n)(y, proba))) for n in SELECTION_METRICS}  # scalar metrics
    finite = [v for v in parts.values() if math.isfinite(v)]
    return (float(np.mean(finite)) if finite else float("nan")), parts


def predict(net: nn.Module, pixels: torch.Tensor, preprocess: Preprocess, recipe: FinetuneRecipe,
            device: torch.device) -> np.ndarray:
    """Softmax probabilities (float64) of unaugmented ``pixels``."""
    net.eval()
    autocast = autocast_for(device, recipe.precision)
    out = []
    with torch.no_grad():
        for x in eval_batches(pixels, preprocess, recipe.eval_batch_size, device):
            with autocast():
                logits = net(x)
            out.append(torch.softmax(logits.float(), dim=-1).double().cpu())
    return torch.cat(out).numpy() if out else np.zeros((0, 0))


def train_seed(built: Built, data: SplitPixels, recipe: FinetuneRecipe, preprocess: Preprocess, seed: int, folder: Path,
               fingerprint: str, device: torch.device, workers: int, n_classes: int) -> SeedResult:
    """Train (or resume) one seed in ``folder`` and return the test probabilities of its selected epoch."""
    from retbench.finetune.data import train_transform

    net = built.net
    optimizer = torch.optim.AdamW(param_groups(net, recipe.weight_decay, recipe.layer_decay), lr=recipe.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and recipe.precision == "fp16")
    state: dict[str, Any] = {"epoch": 0, "history": [], "best_epoch": 0, "best_score": -math.inf, "seconds": 0.0}
    resumed = _resume(folder / LAST, fingerprint, net, optimizer, scaler, state)
    transform = train_transform(recipe, preprocess)
    criterion, mixup = _criterion(recipe, n_classes)
    autocast = autocast_for(device, recipe.precision)
    trainable = [p for p in net.parameters() if p.requires_grad]
    with progress_bar(f"finetune seed {seed}", recipe.epochs - state["epoch"]) as advance:
        for epoch in range(state["epoch"], recipe.epochs):
            t0 = time.perf_counter()
            net.train()
            batches, steps = train_batches(data.train, data.train_y, transform, preprocess, recipe, seed, epoch, workers)
            losses, lr = [], 0.0
            for it, (x, y) in enumerate(batches):
                lr = learning_rate(recipe, epoch + it / steps)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group["lr_scale"]
                x, y = x.to(device), y.to(device)
                with seeded(seed * 7_919 + epoch * steps + it + 1):
                    if mixup is not None and len(x) % 2 == 0:
                        x, target = mixup(x, y)
                    else:
                        target = y if mixup is None else _smoothed(y, n_classes, recipe.label_smoothing)
                    with autocast():
                        loss = criterion(net(x).float(), target)
                    optimizer.zero_grad(set_to_none=True)
                    scaler.scale(loss).backward()
                if recipe.clip_grad:
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(trainable, recipe.clip_grad)
                scaler.step(optimizer)
                scaler.update()
                losses.append(float(loss.detach()))
                if not math.isfinite(losses[-1]):
                    raise RetbenchError(f"fine-tuning diverged at epoch {epoch + 1} (loss {losses[-1]}); lower the lr")
            state["history"].append(_validate(net, data, preprocess, recipe, device, epoch, losses, lr, t0))
            score = state["history"][-1]["val_score"]
            if state["epoch"] == 0 or (math.isfinite(score) and score > state["best_score"]):  # strict >: first best kept
                state["best_epoch"], state["best_score"] = epoch + 1, score if math.isfinite(score) else -math.inf
                _save_best(folder / BEST, net, seed, epoch + 1, fingerprint)
            state["epoch"] = epoch + 1
            state["seconds"] += time.perf_counter() - t0
            _save_last(folder / LAST, net, optimizer, scaler, state, fingerprint)
            for hook in CHECKPOINT_HOOKS:
                hook(folder, state["epoch"])
            advance(1, status=f"loss {np.mean(losses):.4f} val {score:.4f}")
    load_trainable(net, _load_best(folder / BEST))
    proba = predict(net, data.test, preprocess, recipe, device)
    return SeedResult(seed, state["best_epoch"], state["epoch"], state["history"], proba,
                      float(state["best_score"]), resumed, float(state["seconds"]))


def _validate(net: nn.Module, data: SplitPixels, preprocess: Preprocess, recipe: FinetuneRecipe, device: torch.device,
              epoch: int, losses: list[float], lr: float, t0: float) -> dict[str, Any]:
    """One row of the training curve: train loss (per step and mean), lr, validation loss and score."""
    proba = predict(net, data.val, preprocess, recipe, device)
    y = data.val_y
    val_loss = float(-np.mean(np.log(np.clip(proba[np.arange(len(y)), y], 1e-12, None)))) if len(y) else float("nan")
    score, parts = selection_score(y, proba) if len(y) else (float("nan"), {})
    return {"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "step_losses": losses, "lr": lr,
            "val_loss": val_loss, "val_score": score, **{f"val_{k}": v for k, v in parts.items()},
            "seconds": round(time.perf_counter() - t0, 3)}


def _criterion(recipe: FinetuneRecipe, n_classes: int) -> tuple[nn.Module, Any]:
    """Soft-target cross-entropy with Mixup/CutMix when either is on (smoothing inside Mixup), else label-smoothed
    cross-entropy."""
    if recipe.mixup > 0 or recipe.cutmix > 0:
        from timm.data import Mixup
        from timm.loss import SoftTargetCrossEntropy

        mixup = Mixup(mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
                      switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode,
                      label_smoothing=recipe.label_smoothing, num_classes=n_classes)
        return SoftTargetCrossEntropy(), mixup
    return nn.CrossEntropyLoss(label_smoothing=recipe.label_smoothing), None


def _smoothed(y: torch.Tensor, n_classes: int, smoothing: float) -> torch.Tensor:
    """Smoothed one-hot targets (an odd batch under Mixup is left unmixed)."""
    off = smoothing / n_classes
    return torch.full((len(y), n_classes), off, device=y.device).scatter_(1, y[:, None], 1.0 - smoothing + off)


def _save_best(path: Path, net: nn.Module, seed: int, epoch: int, fingerprint: str) -> None:
    from safetensors.torch import save

    meta = {"seed": str(seed), "epoch": str(epoch), "fingerprint": fingerprint, "format": "retbench.finetune/1"}
    atomic_write_bytes(path, save(trainable_state(net), metadata=meta))


def _load_best(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _save_last(path: Path, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any, state: dict[str, Any],
               fingerprint: str) -> None:
    buf = io.BytesIO()
    torch.save({"trainable": trainable_state(net), "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                "state": json.dumps(state), "fingerprint": fingerprint}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _resume(path: Path, fingerprint: str, net: nn.Module, optimizer: torch.optim.Optimizer, scaler: Any,
            state: dict[str, Any]) -> int:
    """Load ``path`` into the network, optimizer and ``state`` when it was written for this fingerprint; returns the
    epoch resumed from (0: starting afresh)."""
    if not path.is_file():
        return 0
    saved = torch.load(path, map_location="cpu", weights_only=True)
    if saved.get("fingerprint") != fingerprint or not (path.parent / BEST).is_file():
        return 0
    load_trainable(net, saved["trainable"])
    optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    state.update(json.loads(saved["state"]))
    return int(state["epoch"])


def plot_curves(results: list[SeedResult], path: Path, title: str) -> None:
    """Train and validation loss per epoch and the validation score, one line per seed, the selected epoch marked;
    matplotlib's object-oriented API only (no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 3.4), dpi=110)
    FigureCanvasAgg(fig)
    loss_ax, score_ax = fig.subplots(1, 2)
    for r in results:
        epochs = [row["epoch"] for row in r.curve]
        line, = loss_ax.plot(epochs, [row["train_loss"] for row in r.curve], lw=1.4, label=f"train, seed {r.seed}")
        loss_ax.plot(epochs, [row["val_loss"] for row in r.curve], lw=1.0, ls="--", color=line.get_color(),
                     label=f"validation, seed {r.seed}")
        score_ax.plot(epochs, [row["val_score"] for row in r.curve], lw=1.4, color=line.get_color(), label=f"seed {r.seed}")
        best = next((row for row in r.curve if row["epoch"] == r.selected_epoch), None)
        if best is not None:
            score_ax.plot([best["epoch"]], [best["val_score"]], marker="o", color=line.get_color())
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    score_ax.set(xlabel="epoch", ylabel="(F1 + AUROC + kappa) / 3", title="validation score (o: selected epoch)")
    for ax in (loss_ax, score_ax):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
