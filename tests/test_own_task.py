"""A newcomer's own task: the README's minimal YAML, written outside the repository, runs every protocol that
applies through the CLI, and the results it writes carry no path of this machine."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from conftest import TINY_CLASSES, make_tiny_task

from retbench.cli import main
from retbench.spec import parse_spec

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_task() -> str:
    """The YAML block right after the README's **Your own task** paragraph."""
    text = README.read_text(encoding="utf-8")
    block = re.search(r"\*\*Your own task\*\*.*?```yaml\n(.*?)```", text, re.S)
    assert block, "README lacks the 'Your own task' example"
    return block.group(1)


def test_readme_task_is_short_and_has_no_boilerplate() -> None:
    spec = yaml.safe_load(readme_task())
    assert len(readme_task().splitlines()) <= 12
    assert not {"metrics", "protocols", "primary_metric", "splits", "include"} & set(spec)


def test_own_task_runs_every_protocol_that_applies(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    text = readme_task()
    raw = yaml.safe_load(text)
    folder = Path(raw["source"]["path"]).parent
    _, root = make_tiny_task(tmp_path / "work", name=folder.as_posix())  # coloured PNGs in root/<folder>/<colour>/
    names = dict(zip(TINY_CLASSES, raw["classes"]))  # the README's class names, given to the colours
    rows = [f"{p.parent.name}/{p.name},{names[p.parent.name]}" for p in sorted((root / folder).glob("*/*.png"))]
    (root / raw["source"]["path"]).write_text("image,label\n" + "\n".join(rows) + "\n", encoding="utf-8")
    task = tmp_path / "elsewhere" / "my_task.yaml"  # outside the repository and the data root
    task.parent.mkdir()
    task.write_text(text, encoding="utf-8")
    protocols = parse_spec(task).protocols
    assert len(protocols) == 6  # linear_probe (and its FLAIR/RETFound variants), few_shot, zero_shot

    store = tmp_path / "results"
    code = main(["run", "-m", "tinyclip", "-t", str(task), "-p", ",".join(protocols), "--data-root", str(root),
                 "--results-dir", str(store), "--cache-dir", str(tmp_path / "cache"), "--seeds", "1",
                 "--shots", "1", "2", "--device", "cpu", "--workers", "0"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"{len(protocols)} written" in err and "0 not applicable" in err
    files = sorted(store.glob("*/*/*.json"))
    assert {f.parent.name for f in files} == set(protocols)
    home = str(Path.home())
    for f in files:
        text = f.read_text(encoding="utf-8")
        result = json.loads(text)
        assert result["task"]["name"] == "my_task" and result["task"]["classes"] == raw["classes"]
        assert result["metrics"][result["primary_metric"]]["mean"] is not None
        assert str(tmp_path) not in text and home not in text, f"{f.name} records a path of this machine"
        assert result["task"]["file"] == "../elsewhere/my_task.yaml"  # relative to the results folder
        assert result["config"]["data_root"] == "<data>" and result["config"]["cache_dir"] == "<cache>"
