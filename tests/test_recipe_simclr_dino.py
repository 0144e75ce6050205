"""The simclr and dino pretraining recipes: their losses against hand-computed formulas, the DINO teacher
machinery (centring, EMA, no gradient, multi-crop sizes), and a few real training steps (finite loss,
exact resumption, the export loads as ``local:DIR`` and encodes images)."""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from retbench.pretrain.data import PretrainSet
from retbench.pretrain.recipe import Settings
from retbench.pretrain.recipes.dino import (
    DINO,
    DINOHead,
    dino_loss,
    ema_update,
    teacher_momentum,
    teacher_temperature,
    updated_center,
)
from retbench.pretrain.recipes.simclr import SimCLR, gaussian_blur, nt_xent, solarize
from retbench.pretrain.trainer import PretrainConfig, pretrain, resolve_settings

# ---- SimCLR: NT-Xent --------------------------------------------------------------------------------


def _nt_xent_by_hand(z1: torch.Tensor, z2: torch.Tensor, tau: float) -> float:
    """The paper's Algorithm 1, literally: views 2k−1, 2k are image k's; loops over i, j, k."""
    views = []
    for a, b in zip(z1, z2):
        views += [a.double(), b.double()]
    n2 = len(views)

    def s(i: int, j: int) -> float:
        return float(views[i] @ views[j] / (views[i].norm() * views[j].norm()))

    def ell(i: int, j: int) -> float:
        denom = sum(math.exp(s(i, k) / tau) for k in range(n2) if k != i)
        return -math.log(math.exp(s(i, j) / tau) / denom)

    return sum(ell(2 * k, 2 * k + 1) + ell(2 * k + 1, 2 * k) for k in range(n2 // 2)) / n2


@pytest.mark.parametrize("tau", [0.1, 0.2, 1.0])
def test_nt_xent_equals_hand_computed_formula(tau: float) -> None:
    g = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(5, 7, generator=g) * 3, torch.randn(5, 7, generator=g)
    assert float(nt_xent(z1, z2, tau)) == pytest.approx(_nt_xent_by_hand(z1, z2, tau), rel=1e-5)


def test_nt_xent_rewards_agreeing_views_and_uses_2n_minus_2_negatives() -> None:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 16, generator=g)
    same = float(nt_xent(z, z + 0.01 * torch.randn(6, 16, generator=g), 0.1))
    unrelated = float(nt_xent(z, torch.randn(6, 16, generator=g), 0.1))
    assert same < unrelated
    # with every view identical, each anchor faces 1 positive and 2N-2 equally similar negatives
    ones = torch.ones(4, 3)
    assert float(nt_xent(ones, ones, 0.5)) == pytest.approx(math.log(2 * 4 - 1), rel=1e-6)


def test_blur_and_solarize_are_per_image_and_probabilistic() -> None:
    x = torch.rand(6, 3, 32, 32)
    assert torch.equal(gaussian_blur(x, 0.0), x) and torch.equal(solarize(x, 0.0), x)
    blurred = gaussian_blur(x, 1.0)
    assert blurred.shape == x.shape and blurred.std() < x.std()  # smoothing removes pixel noise
    assert torch.allclose(blurred.mean((2, 3)), x.mean((2, 3)), atol=0.02)
    flat = torch.full((2, 3, 8, 8), 0.75)
    assert torch.allclose(solarize(flat, 1.0), torch.full_like(flat, 0.25))


# ---- DINO: loss, centre, EMA, teacher ---------------------------------------------------------------


def test_dino_loss_is_mean_cross_entropy_over_pairs_of_different_views() -> None:
    g = torch.Generator().manual_seed(1)
    b, k, tt, ts = 3, 5, 0.04, 0.1
    student = [torch.randn(b, k, generator=g) for _ in range(4)]  # 2 global + 2 local views
    teacher = [torch.randn(b, k, generator=g) for _ in range(2)]
    center = torch.randn(1, k, generator=g) * 0.1
    terms = []
    for i in range(2):
        p = torch.softmax((teacher[i] - center) / tt, dim=1)
        for j in range(4):
            if j != i:  # the teacher's view i is never compared with the student's view i
                terms.append(-(p * torch.log_softmax(student[j] / ts, dim=1)).sum(1).mean())
    assert len(terms) == 2 * (4 - 1)
    assert float(dino_loss(student, teacher, center, tt, ts)) == pytest.approx(float(torch.stack(terms).mean()), rel=1e-6)


def test_dino_loss_excludes_same_view_pairs() -> None:
    g = torch.Generator().manual_seed(2)
    student = [torch.randn(4, 6, generator=g) for _ in range(3)]
    teacher = [torch.randn(4, 6, generator=g) for _ in range(2)]
    center = torch.zeros(1, 6)
    base = dino_loss(student, teacher, center, 0.04)
    # replacing what the student says on global view 0 only changes the pair (teacher 1, student 0)
    changed = [torch.randn(4, 6, generator=g)] + student[1:]
    p1 = torch.softmax(teacher[1] / 0.04, dim=1)

    def h(s: torch.Tensor) -> torch.Tensor:
        return -(p1 * torch.log_softmax(s / 0.1, dim=1)).sum(1).mean()

    expected = base + (h(changed[0]) - h(student[0])) / 4
    assert float(dino_loss(changed, teacher, center, 0.04)) == pytest.approx(float(expected), rel=1e-6)
    # and a student that copies the teacher on the *same* view gains nothing from it
    copy_same = [teacher[0].clone(), teacher[1].clone(), student[2]]
    swapped = [teacher[1].clone(), teacher[0].clone(), student[2]]
    assert float(dino_loss(swapped, teacher, center, 0.04, 0.04)) < float(dino_loss(copy_same, teacher, center, 0.04, 0.04))


def test_dino_loss_gradient_reaches_student_only() -> None:
    s = [torch.randn(2, 4, requires_grad=True) for _ in range(2)]
    t = [torch.randn(2, 4, requires_grad=True) for _ in range(2)]
    dino_loss(s, t, torch.zeros(1, 4), 0.04).backward()
    assert all(x.grad is not None for x in s) and all(x.grad is None for x in t)


def test_center_update_is_ema_of_teacher_batch_mean() -> None:
    c = torch.tensor([[1.0, -1.0, 0.0]])
    t = [torch.tensor([[0.0, 2.0, 4.0], [2.0, 0.0, 0.0]]), torch.tensor([[4.0, 2.0, 0.0], [2.0, 0.0, 0.0]])]
    batch_mean = torch.tensor([[2.0, 1.0, 1.0]])
    assert torch.allclose(updated_center(c, t, 0.9), 0.9 * c + 0.1 * batch_mean)


def test_ema_update_equals_formula_and_momentum_schedule() -> None:
    torch.manual_seed(0)
    student, teacher = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))
    student[1].running_mean.fill_(2.0)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    ema_update(teacher, student, 0.99)
    for k, v in teacher.state_dict().items():
        if v.is_floating_point():
            assert torch.allclose(v, 0.99 * before[k] + 0.01 * student.state_dict()[k]), k
    assert teacher_momentum(0, 100, 0.996) == pytest.approx(0.996)
    assert teacher_momentum(50, 100, 0.996) == pytest.approx(0.998)
    assert teacher_momentum(100, 100, 0.996) == pytest.approx(1.0)
    assert teacher_temperature(0, 10, 0.04, 0.07) == pytest.approx(0.04)
    assert teacher_temperature(5, 10, 0.04, 0.07) == pytest.approx(0.055)
    assert teacher_temperature(10, 10, 0.04, 0.07) == teacher_temperature(99, 0, 0.04, 0.07) == 0.07


