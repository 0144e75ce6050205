"""Fine-tuning machinery of the ``finetune`` protocols: RETFound's recipe (its ``main_finetune.py``), a last-block +
head variant and LoRA on the attention projections.

- :mod:`retbench.finetune.recipe`: the settings, with the file:line of RETFound's code each default follows;
- :mod:`retbench.finetune.network`: an adapter's image encoder as a trainable network with a linear head (drop
  path, layer-wise lr decay, LoRA, what is trainable);
- :mod:`retbench.finetune.data`: decoded images and RETFound's train-time augmentation (train split only);
- :mod:`retbench.finetune.trainer`: the seeded, resumable training loop, epoch selection on validation,
  the kept weights (safetensors) and the training curve.

The protocol itself (the registry entries) is :mod:`retbench.protocols.finetune`.
"""
