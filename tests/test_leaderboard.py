"""Leaderboards from a synthetic store (3 models × 3 tasks): tables, marks, figures, and every number
checked against scipy / sklearn computed independently from the stored predictions."""

from __future__ import annotations

import csv
import zlib
from pathlib import Path

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import accuracy_score

from retbench import resampling as rs
from retbench import stats
from retbench.cli import main
from retbench.errors import RetbenchError
from retbench.leaderboard import MEAN, build_board, load_store, write_leaderboards
from retbench.metrics import METRICS, Metric
from retbench.store import result_path, write_result

QUALITY = {"base.v1": 1.0, "good.v1": 2.2, "weak.v1": 0.6}
TASKS = {"alpha": 3, "beta": 2, "gamma": 4}
PER_CLASS = 10


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def _labels(task: str) -> np.ndarray:
    return np.repeat(np.arange(TASKS[task]), PER_CLASS)


def make_store(root: Path, protocol: str, seeds: range, ks: tuple[int | None, ...] = (None,),
               models: dict[str, float] = QUALITY, tasks: tuple[str, ...] = tuple(TASKS), version: str = "1",
               folds: bool = False) -> None:
    """Write one result per (model, task) with runs per (k, seed) and their test predictions
    (``folds``: each seed scores its own test images, as cross-validation folds do)."""
    for task in tasks:
        y = _labels(task)
        for model, quality in models.items():
            runs = []
            for k in ks:
                for seed in seeds:
                    rng = np.random.default_rng([seed, k or 0, zlib.crc32(model.encode()), zlib.crc32(task.encode())])
                    strength = quality * (1.0 if k is None else 0.4 + 0.3 * np.log2(k))
                    proba = np.round(_softmax(strength * np.eye(TASKS[task])[y] + rng.normal(0, 1, (len(y), TASKS[task]))), 6)
                    index = 3 * np.arange(len(y)) + 1 + (1000 * seed if folds else 0)
                    runs.append({"seed": seed, "k": k, "metrics": {"accuracy": accuracy_score(y, proba.argmax(1))},
                                 "predictions": {"index": index.tolist(), "y_true": y.tolist(), "proba": proba.tolist()}})
            result = {
                "schema": 1, "model": {"name": model}, "primary_metric": "accuracy",
                "task": {"name": task, "version": version, "spec_hash": f"spec{version}",
                         "classes": [f"class {c}" for c in range(TASKS[task])]},
                "protocol": {"name": protocol, "settings": {"seeds": list(seeds), "solver": {"iterations": len(model)}}},
                "data": {"split_strategy": "stratified", "split_seed": 0, "image_list_hash": f"images-{task}",
                         "n_test": len(y), "splits": {"test": {"n": len(y)}}},
                "headline_k": ks[-1], "runs": runs,
                "metrics": {"accuracy": {"mean": float(np.mean([r["metrics"]["accuracy"] for r in runs if r["k"] == ks[-1]])),
                                         "ci95": [0.1, 0.9]}},
            }
            write_result(result_path(root, model, task, protocol), result)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("store") / "results"
    make_store(root, "linear_probe", range(5))
    make_store(root, "few_shot", range(10), ks=(1, 2, 4))
    return root


