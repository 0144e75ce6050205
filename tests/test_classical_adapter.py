"""The ``classical`` adapter: hand-crafted fundus features, no weights."""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retbench.adapters import load_model
from retbench.preprocess import normalize


def data_root() -> Path:
    """RETBENCH_DATA, else the ``shared/data`` folder beside the repository."""
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("RETBENCH_DATA", default))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Run single-threaded: the features are many small ops, and on an oversubscribed
    machine (parallel CI jobs) each multi-threaded op can wait milliseconds for a core."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model():
    return load_model("classical")


def test_identity_and_preprocess(model) -> None:
    assert model.name == "classical.default"
    assert not model.has_text
    assert model.preprocess.mean == (0.0, 0.0, 0.0) and model.preprocess.std == (1.0, 1.0, 1.0)
    assert model.preprocess.resize == "pad_canvas" and model.preprocess.size == 224
    assert model.describe()["source"] == "handcrafted (no weights)"


def test_shape_dtype_finite_deterministic(model) -> None:
    gen = torch.Generator().manual_seed(0)
    pixels = torch.rand(5, 3, 224, 224, generator=gen)
    pixels[1] = 0.0  # an all-black image must not produce NaNs
    pixels[2, :, 150:] = 0.0  # pad_canvas-style padding
    feats = model.encode_image(pixels)
    assert feats.shape == (5, model.dim) and feats.dtype == torch.float32
    assert torch.isfinite(feats).all()
    assert torch.equal(feats, model.encode_image(pixels.clone()))
    single = torch.cat([model.encode_image(p[None]) for p in pixels])
    torch.testing.assert_close(single, feats, rtol=1e-4, atol=1e-5)


def test_other_input_sizes(model) -> None:
    for size in (112, 300):
        feats = model.encode_image(torch.rand(2, 3, size, size))
        assert feats.shape == (2, model.dim) and torch.isfinite(feats).all()


def load_class(model, folder: Path, n: int) -> torch.Tensor:
    """Features of ``n`` randomly chosen (seeded) images of one class folder."""
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in {".jpg", ".jpeg", ".png"})
    chosen = random.Random(0).sample(files, n)
    batch = torch.stack([model.preprocess.load(Image.open(p)) for p in chosen])
    return model.encode_image(normalize(batch, model.preprocess))


def test_separates_cataract_from_normal(model) -> None:
    sklearn = pytest.importorskip("sklearn")
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import balanced_accuracy_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    root = data_root() / "eye4class"
    if not (root / "cataract").is_dir() or not (root / "normal").is_dir():
        pytest.skip(f"eye4class data not found under {root}")
    assert sklearn
    feats = [load_class(model, root / name, 60).numpy() for name in ("cataract", "normal")]
    x = np.concatenate(feats)
    y = np.repeat([0, 1], 60)
    train = np.arange(len(y)) % 2 == 0
    clf = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
    clf.fit(x[train], y[train])
    score = balanced_accuracy_score(y[~train], clf.predict(x[~train]))
    assert score > 0.75, f"balanced accuracy {score:.3f}"
