"""Inputs that used to give a wrong or unflagged number with exit 0 now give one clear line (a ``RetbenchError``
naming the file, row or key) or a correct result with a recorded warning: 16-bit images, a label value matched by
two classes, classes absent from the data or the test split or too small for the split, an image listed under two
labels, a checkpoint of another architecture, and NaN in result files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from retbench.cli import main
from retbench.data import load_examples, make_splits
from retbench.data.examples import FileImages
from retbench.errors import DataError, RetbenchError, SpecError
from retbench.preprocess import Preprocess, to_8bit
from retbench.spec.parse import parse_spec

CSV_TASK = """\
name: {name}
version: 1
modality: oct
problem: multiclass
source: {{kind: csv, path: m.csv, image_column: file, label_column: label, patient_column: patient{extra}}}
classes: [{{name: a, match: ["0"]}}, {{name: b, match: ["1"]}}, {{name: c, match: ["2"]}}]
splits: {splits}
metrics: [aca, accuracy]
protocols: [linear_probe]
"""
STRATIFIED = "{strategy: stratified, test_fraction: 0.25, seed: 0}"


def csv_task(tmp_path: Path, rows: list[tuple], *, extra: str = "", splits: str = STRATIFIED,
             name: str = "t") -> tuple[Path, Path]:
    """A CSV-manifest task over tiny PNGs: ``rows`` are (file, label, patient[, split]); returns (spec, data root)."""
    root = tmp_path / "data"
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(0)
    for file in {r[0] for r in rows}:
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / file)
    header = "file,label,patient" + (",split" if rows and len(rows[0]) > 3 else "")
    (root / "m.csv").write_text("\n".join([header] + [",".join(map(str, r)) for r in rows]) + "\n")
    spec = tmp_path / f"{name}.yaml"
    spec.write_text(CSV_TASK.format(name=name, extra=extra, splits=splits), encoding="utf-8")
    return spec, root


def balanced(per_class: int = 8, classes: int = 3) -> list[tuple]:
    return [(f"{k}_{i}.png", k, f"p{k}_{i}") for k in range(classes) for i in range(per_class)]


def load(spec: Path, root: Path):
    task = parse_spec(spec)
    examples = load_examples(task, root)
    return task, examples, make_splits(task, examples)


def one_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The CLI fails with exactly one ``error:`` line (exit 2) and no traceback."""
    code = main(list(argv))
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err


# ------------------------------------------------------------------ 1. 16-bit images


def gradient() -> np.ndarray:
    return np.tile(np.arange(256, dtype=np.uint8), (8, 1))  # every 8-bit level, left to right


def test_16bit_png_and_tiff_decode_to_the_8bit_gradient(tmp_path: Path) -> None:
    g8 = gradient()
    g16 = g8.astype(np.uint16) * 257  # the same picture at 16 bits (65535 = white)
    Image.fromarray(g8).save(tmp_path / "g8.png")
    Image.fromarray(g16).save(tmp_path / "g16.png")
    Image.frombytes("I;16B", (256, 8), g16.astype(">u2").tobytes()).save(tmp_path / "g16b.tif")
    assert Image.open(tmp_path / "g16.png").mode == "I;16" and Image.open(tmp_path / "g16b.tif").mode == "I;16B"
    # what convert("RGB") alone made of it: everything above level 1 clipped to white
    assert (np.asarray(Image.open(tmp_path / "g16.png").convert("RGB"))[..., 0] == 255).mean() > 0.99
    images = FileImages(tmp_path)
    eight = np.asarray(images.open("g8.png").convert("RGB"))
    assert np.array_equal(eight, np.asarray(Image.open(tmp_path / "g8.png").convert("RGB")))  # 8 bits: as before
    for name in ("g16.png", "g16b.tif"):
        decoded = np.asarray(images.open(name).convert("RGB")).astype(int)
        assert np.abs(decoded - eight).max() <= 1, name
    pre = Preprocess(size=16, resize="squash", interpolation="bilinear")
    ref = pre.load(images.open("g8.png")).int()
    for name in ("g16.png", "g16b.tif"):
        assert (pre.load(Image.open(tmp_path / name)).int() - ref).abs().max() <= 1  # the pipeline's own entry too
    # 32-bit integer samples (older Pillow's mode for 16-bit PNGs; TIFF's 32-bit) scale by their declared depth
    as_i = Image.fromarray(g16.astype(np.int32))
    assert as_i.mode == "I" and np.abs(np.asarray(to_8bit(as_i)).astype(int) - g8).max() <= 1
    as_i.save(tmp_path / "g32.tif")
    assert np.asarray(images.open("g32.tif")).max() <= 1  # 65535 of 2^32 - 1: black, as its bit depth says
    as_f = Image.fromarray(g8.astype(np.float32) / 255)
    assert np.abs(np.asarray(to_8bit(as_f)).astype(int) - g8).max() <= 1
    with pytest.raises(ValueError, match="float image with samples in"):
        to_8bit(Image.fromarray(g8.astype(np.float32) * 1000))


