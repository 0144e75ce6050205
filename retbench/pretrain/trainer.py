"""The pretraining loop shared by every recipe: seeded, resumable, logged, exported as ``local:``.

Output folder (``--out DIR``)::

    DIR/retbench_model.json, model.safetensors, text/   the model, loadable as --model local:DIR
    DIR/MODEL_CARD.md                                   data, settings, seed, steps, loss curve
    DIR/loss.png, DIR/loss.json                         the loss per step
    DIR/data_report.json                                what was used and what was excluded
    DIR/training/last.pt                                the last checkpoint (resume point)

Determinism: each step's batch comes from an epoch permutation seeded by (seed, epoch) and its
augmentations from the torch RNG seeded by (seed, step), so a run interrupted at any checkpoint
and resumed reproduces the uninterrupted run's losses exactly (on the same device and threads).
"""

from __future__ import annotations

import io
import json
import math
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from retbench.atomic_files import atomic_write_bytes, atomic_write_json
from retbench.errors import RetbenchError
from retbench.preprocess import Preprocess
from retbench.pretrain.recipe import RECIPES, Recipe, Settings
from retbench.progress import progress_bar

CHECKPOINT = Path("training") / "last.pt"
LOAD_MARGIN = 1.15  # images are stored this much larger than the training size, for random crops


@dataclass(frozen=True)
class PretrainConfig:
    """Everything ``retbench pretrain`` was asked to do (flows one way from the CLI)."""

    recipe: str
    data: tuple[str, ...]
    out: str
    preset: str = "cpu"
    steps: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    image_size: int | None = None
    arch: str | None = None
    text_tower: str = "minilm"
    init: str | None = None
    seed: int = 0
    device: str = "auto"
    data_root: str | None = None
    exclude: tuple[str, ...] = ("@all",)
    exclude_all_images: bool = False
    checkpoint_every: int = 25
    cache_dir: str = ""
    options: tuple[tuple[str, Any], ...] = ()  # recipe settings (a preset's ``extra``) overridden with --option
    threads: int = 2  # CPU threads: results are bitwise reproducible for a fixed count (retbench.determinism)


def resolve_settings(config: PretrainConfig) -> Settings:
    """The recipe's preset with the command line's overrides applied."""
    cls = RECIPES.get(config.recipe)
    if config.preset not in cls.presets:
        raise RetbenchError(f"recipe '{config.recipe}' has no preset '{config.preset}'; presets: {', '.join(cls.presets)}")
    p = cls.presets[config.preset]
    vision = dict(p.vision)
    if config.arch:
        vision = {"timm": config.arch, "kwargs": {}}
    size = config.image_size or p.image_size
    if "img_size" in vision.get("kwargs", {}) or config.image_size:
        vision = {**vision, "kwargs": {**vision.get("kwargs", {}), **({"img_size": size} if _is_vit(vision) else {})}}
    extra = dict(p.extra)
    for key, value in config.options:
        if key not in extra:
            known = ", ".join(sorted(extra)) or "none"
            raise RetbenchError(f"recipe '{config.recipe}' has no option '{key}'; its options: {known}")
        extra[key] = value
    return Settings(
        recipe=config.recipe, preset=config.preset, image_size=size, steps=config.steps or p.steps,
        batch_size=config.batch_size or p.batch_size, lr=config.lr or p.lr, weight_decay=p.weight_decay,
        warmup_frac=p.warmup_frac, amp=p.amp, seed=config.seed, vision=vision, text_tower=config.text_tower,
        init=config.init, extra=extra,
    )


def _is_vit(vision: dict[str, Any]) -> bool:
    return "vit" in vision["timm"] or "deit" in vision["timm"]


def eval_preprocess(settings: Settings) -> Preprocess:
    """The preprocessing recorded in the exported model: the training view without augmentation."""
    return Preprocess(size=settings.image_size, resize="resize_crop", interpolation="bilinear")


def learning_rate(settings: Settings, step: int) -> float:
    """Linear warm-up then cosine decay to zero."""
    warm = max(1, int(settings.warmup_frac * settings.steps))
    if step < warm:
        return settings.lr * (step + 1) / warm
    progress = (step - warm) / max(1, settings.steps - warm)
    return settings.lr * 0.5 * (1 + math.cos(math.pi * progress))


