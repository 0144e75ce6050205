"""Release-specific preprocessing (FLAIR, RETFound-Green, RetFiner, RETFound notebook) and task hints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retbench.errors import SpecError
from retbench.preprocess import (
    Preprocess,
    crop_fundus_li,
    crop_fundus_mean_bbox,
    li_threshold,
    normalize,
)
from retbench.spec import parse_spec


def real_cfp(data_root: Path) -> Path:
    """A real non-square fundus photograph from the corpus (CSDI, 768 x ~510 px)."""
    files = sorted((data_root / "csdi" / "images").glob("*.jpg"))
    if not files:
        pytest.skip("CSDI images not available")
    return files[0]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_li_threshold_matches_scikit_image(seed):
    skimage_filters = pytest.importorskip("skimage.filters")
    rng = np.random.default_rng(seed)
    # a bimodal "fundus on black" intensity distribution
    values = np.concatenate([rng.integers(0, 25, 3000), rng.integers(60, 230, 7000)]).astype(np.uint8)
    assert li_threshold(values) == pytest.approx(skimage_filters.threshold_li(values), abs=1e-6)


def test_li_threshold_on_a_real_red_channel_matches_scikit_image(data_root):
    skimage_filters = pytest.importorskip("skimage.filters")
    red = np.asarray(Image.open(real_cfp(data_root)).convert("RGB"))[..., 0]
    assert li_threshold(red) == pytest.approx(skimage_filters.threshold_li(red), abs=1e-6)


def test_flair_crop_keeps_the_largest_bright_component_only():
    img = np.zeros((100, 160, 3), dtype=np.uint8)
    img[20:80, 40:120] = (180, 90, 40)  # the fundus
    img[2:5, 2:5] = (200, 0, 0)  # a small bright text label, a separate component
    out = crop_fundus_li(Image.fromarray(img))
    assert out.size == (80, 60)  # bbox of the large component only, no margin


def test_flair_crop_on_a_real_image_removes_black_borders(data_root):
    img = Image.open(real_cfp(data_root)).convert("RGB")
    out = crop_fundus_li(img)
    assert out.size[0] < img.size[0]  # CSDI images have black side bands
    arr = np.asarray(out)[..., 0]
    assert arr[:, : arr.shape[1] // 20].mean() > 5 or arr[arr.shape[0] // 2, :].min() < 255


def test_mean_bbox_crop_pads_to_a_centred_square_with_margin():
    img = np.zeros((200, 300, 3), dtype=np.uint8)
    img[50:150, 100:220] = 150
    out = crop_fundus_mean_bbox(Image.fromarray(img))
    assert out.size[0] == out.size[1]
    pad = int(0.025 * (200 + 300) / 2)  # 2.5% of mean(H, W)
    assert out.size[0] == 120 + 2 * pad - 1  # the wider side, margins on both ends, end exclusive as released
    arr = np.asarray(out)
    assert arr[out.size[1] // 2, out.size[0] // 2].tolist() == [150, 150, 150]
    assert arr[0, 0].tolist() == [0, 0, 0]


def test_pad_canvas_uses_flair_arithmetic_and_pads_bottom_right():
    img = Image.fromarray(np.full((300, 700, 3), 200, dtype=np.uint8))  # H=300, W=700
    out = Preprocess(size=512, resize="pad_canvas", interpolation="bilinear").load(img).numpy()
    scale = 700 / 512
    h = int(300 / scale)
    assert out.shape == (3, 512, 512)
    assert out[:, h - 1, 511].min() == 200 and out[:, h, 0].max() == 0  # image anchored top-left
    square = Preprocess(size=64, resize="pad_canvas").load(Image.fromarray(np.full((90, 90, 3), 7, np.uint8)))
    assert square.min() == 7  # square images are resized, not padded


def test_grayscale_replicates_luminance_to_three_channels():
    img = Image.fromarray(np.dstack([np.full((8, 8), v, np.uint8) for v in (200, 100, 50)]))
    out = Preprocess(size=8, resize="squash", grayscale=True).load(img)
    assert torch.equal(out[0], out[1]) and torch.equal(out[1], out[2])
    assert int(out[0, 0, 0]) == round(200 * 0.299 + 100 * 0.587 + 50 * 0.114)


def test_per_image_normalisation_standardises_each_image_and_channel():
    x = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8)
    y = normalize(x, Preprocess(normalization="per_image"))
    assert torch.allclose(y.mean(dim=(2, 3)), torch.zeros(3, 3), atol=1e-5)
    assert torch.allclose(y.std(dim=(2, 3), correction=0), torch.ones(3, 3), atol=1e-4)  # numpy's std


@pytest.mark.parametrize(("mean", "std"), [((0.0, 0.0, 0.0), (1.0, 1.0, 1.0)), ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
                                           ((0.0, 0.0, 0.0), (0.5, 0.5, 0.5)), ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0))])
def test_normalize_equals_the_full_formula_bit_for_bit(mean, std):
    """Skipping x - 0 and x / 1 (cheap adapters such as ``classical``) must not move any feature's bit."""
    x = torch.randint(0, 256, (2, 3, 9, 7), dtype=torch.uint8)
    full = (x.float() / 255.0 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    assert torch.equal(normalize(x, Preprocess(mean=mean, std=std)), full)
    buffer = torch.full((5, 3, 9, 7), float("nan"))  # a reused buffer, larger than the batch: its first rows
    assert torch.equal(normalize(x, Preprocess(mean=mean, std=std), out=buffer), full)
    assert torch.equal(buffer[:2], full) and buffer[2:].isnan().all()


def test_task_crop_hint_selects_the_models_own_method():
    assert Preprocess().with_hints({"fundus_crop": True}).fundus_crop == "threshold"
    assert Preprocess().with_hints({"fundus_crop": True}, crop_method="li_red").fundus_crop == "li_red"
    own = Preprocess(fundus_crop="mean_bbox")
    assert own.with_hints({"fundus_crop": True}, crop_method="li_red").fundus_crop == "mean_bbox"
    assert own.with_hints({"fundus_crop": False}).fundus_crop == "none"
    assert Preprocess().with_hints({"fundus_crop": "li_red"}).fundus_crop == "li_red"
    with pytest.raises(ValueError, match="fundus_crop must be one of"):
        Preprocess(fundus_crop="otsu")


@pytest.mark.parametrize(("key", "value", "message"), [
    ("fundus_crop", "otsu", "fundus_crop"),
    ("normalization", "zscore", "normalization"),
    ("resize", "stretch", "resize"),
])
def test_spec_rejects_bad_preprocessing_hints(tiny_task, key, value, message):
    spec_path, _ = tiny_task
    spec_path.write_text(spec_path.read_text() + f"preprocess:\n  {key}: {value}\n")
    with pytest.raises(SpecError, match=message):
        parse_spec(spec_path)


@pytest.mark.parametrize(("size", "crop_pct", "wh"), [(224, 1.0, (768, 509)), (224, 0.875, (333, 500)), (224, 0.875, (301, 299))])
def test_resize_crop_matches_torchvision(size, crop_pct, wh):
    from torchvision.transforms import v2

    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (wh[1], wh[0], 3), dtype=np.uint8))
    ours = Preprocess(size=size, crop_pct=crop_pct, interpolation="bicubic").load(img)
    short = int(size / crop_pct)
    ref = v2.CenterCrop(size)(v2.Resize(short, interpolation=v2.InterpolationMode.BICUBIC)(img))
    theirs = torch.from_numpy(np.asarray(ref).copy()).permute(2, 0, 1)
    assert ours.shape == theirs.shape
    assert torch.equal(ours, theirs)  # same geometry, same PIL resampling