# ------------------------------------------------------------------ 2. a label value in two classes


def test_label_value_matched_by_two_classes_is_a_spec_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, root = csv_task(tmp_path, balanced())
    spec.write_text(spec.read_text().replace('{name: c, match: ["2"]}', '{name: c, match: ["2", "0"]}'))
    with pytest.raises(SpecError) as err:
        parse_spec(spec)
    assert str(err.value) == (f"{spec.resolve()}: key 'classes[2].match': label value '0' is matched by both class 'a' "
                              "(classes[0]) and class 'c'; a value must mean one class")
    err = one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
                    "--results-dir", str(tmp_path / "r"))
    assert "key 'classes[2].match': label value '0' is matched by both class 'a'" in err


# ------------------------------------------------------------------ 3. classes missing or too small


def test_class_absent_from_the_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, root = csv_task(tmp_path, balanced(classes=2))
    err = one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
                    "--results-dir", str(tmp_path / "r"))
    assert ("error: task 't': class 'c' has no examples in the data (1 of 3 classes absent; per class: a 8, b 8, c 0); "
            "a 3-class task cannot be scored over 2 classes") in err
    assert not (tmp_path / "r").exists()


def test_class_too_small_for_the_test_fraction(tmp_path: Path) -> None:
    rows = balanced()[:-6]  # class c keeps 2 images: 4 folds (test_fraction 0.25) would become 2 (0.5 held out)
    spec, root = csv_task(tmp_path, rows)
    with pytest.raises(DataError) as err:
        load(spec, root)
    assert str(err.value).startswith("task 't': class 'c' has only 2 examples; splits.test_fraction 0.25 needs 4 per "
                                     "class (0.25 held out), with 2 it would hold out 0.50 (per class: a 8, b 8, c 2)")


def test_class_without_test_images(tmp_path: Path) -> None:
    rows = [(f, k, "one_patient" if k == 2 else p) for f, k, p in balanced()]  # all of c from one patient
    spec, root = csv_task(tmp_path, rows)
    with pytest.raises(DataError, match=r"^task 't': class 'c' has no (test|train) images \(1 of 3 classes; ") as err:
        load(spec, root)
    assert "c 0" in str(err.value) and "c 8" in str(err.value) and "\n" not in str(err.value)


