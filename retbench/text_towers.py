"""Pretrained text encoders (torch modules) usable as the text tower of retbench's own image-text models; the
tokenizers they use come from :mod:`retbench.text_tokenizers`.

A tower is named by a short spec:

- ``minilm``: sentence-transformers all-MiniLM-L6-v2 (384-d), read offline from the bundled
  package (:func:`retbench.text_tokenizers.minilm_dir`). Sentence-transformers computes this model's
  sentence embedding as the attention-masked mean of the last hidden states followed by L2
  normalisation, with inputs stripped and truncated to 256 tokens (the model folder's
  ``modules.json``, ``1_Pooling/config.json`` and ``sentence_bert_config.json``); the tower's
  defaults reproduce exactly that.
- ``hf:<hub id or local folder>``: any Hugging Face ``AutoModel`` text encoder (the encoder
  half of encoder-decoder models), masked-mean pooled by default and not normalised.

:class:`TextTower` tokenises lists of strings itself, so callers only ever pass text.
:meth:`TextTower.save_files` writes the tower's configuration and tokenizer beside a
checkpoint, and :func:`text_tower_from_files` rebuilds the same architecture from them with
no network access (weights then come from the checkpoint).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from retbench.errors import RetbenchError
from retbench.weights import hub_online

Pooling = Literal["mean", "cls"]
POOLINGS = ("mean", "cls")
MINILM = "minilm"
MINILM_MAX_LENGTH = 256  # sentence_bert_config.json: max_seq_length


class TextTower(nn.Module):
    """A Hugging Face text encoder with its tokenizer and pooling: ``tower(texts) -> (N, dim)``.

    ``spec`` records where it came from (``minilm`` or ``hf:<id>``); ``pooling`` is ``mean``
    (attention-masked mean of the last hidden states) or ``cls`` (first token); ``normalize``
    L2-normalises the pooled embedding; ``max_length`` truncates the token sequence.
    """

    def __init__(self, encoder: nn.Module, tokenizer: Any, *, spec: str, pooling: Pooling = "mean",
                 normalize: bool = False, max_length: int = 512) -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise RetbenchError(f"text tower pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        self.encoder = encoder
        self.tokenizer = tokenizer
        self.spec, self.pooling, self.normalize, self.max_length = spec, pooling, bool(normalize), int(max_length)

    @property
    def dim(self) -> int:
        """Width of the pooled embedding."""
        cfg: Any = self.encoder.config  # a transformers config (nn.Module's __getattr__ types it Tensor | Module)
        return int(getattr(cfg, "hidden_size", None) or cfg.d_model)

    @property
    def device(self) -> torch.device:
        """Device of the encoder's parameters."""
        return next(self.encoder.parameters()).device

    def settings(self) -> dict[str, Any]:
        """The tower's description as stored in a local model's config."""
        return {"tower": self.spec, "pooling": self.pooling, "normalize": self.normalize, "max_length": self.max_length}

    def tokenize(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Token ids and attention mask for ``texts`` (stripped, padded to the longest, truncated), on the tower's device."""
        batch = self.tokenizer([str(t).strip() for t in texts], padding=True, truncation=True,
                               max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (and optionally normalised) embeddings of a tokenised batch; differentiable (for training)."""
        hidden = self.encoder(**batch).last_hidden_state
        if self.pooling == "cls":
            pooled = hidden[:, 0]
        else:
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1e-9)
        return nn.functional.normalize(pooled, dim=-1) if self.normalize else pooled

    def forward(self, texts: list[str]) -> torch.Tensor:
        """(N, dim) embeddings of ``texts``."""
        return self.embed(self.tokenize(texts))

    def save_files(self, folder: str | Path) -> None:
        """Write the encoder's ``config.json`` and the tokenizer files into ``folder`` (no weights)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        config: Any = self.encoder.config  # a transformers config, as in dim
        config.save_pretrained(str(folder))
        self.tokenizer.save_pretrained(str(folder))


def _defaults(spec: str) -> dict[str, Any]:
    if spec == MINILM:
        return {"pooling": "mean", "normalize": True, "max_length": MINILM_MAX_LENGTH}
    return {"pooling": "mean", "normalize": False, "max_length": None}


def _source(spec: str) -> str:
    """The folder or hub id behind a spec."""
    if spec == MINILM:
        from retbench.text_tokenizers import minilm_dir

        return str(minilm_dir())
    if spec.startswith("hf:") and len(spec) > 3:
        return spec[3:]
    raise RetbenchError(f"unknown text tower '{spec}': use 'minilm' or 'hf:<hub id or local folder>'")


def _encoder_only(model: Any) -> nn.Module:
    """A transformers model's encoder (the model itself unless it is an encoder-decoder)."""
    return model.get_encoder() if getattr(model.config, "is_encoder_decoder", False) else model


def _assemble(encoder: nn.Module, tokenizer: Any, spec: str, device: str | torch.device, pooling: Pooling | None,
              normalize: bool | None, max_length: int | None) -> TextTower:
    d = _defaults(spec)
    if max_length is None:
        max_length = d["max_length"] or min(int(getattr(tokenizer, "model_max_length", 512) or 512), 512)
    tower = TextTower(encoder, tokenizer, spec=spec, pooling=pooling or d["pooling"],
                      normalize=d["normalize"] if normalize is None else normalize, max_length=max_length)
    return tower.eval().to(device)


def load_text_tower(spec: str, device: str | torch.device = "cpu", *, pooling: Pooling | None = None,
                    normalize: bool | None = None, max_length: int | None = None) -> TextTower:
    """A pretrained tower: ``minilm`` (offline) or ``hf:<hub id or local folder>`` (local folder or HF cache).

    ``pooling``/``normalize``/``max_length`` default to the model's own convention
    (MiniLM: mean, normalised, 256 tokens; ``hf:``: mean, not normalised, the tokenizer's
    limit capped at 512). The tower is returned in eval mode.
    """
    from transformers import AutoModel, AutoTokenizer

    source = _source(spec)
    local_only = not Path(source).is_dir() and not hub_online()  # no network: the hub cache only, no retries
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_only)
        encoder = _encoder_only(AutoModel.from_pretrained(source, local_files_only=local_only))
    except (OSError, ValueError) as exc:  # not cached / not a folder / not a valid hub id
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise RetbenchError(f"text tower '{spec}' is not available offline ({first}); download it or pass a local "
                            "folder as hf:<folder>") from None
    return _assemble(encoder, tokenizer, spec, device, pooling, normalize, max_length)


def text_tower_from_files(folder: str | Path, spec: str, device: str | torch.device = "cpu", *,
                          pooling: Pooling | None = None, normalize: bool | None = None,
                          max_length: int | None = None, seed: int = 0) -> TextTower:
    """The architecture saved by :meth:`TextTower.save_files`, randomly initialised (seeded); load weights after."""
    from transformers import AutoConfig, AutoModel, AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise RetbenchError(f"text tower files missing: {folder / 'config.json'}")
    config = AutoConfig.from_pretrained(str(folder))
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        encoder = _encoder_only(AutoModel.from_config(config))
    finally:
        torch.random.set_rng_state(state)
    return _assemble(encoder, tokenizer, spec, device, pooling, normalize, max_length)
