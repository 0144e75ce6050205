"""Content matching of pretraining images against evaluation test images, on the real corpus."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from retbench.data.dedup import (
    DEFAULT_MAX_DISTANCE,
    HashCache,
    ImageItem,
    exclude_matches,
    file_items,
    hash_items,
    merge_near_duplicate_groups,
    near_duplicate_pairs,
    nearest,
    perceptual_hash,
)
from retbench.data.examples import ArrayImages, Examples
from retbench.data.loading import load_examples
from retbench.data.splits import make_splits
from retbench.tasks import get_task


def jpeg_roundtrip(image: Image.Image, size: tuple[int, int], quality: int = 70) -> Image.Image:
    buf = io.BytesIO()
    image.resize(size, Image.Resampling.LANCZOS).save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def test_nearest_hamming_matches_brute_force():
    rng = np.random.default_rng(0)
    a, b = rng.random((7, 255)) > 0.5, rng.random((11, 255)) > 0.5
    dist, arg = nearest(a, b, chunk=3)
    brute = (a[:, None] != b[None]).sum(-1)
    assert np.array_equal(dist, brute.min(1)) and np.array_equal(brute[np.arange(7), arg], dist)


def test_resized_reencoded_copy_is_close_and_other_photos_are_far(data_root):
    files = sorted((data_root / "csdi" / "images").glob("*.jpg"))[:6]
    images = [Image.open(f).convert("RGB") for f in files]
    hashes = [perceptual_hash(im) for im in images]
    for im, h in zip(images, hashes):
        copy = perceptual_hash(jpeg_roundtrip(im, (224, 224)))  # squashed to a square, re-encoded
        assert (copy != h).sum() <= DEFAULT_MAX_DISTANCE
    others = [(hashes[i] != hashes[j]).sum() for i in range(6) for j in range(i + 1, 6)]
    assert min(others) > DEFAULT_MAX_DISTANCE


def test_csdi_cataract_photos_are_found_in_eye4class_despite_new_names_sizes_and_format(data_root, tmp_path):
    """SOURCE.txt: CSDI's cataract_NNN images re-appear at 224 px (PNG) in eye4class/cataract."""
    csdi = sorted((data_root / "csdi" / "images").glob("cataract_*.jpg"))
    e4c = sorted((data_root / "eye4class" / "cataract").glob("*")) + sorted((data_root / "eye4class" / "normal").glob("*"))[:200]
    if not csdi or not e4c:
        pytest.skip("corpus subsets missing")
    cache = HashCache(tmp_path / "hashes.json")
    keep, excluded = exclude_matches(file_items("csdi", csdi), file_items("eye4class", e4c), cache)
    matched = {Path(x.image.split(":", 1)[1]).stem: Path(x.matches_image).stem for x in excluded}
    same_stem = [f.stem for f in csdi if any(g.stem == f.stem for g in e4c)]
    # every CSDI cataract photo whose eye4class namesake exists is matched, and to that namesake
    assert same_stem and all(matched.get(s) == s for s in same_stem), sorted(set(same_stem) - set(matched))
    assert len(keep) + len(excluded) == len(csdi)
    assert (tmp_path / "hashes.json").is_file()  # hashes are cached for the next run


def test_exact_copies_in_the_paired_subset_are_excluded(data_root, tmp_path):
    paired = sorted((data_root / "mx_dme_oct_fundus" / "paired" / "fundus").glob("*.jpg"))
    subset = sorted((data_root / "mx_dme_oct_fundus" / "fundus").glob("*.jpg"))
    if not paired or not subset:
        pytest.skip("mx_dme subsets missing")
    common = sorted({p.name for p in paired} & {s.name for s in subset})
    cache = HashCache(None)
    keep, excluded = exclude_matches(file_items("paired", paired), file_items("fundus", subset), cache)
    excluded_names = {Path(x.image).name for x in excluded}
    assert set(common) <= excluded_names
    assert all(x.distance == 0 for x in excluded if Path(x.image).name in common)


def test_array_items_and_cache_roundtrip(tmp_path):
    rng = np.random.default_rng(1)
    arrays = [rng.integers(0, 255, (28, 28, 3), dtype=np.uint8) for _ in range(3)]
    items = [ImageItem("arr", str(i), f"a:{i}", lambda a=a: Image.fromarray(a)) for i, a in enumerate(arrays)]
    first = hash_items(items, HashCache(tmp_path / "h.json"))
    again = hash_items(items, HashCache(tmp_path / "h.json"))
    assert np.array_equal(first, again) and first.shape == (3, 255)


def test_near_duplicate_pairs_match_brute_force():
    rng = np.random.default_rng(1)
    h = rng.random((9, 255)) > 0.5
    h[5] = h[2]
    h[7] = h[2] ^ (np.arange(255) < 4)  # 4 bits from image 2
    brute = (h[:, None] != h[None]).sum(-1)
    expected = [(i, j) for i in range(9) for j in range(i + 1, 9) if brute[i, j] <= 10]
    assert near_duplicate_pairs(h, 10, chunk=4) == expected and (2, 5) in expected and (2, 7) in expected


def test_copies_join_their_originals_group_transitively(data_root, tmp_path):
    files = sorted((data_root / "csdi" / "images").glob("*.jpg"))[:4]
    photos = [np.asarray(Image.open(f).convert("RGB").resize((96, 96))) for f in files]
    copy_of_0 = np.asarray(jpeg_roundtrip(Image.fromarray(photos[0]), (80, 80)).resize((96, 96)))
    # rows: photo0 (patient a), photo1 (a: same person), photo2 (b), photo3 (c), a copy of photo0 filed as patient c
    arrays = {"all": [photos[0], photos[1], photos[2], photos[3], copy_of_0]}
    ex = Examples(ids=[f"all/{i}" for i in range(5)], labels=np.zeros(5, dtype=np.int64),
                  patients=["a", "a", "b", "c", "c"], given_split=None, images=ArrayImages(arrays))
    patients, n_pairs = merge_near_duplicate_groups("t", ex, HashCache(tmp_path / "h.json"))
    assert n_pairs == 1
    assert patients == ["a", "a", "b", "a", "a"]  # the copy pulls patient c (and c's other image) into a's group


def test_eye4class_copies_of_test_images_are_not_in_train(data_root):
    spec = get_task("eye4class")
    assert spec.splits.group_near_duplicates and str(spec.version) == "2"
    ex = load_examples(spec, data_root)
    splits = make_splits(spec, ex)
    assert make_splits(spec, ex)["test"].tolist() == splits["test"].tolist()  # merging happens once, same split
    items = file_items("eye4class", [ex.images.path(i) for i in ex.ids], root=ex.images.root)
    hashes = hash_items(items, HashCache(None))
    dist, _ = nearest(hashes[splits["train"]], hashes[splits["test"]])
    assert ex.near_duplicate_pairs >= 20 and (dist <= DEFAULT_MAX_DISTANCE).sum() == 0


def test_eye4class_vqa_splits_like_eye4class(data_root):
    from retbench.runner import load_task_data

    cls, vqa = load_task_data("eye4class", str(data_root)), load_task_data("eye4class_vqa", str(data_root))
    test_ids = {cls.examples.ids[i] for i in cls.splits["test"]}
    assert {vqa.examples.ids[i] for i in vqa.splits["test"]} == test_ids
    assert vqa.examples.near_duplicate_pairs == cls.examples.near_duplicate_pairs > 0
