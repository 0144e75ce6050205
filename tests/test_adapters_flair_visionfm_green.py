"""FLAIR, VisionFM and RETFound-Green adapters against their releases' formats and conventions.

Each test builds the official architecture at full size with random weights, writes a checkpoint
in the release's file format and key layout, loads it through the adapter (``--weights FILE`` and
``RETBENCH_WEIGHTS``) and compares the features with a reference computed here by hand from the
same weights (not through the adapter). Preprocessing fields are checked against the releases'.
"""

from __future__ import annotations

import argparse
import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from retbench.model_adapters.visionfm import VisionFMAdapter

from retbench.adapters import load_model
from retbench.errors import RetbenchError
from retbench.preprocess import normalize
from retbench.protocols.zero_shot import class_embeddings
from retbench.tasks import get_task
from retbench.text_tokenizers import minilm_dir, wordpiece_tokenizer
from retbench.weights import WeightsMissingError

# huggingface.co/emilyalsentzer/Bio_ClinicalBERT config.json, written out independently of the adapter
CLINICALBERT = {"vocab_size": 28996, "hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12,
                "intermediate_size": 3072, "max_position_embeddings": 512, "type_vocab_size": 2,
                "layer_norm_eps": 1e-12, "hidden_act": "gelu", "pad_token_id": 0}
# VisionFM utils.get_stats
VFM_STATS = {
    "fundus": ((0.423737496137619, 0.2609460651874542, 0.128403902053833),
               (0.29482534527778625, 0.20167365670204163, 0.13668020069599152)),
    "oct": ((0.21091926, 0.21091926, 0.21091919), (0.17598894, 0.17598891, 0.17598893)),
    "ffa": ((0.2020487, 0.20205145, 0.20201068), (0.17406046, 0.17404206, 0.17401208)),
}


def offline_env(monkeypatch, root: Path | None) -> None:
    """No hub access; ``RETBENCH_WEIGHTS`` = ``root`` (unset when None)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str((root or Path("/nonexistent")) / "_hf_cache"))
    if root is None:
        monkeypatch.delenv("RETBENCH_WEIGHTS", raising=False)
    else:
        monkeypatch.setenv("RETBENCH_WEIGHTS", str(root))


def jitter_norms(module: torch.nn.Module, gen: torch.Generator) -> None:
    """Non-trivial LayerNorm/BatchNorm affine parameters and running statistics (init values would hide bugs)."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.LayerNorm | torch.nn.BatchNorm2d):
                m.weight.copy_(1 + 0.2 * torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(0.1 * torch.randn(m.bias.shape, generator=gen))
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=gen))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))


# ----------------------------------------------------------------------------------------------- FLAIR

FLAIR_FIXTURES = Path(__file__).parent / "fixtures" / "flair_release"


