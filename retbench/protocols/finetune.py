"""Fine-tuning protocols: RETFound's recipe (``finetune``), last block + head (``finetune.head``) and LoRA on the
attention projections (``finetune.lora``).

Each seed trains a fresh copy of the model's image encoder with a new linear head on the task's train split
(augmented as RETFound does), picks the epoch with the best validation score, (F1 + AUROC + kappa) / 3 as
RETFound's ``engine_finetune.py:122``, and scores the test split once with that epoch's weights; the test split
never enters training or selection. Validation is the task's ``val`` split where it has one, else carved from
train by patient per seed (20%, as ``linear_probe``). Seeds re-draw the head's initialisation, the data order,
the augmentations and (without a given ``val`` split) the validation carve; the test set is fixed.

The preset follows the device: ``gpu`` (RETFound's settings, bf16 autocast) on CUDA, ``cpu`` (8 epochs, 1 warm-up
epoch) elsewhere; every setting is recorded in the result. These protocols train, so they are run only when asked
for by name (``-p finetune``) and apply to every classification task without being listed in its spec
(``opt_in``); they never run by default. Results keep, beside the result file, per seed the selected epoch's
trainable weights (``best.safetensors``) and the resume point (``last.pt``), and one ``curve.png``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from retbench.data.splits import holdout
from retbench.errors import NotApplicableError, RetbenchError
from retbench.finetune.recipe import CITATIONS, RETFOUND_COMMIT, FinetuneRecipe, preset_for, recipe_for
from retbench.protocols.base import Context, ProtocolOutput, evaluate_runs
from retbench.protocols.linear_probe import RETFOUND_METRICS
from retbench.spec import TaskSpec

REPLICATION = ("patients x seeds: each seed re-initialises the head and re-draws data order, augmentations and "
               "(without a given val split) the validation carve; the test set is fixed")


@dataclass(frozen=True)
class Finetune:
    """A fine-tuning protocol: ``mode`` (full, head, lora), seeds, and optional recipe overrides."""

    name: str
    description: str
    mode: str = "full"
    seeds: tuple[int, ...] = (0,)
    preset: str | None = None  # None: by device (gpu on CUDA, else cpu)
    overrides: tuple[tuple[str, Any], ...] = field(default_factory=tuple)
    kind: str = "classification"
    opt_in: bool = True  # runs on any classification task when asked for by name; never by default
    trains: bool = True  # a sweep gives it a job of its own (model x task x protocol)

    @property
    def run_options(self) -> frozenset[str]:
        """``--seeds`` (a count)."""
        return frozenset({"seeds"})

    def needs_text(self, spec: TaskSpec) -> bool:
        """Never: it trains on images."""
        return False

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The task's metrics and RETFound's set (accuracy, macro F1, OvR AUROC, AUPR, unweighted kappa)."""
        return tuple(dict.fromkeys((*spec.metrics, *RETFOUND_METRICS)))

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> Finetune:
        """Seeds ``0 .. seeds - 1``; shots do not apply."""
        return dataclasses.replace(self, seeds=tuple(range(seeds))) if seeds else self

    def recipe(self, device_type: str) -> FinetuneRecipe:
        """The settings this protocol trains with on a device of ``device_type``."""
        return recipe_for(self.mode, self.preset or preset_for(device_type), **dict(self.overrides))

    def run(self, ctx: Context) -> ProtocolOutput:
        """Train one model per seed, select its epoch on validation, score the test split."""
        from retbench.features import default_workers
        from retbench.finetune.data import decode
        from retbench.finetune.network import build
        from retbench.finetune.trainer import SplitPixels, plot_curves, train_seed

        adapter, preprocess, folder = ctx.model, ctx.preprocess, ctx.artifacts
        if adapter is None or preprocess is None or folder is None:
            raise RetbenchError(f"protocol '{self.name}' trains the model: run it through retbench's runner")
        recipe = self.recipe(ctx.device.type)
        y, n_classes = ctx.examples.labels, len(ctx.spec.classes)
        workers = 0 if ctx.device.type == "cpu" else default_workers()
        wanted = np.unique(np.concatenate(list(ctx.splits.values())))
        pixels, kept, bad = decode(ctx.examples, wanted, preprocess, workers)
        if bad and not ctx.skip_bad_images:
            raise NotApplicableError(f"{len(bad)} unreadable images, e.g. {bad[0]} (use --skip-bad-images to skip)")
        row_of = {int(i): r for r, i in enumerate(kept)}
        test = np.asarray([i for i in ctx.splits["test"] if int(i) in row_of], dtype=np.int64)
        results, raw = [], []
        for seed in self.seeds:
            fit, val = self._fit_val(ctx, seed, row_of)
            data = SplitPixels(pixels[[row_of[int(i)] for i in fit]], y[fit], pixels[[row_of[int(i)] for i in val]], y[val],
                               pixels[[row_of[int(i)] for i in test]])
            built = build(adapter, n_classes, preprocess.size, recipe, seed)
            fingerprint = self._fingerprint(ctx, recipe, seed, fit, val, adapter.describe()["weights_identity"])
            seed_dir = folder / f"seed{seed}"
            r = train_seed(built, data, recipe, preprocess, seed, seed_dir, fingerprint, ctx.device, workers, n_classes)
            results.append(r)
            extra = {"selected_epoch": r.selected_epoch, "epochs": r.epochs, "val_score": r.val_score,
                     "resumed_from_epoch": r.resumed_from, "train_seconds": round(r.seconds, 2),
                     "n_fit": int(len(fit)), "n_val": int(len(val)),
                     "weights": f"{folder.name}/seed{seed}/best.safetensors", "curve": r.curve}
            raw.append((seed, None, test, r.test_proba, extra))
        folder.mkdir(parents=True, exist_ok=True)
        plot_curves(results, folder / "curve.png", f"{self.name} ({recipe.preset} preset) {adapter.name} on {ctx.spec.name}")
        runs = evaluate_runs(self.metric_names(ctx.spec), raw, y)
        settings = {"recipe": recipe.to_dict(), "seeds": list(self.seeds), "network": built.report,
                    "trainable": _trainable_note(recipe.mode), "selection": "best validation (F1 + AUROC + kappa) / 3, "
                    "strict > (first best kept); test scored once with the selected epoch's weights",
                    "validation": "the task's val split" if "val" in ctx.splits else
                    f"carved from train per seed ({recipe.val_fraction:.0%}, grouped by patient)",
                    "augmentation": "train split only: the adapter's preprocessing, then RETFound's train transform",
                    "replication_unit": REPLICATION, "follows": f"rmaphoh/RETFound_MAE@{RETFOUND_COMMIT}",
                    "citations": {k: CITATIONS[k] for k in CITATIONS}, "unreadable_images": bad,
                    "curve_png": f"{folder.name}/curve.png"}
        return ProtocolOutput(runs, settings, n_test=int(len(test)))

    def _fit_val(self, ctx: Context, seed: int, row_of: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """Train and validation rows of ``seed`` (readable images only): the task's val split, else carved from train
        by patient as ``linear_probe`` carves it."""
        y = ctx.examples.labels
        train = np.asarray([i for i in ctx.splits["train"] if int(i) in row_of], dtype=np.int64)
        if "val" in ctx.splits:
            return train, np.asarray([i for i in ctx.splits["val"] if int(i) in row_of], dtype=np.int64)
        groups = np.asarray(ctx.examples.patients, dtype=object)[train] if ctx.spec.splits.by_patient else None
        return holdout(train, y[train], groups, self.recipe(ctx.device.type).val_fraction, seed)

    def _fingerprint(self, ctx: Context, recipe: FinetuneRecipe, seed: int, fit: np.ndarray, val: np.ndarray,
                     weights: str) -> str:
        """What a resumable checkpoint must have been trained for: settings, weights, task, rows and seed."""
        blob = json.dumps({"protocol": self.name, "recipe": recipe.to_dict(), "weights": weights, "seed": seed,
                           "task": ctx.spec.spec_hash, "fit": fit.tolist(), "val": val.tolist(),
                           "preprocess": ctx.preprocess.to_dict() if ctx.preprocess else None}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()


def _trainable_note(mode: str) -> str:
    return {"full": "every parameter of the image encoder the features use, and the linear head",
            "head": "the last block, what follows it (final norms) and the linear head",
            "lora": "the LoRA matrices on the attention projections and the linear head (the head is counted in "
                    "trainable_parameters; lora_parameters are the LoRA matrices alone)"}[mode]


FINETUNE = Finetune(
    "finetune",
    "RETFound's fine-tuning recipe (AdamW, layer decay 0.65, drop path 0.2, label smoothing 0.1, RandAugment, warm-up "
    "+ cosine, best epoch on validation); preset by device (gpu: RETFound's settings; cpu: 8 epochs)",
)
FINETUNE_HEAD = Finetune(
    "finetune.head",
    "RETFound's recipe training only the last block, the final norms and the head",
    mode="head",
)
FINETUNE_LORA = Finetune(
    "finetune.lora",
    "RETFound's recipe with LoRA (peft; rank 8, alpha 16, dropout 0.1) on the attention projections; only LoRA "
    "matrices and the head train; no layer decay",
    mode="lora",
)


def result_folder(result_file: Path) -> Path:
    """Where a fine-tuning result keeps its files: the result's path without ``.json``."""
    return result_file.with_suffix("")