def test_given_split_without_a_class_in_test_is_recorded(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = [(f, k, p, "test" if i % 4 == 0 and k != 2 else "train") for i, (f, k, p) in enumerate(balanced())]
    spec, root = csv_task(tmp_path, rows, extra=", split_column: split", splits="{strategy: given}")
    task, examples, splits = load(spec, root)
    note = ("task 't': class 'c' has no test images (1 of 3 classes; test: a 2, b 2, c 0; train: a 6, b 6, c 8); the "
            "given split is used as it is, so metrics cover fewer classes")
    assert examples.warnings == [note]
    assert capsys.readouterr().err == f"warning: {note}\n"
    make_splits(task, examples)  # asked again (probes, dedup): recorded once
    assert examples.warnings == [note] and capsys.readouterr().err == ""
    import retbench

    res = retbench.evaluate("classical", str(spec), "linear_probe", data_root=str(root), seeds=1, device="cpu",
                            results_dir=str(tmp_path / "r"), cache_dir=str(tmp_path / "c"), num_workers=0)
    assert json.loads(res.path.read_text())["data"]["warnings"] == [note]


def test_well_formed_split_records_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    spec, root = csv_task(tmp_path, balanced())
    _, examples, splits = load(spec, root)
    assert examples.warnings == [] and capsys.readouterr().err == ""
    assert sorted(np.bincount(examples.labels[splits["test"]]).tolist()) == [2, 2, 2]


# ------------------------------------------------------------------ 4. one image under two labels


def test_csv_image_under_two_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = balanced() + [("0_3.png", 1, "p0_3")]  # 0_3.png is filed under a (row 5) and b (row 26)
    spec, root = csv_task(tmp_path, rows)
    err = one_error(capsys, "run", "-m", "classical", "-t", str(spec), "--data-root", str(root),
                    "--results-dir", str(tmp_path / "r"))
    assert err == (f"error: {root / 'm.csv'}: image '0_3.png' is listed under two labels: 'a' (row 5) and 'b' (row 26); "
                   "fix the manifest, or set source.drop_conflicting_duplicates: true to drop every image listed under "
                   "two labels\n")


def test_csv_image_under_two_labels_dropped_when_the_spec_opts_in(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rows = balanced() + [("0_3.png", 1, "p0_3"), ("1_0.png", 1, "p1_0")]  # the second: same label twice, kept
    spec, root = csv_task(tmp_path, rows, extra=", drop_conflicting_duplicates: true")
    _, examples, _ = load(spec, root)
    assert "0_3.png" not in examples.ids and examples.ids.count("1_0.png") == 2 and len(examples) == 24 - 1 + 1
    assert examples.dropped == {"conflicting_duplicate": ["0_3.png"]}
    note = (f"task 't': dropped 2 rows of 1 images listed under two labels (source.drop_conflicting_duplicates; "
            f"first: {root / 'm.csv'}: image '0_3.png' is listed under two labels: 'a' (row 5) and 'b' (row 26))")
    assert examples.warnings == [note] and capsys.readouterr().err == f"warning: {note}\n"


def test_vqa_image_with_two_answers(tmp_path: Path) -> None:
    root = tmp_path / "data"
    root.mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8)).save(root / f"{i}.png")
    (root / "m.csv").write_text("file,dr,dme\n0.png,0,\n1.png,1,0\n2.png,0,1\n3.png,1,1\n0.png,,1\n2.png,1,1\n")
    spec = tmp_path / "v.yaml"
    spec.write_text("""\
name: v
version: 1
kind: vqa
modality: cfp
source: {kind: csv, path: m.csv, image_column: file}
vqa:
  questions:
    - {name: dr, question: "DR?", column: dr, answers: [{name: "no", match: ["0"]}, {name: "yes", match: ["1"]}]}
    - {name: dme, question: "DME?", column: dme, answers: [{name: "no", match: ["0"]}, {name: "yes", match: ["1"]}]}
splits: {test_fraction: 0.5, seed: 0}
""")
    from retbench.data.questions import read_questions

    with pytest.raises(DataError) as err:  # 0.png: dr asked once, dme once — no clash; 2.png: dr no, then yes
        read_questions(parse_spec(spec), root)
    assert str(err.value).startswith(f"{root / 'm.csv'}: image '2.png' is listed under two labels: 'dr: no, dme: yes' "
                                     "(row 4) and 'dr: yes, dme: yes' (row 7)")


def test_eye4class_keeps_dropping_its_two_images_filed_under_two_classes(data_root: Path) -> None:
    from retbench.tasks import get_task

    examples = load_examples(get_task("eye4class"), data_root)
    assert len(examples.dropped["conflicting_duplicate"]) == 4 and examples.warnings == []


# ------------------------------------------------------------------ 5. a checkpoint of another architecture