def test_dino_head_last_layer_is_weight_normalised() -> None:
    head = DINOHead(8, 32, hidden_dim=16, bottleneck_dim=6)
    x = torch.randn(5, 8)
    out = head(x)
    with torch.no_grad():
        head.last_direction.mul_(7.0)  # only directions matter: rescaling a row changes nothing
    assert torch.allclose(head(x), out, atol=1e-6)
    assert out.abs().max() <= 1.0 + 1e-5  # unit vector · unit rows
    head(x, freeze_last=True).sum().backward()
    assert head.last_direction.grad is None and head.mlp[0].weight.grad is not None


def _tiny_settings(recipe: type, **extra: object) -> Settings:
    s = resolve_settings(PretrainConfig(recipe=recipe.name, data=("x",), out="unused", image_size=32, batch_size=4, steps=10))
    if recipe is DINO:
        extra = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16, "local_crops": 2, **extra}
    return replace(s, extra={**s.extra, **extra})


def _random_set(n: int = 8, size: int = 37) -> PretrainSet:
    g = torch.Generator().manual_seed(0)
    return PretrainSet(pixels=torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8),
                       items=[None] * n, label_names=[])  # type: ignore[list-item]


def test_dino_teacher_gets_no_gradient_and_follows_the_student() -> None:
    torch.manual_seed(0)
    rec = DINO(_tiny_settings(DINO, freeze_last_steps=0), _random_set()).train()
    assert not rec.teacher.training and rec.student.training  # teacher: eval mode, no drop-path
    assert all(torch.equal(a, b) for a, b in zip(rec.teacher.parameters(), rec.student.parameters()))
    assert not any(p.requires_grad for p in [*rec.teacher.parameters(), *rec.teacher_head.parameters()])
    out = rec.training_loss(torch.arange(4))
    assert torch.isfinite(out["loss"])
    out["loss"].backward()
    assert all(p.grad is None for p in [*rec.teacher.parameters(), *rec.teacher_head.parameters()])
    assert all(p.grad is not None for p in rec.student_head.parameters())
    # a student step, then after_step: teacher = m·teacher + (1-m)·student, centre moves, step counted
    teacher_before = [p.clone() for p in rec.teacher.parameters()]
    batch_mean = torch.cat(rec._batch_teacher).mean(0, keepdim=True)
    with torch.no_grad():
        for p in rec.student.parameters():
            p.add_(0.1)
    rec.after_step(0)
    m = teacher_momentum(0, 10, rec.settings.extra["momentum"])
    for t0, t1, s in zip(teacher_before, rec.teacher.parameters(), rec.student.parameters()):
        assert torch.allclose(t1, m * t0 + (1 - m) * s, atol=1e-6)
    assert torch.allclose(rec.teacher_center, 0.1 * batch_mean, atol=1e-6)
    assert int(rec.steps_done) == 1


