"""CLIP-family adapters (clip, open_clip, hf_clip, eyeclip) against the releases' own files and code.

Every round trip builds the official architecture at full size with weights drawn from a
seed the adapter does not use, writes them in the release's file format and key layout,
loads them through the adapter (``--weights`` or ``$RETBENCH_WEIGHTS``) and checks the
outputs against the reference model computed directly with open_clip / transformers.
"""

from __future__ import annotations

import copy
import gc
import json
import pickle
import warnings
import zipfile
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from retbench.model_adapters.clip import ClipAdapter, load_strict, read_torchscript_state_dict
from safetensors.torch import save_file

from retbench.adapters import load_model, weights_to_read
from retbench.errors import RetbenchError
from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, Preprocess, normalize
from retbench.spec import parse_spec
from retbench.weights import WeightsMissingError

TEXTS = ["a fundus photograph of glaucoma", "healthy retina"]
CLIP_TAGS = {"vit-b-32": "ViT-B-32", "vit-b-16": "ViT-B-16", "vit-l-14": "ViT-L-14"}
CLIP_PRE = Preprocess(size=224, resize="resize_crop", interpolation="bicubic", crop_pct=1.0,
                      mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD)


@pytest.fixture
def offline(tmp_path, monkeypatch):
    """Empty RETBENCH_WEIGHTS, an empty Hugging Face cache, offline, no open_clip download cache."""
    root = tmp_path / "weights"
    root.mkdir()
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(root))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip of open_clip's URL downloads
    return root


def pixels(size: int = 224) -> torch.Tensor:
    return torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(size))


def reference(arch: str, quick_gelu: bool = True, seed: int = 123) -> torch.nn.Module:
    """The open_clip model built directly, with weights the adapter's seed 0 would not give."""
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return open_clip.create_model(arch, pretrained=None, force_quick_gelu=quick_gelu).eval()


@torch.no_grad()
def outputs(model: torch.nn.Module, arch: str, size: int = 224) -> tuple[torch.Tensor, torch.Tensor]:
    return model.encode_image(pixels(size)), model.encode_text(open_clip.get_tokenizer(arch)(TEXTS))


def assert_same(adapter, image_ref: torch.Tensor, text_ref: torch.Tensor, joint: bool = False) -> None:
    x = pixels(adapter.preprocess.size)
    torch.testing.assert_close(adapter.encode_image(x), image_ref, rtol=0, atol=1e-6)
    if joint:
        torch.testing.assert_close(adapter.encode_image_joint(x), image_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapter.encode_text(TEXTS), text_ref, rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def b32():
    """One reference OpenAI-layout ViT-B/32 (QuickGELU) for the tests that need it; copy before changing it."""
    model = reference("ViT-B-32")
    yield model
    del model
    gc.collect()


# --- clip: preprocessing and provenance against open_clip's pretrained table -----------------

@pytest.mark.parametrize("tag", sorted(CLIP_TAGS))
def test_clip_tag_matches_open_clip_openai_entry(tag):
    arch = CLIP_TAGS[tag]
    pcfg = open_clip.pretrained.get_pretrained_cfg(arch, "openai")
    t = ClipAdapter.tags[tag]
    assert t.preprocess == CLIP_PRE
    assert (pcfg["mean"], pcfg["std"], pcfg["interpolation"], pcfg["resize_mode"]) == \
        (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, "bicubic", "shortest")
    assert open_clip.get_model_config(arch)["vision_cfg"]["image_size"] == 224
    assert pcfg["quick_gelu"] and t.options["quick_gelu"]
    assert t.hub_id == pcfg["hf_hub"].rstrip("/") and t.filename == "open_clip_model.safetensors"
    assert t.options["legacy_url"] == pcfg["url"] and t.options["legacy_file"] == f"{arch}.pt"


def test_clip_conventions_agree_across_open_clip_and_transformers():
    from retbench.model_adapters.hf_clip import processor_preprocess
    from transformers import CLIPImageProcessor

    assert OPENAI_CLIP_MEAN == (0.48145466, 0.4578275, 0.40821073) and OPENAI_CLIP_STD == (0.26862954, 0.26130258, 0.27577711)
    # transformers' CLIPImageProcessor defaults are OpenAI's (shortest edge 224, crop 224, bicubic, CLIP mean/std)
    assert processor_preprocess(CLIPImageProcessor().to_dict()) == CLIP_PRE


# --- clip: full-size round trips ------------------------------------------------------------

def test_clip_b32_open_clip_safetensors_via_env(offline, b32):
    image_ref, text_ref = outputs(b32, "ViT-B-32")
    hub_dir = offline / "timm/vit_base_patch32_clip_224.openai"
    hub_dir.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in b32.state_dict().items()}, hub_dir / "open_clip_model.safetensors")
    adapter = load_model("clip")  # $RETBENCH_WEIGHTS/<hub id>/open_clip_model.safetensors
    assert adapter.name == "clip.vit-b-32" and adapter.weights_path == hub_dir / "open_clip_model.safetensors"
    assert weights_to_read("clip", None) == adapter.weights_path  # found without building (result identity check)
    assert adapter.describe()["weights_identity"].startswith("sha256:")
    assert_same(adapter, image_ref, text_ref, joint=True)


