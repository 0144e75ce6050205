"""RETFound-family adapters (retfound, deretfound, urfound, retfiner) against hand-computed references.

For each released checkpoint layout a full-size encoder with seeded random weights is written in the
release's own file format and key layout (MAE ``{"model": ...}`` with decoder keys, DINOv2
``{"teacher": {"backbone.*", heads}}`` with a 37x37 ``pos_embed``, UrFound with its BERT branch,
RetFiner's flat dicts), loaded through ``load_model`` (``--weights`` or ``$RETBENCH_WEIGHTS``) and
compared with the release's feature computed here by hand from the timm modules: patch embedding,
class token, position embedding, the blocks, then the official pooling. LayerNorm weights of the
reference are perturbed, so a feature that wrongly applied the checkpoint's final ``norm`` (or a
non-fresh ``fc_norm``) would not match. Each large encoder is built and written once per test class.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from retbench.model_adapters import _mae_vit
from torch import nn

from retbench.adapters import load_model
from retbench.errors import RetbenchError
from retbench.preprocess import IMAGENET_MEAN, IMAGENET_STD
from retbench.weights import WeightsMissingError

timm = pytest.importorskip("timm")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

TOL = dict(rtol=1e-5, atol=1e-5)


@torch.no_grad()
def randomised(make, seed: int) -> nn.Module:
    """``make()`` built without initialisation, then filled with seeded N(0, 0.02) weights (much faster than
    timm's init at ViT-L size), LayerNorms and LayerScales moved away from their init so that misuse of the
    checkpoint's ``norm`` shows."""
    with torch.device("meta"):
        model = make()
    model = model.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.normal_(1.0, 0.3, generator=gen)
            module.bias.normal_(0.0, 0.3, generator=gen)
        if isinstance(getattr(module, "gamma", None), nn.Parameter):
            module.gamma.uniform_(0.3, 1.0, generator=gen)
    return model


def vit(width: int, depth: int, heads: int):
    """A timm ViT/16 at 224 px as the MAE-style releases define it (qkv bias, LayerNorm eps 1e-6)."""
    return partial(VisionTransformer, img_size=224, patch_size=16, embed_dim=width, depth=depth, num_heads=heads,
                   mlp_ratio=4, qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
                   weight_init="skip")


@torch.no_grad()
def hand_tokens(model: nn.Module, x: torch.Tensor, pos_embed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens after the last block, the same after the final norm), computed module by module."""
    tokens = model.patch_embed(x)
    tokens = torch.cat([model.cls_token.expand(len(x), -1, -1), tokens], dim=1) + pos_embed
    for block in model.blocks:
        tokens = block(tokens)
    return tokens, model.norm(tokens)


def fresh_ln(x: torch.Tensor) -> torch.Tensor:
    """A LayerNorm at its initialisation (weight 1, bias 0), eps 1e-6."""
    return F.layer_norm(x, (x.shape[-1],), eps=1e-6)


def encoder_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mae_decoder(width: int, dec: int, depth: int, pred: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """MAE pretraining keys beside the encoder (models_mae.py / UrFound's UrModel), random values."""
    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.02

    out = {"mask_token": r(1, 1, dec), "decoder_embed.weight": r(dec, width), "decoder_embed.bias": r(dec),
           "decoder_pos_embed": r(1, 197, dec), "decoder_norm.weight": r(dec), "decoder_norm.bias": r(dec),
           "decoder_pred.weight": r(pred, dec), "decoder_pred.bias": r(pred)}
    for i in range(depth):
        p = f"decoder_blocks.{i}."
        out |= {p + "norm1.weight": r(dec), p + "norm1.bias": r(dec), p + "attn.qkv.weight": r(3 * dec, dec),
                p + "attn.qkv.bias": r(3 * dec), p + "attn.proj.weight": r(dec, dec), p + "attn.proj.bias": r(dec),
                p + "norm2.weight": r(dec), p + "norm2.bias": r(dec), p + "mlp.fc1.weight": r(4 * dec, dec),
                p + "mlp.fc1.bias": r(4 * dec), p + "mlp.fc2.weight": r(dec, 4 * dec), p + "mlp.fc2.bias": r(dec)}
    return out


def scratch(name: str) -> Path:
    """A fresh folder for multi-GB checkpoints: RAM-backed /dev/shm when it has room (no disk writeback), else tmp."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 8 << 30 else None
    return Path(tempfile.mkdtemp(prefix=f"retbench-test-{name}-", dir=base))


def encode(name: str, x: torch.Tensor, weights: str | None = None):
    adapter = load_model(name, weights=weights)
    with torch.inference_mode():
        feats = adapter.encode_image(x)
    return adapter, feats


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(7))


@pytest.fixture(scope="class")
def mae_large(image) -> Iterator[dict]:
    """RETFound-MAE ViT-L/16: the RETFound / DERETFound ``{"model": ...}`` files and RetFiner-R's flat file."""
    root = scratch("mae-large")
    ref = randomised(vit(1024, 24, 16), seed=1)
    pre, _ = hand_tokens(ref, image, ref.pos_embed)
    refs = {"gap": fresh_ln(pre[:, 1:].mean(1)), "concat": fresh_ln(torch.cat([pre[:, 1:].mean(1), pre[:, 0]], 1))}
    state = encoder_state(ref)
    del ref, pre
    gen = torch.Generator().manual_seed(2)
    # MAE pretraining checkpoint as misc.save_model writes it: model (encoder + norm + decoder), epoch, args
    mae = {"model": state | mae_decoder(1024, 512, 8, 16 * 16 * 3, gen), "epoch": 799,
           "args": argparse.Namespace(model="mae_vit_large_patch16", mask_ratio=0.75, norm_pix_loss=True)}
    for sub in ("retfound", "deretfound"):
        (root / sub).mkdir()
    torch.save(mae, root / "retfound" / "RETFound_mae_natureCFP.pth")
    del mae
    # DERETFound's checkpoint-best.pth has the same {"model": MAE state dict} layout: the same bytes serve
    os.link(root / "retfound" / "RETFound_mae_natureCFP.pth", root / "deretfound" / "checkpoint-best.pth")
    # RetFiner-R: flat export of the refined vision encoder, with its classifier head and text projection
    flat = state | {"head.weight": torch.randn(2, 1024), "head.bias": torch.randn(2),
                    "proj.weight": torch.randn(768, 1024), "proj.bias": torch.randn(768)}
    torch.save(flat, root / "RetFiner_RETFound.pth")
    del flat, state
    gc.collect()
    yield {"root": root, **refs}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="class")
def dinov2_large(image) -> Iterator[dict]:
    """RETFound-DINOv2 ViT-L/14 teacher checkpoint, ``pos_embed`` saved on a 37x37 grid (518 px)."""
    root = scratch("dinov2")
    ref = randomised(partial(timm.create_model, "vit_large_patch14_dinov2", pretrained=False, img_size=224, num_classes=0,
                             weight_init="skip"), seed=3)
    pos37 = torch.randn(1, 1 + 37 * 37, 1024, generator=torch.Generator().manual_seed(4)) * 0.5
    # the official util/pos_embed.py rule, by hand: class position kept, 37x37 grid -> 16x16 bicubic
    grid = pos37[:, 1:].reshape(1, 37, 37, 1024).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(16, 16), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 256, 1024)
    pos16 = torch.cat([pos37[:, :1], grid], dim=1)
    _, post = hand_tokens(ref, image, pos16)
    refs = {"cls": post[:, 0].clone(), "latent": fresh_ln(post[:, 1:].mean(1)), "pos16": pos16}
    gen = torch.Generator().manual_seed(5)
    teacher = {f"backbone.{k}": v for k, v in encoder_state(ref).items()}
    teacher["backbone.pos_embed"] = pos37
    teacher["backbone.mask_token"] = torch.zeros(1, 1024)
    for head in ("dino_head", "ibot_head"):
        teacher |= {f"{head}.mlp.0.weight": torch.randn(2048, 1024, generator=gen), f"{head}.mlp.0.bias": torch.zeros(2048),
                    f"{head}.mlp.2.weight": torch.randn(2048, 2048, generator=gen), f"{head}.mlp.2.bias": torch.zeros(2048),
                    f"{head}.mlp.4.weight": torch.randn(256, 2048, generator=gen), f"{head}.mlp.4.bias": torch.zeros(256),
                    f"{head}.last_layer.weight_g": torch.ones(65536, 1),
                    f"{head}.last_layer.weight_v": torch.randn(65536, 256, generator=gen)}
    del ref, post
    torch.save({"teacher": teacher}, root / "RETFound_dinov2_meh.pth")
    hub_dir = root / "YukunZhou" / "RETFound_dinov2_shanghai"
    hub_dir.mkdir(parents=True)
    os.link(root / "RETFound_dinov2_meh.pth", hub_dir / "RETFound_dinov2_shanghai.pth")
    del teacher
    gc.collect()
    yield {"root": root, **refs}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="class")
