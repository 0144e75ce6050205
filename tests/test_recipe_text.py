"""The image-text recipes flair, retfiner and eyeclip: their objectives on hand-made inputs, and short real runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from retbench.data.dedup import ImageItem
from retbench.pretrain.data import PretrainItem, PretrainSet, collect
from retbench.pretrain.recipes import _text_common as tc
from retbench.pretrain.recipes.eyeclip import EyeCLIP, multimodal_eyes, sample_pairs
from retbench.pretrain.recipes.flair import Flair
from retbench.pretrain.recipes.retfiner import RetFiner, hard_negatives, mask_tokens
from retbench.pretrain.trainer import PretrainConfig, pretrain, resolve_settings

MX = ("mx_dme_cfp_dr", "mx_dme_oct_dme")


def item(source: str = "t", label: int = -1, texts: tuple[str, ...] = (), eye: str = "", modality: str = "cfp",
         n: int = 0) -> PretrainItem:
    return PretrainItem(ImageItem(source, f"img{n}", f"key{n}", lambda: None), modality, label, texts, eye)


def fake_set(items: list[PretrainItem], labels: list[str] = (), size: int = 37) -> PretrainSet:
    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (len(items), 3, size, size), generator=g, dtype=torch.uint8)
    return PretrainSet(pixels, items, list(labels))


# ---- FLAIR: label-aware targets --------------------------------------------------------------------------
def test_flair_targets_make_same_label_images_mutual_positives():
    labels = ["eye4class:normal", "mx_dme_cfp_dr:no diabetic retinopathy", "csdi_cataract_severity:normal"]
    data = fake_set([item(label=0), item(label=1), item(label=2), item(label=0), item(texts=("a report",))], labels)
    texts = ["A fundus photograph of healthy", "A fundus photograph of no microaneurysms", "A fundus photograph of normal",
             "A fundus photograph of no lesion signs", "a report"]
    keys = Flair.category_keys(SimpleNamespace(data=data), torch.arange(5), texts)
    assert keys[0] == keys[2] == keys[3] == "class:normal"  # one category across tasks, whatever description was drawn
    target = tc.key_targets(keys)
    third = 1 / 3
    assert torch.allclose(target, torch.tensor([[third, 0, third, third, 0], [0, 1, 0, 0, 0], [third, 0, third, third, 0],
                                                [third, 0, third, third, 0], [0, 0, 0, 0, 1.0]]))
    assert torch.allclose(target.sum(1), torch.ones(5))


def test_keyed_contrastive_loss_is_the_seed_equations():
    torch.manual_seed(0)
    a = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    b = torch.nn.functional.normalize(torch.randn(4, 6), dim=1)
    keys, s = ["x", "y", "x", "z"], torch.tensor(7.0)
    pos = [[j for j in range(4) if keys[j] == keys[i]] for i in range(4)]
    sim = (s * a @ b.t()).tolist()
    i2t = sum(-sum(sim[i][p] - math.log(sum(math.exp(sim[i][j]) for j in range(4))) for p in pos[i]) / len(pos[i])
              for i in range(4)) / 4  # equation 1 (mean over images)
    t2i = sum(-sum(sim[p][j] - math.log(sum(math.exp(sim[i][j]) for i in range(4))) for p in pos[j]) / len(pos[j])
              for j in range(4)) / 4  # equation 2 (mean over texts)
    assert tc.keyed_contrastive_loss(a, b, s, keys).item() == pytest.approx((i2t + t2i) / 2, rel=1e-5)
    assert tc.keyed_contrastive_loss(a, b, s, list("abcd")).item() == pytest.approx(  # distinct keys: CLIP
        0.5 * (torch.nn.functional.cross_entropy(s * a @ b.t(), torch.arange(4))
               + torch.nn.functional.cross_entropy(s * b @ a.t(), torch.arange(4))).item(), rel=1e-5)


def test_texts_are_drawn_per_step_from_the_class_descriptions_and_name():
    data = fake_set([item(label=0, texts=("few microaneurysms", "few hard exudates")), item()], ["t:mild dr"])
    seen = set()
    for seed in range(40):
        torch.manual_seed(seed)
        texts = tc.sample_texts(data.items, torch.tensor([0, 1]), data.label_names, "A fundus photograph of {}", True)
        assert texts[1] is None
        seen.add(texts[0])
    assert seen == {f"A fundus photograph of {t}" for t in ("few microaneurysms", "few hard exudates", "mild dr")}
    torch.manual_seed(3)
    first = tc.sample_texts(data.items, torch.tensor([0] * 6))
    torch.manual_seed(3)
    assert tc.sample_texts(data.items, torch.tensor([0] * 6)) == first  # torch RNG: reproducible per step


def test_temperature_starts_at_1_over_0_07_and_is_clamped_at_100():
    joint = tc.JointSpace(8, 4, 3)
    assert joint.scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        joint.logit_scale.fill_(9.0)
    assert joint.scale().item() == pytest.approx(100.0)
    joint.clamp_()
    assert joint.logit_scale.item() == pytest.approx(math.log(100)) and joint.export()["logit_scale"] <= math.log(100)


# ---- RetFiner: ITC / ITM / MLM / GM ------------------------------------------------------------------------
def test_itm_hard_negatives_never_pick_the_positive():
    texts = ["disc visible", "disc visible", "dense haze", "clear media", "mild blur"]
    positive = tc.equality(texts) > 0
    torch.manual_seed(0)
    sim = 40 * positive.float() + torch.randn(5, 5)  # positives are by far the most similar
    for _ in range(200):
        neg, valid = hard_negatives(sim, positive)
        assert valid.all() and not positive[torch.arange(5), neg].any()
    neg, valid = hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))
    assert not valid.any()  # nothing to draw from: the row is skipped
    hardest = torch.tensor([[0.0, 5.0, -5.0], [5.0, 0.0, -5.0], [5.0, -5.0, 0.0]])
    picks = torch.stack([hard_negatives(hardest, torch.eye(3, dtype=torch.bool))[0] for _ in range(300)])
    assert (picks[:, 0] == 1).float().mean() > 0.95  # drawn ∝ softmax(similarity): the hardest dominates


def test_mlm_masking_spares_special_tokens():
    torch.manual_seed(0)
    ids = torch.randint(1000, 2000, (64, 40))
    ids[:, 0], ids[:, -1] = 101, 102
    special = (ids == 101) | (ids == 102)
    out, labels = mask_tokens(ids, special, 103, torch.arange(1000, 2000), 0.15)
    chosen = labels >= 0
    assert not chosen[special].any() and torch.equal(labels[chosen], ids[chosen])
    assert 0.12 < chosen.float().mean().item() / (1 - special.float().mean().item()) < 0.18
    assert 0.7 < (out[chosen] == 103).float().mean().item() < 0.9 and torch.equal(out[~chosen], ids[~chosen])


@pytest.fixture(scope="module")
def retfiner():
    texts = ["the optic disc is visible", "the optic disc is visible", "severe cataract with dense haze",
             "no abnormality, the macula is clear"]
    data = fake_set([item(texts=(t,), n=i) for i, t in enumerate(texts)])
    settings = resolve_settings(PretrainConfig(recipe="retfiner", data=("x",), out="x", image_size=32, batch_size=4))
    torch.manual_seed(0)
    return RetFiner(settings, data)


def test_retfiner_objectives_are_finite_and_cross_attention_serves_only_itm_mlm_gm(retfiner):
    torch.manual_seed(1)
    retfiner.train()
    parts = retfiner.objectives(torch.arange(4))
    assert set(parts) == {"itc", "itm", "mlm", "gm"}
    assert all(torch.isfinite(v) and v > 0 for v in parts.values())
    cross = list(retfiner.cross.parameters())
    assert all(g is None for g in torch.autograd.grad(parts["itc"], cross, retain_graph=True, allow_unused=True))
    for name in ("itm", "mlm", "gm"):
        grads = torch.autograd.grad(parts[name], cross, retain_graph=True, allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads), name
    assert len(retfiner.vocab_ids) < 100  # CPU preset: the corpus's own tokens as output vocabulary


def test_retfiner_gm_is_causal_and_mlm_bidirectional(retfiner):
    retfiner.eval()
    batch = tc.tokenize(retfiner.text, ["severe cataract with dense haze"])
    ids, mask = batch["input_ids"], batch["attention_mask"]
    changed = ids.clone()
    changed[0, -2] = retfiner.vocab_ids[5]  # another word just before [SEP]
    image = retfiner.image_to_text(torch.randn(1, 17, retfiner.vision.num_features))
    with torch.no_grad():
        for causal in (True, False):
            h1 = retfiner.fuse(retfiner.embed_tokens(ids), mask, image, 0, causal)
            h2 = retfiner.fuse(retfiner.embed_tokens(changed), mask, image, 0, causal)
            same_prefix = torch.allclose(h1[0, :-2], h2[0, :-2], atol=1e-5)
            assert same_prefix == causal


# ---- EyeCLIP: cross-modal pairs and weights ------------------------------------------------------------------
def test_eyeclip_pairs_are_same_eye_cfp_oct_only(data_root):
    items, _ = collect(list(MX), data_root)
    eyes = multimodal_eyes(items)
    assert len(eyes) >= 10 and all(set(e) == {"cfp", "oct"} for e in eyes)  # train-split eyes with both modalities
    torch.manual_seed(0)
    for _ in range(20):
        a, b = sample_pairs(eyes, 12)
        assert len(a) == 12 and len({items[i].eye for i in a.tolist()}) == 12  # distinct eyes: no false negatives
        for i, j in zip(a.tolist(), b.tolist()):
            assert items[i].eye == items[j].eye and {items[i].modality, items[j].modality} == {"cfp", "oct"}
    # the same patient/eye string in two unrelated datasets is not an eye seen twice
    other = [item("eye4class", eye="p:7:left", modality="cfp"), item("mx_dme_oct_dme", eye="p:7:left", modality="oct")]
    assert multimodal_eyes(other) == []
    assert multimodal_eyes(other + [item("mx_dme_cfp_dr", eye="p:7:left", modality="cfp")]) != []


def test_eyeclip_weights_follow_the_seed():
    for preset in EyeCLIP.presets.values():
        assert preset.extra["weights"] == {"itc": 0.75, "iic": 0.75, "mae": 1.0}


def test_local_vision_init_takes_the_folders_arch_and_resamples_positions(tmp_path):
    import timm

    from retbench.local_model_format import save_local_model
    from retbench.preprocess import Preprocess

    cfg = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 48, "patch_size": 8, "depth": 2, "global_pool": "avg",
                                                      "fc_norm": False}}
    torch.manual_seed(0)
    vit = timm.create_model(cfg["timm"], num_classes=0, **cfg["kwargs"])
    save_local_model(tmp_path / "m", vit, cfg, Preprocess(size=48))
    same, same_cfg = tc.load_local_vision(str(tmp_path / "m"), 48)
    assert same_cfg == cfg and all(torch.equal(v, vit.state_dict()[k]) for k, v in same.state_dict().items())
    small, small_cfg = tc.load_local_vision(str(tmp_path / "m"), 32)
    assert small_cfg["kwargs"]["img_size"] == 32 and small_cfg["kwargs"]["depth"] == 2
    assert small.pos_embed.shape == (1, 1 + 16, 192) and torch.equal(small.blocks[1].mlp.fc1.weight, vit.blocks[1].mlp.fc1.weight)
    assert small(torch.randn(1, 3, 32, 32)).shape == (1, 192)


# ---- real runs: a few steps, export, zero-shot text path, resumption -------------------------------------------
RUNS = {
    "flair": (("mx_dme_cfp_dr",), ("mx_dme_cfp_dr",), set()),
    "retfiner": (("csdi-reports",), ("csdi_cataract_severity",), {"itc", "itm", "mlm", "gm"}),
    "eyeclip": (MX, MX, {"itc", "iic", "mae"}),
}


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("phash"))


def run_config(name: str, out, data_root, cache_dir: str) -> PretrainConfig:
    data, exclude, _ = RUNS[name]
    return PretrainConfig(recipe=name, data=data, out=str(out), steps=3, batch_size=8, image_size=32, checkpoint_every=2,
                          exclude=exclude, data_root=str(data_root), cache_dir=cache_dir, device="cpu")


@pytest.mark.parametrize("name", list(RUNS))
def test_real_run_exports_a_zero_shot_model_and_resumes_exactly(name, tmp_path, data_root, cache_dir, monkeypatch):
    from retbench.adapters import load_model
    from retbench.pretrain.recipe import RECIPES
    from retbench.tasks import get_task

    config = run_config(name, tmp_path / "straight", data_root, cache_dir)
    if name == "retfiner":  # refine an existing encoder: the architecture comes from the init folder
        import timm

        from retbench.local_model_format import save_local_model
        from retbench.preprocess import Preprocess

        cfg = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 48, "patch_size": 8, "depth": 3}}
        save_local_model(tmp_path / "init", timm.create_model(cfg["timm"], num_classes=0, **cfg["kwargs"]), cfg,
                         Preprocess(size=48))
        config = replace(config, init=f"local:{tmp_path / 'init'}")
    out = pretrain(config)
    log = json.loads((out / "loss.json").read_text())
    parts = RUNS[name][2]
    assert [r["step"] for r in log] == [1, 2, 3] and set(log[0]) == {"step", "lr", "loss", *parts}
    assert all(math.isfinite(r["loss"]) and r["loss"] > 0 for r in log)
    weights = RECIPES.get(name).presets["cpu"].extra.get("weights")
    if weights:
        assert all(r["loss"] == pytest.approx(sum(weights[k] * r[k] for k in parts), abs=1e-4) for r in log)
    model = load_model(f"local:{out}")
    embed = RECIPES.get(name).presets["cpu"].extra["embed_dim"]
    pixels = torch.randn(2, 3, 32, 32)
    assert model.preprocess.size == 32 and torch.isfinite(model.encode_image(pixels)).all()
    assert model.encode_image_joint(pixels).shape == (2, embed)
    text = model.encode_text(["glaucoma", "diabetic macular edema", "normal"])
    assert text.shape == (3, embed) and torch.isfinite(text).all()
    setup = model.zero_shot_setup(get_task("mx_dme_cfp_dr"))
    assert 1.0 <= setup.logit_scale <= 100.0
    if name == "retfiner":
        assert model.config.timm_kwargs["depth"] == 3 and model.config.timm_kwargs["img_size"] == 32

    cls = RECIPES.get(name)
    original, calls = cls.training_loss, {"n": 0}

    def crash_at_third_step(self, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed after the step-2 checkpoint
        return original(self, indices)

    monkeypatch.setattr(cls, "training_loss", crash_at_third_step)
    resumed = replace(config, out=str(tmp_path / "resumed"))
    with pytest.raises(KeyboardInterrupt):
        pretrain(resumed)
    monkeypatch.setattr(cls, "training_loss", original)
    pretrain(resumed)
    assert json.loads((tmp_path / "resumed" / "loss.json").read_text()) == log
