"""Inference precision: each family's release default, the ``--precision`` override and what results record.

Autocast only happens on CUDA (``features.extract``); on CPU every option runs fp32, and that is what the
results say. These tests run on CPU: they check the defaults, the plumbing CLI -> RunConfig -> runner ->
adapter, the recorded values and the feature-cache key.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import retbench
from retbench.adapters import ADAPTERS, discover_adapters, load_model
from retbench.cli import build_parser, main
from retbench.config import PRECISIONS, RunConfig
from retbench.errors import RetbenchError
from retbench.features import FeatureCache

# family -> the autocast dtype of its release's inference code (the reason is beside each ClassVar)
RELEASE_DTYPES = {
    "retfound": torch.float16, "deretfound": torch.float16, "urfound": torch.float16, "retfiner": torch.float16,
    "clip": torch.float16, "eyeclip": torch.float16, "local": torch.bfloat16,
    "flair": None, "retfound_green": None, "visionfm": None, "biomedclip": None, "open_clip": None, "hf_clip": None,
    "timm": None, "tinyclip": None, "classical": None,
}


def test_every_family_declares_its_release_precision():
    discover_adapters()
    assert set(ADAPTERS.names()) == set(RELEASE_DTYPES)
    for family, dtype in RELEASE_DTYPES.items():
        cls = ADAPTERS.get(family)
        assert "autocast_dtype" in vars(cls), f"{family} inherits its precision instead of declaring it"
        assert cls.autocast_dtype is dtype, family


def test_retfound_latent_tags_run_fp32_like_the_notebook():
    retfound = ADAPTERS.get("retfound")
    for name, tag in retfound.tags.items():
        assert tag.options.get("precision") == ("fp32" if name.endswith("-latent") else None), name


@pytest.mark.parametrize(("precision", "dtype"), [("release", None), ("fp32", None), ("fp16", torch.float16),
                                                  ("bf16", torch.bfloat16)])
def test_option_sets_the_autocast_but_cpu_runs_fp32(precision, dtype):
    adapter = load_model("tinyclip", precision=precision)
    assert adapter.autocast_dtype is dtype and adapter.precision == precision
    info = adapter.describe()
    assert info["precision"] == "fp32" and info["precision_requested"] == precision
    assert info["release_precision"] == "fp32"
    assert type(adapter).autocast_dtype is None  # the class default is untouched


def test_recorded_precision_on_cuda_follows_release_and_option():
    """``inference_precision`` is what ``extract`` autocasts to on CUDA (device set by hand: no GPU needed)."""
    release = load_model("tinyclip")
    forced = load_model("tinyclip", precision="bf16")
    for adapter in (release, forced):
        adapter.device = torch.device("cuda")
    assert release.inference_precision == "fp32" and forced.inference_precision == "bf16 autocast"
    assert forced.describe()["precision"] == "bf16 autocast" and forced.describe()["release_precision"] == "fp32"


def test_feature_cache_key_separates_autocast_and_keeps_fp32_keys():
    adapter = load_model("tinyclip", precision="fp16")
    args = (adapter.preprocess, "t", "1", "imgs", False)
    cpu_key = FeatureCache.key(adapter, *args)
    assert cpu_key == FeatureCache.key(load_model("tinyclip"), *args)  # CPU: fp32 whatever was asked
    adapter.device = torch.device("cuda")
    assert FeatureCache.key(adapter, *args) != cpu_key


def test_unknown_precision_is_refused():
    with pytest.raises(RetbenchError, match="release, fp32, fp16, bf16"):
        load_model("tinyclip", precision="int8")
    with pytest.raises(RetbenchError, match="precision must be one of"):
        RunConfig(models=("tinyclip",), tasks=("x",), precision="half")
    with pytest.raises(SystemExit):
        build_parser().parse_args(["run", "-m", "tinyclip", "-t", "x", "--precision", "half"])


def test_cli_default_and_choice():
    assert build_parser().parse_args(["run", "-m", "tinyclip", "-t", "x"]).precision == "release"
    assert build_parser().parse_args(["run", "-m", "tinyclip", "-t", "x", "--precision", "fp16"]).precision == "fp16"
    assert PRECISIONS == ("release", "fp32", "fp16", "bf16")


def test_precision_reaches_the_result_through_the_runner(tiny_task, tmp_path):
    spec_path, data = tiny_task
    res = retbench.evaluate("tinyclip", str(spec_path), "linear_probe", data_root=str(data), device="cpu",
                            results_dir=str(tmp_path / "results"), cache_dir=str(tmp_path / "cache"), num_workers=0,
                            precision="bf16")
    model = res.data["model"]
    assert (model["precision"], model["precision_requested"], model["release_precision"]) == ("fp32", "bf16", "fp32")
    assert res.data["config"]["precision"] == "bf16"


def test_cli_precision_is_recorded(tiny_task, tmp_path):
    spec_path, data = tiny_task
    store = tmp_path / "store"
    argv = ["run", "-m", "tinyclip", "-t", str(spec_path), "-p", "linear_probe", "--data-root", str(data),
            "--results-dir", str(store), "--cache-dir", str(tmp_path / "cache"), "--device", "cpu", "--workers", "0",
            "--precision", "fp16"]
    assert main(argv) == 0
    (path,) = Path(store).rglob("*.json")
    stored = json.loads(path.read_text())
    assert stored["model"]["precision_requested"] == "fp16" and stored["model"]["precision"] == "fp32"
    assert stored["config"]["precision"] == "fp16"
