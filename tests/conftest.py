"""Shared fixtures: the real data root and a tiny synthetic folder-per-class task."""

from __future__ import annotations

import os
from pathlib import Path

# One thread everywhere: on this 2-core machine, 2-thread OpenMP/OpenBLAS contention makes small
# tensor ops ~10x and sklearn's lbfgs ~100x slower. Set before numpy/torch load their thread pools.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
os.environ["RETBENCH_QUIET"] = "1"  # no progress bars

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

torch.set_num_threads(1)
threadpool_limits(limits=1)  # in case numpy was imported (with its pool) before this file

TINY_CLASSES = ("red", "green", "blue")
TINY_PER_CLASS = 8
TINY_COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}

TINY_SPEC = """\
name: {name}
version: 3
description: tiny synthetic colour task for tests
modality: cfp
problem: multiclass
source:
  kind: folder
  path: {folder}
classes:
  - {{name: red, prompts: [a red image, reddish]}}
  - {{name: green, prompts: [a green image]}}
  - {{name: blue, prompts: [a blue image, bluish]}}
splits:
  strategy: stratified
  test_fraction: 0.25
  seed: 0
metrics: [aca, accuracy, f1_macro, auroc, aupr, kappa_quadratic, kappa_unweighted, mcc,
          sensitivity_per_class, specificity_per_class]
primary_metric: aca
protocols: [linear_probe, few_shot, zero_shot]
"""


def _data_root_path() -> Path:
    default = Path(__file__).resolve().parents[2] / "shared" / "data"
    return Path(os.environ.get("RETBENCH_DATA") or default)


@pytest.fixture(scope="session")
def data_root() -> Path:
    """The real corpus: ``$RETBENCH_DATA``, else ``../shared/data`` beside the repository."""
    root = _data_root_path()
    if not root.is_dir():
        pytest.skip(f"real data not found at {root}")
    return root


def make_tiny_task(base: Path, name: str = "tiny", per_class: int = TINY_PER_CLASS) -> tuple[Path, Path]:
    """Write a folder-per-class task of small noisy PNGs (colour depends on class) under ``base``.

    Returns ``(spec_path, data_root)``; the images live in ``data_root/<name>/<class>/``.
    """
    root = base / "data"
    rng = np.random.default_rng(0)
    for cls in TINY_CLASSES:
        folder = root / name / cls
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            colour = np.array(TINY_COLOURS[cls], dtype=float)
            noise = rng.normal(0, 25, size=(24, 24, 3))
            pixels = np.clip(colour + rng.normal(0, 15, size=3) + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{cls}_{i:02d}.png")
    spec_path = base / f"{name}.yaml"
    spec_path.write_text(TINY_SPEC.format(name=name, folder=name), encoding="utf-8")
    return spec_path, root


@pytest.fixture
def tiny_task(tmp_path: Path) -> tuple[Path, Path]:
    """A 3-class synthetic task (8 PNGs per class) in ``tmp_path``: (spec_path, data_root)."""
    return make_tiny_task(tmp_path)