@pytest.fixture(scope="module")
def boards(store: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("boards")
    written: list[Path] = []
    md = write_leaderboards(store, out, baselines=["base"], written=written)
    assert md == [out / "few_shot.md", out / "linear_probe.md"]
    return out


def _accuracies(store: Path, protocol: str, model: str, task: str, k: int | None = None) -> dict[int, float]:
    import json

    data = json.loads(result_path(store, model, task, protocol).read_text())
    return {r["seed"]: accuracy_score(r["predictions"]["y_true"], np.argmax(r["predictions"]["proba"], 1))
            for r in data["runs"] if r["k"] == k}


def _csv(path: Path) -> dict[tuple[str, str], dict[str, str]]:
    with path.open() as fh:
        return {(row["model"], row["task"]): row for row in csv.DictReader(fh)}


def test_files_marks_and_footnotes(boards: Path) -> None:
    names = {p.relative_to(boards).as_posix() for p in boards.rglob("*") if p.is_file()}
    assert {"README.md", "linear_probe.md", "linear_probe.csv", "linear_probe.html", "few_shot.md", "few_shot.csv",
            "few_shot.html", "figures/few_shot-curves.png", "figures/few_shot-bars.png", "figures/few_shot-roc.png",
            "figures/linear_probe-bars.png", "figures/linear_probe-roc.png"} <= names
    assert {f"figures/linear_probe-confusion-{t}.png" for t in TASKS} <= names  # the primary protocol only
    assert not any("few_shot-confusion" in n for n in names)
    for png in boards.glob("figures/*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (boards / "linear_probe.md").read_text()
    assert "`base.v1` (baseline)" in md and "**<u>" not in md.split("`good.v1`")[0].split("\n")[-1]
    good_row = next(line for line in md.splitlines() if line.startswith("| `good.v1`"))
    assert good_row.count("**") >= 2 and "(+" in good_row  # best in bold, positive deltas
    assert "<u>" in next(line for line in md.splitlines() if line.startswith("| `base.v1`"))
    assert "Holm-adjusted over the 2 models" in md
    assert "Per task: paired bootstrap of the difference, both models scored on the same resampled test images" in md
    assert "over the task means, n = 3 tasks" in md and "smallest attainable two-sided p is 0.25" in md
    assert "share one test set and are not replicates of it" in md  # what the runs of linear_probe are
    assert "task versions: alpha v1, beta v1, gamma v1" in md
    assert "![linear_probe: per-task bars with 95% CIs](figures/linear_probe-bars.png)" in md
    few = (boards / "few_shot.md").read_text()
    assert "accuracy, k=4" in few and "figures/few_shot-curves.png" in few and "real replicates of support-set sampling" in few
    html = (boards / "linear_probe.html").read_text()
    assert html.startswith("<!DOCTYPE html>") and "<u>" in html and "<img src='figures/linear_probe-roc.png'" in html


def test_regenerating_is_byte_identical(store: Path, boards: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    write_leaderboards(store, again, ["linear_probe"], baselines=["base.v1"])  # one protocol: fewer figures to draw
    second = {p.relative_to(again): p.read_bytes() for p in again.rglob("*") if p.is_file() and p.name != "README.md"}
    assert len(second) == 3 + 2 + len(TASKS)  # md, csv, html; bars, ROC; a confusion matrix per task
    assert [k for k, data in second.items() if (boards / k).read_bytes() != data] == []


def _preds(store: Path, protocol: str, model: str, task: str, k: int | None = None) -> list[rs.RunPredictions]:
    import json

    data = json.loads(result_path(store, model, task, protocol).read_text())
    return [rs.predictions_of(r) for r in data["runs"] if r["k"] == k]


def test_cells_and_tests_against_references(store: Path, boards: Path) -> None:
    """Cells: the image × run bootstrap (checked against brute force in test_resampling) of the stored
    predictions; per task the paired bootstrap; the mean column: scipy's Wilcoxon over task means."""
    rows = _csv(boards / "linear_probe.csv")
    metric = METRICS.get("accuracy")
    task_means: dict[str, list[float]] = {m: [] for m in QUALITY}
    dists: dict[str, list[np.ndarray]] = {m: [] for m in QUALITY}
    for task in TASKS:
        for model in QUALITY:
            acc = _accuracies(store, "linear_probe", model, task)
            iv = rs.bootstrap(metric, _preds(store, "linear_probe", model, task), None, seed=rs.task_seed(task))
            row = rows[(model, task)]
            assert float(row["mean"]) == pytest.approx(np.mean(list(acc.values())))
            assert (float(row["ci_low"]), float(row["ci_high"])) == pytest.approx((iv.low, iv.high))
            assert row["ci_method"] == "bootstrap" and float(row["ci_low"]) < float(row["mean"]) < float(row["ci_high"])
            task_means[model].append(np.mean(list(acc.values())))
            dists[model].append(iv.distribution)
        for model in ("good.v1", "weak.v1"):
            ref = rs.paired_bootstrap(metric, _preds(store, "linear_probe", model, task),
                                      _preds(store, "linear_probe", "base.v1", task), None, seed=rs.task_seed(task))
            assert float(rows[(model, task)]["p_value"]) == pytest.approx(ref.p_value)
            assert rows[(model, task)]["test"] == "bootstrap" and rows[(model, task)]["n_pairs"] == str(len(_labels(task)))
    # Mean column: Wilcoxon over the 3 task means (n = tasks), Holm over the two models compared.
    p = {m: float(sps.wilcoxon(np.array(task_means[m]) - np.array(task_means["base.v1"])).pvalue)
         for m in ("good.v1", "weak.v1")}
    for model in p:
        row = rows[(model, MEAN)]
        assert float(row["mean"]) == pytest.approx(np.mean(task_means[model]))
        assert float(row["delta"]) == pytest.approx(np.mean(task_means[model]) - np.mean(task_means["base.v1"]))
        assert float(row["p_value"]) == pytest.approx(p[model]) and row["n_pairs"] == "3"
        assert row["stars"] == ""  # 3 tasks cannot reach p < 0.01
    # The mean's CI: percentiles of the mean of the tasks' replicates.
    mean_dist = np.mean(np.stack(dists["good.v1"]), axis=0)
    assert (float(rows[("good.v1", MEAN)]["ci_low"]), float(rows[("good.v1", MEAN)]["ci_high"])) == pytest.approx(
        tuple(np.percentile(mean_dist, [2.5, 97.5])))


def test_one_task_mean_ci_equals_the_task_ci(tmp_path: Path) -> None:
    root = tmp_path / "results"
    make_store(root, "linear_probe", range(5), tasks=("alpha",))
    board = build_board("linear_probe", load_store(root)["linear_probe"], baselines=["base.v1"])
    for model in QUALITY:
        task, mean = board.cell(model, "alpha"), board.cell(model, MEAN)
        assert (mean.mean, mean.low, mean.high) == pytest.approx((task.mean, task.low, task.high))


def test_paired_table_by_task_only_when_runs_share_a_test_set(store: Path, tmp_path: Path) -> None:
    board = build_board("linear_probe", load_store(store)["linear_probe"], baselines=["base.v1"])
    by = {(r.model, r.unit): r for r in board.paired}
    assert set(by) == {("good.v1", "task"), ("weak.v1", "task")}  # no task × seed: the seeds share the test set
    good = [np.mean(list(_accuracies(store, "linear_probe", "good.v1", t).values())) for t in TASKS]
    base = [np.mean(list(_accuracies(store, "linear_probe", "base.v1", t).values())) for t in TASKS]
    row = by[("good.v1", "task")].result
    assert row.p_value == pytest.approx(float(sps.wilcoxon(good, base).pvalue))
    assert row.n == 3 and row.wins == 3 and row.effect_size == 1.0
    # Folds with their own test sets are replicates of test sampling: then task × fold pairs appear.
    root = tmp_path / "folds"
    make_store(root, "linear_probe.flair", range(5), folds=True)
    board = build_board("linear_probe.flair", load_store(root)["linear_probe.flair"], baselines=["base.v1"])
    by = {(r.model, r.unit): r for r in board.paired}
    assert by[("good.v1", "task × fold")].result.n == 15


def test_few_shot_uses_the_headline_k(store: Path, boards: Path) -> None:
    rows = _csv(boards / "few_shot.csv")
    acc = _accuracies(store, "few_shot", "good.v1", "beta", k=4)
    assert rows[("good.v1", "beta")]["k"] == "4"
    assert float(rows[("good.v1", "beta")]["mean"]) == pytest.approx(np.mean(list(acc.values())))
    ref = rs.paired_bootstrap(METRICS.get("accuracy"), _preds(store, "few_shot", "good.v1", "beta", 4),
                              _preds(store, "few_shot", "base.v1", "beta", 4), None, seed=rs.task_seed("beta"))
    assert float(rows[("good.v1", "beta")]["p_value"]) == pytest.approx(ref.p_value)


@pytest.fixture
def fast_metrics(monkeypatch: pytest.MonkeyPatch) -> None:
    """Two numpy metrics (fast bootstraps; one where lower is better), registered for this test only."""
    def np_accuracy(y: np.ndarray, proba: np.ndarray) -> float:
        return float(np.mean(proba.argmax(1) == y))

    def np_error(y: np.ndarray, proba: np.ndarray) -> float:
        return 1.0 - np_accuracy(y, proba)

    monkeypatch.setitem(METRICS._items, "np_accuracy", Metric("np_accuracy", np_accuracy, True, "test"))
    monkeypatch.setitem(METRICS._items, "np_error", Metric("np_error", np_error, False, "test"))


def test_single_runs_bootstrap_and_delong(tmp_path: Path, fast_metrics: None) -> None:
    root = tmp_path / "results"
    make_store(root, "zero_shot", range(1), models={"base.v1": 1.0, "good.v1": 1.6}, tasks=("alpha", "beta"))
    results = load_store(root)["zero_shot"]
    board = build_board("zero_shot", results, metric="np_accuracy", baselines=["base.v1"])
    metric = METRICS.get("np_accuracy")
    y = _labels("alpha")
    pa = np.array(results[("good.v1", "alpha")]["runs"][0]["predictions"]["proba"])
    ref = sps.bootstrap((np.arange(len(y)),), lambda i: metric(y[i], pa[i]), n_resamples=1000, vectorized=False,
                        method="percentile", rng=np.random.default_rng(rs.task_seed("alpha")))
    cell = board.cell("good.v1", "alpha")
    assert (cell.low, cell.high, cell.ci_method) == pytest.approx(
        (ref.confidence_interval.low, ref.confidence_interval.high, "bootstrap"))
    comp = board.comparisons[("good.v1", "alpha")]
    assert comp.test == "bootstrap" and comp.n == len(y)
    # Binary AUROC of single runs: DeLong's test.
    beta = {key: r for key, r in results.items() if key[1] == "beta"}
    board = build_board("zero_shot", beta, metric="auroc", baselines=["base.v1"])
    yb = _labels("beta")
    pa = np.array(results[("good.v1", "beta")]["runs"][0]["predictions"]["proba"])
    pb = np.array(results[("base.v1", "beta")]["runs"][0]["predictions"]["proba"])
    comp = board.comparisons[("good.v1", "beta")]
    assert comp.test == "delong"
    assert comp.p_value == pytest.approx(stats.delong_test(yb, pa[:, 1], pb[:, 1]).p_value)


def test_lower_is_better_metric(store: Path, fast_metrics: None) -> None:
    board = build_board("linear_probe", load_store(store)["linear_probe"], metric="np_error", baselines=["base.v1"])
    assert board.models[0] == "good.v1"  # sorted by mean error, lowest first
    errors = {m: board.cell(m, "alpha").mean for m in QUALITY}
    assert errors["good.v1"] == min(errors.values())
    from retbench.leaderboard import shown_cell

    assert shown_cell(board, "good.v1", "alpha").bold and not shown_cell(board, "weak.v1", "alpha").bold
    assert board.comparisons[("good.v1", MEAN)].delta < 0  # less error than the baseline ...
    assert next(r for r in board.paired if r.model == "good.v1").result.effect_size > 0  # ... which is better


def test_refuses_results_from_different_task_versions(tmp_path: Path) -> None:
    root = tmp_path / "results"
    make_store(root, "linear_probe", range(2), tasks=("alpha",))
    make_store(root, "linear_probe", range(2), models={"weak.v1": 0.6}, tasks=("alpha",), version="2")
    expected = r"alpha / linear_probe: .*task version differs \(base.v1: 1; good.v1: 1; weak.v1: 2\)"
    with pytest.raises(RetbenchError, match=expected):
        write_leaderboards(root, tmp_path / "out", figures=False)


def test_baselines_names_and_none(store: Path, tmp_path: Path) -> None:
    with pytest.raises(RetbenchError, match="did you mean good.v1"):
        write_leaderboards(store, tmp_path / "x", baselines=["goood.v1"], figures=False)
    write_leaderboards(store, tmp_path / "plain", protocols=["linear_probe"], figures=False)
    md = (tmp_path / "plain" / "linear_probe.md").read_text()
    assert "no baseline was given" in md and "<u>" not in md and "<sup>" not in md and "(+" not in md
    assert not (tmp_path / "plain" / "figures").exists()


def test_cli_leaderboard(store: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    code = main(["leaderboard", "--results-dir", str(store), "--out", str(out), "--protocol", "linear_probe",
                 "--baseline", "base", "--correction", "bh", "--no-figures"])
    assert code == 0
    assert "wrote" in capsys.readouterr().out
    assert "Benjamini–Hochberg-adjusted" in (out / "linear_probe.md").read_text()
    assert main(["leaderboard", "--results-dir", str(store), "--out", str(out), "--resamples", "10"]) == 2
    assert "at least 1000" in capsys.readouterr().err


def test_html_page_comes_from_the_template_and_escapes_like_html_escape(tmp_path: Path) -> None:
    """The HTML page is rendered from templates/leaderboard.html; names are escaped exactly as html.escape does
    (quotes as &#x27; and &quot;, not Jinja's &#39; and &#34;), so pages stay byte-identical to the f-string era."""
    import html

    from retbench.leaderboard.render import render_html

    template = Path(__file__).resolve().parents[1] / "retbench" / "leaderboard" / "templates" / "leaderboard.html"
    assert template.is_file()
    odd = "o'dd <\"model\"> & co"
    root = tmp_path / "results"
    make_store(root, "linear_probe", range(2), models={odd: 2.0, "base.v1": 1.0}, tasks=("alpha",))
    board = build_board("linear_probe", load_store(root)["linear_probe"], baselines=["base.v1"])
    board.figures = [("ROC 'curves'", "figures/a&b.png")]
    page = render_html(board)
    assert f"<tr><td><code>{html.escape(odd)}</code></td>" in page and "&#x27;" in page and "&#39;" not in page
    assert "<figure><img src='figures/a&amp;b.png' alt='ROC &#x27;curves&#x27;'>" in page
    assert "<tr><td><code>base.v1</code> (baseline)</td><td><u>0." in page  # best baseline underlined
    assert "</b> <span class='delta'>(+" in page  # the better model: bold, with its difference
    assert page.startswith("<!DOCTYPE html>\n<html lang='en'>\n") and page.endswith("</body>\n</html>\n")
    assert "\n\n" not in page  # blocks leave no blank lines