def vit_base() -> Iterator[dict]:
    """A ViT-B/16 encoder in three layouts: UrFound's MAE+BERT checkpoint, RetFiner-U and RetFiner-V flat files."""
    root = scratch("vit-base")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(8))
    ref = randomised(vit(768, 12, 12), seed=6)
    pre, post = hand_tokens(ref, x, ref.pos_embed)
    with torch.no_grad():
        torch.testing.assert_close(post, ref.forward_features(x), **TOL)  # the hand computation is timm's
    refs = {"x": x, "gap": fresh_ln(pre[:, 1:].mean(1)), "concat_u": fresh_ln(torch.cat([pre[:, 1:].mean(1), pre[:, 0]], 1)),
            "concat_v": torch.cat([post[:, 0], post[:, 1:].mean(1)], 1)}
    state = encoder_state(ref)
    del ref
    gen = torch.Generator().manual_seed(9)
    # UrFound (util/model_urfound.py:urmodel): decoder 768-d x 4 blocks predicting (2*16)^2*3; BERT report branch
    bert = {"bert_encoder.model.bert.encoder.layer.0.attention.self.query.weight": torch.randn(384, 384, generator=gen),
            "bert_encoder.model.cls.predictions.bias": torch.zeros(30522),
            "bert_mlp.weight": torch.randn(384, 768, generator=gen), "bert_mlp.bias": torch.zeros(384)}
    torch.save({"model": state | mae_decoder(768, 768, 4, 32 * 32 * 3, gen) | bert, "epoch": 199},
               root / "urfound_mm.pth")
    torch.save(state | {"head.weight": torch.randn(2, 768), "head.bias": torch.zeros(2)}, root / "RetFiner_UrFound.pth")
    torch.save({f"backbone.{k}": v for k, v in state.items()}, root / "RetFiner_VisionFM.pth")
    yield {"root": root, **refs}
    shutil.rmtree(root, ignore_errors=True)


