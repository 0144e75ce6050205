"""The pretraining loop (with the MAE recipe): settings, determinism, resumption, export, CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from retbench.adapters import load_model
from retbench.cli import main
from retbench.errors import RetbenchError
from retbench.pretrain.cli import parse_options
from retbench.pretrain.recipe import RECIPES
from retbench.pretrain.recipes.mae import patchify, sincos_2d
from retbench.pretrain.trainer import PretrainConfig, batch_indices, learning_rate, pretrain, resolve_settings

TASK = "csdi_cataract_severity"  # 187 real CFP; small enough to decode in seconds


@pytest.fixture
def config(tmp_path, data_root) -> PretrainConfig:
    return PretrainConfig(recipe="mae", data=(TASK,), out=str(tmp_path / "mae"), steps=4, batch_size=8, image_size=32,
                          checkpoint_every=2, exclude=(TASK,), data_root=str(data_root), cache_dir=str(tmp_path / "cache"),
                          device="cpu")


def test_every_recipe_is_registered():
    assert set(RECIPES.names()) >= {"mae", "flair", "simclr", "dino", "retfiner", "eyeclip"}


def test_settings_come_from_the_preset_with_overrides(config):
    s = resolve_settings(config)
    assert (s.image_size, s.steps, s.batch_size) == (32, 4, 8)
    assert s.vision["kwargs"]["img_size"] == 32 and s.lr == RECIPES.get("mae").presets["cpu"].lr
    with pytest.raises(RetbenchError, match="no preset 'tpu'"):
        resolve_settings(replace(config, preset="tpu"))


def test_recipe_options_override_the_preset_and_unknown_keys_are_named(config):
    s = resolve_settings(replace(config, options=(("mask_ratio", 0.5), ("norm_pix_loss", False))))
    assert s.extra["mask_ratio"] == 0.5 and s.extra["norm_pix_loss"] is False
    assert s.extra["decoder_depth"] == RECIPES.get("mae").presets["cpu"].extra["decoder_depth"]
    with pytest.raises(RetbenchError, match="no option 'mask_ratoi'; its options: decoder_depth"):
        resolve_settings(replace(config, options=(("mask_ratoi", 0.5),)))
    assert parse_options(["mask_ratio=0.6", "norm_pix_loss=false", "name=abc"]) == (
        ("mask_ratio", 0.6), ("norm_pix_loss", False), ("name", "abc"))
    with pytest.raises(RetbenchError, match="expected KEY=VALUE"):
        parse_options(["mask_ratio"])


def test_schedule_and_batches_are_deterministic(config):
    s = resolve_settings(replace(config, steps=100))
    lrs = [learning_rate(s, i) for i in range(100)]
    assert lrs[0] < lrs[9] == pytest.approx(s.lr) and lrs[-1] < 0.01 * s.lr  # warm-up then cosine to ~0
    first_epoch = torch.cat([batch_indices(20, 5, 0, step) for step in range(4)])
    assert sorted(first_epoch.tolist()) == list(range(20))  # an epoch visits every image once
    assert torch.equal(batch_indices(20, 5, 0, 6), batch_indices(20, 5, 0, 6))
    assert not torch.equal(batch_indices(20, 5, 1, 0), batch_indices(20, 5, 0, 0))


def test_mae_helpers():
    x = torch.arange(2 * 3 * 4 * 4, dtype=torch.float32).reshape(2, 3, 4, 4)
    p = patchify(x, 2)
    assert p.shape == (2, 4, 12)
    assert torch.equal(p[0, 1].reshape(2, 2, 3)[..., 0], x[0, 0, 0:2, 2:4])  # patch (row 0, col 1), red channel
    emb = sincos_2d(8, 3)
    assert emb.shape == (9, 8) and torch.allclose(emb[0, :2], torch.tensor([0.0, 0.0]))  # sin(0) at the origin


def test_pretrain_exports_a_local_model_with_card_and_curve(config):
    before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    out = pretrain(replace(config, options=(("norm_pix_loss", False),), threads=before[0] + 1))
    # training pins threads and deterministic algorithms for itself; the caller's process gets its own back
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == before
    card_json = json.loads((out / "retbench_model.json").read_text())["card"]
    assert card_json["determinism"]["threads"] == before[0] + 1 and card_json["determinism"]["deterministic_algorithms"]
    log = json.loads((out / "loss.json").read_text())
    assert [r["step"] for r in log] == [1, 2, 3, 4] and all(r["loss"] > 0 for r in log)
    report = json.loads((out / "data_report.json").read_text())
    assert report["held_out_tasks"] == [TASK] and report["images_kept"] <= report["images_found"]
    card = (out / "MODEL_CARD.md").read_text()
    assert "mae" in card and TASK in card and "![loss](loss.png)" in card
    assert "mask_ratio=0.75, norm_pix_loss=False" in card
    assert (out / "loss.png").stat().st_size > 1000
    model = load_model(f"local:{out}")
    assert model.preprocess.size == 32
    feats = model.encode_image(torch.randn(2, 3, 32, 32))
    assert feats.shape == (2, 192) and torch.isfinite(feats).all()


def test_an_interrupted_run_resumes_to_the_same_losses(config, tmp_path, monkeypatch):
    straight = pretrain(replace(config, out=str(tmp_path / "straight")))
    expected = json.loads((straight / "loss.json").read_text())

    from retbench.pretrain.recipes import mae

    calls = {"n": 0}
    original = mae.MAE.training_loss

    def crash_at_third_step(self, indices):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # as if killed after the step-2 checkpoint
        return original(self, indices)

    monkeypatch.setattr(mae.MAE, "training_loss", crash_at_third_step)
    resumed_dir = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        pretrain(replace(config, out=str(resumed_dir)))
    assert (resumed_dir / "training" / "last.pt").is_file() and not (resumed_dir / "retbench_model.json").exists()
    monkeypatch.setattr(mae.MAE, "training_loss", original)
    pretrain(replace(config, out=str(resumed_dir)))
    assert json.loads((resumed_dir / "loss.json").read_text()) == expected
    with pytest.raises(RetbenchError, match="different settings.*lr"):
        pretrain(replace(config, out=str(resumed_dir), lr=0.5))


def test_cli_pretrain(tmp_path, data_root, capsys):
    out = tmp_path / "cli_mae"
    rc = main(["pretrain", "--recipe", "mae", "--data", TASK, "--out", str(out), "--steps", "2", "--batch-size", "4",
               "--image-size", "32", "--exclude", TASK, "--data-root", str(data_root), "--device", "cpu",
               "--cache-dir", str(tmp_path / "c")])
    assert rc == 0 and (out / "retbench_model.json").is_file()
    assert main(["pretrain", "--recipe", "nope", "--data", TASK, "--out", str(out)]) == 2
    assert "unknown recipe 'nope'" in capsys.readouterr().err


def test_loss_curve_leaves_the_callers_matplotlib_alone(tmp_path) -> None:
    """The trainer draws with Figure + FigureCanvasAgg: a notebook's backend stays, pyplot is never imported."""
    import subprocess
    import sys

    code = ("import sys, types, matplotlib; from pathlib import Path; matplotlib.use('svg'); "
            "from retbench.pretrain.trainer import _plot_loss; "
            "_plot_loss([{'step': 1, 'lr': 0.1, 'loss': 2.0}, {'step': 2, 'lr': 0.1, 'loss': 1.0}], Path(sys.argv[1]), "
            "types.SimpleNamespace(recipe='mae', preset='cpu', seed=0)); "
            "assert matplotlib.get_backend() == 'svg', matplotlib.get_backend(); "
            "assert 'matplotlib.pyplot' not in sys.modules; "
            "assert Path(sys.argv[1]).read_bytes()[:8] == b'\\x89PNG\\r\\n\\x1a\\n'")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "loss.png")], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
