"""The contract every registered adapter keeps, checked on every family and weights tag.

Each tag is built with ``--weights random`` (the architecture, untrained, offline) and must
encode images into finite float features deterministically and independently of the batch;
text models must embed texts into the space of their joint image embeddings. Tags of
released models must say where their weights come from, cite the code they follow, and fail
with a one-line error naming the file when the weights are absent.
"""

from __future__ import annotations

import gc
import json

import pytest
import torch

from retbench.adapters import ADAPTERS, Adapter, discover_adapters, list_models, load_model
from retbench.preprocess import Preprocess
from retbench.spec import parse_spec
from retbench.weights import WeightsMissingError

discover_adapters()
# families implemented in retbench itself (no release to cite)
OWN_FAMILIES = {"classical", "tinyclip", "timm", "local"}


NOT_ARCHITECTURE = ("convention", "checkpoint_key", "drop_prefixes", "modality")


def model_names() -> list[str]:
    """One tag per distinct network: tags differing only in their weights file or normalisation share a check."""
    names, seen = [], set()
    for family in ADAPTERS.names():
        cls = ADAPTERS.get(family)
        if cls.open_ended:
            if cls.example_arg:
                names.append(f"{family}:{cls.example_arg}")
            continue
        for tag in cls.tags.values():
            # the same build code, architecture, feature and input size make the same network
            options = {k: v for k, v in tag.options.items() if k not in NOT_ARCHITECTURE}
            network = (cls.build.__qualname__, json.dumps(options, sort_keys=True, default=str), tag.preprocess.size,
                       tag.feature)
            if network not in seen:
                seen.add(network)
                names.append(f"{family}.{tag.name}")
    return names


def released_tags() -> list[str]:
    return [f"{f}.{t}" for f in ADAPTERS.names() if f not in OWN_FAMILIES and not ADAPTERS.get(f).open_ended
            for t in ADAPTERS.get(f).tags]


@pytest.fixture(scope="module")
def images() -> dict[int, torch.Tensor]:
    """Two normalised-looking random images per input size (cached per size)."""
    return {}


def batch_for(adapter: Adapter, cache: dict[int, torch.Tensor]) -> torch.Tensor:
    size = adapter.preprocess.size
    if size not in cache:
        cache[size] = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(size))
    return cache[size]


@pytest.mark.parametrize("name", model_names())
def test_adapter_contract(name, images, tiny_task):
    check_contract(load_model(name, weights="random"), images, tiny_task, random=True)


def test_local_models_keep_the_contract(images, tiny_task, tmp_path):
    """``local:DIR`` has no example argument: build one as the trainers do (tiny ViT + MiniLM)."""
    import timm
    from torch import nn

    from retbench.local_model_format import save_local_model
    from retbench.text_towers import load_text_tower

    vit = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
    vision = timm.create_model(vit["timm"], num_classes=0, **vit["kwargs"])
    tower = load_text_tower("minilm")
    folder = save_local_model(tmp_path / "tiny", vision, vit, Preprocess(size=32), text_tower=tower,
                              visual_proj=nn.Linear(192, 64), text_proj=nn.Linear(tower.dim, 64), logit_scale=3.0)
    check_contract(load_model(f"local:{folder}"), images, tiny_task, random=False)


def check_contract(adapter: Adapter, images: dict[int, torch.Tensor], tiny_task, random: bool) -> None:
    """Features finite, float32, deterministic and batch-independent; text in the joint space."""
    try:
        assert isinstance(adapter.preprocess, Preprocess) and adapter.preprocess.size > 0
        x = batch_for(adapter, images)
        with torch.inference_mode():  # 4 image passes: the large architectures cost seconds each on a CPU
            feats = adapter.encode_image(x)
            single = adapter.encode_image(x[1:])
            again = adapter.encode_image(x[1:])
        assert feats.ndim == 2 and feats.shape[0] == 2 and feats.shape[1] > 0, feats.shape
        assert feats.dtype == torch.float32
        assert torch.isfinite(feats).all()
        assert torch.equal(single, again), "encode_image must be deterministic (eval mode, no dropout)"
        torch.testing.assert_close(single[0], feats[1], rtol=1e-4, atol=1e-4, msg="batch-dependent features")
        info = adapter.describe()
        assert info["name"] == adapter.name
        assert info["weights_identity"].startswith("random-init" if random else "sha256:")
        if adapter.has_text:
            with torch.inference_mode():
                joint = adapter.encode_image_joint(x[:1])
                text = adapter.encode_text(["a fundus photograph of glaucoma", "healthy", "diabetic retinopathy"])
            assert text.shape[0] == 3 and text.shape[1] == joint.shape[1]
            assert torch.isfinite(text).all() and torch.isfinite(joint).all()
            spec = parse_spec(tiny_task[0])
            setup = adapter.zero_shot_setup(spec)
            assert len(setup.prompts) == len(spec.classes) and all(setup.prompts)
            assert setup.logit_scale > 0
    finally:
        del adapter
        gc.collect()


@pytest.mark.parametrize("name", released_tags())
def test_released_tags_document_their_source(name):
    family, _, tag_name = name.partition(".")
    tag = ADAPTERS.get(family).tags[tag_name]
    assert tag.licence and tag.licence != "n/a", f"{name}: licence"
    assert tag.feature, f"{name}: which feature the probes use"
    assert tag.code, f"{name}: the official code followed"
    assert tag.filename and (tag.hub_id or tag.url), f"{name}: the official file and where to download it"


@pytest.mark.parametrize("name", released_tags())
def test_missing_weights_name_the_file(name, tmp_path, monkeypatch):
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(tmp_path))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    family, _, tag_name = name.partition(".")
    tag = ADAPTERS.get(family).tags[tag_name]
    with pytest.raises(WeightsMissingError) as info:
        load_model(name)
    assert tag.filename in str(info.value) and "\n" not in str(info.value)


def test_every_tag_is_listed():
    listed = {row["model"] for row in list_models()}
    assert set(released_tags()) <= listed
    assert {"classical.default", "tinyclip.test"} <= listed
