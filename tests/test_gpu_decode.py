"""The nvjpeg decoder recipe (retbench.gpu_decode): its geometry checked on the CPU against PIL's, its refusals,
and, on a CUDA machine only (``-m gpu``), batched nvjpeg decoding through extract()."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from retbench.adapters import load_model
from retbench.errors import RetbenchError
from retbench.features import extract
from retbench.gpu_decode import check_recipe, load_batch, read_encoded
from retbench.preprocess import Preprocess
from retbench.runner import load_task_data

RECIPES = [Preprocess(crop_pct=0.95), Preprocess(resize="pad_canvas", interpolation="bilinear"),
           Preprocess(fundus_crop="threshold"), Preprocess(grayscale=True, resize="squash", size=64)]


@pytest.fixture(scope="module")
def files(data_root: Path) -> list[Path]:
    """A 1000 px CFP JPEG and a 1408×573 OCT JPEG."""
    cfp = load_task_data("mx_dme_cfp_dr", str(data_root)).examples
    oct_ = load_task_data("mx_dme_oct_dme", str(data_root)).examples
    return [cfp.images.path(cfp.ids[0]), oct_.images.path(oct_.ids[0])]


@pytest.mark.parametrize("pre", RECIPES, ids=lambda p: f"{p.resize}-{p.fundus_crop}-{p.size}")
def test_device_geometry_matches_pil_within_two_grey_levels(pre: Preprocess, files: list[Path]) -> None:
    ref = torch.stack([pre.load(pre.open_file(f)) for f in files]).int()
    got = load_batch([read_encoded(f) for f in files], pre, torch.device("cpu"))
    assert all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8 and t.shape == (3, pre.size, pre.size)
               for t in got)
    diff = (torch.stack(got).int() - ref).abs()
    assert diff.max() <= 2 and diff.float().mean() < 0.15  # measured: max 2, mean 0.07-0.10


def test_a_bad_file_fails_alone(files: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(files[0].read_bytes()[:300])  # a truncated JPEG
    got = load_batch([read_encoded(files[0]), read_encoded(bad), read_encoded(files[1])], Preprocess(size=32),
                     torch.device("cpu"))
    assert isinstance(got[0], torch.Tensor) and isinstance(got[1], Exception) and isinstance(got[2], torch.Tensor)


def test_the_recipe_is_checked_in_one_line(files: list[Path], data_root: Path) -> None:
    with pytest.raises(RetbenchError, match="needs a CUDA device"):
        check_recipe(Preprocess(decoder="nvjpeg"), torch.device("cpu"))
    with pytest.raises(RetbenchError, match="supports fundus_crop none or threshold, not 'li_red'"):
        check_recipe(Preprocess(decoder="nvjpeg", fundus_crop="li_red"), torch.device("cuda"))
    with pytest.raises(ValueError, match="decoder must be one of pil, nvjpeg"):
        Preprocess(decoder="turbo")  # type: ignore[arg-type]
    examples = load_task_data("mx_dme_cfp_dr", str(data_root)).examples
    with pytest.raises(RetbenchError, match="needs a CUDA device"):
        extract(load_model("classical", None, "cpu"), examples, Preprocess(decoder="nvjpeg"), num_workers=0)
    assert Preprocess().to_dict()["decoder"] == "pil"  # recorded with every result


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_nvjpeg_extraction_on_cuda_is_close_to_the_pil_path(data_root: Path) -> None:
    from retbench.data.examples import Examples

    ex = load_task_data("mx_dme_cfp_dr", str(data_root)).examples
    ex = Examples(ex.ids[:32], ex.labels[:32], ex.patients[:32], None, ex.images, {})
    adapter = load_model("timm:resnet18", "random", "cuda", "fp32")
    pre = adapter.task_preprocess({"fundus_crop": True})
    nv = Preprocess(**{**pre.to_dict(), "mean": pre.mean, "std": pre.std, "decoder": "nvjpeg"})
    on_gpu = load_batch([read_encoded(ex.images.path(i)) for i in ex.ids], nv, torch.device("cuda"))
    ref = torch.stack([pre.load(pre.open_file(ex.images.path(i))) for i in ex.ids]).int()
    diff = (torch.stack(on_gpu).cpu().int() - ref).abs()
    assert diff.float().mean() < 1.0, f"nvjpeg pixels: mean |Δ| {diff.float().mean():.3f}, max {diff.max()}"
    a = extract(adapter, ex, pre, batch_size=16, num_workers=0).values
    b = extract(adapter, ex, nv, batch_size=16, num_workers=0).values
    cos = (a * b).sum(1) / (((a * a).sum(1) * (b * b).sum(1)) ** 0.5)
    assert cos.min() > 0.99
