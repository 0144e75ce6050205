"""DERETFound and RetFiner adapters against the releases' own model code, loading code and transforms.

The official files are copied into ``tests/fixtures`` (provenance, commit and licence in each):
DERETFound's ``models_vit.py``, ``interpolate_pos_embed``, the checkpoint load of ``main_finetune.py`` and
its datasets' evaluation transform; RetFiner's ``linear_probing/src/retfound/vit.py``, its VisionFM
``vision_transformer.py``, the RetFiner-R/-U/-V loads of ``linear_probing/main/clf_tasks_main.py`` and the
transform of ``linear_probing/src/utils/dataset.py``. Encoders get seeded random weights (LayerNorms moved
away from their init, so a wrongly used final ``norm`` or ``fc_norm`` would show), are written in each
release's checkpoint layout, loaded by the official code and by retbench, and fed the same real image as
retbench preprocesses it; the release's own transform of that image is compared with retbench's as well.
"""

from __future__ import annotations

import gc
import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from types import ModuleType, SimpleNamespace

import pytest
import torch
from PIL import Image
from torch import nn

from retbench.adapters import load_model
from retbench.preprocess import normalize

timm = pytest.importorskip("timm")
pytest.importorskip("torchvision")
from timm.models.vision_transformer import VisionTransformer  # noqa: E402

FIXTURES = Path(__file__).parent / "fixtures"
TOL = dict(rtol=1e-5, atol=1e-5)  # float32; VisionFM's own attention differs from timm's kernel by ~1e-6
pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")  # timm.models.layers


