"""``retbench pretrain``: train a local foundation model with a bundled recipe."""

from __future__ import annotations

import argparse

from retbench.cli.common import add_tasks_path_argument, csv_list, err

RECIPE_HELP = """recipes (see docs/pretraining.md):
  mae       masked autoencoder (RETFound): ViT, 75% masking, MSE on normalised patches
  flair     image-label-text alignment (FLAIR): same-label image-text pairs are positives
  simclr    two-view NT-Xent contrastive learning
  dino      self-distillation: EMA teacher, centring, sharpening, multi-crop
  retfiner  refine a vision model with ITC, ITM, MLM and a generative objective (RetFiner)
  eyeclip   image-text + CFP-OCT same-eye contrast + masked reconstruction (EyeCLIP)

examples:
  retbench pretrain --recipe mae --data @bundled --out runs/mae
  retbench pretrain --recipe flair --data eye4class,csdi_cataract_severity --out runs/flair
  retbench pretrain --recipe retfiner --data csdi-reports --init local:runs/mae --out runs/retfiner
  retbench run --model local:runs/mae --task @bundled
Interrupted? Run the same command again: it resumes from DIR/training/last.pt."""


def add_pretrain_parser(sub: argparse._SubParsersAction) -> None:
    """Add the ``pretrain`` subcommand."""
    p = sub.add_parser("pretrain", help="pretrain a local model with a bundled recipe (loadable as local:DIR)",
                       description="Pretrain a model on your images; the output folder is a model for --model local:DIR.",
                       epilog=RECIPE_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="mae | flair | simclr | dino | retfiner | eyeclip")
    p.add_argument("--data", action="append", required=True,
                   help="tasks or @groups (train splits), csdi-reports, captions:FILE.csv or image folders (repeatable)")
    p.add_argument("--out", required=True, help="output folder: the model, its card, loss curve and checkpoint")
    p.add_argument("--preset", default="cpu", help="cpu (minutes, 64-112 px) or gpu (224 px, bf16 autocast); default cpu")
    p.add_argument("--steps", type=int, help="optimiser steps (default: the preset's)")
    p.add_argument("--batch-size", type=int, help="images per step (default: the preset's)")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the preset's)")
    p.add_argument("--image-size", type=int, help="training and evaluation size in px (default: the preset's)")
    p.add_argument("--arch", help="timm architecture for the vision encoder (default: the preset's)")
    p.add_argument("--text-tower", default="minilm", help="minilm (offline, bundled) or hf:<id or folder>")
    p.add_argument("--init", help="initial vision model for refinement recipes, e.g. local:runs/mae")
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                   help="override one of the recipe's settings (e.g. mask_ratio=0.6; values are JSON, else text); "
                        "an unknown key lists the recipe's options (repeatable)")
    p.add_argument("--seed", type=int, default=0, help="seed for initialisation, batches and augmentations (default 0)")
    p.add_argument("--threads", type=int, default=2,
                   help="CPU threads (default 2): weights are bitwise reproducible for a fixed count, and differ "
                        "between counts; recorded in the model card")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--data-root", help="folder holding the datasets (default: $RETBENCH_DATA)")
    p.add_argument("--exclude", action="append",
                   help="evaluation tasks whose test images are removed from the data by content (default: @all)")
    p.add_argument("--exclude-all-images", action="store_true",
                   help="remove every image of the evaluation tasks, not only their test splits (for FLAIR-style "
                        "cross-validated probes, whose folds cover the whole set)")
    p.add_argument("--checkpoint-every", type=int, default=25, help="steps between checkpoints (default 25)")
    p.add_argument("--cache-dir", default="", help="where image hashes are cached (default: $RETBENCH_CACHE)")
    add_tasks_path_argument(p)


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Run ``retbench pretrain``."""
    from retbench.errors import RetbenchError
    from retbench.pretrain.trainer import PretrainConfig, pretrain

    if args.threads < 1:
        raise RetbenchError(f"--threads must be at least 1, got {args.threads}")
    config = PretrainConfig(
        recipe=args.recipe, data=csv_list(args.data), out=args.out, preset=args.preset, steps=args.steps,
        batch_size=args.batch_size, lr=args.lr, image_size=args.image_size, arch=args.arch, text_tower=args.text_tower,
        init=args.init, seed=args.seed, threads=args.threads, device=args.device, data_root=args.data_root,
        exclude=csv_list(args.exclude) or ("@all",), exclude_all_images=args.exclude_all_images,
        checkpoint_every=args.checkpoint_every, cache_dir=args.cache_dir, options=parse_options(args.option),
    )
    out = pretrain(config)
    err.print(f"model written to {out}: evaluate it with --model local:{out}", highlight=False)
    return 0


def parse_options(items: list[str]) -> tuple[tuple[str, object], ...]:
    """``KEY=VALUE`` strings → (key, value) pairs; values are parsed as JSON where they are JSON."""
    import json

    from retbench.errors import RetbenchError

    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise RetbenchError(f"--option {item!r}: expected KEY=VALUE")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        out.append((key.strip(), value))
    return tuple(out)
