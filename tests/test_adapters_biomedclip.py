"""BiomedCLIP: an open_clip-format checkpoint loads through the adapter and matches open_clip itself.

The release (HF microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224) is reproduced at
full size with random weights: open_clip's CustomTextCLIP is built here from the release's
model config (text config written locally, as the BiomedBERT hub repo holds it), its state
dict is saved as ``open_clip_pytorch_model.bin`` (a pickled dict, with the
``position_ids`` buffer older transformers saved) beside a BERT-uncased ``vocab.txt``; the
reference outputs come from open_clip's own ``load_checkpoint`` and ``HFTokenizer``.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from retbench.adapters import load_model
from retbench.preprocess import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess
from retbench.text_tokenizers import minilm_dir
from retbench.weights import WeightsMissingError

FILE = "open_clip_pytorch_model.bin"
TEXTS = ["this is a photo of diabetic retinopathy", "  This is a photo of   GLAUCOMA  ", "this is a photo of normal"]
LOGIT_SCALE = math.log(42.0)
# the release's open_clip_config.json (model_cfg) and microsoft/BiomedNLP-BiomedBERT-base-uncased-abstract's config.json
RELEASE_MODEL_CFG = {
    "embed_dim": 512,
    "vision_cfg": {"timm_model_name": "vit_base_patch16_224", "timm_model_pretrained": False, "timm_pool": "",
                   "timm_proj": "linear", "image_size": 224},
    "text_cfg": {"hf_proj_type": "mlp", "hf_pooler_type": "cls_last_hidden_state_pooler", "context_length": 256},
}
BIOMEDBERT_CONFIG = {
    "architectures": ["BertForMaskedLM"], "model_type": "bert", "attention_probs_dropout_prob": 0.1,
    "hidden_act": "gelu", "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02,
    "intermediate_size": 3072, "layer_norm_eps": 1e-12, "max_position_embeddings": 512, "num_attention_heads": 12,
    "num_hidden_layers": 12, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": 30522,
}


@pytest.fixture(scope="module")
def release(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Release files in a folder plus open_clip's own outputs on one image and three prompts."""
    from open_clip.factory import load_checkpoint
    from open_clip.model import CustomTextCLIP
    from open_clip.tokenizer import HFTokenizer

    root = tmp_path_factory.mktemp("biomedclip")
    bert = root / "BiomedNLP-BiomedBERT-base-uncased-abstract"  # what open_clip would fetch from the hub
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps(BIOMEDBERT_CONFIG))
    (bert / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    vocab = (minilm_dir() / "vocab.txt").read_bytes()  # bert-base-uncased WordPiece, 30522 entries
    (bert / "vocab.txt").write_bytes(vocab)
    release = root / "release"
    release.mkdir()
    (release / "vocab.txt").write_bytes(vocab)

    torch.manual_seed(1)  # not the adapter's seed 0: equal outputs prove the checkpoint was loaded
    text_cfg = {**RELEASE_MODEL_CFG["text_cfg"], "hf_model_name": str(bert), "hf_tokenizer_name": str(bert),
                "hf_model_pretrained": False}
    ref = CustomTextCLIP(embed_dim=512, vision_cfg=RELEASE_MODEL_CFG["vision_cfg"], text_cfg=text_cfg).eval()
    state = OrderedDict((k, v.clone()) for k, v in ref.state_dict().items())
    state["logit_scale"] = torch.tensor(LOGIT_SCALE)
    state["text.transformer.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
    torch.save(state, release / FILE)
    del state
    load_checkpoint(ref, str(release / FILE), strict=True)  # open_clip's loader, as create_model_from_pretrained

    tokenizer = HFTokenizer(str(bert), context_length=256)
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ids = tokenizer(TEXTS)
        out = {"root": root, "dir": release, "image": image, "ids": ids,
               "image_emb": ref.encode_image(image), "text_emb": ref.encode_text(ids),
               "sha": hashlib.sha256((release / FILE).read_bytes()).hexdigest()}
    del ref
    return out


def check_against_reference(model, release: dict) -> None:
    assert torch.equal(model.tokenize(TEXTS), release["ids"])
    with torch.inference_mode():
        torch.testing.assert_close(model.encode_image(release["image"]), release["image_emb"], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_image_joint(release["image"]), release["image_emb"], rtol=0, atol=1e-5)
        torch.testing.assert_close(model.encode_text(TEXTS), release["text_emb"], rtol=0, atol=1e-5)


def test_weights_file_matches_open_clip(release: dict) -> None:
    model = load_model("biomedclip.vitb16", weights=str(release["dir"] / FILE))
    check_against_reference(model, release)
    assert model.weights_path == release["dir"] / FILE
    assert model.weights_identity() == f"sha256:{release['sha']}"
    assert model.encode_image(release["image"]).shape == (1, 512)

    class Spec:  # the two fields zero_shot_setup reads
        classes = [type("C", (), {"name": n})() for n in ("diabetic retinopathy", "glaucoma")]

    setup = model.zero_shot_setup(Spec())
    assert setup.prompts == [["this is a photo of diabetic retinopathy"], ["this is a photo of glaucoma"]]
    assert setup.logit_scale == pytest.approx(42.0, rel=1e-5)


def test_retbench_weights_env(release: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    """$RETBENCH_WEIGHTS/biomedclip/ holds the checkpoint and vocab.txt; the identity is the checkpoint's sha."""
    env = release["root"] / "weights"
    (env / "biomedclip").mkdir(parents=True)
    for name in (FILE, "vocab.txt"):
        (env / "biomedclip" / name).symlink_to(release["dir"] / name)
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(env))
    model = load_model("biomedclip")
    assert model.name == "biomedclip.vitb16"
    check_against_reference(model, release)
    assert model.weights_path.name == FILE
    assert model.weights_identity() == f"sha256:{release['sha']}"


def test_tag_facts() -> None:
    from retbench.model_adapters.biomedclip import BiomedClipAdapter

    tag = BiomedClipAdapter.tags["vitb16"]
    assert tag.preprocess == Preprocess(size=224, resize="resize_crop", interpolation="bicubic", crop_pct=1.0,
                                        mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)
    assert tag.filename == FILE and tag.hub_id == "microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert tag.licence.startswith("MIT") and BiomedClipAdapter.has_text


def test_missing_checkpoint_names_file_and_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setattr("retbench.weights._hub_file", lambda hub_id, filename: None)  # nothing in the hub cache
    with pytest.raises(WeightsMissingError) as err:
        load_model("biomedclip")
    msg = str(err.value)
    assert FILE in msg and "huggingface.co/microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224" in msg
    assert str(tmp_path) in msg and "\n" not in msg


def test_missing_vocab_is_named(release: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    only_ckpt = tmp_path / "ckpt"
    only_ckpt.mkdir()
    (only_ckpt / FILE).symlink_to(release["dir"] / FILE)
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(tmp_path / "empty"))
    monkeypatch.setattr("retbench.weights._hub_file", lambda hub_id, filename: None)
    with pytest.raises(WeightsMissingError, match="tokenizer 'vocab.txt'"):
        load_model("biomedclip", weights=str(only_ckpt / FILE))
