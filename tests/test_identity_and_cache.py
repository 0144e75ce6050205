"""Model identity from file content (not names) and the feature cache's content key and checksums."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import retbench
from retbench.adapters import ADAPTERS, load_model, weights_to_read
from retbench.cli import main
from retbench.errors import RetbenchError
from retbench.features import FeatureCache, Features, image_content_digest
from retbench.local_model_format import WEIGHTS_FILE, save_local_model
from retbench.preprocess import Preprocess
from retbench.runner import load_task_data

TINY_VIT = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 24,
                                                      "num_heads": 2}}
PRE = Preprocess(size=32, resize="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _tinyclip_weights(path: Path, seed: int) -> Path:
    from retbench.model_adapters.tinyclip import TinyClipNet

    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(TinyClipNet().state_dict(), path)
    return path


def _local_model(folder: Path, seed: int) -> Path:
    import timm

    torch.manual_seed(seed)
    vision = timm.create_model(TINY_VIT["timm"], num_classes=0, **TINY_VIT["kwargs"]).eval()
    return save_local_model(folder, vision, TINY_VIT, PRE)


def _options(tmp_path: Path, root: Path, **extra: object) -> dict:
    return {"data_root": str(root), "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
            "device": "cpu", "num_workers": 0, "seeds": 1, **extra}


# -- model identity ----------------------------------------------------------------------------------------------

def test_weights_files_with_the_same_stem_are_not_the_same_model(tiny_task: tuple[Path, Path], tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    spec, root = tiny_task
    a, b = _tinyclip_weights(tmp_path / "a" / "w.pth", 1), _tinyclip_weights(tmp_path / "b" / "w.pth", 2)
    first = retbench.evaluate("tinyclip", str(spec), "linear_probe", weights=str(a), **_options(tmp_path, root))
    assert first.status == "done" and first.data["model"]["name"] == "tinyclip.test@w"
    with pytest.raises(RetbenchError, match=rf"linear_probe/tinyclip.test_w.json was computed from a different file, "
                                            rf".*a/w.pth \(sha256 {_sha(a)[:12]}…\), than this run's .*b/w.pth "
                                            rf"\(sha256 {_sha(b)[:12]}…\): rerun with --overwrite, or use another "
                                            rf"--results-dir"):
        retbench.evaluate("tinyclip", str(spec), "linear_probe", weights=str(b), **_options(tmp_path, root))
    # the CLI says it in one line and writes nothing
    code = main(["run", "-m", "tinyclip", "-t", str(spec), "-p", "linear_probe", "--weights", str(b), "--seeds", "1",
                 "--data-root", str(root), "--results-dir", str(tmp_path / "results"),
                 "--cache-dir", str(tmp_path / "cache")])
    err = capsys.readouterr().err
    assert code != 0 and "was computed from a different file" in err and _sha(b)[:12] in err
    assert len([line for line in err.splitlines() if "different file" in line]) == 1
    again = retbench.evaluate("tinyclip", str(spec), "linear_probe", weights=str(b), overwrite=True,
                              **_options(tmp_path, root))
    assert again.status == "done" and again.data["model"]["weights_identity"] == f"sha256:{_sha(b)}"


def test_a_checkpoint_replaced_in_place_is_not_the_same_model(tiny_task: tuple[Path, Path], tmp_path: Path) -> None:
    spec, root = tiny_task
    w = _tinyclip_weights(tmp_path / "ckpt" / "w.pth", 1)
    old = _sha(w)
    retbench.evaluate("tinyclip", str(spec), "linear_probe", weights=str(w), **_options(tmp_path, root))
    _tinyclip_weights(w, 2)
    with pytest.raises(RetbenchError, match=rf"was computed from another version of .*w.pth \(sha256 {old[:12]}…, "
                                            rf"the file is now {_sha(w)[:12]}…\): rerun with --overwrite"):
        retbench.evaluate("tinyclip", str(spec), "linear_probe", weights=str(w), **_options(tmp_path, root))


def test_two_local_folders_with_the_same_name_are_not_the_same_model(tiny_task: tuple[Path, Path],
                                                                      tmp_path: Path) -> None:
    spec, root = tiny_task
    x, y = _local_model(tmp_path / "x" / "mae", 1), _local_model(tmp_path / "y" / "mae", 2)
    first = retbench.evaluate(f"local:{x}", str(spec), "linear_probe", **_options(tmp_path, root))
    assert first.status == "done" and first.data["model"]["name"] == "local:mae"
    sx, sy = _sha(x / WEIGHTS_FILE), _sha(y / WEIGHTS_FILE)
    with pytest.raises(RetbenchError, match=rf"linear_probe/local_mae.json was computed from a different file, "
                                            rf".*x/mae/model.safetensors \(sha256 {sx[:12]}…\), than this run's "
                                            rf".*y/mae/model.safetensors \(sha256 {sy[:12]}…\)"):
        retbench.evaluate(f"local:{y}", str(spec), "linear_probe", **_options(tmp_path, root))


def test_an_identical_copy_elsewhere_is_the_same_model(tiny_task: tuple[Path, Path], tmp_path: Path) -> None:
    spec, root = tiny_task
    w = _tinyclip_weights(tmp_path / "a" / "w.pth", 1)
    x = _local_model(tmp_path / "x" / "mae", 1)
    for model, weights in (("tinyclip", str(w)), (f"local:{x}", None)):
        assert retbench.evaluate(model, str(spec), "linear_probe", weights=weights,
                                 **_options(tmp_path, root)).status == "done"
    copy = tmp_path / "elsewhere" / "w.pth"
    copy.parent.mkdir()
    shutil.copy(w, copy)
    shutil.copytree(x, tmp_path / "z" / "mae")
    w.unlink()  # the recorded file may even be gone: the bytes decide
    assert retbench.evaluate("tinyclip", str(spec), "linear_probe", weights=str(copy),
                             **_options(tmp_path, root)).status == "existing"
    assert retbench.evaluate(f"local:{tmp_path / 'z' / 'mae'}", str(spec), "linear_probe",
                             **_options(tmp_path, root)).status == "existing"


def test_the_file_is_found_without_building_the_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = _tinyclip_weights(tmp_path / "w.pth", 1)
    x = _local_model(tmp_path / "x" / "mae", 1)
    built = {"tinyclip": load_model("tinyclip", str(w)), "local": load_model(f"local:{x}")}
    assert built["tinyclip"].weights_identity() == f"sha256:{_sha(w)}"
    assert built["local"].weights_path == x / WEIGHTS_FILE
    for family in ("tinyclip", "local", "classical"):
        monkeypatch.setattr(ADAPTERS.get(family), "build", lambda self: pytest.fail("network built"))
    assert weights_to_read("tinyclip.test", str(w)) == w
    assert weights_to_read(f"local:{x}", None) == x / WEIGHTS_FILE
    assert weights_to_read(f"local:{x}", "random") is None
    assert weights_to_read("tinyclip.test", None) is None  # random init: no file, unaffected
    assert weights_to_read("classical.default", None) is None
    with pytest.raises(RetbenchError, match="not found"):
        weights_to_read("tinyclip.test", str(tmp_path / "missing.pth"))


# -- feature cache -----------------------------------------------------------------------------------------------

def _uncompressed_png(path: Path, pixels: np.ndarray) -> None:
    Image.fromarray(pixels).save(path, format="PNG", compress_level=0)


def test_an_image_edited_in_place_with_the_same_size_gets_new_features(tiny_task: tuple[Path, Path],
                                                                       tmp_path: Path) -> None:
    spec, root = tiny_task
    image = next((root / "tiny" / "red").glob("*.png"))
    rng = np.random.default_rng(5)
    _uncompressed_png(image, rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))
    task = load_task_data(str(spec), str(root))
    before = (image_content_digest(task.examples), task.examples.image_list_hash())
    first = retbench.evaluate("tinyclip", str(spec), "linear_probe", **_options(tmp_path, root))
    assert first.data["timings"]["features_from_cache"] is False
    cached = retbench.evaluate("tinyclip", str(spec), "linear_probe", overwrite=True, **_options(tmp_path, root))
    assert cached.data["timings"]["features_from_cache"] is True

    stat = image.stat()
    _uncompressed_png(image, rng.integers(0, 255, (24, 24, 3), dtype=np.uint8))  # other pixels, same byte size
    os.utime(image, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the same modification time
    assert image.stat().st_size == stat.st_size and image.stat().st_mtime_ns == stat.st_mtime_ns
    assert task.examples.image_list_hash() == before[1]  # what results record and compare: unchanged by design
    assert image_content_digest(task.examples) != before[0]
    edited = retbench.evaluate("tinyclip", str(spec), "linear_probe", overwrite=True, **_options(tmp_path, root))
    assert edited.data["timings"]["features_from_cache"] is False
    assert edited.data["feature_cache_key"] != first.data["feature_cache_key"]
    assert edited.data["data"]["image_list_hash"] == first.data["data"]["image_list_hash"]


def _flip_bytes(npy: Path) -> None:
    raw = bytearray(npy.read_bytes())
    raw[-8:] = bytes(b ^ 0xFF for b in raw[-8:])
    npy.write_bytes(bytes(raw))


def _other_valid_array(npy: Path) -> None:
    values = np.load(npy)
    np.save(npy, (values + 1.0).astype(values.dtype))


def _truncate(npy: Path) -> None:
    npy.write_bytes(npy.read_bytes()[:100])


def _another_entry(npy: Path) -> None:  # both files of another (valid) entry copied over this one
    other = npy.with_name("0" * 24 + ".npy")
    for suffix in (".npy", ".json"):
        shutil.copy(other.with_suffix(suffix), npy.with_suffix(suffix))


@pytest.mark.parametrize("damage, warning", [(_flip_bytes, "does not match its checksum"),
                                             (_other_valid_array, "does not match its checksum"),
                                             (_truncate, "is damaged"),
                                             (_another_entry, "does not match its checksum")])
def test_a_damaged_cache_entry_is_warned_and_recomputed(damage, warning: str, tiny_task: tuple[Path, Path],
                                                        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, root = tiny_task
    first = retbench.evaluate("tinyclip", str(spec), "linear_probe", **_options(tmp_path, root))
    key = first.data["feature_cache_key"]
    folder = tmp_path / "cache" / "features"
    npy = folder / f"{key}.npy"
    good = np.load(npy)
    FeatureCache(folder).save("0" * 24, Features(good[::-1].copy()), {})  # a valid entry of another key
    capsys.readouterr()
    damage(npy)
    again = retbench.evaluate("tinyclip", str(spec), "linear_probe", overwrite=True, **_options(tmp_path, root))
    err = capsys.readouterr().err
    assert [line for line in err.splitlines() if "feature cache entry" in line] == [
        f"warning: feature cache entry {npy} {warning} (damaged or replaced); recomputing it"
        if "checksum" in warning else f"warning: feature cache entry {npy} {warning} (ValueError); recomputing it"]
    assert again.data["timings"]["features_from_cache"] is False
    assert json.dumps(again.metrics, sort_keys=True) == json.dumps(first.metrics, sort_keys=True)  # not the damaged values
    np.testing.assert_array_equal(np.load(npy), good)  # rewritten
    third = retbench.evaluate("tinyclip", str(spec), "linear_probe", overwrite=True, **_options(tmp_path, root))
    assert third.data["timings"]["features_from_cache"] is True and "feature cache" not in capsys.readouterr().err
