"""Pretraining is bitwise reproducible: kernels pinned before torch loads, threads fixed, and what holds
recorded in the model card. Runs the real `retbench` command in fresh processes (the pin must precede
torch's import, which pytest's process has already done)."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

TASK = "csdi_cataract_severity"
PROBE = ("from retbench.determinism import pin_cpu_kernels, kernel_report; took = pin_cpu_kernels(); "
         "import json; print(json.dumps({'took': took, **kernel_report()}))")


def _python(code: str, **env: str) -> Any:
    clean = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    out = subprocess.run([sys.executable, "-c", code], env={**clean, **env}, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_has(flag: str) -> bool:
    try:
        return flag in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not _cpu_has("avx2"), reason="the pin selects the AVX2 kernels")
def test_the_command_pins_the_cpu_kernels_before_torch_loads() -> None:
    report = _python(PROBE)
    assert report["took"] is True and report["cpu_capability"] == "AVX2"
    assert report["pinned_env"] == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
    assert _python(PROBE, ATEN_CPU_CAPABILITY="default")["cpu_capability"] == "DEFAULT"  # a user's own choice wins


@pytest.mark.skipif(not _cpu_has("avx512f"), reason="needs a CPU with AVX-512 to show the kernels differ")
def test_kernel_choice_changes_the_numbers_which_is_why_it_is_pinned() -> None:
    code = ("import torch; torch.manual_seed(0); x = torch.randn(64, 384); w = torch.nn.LayerNorm(384); "
            "y = torch.nn.functional.gelu(w(x)).softmax(-1); import json, hashlib; "
            "print(json.dumps(hashlib.sha256(y.detach().numpy().tobytes()).hexdigest()))")
    wide, narrow = _python(code, ATEN_CPU_CAPABILITY="avx512"), _python(code, ATEN_CPU_CAPABILITY="avx2")
    assert wide != narrow


def _pretrain(out: Path, data_root: Path, cache: Path, hash_seed: str) -> str:
    cmd = [sys.executable, "-m", "retbench", "pretrain", "--recipe", "mae", "--data", TASK, "--out", str(out),
           "--steps", "3", "--batch-size", "4", "--image-size", "32", "--exclude", TASK, "--data-root", str(data_root),
           "--device", "cpu", "--cache-dir", str(cache)]
    env = {**os.environ, "PYTHONHASHSEED": hash_seed, "RETBENCH_QUIET": "1"}
    subprocess.run(cmd, env=env, check=True, capture_output=True)
    return hashlib.sha256((out / "model.safetensors").read_bytes()).hexdigest()


def test_two_pretraining_runs_give_identical_weights_and_say_what_holds(tmp_path: Path, data_root: Path) -> None:
    a = _pretrain(tmp_path / "a", data_root, tmp_path / "cache-a", "1")
    b = _pretrain(tmp_path / "b", data_root, tmp_path / "cache-b", "2")  # other hash seed, cold caches
    assert a == b
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "| determinism | bitwise-identical weights for the same command" in card and "2 threads" in card
    recorded = json.loads((tmp_path / "a" / "retbench_model.json").read_text())
    report = recorded["card"]["determinism"]
    assert f"MKL branch {report['mkl_branch']}" in card  # the branch MKL really used, not the one asked for
    # what a drift would be traced to: the CPU and every numerical package's version, in the card and its JSON
    assert report["cpu"]["model"] in card and report["cpu"]["vendor"] in card
    assert set(report["packages"]) >= {"torch", "numpy", "timm"} and f"torch {report['packages']['torch']}" in card


def test_the_cpu_description_names_vendor_model_and_only_known_isa_flags() -> None:
    from retbench.determinism import ISA_FLAGS, cpu_description

    cpu = cpu_description()
    assert cpu["vendor"] and cpu["model"]
    if Path("/proc/cpuinfo").exists():
        flags = set(Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0].split())
        assert cpu["isa_flags"] == [f for f in ISA_FLAGS if f in flags]


def test_the_report_says_which_mkl_branch_really_ran() -> None:
    """MKL may override the pin: on an AMD EPYC it reports AUTO for MKL_CBWR=AVX2 (so GEMMs follow the CPU);
    COMPATIBLE it honours everywhere. The report reads the branch MKL uses, not the variable that asked for it."""
    # one interpreter per branch reports the branch MKL took and the bits of one GEMM on it
    probe = ("import torch, json, hashlib; from retbench.determinism import mkl_branch; "
             "g = torch.Generator().manual_seed(0); a = torch.randn(512, 192, generator=g); "
             "b = torch.randn(192, 384, generator=g); "
             "print(json.dumps([mkl_branch(), hashlib.sha256((a @ b).numpy().tobytes()).hexdigest()]))")
    compatible = _python(probe, MKL_CBWR="COMPATIBLE")
    if compatible[0] == "unknown":
        pytest.skip("this torch has no MKL whose branch can be read")
    assert compatible[0] == "COMPATIBLE"
    assert _python(probe, MKL_CBWR="AUTO")[0] == "AUTO"
    pinned = _python(probe, MKL_CBWR="AVX2")
    if "GenuineIntel" in Path("/proc/cpuinfo").read_text():
        assert pinned[0] == "AVX2"
    assert pinned[0] in ("AVX2", "AUTO")
    assert compatible[1] != pinned[1]  # the branch moves bits: the same GEMM on the compatible branch and the pinned one