def test_clip_b16_explicit_file(tmp_path, offline):
    ref = reference("ViT-B-16")
    image_ref, text_ref = outputs(ref, "ViT-B-16")
    path = tmp_path / "open_clip_model.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)
    del ref
    gc.collect()
    assert_same(load_model("clip.vit-b-16", weights=str(path)), image_ref, text_ref)


def test_clip_l14_via_family_tag_folder(offline):
    ref = reference("ViT-L-14")
    image_ref, text_ref = outputs(ref, "ViT-L-14")
    (offline / "clip.vit-l-14").mkdir()
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, offline / "clip.vit-l-14" / "open_clip_model.safetensors")
    del ref
    gc.collect()
    adapter = load_model("clip.vit-l-14")
    assert weights_to_read("clip.vit-l-14", None) == adapter.weights_path
    assert image_ref.shape == (1, 768) and text_ref.shape == (2, 768)
    assert_same(adapter, image_ref, text_ref)
    del adapter
    gc.collect()


def test_clip_reads_openai_torchscript_archive_without_running_it(offline, b32):
    ref = copy.deepcopy(b32).half()  # OpenAI's archives hold fp16 weights
    ref.register_buffer("input_resolution", torch.tensor(224))  # a non-parameter key of those archives
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            scripted = torch.jit.script(ref)
        except Exception as exc:  # noqa: BLE001 - TorchScript may be gone from a future torch
            pytest.skip(f"torch.jit.script unavailable: {exc}")
        torch.jit.save(scripted, str(offline / "ViT-B-32.pt"))
    with pytest.raises(RuntimeError, match="TorchScript"):
        torch.load(offline / "ViT-B-32.pt", weights_only=True)  # why retbench reads these archives itself
    state = read_torchscript_state_dict(offline / "ViT-B-32.pt")
    expected = scripted.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in expected)
    assert state["visual.proj"].dtype == torch.float16
    del ref._buffers["input_resolution"]
    image_ref, text_ref = outputs(ref.float(), "ViT-B-32")
    del ref, scripted, expected, state
    gc.collect()
    adapter = load_model("clip")  # found under its legacy name ViT-B-32.pt
    assert adapter.weights_path.name == "ViT-B-32.pt"
    assert_same(adapter, image_ref, text_ref)


class _Payload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_torchscript_reader_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", pickle.dumps({"w": _Payload(marker)}, protocol=2))
        archive.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
    with pytest.raises(RetbenchError, match="refusing to load global"):
        read_torchscript_state_dict(path)
    assert not marker.exists()


