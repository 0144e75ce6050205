"""Fine-tuning protocols (retbench/protocols/finetune.py, retbench/finetune/): end to end on the tiny task with
timm's 0.3M-parameter ``test_vit``, LoRA's trainable parameters, the last-block + head variant, layer decay,
the schedule, opt-in selection, and a kill/resume that reproduces the uninterrupted losses bit for bit."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_tiny_task

import retbench
from retbench.finetune.network import attention_projections, build, layer_ids
from retbench.finetune.recipe import CITATIONS, FinetuneRecipe, recipe_for
from retbench.finetune.trainer import learning_rate
from retbench.protocols import PROTOCOLS
from retbench.protocols.finetune import FINETUNE, FINETUNE_HEAD, FINETUNE_LORA
from retbench.runner import load_task_data, select_protocols
from retbench.tasks import get_task

MODEL = "timm:test_vit"  # 160 px, 8x8 patches... of 16 px, 0.3M parameters, random init
TINY_OVERRIDES = (("epochs", 3), ("batch_size", 8), ("warmup_epochs", 1), ("eval_batch_size", 16))
REPO = Path(__file__).resolve().parents[1]


def tiny_variant(base, name: str):
    """``base`` with the tiny training budget, registered as ``name`` (a test-only protocol)."""
    proto = dataclasses.replace(base, name=name, preset="cpu", overrides=TINY_OVERRIDES)
    if name not in PROTOCOLS:
        PROTOCOLS.register(name, proto)
    return proto


def options(base: Path, **extra) -> dict:
    return {"data_root": str(base / "data"), "results_dir": str(base / "results"), "cache_dir": str(base / "cache"),
            "device": "cpu", "num_workers": 0, **extra}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ft")
    spec_path, _ = make_tiny_task(base)
    return spec_path, base


def test_finetune_end_to_end_result_weights_and_curve(tiny) -> None:
    spec_path, base = tiny
    tiny_variant(FINETUNE, "finetune.test")
    res = retbench.evaluate(MODEL, str(spec_path), "finetune.test", **options(base))
    assert res.status == "done"
    d = res.data
    settings = d["protocol"]["settings"]
    assert settings["recipe"]["epochs"] == 3 and settings["recipe"]["layer_decay"] == 0.65
    assert settings["recipe"]["lr"] == pytest.approx(5e-3 * 8 / 256)
    assert set(settings["citations"]) == set(CITATIONS) and "replication_unit" in settings
    assert settings["network"]["drop_path"]["slots"] > 0
    run = d["runs"][0]
    assert 1 <= run["selected_epoch"] <= 3 and run["epochs"] == 3 and len(run["curve"]) == 3
    assert all(np.isfinite(row["train_loss"]) and "val_score" in row for row in run["curve"])
    # test images are scored once, never fitted or used for selection
    data = load_task_data(str(spec_path), str(base / "data"))
    assert run["predictions"]["index"] == data.splits["test"].tolist()
    assert run["n_fit"] + run["n_val"] == len(data.splits["train"])
    assert d["metrics"]["aca"]["ci95"] is not None and "kappa_unweighted" in d["metrics"]
    folder = res.path.with_suffix("")
    assert (folder / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from safetensors.torch import load_file

    weights = load_file(str(folder / "seed0" / "best.safetensors"))
    assert "head.weight" in weights and len(weights) > 2  # full fine-tuning keeps the encoder too
    assert settings["network"]["trainable_parameters"] == sum(t.numel() for t in weights.values())


def test_lora_trains_only_lora_matrices_and_the_head() -> None:
    from retbench.adapters import load_model

    adapter = load_model(MODEL)
    before = {k: v.clone() for k, v in adapter.model.state_dict().items()}
    recipe = recipe_for("lora", "cpu", lora_rank=4)
    built = build(adapter, 3, 160, recipe, seed=0)
    net = built.net
    targets = attention_projections(torch.nn.ModuleDict({"model": adapter.model}), recipe.lora_targets)
    assert targets and all(t.endswith(("attn.qkv", "attn.proj")) for t in targets)
    assert built.report["lora"]["targets"] == len(targets)
    linears = dict(torch.nn.ModuleDict({"model": adapter.model}).named_modules())
    expected_lora = sum(4 * (linears[t].in_features + linears[t].out_features) for t in targets)
    head = net.head.weight.numel() + net.head.bias.numel()
    trainable = {n: p.numel() for n, p in net.named_parameters() if p.requires_grad}
    assert all("lora_" in n or n.startswith("head.") for n in trainable)
    assert sum(trainable.values()) == expected_lora + head  # LoRA matrices + the classifier head, nothing else
    assert built.report["lora_parameters"] == expected_lora and built.report["trainable_parameters"] == expected_lora + head
    # a training step changes LoRA/head only; the adapter itself is never touched
    frozen = {n: p.detach().clone() for n, p in net.named_parameters() if not p.requires_grad}
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net.train()
    torch.nn.functional.cross_entropy(net(torch.randn(4, 3, 160, 160)), torch.tensor([0, 1, 2, 0])).backward()
    opt.step()
    assert all(torch.equal(p, frozen[n]) for n, p in net.named_parameters() if not p.requires_grad)
    assert all(torch.equal(v, before[k]) for k, v in adapter.model.state_dict().items())


def test_head_mode_trains_last_block_final_norm_and_head() -> None:
    from retbench.adapters import load_model

    adapter = load_model(MODEL)
    built = build(adapter, 3, 160, recipe_for("head", "cpu"), seed=0)
    last = max(int(n.split(".")[3]) for n in built.trainable if ".blocks." in n)
    depth = len(adapter.model.blocks)
    assert last == depth - 1
    assert all(f".blocks.{last}." in n or n.startswith(("encoder.model.norm", "encoder.model.fc_norm", "head."))
               for n in built.trainable)
    assert any("norm" in n and ".blocks." not in n for n in built.trainable)


def test_layer_ids_follow_retfounds_vit_rule() -> None:
    names = ["model.cls_token", "model.pos_embed", "model.patch_embed.proj.weight", "model.blocks.0.attn.qkv.weight",
             "model.blocks.11.mlp.fc2.bias", "model.norm.weight", "head.weight"]
    ids, num_layers = layer_ids(names)
    assert num_layers == 13
    assert [ids[n] for n in names] == [0, 0, 0, 1, 12, 13, 13]
    cnn, top = layer_ids(["model.conv1.weight", "model.layer1.0.conv1.weight", "head.weight"])
    assert top == 1 and set(cnn.values()) == {1}  # no blocks: one layer, no decay (RETFound's ResNet case)


def test_schedule_warms_up_from_zero_then_cosine_to_min_lr() -> None:
    r = FinetuneRecipe(preset="x", epochs=10, warmup_epochs=2, blr=2.56e-2, batch_size=10, min_lr=1e-6)
    assert r.lr == pytest.approx(1e-3)
    assert learning_rate(r, 0.0) == 0.0 and learning_rate(r, 1.0) == pytest.approx(5e-4)
    assert learning_rate(r, 2.0) == pytest.approx(1e-3) and learning_rate(r, 10.0) == pytest.approx(1e-6)


def test_finetune_is_opt_in_on_shipped_tasks() -> None:
    spec = get_task("mx_dme_cfp_dr")
    assert "finetune" not in spec.protocols  # shipped specs (and their hashes) unchanged
    assert select_protocols(spec, ("finetune", "finetune.lora")) == ["finetune", "finetune.lora"]
    assert "finetune" not in select_protocols(spec, ())
    assert FINETUNE.recipe("cuda").preset == "gpu" and FINETUNE.recipe("cpu").preset == "cpu"
    assert FINETUNE_HEAD.mode == "head" and FINETUNE_LORA.recipe("cpu").layer_decay == 1.0


RUNNER = """
import os, sys, dataclasses, signal
from pathlib import Path
import torch
torch.set_num_threads(1)
import retbench
from retbench.protocols import PROTOCOLS
from retbench.protocols.finetune import FINETUNE
from retbench.finetune import trainer
spec, base, kill_after = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
PROTOCOLS.register("finetune.test", dataclasses.replace(FINETUNE, name="finetune.test", preset="cpu",
                   overrides=(("epochs", 4), ("batch_size", 8), ("warmup_epochs", 1), ("eval_batch_size", 16))))
