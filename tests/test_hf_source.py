"""A Hugging Face ``datasets`` dataset saved to disk is a task source like any other."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retbench.data import load_examples, make_splits
from retbench.spec import parse_spec

datasets = pytest.importorskip("datasets")

SPEC = """\
name: hf_tiny
version: 1
modality: cfp
problem: binary
source: {kind: hf_disk, path: hf_tiny, image_column: image, label_column: label}
splits: {strategy: given}
classes: [{name: healthy, match: [normal]}, {name: disease, match: [abnormal]}]
metrics: [aca, auroc]
protocols: [linear_probe]
"""


def _image(value: int) -> Image.Image:
    return Image.fromarray(np.full((16, 20, 3), value, dtype=np.uint8))


def test_hf_disk_dataset_dict(tmp_path: Path) -> None:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["normal", "abnormal"])})
    parts = {}
    for split, n in (("train", 6), ("test", 4)):
        parts[split] = datasets.Dataset.from_dict(
            {"image": [_image(10 * i) for i in range(n)], "label": [i % 2 for i in range(n)]}, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(tmp_path / "hf_tiny"))
    spec_file = tmp_path / "hf_tiny.yaml"
    spec_file.write_text(SPEC, encoding="utf-8")

    spec = parse_spec(spec_file)
    examples = load_examples(spec, tmp_path)
    splits = make_splits(spec, examples)
    assert len(splits["train"]) == 6 and len(splits["test"]) == 4
    assert examples.labels.tolist() == [0, 1, 0, 1, 0, 1, 0, 1, 0, 1]
    image = examples.images.open(examples.ids[3])
    assert image.size == (20, 16) and np.asarray(image)[0, 0, 0] == 30
