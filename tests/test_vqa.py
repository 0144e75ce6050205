"""Closed-form VQA: the spec schema, answers read from columns, per-question metrics and their means on
hand-computed examples, both protocols end to end (synthetic colours, and the bundled CSDI and MX-DME sets)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import balanced_accuracy_score

import retbench
from retbench.cli import main
from retbench.data import load_examples, make_splits
from retbench.data.questions import load_questions
from retbench.errors import DataError, SpecError
from retbench.leaderboard import write_leaderboards
from retbench.metrics import METRICS
from retbench.protocols.base import part_means
from retbench.spec import parse_spec
from retbench.stats import summarize

SPEC = """\
kind: vqa
name: colours
version: 1
modality: cfp
source: {{kind: csv, path: colours/labels.csv, image_column: file, patient_column: patient}}
vqa:
  questions:
    - name: colour
      question: Which colour dominates?
      column: colour
      answers:
        - {{name: red, prompts: [red, a red image]}}
        - {{name: green}}
        - {{name: blue}}
    - name: red
      question: Is the image red?
      column: colour
      answers:
        - {{name: "yes", match: [red]}}
        - {{name: "no", match: [green, blue]}}
    - name: brightness
      question: How bright is the image?
      column: brightness
      bins: [100]
      missing: [unknown]
      answers: [dark, bright]
