"""BiomedCLIP (family ``biomedclip``): PubMedBERT-256 text tower + ViT-B/16 image tower, trained on PMC-15M.

Release: Hugging Face ``microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224``, an
open_clip checkpoint ``open_clip_pytorch_model.bin`` (pickled state dict) with
``open_clip_config.json`` and the tokenizer's ``vocab.txt`` beside it.

Architecture (``open_clip_config.json`` → ``model_cfg``; built here with open_clip's own
``CustomTextCLIP``, mlfoundations/open_clip ``src/open_clip/model.py``):

- ``embed_dim`` 512.
- vision: ``timm_model_name`` vit_base_patch16_224, ``timm_pool`` "" (timm's default
  ``token`` pool: the CLS token after the final LayerNorm), ``timm_proj`` linear (Dropout(0)
  then Linear 768→512 without bias), image size 224 (``src/open_clip/timm_model.py``).
- text: ``hf_model_name`` microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract (BERT-base
  uncased: vocab 30522, hidden 768, 12 layers × 12 heads, intermediate 3072, 512 positions,
  type vocab 2, pad id 0, LayerNorm eps 1e-12, GELU: the config of the PubMedBERT-abstract
  checkpoint and its fine-tunes on the hub), ``hf_pooler_type`` cls_last_hidden_state_pooler
  (last hidden state at position 0; BERT's pooling layer is not built), ``hf_proj_type`` mlp
  (Linear 768→640, GELU, Linear 640→512, no biases), ``context_length`` 256; the attention
  mask is ``ids != pad id`` (``src/open_clip/hf_model.py``).
- ``logit_scale``: learned scalar, used as ``exp(logit_scale)``.

open_clip would fetch the BERT config from the hub; here the same ``BertConfig`` is written
to a temporary folder that ``hf_model_name`` points at (``hf_model_pretrained`` false), so the
model is built offline exactly as open_clip builds it. The checkpoint is loaded strictly
after dropping ``text.transformer.embeddings.position_ids`` (transformers ≥ 4.31 no longer
stores it; open_clip ``src/open_clip/factory.py:load_checkpoint`` drops it the same way).

Tokenizer: WordPiece, lowercased, from ``vocab.txt`` (looked up beside ``--weights``, under
``RETBENCH_WEIGHTS``, in the hub cache of the release, then of the BiomedBERT repo that
open_clip's ``hf_tokenizer_name`` names; the two copies are assumed identical, unverified); texts are whitespace-
normalised and padded/truncated to 256 tokens (open_clip ``src/open_clip/tokenizer.py``,
``HFTokenizer`` with ``clean='whitespace'``, ``padding='max_length'``). With ``--weights
random`` MiniLM's vocabulary stands in (:func:`retbench.text_tokenizers.stand_in_tokenizer`).

Preprocessing: shortest side to 224 (bicubic), centre crop 224, CLIP mean/std (the config's
``preprocess_cfg`` mean/std with open_clip's ``PreprocessCfg`` defaults, ``src/open_clip/transform.py``).

Features: probes use ``encode_image`` (the 512-d projected embedding, unnormalised), the
common convention for CLIP models (the release has no linear-probe recipe). Zero-shot
follows the model card: one prompt per class, ``"this is a photo of " + class name``,
normalised embeddings, logits ``exp(logit_scale) · cos``, softmax.

Licence: MIT (HF model card), whose intended use is research only (deployed use, commercial
or not, is out of scope).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from retbench.adapters import Adapter, WeightsTag, ZeroShotSetup, register_adapter
from retbench.errors import RetbenchError
from retbench.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess
from retbench.weights import WeightsMissingError, load_state_dict, resolve_file

if TYPE_CHECKING:
    from retbench.spec import TaskSpec

HUB_ID = "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
TEXT_HUB_ID = "microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract"
CONTEXT_LENGTH = 256
PROMPT_PREFIX = "this is a photo of "
PAD_ID = 0

# open_clip_config.json, model_cfg (hf_model_name is replaced by a local folder at build time)
MODEL_CFG: dict[str, Any] = {
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"hf_model_name": TEXT_HUB_ID, "hf_tokenizer_name": TEXT_HUB_ID, "hf_proj_type": "mlp",
                 "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": CONTEXT_LENGTH},
}
# config.json of microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract (BERT-base, uncased PubMed vocabulary)
BERT_CONFIG: dict[str, Any] = {
    "model_type": "bert", "vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1,
    "max_position_embeddings": 512, "type_vocab_size": 2, "initializer_range": 0.02, "layer_norm_eps": 1e-12,
    "pad_token_id": PAD_ID, "position_embedding_type": "absolute",
}
DROPPED_KEYS = ("text.transformer.embeddings.position_ids",)


def build_biomedclip(bert_config: dict[str, Any] | None = None) -> torch.nn.Module:
    """open_clip's ``CustomTextCLIP`` for BiomedCLIP, randomly initialised, built offline."""
    from open_clip.model import CustomTextCLIP
    from transformers import BertConfig

    cfg = dict(bert_config or BERT_CONFIG)
    cfg.pop("model_type", None)
    with tempfile.TemporaryDirectory(prefix="retbench-biomedbert-") as folder:
        BertConfig(**cfg).save_pretrained(folder)
        text_cfg = {**MODEL_CFG["text_cfg"], "hf_model_name": folder, "hf_tokenizer_name": folder,
                    "hf_model_pretrained": False}
        return CustomTextCLIP(embed_dim=MODEL_CFG["embed_dim"], vision_cfg=dict(MODEL_CFG["vision_cfg"]), text_cfg=text_cfg)


