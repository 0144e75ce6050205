"""FLAIR (family ``flair``): the ResNet-50 + Bio_ClinicalBERT retina language-image model.

Silva-Rodriguez et al., "A Foundation Language-Image Model of the Retina (FLAIR): encoding expert
knowledge in text supervision", Medical Image Analysis 99, 2025. Code and weights: Apache-2.0
(github.com/jusiro/FLAIR, README "License").

What is reproduced, and where each convention comes from (all in github.com/jusiro/FLAIR):

- Architecture (``flair/modeling/model.py``: ``FLAIRModel``, ``VisionModel``, ``TextModel``,
  ``ProjectionLayer``). Vision: torchvision ResNet-50 with ``fc`` replaced by Identity, i.e. the
  2048-d global-average-pooled feature. Text: a BERT built from ``emilyalsentzer/Bio_ClinicalBERT``
  (with its pooler, unused). Its text embedding averages hidden states 1, 2 and the last one over
  *every* token position (padding included: no attention mask enters the mean). Projection heads
  L2-normalise their input, apply ``Linear(->512, bias=False)`` and L2-normalise again.
  ``logit_scale`` is a learned log-temperature. The modules here carry the same attribute names,
  so ``FLAIRModel.state_dict()`` loads strictly.
- The BERT config is written out here (no hub access): the ``config.json`` of the hub repo
  ``emilyalsentzer/Bio_ClinicalBERT`` (bert-base-cased geometry, vocab 28996, 12x768, 512 positions,
  LayerNorm eps 1e-12).
- Tokenizer: ``AutoTokenizer.from_pretrained("emilyalsentzer/Bio_ClinicalBERT")`` with
  ``model_max_length = 77``, truncation and padding to the longest text of the call. That hub repo
  ships ``vocab.txt`` but no ``tokenizer_config.json``, so the tokenizer FLAIR ran **lower-cases**
  its input (BERT's default; EmilyAlsentzer/clinicalBERT issue #26 shows the lower-cased output,
  and tokenizer configs saved from it read ``do_lower_case: true``). Reproduced here:
  ``lowercase=True`` on the same vocabulary.
- Weights: the Hugging Face repo ``jusiro2/FLAIR`` (``model.safetensors``, written by
  ``PyTorchModelHubMixin`` = the state dict). The older Google Drive release (``flair_resnet.pth``
  inside ``weights.zip``; ``documents/FAQ.md``, the README "Note" until 2025-11) is the same state
  dict as a plain ``torch.save``; it may carry ``text_model.model.embeddings.position_ids`` (saved
  by transformers < 4.31), which is dropped. Pass it with ``--weights flair_resnet.pth``.
- Preprocessing (``flair/pretraining/data/transforms.py``: ``LoadImage``, ``ImageScaling``;
  ``FLAIRModel.preprocess_image``): RGB scaled to [0, 1] with no mean/std normalisation; the long
  side resized to 512 keeping the aspect ratio, zero-padded at the bottom/right onto a 512x512
  canvas (square images: plain resize). FLAIR resizes the float tensor with torchvision ``Resize``,
  which antialiases tensors by default from torchvision 0.17 (README "Install FLAIR" installs 0.21
  since 2025-11-21; ``FLAIRModel.preprocess_image`` passes ``antialias=True`` since commit 04c2fd5);
  retbench resizes with PIL's antialiased bilinear on uint8 (the tag's ``differs``). The optional
  foreground crop (``--crop_foreground``, default True in ``main_transferability.py`` since
  2025-04) is off by default here: the published numbers applied it to MESSIDOR only (FLAIR
  issue #7: zero-shot ACA 0.490 without vs 0.604 with), so tasks that need it say
  ``fundus_crop: true`` and get FLAIR's own method (``li_red``).
- Linear-probe feature. Two tags, one per path through ``main_transferability.py`` (read at
  jusiro/FLAIR d6652d5, 2025-11-27), both with the README "Linear Probing" flags
  ``--method lp --shots_train 80% --shots_test 20% --project_features False --norm_features False``:

  * ``flair`` / ``flair.default`` -- the raw 2048-d ResNet-50 feature. ``process()`` builds
    ``FLAIRModel(from_checkpoint=..., weights_path=..., projection=args.project_features,
    norm_features=args.norm_features)`` whenever ``--weights_path`` is given, so ``VisionModel``'s
    ``ProjectionLayer`` has ``apply_projection=False`` and returns its input unchanged
    (``flair/modeling/model.py``). Every ``main_transferability.py`` before 2025-11-21 (commit
    6ba87e9) built the model this way for every run: the paper's setting.
  * ``flair.projected`` -- the 512-d projected, L2-normalised feature. Since 2025-11-21,
    ``--load_weights True`` without ``--weights_path`` (the README's command as written) takes
    ``FLAIRModel.from_pretrained("jusiro2/FLAIR")``, which builds the model with its stored init
    arguments, then sets ``model.project_features`` / ``model.norm_features`` -- attributes nothing
    reads (``ProjectionLayer`` copied ``projection``/``norm`` at construction). The projection stays
    on: the README's own ``model(image, text)`` example multiplies image by text embeddings, which
    only share a width (512) with projection on. Normalisation on is ``FLAIRModel``'s default
    (``norm_features=True``); the hub ``config.json`` itself was not read here.
- Zero-shot (``flair/transferability/modeling/adapters.py``: ``ZeroShot``;
  ``FLAIRModel.compute_text_embeddings``; README "Zero-shot": ``--domain_knowledge True``): image
  embeddings projected and normalised; per class, the expert descriptions (the task's prompts,
  which are FLAIR's ``flair/modeling/dictionary.py`` entries) plus the class name itself when absent
  (except for class names containing "myopic maculopathy"), each put in the caption
  "A fundus photograph of <description>"; the descriptions of one class are tokenised together,
  padded to the longest among them, embedded (projected + normalised) and averaged **without**
  renormalisation; logits = ``exp(logit_scale)`` x similarity (the zero-shot code does not clamp
  the scale; training clamps it to [0, 4.6052] before every step).

Text batching: because padding positions enter FLAIR's mean, a text's embedding depends on the
other texts padded with it. :meth:`FlairAdapter.encode_class_prompts` therefore reproduces FLAIR's
per-class batches for zero-shot (``ZeroShotSetup.encode_class``); any other list is embedded one
text at a time, without padding, so each text's embedding does not depend on its neighbours.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from retbench.adapters import Adapter, WeightsTag, ZeroShotSetup, register_adapter
from retbench.errors import RetbenchError
from retbench.preprocess import Preprocess
from retbench.weights import load_state_dict

if TYPE_CHECKING:
    from retbench.spec import TaskSpec

# config.json of huggingface.co/emilyalsentzer/Bio_ClinicalBERT (the text encoder FLAIR fine-tuned)
BIO_CLINICALBERT_CONFIG: dict[str, Any] = {
    "vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
    "intermediate_size": 3072, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
    "attention_probs_dropout_prob": 0.1, "max_position_embeddings": 512, "type_vocab_size": 2,
    "initializer_range": 0.02, "layer_norm_eps": 1e-12, "pad_token_id": 0,
}
TOKENIZER_HUB_ID = "emilyalsentzer/Bio_ClinicalBERT"
CONTEXT_LENGTH = 77  # TextModel: tokenizer.model_max_length = 77
CAPTION = "A fundus photograph of {}"  # FLAIRModel(caption="A fundus photograph of [CLS]")
PROJ_DIM = 512
# buffers older transformers saved with BertEmbeddings; current ones register them non-persistent
_LEGACY_BUFFERS = ("text_model.model.embeddings.position_ids", "text_model.model.embeddings.token_type_ids")


class ProjectionHead(nn.Module):
    """FLAIR's ``ProjectionLayer`` with projection and normalisation on: L2-norm, Linear, L2-norm."""

    def __init__(self, dim_in: int, dim_out: int = PROJ_DIM) -> None:
        super().__init__()
        self.projection = nn.Linear(dim_in, dim_out, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Project ``x`` (B, dim_in) into the joint space, unit length."""
        return F.normalize(self.projection(F.normalize(x, dim=-1)), dim=-1)


class FlairVision(nn.Module):
    """``VisionModel``: torchvision ResNet-50 (``fc`` = Identity) and the vision projection head."""

    def __init__(self) -> None:
        super().__init__()
        import torchvision

        self.model = torchvision.models.resnet50(weights=None)
        self.model.fc = nn.Identity()
        self.projection_head_vision = ProjectionHead(2048)


class FlairText(nn.Module):
    """``TextModel``: Bio_ClinicalBERT (with pooler) and the text projection head."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(**BIO_CLINICALBERT_CONFIG, output_hidden_states=True)
        self.model = BertModel(config, add_pooling_layer=True)
        self.projection_head_text = ProjectionHead(config.hidden_size)

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean over all positions (padding included) of hidden states 1, 2 and last, averaged."""
        hidden = self.model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True).hidden_states
        return torch.stack([hidden[1], hidden[2], hidden[-1]], dim=1).mean(dim=2).mean(dim=1)


class FlairNet(nn.Module):
    """``FLAIRModel``'s parameters: ``vision_model``, ``text_model`` and ``logit_scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.vision_model = FlairVision()
        self.text_model = FlairText()
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))


