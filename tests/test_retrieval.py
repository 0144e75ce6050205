"""Retrieval: rank metrics on hand-computed examples (ties included), the spec schema, pairs and joins,
the ridge map, and both protocols end to end (synthetic pairs, and the bundled CSDI and CFP↔OCT tasks)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import Ridge

import retbench
from retbench.cli import main
from retbench.data import load_examples, make_splits
from retbench.data.pairs import load_pairs
from retbench.errors import DataError, SpecError
from retbench.leaderboard import load_store, write_leaderboards
from retbench.metrics import METRICS, rank_metric, rank_values, tie_counts
from retbench.protocols.retrieval import ridge_map
from retbench.spec import parse_spec
from retbench.tasks import get_task

RANK_METRICS = ("recall_at_1", "recall_at_5", "recall_at_10", "median_rank", "mean_rank", "mrr")


def options(base: Path, **extra) -> dict:
    return {"results_dir": str(base / "results"), "cache_dir": str(base / "cache"), "device": "cpu", "num_workers": 0,
            **extra}


# ------------------------------------------------------------------ metrics, by hand


def test_rank_metrics_without_ties() -> None:
    # query 0: relevant column 2 scores 0.7; one item (0.9) above → rank 2
    # query 1: relevant column 0 is the best → rank 1
    # query 2: relevant column 1 is the worst of 12 → rank 12
    scores = np.array([[0.9, 0.1, 0.7] + [0.0] * 9,
                       [0.8, 0.3, 0.2] + [0.0] * 9,
                       [0.5, -0.9, 0.4] + [-0.5] * 9])
    y = np.array([2, 0, 1])
    assert METRICS.get("recall_at_1")(y, scores) == pytest.approx(1 / 3)
    assert METRICS.get("recall_at_5")(y, scores) == pytest.approx(2 / 3)
    assert METRICS.get("recall_at_10")(y, scores) == pytest.approx(2 / 3)
    assert METRICS.get("mean_rank")(y, scores) == pytest.approx((2 + 1 + 12) / 3)
    assert METRICS.get("median_rank")(y, scores) == pytest.approx(2)
    assert METRICS.get("mrr")(y, scores) == pytest.approx((1 / 2 + 1 + 1 / 12) / 3)
    assert not METRICS.get("mean_rank").higher_is_better and not METRICS.get("median_rank").higher_is_better
    assert METRICS.get("recall_at_1").higher_is_better and METRICS.get("mrr").higher_is_better


def test_rank_metrics_count_half_of_the_ties() -> None:
    # query 0: relevant col 1 (0.5) tied with col 2, one item above: rank 1 + 1 + 1/2 = 2.5
    # query 1: all four tied: rank 1 + 3/2 = 2.5; top-1 with probability 1/4
    scores = np.array([[0.9, 0.5, 0.5, 0.1], [0.2, 0.2, 0.2, 0.2]])
    y = np.array([1, 3])
    h, t, m = tie_counts(y, scores)
    assert h.tolist() == [1, 0] and t.tolist() == [1, 3] and m.tolist() == [1, 1]
    assert METRICS.get("mean_rank")(y, scores) == pytest.approx(2.5)
    assert METRICS.get("median_rank")(y, scores) == pytest.approx(2.5)
    assert METRICS.get("recall_at_1")(y, scores) == pytest.approx((0 + 1 / 4) / 2)
    assert METRICS.get("recall_at_5")(y, scores) == pytest.approx(1.0)
    # query 0: rank 2 or 3 with probability 1/2 each; query 1: rank 1..4 uniformly
    assert METRICS.get("mrr")(y, scores) == pytest.approx(((1 / 2 + 1 / 3) / 2 + (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4) / 2)
    # Recall@2 of query 0 (not a registered metric): the tie decides, 1/2
    assert rank_values("recall_at_2", h, t, m)[0] == pytest.approx(0.5)


def test_several_relevant_items_tied() -> None:
    # relevant {0, 1} tied at the top with one irrelevant item: first relevant at 1 w.p. 2/3, at 2 w.p. 1/3
    scores = np.array([[0.5, 0.5, 0.5, 0.1]])
    relevant = np.array([[True, True, False, False]])
    h, t, m = tie_counts(relevant, scores)
    assert (h[0], t[0], m[0]) == (0, 1, 2)
    assert METRICS.get("mean_rank")(relevant, scores) == pytest.approx(1 + 1 / 3)
    assert METRICS.get("recall_at_1")(relevant, scores) == pytest.approx(2 / 3)
    assert METRICS.get("mrr")(relevant, scores) == pytest.approx(2 / 3 + 1 / 3 / 2)
    # the best relevant item counts: a lower-scoring relevant item does not add ties or ranks
    scores = np.array([[0.4, 0.9, 0.9, 0.1]])
    relevant = np.array([[True, True, False, True]])
    assert METRICS.get("mean_rank")(relevant, scores) == pytest.approx(1.5)


def _brute_force(relevant: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Every metric averaged over every tie-breaking order (exhaustive), then over queries."""
    per_query: dict[str, list[float]] = {n: [] for n in RANK_METRICS}
    for rel, s in zip(relevant, scores):
        ranks = []
        for perm in itertools.permutations(range(len(s))):
            order = sorted(range(len(s)), key=lambda j: (-s[j], perm.index(j)))
            ranks.append(1 + min(order.index(j) for j in np.flatnonzero(rel)))
        ranks = np.array(ranks, dtype=float)
        for k in (1, 5, 10):
            per_query[f"recall_at_{k}"].append(float(np.mean(ranks <= k)))
        per_query["mean_rank"].append(float(ranks.mean()))
        per_query["median_rank"].append(float(ranks.mean()))
        per_query["mrr"].append(float(np.mean(1 / ranks)))
    return {n: float(np.median(v) if n == "median_rank" else np.mean(v)) for n, v in per_query.items()}