def batch_indices(n: int, batch: int, seed: int, step: int) -> torch.Tensor:
    """The images of ``step``: consecutive slices of per-epoch permutations seeded by (seed, epoch)."""
    per_epoch = max(1, n // batch)
    epoch, pos = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    if n < batch:
        perm = perm.repeat(math.ceil(batch / n))
    return perm[pos * batch: pos * batch + batch]


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on biases, norms, tokens and position embeddings."""
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or "token" in name or "pos_embed" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def pretrain(config: PretrainConfig) -> Path:
    """Train ``config.recipe`` on ``config.data`` and export a ``local:`` model into ``config.out``."""
    from retbench.data.examples import data_root
    from retbench.environment import resolve_device
    from retbench.pretrain.data import load_pretrain_set

    settings = resolve_settings(config)
    out = Path(config.out).expanduser().resolve()
    ckpt_path = out / CHECKPOINT
    device = resolve_device(config.device)
    with _determinism(device, config.threads) as determinism:  # torch's process settings restored after
        torch.manual_seed(settings.seed)
        load = Preprocess(size=round(settings.image_size * LOAD_MARGIN), resize="resize_crop", interpolation="bilinear")
        cache_dir = Path(config.cache_dir) if config.cache_dir else _default_cache()
        data = load_pretrain_set(list(config.data), data_root(config.data_root), load, list(config.exclude),
                                 config.exclude_all_images, cache_dir)
        atomic_write_json(out / "data_report.json", data.report)
        recipe: Recipe = RECIPES.get(settings.recipe)(settings, data)
        recipe.check_data()
        recipe.to(device)
        optimizer = torch.optim.AdamW(param_groups(recipe, settings.weight_decay), lr=settings.lr, betas=(0.9, 0.95))
        state = {"step": 0, "log": [], "seconds": 0.0}
        if ckpt_path.is_file():
            state = _resume(ckpt_path, settings, recipe, optimizer)
        _train(recipe, optimizer, settings, state, ckpt_path, config.checkpoint_every, device)
        _export(recipe, settings, data, state, out, config, determinism)
        return out


@contextmanager
def _determinism(device: torch.device, threads: int) -> Iterator[dict[str, Any]]:
    """Pin what makes CPU training bitwise reproducible for the block, and say what holds (recorded in the model card)."""
    from retbench.determinism import deterministic_training, kernel_report

    if device.type != "cpu":
        yield {**kernel_report(), "holds": f"not bitwise: {device.type} kernels are not pinned"}
        return
    with deterministic_training(threads) as report:
        report["holds"] = _what_holds(report, threads)
        yield report


def _what_holds(report: dict[str, Any], threads: int) -> str:
    """The model card's sentence on what makes these weights reproducible."""
    pinned = report["cpu_capability"] == "AVX2"
    cpu = report["cpu"]["model"]
    mkl = report.get("mkl_branch", "unknown")
    mkl_note = f"MKL branch {mkl}"
    if mkl not in ("AVX2", "unknown"):
        mkl_note += ": MKL ignored the AVX2 pin on this CPU"
    return (
        f"bitwise-identical weights for the same command, data, package versions and {threads} threads on the "
        f"same CPU model ({cpu}; kernels pinned to AVX2, {mkl_note}); another CPU model may give other weights "
        "(docs/pretraining.md)"
        if pinned else
        f"bitwise-identical weights for the same command, data, package versions and {threads} threads on the "
        f"same CPU model ({cpu}) with the same CPU kernels ({report['cpu_capability']}; not pinned: run through the `retbench` "
        "command to pin them)")


def _default_cache() -> Path:
    import os

    return Path(os.environ.get("RETBENCH_CACHE") or Path.home() / ".cache" / "retbench")


def _resume(path: Path, settings: Settings, recipe: Recipe, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    saved = torch.load(path, map_location="cpu", weights_only=True)
    before = json.loads(saved["settings"])
    now = json.loads(json.dumps(settings.to_dict()))
    changed = sorted(k for k in now if k != "steps" and before.get(k) != now[k])
    if changed:
        raise RetbenchError(f"{path}: the checkpoint was trained with different settings ({', '.join(changed)}); "
                            "use another --out or delete the folder")
    recipe.load_state_dict(saved["model"])
    optimizer.load_state_dict(saved["optimizer"])
    return {"step": int(saved["step"]), "log": json.loads(saved["log"]), "seconds": float(saved["seconds"])}


def _save_checkpoint(path: Path, settings: Settings, recipe: Recipe, optimizer: torch.optim.Optimizer,
                     state: dict[str, Any]) -> None:
    buf = io.BytesIO()
    torch.save({"model": recipe.state_dict(), "optimizer": optimizer.state_dict(), "step": state["step"],
                "seconds": state["seconds"], "log": json.dumps(state["log"]),
                "settings": json.dumps(settings.to_dict())}, buf)
    atomic_write_bytes(path, buf.getvalue())


def _train(recipe: Recipe, optimizer: torch.optim.Optimizer, settings: Settings, state: dict[str, Any],
           ckpt_path: Path, every: int, device: torch.device) -> None:
    n = len(recipe.data)
    amp = settings.amp and device.type == "cuda"
    recipe.train()
    start = state["step"]
    with progress_bar(f"pretrain {settings.recipe}", settings.steps - start) as advance:
        for step in range(start, settings.steps):
            t0 = time.perf_counter()
            lr = learning_rate(settings, step)
            for group in optimizer.param_groups:
                group["lr"] = lr
            torch.manual_seed(settings.seed * 1_000_003 + step)
            idx = batch_indices(n, settings.batch_size, settings.seed, step)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
                losses = recipe.training_loss(idx)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(recipe.parameters(), 3.0)
            optimizer.step()
            recipe.after_step(step)
            state["step"] = step + 1
            state["seconds"] += time.perf_counter() - t0
            state["log"].append({"step": step + 1, "lr": lr, **{k: round(float(v.detach()), 6) for k, v in losses.items()}})
            if not math.isfinite(state["log"][-1]["loss"]):
                raise RetbenchError(f"pretraining diverged at step {step + 1} (loss {state['log'][-1]['loss']}); "
                                    "lower --lr")
            if state["step"] % every == 0 or state["step"] == settings.steps:
                _save_checkpoint(ckpt_path, settings, recipe, optimizer, state)
            advance(1, status=f"loss {state['log'][-1]['loss']:.4f}")
    recipe.eval()


def _export(recipe: Recipe, settings: Settings, data: Any, state: dict[str, Any], out: Path,
            config: PretrainConfig, determinism: dict[str, Any] | None = None) -> None:
    from retbench.local_model_format import save_local_model

    parts = recipe.export()
    card = {
        "recipe": settings.recipe, "description": recipe.description,
        "settings": {**settings.to_dict(), "vision": parts["vision_cfg"]},  # --init may bring its own architecture
        "data": {k: v for k, v in data.report.items() if k != "excluded"}, "steps_done": state["step"],
        "train_seconds": round(state["seconds"], 1), "final_loss": state["log"][-1]["loss"] if state["log"] else None,
        "determinism": determinism or {},
    }
    tmp = out / ".export"
    save_local_model(tmp, preprocess=eval_preprocess(settings), recipe=settings.recipe, card=card, overwrite=True,
                     **parts)
    config_file = tmp / "retbench_model.json"
    # the config is what makes the folder a model: moved last, so a reader never finds it before the weights
    for f in [f for f in sorted(tmp.rglob("*")) if f.is_file() and f != config_file] + [config_file]:
        target = out / f.relative_to(tmp)
        target.parent.mkdir(parents=True, exist_ok=True)
        f.replace(target)
    shutil.rmtree(tmp, ignore_errors=True)
    atomic_write_json(out / "loss.json", state["log"])
    _plot_loss(state["log"], out / "loss.png", settings)
    (out / "MODEL_CARD.md").write_text(model_card(card, config), encoding="utf-8")


def _plot_loss(log: list[dict[str, Any]], path: Path, settings: Settings) -> None:
    """The loss curve as a PNG, through matplotlib's object-oriented API: no pyplot state, and the backend of the
    calling process (a notebook's, say) is left as it is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    steps = [r["step"] for r in log]
    keys = [k for k in log[0] if k not in ("step", "lr")] if log else []
    for k in keys:
        ax.plot(steps, [r[k] for r in log], label=k, lw=1.6 if k == "loss" else 1.0)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"{settings.recipe} ({settings.preset} preset, seed {settings.seed})")
    ax.grid(alpha=0.3)
    if len(keys) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())


def _trained_with(report: dict[str, Any]) -> str:
    """The CPU and package versions of a determinism report, on one line (older cards: 'not recorded')."""
    cpu, packages = report.get("cpu"), report.get("packages")
    if not cpu or not packages:
        return "not recorded"
    from retbench.determinism import cpu_label

    versions = ", ".join(f"{k} {v}" for k, v in packages.items() if v != "not installed")
    return f"{cpu_label(cpu)}; {report.get('threads')} threads; {versions}"


def model_card(card: dict[str, Any], config: PretrainConfig) -> str:
    """A short markdown card: what was trained, on what, how, and the loss curve."""
    s, d = card["settings"], card["data"]
    excluded = ", ".join(f"{t}: {n}" for t, n in sorted(d["excluded_by_task"].items())) or "none"
    lines = [
        f"# local model: {card['recipe']}", "", card["description"], "",
        f"Evaluate with `retbench run --model local:{config.out} --task @bundled`.", "",
        "| setting | value |", "|---|---|",
        f"| data | {', '.join(d['sources'])} |",
        f"| images | {d['images_kept']} used of {d['images_found']} found; modalities {d['modalities']} |",
        f"| excluded (match an evaluation {d['held_out_split']} image) | {d['excluded_total']} ({excluded}) |",
        f"| vision | `{s['vision']['timm']}` {s['vision'].get('kwargs') or ''} |",
        f"| image size | {s['image_size']} px |",
        f"| steps × batch | {card['steps_done']} × {s['batch_size']} |",
        f"| lr (peak, AdamW, cosine) | {s['lr']} |",
        f"| recipe options (`--option`) | {', '.join(f'{k}={v}' for k, v in sorted(s['extra'].items())) or '-'} |",
        f"| seed | {s['seed']} |",
        f"| preset | {s['preset']} |",
        f"| text tower | {s['text_tower'] if RECIPES.get(card['recipe']).needs_text else '-'} |",
        f"| final loss | {card['final_loss']} |",
        f"| training time | {card['train_seconds']} s |",
        f"| determinism | {card.get('determinism', {}).get('holds', 'not recorded')} |",
        f"| trained with | {_trained_with(card.get('determinism', {}))} |",
        "", "![loss](loss.png)", "",
        "Excluded images are listed in `data_report.json`.", "",
    ]
    return "\n".join(lines)