def load_flair_state(net: FlairNet, path: str) -> None:
    """Load a FLAIR state dict (safetensors or ``torch.save``) strictly, legacy buffers dropped."""
    state = load_state_dict(path)
    own = net.state_dict()
    state = {k: v for k, v in state.items() if not (k in _LEGACY_BUFFERS and k not in own)}
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise RetbenchError(
            f"{path}: not a FLAIR state dict ({len(missing)} missing, e.g. {missing[:2]}; "
            f"{len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    net.load_state_dict(state, strict=True)


SOURCE = "hf:jusiro2/FLAIR (FLAIR ResNet-50 + Bio_ClinicalBERT, MedIA 2025)"
PRE = Preprocess(size=512, resize="pad_canvas", interpolation="bilinear", mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0),
                 fundus_crop="none")
LEGACY = {"legacy_filename": "flair_resnet.pth",
          "legacy_url": "https://drive.google.com/file/d/1l24_2IzwQdnaa034I0zcyDLs_zMujsbR"}
DIFFERS = (
    "Images are resized with PIL bilinear (antialiased) on uint8 and rounded to uint8 before scaling to [0, 1]; "
    "FLAIR resizes the float [0, 1] tensor with torchvision Resize. With the torchvision its README now installs "
    "(0.21, whose Resize antialiases tensors by default; FLAIRModel.preprocess_image also passes antialias=True) "
    "the two agree to one uint8 level (max |diff| 1/255, mean 0.0009 on FLAIR's 1024x683 sample). The paper-era "
    "installs (torchvision 0.14 in the 2023 requirements.txt, 0.15.2 in the README until 2025-11) did not "
    "antialias tensors in the data loader: mean |diff| 0.0016, max 0.020 on that sample (0.0015 and 0.13 on "
    "its 796x772 one). The foreground crop is off unless a task asks for it (FLAIR's CLI crops every dataset since "
    "2025-04; its published numbers cropped MESSIDOR only). Texts outside zero-shot are embedded one at a time "
    "(no padding); FLAIR pads each call's texts together."
)
COMMON: dict[str, Any] = {
    "licence": "Apache-2.0 (code and weights)",
    "paper": "Silva-Rodriguez et al., Medical Image Analysis 99:103357, 2025 (arXiv:2308.07898)",
    "filename": "model.safetensors", "hub_id": "jusiro2/FLAIR", "url": "https://huggingface.co/jusiro2/FLAIR",
    "code": "github.com/jusiro/FLAIR: flair/modeling/model.py, flair/pretraining/data/transforms.py, "
            "flair/transferability/modeling/adapters.py, main_transferability.py",
    "differs": DIFFERS,
}


