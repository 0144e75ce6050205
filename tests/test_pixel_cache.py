"""The preprocessed-pixel cache (retbench.pixel_cache) and JPEG draft decoding, on the real bundled images.

Features with the cache equal features without it bit for bit; entries are written atomically and survive
concurrent writers; a damaged entry is warned about and rebuilt, never read as pixels; the cache is held to its
size bound, least recently used first; ``--no-pixel-cache`` and ``$RETBENCH_NO_PIXEL_CACHE`` bypass it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from retbench.adapters import load_model
from retbench.config import RunConfig
from retbench.errors import RetbenchError
from retbench.features import FeatureCache, ImageDataset, extract, file_digest
from retbench.pixel_cache import HEADER_SIZE, PixelCache, max_bytes_from_env, recipe_hash
from retbench.preprocess import Preprocess, normalize
from retbench.runner import load_task_data

CFP_TASK = "mx_dme_cfp_dr"  # 1000×1000 JPEG fundus photos


@pytest.fixture(scope="module")
def cfp(data_root: Path):
    """The first 12 examples of the 1000-px mx_dme CFP task."""
    from retbench.data.examples import Examples

    ex = load_task_data(CFP_TASK, str(data_root)).examples
    n = 12
    return Examples(ex.ids[:n], ex.labels[:n], ex.patients[:n], None, ex.images, {})


def _pixels(dataset: ImageDataset) -> list[torch.Tensor]:
    return [dataset[i][1] for i in range(len(dataset))]


# ------------------------------------------------------------------ same features, bit for bit


def test_features_with_the_pixel_cache_equal_features_without_bit_for_bit(cfp, tmp_path: Path) -> None:
    adapter = load_model("timm:resnet18", "random", "cpu")
    pre = adapter.task_preprocess({"fundus_crop": True})  # a recipe with a crop: the cache holds its exact output
    cache = PixelCache(tmp_path / "pixels")
    plain = extract(adapter, cfp, pre, batch_size=5, num_workers=0)
    cold = extract(adapter, cfp, pre, batch_size=5, num_workers=0, pixel_cache=cache)
    assert len(cache.entries()) == len(cfp)
    warm = extract(adapter, cfp, pre, batch_size=5, num_workers=0, pixel_cache=cache)
    assert plain.values.tobytes() == cold.values.tobytes() == warm.values.tobytes()
    # a model with the same geometry but its own normalisation shares the entries (none written)
    other = dataclasses.replace(pre, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), normalization="per_image")
    assert recipe_hash(other) == recipe_hash(pre)
    before = {p: p.stat().st_mtime_ns for _, _, p in cache.entries()}
    extract(adapter, cfp, other, batch_size=5, num_workers=0, pixel_cache=cache)
    assert {p: p.stat().st_mtime_ns for _, _, p in cache.entries()} == before


def test_run_with_and_without_the_pixel_cache_writes_the_same_numbers(data_root: Path, tmp_path: Path) -> None:
    import retbench

    options = {"data_root": str(data_root), "device": "cpu", "num_workers": 0, "seeds": 1}
    out = {}
    for pixel_cache in (False, True):  # off; on and cold (warm reads: the extract() test above)
        result = retbench.evaluate("classical", CFP_TASK, "linear_probe", results_dir=str(tmp_path / f"r{len(out)}"),
                                   cache_dir=str(tmp_path / "cache"), use_cache=True, pixel_cache=pixel_cache,
                                   overwrite=True, **options)
        (tmp_path / "cache" / "features").rename(tmp_path / f"features{len(out)}")  # next run extracts again
        out[len(out)] = result.data
    assert len(PixelCache(tmp_path / "cache" / "pixels").entries()) == 120
    for key in ("metrics", "runs", "preprocess", "feature_cache_key"):
        assert out[0][key] == out[1][key], key
    assert out[0]["preprocess"]["jpeg_draft"] is False  # the recipe states how images were decoded


# ------------------------------------------------------------------ damaged entries


def test_an_encoder_returning_its_input_keeps_every_batch(cfp) -> None:
    """extract() converts each batch into one reused float buffer on CPU: an encoder whose output is a view of its
    input must still get every batch's own features, not the last batch's pixels written over earlier ones."""
    import types

    pre = Preprocess(size=8)
    identity = types.SimpleNamespace(name="identity", device=torch.device("cpu"), autocast_dtype=None,
                                     channels_last=False, encode_image=lambda x: x.flatten(1))
    feats = extract(identity, cfp, pre, batch_size=5, num_workers=0)  # batches of 5, 5, 2
    expected = normalize(torch.stack(_pixels(ImageDataset(cfp, pre))), pre).flatten(1).numpy()
    assert feats.values.tobytes() == expected.tobytes()


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:HEADER_SIZE + 100])


def _flip_pixel(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0x10
    path.write_bytes(bytes(raw))


def _empty(path: Path) -> None:
    path.write_bytes(b"")


def _foreign(path: Path) -> None:
    path.write_bytes(b"\x89PNG" + bytes(HEADER_SIZE + 3 * 224 * 224))


def _other_entry(path: Path) -> None:  # a valid entry of another image copied over this one
    others = [p for p in path.parent.parent.glob("*/*.px") if p != path]
    path.write_bytes(others[0].read_bytes())


@pytest.mark.parametrize(("damage", "why"), [(_truncate, "truncated"), (_flip_pixel, "CRC-32 does not match"),
                                             (_empty, "shorter than its header"), (_foreign, "bad magic"),
                                             (_other_entry, "key does not match")])
def test_a_damaged_entry_is_warned_about_and_rebuilt(damage, why: str, cfp, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    pre, cache = Preprocess(), PixelCache(tmp_path / "pixels")
    dataset = ImageDataset(cfp, pre, cache)
    first = _pixels(dataset)[:3]
    path = cache.path(pre, file_digest(cfp.images.path(cfp.ids[1])))
    damage(path)
    capsys.readouterr()
    i, pixels, err, written = dataset[1]
    lines = capsys.readouterr().err.strip().splitlines()
    assert err is None and written and torch.equal(pixels, first[1])  # decoded again, not read as pixels
    assert len(lines) == 1 and "pixel cache entry" in lines[0] and why in lines[0] and "rebuilding" in lines[0]
    assert torch.equal(cache.get(pre, file_digest(cfp.images.path(cfp.ids[1]))), first[1])  # rebuilt, valid
    assert not capsys.readouterr().err


def test_an_unwritable_cache_warns_once_and_extraction_goes_on(cfp, tmp_path: Path,
                                                               capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "afile").write_text("x")
    dataset = ImageDataset(cfp, Preprocess(), PixelCache(tmp_path / "afile" / "pixels"))
    plain = _pixels(ImageDataset(cfp, Preprocess()))
    items = [dataset[i] for i in range(4)]
    assert all(err is None and not written and torch.equal(p, q) for (_, p, err, written), q in zip(items, plain))
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("warning: pixel cache: cannot write")


def test_a_full_disk_stops_pixel_caching_without_a_line_of_its_own(cfp, tmp_path: Path, capsys: pytest.CaptureFixture,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    import retbench.atomic_files

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    cache = PixelCache(tmp_path / "pixels")
    dataset = ImageDataset(cfp, Preprocess(), cache)
    monkeypatch.setattr(retbench.atomic_files.tempfile, "mkstemp", full)
    items = [dataset[i] for i in range(3)]
    monkeypatch.undo()
    assert all(err is None and not written for _, _, err, written in items)
    assert not capsys.readouterr().err  # the feature cache or result write after it names the full disk
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # nothing half-written


# ------------------------------------------------------------------ concurrent writers


def _writer(root: str, digest: str, seed: int, rounds: int) -> int:
    cache, pre = PixelCache(Path(root)), Preprocess()
    pixels = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 224, 224), dtype=np.uint8))
    bad = 0
    for _ in range(rounds):
        cache.put(pre, digest, pixels)
        got = cache.get(pre, digest)
        bad += got is None or not torch.equal(got, pixels)
    return bad


def test_processes_writing_the_same_entry_at_once_leave_a_valid_one(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture) -> None:
    digest = "ab" * 32
    ctx = multiprocessing.get_context("fork")
    with ctx.Pool(3) as pool:
        bad = pool.starmap(_writer, [(str(tmp_path), digest, s, 60) for s in range(3)])
    assert bad == [0, 0, 0]  # every read, between other processes' renames, saw a whole entry
    entry = PixelCache(tmp_path).path(Preprocess(), digest)
    assert [p.name for p in entry.parent.iterdir()] == [entry.name]  # no temporary file left behind
    assert torch.equal(PixelCache(tmp_path).get(Preprocess(), digest),
                       torch.from_numpy(np.random.default_rng(0).integers(0, 256, (3, 224, 224), dtype=np.uint8)))
    assert "damaged" not in capsys.readouterr().err


def test_dataloader_workers_fill_the_cache_and_agree(cfp, tmp_path: Path) -> None:
    adapter = load_model("classical", None, "cpu")
    pre = adapter.task_preprocess({})
    cache = PixelCache(tmp_path / "pixels")
    plain = extract(adapter, cfp, pre, batch_size=4, num_workers=0)
    with_workers = extract(adapter, cfp, pre, batch_size=4, num_workers=2, pixel_cache=cache)
    assert plain.values.tobytes() == with_workers.values.tobytes() and len(cache.entries()) == len(cfp)


# ------------------------------------------------------------------ size bound


def test_eviction_keeps_the_bound_least_recently_used_first(tmp_path: Path) -> None:
    cache, pre = PixelCache(tmp_path, max_bytes=0), Preprocess(size=32)
    pixels = torch.zeros(3, 32, 32, dtype=torch.uint8)
    now = time.time()
    digests = [f"{i:064x}" for i in range(6)]
    for age, digest in zip(range(6, 0, -1), digests):  # digests[0] oldest
        cache.put(pre, digest, pixels)
        os.utime(cache.path(pre, digest), (now - 3600 * age, now - 3600 * age))
    entry_size = cache.path(pre, digests[0]).stat().st_size
    assert entry_size == HEADER_SIZE + 3 * 32 * 32 and cache.size() == 6 * entry_size
    assert cache.get(pre, digests[0]) is not None  # a hit: now the most recently used
    freed = cache.evict(3 * entry_size)
    assert freed == 3 * entry_size and cache.size() == 3 * entry_size
    kept = {p.stem for _, _, p in cache.entries()}
    assert kept == {digests[0], digests[4], digests[5]}
    assert cache.evict(3 * entry_size) == 0
    shard = cache.path(pre, digests[5]).parent
    killed, writing = shard / f".{digests[1]}.px.abc.tmp", shard / f".{digests[2]}.px.def.tmp"
    for tmp in (killed, writing):
        tmp.write_bytes(b"partial")
    os.utime(killed, (now - 7200, now - 7200))
    cache.evict()
    assert not killed.exists() and writing.exists()  # a killed writer's leftover goes; one being written stays


def test_extraction_trims_the_cache_to_its_bound(cfp, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    entry = HEADER_SIZE + 3 * 224 * 224
    monkeypatch.setenv("RETBENCH_PIXEL_CACHE_MAX_GB", str(5 * entry / 1e9))
    cache = PixelCache(tmp_path / "pixels")
    extract(load_model("classical", None, "cpu"), cfp, Preprocess(), batch_size=4, num_workers=0, pixel_cache=cache)
    assert 0 < cache.size() <= 5 * entry


@pytest.mark.parametrize("value", ["lots", "-1", "nan"])
def test_a_malformed_size_bound_is_one_line(value: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RETBENCH_PIXEL_CACHE_MAX_GB", value)
    with pytest.raises(RetbenchError, match=r"^\$RETBENCH_PIXEL_CACHE_MAX_GB must be a number of GB >= 0; got"):
        max_bytes_from_env()
    monkeypatch.setenv("RETBENCH_PIXEL_CACHE_MAX_GB", "0.5")
    assert PixelCache(tmp_path).max_bytes == 500_000_000


# ------------------------------------------------------------------ bypass: flag and environment


def test_no_pixel_cache_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from retbench.cli.commands import build_parser

    assert RunConfig(models=("classical",), tasks=("x",)).pixel_cache is True
    monkeypatch.setenv("RETBENCH_NO_PIXEL_CACHE", "1")
    assert RunConfig(models=("classical",), tasks=("x",)).pixel_cache is False
    monkeypatch.delenv("RETBENCH_NO_PIXEL_CACHE")
    parser = build_parser()
    assert parser.parse_args(["run", "-m", "classical", "-t", "eye4class", "--no-pixel-cache"]).no_pixel_cache
    assert parser.parse_args(["sweep", "grid.yaml", "--no-pixel-cache"]).no_pixel_cache
    helps = {name: action.format_help() if hasattr(action, "format_help") else ""
             for name, action in parser._subparsers._group_actions[0].choices.items()}  # noqa: SLF001
    assert "--no-pixel-cache" in helps["run"] and "--no-pixel-cache" in helps["sweep"]


def test_the_grid_key_and_the_sweep_flag_reach_the_jobs(tmp_path: Path) -> None:
    from retbench.sweep.driver import job_settings
    from retbench.sweep.grid import load_grid, with_overrides

    grid_file = tmp_path / "g.yaml"
    grid_file.write_text("name: g\nmodels: [classical]\ntasks: [mx_dme_cfp_dr]\n")
    grid = load_grid(str(grid_file))
    assert grid.pixel_cache is True and job_settings(grid).pixel_cache is True
    assert job_settings(with_overrides(grid, pixel_cache=False)).pixel_cache is False
    grid_file.write_text("name: g\nmodels: [classical]\ntasks: [mx_dme_cfp_dr]\npixel_cache: false\n")
    assert job_settings(load_grid(str(grid_file))).pixel_cache is False
    grid_file.write_text("name: g\nmodels: [classical]\ntasks: [mx_dme_cfp_dr]\npixel_cache: maybe\n")
    with pytest.raises(RetbenchError, match="key 'pixel_cache': expected true or false"):
        load_grid(str(grid_file))


# ------------------------------------------------------------------ JPEG draft decoding


def test_jpeg_draft_is_opt_in_recorded_and_within_its_stated_tolerance(cfp) -> None:
    full, draft = Preprocess(), Preprocess(jpeg_draft=True)
    assert full.to_dict()["jpeg_draft"] is False and draft.to_dict()["jpeg_draft"] is True
    assert recipe_hash(full) != recipe_hash(draft)  # never served from each other's pixel cache entries
    path = cfp.images.path(cfp.ids[0])
    assert full.draft_size(1000, 1000) is None and draft.draft_size(1000, 1000) == (448, 448)
    assert draft.draft_size(800, 800) is None  # less than twice what the resize needs: a full decode
    diffs = []
    for image_id in cfp.ids:
        path = cfp.images.path(image_id)
        a = full.load(cfp.images.open(image_id)).int()
        b = draft.load(draft.open_file(path)).int()
        diffs.append((a - b).abs())
    d = torch.stack(diffs).float()
    assert d.max() > 0  # not the same pixels: hence opt-in
    assert d.max() <= 10 and d.mean() <= 0.3  # the README's tolerance on these photos: at most 7, mean 0.21


def test_feature_cache_keys_at_the_default_decoding_are_unchanged() -> None:
    adapter = load_model("classical", None, "cpu")
    pre = adapter.task_preprocess({})
    key = FeatureCache.key(adapter, pre, "t", "1", "h", False)
    assert FeatureCache.key(adapter, dataclasses.replace(pre, jpeg_draft=True), "t", "1", "h", False) != key
    assert FeatureCache.key(adapter, dataclasses.replace(pre, decoder="nvjpeg"), "t", "1", "h", False) != key
    legacy = {k: v for k, v in pre.to_dict().items() if k not in ("jpeg_draft", "decoder")}
    ident = {"model": adapter.name, "weights": adapter.weights_identity(), "preprocess": legacy, "task": "t",
             "task_version": "1", "images": "h", "space": "features"}
    assert key == hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:24]


def test_a_task_opts_into_jpeg_draft_through_its_preprocess_hints(tmp_path: Path) -> None:
    from retbench.spec.parse import parse_spec

    tasks = Path(__file__).resolve().parents[1] / "tasks"
    source = tasks / "bundled" / f"{CFP_TASK}.yaml"
    text = source.read_text().replace("include: ../_base/", f"include: {tasks / '_base'}/")
    spec_file = tmp_path / f"{CFP_TASK}.yaml"
    spec_file.write_text(text.replace("  fundus_crop: true\n", "  fundus_crop: true\n  jpeg_draft: true\n"))
    spec = parse_spec(spec_file)
    pre = load_model("classical", None, "cpu").task_preprocess(spec.preprocess)
    assert pre.jpeg_draft is True and pre.fundus_crop != "none"
    assert spec.spec_hash != parse_spec(source).spec_hash  # so stored results of the two never mix
    assert load_model("classical", None, "cpu").task_preprocess(parse_spec(source).preprocess).jpeg_draft is False
    spec_file.write_text(text.replace("  fundus_crop: true\n", "  fundus_crop: true\n  jpeg_draft: sometimes\n"))
    with pytest.raises(RetbenchError, match="jpeg_draft"):
        parse_spec(spec_file)