class TestMaeLarge:
    """RETFound-MAE ViT-L/16 weights in the RETFound, DERETFound and RetFiner-R layouts."""

    def test_retfound_mae_checkpoint_via_weights(self, mae_large, image):
        adapter, feats = encode("retfound.cfp", image, weights=str(mae_large["root"] / "retfound" / "RETFound_mae_natureCFP.pth"))
        torch.testing.assert_close(feats, mae_large["gap"], **TOL)
        assert feats.shape == (1, 1024) and feats.dtype == torch.float32
        assert isinstance(adapter.model.norm, nn.Identity)  # the checkpoint's norm.* is ignored
        assert torch.equal(adapter.fc_norm.weight, torch.ones(1024)) and torch.equal(adapter.fc_norm.bias, torch.zeros(1024))
        ignored = set(adapter.ignored_keys)
        assert {"norm.weight", "mask_token", "decoder_embed.weight", "decoder_pred.bias"} <= ignored
        assert not any(k.startswith(("blocks.", "patch_embed.")) for k in ignored)
        pre = adapter.preprocess
        assert (pre.size, pre.resize, pre.interpolation, pre.crop_pct) == (224, "resize_crop", "bicubic", 224 / 256)
        assert (pre.mean, pre.std, pre.normalization, pre.grayscale) == (IMAGENET_MEAN, IMAGENET_STD, "mean_std", False)
        assert adapter.tag.gated and adapter.tag.hub_id == "YukunZhou/RETFound_mae_natureCFP"

    def test_retfound_latent_tag_via_environment(self, mae_large, image, monkeypatch):
        monkeypatch.setenv("RETBENCH_WEIGHTS", str(mae_large["root"]))
        adapter, feats = encode("retfound.cfp-latent", image)
        assert adapter.weights_path == mae_large["root"] / "retfound" / "RETFound_mae_natureCFP.pth"
        torch.testing.assert_close(feats, mae_large["gap"], **TOL)  # the notebook's MAE feature is the global-pool one
        pre = adapter.preprocess  # latent_feature.ipynb: img.resize((224, 224)), /255, per-image per-channel z-score
        assert (pre.size, pre.resize, pre.interpolation, pre.normalization) == (224, "squash", "bicubic", "per_image")

    def test_deretfound_checkpoint_via_environment(self, mae_large, image, monkeypatch):
        monkeypatch.setenv("RETBENCH_WEIGHTS", str(mae_large["root"]))
        adapter, feats = encode("deretfound", image)
        assert adapter.weights_path == mae_large["root"] / "deretfound" / "checkpoint-best.pth"
        torch.testing.assert_close(feats, mae_large["gap"], **TOL)
        pre = adapter.preprocess  # util/data_*.py eval transform: Resize((224, 224)), ToTensor, ImageNet
        assert (pre.size, pre.resize, pre.interpolation, pre.mean, pre.std) == (224, "squash", "bilinear", IMAGENET_MEAN,
                                                                                  IMAGENET_STD)

    def test_retfiner_r_flat_checkpoint(self, mae_large, image):
        adapter, feats = encode("retfiner.r", image, weights=str(mae_large["root"] / "RetFiner_RETFound.pth"))
        assert feats.shape == (1, 2048)
        torch.testing.assert_close(feats, mae_large["concat"], **TOL)
        assert not any(k.startswith(("head.", "proj.")) for k in adapter.ignored_keys)  # deleted, as the LP loader does
        pre = adapter.preprocess
        assert (pre.size, pre.resize, pre.interpolation, pre.grayscale) == (224, "squash", "bilinear", True)
        assert (pre.mean, pre.std) == (IMAGENET_MEAN, IMAGENET_STD)


