"""Preprocessing claims of the RETFound and RETFound-Green adapters, checked by running the releases' own code.

The release functions live in ``tests/fixtures`` (copied from the official repositories; provenance and
licence in each file): RETFound's ``latent_feature.ipynb`` image lines, RETFound-Green's
``preprocess_imgs.py`` (offline crop, LANCZOS to 1024 px, JPEG q90) and its ``data.py`` eval transform.
Each runs on real images of the bundled corpus and is compared with what retbench feeds the model.
"""

from __future__ import annotations

import importlib.util
import warnings
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image
from retbench.model_adapters.retfound import LATENT, TAGS
from retbench.model_adapters.retfound_green import PRE, GreenPreprocess, RetfoundGreenAdapter, release_offline_preprocess

from retbench.preprocess import Preprocess, normalize

pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")  # read_image
FIXTURES = Path(__file__).parent / "fixtures"
GREY_LEVEL = 1 / 255 / 0.5  # one uint8 step after RETFound-Green's Normalize(0.5, 0.5)


def fixture(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"release_{name}", FIXTURES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def real_images(root: Path) -> list[Path]:
    """JPEG fundus photographs of several shapes and borders: 768x512 (CSDI), 1024x683 (FLAIR sample), 1000x1000."""
    paths = [root / "csdi" / "images" / "CGR1.jpg", root / "csdi" / "images" / "NL_088.jpg",
             root / "flair" / "documents" / "severe_nonprol_dr.jpg",
             root / "mx_dme_oct_fundus" / "fundus" / "1227_OI_f_4.jpg"]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        pytest.skip(f"bundled images missing: {missing[0]}")
    return paths


# --- RETFound latent_feature.ipynb ---------------------------------------------------------------

def test_retfound_latent_input_is_the_notebooks(data_root):
    """Population std, as numpy's ``.std()`` in the notebook (an unbiased std would be ~1e-5 off)."""
    notebook = fixture("retfound_latent_feature")
    for path in real_images(data_root)[:2] + [data_root / "flair" / "documents" / "sample_macular_hole.png"]:
        image = Image.open(path).convert("RGB")
        theirs = notebook.notebook_model_input(image)
        ours = normalize(LATENT.load(image)[None], LATENT)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=2e-6)
        x = LATENT.load(image)[None].float() / 255
        unbiased = (x - x.mean((2, 3), keepdim=True)) / x.std((2, 3), keepdim=True)
        assert (unbiased - theirs).abs().max() > 1e-5  # the check can tell the two stds apart
    tag = TAGS["cfp-latent"]
    assert "population" in tag.differs and "unbiased" not in tag.differs
    assert tag.options["precision"] == "fp32" and "precision" not in TAGS["cfp"].options


# --- RETFound-Green ------------------------------------------------------------------------------

def test_green_resize_is_within_one_grey_level_of_torchvision(data_root):
    """``differs``: PIL bilinear on uint8 vs the release's torchvision v2 Resize(antialias=True) on read_image."""
    from torchvision.io import read_image

    release = fixture("retfound_green_preprocess").get_default_transforms()
    for path in real_images(data_root):
        theirs = release(read_image(str(path)))
        ours = normalize(PRE.load(Image.open(path))[None], PRE)[0]
        assert (ours - theirs).abs().max() <= GREY_LEVEL * 1.001
    assert "at most 1 grey level" in RetfoundGreenAdapter.tags["default"].differs


def test_green_offline_preprocessing_is_the_releases_pixel_for_pixel(data_root, tmp_path):
    """Crop + LANCZOS 1024 + JPEG q90 4:4:4: the file ``preprocess_img_mp`` writes, decoded, equals retbench's image."""
    release = fixture("retfound_green_preprocess")
    for path in real_images(data_root):
        release.preprocess_img_mp(path, tmp_path)
        with Image.open(tmp_path / path.name) as saved:
            assert saved.format == "JPEG" and saved.size == (1024, 1024)
            theirs = np.asarray(saved.convert("RGB"))
        ours = np.asarray(release_offline_preprocess(Image.open(path)))
        np.testing.assert_array_equal(ours, theirs)


def test_green_offline_fallback_without_foreground_is_the_releases(tmp_path):
    """An all-black image: the release's crop fails and it resizes the whole image; retbench gives the same file."""
    release = fixture("retfound_green_preprocess")
    black = tmp_path / "src" / "black.jpg"
    black.parent.mkdir()
    Image.new("RGB", (300, 200)).save(black, quality=95)
    (tmp_path / "out").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # 0/0 in the release's normalisation, before its fallback
        release.preprocess_img_mp(black, tmp_path / "out")
    with Image.open(tmp_path / "out" / "black.jpg") as saved:
        np.testing.assert_array_equal(np.asarray(release_offline_preprocess(Image.open(black))),
                                      np.asarray(saved.convert("RGB")))


def test_green_task_crop_runs_the_release_pipeline(data_root, tmp_path):
    """A task's ``fundus_crop: true``: offline steps, then the eval transform, as the release's training images were."""
    from torchvision.io import read_image

    release = fixture("retfound_green_preprocess")
    transform = release.get_default_transforms()
    adapter = object.__new__(RetfoundGreenAdapter)  # task_preprocess needs the tag's preprocessing only, no model
    adapter.preprocess = PRE
    cropped = adapter.task_preprocess({"fundus_crop": True})
    assert isinstance(cropped, GreenPreprocess) and cropped.fundus_crop == "mean_bbox"
    assert cropped.to_dict()["offline_size"] == 1024 and cropped.to_dict()["offline_jpeg_quality"] == 90
    plain = adapter.task_preprocess({})
    assert type(plain) is Preprocess and "offline_size" not in plain.to_dict()  # no crop: nothing else changes
    assert type(adapter.task_preprocess({"fundus_crop": "threshold"})) is Preprocess  # another crop: no offline steps
    for path in real_images(data_root)[:2]:
        release.preprocess_img_mp(path, tmp_path)
        theirs = transform(read_image(str(tmp_path / path.name)))
        ours = normalize(cropped.load(Image.open(path))[None], cropped)[0]
        assert ours.shape == theirs.shape == (3, 392, 392)
        assert (ours - theirs).abs().max() <= 2 * GREY_LEVEL * 1.001  # resize rounding + JPEG decoder (PIL vs torchvision)
