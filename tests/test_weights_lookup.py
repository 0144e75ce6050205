"""Where checkpoints are found, how they are read safely, and the error when they are missing."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from retbench.adapters import file_sha256, load_model
from retbench.errors import RetbenchError
from retbench.weights import WeightsMissingError, load_checkpoint, load_state_dict, resolve_file


@pytest.fixture
def no_hub(monkeypatch, tmp_path):
    """No RETBENCH_WEIGHTS, an empty Hugging Face cache, offline."""
    monkeypatch.delenv("RETBENCH_WEIGHTS", raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def test_explicit_file_and_folder(tmp_path, no_hub):
    f = tmp_path / "ckpt" / "model.pth"
    f.parent.mkdir()
    f.write_bytes(b"x")
    assert resolve_file("m", "model.pth", explicit=str(f)) == f
    assert resolve_file("m", "model.pth", explicit=str(f.parent)) == f
    with pytest.raises(RetbenchError, match="weights file not found: .*nope.pth"):
        resolve_file("m", "model.pth", explicit=str(tmp_path / "nope.pth"))


@pytest.mark.parametrize("sub", ["", "retfound", "retfound.cfp", "YukunZhou/RETFound_mae_natureCFP"])
def test_retbench_weights_folder_layouts(tmp_path, monkeypatch, no_hub, sub):
    root = tmp_path / "weights"
    f = root / sub / "RETFound_mae_natureCFP.pth"
    f.parent.mkdir(parents=True)
    f.write_bytes(b"x")
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(root))
    found = resolve_file("retfound.cfp", "RETFound_mae_natureCFP.pth", hub_id="YukunZhou/RETFound_mae_natureCFP",
                         subdirs=("retfound", "retfound.cfp"))
    assert found == f


def test_hugging_face_cache_is_used_offline(tmp_path, no_hub):
    repo = tmp_path / "hf-cache" / "models--org--model"
    commit = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(b"x")
    found = resolve_file("m", "model.safetensors", hub_id="org/model")
    assert found.resolve() == (snap / "model.safetensors").resolve()


def test_missing_weights_error_is_one_line_and_says_what_to_do(tmp_path, monkeypatch, no_hub):
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(tmp_path / "w"))
    with pytest.raises(WeightsMissingError) as info:
        resolve_file("retfound.cfp", "RETFound_mae_natureCFP.pth", hub_id="YukunZhou/RETFound_mae_natureCFP", gated=True)
    msg = str(info.value)
    assert "\n" not in msg
    for part in ("retfound.cfp", "RETFound_mae_natureCFP.pth", "https://huggingface.co/YukunZhou/RETFound_mae_natureCFP",
                 "gated", str(tmp_path / "w"), "--weights"):
        assert part in msg
    with pytest.raises(WeightsMissingError, match="https://example.org/dl"):
        resolve_file("x", "x.pth", url="https://example.org/dl")


def test_checkpoints_are_read_without_executing_code(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": Path("/")}, path)  # a pickled object beyond tensors
    with pytest.raises(RetbenchError, match="cannot load weights .*evil.pth safely"):
        load_checkpoint(path)


def test_training_checkpoints_with_argparse_namespace_and_legacy_format_load(tmp_path):
    import argparse

    path = tmp_path / "mae.pth"
    torch.save({"model": {"w": torch.ones(2)}, "args": argparse.Namespace(lr=1e-3)}, path)
    assert list(load_state_dict(path)) == ["w"]
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)  # pre-1.6 format: no mmap
    assert torch.equal(load_state_dict(path)["w"], torch.ones(2))


def test_state_dict_unwrapping_and_keys(tmp_path):
    path = tmp_path / "ckpt.pth"
    torch.save({"teacher": {"module.backbone.w": torch.ones(2)}, "epoch": 3}, path)
    assert list(load_state_dict(path, key="teacher")) == ["backbone.w"]
    with pytest.raises(RetbenchError, match="no key 'student'.*teacher"):
        load_state_dict(path, key="student")
    torch.save({"model_state_dict": {"a": torch.zeros(1)}, "optimizer_state_dict": {}}, path)
    assert list(load_state_dict(path)) == ["a"]


def test_sha256_of_the_file_read_is_recorded(tmp_path):
    net = load_model("tinyclip")
    path = tmp_path / "tiny.pth"
    torch.save(net.net.state_dict(), path)
    loaded = load_model("tinyclip", weights=str(path))
    expected = hashlib.sha256(path.read_bytes()).hexdigest()
    assert loaded.describe()["weights_identity"] == f"sha256:{expected}" == f"sha256:{file_sha256(path)}"
    assert load_model("tinyclip", weights="random").describe()["weights_identity"].startswith("random-init")


def test_auxiliary_files_sit_beside_the_checkpoint_and_keep_the_identity(tmp_path, no_hub):
    net = load_model("tinyclip")
    ckpt = tmp_path / "tiny.pth"
    torch.save(net.net.state_dict(), ckpt)
    (tmp_path / "vocab.txt").write_text("[PAD]\n")
    adapter = load_model("tinyclip", weights=str(ckpt))
    assert adapter.weights_file("vocab.txt", what="tokenizer") == tmp_path / "vocab.txt"
    assert adapter.weights_path == ckpt  # the identity still hashes the checkpoint
    with pytest.raises(WeightsMissingError, match="tokenizer 'merges.txt'.*huggingface.co/org/tok"):
        adapter.weights_file("merges.txt", what="tokenizer", hub_id="org/tok")


def test_open_ended_families_need_their_argument():
    with pytest.raises(RetbenchError, match="needs an argument: timm:<resnet18>"):
        load_model("timm")


def test_run_without_the_checkpoint_fails_with_one_line(tmp_path, monkeypatch, no_hub, tiny_task, capsys):
    from retbench.cli import main

    spec, root = tiny_task
    monkeypatch.setenv("RETBENCH_WEIGHTS", str(tmp_path / "weights"))
    code = main(["run", "-m", "flair", "-t", str(spec), "--data-root", str(root), "--results-dir", str(tmp_path / "r"),
                 "--no-cache"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "model 'flair.default' needs weights 'model.safetensors'" in err and "huggingface.co/jusiro2/FLAIR" in err
    assert not list((tmp_path / "r").glob("**/*.json"))  # nothing half-written


def test_results_of_other_weights_get_their_own_name(tmp_path):
    from retbench.adapters import run_name

    assert run_name("timm:resnet18", None) == run_name("timm:resnet18", "random") == "timm:resnet18"
    assert run_name("timm:resnet18", "hub") == "timm:resnet18@hub"
    assert run_name("retfound", None) == "retfound.cfp"
    assert run_name("retfound", "random") == "retfound.cfp@random"
    assert run_name("retfound.cfp", "/ckpt/RETFound_mae_natureCFP.pth") == "retfound.cfp"  # the official file
    assert run_name("retfound.cfp", "/ckpt/my_finetune.pth") == "retfound.cfp@my_finetune"
    net = load_model("tinyclip")
    path = tmp_path / "tiny_v2.pth"
    torch.save(net.net.state_dict(), path)
    assert load_model("tinyclip", weights=str(path)).name == run_name("tinyclip", str(path)) == "tinyclip.test@tiny_v2"


@pytest.mark.parametrize("network", ["closed port", "listening", "proxy"])
def test_hub_downloads_are_tried_only_when_the_hub_answers(tmp_path, monkeypatch, network):
    """Without a network, huggingface_hub retried each missing file for ~26 s; now one 3-second connection attempt
    per process decides, and a proxy (which a direct connection cannot test) leaves it to the hub client."""
    import socket

    import huggingface_hub

    from retbench import weights

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    port = server.getsockname()[1]
    if network != "closed port":
        server.listen()
    else:
        server.close()  # nothing listens: the connection is refused at once
    for name in ("HF_HUB_OFFLINE", "RETBENCH_WEIGHTS", *weights.PROXY_VARIABLES):
        monkeypatch.delenv(name, raising=False)
    if network == "proxy":
        server.close()
        monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:3128")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    weights._reachable.cache_clear()
    asked: list[bool] = []

    def download(hub_id: str, filename: str, local_files_only: bool, cache_dir: str | None) -> str:
        asked.append(local_files_only)
        raise OSError("not here")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", download)
    try:
        with pytest.raises(WeightsMissingError):
            resolve_file("m", "model.safetensors", hub_id="someone/model")
        assert asked == ([True] if network == "closed port" else [True, False])
        assert weights.hub_online() is (network != "closed port")
        with weights.cached_files_only():
            assert not weights.hub_online()
    finally:
        server.close()
        weights._reachable.cache_clear()