class TestDinov2Large:
    """RETFound-DINOv2 ViT-L/14 teacher checkpoint with a 518 px position embedding."""

    def test_dinov2_teacher_checkpoint_with_518px_pos_embed(self, dinov2_large, image):
        path = dinov2_large["root"] / "RETFound_dinov2_meh.pth"
        adapter, feats = encode("retfound.dinov2-meh", image, weights=str(path))
        # pos_embed saved for a 37x37 grid is resized to 16x16, the class position kept
        assert adapter.model.pos_embed.shape == (1, 257, 1024)
        torch.testing.assert_close(adapter.model.pos_embed.detach(), dinov2_large["pos16"], rtol=0, atol=0)
        torch.testing.assert_close(feats, dinov2_large["cls"], **TOL)
        assert {"mask_token", "dino_head.last_layer.weight_v", "ibot_head.mlp.0.weight"} <= set(adapter.ignored_keys)
        assert adapter.preprocess.resize == "resize_crop" and adapter.preprocess.crop_pct == 224 / 256

    def test_dinov2_latent_tag_via_environment_hub_folder(self, dinov2_large, image, monkeypatch):
        monkeypatch.setenv("RETBENCH_WEIGHTS", str(dinov2_large["root"]))
        adapter, feats = encode("retfound.dinov2-shanghai-latent", image)
        assert adapter.weights_path.parent.name == "RETFound_dinov2_shanghai"
        torch.testing.assert_close(feats, dinov2_large["latent"], **TOL)
        assert adapter.preprocess.normalization == "per_image"


class TestVitBase:
    """ViT-B/16 weights in the UrFound, RetFiner-U and RetFiner-V layouts."""

    def test_urfound_checkpoint_with_bert_branch(self, vit_base):
        adapter, feats = encode("urfound", vit_base["x"], weights=str(vit_base["root"] / "urfound_mm.pth"))
        assert feats.shape == (2, 768)
        torch.testing.assert_close(feats, vit_base["gap"], **TOL)
        assert {"bert_mlp.weight", "bert_encoder.model.cls.predictions.bias", "decoder_blocks.3.mlp.fc2.bias"} <= set(
            adapter.ignored_keys)
        pre = adapter.preprocess
        assert (pre.resize, pre.interpolation, pre.crop_pct, pre.mean) == ("resize_crop", "bicubic", 224 / 256, IMAGENET_MEAN)

    def test_retfiner_u_via_environment(self, vit_base, monkeypatch):
        monkeypatch.setenv("RETBENCH_WEIGHTS", str(vit_base["root"]))
        adapter, feats = encode("retfiner.u", vit_base["x"])
        assert feats.shape == (2, 1536)
        torch.testing.assert_close(feats, vit_base["concat_u"], **TOL)
        assert adapter.preprocess.grayscale and adapter.preprocess.mean == IMAGENET_MEAN

    def test_retfiner_v_backbone_prefixed_flat_checkpoint(self, vit_base):
        adapter, feats = encode("retfiner.v", vit_base["x"], weights=str(vit_base["root"] / "RetFiner_VisionFM.pth"))
        assert feats.shape == (2, 1536)
        torch.testing.assert_close(feats, vit_base["concat_v"], **TOL)
        assert adapter.ignored_keys == []
        pre = adapter.preprocess
        assert pre.mean == (0.21091926, 0.21091926, 0.21091919) and pre.std == (0.17598894, 0.17598891, 0.17598893)
        assert (pre.resize, pre.interpolation, pre.grayscale) == ("squash", "bilinear", True)