@register_adapter
class FlairAdapter(Adapter):
    """FLAIR: raw (or, tag ``projected``, projected) ResNet-50 features for probes; projected embeddings for zero-shot."""

    family = "flair"
    autocast_dtype = None
    has_text = True
    channels_last = True
    fundus_crop_method = "li_red"
    tags: ClassVar[dict[str, WeightsTag]] = {
        "default": WeightsTag(
            "default", SOURCE, PRE,
            feature="ResNet-50 global-average-pooled feature, un-projected (2048-d; the paper's linear probe: "
                    "main_transferability.py --method lp --project_features False --norm_features False with "
                    "--weights_path, and every version before 2025-11-21); joint space: projected + "
                    "L2-normalised (512-d)",
            description="FLAIR, trained on 37 public fundus datasets with expert-knowledge text prompts. The legacy "
                        "Google Drive file flair_resnet.pth (same state dict) also loads with --weights.",
            options={"probe_feature": "raw", **LEGACY},
            **COMMON,
        ),
        "projected": WeightsTag(
            "projected", SOURCE, PRE,
            feature="projection head output, L2-normalised (512-d; the README's linear-probe command as run since "
                    "2025-11-21: main_transferability.py --method lp --load_weights True --project_features False "
                    "--norm_features False without --weights_path loads from_pretrained('jusiro2/FLAIR'), whose "
                    "projection stays on); joint space: the same",
            description="FLAIR with the probe feature its current README command yields; same weights as the "
                        "default tag (the paper's raw 2048-d feature).",
            options={"probe_feature": "projected", **LEGACY},
            **COMMON,
        ),
    }

    def build(self) -> None:
        """The FLAIR modules on ``self.device``: seeded random init, or the released state dict."""
        if self.random_init:
            from retbench.text_tokenizers import stand_in_tokenizer

            self.tokenizer = stand_in_tokenizer(BIO_CLINICALBERT_CONFIG["vocab_size"], CONTEXT_LENGTH, lowercase=True)
        else:  # find both files before building anything: a missing one fails fast
            path = self.weights_file()
            self.tokenizer = self._release_tokenizer()
        state = torch.random.get_rng_state()
        torch.manual_seed(0)
        try:
            self.net = FlairNet()
        finally:
            torch.random.set_rng_state(state)
        if not self.random_init:
            load_flair_state(self.net, str(path))
        self.net.eval().to(self.device)

    def _release_tokenizer(self) -> Any:
        """Bio_ClinicalBERT's WordPiece vocabulary, lower-casing as FLAIR's AutoTokenizer did."""
        from retbench.text_tokenizers import wordpiece_tokenizer

        # vocab.txt beside a --weights checkpoint wins; then RETBENCH_WEIGHTS, the hub cache of Bio_ClinicalBERT
        vocab = self.weights_file("vocab.txt", what="tokenizer", hub_id=TOKENIZER_HUB_ID,
                                  url=f"https://huggingface.co/{TOKENIZER_HUB_ID}")
        return wordpiece_tokenizer(vocab, lowercase=True, max_length=CONTEXT_LENGTH)

    @torch.inference_mode()
    def encode_image(self, pixels: torch.Tensor) -> torch.Tensor:
        """The probe feature: raw 2048-d ResNet-50 (``default``) or projected + L2-normalised 512-d (``projected``)."""
        if self.tag.options["probe_feature"] == "projected":
            return self.encode_image_joint(pixels)
        return self.net.vision_model.model(pixels).float()

    @torch.inference_mode()
    def encode_image_joint(self, pixels: torch.Tensor) -> torch.Tensor:
        """Projected, L2-normalised 512-d image embeddings."""
        return self.net.vision_model.projection_head_vision(self.net.vision_model.model(pixels)).float()

    @torch.inference_mode()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Projected, L2-normalised 512-d text embeddings, one text at a time (no padding enters the mean).

        Zero-shot class prompts are instead embedded class by class, padded to the class's
        longest prompt as FLAIR does (:meth:`encode_class_prompts`).
        """
        out = [self._embed_batch([t]) for t in texts]
        return torch.cat(out) if out else torch.empty(0, PROJ_DIM, device=self.device)

    @torch.inference_mode()
    def encode_class_prompts(self, texts: list[str]) -> np.ndarray:
        """One class's prompts tokenised together (padding to the longest, inside the mean), as FLAIR does."""
        return self._embed_batch(list(texts)).cpu().numpy()

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        tokens = self.tokenizer(texts, truncation=True, max_length=CONTEXT_LENGTH, padding=True, return_tensors="pt")
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        text = self.net.text_model
        return text.projection_head_text(text.embed(ids, mask)).float()

    def zero_shot_setup(self, spec: TaskSpec) -> ZeroShotSetup:
        """FLAIR's domain-knowledge zero-shot: descriptions (+ class name) in its caption, no renormalisation."""
        prompts = [[CAPTION.format(d) for d in flair_descriptions(c.name, c.prompts)] for c in spec.classes]
        scale = float(self.net.logit_scale.detach().float().exp())
        return ZeroShotSetup(prompts, renormalize=False, logit_scale=scale, encode_class=self.encode_class_prompts)


def flair_descriptions(class_name: str, descriptions: tuple[str, ...] | list[str]) -> list[str]:
    """A class's texts as ``compute_text_embeddings`` builds them: descriptions, then the name if absent.

    FLAIR does not append names containing "myopic maculopathy" (MMAC's grade names carry no meaning).
    """
    out = list(descriptions) or [class_name]
    if class_name not in out and "myopic maculopathy" not in class_name:
        out.append(class_name)
    return out