def fixture(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"official_{name}", FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@torch.no_grad()
def random_encoder(width: int, depth: int, heads: int, seed: int) -> dict[str, torch.Tensor]:
    """A timm ViT/16 encoder state (MAE layout: with ``norm.*``), N(0, 0.02) weights, LayerNorms jittered."""
    with torch.device("meta"):
        model = VisionTransformer(img_size=224, patch_size=16, embed_dim=width, depth=depth, num_heads=heads, mlp_ratio=4,
                                  qkv_bias=True, norm_layer=partial(nn.LayerNorm, eps=1e-6), num_classes=0,
                                  weight_init="skip")
    model = model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for param in model.parameters():
        param.normal_(0.0, 0.02, generator=gen)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.weight.normal_(1.0, 0.3, generator=gen)
            module.bias.normal_(0.0, 0.3, generator=gen)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def mae_decoder_keys(width: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """A few MAE pretraining keys beside the encoder (ignored by both loaders)."""
    return {"mask_token": torch.randn(1, 1, 512, generator=gen), "decoder_embed.weight": torch.randn(512, width, generator=gen),
            "decoder_norm.weight": torch.ones(512), "decoder_pred.bias": torch.zeros(768)}


def scratch(name: str) -> Path:
    base = "/dev/shm" if os.path.isdir("/dev/shm") and shutil.disk_usage("/dev/shm").free > 8 << 30 else None
    return Path(tempfile.mkdtemp(prefix=f"retbench-official-{name}-", dir=base))


def image_paths(root: Path) -> dict[str, Path]:
    paths = {"cfp": root / "csdi" / "images" / "CGR1.jpg", "oct": root / "mx_dme_oct_fundus" / "oct" / "1224_OD_o_2.jpg"}
    if not all(p.is_file() for p in paths.values()):
        pytest.skip("bundled images missing")
    return paths


def retbench_input(name: str, path: Path) -> torch.Tensor:
    """The model input retbench makes of ``path`` for model ``name`` (no model built)."""
    from retbench.adapters import ADAPTERS, split_model_name

    family, tag = split_model_name(name)
    cls = ADAPTERS.get(family)
    pre = cls.resolve_tag(tag or cls.default_tag).preprocess
    return normalize(pre.load(Image.open(path))[None], pre)


def encode(name: str, weights: Path, x: torch.Tensor) -> torch.Tensor:
    adapter = load_model(name, weights=str(weights))
    with torch.inference_mode():
        out = adapter.encode_image(x)
    del adapter
    gc.collect()
    return out


@pytest.fixture(scope="module")
def vit_large(data_root) -> Iterator[dict]:
    """One ViT-L/16 encoder written as DERETFound's ``{"model": ...}`` file and as RetFiner-R's flat export."""
    root = scratch("vit-large")
    state = random_encoder(1024, 24, 16, seed=11)
    gen = torch.Generator().manual_seed(12)
    torch.save({"model": state | mae_decoder_keys(1024, gen), "epoch": 399}, root / "checkpoint-best.pth")
    flat = state | {"head.weight": torch.randn(2, 1024, generator=gen), "head.bias": torch.zeros(2),
                    "proj.weight": torch.randn(768, 1024, generator=gen), "proj.bias": torch.zeros(768)}
    torch.save(flat, root / "RetFiner_RETFound.pth")
    del state, flat
    gc.collect()
    yield {"root": root, "images": image_paths(data_root)}
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def vit_base(data_root) -> Iterator[dict]:
    """One ViT-B/16 encoder as RetFiner-U's flat export (with head) and RetFiner-V's (``backbone.`` names)."""
    root = scratch("vit-base")
    state = random_encoder(768, 12, 12, seed=13)
    torch.save(state | {"head.weight": torch.randn(2, 768), "head.bias": torch.zeros(2)}, root / "RetFiner_UrFound.pth")
    torch.save({f"backbone.{k}": v for k, v in state.items()}, root / "RetFiner_VisionFM.pth")
    yield {"root": root, "images": image_paths(data_root)}
    shutil.rmtree(root, ignore_errors=True)


@torch.no_grad()
def test_deretfound_features_equal_the_official_model(vit_large):
    official = fixture("deretfound_official")
    x = retbench_input("deretfound", vit_large["images"]["cfp"])
    model = official.official_finetune_model(str(vit_large["root"] / "checkpoint-best.pth")).eval()
    theirs = model.forward_features(x)  # models_vit.py global_pool: fc_norm(mean of patch tokens), norm deleted
    del model
    gc.collect()
    ours = encode("deretfound", vit_large["root"] / "checkpoint-best.pth", x)
    assert ours.shape == theirs.shape == (1, 1024)
    torch.testing.assert_close(ours, theirs, **TOL)


def test_deretfound_preprocessing_is_the_datasets_transform(vit_large):
    official = fixture("deretfound_official")
    for path in vit_large["images"].values():
        theirs = official.eval_transform()(official.load_image(path))
        torch.testing.assert_close(retbench_input("deretfound", path)[0], theirs, rtol=0, atol=1e-6)


@torch.no_grad()
def test_retfiner_r_features_equal_the_official_model(vit_large):
    official = fixture("retfiner_official")
    x = retbench_input("retfiner.r", vit_large["images"]["oct"])
    model, msg = official.official_retfiner_r(str(vit_large["root"] / "RetFiner_RETFound.pth"))
    assert set(msg.missing_keys) == {"fc_norm.weight", "fc_norm.bias", "head.weight", "head.bias"}
    theirs = model.eval().forward_features(x)  # 'concat': fc_norm(cat[mean patch, CLS]) of the last block, norm deleted
    del model
    gc.collect()
    ours = encode("retfiner.r", vit_large["root"] / "RetFiner_RETFound.pth", x)
    assert ours.shape == theirs.shape == (1, 2048)
    torch.testing.assert_close(ours, theirs, **TOL)


@torch.no_grad()
def test_retfiner_u_features_equal_the_official_model(vit_base):
    official = fixture("retfiner_official")
    x = retbench_input("retfiner.u", vit_base["images"]["oct"])
    model, _ = official.official_retfiner_u(str(vit_base["root"] / "RetFiner_UrFound.pth"))
    theirs = model.eval().forward_features(x)
    ours = encode("retfiner.u", vit_base["root"] / "RetFiner_UrFound.pth", x)
    assert ours.shape == theirs.shape == (1, 1536)
    torch.testing.assert_close(ours, theirs, **TOL)


@torch.no_grad()
def test_retfiner_v_features_equal_the_official_model(vit_base):
    official = fixture("retfiner_visionfm_vit")
    x = retbench_input("retfiner.v", vit_base["images"]["oct"])
    model, msg = official.official_retfiner_v(str(vit_base["root"] / "RetFiner_VisionFM.pth"))
    assert set(msg.missing_keys) == {"head.weight", "head.bias"}
    model.head = nn.Identity()  # the probe's input: cat[CLS, mean patch] after the final norm (feat_concat, use_norm)
    theirs = model.eval()(x)
    ours = encode("retfiner.v", vit_base["root"] / "RetFiner_VisionFM.pth", x)
    assert ours.shape == theirs.shape == (1, 1536)
    torch.testing.assert_close(ours, theirs, **TOL)


@pytest.mark.parametrize("tag", ["r", "u", "v"])
def test_retfiner_preprocessing_is_the_probes_transform(vit_base, tag):
    """Identical on grey OCT B-scans; on colour images retbench converts to grey before resizing (``differs``)."""
    from retbench.model_adapters.retfiner import TAGS
    from torchvision.datasets.folder import default_loader

    official = fixture("retfiner_dataset")
    weights = {"r": "RetFiner_RETFound.pth", "u": "RetFiner_UrFound.pth", "v": "vfm_oct_RetFiner_VisionFM.pth"}[tag]
    args = SimpleNamespace(input_modality="bscan", fill=None, data_set="OCTID", init_weights=weights, no_affine=False,
                           input_size=224)
    transform = official.build_transform(args, "test", augment=False)
    oct_scan, colour = vit_base["images"]["oct"], vit_base["images"]["cfp"]
    name = f"retfiner.{tag}"
    torch.testing.assert_close(retbench_input(name, oct_scan)[0], transform(default_loader(oct_scan)), rtol=0, atol=1e-6)
    std = min(TAGS[tag].preprocess.std)
    gap = (retbench_input(name, colour)[0] - transform(default_loader(colour))).abs().max()
    assert 0 < gap <= 1.001 / 255 / std  # one grey level
    assert "at most 1 grey level" in TAGS[tag].differs
