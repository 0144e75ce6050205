"""The MiniLM text tower (real pretrained weights) and the ``local:`` format written by retbench's trainers."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import retbench
from retbench.adapters import load_model
from retbench.errors import RetbenchError
from retbench.local_model_format import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    LocalFormatError,
    read_local_config,
    save_local_model,
)
from retbench.preprocess import Preprocess
from retbench.tasks import get_task
from retbench.text_tokenizers import minilm_dir
from retbench.text_towers import TextTower, load_text_tower

LONG = " ".join(["microaneurysms and dot blot haemorrhages"] * 80)  # > 256 tokens: truncated
TEXTS = ["mild diabetic retinopathy", "  Moderate Diabetic Retinopathy ", "glaucomatous optic disc cupping",
         "healthy retina", "normal retina", "proliferative retinopathy", "cataract", "lens opacity", LONG]
TINY_VIT = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48,
                                                      "num_heads": 3}}
PRE = Preprocess(size=32, resize="squash", interpolation="bilinear", mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


@pytest.fixture(scope="module")
def minilm() -> TextTower:
    return load_text_tower("minilm")


def test_minilm_reproduces_sentence_transformers(minilm: TextTower) -> None:
    """all-MiniLM-L6-v2 as sentence-transformers runs it (mean pooling, normalise, 256 tokens)."""
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(minilm_dir()), device="cpu")
    assert reference.max_seq_length == minilm.max_length == 256
    want = reference.encode(TEXTS, convert_to_tensor=True, batch_size=len(TEXTS))
    with torch.inference_mode():
        got = minilm(TEXTS)
    assert minilm.dim == 384 and got.shape == (len(TEXTS), 384)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.norm(dim=1), torch.ones(len(TEXTS)))


def test_minilm_similarity_is_meaningful_for_retina(minilm: TextTower) -> None:
    with torch.inference_mode():
        e = dict(zip(TEXTS, minilm(TEXTS)))

    def cos(a: str, b: str) -> float:
        return float(e[a] @ e[b])

    mild, moderate = "mild diabetic retinopathy", "  Moderate Diabetic Retinopathy "
    assert cos(mild, moderate) > 0.9 > cos(mild, "glaucomatous optic disc cupping") + 0.3
    assert cos("healthy retina", "normal retina") > cos("healthy retina", "proliferative retinopathy")
    assert cos("cataract", "lens opacity") > cos("cataract", "proliferative retinopathy")
    assert cos("lens opacity", "cataract") > cos("lens opacity", "glaucomatous optic disc cupping")


def test_hf_spec_is_any_local_encoder(minilm: TextTower) -> None:
    tower = load_text_tower(f"hf:{minilm_dir()}")
    assert (tower.pooling, tower.normalize, tower.dim) == ("mean", False, 384)
    with torch.inference_mode():
        raw = tower(TEXTS[:3])
        torch.testing.assert_close(nn.functional.normalize(raw, dim=-1), minilm(TEXTS[:3]), rtol=0, atol=1e-6)
    assert load_text_tower(f"hf:{minilm_dir()}", pooling="cls").pooling == "cls"
    with pytest.raises(RetbenchError, match="unknown text tower 'bert'"):
        load_text_tower("bert")
    with pytest.raises(RetbenchError, match="not available offline"):
        load_text_tower("hf:/nonexistent/folder")


def _tiny_model(tower: TextTower | None) -> dict:
    import timm

    torch.manual_seed(3)
    vision = timm.create_model(TINY_VIT["timm"], num_classes=0, **TINY_VIT["kwargs"]).eval()
    parts = {"vision": vision}
    if tower is not None:
        parts |= {"text_tower": tower, "visual_proj": nn.Linear(48, 32, bias=False), "text_proj": nn.Linear(384, 32)}
    return parts


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory, minilm: TextTower) -> dict:
    """A tiny ViT + MiniLM model written with save_local_model."""
    folder = tmp_path_factory.mktemp("local") / "tiny_clip"
    parts = _tiny_model(minilm)
    save_local_model(folder, parts["vision"], TINY_VIT, PRE, text_tower=minilm, visual_proj=parts["visual_proj"],
                     text_proj=parts["text_proj"], logit_scale=math.log(20.0), recipe="test:clip",
                     card={"licence": "Apache-2.0", "data": "none"})
    return {"folder": folder, **parts}


def test_local_model_reproduces_saved_modules(saved: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = saved["folder"]
    monkeypatch.chdir(folder.parent)
    model = load_model(f"local:{folder.name}")  # a relative path
    assert model.name == "local:tiny_clip" and model.has_text
    assert model.preprocess == PRE
    sha = hashlib.sha256((folder / WEIGHTS_FILE).read_bytes()).hexdigest()
    assert model.weights_identity() == f"sha256:{sha}"
    assert model.describe()["recipe"] == "test:clip" and model.tag.licence == "Apache-2.0"
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        feats = saved["vision"](x)
        assert torch.equal(model.encode_image(x), feats)
        assert torch.equal(model.encode_image_joint(x), saved["visual_proj"](feats))
        assert torch.equal(model.encode_text(TEXTS[:3]), saved["text_proj"](saved["text_tower"](TEXTS[:3])))
    spec = type("Spec", (), {"class_prompts": lambda self: [["a"], ["b"]]})()
    setup = model.zero_shot_setup(spec)
    assert setup.logit_scale == pytest.approx(20.0) and setup.prompts == [["a"], ["b"]] and setup.renormalize

    random = load_model(f"local:{folder}", weights="random")  # the architecture only
    assert random.weights_identity().startswith("random-init") and random.zero_shot_setup(spec).logit_scale == 100.0
    assert random.encode_text(["a"]).shape == (1, 32) and not torch.equal(random.encode_image(x), feats)


def test_vision_only_model_and_atomic_overwrite(tmp_path: Path) -> None:
    folder = tmp_path / "vision_only"
    parts = _tiny_model(None)
    save_local_model(folder, parts["vision"], TINY_VIT, PRE)
    model = load_model(f"local:{folder}")
    assert not model.has_text and model.encode_image(torch.zeros(1, 3, 32, 32)).shape == (1, 48)
    with pytest.raises(RetbenchError, match="no text tower"):
        model.encode_text(["x"])
    with pytest.raises(RetbenchError, match="already exists"):
        save_local_model(folder, parts["vision"], TINY_VIT, PRE)
    save_local_model(folder, parts["vision"], TINY_VIT, PRE, recipe="again", overwrite=True)
    assert read_local_config(folder).recipe == "again"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vision_only"]  # no temporary folders left
    with pytest.raises(RetbenchError, match="parameter"):  # the module is not what the config rebuilds
        save_local_model(tmp_path / "bad", parts["vision"], {"timm": "vit_tiny_patch16_224"}, PRE)
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(("edit", "key"), [
    (lambda c: c.update(format="retbench.local/9"), "format"),
    (lambda c: c["vision"].update(timm="no_such_net"), "vision.timm"),
    (lambda c: c["vision"].pop("timm"), "vision.timm"),
    (lambda c: c["preprocess"].update(size=-3), "preprocess.size"),
    (lambda c: c["preprocess"].update(colour="yes"), "preprocess.colour"),
    (lambda c: c["preprocess"].update(mean=[0.5, 0.5]), "preprocess.mean"),
    (lambda c: c["text"].update(pooling="max"), "text.pooling"),
    (lambda c: c["text"].update(tower="bert"), "text.tower"),
    (lambda c: c.update(embed_dim="64"), "embed_dim"),
    (lambda c: c["text"].update(max_length=0), "text.max_length"),
    (lambda c: c["vision"]["kwargs"].update(depth="two"), "vision.kwargs"),
])
def test_bad_config_is_one_line_naming_file_and_key(saved: dict, tmp_path: Path, edit, key: str) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "text").symlink_to(saved["folder"] / "text")
    config = json.loads((saved["folder"] / CONFIG_FILE).read_text())
    edit(config)
    (folder / CONFIG_FILE).write_text(json.dumps(config))
    with pytest.raises(LocalFormatError) as err:
        load_model(f"local:{folder}")
    msg = str(err.value)
    assert msg.startswith(f"{folder / CONFIG_FILE}: key '{key}':") and "\n" not in msg


def test_bad_folder_and_weights_errors(saved: dict, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    with pytest.raises(RetbenchError, match="needs an argument: local:"):
        load_model("local:")
    with pytest.raises(RetbenchError, match="local model folder not found: .*nowhere"):
        load_model(f"local:{tmp_path / 'nowhere'}")
    with pytest.raises(RetbenchError, match=f"not a retbench local model: {CONFIG_FILE} is missing"):
        load_model(f"local:{tmp_path}")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / CONFIG_FILE).write_text("{")
    with pytest.raises(LocalFormatError, match=r"retbench_model.json: key '\(file\)': not valid JSON"):
        load_model(f"local:{tmp_path / 'broken'}")
    state = load_file(str(saved["folder"] / WEIGHTS_FILE))
    state.pop("visual.blocks.1.mlp.fc2.weight")
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(LocalFormatError, match=r"partial.safetensors: key 'visual.blocks.1.mlp.fc2.weight': missing"):
        load_model(f"local:{saved['folder']}", weights=str(tmp_path / "partial.safetensors"))


def test_evaluate_local_model_end_to_end(saved: dict, tiny_task: tuple[Path, Path], tmp_path: Path) -> None:
    spec_path, root = tiny_task
    options = {"data_root": str(root), "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
               "device": "cpu", "num_workers": 0}
    zs = retbench.evaluate(f"local:{saved['folder']}", str(spec_path), "zero_shot", **options)
    lp = retbench.evaluate(f"local:{saved['folder']}", str(spec_path), "linear_probe", seeds=2, **options)
    for res in (zs, lp):
        assert res.status == "done" and res.data["model"]["name"] == "local:tiny_clip"
        assert res.data["preprocess"] == PRE.to_dict()  # evaluated at the size it was trained at
        assert 0.0 <= res.primary <= 1.0
    assert zs.data["protocol"]["settings"]["logit_scale"] == pytest.approx(20.0)
    assert len(lp.data["runs"]) == 2


def test_a_retrained_folder_does_not_reuse_the_old_models_results(saved: dict, tiny_task: tuple[Path, Path],
                                                                  tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    spec_path, root = tiny_task
    folder = tmp_path / "retrained"
    shutil.copytree(saved["folder"], folder)
    options = {"data_root": str(root), "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
               "device": "cpu", "num_workers": 0, "seeds": 1}
    first = retbench.evaluate(f"local:{folder}", str(spec_path), "linear_probe", **options)
    assert retbench.evaluate(f"local:{folder}", str(spec_path), "linear_probe", **options).status == "existing"
    state = load_file(str(folder / WEIGHTS_FILE))
    state = {k: v + 0.01 if k.endswith("weight") else v for k, v in state.items()}
    save_file(state, str(folder / WEIGHTS_FILE))  # "retrained": same folder and name, other weights
    with pytest.raises(RetbenchError, match=r"linear_probe/local_retrained.json was computed from another version of "
                                            r".*model.safetensors.*--overwrite"):
        retbench.evaluate(f"local:{folder}", str(spec_path), "linear_probe", **options)
    again = retbench.evaluate(f"local:{folder}", str(spec_path), "linear_probe", overwrite=True, **options)
    assert again.status == "done"
    assert again.data["model"]["weights_identity"] != first.data["model"]["weights_identity"]


def test_a_changed_task_spec_does_not_reuse_the_old_tasks_results(saved: dict, tiny_task: tuple[Path, Path],
                                                                   tmp_path: Path) -> None:
    spec_path, root = tiny_task
    options = {"data_root": str(root), "results_dir": str(tmp_path / "results"), "cache_dir": str(tmp_path / "cache"),
               "device": "cpu", "num_workers": 0, "seeds": 1}
    retbench.evaluate(f"local:{saved['folder']}", str(spec_path), "linear_probe", **options)
    text = spec_path.read_text()
    assert "version: 3" in text
    spec_path.write_text(text.replace("version: 3", "version: 4"))  # the task changed (e.g. its splits)
    get_task.cache_clear()  # specs are read once per process
    with pytest.raises(RetbenchError, match=r"was computed with another version of task '.*' \(v3, spec .*--overwrite"):
        retbench.evaluate(f"local:{saved['folder']}", str(spec_path), "linear_probe", **options)
    again = retbench.evaluate(f"local:{saved['folder']}", str(spec_path), "linear_probe", overwrite=True, **options)
    assert again.status == "done" and again.data["task"]["version"] in (4, "4")