def test_missing_clip_weights_name_file_and_where(offline):
    with pytest.raises(WeightsMissingError) as info:
        load_model("clip.vit-b-32")
    msg = str(info.value)
    assert "\n" not in msg and "open_clip_model.safetensors" in msg
    assert "https://huggingface.co/timm/vit_base_patch32_clip_224.openai" in msg and "ViT-B-32.pt" in msg
    with pytest.raises(RetbenchError, match="weights file not found"):
        load_model("clip.vit-b-32", weights=str(offline / "nope.safetensors"))


def test_load_strict_reports_missing_unexpected_and_shapes():
    net = torch.nn.Linear(3, 2)
    with pytest.raises(RetbenchError, match=r"1 missing \(e\.g\. bias\).*1 unexpected \(e\.g\. extra\)"):
        load_strict(net, {"weight": torch.zeros(2, 3), "extra": torch.zeros(1)}, "ckpt")
    with pytest.raises(RetbenchError, match="another shape"):
        load_strict(net, {"weight": torch.zeros(3, 3), "bias": torch.zeros(2)}, "ckpt")


# --- eyeclip --------------------------------------------------------------------------------

def eyeclip_decoder_state() -> dict[str, torch.Tensor]:
    """``visual.decoder.*`` as EyeCLIP's MAE_decoder(patch_size=32) names and shapes them (timm Blocks)."""
    from timm.models.vision_transformer import Block

    dec = {"decoder_embed.weight": torch.randn(512, 768), "decoder_embed.bias": torch.zeros(512),
           "mask_token": torch.zeros(1, 1, 512), "decoder_pos_embed": torch.zeros(1, 50, 512),
           "decoder_norm.weight": torch.ones(512), "decoder_norm.bias": torch.zeros(512),
           "decoder_pred.weight": torch.randn(32 * 32 * 3, 512), "decoder_pred.bias": torch.zeros(32 * 32 * 3)}
    block = Block(512, 16, 4.0, qkv_bias=True).state_dict()
    for i in range(8):
        dec.update({f"decoder_blocks.{i}.{k}": v for k, v in block.items()})
    return {f"visual.decoder.{k}": v.half() for k, v in dec.items()}