def check_keys(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], path: Path) -> None:
    """One-line error unless ``state`` has exactly the model's keys and shapes (a strict load)."""
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shapes:
        first = (f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}" if unexpected
                 else f"{shapes[0]} has shape {tuple(state[shapes[0]].shape)}, expected {tuple(own[shapes[0]].shape)}")
        raise RetbenchError(f"{path} is not a BiomedCLIP open_clip checkpoint: {len(missing)} missing, {len(unexpected)} "
                            f"unexpected, {len(shapes)} mis-shaped tensors (first: {first})")


@register_adapter
class BiomedClipAdapter(Adapter):
    """BiomedCLIP via open_clip's CustomTextCLIP."""

    model: Any  # open_clip's CustomTextCLIP: typed Any (build_biomedclip returns nn.Module)
    family = "biomedclip"
    # fp32: open_clip create_model_from_pretrained(precision='fp32' by default), no autocast in the model card
    autocast_dtype: ClassVar[torch.dtype | None] = None
    has_text = True
    default_tag = "vitb16"
    tags: ClassVar[dict[str, WeightsTag]] = {
        "vitb16": WeightsTag(
            "vitb16", f"Hugging Face {HUB_ID} (open_clip checkpoint)",
            Preprocess(size=224, resize="resize_crop", interpolation="bicubic", crop_pct=1.0,
                       mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD),
            licence="MIT (model card: research use only; deployed use out of scope)",
            paper="Zhang et al., BiomedCLIP, NEJM AI 2024 (arXiv:2303.00915)",
            feature="encode_image: ViT-B/16 CLS (post-LayerNorm) → linear 768→512, unnormalised (512-d)",
            description="PubMedBERT (256 tokens) + ViT-B/16, contrastive on PMC-15M figure-caption pairs",
            filename="open_clip_pytorch_model.bin", hub_id=HUB_ID, url=f"https://huggingface.co/{HUB_ID}",
            code="mlfoundations/open_clip src/open_clip/{model.py,timm_model.py,hf_model.py,factory.py,tokenizer.py}; "
                 "HF model card",
            differs="",
            options={"prompt_prefix": PROMPT_PREFIX, "context_length": CONTEXT_LENGTH, "tokenizer_file": "vocab.txt"},
        ),
    }

    def build(self) -> None:
        """Build CustomTextCLIP offline; load the open_clip checkpoint strictly unless ``--weights random``."""
        from retbench.text_tokenizers import stand_in_tokenizer, wordpiece_tokenizer

        checkpoint = vocab = None
        if not self.random_init:  # find both files before the (slow) build, so a missing one fails fast
            checkpoint, vocab = self.weights_file(), self._tokenizer_file()
        rng = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            self.model = build_biomedclip()
        finally:
            torch.random.set_rng_state(rng)
        if checkpoint is None or vocab is None:
            self.tokenizer = stand_in_tokenizer(BERT_CONFIG["vocab_size"], CONTEXT_LENGTH)
        else:
            self.tokenizer = wordpiece_tokenizer(vocab, lowercase=True, max_length=CONTEXT_LENGTH)
            state = load_state_dict(checkpoint)
            for key in DROPPED_KEYS:
                state.pop(key, None)
            check_keys(state, self.model.state_dict(), checkpoint)
            self.model.load_state_dict(state, strict=True)
            del state
        self.model.eval().to(self.device)

    def _tokenizer_file(self) -> Path:
        """``vocab.txt`` beside an explicit ``--weights`` file/folder, else under RETBENCH_WEIGHTS or the hub cache."""
        name = self.tag.options["tokenizer_file"]
        if self.weights:
            given = Path(self.weights).expanduser()
            beside = (given if given.is_dir() else given.parent) / name
            if beside.is_file():
                return beside
        subdirs = (self.family, f"{self.family}.{self.tag.name}")
        try:
            return resolve_file(self.name, name, hub_id=self.tag.hub_id, url=self.tag.url, what="tokenizer", subdirs=subdirs)
        except WeightsMissingError as missing:
            try:  # open_clip itself takes the tokenizer from the text model's repo (hf_tokenizer_name)
                return resolve_file(self.name, name, hub_id=TEXT_HUB_ID, what="tokenizer", subdirs=subdirs)
            except WeightsMissingError:
                raise missing from None

    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """open_clip ``encode_image``: the projected 512-d embedding (unnormalised)."""
        return self.model.encode_image(pixels)

    def encode_image_joint(self, pixels: torch.Tensor) -> torch.Tensor:
        """The same 512-d embedding (it already lives in the image-text space)."""
        return self.model.encode_image(pixels)

    def tokenize(self, texts: list[str]) -> torch.Tensor:
        """Token ids as open_clip's HFTokenizer makes them: whitespace-normalised, padded to 256."""
        cleaned = [" ".join(str(t).split()) for t in texts]
        out = self.tokenizer(cleaned, max_length=CONTEXT_LENGTH, padding="max_length", truncation=True, return_tensors="pt")
        return out["input_ids"].to(self.device)

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """open_clip ``encode_text``: CLS of the last hidden state → MLP projection (512-d, unnormalised)."""
        return self.model.encode_text(self.tokenize(texts))

    def zero_shot_setup(self, spec: TaskSpec) -> ZeroShotSetup:
        """Model card: ``"this is a photo of " + class name``, one prompt per class, scale ``exp(logit_scale)``."""
        prompts = [[PROMPT_PREFIX + c.name] for c in spec.classes]
        return ZeroShotSetup(prompts, renormalize=True, logit_scale=float(self.model.logit_scale.detach().exp()))