def test_timm_checkpoint_of_a_larger_architecture(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    from retbench.adapters import load_model

    torch.manual_seed(1)
    bigger = timm.create_model("resnet34", num_classes=10)  # holds every key of resnet18, and more
    save_file({k: v.contiguous() for k, v in bigger.state_dict().items()}, str(tmp_path / "r34.safetensors"))
    with pytest.raises(RetbenchError) as err:
        load_model("timm:resnet18", weights=str(tmp_path / "r34.safetensors"))
    msg = str(err.value)  # safetensors lists keys sorted: layer1.2 (resnet18 has blocks 0-1) comes first
    assert msg.startswith(f"{tmp_path / 'r34.safetensors'}: 96 tensors are not parameters of timm:resnet18 (first: "
                          "layer1.2.") and msg.endswith("; a checkpoint of another architecture? (only classifier heads "
                                                        "are dropped)")
    assert "fc." not in msg and "\n" not in msg
    own = timm.create_model("resnet18", num_classes=10)  # its own checkpoint, classifier head included: loads
    torch.save(own.state_dict(), tmp_path / "r18.pth")
    model = load_model("timm:resnet18", weights=str(tmp_path / "r18.pth"))
    own.reset_classifier(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert torch.equal(model.encode_image(x), own.eval()(x))


def test_local_checkpoint_with_tensors_of_a_deeper_model(tmp_path: Path) -> None:
    import timm
    from safetensors.torch import load_file, save_file

    from retbench.adapters import load_model
    from retbench.local_model_format import WEIGHTS_FILE, LocalFormatError, save_local_model

    cfg = {"timm": "vit_tiny_patch16_224", "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48,
                                                      "num_heads": 3}}
    vision = timm.create_model(cfg["timm"], num_classes=0, **cfg["kwargs"])
    folder = tmp_path / "m"
    save_local_model(folder, vision, cfg, Preprocess(size=32))
    state = load_file(str(folder / WEIGHTS_FILE))
    state["visual.blocks.2.norm1.weight"] = torch.ones(48)  # a third block: another architecture's weights
    save_file(state, str(tmp_path / "deeper.safetensors"))
    with pytest.raises(LocalFormatError, match=r"deeper.safetensors: key 'visual.blocks.2.norm1.weight': not a parameter"):
        load_model(f"local:{folder}", weights=str(tmp_path / "deeper.safetensors"))


# ------------------------------------------------------------------ 6. NaN in result files


def strict_loads(text: str):
    def refuse(name: str):
        raise ValueError(f"non-standard JSON constant {name}")

    return json.loads(text, parse_constant=refuse)


def nan_result() -> dict:
    nan = float("nan")
    return {"schema": 1, "created": "2024-01-01T00:00:00+00:00", "model": {"name": "m"}, "primary_metric": "auroc",
            "task": {"name": "alpha", "version": "1", "spec_hash": "s", "classes": ["a", "b"]},
            "protocol": {"name": "linear_probe", "settings": {"seeds": [0]}},
            "data": {"split_strategy": "stratified", "split_seed": 0, "image_list_hash": "h", "n_test": 2,
                     "splits": {"test": {"n": 2}}},
            "headline_k": None,
            "metrics": {"auroc": {"mean": nan, "std": nan, "ci95": [nan, nan], "values": [np.float64(nan)]},
                        "accuracy": {"mean": 0.5, "std": 0.0, "ci95": [0.0, 1.0], "values": np.array([0.5])}},
            "runs": [{"seed": 0, "k": None, "metrics": {"auroc": nan, "accuracy": 0.5, "inf": float("-inf")}}]}


def test_nan_is_written_as_null_and_read_as_missing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from retbench.atomic_files import atomic_write_json
    from retbench.leaderboard.board import run_value
    from retbench.store import result_path, results_table, write_result

    path = result_path(tmp_path / "results", "m", "alpha", "linear_probe")
    write_result(path, nan_result())
    text = path.read_text()
    assert "NaN" not in text and "Infinity" not in text
    data = strict_loads(text)
    assert data["metrics"]["auroc"] == {"mean": None, "std": None, "ci95": [None, None], "values": [None]}
    assert data["metrics"]["accuracy"]["values"] == [0.5] and data["runs"][0]["metrics"]["inf"] is None
    assert np.isnan(run_value(data["runs"][0], "auroc")) and run_value(data["runs"][0], "accuracy") == 0.5
    row = results_table(tmp_path / "results").iloc[0]
    assert np.isnan(row["primary"]) and np.isnan(row["auroc_ci_low"]) and row["accuracy"] == 0.5
    assert main(["results", "--results-dir", str(tmp_path / "results")]) == 0
    out = capsys.readouterr().out
    assert "auroc" in out and "nan" not in out.lower()
    finite = {"b": [1.5, 2], "a": {"x": np.float32(0.25)}}  # finite data: the very same bytes as before
    atomic_write_json(tmp_path / "f.json", finite)
    assert (tmp_path / "f.json").read_text() == json.dumps({"a": {"x": 0.25}, "b": [1.5, 2]}, indent=1,
                                                           sort_keys=True) + "\n"