def to_openai_fp16(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """OpenAI ``convert_weights``: linear/conv/attention weights and the two projections in fp16, the rest fp32."""
    half = ("in_proj_weight", "in_proj_bias", "out_proj.weight", "out_proj.bias", "c_fc.weight", "c_fc.bias",
            "c_proj.weight", "c_proj.bias", "conv1.weight")
    return {k: v.half() if k.endswith(half) or k in ("visual.proj", "text_projection") else v for k, v in state.items()}


def test_eyeclip_training_checkpoint_round_trip(tmp_path, offline, tiny_task, b32):
    ref = copy.deepcopy(b32)
    state = to_openai_fp16(ref.state_dict())
    ref.load_state_dict(state)  # the reference holds the fp16-rounded weights, cast to fp32
    image_ref, text_ref = outputs(ref, "ViT-B-32")
    param = torch.nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([param], lr=1e-4, betas=(0.9, 0.95))
    param.grad = torch.ones(4)
    opt.step()
    ckpt = {"epoch": "3_1000", "model_state_dict": {**state, **eyeclip_decoder_state()},
            "optimizer_state_dict": opt.state_dict(), "loss": 0.4321}
    (offline / "eyeclip").mkdir()
    path = offline / "eyeclip" / "eyeclip_visual.pt"
    torch.save(ckpt, path)
    assert "visual.decoder.decoder_blocks.7.mlp.fc2.weight" in torch.load(path, weights_only=True)["model_state_dict"]
    plain = tmp_path / "plain" / "eyeclip_visual.pt"  # the plain state-dict layout some loaders assume
    plain.parent.mkdir()
    torch.save(ckpt["model_state_dict"], plain)
    del ref, state, ckpt
    gc.collect()

    adapter = load_model("eyeclip")
    assert adapter.weights_path == path
    assert_same(adapter, image_ref, text_ref)
    spec = parse_spec(tiny_task[0])
    setup = adapter.zero_shot_setup(spec)
    assert setup.prompts == [["red"], ["green"], ["blue"]] and setup.logit_scale == 100.0
    del adapter
    gc.collect()
    adapter = load_model("eyeclip.ft-transform", weights=str(plain.parent))
    assert_same(adapter, image_ref, text_ref)


def test_eyeclip_preprocessing_tags():
    from retbench.model_adapters.eyeclip import EyeClipAdapter

    assert EyeClipAdapter.tags["default"].preprocess == CLIP_PRE
    ft = EyeClipAdapter.tags["ft-transform"]
    assert ft.preprocess == Preprocess(size=224, resize="resize_crop", interpolation="bicubic", crop_pct=224 / 256,
                                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert ft.differs and not EyeClipAdapter.tags["default"].differs
    assert "#10" in EyeClipAdapter.tags["default"].description


def test_missing_eyeclip_weights_name_file_and_where(offline):
    with pytest.raises(WeightsMissingError) as info:
        load_model("eyeclip")
    assert "eyeclip_visual.pt" in str(info.value) and "drive.google.com" in str(info.value)


# --- open_clip ------------------------------------------------------------------------------

def test_open_clip_tag_preprocessing_follows_pretrained_config():
    from retbench.model_adapters.open_clip_generic import OpenClipAdapter

    t = OpenClipAdapter.resolve_tag("ViT-B-16-SigLIP/webli")
    assert t.preprocess == Preprocess(size=224, resize="squash", interpolation="bicubic", mean=(0.5,) * 3, std=(0.5,) * 3)
    t = OpenClipAdapter.resolve_tag("RN50/openai")
    assert t.preprocess == CLIP_PRE and t.hub_id == "timm/resnet50_clip.openai" and t.options["quick_gelu"]
    assert t.options["legacy_file"] == "RN50.pt"
    with pytest.raises(RetbenchError, match="no pretrained tag 'nope'.*laion2b_s34b_b79k"):
        load_model("open_clip:ViT-B-32/nope")
    with pytest.raises(RetbenchError, match="open_clip has no model"):
        load_model("open_clip:NoSuchNet/openai")


def test_open_clip_laion_bin_round_trip_without_quick_gelu(offline):
    ref = reference("ViT-B-32", quick_gelu=False)  # laion2b_s34b_b79k was trained with plain GELU
    image_ref, text_ref = outputs(ref, "ViT-B-32")
    folder = offline / "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
    folder.mkdir(parents=True)
    torch.save(ref.state_dict(), folder / "open_clip_pytorch_model.bin")
    del ref
    gc.collect()
    adapter = load_model("open_clip:ViT-B-32/laion2b_s34b_b79k")
    assert adapter.weights_path == folder / "open_clip_pytorch_model.bin"
    assert_same(adapter, image_ref, text_ref)
    del adapter
    gc.collect()
    with pytest.raises(RetbenchError, match="no pretrained tag: pass --weights FILE"):
        load_model("open_clip:ViT-B-32")
    with pytest.raises(WeightsMissingError, match="open_clip_model.safetensors.*huggingface.co/timm/resnet50_clip.openai"):
        load_model("open_clip:RN50/openai")


# --- hf_clip --------------------------------------------------------------------------------

def write_clip_tokenizer(folder: Path) -> None:
    """A transformers CLIPTokenizer from the BPE merges bundled with open_clip (OpenAI's vocabulary)."""
    import gzip
    import inspect

    from open_clip.tokenizer import bytes_to_unicode, default_bpe
    from transformers import CLIPTokenizer

    with gzip.open(default_bpe()) as fh:
        merges = fh.read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    byte_chars = list(bytes_to_unicode().values())
    vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m.split()) for m in merges),
             "<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({v: i for i, v in enumerate(vocab)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    files = ("vocab", "merges") if "vocab" in inspect.signature(CLIPTokenizer.__init__).parameters else \
        ("vocab_file", "merges_file")
    CLIPTokenizer(**{files[0]: str(folder / "vocab.json"), files[1]: str(folder / "merges.txt")}).save_pretrained(folder)