def test_closed_forms_equal_exhaustive_tie_breaking() -> None:
    rng = np.random.default_rng(0)
    for _ in range(6):
        scores = rng.integers(0, 3, size=(4, 6)).astype(float)  # many ties
        relevant = rng.random((4, 6)) < 0.3
        relevant[np.arange(4), rng.integers(0, 6, size=4)] = True
        expected = _brute_force(relevant, scores)
        for name in RANK_METRICS:
            assert METRICS.get(name)(relevant, scores) == pytest.approx(expected[name]), name


def test_recall_at_k_is_top_k_accuracy_on_class_scores() -> None:
    rng = np.random.default_rng(1)
    proba = rng.random((50, 4))
    y = rng.integers(0, 4, size=50)
    assert METRICS.get("recall_at_1")(y, proba) == pytest.approx(METRICS.get("accuracy")(y, proba))
    top2 = np.argsort(-proba, axis=1)[:, :2]
    h, t, m = tie_counts(y, proba)
    assert rank_metric("recall_at_2", rank_values("recall_at_2", h, t, m)) == pytest.approx(np.mean((top2 == y[:, None]).any(1)))


def test_rank_metrics_match_scikit_learn_without_ties() -> None:
    """On tie-free scores: Recall@K = top-k accuracy, mean rank = coverage error, MRR = label ranking AP."""
    from sklearn import metrics as skm

    rng = np.random.default_rng(3)
    scores = rng.random((40, 12))
    y = rng.integers(0, 12, size=40)
    onehot = np.eye(12, dtype=int)[y]
    for k in (1, 5, 10):
        expected = skm.top_k_accuracy_score(y, scores, k=k, labels=np.arange(12))
        assert METRICS.get(f"recall_at_{k}")(y, scores) == pytest.approx(expected)
    assert METRICS.get("mean_rank")(y, scores) == pytest.approx(skm.coverage_error(onehot, scores))
    assert METRICS.get("mrr")(y, scores) == pytest.approx(skm.label_ranking_average_precision_score(onehot, scores))
    ranks = 12 - np.argsort(np.argsort(scores, axis=1), axis=1)[np.arange(40), y]  # 1 = the highest score
    assert METRICS.get("median_rank")(y, scores) == pytest.approx(np.median(ranks))


def test_a_query_without_relevant_item_is_an_error() -> None:
    with pytest.raises(ValueError, match="relevant"):
        tie_counts(np.zeros((1, 3), dtype=bool), np.zeros((1, 3)))


def test_ridge_map_equals_scikit_learn_ridge() -> None:
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(30, 8)), rng.normal(size=(30, 5))
    alpha = 0.7
    lam = alpha * float((x ** 2).sum()) / 8
    ref = Ridge(alpha=lam, fit_intercept=False).fit(x, y).coef_.T
    np.testing.assert_allclose(ridge_map(x, y, alpha), ref, atol=1e-10)


# ------------------------------------------------------------------ spec schema