@pytest.mark.parametrize(("name", "filename", "where"), [
    ("retfound.cfp", "RETFound_mae_natureCFP.pth", "https://huggingface.co/YukunZhou/RETFound_mae_natureCFP"),
    ("retfound.dinov2-meh-latent", "RETFound_dinov2_meh.pth", "https://huggingface.co/YukunZhou/RETFound_dinov2_meh"),
    ("deretfound", "checkpoint-best.pth", "zenodo.org/records/13340936"),
    ("urfound", "urfound_mm.pth", "https://huggingface.co/yyyyk/UrFound"),
    ("retfiner.v", "RetFiner_VisionFM.pth", "github.com/ronnief1/RetFiner/releases/download/weights/RetFiner_VisionFM.pth"),
])
def test_missing_weights_say_what_and_where(name, filename, where, tmp_path, monkeypatch):
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsMissingError) as info:
        load_model(name)
    message = str(info.value)
    assert filename in message and where in message and "\n" not in message
    assert ("request access" in message) == name.startswith("retfound.")


def test_official_renames_and_safe_args(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": {"module.backbone.blocks.0.mlp.w12.weight": torch.ones(2),
                            "backbone.blocks.0.mlp.w3.bias": torch.ones(1), "dino_head.mlp.0.bias": torch.ones(1)},
                "args": argparse.Namespace(lr=1.0)}, path)
    state = _mae_vit.read_state_dict(path, "teacher")
    assert set(state) == {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "dino_head.mlp.0.bias"}
    with pytest.raises(RetbenchError, match="no key 'model'"):
        _mae_vit.read_state_dict(path, "model")


def test_incomplete_or_misshapen_checkpoints_are_refused():
    model = _mae_vit.build_vit("vit_base_patch16", final_norm=False, meta=True)
    full = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    partial_state = {k: v for k, v in full.items() if not k.startswith("blocks.11.")}
    with pytest.raises(RetbenchError, match="12 of the encoder's .* weights are missing"):
        _mae_vit.load_encoder(model, partial_state, source="x.pth")
    wrong = dict(full, **{"patch_embed.proj.weight": torch.zeros(768, 3, 14, 14)})
    with pytest.raises(RetbenchError, match="shapes do not fit"):
        _mae_vit.load_encoder(_mae_vit.build_vit("vit_base_patch16", final_norm=False, meta=True), wrong, source="x.pth")


def test_pos_embed_interpolation_keeps_extra_tokens():
    model = SimpleNamespace(patch_embed=SimpleNamespace(num_patches=16), pos_embed=torch.zeros(1, 17, 4))
    saved = torch.cat([torch.full((1, 1, 4), 7.0), torch.full((1, 64, 4), 2.5)], dim=1)  # class + 8x8 grid
    state = {"pos_embed": saved}
    assert _mae_vit.interpolate_pos_embed(model, state)
    assert state["pos_embed"].shape == (1, 17, 4)
    torch.testing.assert_close(state["pos_embed"][:, 0], torch.full((1, 4), 7.0))
    torch.testing.assert_close(state["pos_embed"][:, 1:], torch.full((1, 16, 4), 2.5))  # a constant grid stays constant
    same = {"pos_embed": torch.zeros(1, 17, 4)}
    assert not _mae_vit.interpolate_pos_embed(model, same)


def test_every_tag_names_its_feature_rule():
    from retbench.model_adapters.deretfound import DeretfoundAdapter
    from retbench.model_adapters.retfiner import RetfinerAdapter
    from retbench.model_adapters.retfound import RetfoundAdapter
    from retbench.model_adapters.urfound import UrfoundAdapter

    for cls in (RetfoundAdapter, DeretfoundAdapter, UrfoundAdapter, RetfinerAdapter):
        for tag in cls.tags.values():
            assert tag.options["feature"] in _mae_vit.FEATURES and tag.options["arch"] in _mae_vit.ARCHS
    assert RetfoundAdapter.default_tag == "cfp" and len(RetfoundAdapter.tags) == 12
    assert Path(RetfoundAdapter.tags["oct"].filename).stem == "RETFound_mae_natureOCT"