@pytest.fixture(scope="module")
def tiny_hf_clip(tmp_path_factory):
    """A small CLIPModel saved with save_pretrained, its image processor config and a CLIP tokenizer."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    folder = tmp_path_factory.mktemp("tiny-clip")
    config = CLIPConfig(
        text_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4},
        vision_config={"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                       "patch_size": 16, "image_size": 64},
        projection_dim=32,
    )
    torch.manual_seed(7)
    model = CLIPModel(config).eval()
    model.save_pretrained(folder)
    processor = CLIPImageProcessor(size={"shortest_edge": 72}, crop_size={"height": 64, "width": 64}, resample=2,
                                   image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3])
    processor.save_pretrained(folder)
    write_clip_tokenizer(folder)
    return folder, model, processor


def hf_reference(model, folder: Path, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    enc = tok(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        img, txt = model.get_image_features(pixel_values=x), model.get_text_features(**enc)
    pooled = [t if isinstance(t, torch.Tensor) else t.pooler_output for t in (img, txt)]
    return pooled[0], pooled[1]


def test_hf_clip_local_folder_matches_clipmodel(tiny_hf_clip):
    folder, model, processor = tiny_hf_clip
    adapter = load_model(f"hf_clip:{folder}")
    assert weights_to_read(f"hf_clip:{folder}", None) == adapter.weights_path == folder / "model.safetensors"
    assert adapter.preprocess == Preprocess(size=64, resize="resize_crop", interpolation="bilinear", crop_pct=64 / 72,
                                            mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))
    # the harness's preprocessing reproduces CLIPImageProcessor's pixels (a smooth 150 x 100 image)
    yy, xx = np.mgrid[0:100, 0:150]
    img = Image.fromarray(np.stack([xx * 1.7, yy * 2.5, (xx + yy) * 0.9], -1).clip(0, 255).astype(np.uint8))
    expected = processor(images=img, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(normalize(adapter.preprocess.load(img).unsqueeze(0), adapter.preprocess), expected,
                               rtol=0, atol=1e-5)
    x = pixels(64)
    image_ref, text_ref = hf_reference(model, folder, x)
    torch.testing.assert_close(adapter.encode_image(x), image_ref, rtol=0, atol=1e-6)
    torch.testing.assert_close(adapter.encode_text(TEXTS), text_ref, rtol=0, atol=1e-6)


def test_hf_clip_hub_id_from_retbench_weights_and_explicit_folder(tiny_hf_clip, offline):
    import shutil

    folder, model, _ = tiny_hf_clip
    shutil.copytree(folder, offline / "org" / "tiny-clip")
    x = pixels(64)
    image_ref, text_ref = hf_reference(model, folder, x)
    for weights in (None, str(folder)):
        adapter = load_model("hf_clip:org/tiny-clip", weights=weights)
        assert adapter.preprocess.size == 64 and adapter.weights_path.name == "model.safetensors"
        assert weights_to_read("hf_clip:org/tiny-clip", weights) == adapter.weights_path
        torch.testing.assert_close(adapter.encode_image(x), image_ref, rtol=0, atol=1e-6)
        torch.testing.assert_close(adapter.encode_text(TEXTS), text_ref, rtol=0, atol=1e-6)
    with pytest.raises(WeightsMissingError, match="model.safetensors.*huggingface.co/org/absent"):
        load_model("hf_clip:org/absent")
    with pytest.raises(RetbenchError, match="neither a folder nor"):
        load_model("hf_clip:./no/such/folder")