BASE = """\
kind: retrieval
name: toy_pairs
version: 1
source: {{kind: csv, path: toy/pairs.csv{source_extra}}}
retrieval:
  sides:
    a: {{column: a, modality: cfp}}
    b: {{column: b, modality: oct, preprocess: {{resize: squash}}}}
    text: {{type: text, column: caption}}
  directions: [{directions}]
{extra}
"""


def write_spec(tmp_path: Path, directions: str = "a_to_b, b_to_a, a_to_text, text_to_a", source_extra: str = "",
               extra: str = "") -> Path:
    path = tmp_path / "toy_pairs.yaml"
    path.write_text(BASE.format(directions=directions, source_extra=source_extra, extra=extra), encoding="utf-8")
    return path


def spec_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return info.value


def test_retrieval_spec_defaults(tmp_path: Path) -> None:
    spec = parse_spec(write_spec(tmp_path))
    assert spec.kind == "retrieval" and spec.problem == "retrieval" and spec.modality == "cfp+oct"
    assert spec.metrics == RANK_METRICS and spec.primary_metric == "recall_at_1"
    assert spec.protocols == ("retrieval.zero_shot", "retrieval.linear_map")
    assert spec.classes == () and spec.vqa is None
    assert [d.name for d in spec.retrieval.directions] == ["a_to_b", "b_to_a", "a_to_text", "text_to_a"]
    assert spec.retrieval.side("b").preprocess == {"resize": "squash"}
    assert [spec.retrieval.needs_text(d) for d in spec.retrieval.directions] == [False, False, True, True]
    text_only = parse_spec(write_spec(tmp_path, "a_to_text"))
    assert text_only.protocols == ("retrieval.zero_shot",) and text_only.modality == "cfp"


@pytest.mark.parametrize("directions, extra, key, words", [
    ("a_to_c", "", "retrieval.directions", "allowed: a_to_b"),
    ("a_to_a", "", "retrieval.directions", "allowed"),
    ("a_to_b", "metrics: [aca]", "metrics", "rank metrics"),
    ("a_to_b", "protocols: [linear_probe]", "protocols", "evaluates classification tasks"),
    ("a_to_text", "protocols: [retrieval.linear_map]", "protocols", "image-to-image direction"),
    ("a_to_b", "problem: multiclass", "problem", "not used"),
    ("a_to_b", "vqa: {questions: []}", "vqa", "kind: vqa"),
    ("a_to_b", "primary_metric: mrr\nmetrics: [recall_at_1]", "primary_metric", "not in metrics"),
])
def test_retrieval_spec_errors(tmp_path: Path, directions: str, extra: str, key: str, words: str) -> None:
    err = spec_error(write_spec(tmp_path, directions, extra=extra))
    assert err.key == key and words in str(err)


def test_side_errors_name_the_side(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent("""\
        kind: retrieval
        name: s
        version: 1
        source: {kind: csv, path: p.csv}
        retrieval:
          sides:
            img: {column: a, modality: fundus}
            txt: {type: text, column: c}
          directions: [img_to_txt]
        """), encoding="utf-8")
    err = spec_error(path)
    assert err.key == "retrieval.sides.img.modality" and "allowed: cfp, oct" in str(err)
    path.write_text(path.read_text().replace("modality: fundus", "modality: cfp").replace(
        "{type: text, column: c}", "{type: text, column: c, preprocess: {resize: squash}}"), encoding="utf-8")
    assert spec_error(path).key == "retrieval.sides.txt.preprocess"
    path.write_text(path.read_text().replace("img:", "img_to_x:").replace("[img_to_txt]", "[img_to_x_to_txt]"))
    assert "'_to_'" in str(spec_error(path))


def test_join_spec_errors(tmp_path: Path) -> None:
    err = spec_error(write_spec(tmp_path, "a_to_b", source_extra=", join: {path: x.csv, on: id}"))
    assert err.key == "source.join.on" and "key:" in str(err)  # YAML 1.1 reads `on` as a boolean: the schema says key
    err = spec_error(write_spec(tmp_path, "a_to_b", source_extra=", join: {path: x.csv}"))
    assert err.key == "source.join.key" and "required" in str(err)
    folder = tmp_path / "f.yaml"
    folder.write_text(VALID_FOLDER, encoding="utf-8")
    assert spec_error(folder).key == "source.join"