def test_dino_multicrop_views_and_vit_dynamic_size() -> None:
    torch.manual_seed(0)
    rec = DINO(_tiny_settings(DINO), _random_set())
    assert rec.vision_cfg["kwargs"]["dynamic_img_size"] is True
    globals_, locals_ = rec.crops(rec.pixels(torch.arange(4)))
    assert [v.shape[-1] for v in globals_] == [32, 32] and [v.shape[-1] for v in locals_] == [16, 16]
    assert rec.teacher(locals_[0]).shape == rec.teacher(globals_[0]).shape  # one network for both sizes
    # the frozen last layer gets no gradient during the first freeze_last_steps steps
    frozen = DINO(_tiny_settings(DINO, freeze_last_steps=5), _random_set())
    frozen.training_loss(torch.arange(4))["loss"].backward()
    assert frozen.student_head.last_direction.grad is None


def test_simclr_views_and_head() -> None:
    torch.manual_seed(0)
    rec = SimCLR(_tiny_settings(SimCLR), _random_set()).train()
    x = rec.pixels(torch.arange(4))
    v1, v2 = rec.view(x), rec.view(x)
    assert v1.shape == (4, 3, 32, 32) and not torch.allclose(v1, v2)  # independent augmentations
    out = rec.training_loss(torch.arange(4))
    assert torch.isfinite(out["loss"]) and 0 <= float(out["positive_top1"]) <= 1
    assert set(rec.export()) == {"vision", "vision_cfg"} and rec.export()["vision"] is rec.encoder


# ---- a few real steps: finite, resumable, exported as local: ---------------------------------------


class _InterruptedError(Exception):
    """Stands for a run killed in the middle of training."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hash_cache")


# small timm test architectures keep the three short runs per recipe fast; the preset architectures are
# exercised above (32 px). test_vit is a patch-16 ViT without dynamic_img_size: the recipe must add it.
@pytest.mark.parametrize(("recipe", "arch"), [("simclr", "test_resnet"), ("dino", "test_vit")])
def test_pretrain_resumes_exactly_and_exports_local_model(recipe: str, arch: str, data_root: Path, tmp_path: Path,
                                                          cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from retbench.adapters import load_model
    from retbench.pretrain.recipe import RECIPES

    def run(out: Path) -> Path:
        return pretrain(PretrainConfig(recipe=recipe, data=("csdi_cataract_severity",), out=str(out), steps=4,
                                       arch=arch, image_size=32, batch_size=8, checkpoint_every=2,
                                       data_root=str(data_root), exclude=("csdi_cataract_severity",),
                                       cache_dir=str(cache_dir)))

    straight = run(tmp_path / "straight")
    cls = RECIPES.get(recipe)
    original = cls.after_step

    def crash_at_third_step(self: object, step: int) -> None:
        original(self, step)  # type: ignore[arg-type]
        if step == 2:
            raise _InterruptedError

    with monkeypatch.context() as m:
        m.setattr(cls, "after_step", crash_at_third_step)
        with pytest.raises(_InterruptedError):
            run(tmp_path / "resumed")  # dies after step 3, whose checkpoint was never written
    resumed = run(tmp_path / "resumed")  # continues from the step-2 checkpoint
    log = json.loads((straight / "loss.json").read_text())
    assert len(log) == 4 and all(math.isfinite(r["loss"]) for r in log)
    assert json.loads((resumed / "loss.json").read_text()) == log
    model = load_model(f"local:{straight}")
    feats = model.encode_image(torch.rand(2, 3, 32, 32))
    assert feats.shape[0] == 2 and torch.isfinite(feats).all()
    if recipe == "dino":  # the exported weights are the teacher's, rebuilt with dynamic_img_size
        from safetensors.torch import load_file

        config = json.loads((straight / "retbench_model.json").read_text())
        assert config["vision"]["kwargs"]["dynamic_img_size"] is True
        saved = load_file(str(straight / "model.safetensors"))
        ckpt = torch.load(straight / "training" / "last.pt", map_location="cpu", weights_only=True)["model"]
        keys = [k for k in saved if k.startswith("visual.")]
        assert keys and all(torch.equal(saved[k], ckpt["teacher." + k[len("visual."):]]) for k in keys)
        assert not all(torch.equal(saved[k], ckpt["student." + k[len("visual."):]]) for k in keys)