splits: {{test_fraction: 0.25, seed: 0}}
{extra}
"""

COLOURS = {"red": (200, 40, 40), "green": (40, 200, 40), "blue": (40, 40, 200)}


def options(base: Path, **extra) -> dict:
    return {"data_root": str(base / "data"), "results_dir": str(base / "results"), "cache_dir": str(base / "cache"),
            "device": "cpu", "num_workers": 0, **extra}


def make_colours(base: Path, per_colour: int = 12, extra: str = "") -> Path:
    """Noisy colour images with a colour column and a brightness score (some cells empty or 'unknown')."""
    folder = base / "data" / "colours"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["file,colour,brightness,patient"]
    for name, rgb in COLOURS.items():
        for i in range(per_colour):
            pixels = np.clip(np.array(rgb) + rng.normal(0, 20, size=(20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{name}{i}.png")
            brightness = "" if i == 0 else "unknown" if i == 1 else str(int(pixels.mean()))
            rows.append(f"{name}{i}.png,{name},{brightness},{name}{i // 2}")
    (folder / "labels.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    path = base / "colours.yaml"
    path.write_text(SPEC.format(extra=extra), encoding="utf-8")
    return path


def spec_error(path: Path) -> SpecError:
    with pytest.raises(SpecError) as info:
        parse_spec(path)
    msg = str(info.value)
    assert msg.startswith(str(path)) and "\n" not in msg, msg
    return info.value


# ------------------------------------------------------------------ schema


def test_vqa_spec_flattens_question_answer_candidates(tmp_path: Path) -> None:
    spec = parse_spec(make_colours(tmp_path))
    assert spec.kind == "vqa" and spec.problem == "vqa"
    assert spec.metrics == ("balanced_accuracy", "accuracy") and spec.primary_metric == "balanced_accuracy"
    assert spec.protocols == ("vqa.zero_shot", "vqa.probe")
    assert spec.class_names == ["colour: red", "colour: green", "colour: blue", "red: yes", "red: no",
                                "brightness: dark", "brightness: bright"]
    assert spec.class_prompts()[0] == ["Q: Which colour dominates? A: red", "Q: Which colour dominates? A: a red image"]
    assert spec.class_prompts()[3] == ["Q: Is the image red? A: yes"]
    assert spec.vqa.offsets() == [0, 3, 5]
    custom = parse_spec(make_colours(tmp_path, extra="").with_name("colours.yaml"))
    assert custom.vqa.answer_template == "Q: {question} A: {answer}"


@pytest.mark.parametrize("old, new, key, words", [
    ("bins: [100]", "bins: [100, 200]", "vqa.questions[2].bins", "2 answers need 1"),
    ("name: red\n      question", "name: colour\n      question", "vqa.questions", "duplicate question names"),
    ("name: red\n      question", "name: is red\n      question", "vqa.questions[1].name", "letters"),
    ("  questions:", "  answer_template: 'Q: {q}'\n  questions:", "vqa.answer_template", "{question} and {answer}"),
    ("  questions:", "  answer_template: 'Q: {question}'\n  questions:", "vqa.answer_template", "must contain"),
    ("modality: cfp", "modality: cfp\nclasses: [a, b]", "classes", "candidate answers"),
    ("modality: cfp", "modality: cfp\nmetrics: [sensitivity_per_class]", "metrics", "scalar"),
    ("modality: cfp", "modality: cfp\nprotocols: [zero_shot]", "protocols", "evaluates classification tasks"),
    ("image_column: file", "image_column: file, bins: [1]", "source.bins", "per question"),
    ("answers: [dark, bright]", "answers: [dark]", "vqa.questions[2].answers", "at least 2"),
])
def test_vqa_spec_errors(tmp_path: Path, old: str, new: str, key: str, words: str) -> None:
    path = make_colours(tmp_path)
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new, 1), encoding="utf-8")
    err = spec_error(path)
    assert err.key == key and words in str(err), str(err)


# ------------------------------------------------------------------ answers from columns


def test_answers_missing_values_and_split(tmp_path: Path) -> None:
    path = make_colours(tmp_path)
    spec = parse_spec(path)
    data = load_questions(spec, tmp_path / "data")
    ex = data.examples
    assert len(ex) == 36 and data.answers.shape == (36, 3)
    red0, red1, red5 = (ex.ids.index(f"red{i}.png") for i in (0, 1, 5))
    assert data.answers[red0].tolist() == [0, 0, -1]  # empty brightness: not asked
    assert data.answers[red1].tolist() == [0, 0, -1]  # 'unknown' listed under missing
    assert data.answers[red5, 2] in (0, 1) and data.answers[ex.ids.index("blue3.png")][:2].tolist() == [2, 1]
    assert ex.labels.tolist() == [0] * 12 + [1] * 12 + [2] * 12  # the first question's answer (its class index)
    splits = make_splits(spec, load_examples(spec, tmp_path / "data"))
    patients = np.asarray(ex.patients)
    assert not set(patients[splits["train"]]) & set(patients[splits["test"]])


def test_unknown_answer_value_names_the_row(tmp_path: Path) -> None:
    path = make_colours(tmp_path)
    labels = tmp_path / "data" / "colours" / "labels.csv"
    labels.write_text(labels.read_text().replace("green3.png,green", "green3.png,purple"))
    with pytest.raises(DataError, match=r"row \d+: 'purple' in column 'colour' is no answer of question 'colour'"):
        load_questions(parse_spec(path), tmp_path / "data")


# ------------------------------------------------------------------ metrics by hand


def test_per_question_metrics_and_their_mean_by_hand() -> None:
    # question A (binary): truth [0, 0, 0, 1], predicted [0, 0, 1, 1] -> accuracy 3/4, balanced (2/3 + 1) / 2
    y_a, p_a = np.array([0, 0, 0, 1]), np.array([[0.9, 0.1], [0.8, 0.2], [0.3, 0.7], [0.1, 0.9]])
    # question B (3 answers): truth [0, 1, 2], predicted [0, 0, 2] -> accuracy 2/3, balanced (1 + 0 + 1) / 3
    y_b, p_b = np.array([0, 1, 2]), np.array([[0.6, 0.3, 0.1], [0.5, 0.4, 0.1], [0.1, 0.2, 0.7]])
    acc, bal = METRICS.get("accuracy"), METRICS.get("balanced_accuracy")
    assert acc(y_a, p_a) == pytest.approx(0.75) and bal(y_a, p_a) == pytest.approx(5 / 6)
    assert acc(y_b, p_b) == pytest.approx(2 / 3) and bal(y_b, p_b) == pytest.approx(2 / 3)
    assert bal(y_b, p_b) == METRICS.get("aca")(y_b, p_b) == pytest.approx(balanced_accuracy_score(y_b, p_b.argmax(1)))
    flat = part_means({"A": {"accuracy": acc(y_a, p_a), "balanced_accuracy": bal(y_a, p_a)},
                       "B": {"accuracy": acc(y_b, p_b), "balanced_accuracy": bal(y_b, p_b)}},
                      ("accuracy", "balanced_accuracy"))
    assert flat == pytest.approx({"accuracy": (0.75 + 2 / 3) / 2, "balanced_accuracy": (5 / 6 + 2 / 3) / 2,
                                  "A/accuracy": 0.75, "A/balanced_accuracy": 5 / 6,
                                  "B/accuracy": 2 / 3, "B/balanced_accuracy": 2 / 3})
    summary = summarize([{"accuracy": 0.5}, {"accuracy": 0.7}])
    assert summary["accuracy"]["mean"] == pytest.approx(0.6) and summary["accuracy"]["std"] == pytest.approx(0.1414, abs=1e-4)
    assert "ci95" not in summary["accuracy"]  # two runs on one test set are no interval of the test sampling


# ------------------------------------------------------------------ protocols end to end (synthetic)


def _check_records(res: retbench.Result, questions: tuple[str, ...]) -> None:
    """Every stored per-question metric recomputes from the stored predictions; headline = mean over questions."""
    for run in res.data["runs"]:
        assert set(run["questions"]) == set(questions)
        for q, rec in run["questions"].items():
            y, proba = np.asarray(rec["y_true"]), np.asarray(rec["proba"])
            for name in ("accuracy", "balanced_accuracy"):
                assert METRICS.get(name)(y, proba) == pytest.approx(run["metrics"][f"{q}/{name}"], abs=1e-6)
        for name in ("accuracy", "balanced_accuracy"):
            assert run["metrics"][name] == pytest.approx(np.mean([run["metrics"][f"{q}/{name}"] for q in questions]))


def test_probe_answers_colour_questions_from_image_features(tmp_path: Path) -> None:
    path = make_colours(tmp_path)
    res = retbench.evaluate("classical", str(path), "vqa.probe", **options(tmp_path, seeds=2))
    assert res.data["task"]["kind"] == "vqa" and [r["seed"] for r in res.data["runs"]] == [0, 1]
    _check_records(res, ("colour", "red", "brightness"))
    assert res.metrics["colour/accuracy"]["mean"] == 1.0 and res.metrics["red/balanced_accuracy"]["mean"] == 1.0
    assert res.metrics["balanced_accuracy"]["ci_method"].startswith("percentile bootstrap over")
    assert "× 2 runs" in res.metrics["balanced_accuracy"]["ci_method"]
    # The interval resamples what the point estimate used: the stored per-question predictions of both runs.
    from retbench import resampling as rs
    from retbench.leaderboard.board import resampling_of

    runs = [rs.predictions_of(r) for r in res.data["runs"]]
    cluster_of, unit, seed = resampling_of(res.data)
    iv = rs.bootstrap(METRICS.get("balanced_accuracy"), runs, cluster_of, unit, seed=seed)
    assert res.metrics["balanced_accuracy"]["ci95"] == pytest.approx([iv.low, iv.high])
    assert iv.estimate == pytest.approx(res.metrics["balanced_accuracy"]["mean"])
    data = load_questions(parse_spec(path), tmp_path / "data")
    test = set(make_splits(parse_spec(path), data.examples)["test"].tolist())
    for run in res.data["runs"]:
        assert set(run["questions"]["colour"]["index"]) == test  # scored on the test images only
        assert set(run["questions"]["brightness"]["index"]) <= test
        assert all(data.answers[i, 2] >= 0 for i in run["questions"]["brightness"]["index"])  # only where asked
    assert "one multinomial logistic regression per question type" in res.data["protocol"]["settings"]["heads"]


def test_zero_shot_scores_question_answer_texts(tmp_path: Path) -> None:
    path = make_colours(tmp_path)
    res = retbench.evaluate("tinyclip", str(path), "vqa.zero_shot", **options(tmp_path))
    _check_records(res, ("colour", "red", "brightness"))
    settings = res.data["protocol"]["settings"]
    assert settings["answer_texts"]["red"] == [["Q: Is the image red? A: yes"], ["Q: Is the image red? A: no"]]
    low, high = res.metrics["balanced_accuracy"]["ci95"]
    assert low <= res.metrics["balanced_accuracy"]["mean"] <= high
    spec = parse_spec(path)
    n_test = len(make_splits(spec, load_questions(spec, tmp_path / "data").examples)["test"])
    assert res.data["data"]["unit"] == "image" and res.data["data"]["n_test"] == n_test
    skipped = retbench.evaluate("classical", str(path), "vqa.zero_shot", **options(tmp_path))
    assert skipped.status == "skipped" and "no text tower" in skipped.reason


# ------------------------------------------------------------------ the bundled tasks, through `retbench run`


@pytest.fixture(scope="module")
def bundled_store(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    base = tmp_path_factory.mktemp("vqa_store")
    code = main(["run", "-m", "tinyclip,classical", "-t", "csdi_vqa,mx_dme_cfp_vqa", "--seeds", "2",
                 "--data-root", str(data_root), "--results-dir", str(base / "results"),
                 "--cache-dir", str(base / "cache"), "--device", "cpu", "--workers", "0"])
    assert code == 0
    return base


def test_bundled_vqa_results_in_store_and_on_the_leaderboard(bundled_store: Path) -> None:
    results = bundled_store / "results"
    stored = sorted(str(p.relative_to(results)) for p in results.glob("*/*/*.json"))
    assert stored == [
        "csdi_vqa/vqa.probe/classical.default.json", "csdi_vqa/vqa.probe/tinyclip.test.json",
        "csdi_vqa/vqa.zero_shot/tinyclip.test.json",
        "mx_dme_cfp_vqa/vqa.probe/classical.default.json", "mx_dme_cfp_vqa/vqa.probe/tinyclip.test.json",
        "mx_dme_cfp_vqa/vqa.zero_shot/tinyclip.test.json",
    ]  # classical has no text tower: it takes the probe only
    data = json.loads((results / "csdi_vqa/vqa.probe/classical.default.json").read_text())
    for q in ("optic_disc_visible", "cataract_severity"):
        for name in ("accuracy", "balanced_accuracy"):
            assert 0 <= data["metrics"][f"{q}/{name}"]["mean"] <= 1
    assert data["data"]["splits"]["test"]["per_question"]["optic_disc_visible"][1] >= 1  # 'not visible' is in test
    write_leaderboards(results, bundled_store / "boards", figures=False)
    board = (bundled_store / "boards" / "vqa.probe.md").read_text()
    assert "`classical.default`" in board and "`tinyclip.test`" in board and "balanced_accuracy" in board
    assert "mx_dme_cfp_vqa" in (bundled_store / "boards" / "vqa.zero_shot.md").read_text()


def test_shipped_vqa_specs_read_every_row(data_root: Path) -> None:
    from retbench.tasks import get_task

    for name, n in (("csdi_vqa", 187), ("mx_dme_cfp_vqa", 120)):
        data = load_questions(get_task(name), data_root)
        assert len(data.examples) == n and (data.answers >= 0).all()


def test_answer_template_is_used(tmp_path: Path) -> None:
    path = make_colours(tmp_path)
    path.write_text(path.read_text().replace("vqa:\n", textwrap.dedent("""\
        vqa:
          answer_template: "question: {question} answer: {answer}"
        """)), encoding="utf-8")
    assert parse_spec(path).class_prompts()[3] == ["question: Is the image red? answer: yes"]


def test_folder_source_answers_from_the_class_folder(tmp_path: Path) -> None:
    from conftest import make_tiny_task

    _, root = make_tiny_task(tmp_path)
    path = tmp_path / "folder_vqa.yaml"
    path.write_text(textwrap.dedent("""\
        kind: vqa
        name: folder_vqa
        version: 1
        modality: cfp
        source: {kind: folder, path: tiny}
        vqa:
          questions:
            - name: colour
              question: Which colour is it?
              column: folder
              answers: [red, green, blue]
            - name: red
              question: Is it red?
              column: folder
              answers: [{name: "yes", match: [red]}, {name: "no", match: [green, blue]}]
        """), encoding="utf-8")
    data = load_questions(parse_spec(path), root)
    assert len(data.examples) == 24 and data.examples.ids[0] == "blue/blue_00.png"
    assert data.answers[0].tolist() == [2, 1] and data.answers[-1].tolist() == [0, 0]
    res = retbench.evaluate("classical", str(path), "vqa.probe", data_root=str(root), results_dir=str(tmp_path / "r"),
                            cache_dir=str(tmp_path / "c"), device="cpu", num_workers=0, seeds=1)
    assert res.metrics["colour/accuracy"]["mean"] == 1.0
    path.write_text(path.read_text().replace("kind: vqa", "kind: retrieval"), encoding="utf-8")
    with pytest.raises(SpecError):
        parse_spec(path)


def test_shipped_eye4class_vqa_keeps_the_eye4class_split(data_root: Path) -> None:
    from retbench.runner import load_task_data

    vqa, cls = load_task_data("eye4class_vqa", str(data_root)), load_task_data("eye4class", str(data_root))
    assert vqa.examples.ids == cls.examples.ids and len(vqa.examples.dropped["conflicting_duplicate"]) == 4
    np.testing.assert_array_equal(vqa.splits["test"], cls.splits["test"])
    assert (vqa.data.answers[:, 0] == cls.examples.labels).all()  # disease answers in eye4class's class order


# ------------------------------------------------------------------ one evaluation track


def test_classification_and_vqa_protocols_go_through_the_same_runner_function(tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from conftest import make_tiny_task

    import retbench.runner as runner

    calls = []
    real = runner.run_protocol

    def spy(adapter, task, sources, protocol_name, *args, **kwargs):
        calls.append((task.spec.kind, protocol_name))
        return real(adapter, task, sources, protocol_name, *args, **kwargs)

    monkeypatch.setattr(runner, "run_protocol", spy)
    tiny_spec, _ = make_tiny_task(tmp_path)
    colours = make_colours(tmp_path)
    cls = retbench.evaluate("classical", str(tiny_spec), "linear_probe", **options(tmp_path, seeds=2))
    vqa = retbench.evaluate("classical", str(colours), "vqa.probe", **options(tmp_path, seeds=2))
    assert calls == [("classification", "linear_probe"), ("vqa", "vqa.probe")]
    for res in (cls, vqa):  # one result shape: summary with the cluster-bootstrap CI, resampling units, runs
        assert res.status == "done"
        assert {"metrics", "resampling", "data", "runs", "protocol", "feature_cache_key"} <= set(res.data)
        headline = res.metrics[res.data["primary_metric"]]
        assert headline["n"] == 2 and headline["ci_method"].startswith("percentile bootstrap over")
    assert "predictions" in cls.data["runs"][0] and "predictions" not in vqa.data["runs"][0]
    assert set(vqa.data["runs"][0]["questions"]) == {"colour", "red", "brightness"}