if kill_after:
    def kill(folder, epoch):
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    trainer.CHECKPOINT_HOOKS.append(kill)
retbench.evaluate("timm:test_vit", spec, "finetune.test", data_root=str(base / "data"), results_dir=str(base / "results"),
                  cache_dir=str(base / "cache"), device="cpu", num_workers=0)
"""


def _run(spec: Path, base: Path, kill_after: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RETBENCH_QUIET": "1", "PYTHONPATH": str(REPO / "tests")}
    return subprocess.run([sys.executable, "-c", RUNNER, str(spec), str(base), str(kill_after)], env=env,
                          capture_output=True, text=True, timeout=300)


def test_killed_run_resumes_with_the_uninterrupted_losses(tmp_path: Path) -> None:
    spec, _ = make_tiny_task(tmp_path)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    for d in (whole, killed):
        d.mkdir()
        (d / "data").symlink_to(tmp_path / "data", target_is_directory=True)
    assert _run(spec, whole, 0).returncode == 0
    first = _run(spec, killed, 2)
    assert first.returncode == -9, first.stderr[-2000:]  # SIGKILL right after epoch 2's checkpoint
    result_files = list((killed / "results").rglob("*.json"))
    assert not result_files  # no result was written
    assert _run(spec, killed, 0).returncode == 0
    a, b = (json.loads(next((d / "results").rglob("*.json")).read_text()) for d in (whole, killed))
    run_a, run_b = a["runs"][0], b["runs"][0]
    assert run_b["resumed_from_epoch"] == 2 and run_a["resumed_from_epoch"] == 0
    assert [r["step_losses"] for r in run_a["curve"]] == [r["step_losses"] for r in run_b["curve"]]
    assert [r["val_loss"] for r in run_a["curve"]] == [r["val_loss"] for r in run_b["curve"]]
    assert run_a["predictions"] == run_b["predictions"] and run_a["selected_epoch"] == run_b["selected_epoch"]


def test_lora_result_keeps_only_lora_and_head_weights(tiny) -> None:
    spec_path, base = tiny
    tiny_variant(FINETUNE_LORA, "finetune.lora.test")
    res = retbench.evaluate(MODEL, str(spec_path), "finetune.lora.test", **options(base))
    from safetensors.torch import load_file

    weights = load_file(str(res.path.with_suffix("") / "seed0" / "best.safetensors"))
    assert weights and all("lora_" in k or k.startswith("head.") for k in weights)
    net = res.data["protocol"]["settings"]["network"]
    assert net["trainable_parameters"] == net["lora_parameters"] + net["head_parameters"]
    assert res.data["protocol"]["settings"]["recipe"]["lora_rank"] == 8


def test_image_text_model_trains_only_its_image_path() -> None:
    """A CLIP-style model (tinyclip): the text tower and projections get no gradient from the probe feature, so they
    stay frozen and uncounted; the adapter's own network is a different object."""
    from retbench.adapters import load_model

    adapter = load_model("tinyclip")
    built = build(adapter, 3, 64, recipe_for("full", "cpu"), seed=0)
    trainable = [n for n, p in built.net.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith(("encoder.net.visual.", "head.")) for n in trainable)
    assert built.report["trainable_parameters"] < built.report["parameters"]
    assert built.net.encoder["net"] is not adapter.net


def test_mixup_and_cutmix_train_with_soft_targets(tmp_path: Path) -> None:
    from retbench.adapters import load_model
    from retbench.finetune.trainer import SplitPixels, train_seed

    adapter = load_model("tinyclip")  # 64 px CNN: the cheapest network
    recipe = recipe_for("full", "cpu", epochs=1, batch_size=4, mixup=0.8, cutmix=1.0, warmup_epochs=0)
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 255, (12, 3, 64, 64), dtype=torch.uint8, generator=gen)
    labels = np.array([0, 1, 2] * 4)
    data = SplitPixels(images[:8], labels[:8], images[8:11], labels[8:11], images[11:])
    built = build(adapter, 3, 64, recipe, seed=0)
    r = train_seed(built, data, recipe, adapter.preprocess, 0, tmp_path, "f", torch.device("cpu"), 0, 3)
    assert len(r.curve) == 1 and len(r.curve[0]["step_losses"]) == 2 and np.isfinite(r.curve[0]["train_loss"])
    assert r.test_proba.shape == (1, 3) and (tmp_path / "best.safetensors").is_file()