VALID_FOLDER = """\
name: f
version: 1
modality: cfp
problem: binary
source: {kind: folder, path: f, join: {path: x.csv, key: id}}
classes: [a, b]
metrics: [aca]
protocols: [linear_probe]
"""


def test_classification_tasks_refuse_retrieval_protocols(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(VALID_FOLDER.replace(", join: {path: x.csv, key: id}", "").replace(
        "[linear_probe]", "[linear_probe, retrieval.zero_shot]"), encoding="utf-8")
    err = spec_error(path)
    assert err.key == "protocols" and "evaluates retrieval tasks" in str(err)


# ------------------------------------------------------------------ pairs, joins, splits


def make_pairs(base: Path, n: int = 12, captions: list[str] | None = None) -> Path:
    """``n`` pairs under base/data/toy: side a a random image, side b the same pixels in another file."""
    folder = base / "data" / "toy"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows, notes = ["id,a,b,patient,grade"], ["key,caption,extra"]
    for i in range(n):
        pixels = rng.integers(0, 255, size=(16, 16, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / f"a{i}.png")
        Image.fromarray(pixels).save(folder / f"b{i}.png")
        rows.append(f"p{i},a{i}.png,b{i}.png,{i // 2},{i % 2}")
        notes.append(f"p{i},{(captions or [f'caption number {i}'] * n)[i]},{i}")
    (folder / "pairs.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    (folder / "notes.csv").write_text("\n".join([notes[0]] + notes[1:][::-1]) + "\n", encoding="utf-8")  # other order
    return base / "data"


PAIR_SOURCE = ", join: {path: toy/notes.csv, key: id, join_key: key, columns: [caption]}, patient_column: patient"


def test_pairs_join_and_split_by_patient(tmp_path: Path) -> None:
    root = make_pairs(tmp_path)
    spec = parse_spec(write_spec(tmp_path, source_extra=PAIR_SOURCE, extra="splits: {test_fraction: 0.5}"))
    pairs = load_pairs(spec, root)
    assert len(pairs) == 12 and pairs.sides["text"].values[3] == "caption number 3"  # joined by key, not by row
    assert pairs.sides["a"].values[3] == "a3.png" and pairs.sides["b"].values[3] == "b3.png"
    train, test = pairs.splits["train"], pairs.splits["test"]
    assert sorted(np.concatenate([train, test]).tolist()) == list(range(12))
    patients = np.asarray(pairs.patients)
    assert not set(patients[train]) & set(patients[test])
    # the images as any task sees them (pretraining's test-image exclusion): both sides, split with their pair
    examples = load_examples(spec, root)
    assert len(examples) == 24 and examples.ids[:2] == ["a0.png", "a1.png"] and examples.ids[12] == "b0.png"
    rows = make_splits(spec, examples)["test"]
    assert sorted(examples.ids[i] for i in rows) == sorted([f"a{i}.png" for i in test] + [f"b{i}.png" for i in test])


def test_join_errors(tmp_path: Path) -> None:
    root = make_pairs(tmp_path)
    notes = root / "toy" / "notes.csv"
    lines = notes.read_text().splitlines()
    notes.write_text("\n".join(lines[:-1]) + "\n")  # one key lost
    spec = parse_spec(write_spec(tmp_path, source_extra=PAIR_SOURCE))
    with pytest.raises(DataError, match="has no row in .*notes.csv.*1 rows unmatched"):
        load_pairs(spec, root)
    notes.write_text("\n".join(lines + [lines[1]]) + "\n")  # one key twice
    with pytest.raises(DataError, match="appears twice"):
        load_pairs(spec, root)


def test_missing_caption_fails_or_is_dropped(tmp_path: Path) -> None:
    root = make_pairs(tmp_path, captions=[f"c{i}" if i != 4 else "" for i in range(12)])
    spec = parse_spec(write_spec(tmp_path, source_extra=PAIR_SOURCE))
    with pytest.raises(DataError, match=r"row \d+: empty column 'caption' \(side 'text'\)"):
        load_pairs(spec, root)
    spec = parse_spec(write_spec(tmp_path, source_extra=PAIR_SOURCE + ", drop_missing_labels: true"))
    pairs = load_pairs(spec, root)
    assert len(pairs) == 11 and len(pairs.dropped["missing_value"]) == 1


# ------------------------------------------------------------------ protocols end to end (synthetic)


def test_identical_images_are_found_first(tmp_path: Path) -> None:
    """Side b holds the same pixels as side a: the zero-training cosine ranks every partner first."""
    root = make_pairs(tmp_path, n=16)
    path = write_spec(tmp_path, "a_to_b, b_to_a", source_extra=PAIR_SOURCE,
                      extra="splits: {test_fraction: 0.5}\npreprocess: {resize: squash}")
    res = retbench.evaluate("classical", str(path), "retrieval.zero_shot", data_root=str(root), **options(tmp_path))
    assert res.metrics["recall_at_1"]["mean"] == 1.0 and res.metrics["mean_rank"]["mean"] == 1.0
    assert res.metrics["a_to_b/mrr"]["mean"] == 1.0
    run = res.data["runs"][0]
    test = set(run["directions"]["a_to_b"]["queries"])
    assert test == set(res.data["runs"][0]["directions"]["b_to_a"]["gallery"]) and len(test) == 8
    assert run["image_space"] == "probe features"  # a vision-only model: its features


def test_duplicate_captions_count_once_and_all_their_images_are_relevant(tmp_path: Path) -> None:
    captions = [f"caption {i}" for i in range(10)]
    captions[1] = captions[0]
    root = make_pairs(tmp_path, n=10, captions=captions)
    path = write_spec(tmp_path, "a_to_text, text_to_a", source_extra=PAIR_SOURCE,
                      extra="splits: {test_fraction: 0.5, by_patient: true}")
    res = retbench.evaluate("tinyclip", str(path), "retrieval.zero_shot", data_root=str(root), **options(tmp_path))
    run = res.data["runs"][0]
    pairs = load_pairs(get_task(str(path)), root)
    test = pairs.splits["test"].tolist()
    i2t = run["directions"]["a_to_text"]
    texts_in_test = {pairs.sides["text"].values[i] for i in test}
    assert len(i2t["gallery"]) == len(texts_in_test)  # the shared caption is one gallery item
    assert i2t["queries"] == test and run["image_space"] == "image-text embeddings"
    # the stored tie counts reproduce every stored metric
    for d, rec in run["directions"].items():
        h, t, m = (np.asarray(rec[k]) for k in ("higher", "ties", "tied_relevant"))
        for name in RANK_METRICS:
            assert rank_metric(name, rank_values(name, h, t, m)) == pytest.approx(run["metrics"][f"{d}/{name}"])
    for name in RANK_METRICS:
        mean = np.mean([run["metrics"][f"{d}/{name}"] for d in ("a_to_text", "text_to_a")])
        assert res.metrics[name]["mean"] == pytest.approx(mean)
    assert res.metrics["recall_at_5"]["ci95"][0] <= res.metrics["recall_at_5"]["mean"] <= res.metrics["recall_at_5"]["ci95"][1]


def test_linear_map_fits_train_pairs_only_and_is_deterministic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import retbench.protocols.retrieval as module

    root = make_pairs(tmp_path, n=20)
    path = write_spec(tmp_path, "a_to_b, b_to_a", source_extra=PAIR_SOURCE,
                      extra="splits: {test_fraction: 0.5}\npreprocess: {resize: squash}")
    seen: list[int] = []
    real = module.ridge_map

    def spy(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
        seen.append(len(x))
        return real(x, y, alpha)

    monkeypatch.setattr(module, "ridge_map", spy)
    res = retbench.evaluate("classical", str(path), "retrieval.linear_map", data_root=str(root), **options(tmp_path))
    n_train = res.data["protocol"]["settings"]["n_train_pairs"]
    assert n_train == 10 and max(seen) == n_train and res.data["data"]["n_test"] == 10
    assert set(res.data["runs"][0]["alpha"]) == {"a_to_b", "b_to_a"}
    again = retbench.evaluate("classical", str(path), "retrieval.linear_map", data_root=str(root),
                              **options(tmp_path, overwrite=True))
    assert again.data["metrics"] == res.data["metrics"] and again.data["runs"] == res.data["runs"]


def test_vision_only_models_skip_text_directions(tmp_path: Path) -> None:
    root = make_pairs(tmp_path)
    path = write_spec(tmp_path, "a_to_text", source_extra=PAIR_SOURCE)
    res = retbench.evaluate("classical", str(path), "retrieval.zero_shot", data_root=str(root), **options(tmp_path))
    assert res.status == "skipped" and "no text tower" in res.reason


# ------------------------------------------------------------------ the bundled tasks, through `retbench run`


@pytest.fixture(scope="module")
def bundled_store(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("retrieval_store")
    code = main(["run", "-m", "tinyclip,classical", "-t", "csdi_retrieval,mx_dme_cfp_oct_retrieval",
                 "--data-root", str(data_root), "--results-dir", str(base / "results"),
                 "--cache-dir", str(base / "cache"), "--device", "cpu", "--workers", "0"])
    assert code == 0
    return base


def test_bundled_retrieval_results_in_store(bundled_store: Path) -> None:
    results = bundled_store / "results"
    stored = sorted(str(p.relative_to(results)) for p in results.glob("*/*/*.json"))
    assert stored == [
        "csdi_retrieval/retrieval.zero_shot/tinyclip.test.json",
        "mx_dme_cfp_oct_retrieval/retrieval.linear_map/classical.default.json",
        "mx_dme_cfp_oct_retrieval/retrieval.linear_map/tinyclip.test.json",
        "mx_dme_cfp_oct_retrieval/retrieval.zero_shot/classical.default.json",
        "mx_dme_cfp_oct_retrieval/retrieval.zero_shot/tinyclip.test.json",
    ]  # classical has no text tower: csdi_retrieval (image<->report) is skipped for it
    data = json.loads((results / "mx_dme_cfp_oct_retrieval/retrieval.zero_shot/classical.default.json").read_text())
    assert data["task"]["modality"] == "cfp+oct" and data["data"]["n_test"] == 60 and data["data"]["unit"] == "pair"
    assert set(data["preprocess"]) == {"cfp", "oct"} and data["preprocess"]["oct"]["resize"] == "squash"
    assert data["preprocess"]["cfp"]["fundus_crop"] != "none"
    for name in RANK_METRICS:
        assert f"cfp_to_oct/{name}" in data["metrics"] and f"oct_to_cfp/{name}" in data["metrics"]
    assert 0 <= data["metrics"]["recall_at_5"]["mean"] <= 1 and data["metrics"]["mean_rank"]["mean"] >= 1
    csdi = json.loads((results / "csdi_retrieval/retrieval.zero_shot/tinyclip.test.json").read_text())
    assert csdi["data"]["n_test"] == 94 and set(csdi["runs"][0]["directions"]) == {"image_to_text", "text_to_image"}


def test_bundled_retrieval_on_the_leaderboard(bundled_store: Path, capsys: pytest.CaptureFixture) -> None:
    results, boards = bundled_store / "results", bundled_store / "boards"
    write_leaderboards(results, boards, figures=False)
    zero = (boards / "retrieval.zero_shot.md").read_text()
    assert "`tinyclip.test`" in zero and "`classical.default`" in zero and "recall_at_5" in zero
    # the stored intervals' replication units, per task, where the numbers are shown (not only in the result files)
    assert re.search(r"percentile bootstrap over test units \(csdi_retrieval: \d+ test (patient|pair)s, "
                     r"mx_dme_cfp_oct_retrieval: \d+ test (patient|pair)s\), each replicate scoring the drawn units' "
                     r"queries against the fixed gallery\.", zero), zero
    assert "mx_dme_cfp_oct_retrieval" in (boards / "retrieval.linear_map.md").read_text()
    other = bundled_store / "other-method"  # a stored interval phrased otherwise is quoted whole, never dropped
    shutil.copytree(results, other / "results")
    path = other / "results" / "csdi_retrieval" / "retrieval.zero_shot" / "tinyclip.test.json"
    data = json.loads(path.read_text())
    data["metrics"]["recall_at_5"]["ci_method"] = "BCa bootstrap over 94 queries"
    path.write_text(json.dumps(data))
    write_leaderboards(other / "results", other / "boards", ["retrieval.zero_shot"], figures=False)
    assert ("as its `ci_method` records it (csdi_retrieval: BCa bootstrap over 94 queries, mx_dme_cfp_oct_retrieval: "
            "percentile bootstrap over") in (other / "boards" / "retrieval.zero_shot.md").read_text()
    assert set(load_store(results)) == {"retrieval.zero_shot", "retrieval.linear_map"}
    write_leaderboards(results, boards / "rank", ["retrieval.linear_map"], "cfp_to_oct/mean_rank", figures=False)
    assert "lower is better" in (boards / "rank" / "retrieval.linear_map.md").read_text()
    assert main(["results", "--results-dir", str(results)]) == 0
    assert "retrieval.linear_map" in capsys.readouterr().out