def flair_release_module(name: str):
    """A module of FLAIR's own code copied under tests/fixtures/flair_release (Apache-2.0, provenance inside)."""
    spec = importlib.util.spec_from_file_location(f"flair_release_{name}", FLAIR_FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class FlairRelease:
    """A full-size FLAIR with random weights, its two file formats, and a hand-written forward pass."""

    def __init__(self, root: Path) -> None:
        import torchvision
        from safetensors.torch import save_file
        from transformers import BertConfig, BertModel

        torch.manual_seed(1)
        gen = torch.Generator().manual_seed(1)
        self.resnet = torchvision.models.resnet50(weights=None)
        self.resnet.fc = torch.nn.Identity()
        jitter_norms(self.resnet, gen)
        self.bert = BertModel(BertConfig(**CLINICALBERT))
        self.w_img = 0.02 * torch.randn(512, 2048, generator=gen)
        self.w_txt = 0.05 * torch.randn(512, 768, generator=gen)
        self.logit_scale = torch.tensor(2.9)
        self.resnet.eval()
        self.bert.eval()
        state = {f"vision_model.model.{k}": v for k, v in self.resnet.state_dict().items()}
        state["vision_model.projection_head_vision.projection.weight"] = self.w_img
        state |= {f"text_model.model.{k}": v for k, v in self.bert.state_dict().items()}
        state["text_model.projection_head_text.projection.weight"] = self.w_txt
        state["logit_scale"] = self.logit_scale
        vocab_lines = (minilm_dir() / "vocab.txt").read_text(encoding="utf-8").splitlines()[:CLINICALBERT["vocab_size"]]
        # HF layout under RETBENCH_WEIGHTS: <root>/<hub id>/<file>
        self.env_root = root / "env"
        self.safetensors = self.env_root / "jusiro2" / "FLAIR" / "model.safetensors"
        self.safetensors.parent.mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in state.items()}, str(self.safetensors))
        self.vocab = self.env_root / "emilyalsentzer" / "Bio_ClinicalBERT" / "vocab.txt"
        self.vocab.parent.mkdir(parents=True)
        self.vocab.write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
        # the Google Drive flair_resnet.pth: a plain torch.save of the state dict, from transformers < 4.31
        self.legacy = root / "drive" / "flair_resnet.pth"
        self.legacy.parent.mkdir()
        legacy = dict(state)
        legacy["text_model.model.embeddings.position_ids"] = torch.arange(512).unsqueeze(0)
        torch.save(legacy, self.legacy)
        (self.legacy.parent / "vocab.txt").write_text("\n".join(vocab_lines) + "\n", encoding="utf-8")
        self.tokenizer = wordpiece_tokenizer(self.vocab, lowercase=True, max_length=77)

    @torch.inference_mode()
    def image(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(raw 2048-d GAP, projected + normalised 512-d)."""
        raw = self.resnet(x)
        proj = (raw / raw.norm(dim=-1, keepdim=True)) @ self.w_img.T
        return raw, proj / proj.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def text(self, texts: list[str]) -> torch.Tensor:
        """FLAIR's TextModel on ``texts`` padded together: mean of all positions of layers 1, 2, 12."""
        tok = self.tokenizer(texts, padding=True, truncation=True, max_length=77, return_tensors="pt")
        h = self.bert(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"], output_hidden_states=True).hidden_states
        e = (h[1].mean(1) + h[2].mean(1) + h[12].mean(1)) / 3
        p = (e / e.norm(dim=-1, keepdim=True)) @ self.w_txt.T
        return p / p.norm(dim=-1, keepdim=True)


@pytest.fixture(scope="module")
def flair_release(tmp_path_factory) -> FlairRelease:
    return FlairRelease(tmp_path_factory.mktemp("flair"))


@pytest.fixture(scope="module")
def flair_hf(flair_release):
    """``flair`` loaded from the HF layout (model.safetensors) under RETBENCH_WEIGHTS."""
    with pytest.MonkeyPatch.context() as mp:
        offline_env(mp, flair_release.env_root)
        adapter = load_model("flair")
    yield adapter
    del adapter


def test_flair_safetensors_round_trip(flair_release, flair_hf):
    assert flair_hf.weights_path == flair_release.safetensors
    assert flair_hf.describe()["weights_identity"].startswith("sha256:")
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    raw, joint = flair_release.image(x)
    torch.testing.assert_close(flair_hf.encode_image(x), raw, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(flair_hf.encode_image_joint(x), joint, rtol=1e-4, atol=1e-5)
    texts = ["A fundus photograph of glaucoma", "healthy", "many exudates near the macula"]
    alone = torch.cat([flair_release.text([t]) for t in texts])
    torch.testing.assert_close(flair_hf.encode_text(texts), alone, rtol=1e-4, atol=1e-5)
    # FLAIR's AutoTokenizer on Bio_ClinicalBERT lower-cases (no tokenizer_config.json in that repo)
    tok = flair_hf.tokenizer
    assert tok("A Fundus Photograph")["input_ids"] == tok("a fundus photograph")["input_ids"]


def test_flair_legacy_pth_with_position_ids(flair_release, flair_hf, monkeypatch):
    offline_env(monkeypatch, None)
    legacy = load_model("flair.default", weights=str(flair_release.legacy))
    assert legacy.weights_path == flair_release.legacy
    for name, value in flair_hf.net.state_dict().items():
        assert torch.equal(legacy.net.state_dict()[name], value), name
    x = torch.randn(1, 3, 96, 128, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(legacy.encode_image(x), flair_release.image(x)[0], rtol=1e-4, atol=1e-4)


def test_flair_zero_shot_prompts_and_class_embeddings(flair_release, flair_hf):
    messidor = get_task("messidor")
    setup = flair_hf.zero_shot_setup(messidor)
    assert setup.renormalize is False
    assert setup.logit_scale == pytest.approx(math.exp(2.9), rel=1e-6)
    # descriptions from FLAIR's dictionary, the class name appended when absent, all in FLAIR's caption
    assert setup.prompts[0] == ["A fundus photograph of no diabetic retinopathy", "A fundus photograph of no microaneurysms"]
    assert setup.prompts[1] == ["A fundus photograph of only few microaneurysms",
                                "A fundus photograph of mild diabetic retinopathy"]
    assert setup.prompts[4][-1] == "A fundus photograph of proliferative diabetic retinopathy"
    mmac = flair_hf.zero_shot_setup(get_task("mmac"))  # MMAC's grade names are never appended
    assert mmac.prompts == [[f"A fundus photograph of {d}"] for d in
                            ("healthy macula", "tessellated fundus", "diffuse chorioretinal atrophy",
                             "patchy chorioretinal atrophy", "macular atrophy")]
    # class embeddings as the zero-shot protocol computes them == FLAIR's per-class padded batches, averaged
    got = class_embeddings(lambda t: flair_hf.encode_text(t).numpy(), setup.prompts, setup.renormalize,
                           setup.encode_class)
    want = np.stack([flair_release.text(ps).mean(0).numpy() for ps in setup.prompts])
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert not np.allclose(np.linalg.norm(got, axis=1), 1.0)  # means are not renormalised
    # padding enters FLAIR's mean: padding the whole list together would give other class embeddings
    flat = [p for ps in setup.prompts for p in ps]
    together = flair_release.text(flat)[2: 2 + len(setup.prompts[2])].mean(0).numpy()
    assert not np.allclose(together, want[2], atol=1e-4)


def test_flair_preprocessing_matches_release(flair_hf, data_root):
    pre = flair_hf.preprocess
    assert (pre.size, pre.resize, pre.interpolation) == (512, "pad_canvas", "bilinear")
    assert pre.mean == (0.0, 0.0, 0.0) and pre.std == (1.0, 1.0, 1.0) and pre.fundus_crop == "none"
    # a task asking for the fundus crop gets FLAIR's own crop (Li threshold on red, largest component)
    assert flair_hf.task_preprocess({"fundus_crop": True}).fundus_crop == "li_red"
    image = Image.open(data_root / "flair" / "documents" / "severe_nonprol_dr.jpg").convert("RGB")
    assert image.size == (1024, 683)
    out = pre.load(image)
    assert out.shape == (3, 512, 512) and out.dtype == torch.uint8
    # FLAIR: scale = 1024/512 = 2, resize to (int(683/2), int(1024/2)) = (341, 512), pad bottom/right with zeros
    assert out[:, 341:].eq(0).all() and out[:, :341].float().mean() > 10
    from torchvision.transforms import Resize

    flair = Resize((341, 512), antialias=True)(torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1))
    ours = normalize(out[None], pre)[0, :, :341]
    assert torch.equal(normalize(out[None], pre)[0], out.float() / 255)  # no mean/std: [0, 1] pixels
    assert (ours - flair).abs().mean() < 1.5 / 255


def test_flair_probe_features_follow_the_two_release_paths(flair_release, flair_hf, monkeypatch):
    """``flair`` = the paper's raw 2048-d feature, ``flair.projected`` = the current README command's 512-d one.

    Reference: FLAIR's own ``VisionModel``/``ProjectionLayer`` (copied unchanged into the fixture) built as
    ``main_transferability.py`` builds them: ``--weights_path`` given -> ``projection=False, norm_features=False``;
    the ``from_pretrained`` path -> FLAIRModel's defaults ``projection=True, norm_features=True`` (the flags set
    afterwards are attributes nothing reads).
    """
    from safetensors.torch import load_file

    release = flair_release_module("flair_vision_model")
    vision = {k.removeprefix("vision_model."): v for k, v in load_file(str(flair_release.safetensors)).items()
              if k.startswith("vision_model.")}
    paper = release.VisionModel(vision_type="resnet_v1", pretrained=False, projection=False, norm=False)
    readme = release.VisionModel(vision_type="resnet_v1", pretrained=False, projection=True, norm=True)
    for model in (paper, readme):
        model.load_state_dict(vision, strict=True)
        model.eval()
    offline_env(monkeypatch, flair_release.env_root)
    projected = load_model("flair.projected")
    try:
        assert projected.weights_path == flair_release.safetensors  # same file as the default tag
        x = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(3))
        with torch.inference_mode():
            want_raw, want_proj = paper(x), readme(x)
            got_raw, got_proj = flair_hf.encode_image(x), projected.encode_image(x)
        assert got_raw.shape == (2, 2048) and got_proj.shape == (2, 512)
        torch.testing.assert_close(got_raw, want_raw, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_proj, want_proj, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_proj.norm(dim=-1), torch.ones(2), rtol=0, atol=1e-5)
        # the projected feature is the projection head output L2-normalised, and the joint-space embedding
        head = projected.net.vision_model.projection_head_vision.projection.weight
        by_hand = F.normalize(F.normalize(want_raw, dim=-1) @ head.T, dim=-1)
        torch.testing.assert_close(got_proj, by_hand, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(got_proj, projected.encode_image_joint(x), rtol=0, atol=0)
        # the independent hand-written reference agrees with both
        raw, joint = flair_release.image(x)
        torch.testing.assert_close(got_raw, raw, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(got_proj, joint, rtol=1e-4, atol=1e-5)
    finally:
        del projected
    # each tag names the FLAIR command it reproduces
    default_tag, projected_tag = flair_hf.tags["default"], flair_hf.tags["projected"]
    assert "--project_features False --norm_features False" in default_tag.feature
    assert "--weights_path" in default_tag.feature and "2048-d" in default_tag.feature
    assert "without --weights_path" in projected_tag.feature and "from_pretrained('jusiro2/FLAIR')" in projected_tag.feature
    assert "512-d" in projected_tag.feature


def test_flair_resize_matches_release_loader_as_differs_states(flair_hf, data_root):
    """The ``differs`` text's numbers, measured against FLAIR's own LoadImage + ImageScaling (copied unchanged).

    With the installed torchvision (>= 0.17, as FLAIR's README's 0.21) ImageScaling's plain ``Resize`` antialiases
    tensors; the paper-era torchvision (0.14/0.15) did not, which ``antialias=False`` reproduces.
    """
    from torchvision.transforms import Resize

    transforms = flair_release_module("flair_transforms")
    differs = flair_hf.tags["default"].differs
    assert differs == flair_hf.tags["projected"].differs
    stated = {  # image: (mean, max) |diff| with antialias, then without
        "severe_nonprol_dr.jpg": ((0.0009, 1 / 255), (0.0016, 0.020)),
        "sample_macular_hole.png": (None, (0.0015, 0.13)),
    }
    for name, (aa, no_aa) in stated.items():
        path = data_root / "flair" / "documents" / name
        data = transforms.LoadImage(crop_foreground=False)({"image_path": str(path)})
        release = transforms.ImageScaling(size=(512, 512))(dict(data))["image"].float()  # FLAIR's own loader, as installed
        ours = normalize(flair_hf.preprocess.load(Image.open(path))[None], flair_hf.preprocess)[0]
        assert release.shape == ours.shape == (3, 512, 512)
        img = torch.tensor(data["image"])
        scale = max(img.shape[-2:]) / 512
        h, w = int(img.shape[-2] / scale), int(img.shape[-1] / scale)  # the resized image; zero padding beyond
        assert ours[:, h:].eq(0).all() and release[:, h:].eq(0).all() and ours[:, :, w:].eq(0).all()
        diff = (ours - release)[:, :h, :w].abs()
        # antialiased (torchvision >= 0.17 default): within one uint8 level everywhere
        assert diff.max() <= 1 / 255 + 1e-6 and diff.mean() < 0.001
        if aa is not None:
            assert diff.mean().item() == pytest.approx(aa[0], abs=5e-5)
        # FLAIR's paper-era loader: the same resize without antialiasing on tensors
        old = Resize((h, w), antialias=False)(img).float()
        old_diff = (ours[:, :h, :w] - old).abs()
        assert old_diff.mean().item() == pytest.approx(no_aa[0], abs=5e-5)
        assert old_diff.max().item() == pytest.approx(no_aa[1], abs=5e-4)
    assert "0.21" in differs and "max |diff| 1/255, mean 0.0009" in differs
    assert "mean |diff| 0.0016, max 0.020" in differs and "0.0015 and 0.13" in differs


def test_flair_missing_files_name_them(flair_release, tmp_path, monkeypatch):
    offline_env(monkeypatch, tmp_path)
    with pytest.raises(WeightsMissingError) as info:
        load_model("flair")
    assert "model.safetensors" in str(info.value) and "huggingface.co/jusiro2/FLAIR" in str(info.value)
    (tmp_path / "flair").mkdir()
    (tmp_path / "flair" / "model.safetensors").symlink_to(flair_release.safetensors)  # weights, but no vocab.txt
    with pytest.raises(WeightsMissingError) as info:
        load_model("flair")
    assert "vocab.txt" in str(info.value) and "emilyalsentzer/Bio_ClinicalBERT" in str(info.value)


# -------------------------------------------------------------------------------------------- VisionFM


class VisionFMRelease:
    """A timm ViT-B/16 with random weights as the iBOT teacher of a VisionFM checkpoint."""

    def __init__(self) -> None:
        import timm

        torch.manual_seed(2)
        self.vit = timm.create_model("vit_base_patch16_224", num_classes=0).eval()
        jitter_norms(self.vit, torch.Generator().manual_seed(2))

    def checkpoint(self, prefix: str, pos_embed: torch.Tensor | None = None) -> dict:
        """The released dict: teacher (``backbone.*`` + iBOT head), epoch and the argparse namespace."""
        teacher = {f"{prefix}backbone.{k}": v for k, v in self.vit.state_dict().items()}
        if pos_embed is not None:
            teacher[f"{prefix}backbone.pos_embed"] = pos_embed
        teacher |= {f"{prefix}head.mlp.0.weight": torch.randn(256, 768), f"{prefix}head.last_layer.weight_g": torch.ones(64, 1),
                    f"{prefix}head.last_layer.weight_v": torch.randn(64, 256)}
        return {"teacher": teacher, "epoch": 400, "args": argparse.Namespace(arch="vit_base", patch_size=16, modality="Fundus")}

    @torch.inference_mode()
    def feature(self, x: torch.Tensor) -> torch.Tensor:
        """get_intermediate_layers(x, 4): each of the last 4 blocks' outputs through ``norm``, CLS, concatenated."""
        outs = []
        hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(self.vit.norm(o)[:, 0])) for b in self.vit.blocks[-4:]]
        try:
            self.vit.forward_features(x)
        finally:
            for h in hooks:
                h.remove()
        return torch.cat(outs, dim=-1)


@pytest.fixture(scope="module")
def visionfm_release() -> VisionFMRelease:
    return VisionFMRelease()


def test_visionfm_fundus_teacher_checkpoint(visionfm_release, tmp_path, monkeypatch):
    offline_env(monkeypatch, None)
    path = tmp_path / "VFM_Fundus_weights.pth"
    torch.save(visionfm_release.checkpoint(""), path)
    adapter = load_model("visionfm", weights=str(path))
    assert adapter.name == "visionfm.fundus"
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    got = adapter.encode_image(x)
    assert got.shape == (2, 3072)
    torch.testing.assert_close(got, visionfm_release.feature(x), rtol=1e-4, atol=1e-4)
    pre = adapter.preprocess
    assert (pre.size, pre.resize, pre.interpolation, pre.fundus_crop) == (224, "squash", "bicubic", "none")
    assert (pre.mean, pre.std) == VFM_STATS["fundus"]


def test_visionfm_oct_module_prefix_and_pos_embed_resize(visionfm_release, tmp_path, monkeypatch):
    gen = torch.Generator().manual_seed(3)
    pos16 = 0.02 * torch.randn(1, 1 + 16 * 16, 768, generator=gen)  # trained at 256 px: a 16x16 grid
    (tmp_path / "visionfm").mkdir()
    torch.save(visionfm_release.checkpoint("module.", pos_embed=pos16), tmp_path / "visionfm" / "VFM_OCT_weights.pth")
    offline_env(monkeypatch, tmp_path)
    adapter = load_model("visionfm.oct")
    assert (adapter.preprocess.mean, adapter.preprocess.std) == VFM_STATS["oct"]
    grid = pos16[0, 1:].reshape(1, 16, 16, 768).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(14, 14), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 196, 768)
    resized = torch.cat([pos16[:, :1], grid], dim=1)
    torch.testing.assert_close(adapter.model.pos_embed.detach(), resized)
    x = torch.randn(1, 3, 224, 224, generator=gen)
    vit = visionfm_release.vit
    original = vit.pos_embed.detach().clone()
    with torch.no_grad():
        vit.pos_embed.copy_(resized)
    try:
        want = visionfm_release.feature(x)
    finally:
        with torch.no_grad():
            vit.pos_embed.copy_(original)
    torch.testing.assert_close(adapter.encode_image(x), want, rtol=1e-4, atol=1e-4)
    ffa = VisionFMAdapter.tags["ffa"].preprocess
    assert (ffa.mean, ffa.std) == VFM_STATS["ffa"] and VisionFMAdapter.tags["ffa"].filename == "VFM_FFA_weights.pth"


def test_visionfm_errors(tmp_path, monkeypatch):
    offline_env(monkeypatch, tmp_path)
    with pytest.raises(WeightsMissingError) as info:
        load_model("visionfm.oct")
    assert "VFM_OCT_weights.pth" in str(info.value)
    assert "drive.google.com/file/d/1o6E-ine2QLx2pxap-c77u-SU0FjxwypA" in str(info.value)
    bad = tmp_path / "VFM_Fundus_weights.pth"
    torch.save({"teacher": {"backbone.cls_token": torch.zeros(1, 1, 768)}}, bad)
    with pytest.raises(RetbenchError, match="encoder parameters missing"):
        load_model("visionfm", weights=str(bad))


# -------------------------------------------------------------------------------------- RETFound-Green


@pytest.fixture(scope="module")
def green_release(tmp_path_factory):
    """A random timm vit_small_patch14_reg4_dinov2 (392 px) and its flat state dict file."""
    import timm

    torch.manual_seed(4)
    vit = timm.create_model("vit_small_patch14_reg4_dinov2", img_size=(392, 392), num_classes=0).eval()
    gen = torch.Generator().manual_seed(4)
    jitter_norms(vit, gen)
    with torch.no_grad():  # LayerScale init (1e-5) would make every block nearly the identity
        for name, p in vit.named_parameters():
            if name.endswith("gamma"):
                p.copy_(0.5 * torch.rand(p.shape, generator=gen))
    root = tmp_path_factory.mktemp("green")
    (root / "retfound_green").mkdir()
    path = root / "retfound_green" / "retfoundgreen_statedict.pth"
    torch.save(vit.state_dict(), path)
    return vit, path


def test_retfound_green_readme_feature(green_release, monkeypatch):
    vit, path = green_release
    offline_env(monkeypatch, None)
    adapter = load_model("retfound_green", weights=str(path))
    x = torch.randn(1, 3, 392, 392, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        tokens = vit.forward_features(x)  # (1, 1 + 4 + 784, 384), after the final norm
    assert tokens.shape == (1, 789, 384)
    got = adapter.encode_image(x)
    torch.testing.assert_close(got, tokens[:, 5:].mean(1), rtol=1e-4, atol=1e-4)
    assert not torch.allclose(got, tokens.mean(1), atol=1e-3)
    pre = adapter.preprocess
    assert (pre.size, pre.resize, pre.interpolation, pre.fundus_crop) == (392, "squash", "bilinear", "none")
    assert pre.mean == (0.5, 0.5, 0.5) and pre.std == (0.5, 0.5, 0.5)
    assert adapter.task_preprocess({"fundus_crop": True}).fundus_crop == "mean_bbox"


def test_retfound_green_notebook_tag_from_env(green_release, monkeypatch):
    vit, path = green_release
    offline_env(monkeypatch, path.parent.parent)
    adapter = load_model("retfound_green.notebook")
    assert adapter.weights_path == path
    x = torch.randn(1, 3, 392, 392, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        want = vit.forward_features(x).mean(1)  # the evaluation notebooks' feature: all 789 tokens
    torch.testing.assert_close(adapter.encode_image(x), want, rtol=1e-4, atol=1e-4)


def test_retfound_green_strict_and_missing(green_release, tmp_path, monkeypatch):
    vit, _ = green_release
    offline_env(monkeypatch, tmp_path)
    with pytest.raises(WeightsMissingError) as info:
        load_model("retfound_green")
    assert "retfoundgreen_statedict.pth" in str(info.value)
    assert "github.com/justinengelmann/RETFound_Green/releases/download/v0.1" in str(info.value)
    extra = dict(vit.state_dict())
    extra["head.weight"] = torch.zeros(2, 384)
    torch.save(extra, tmp_path / "with_head.pth")
    with pytest.raises(RetbenchError, match="1 unexpected"):
        load_model("retfound_green", weights=str(tmp_path / "with_head.pth"))
