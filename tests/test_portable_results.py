"""Result files are shared: they record no absolute path of the machine that wrote them, yet a rerun still finds
the checkpoint a result was computed from (stale detection)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_identity_and_cache import _local_model, _options, _tinyclip_weights

import retbench
from retbench.errors import RetbenchError
from retbench.local_model_format import WEIGHTS_FILE
from retbench.spec.reader import shipped_tasks_dir
from retbench.store import portable_result, recorded_file


def test_results_record_no_path_of_this_machine(tiny_task: tuple[Path, Path], tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec, root = tiny_task
    monkeypatch.chdir(tmp_path)
    w = _tinyclip_weights(tmp_path / "runs" / "w.pth", 1)
    x = _local_model(tmp_path / "runs" / "mae", 1)
    done = [retbench.evaluate("tinyclip", str(spec), "linear_probe", weights="runs/w.pth", **_options(tmp_path, root)),
            retbench.evaluate(f"local:{x}", str(spec), "linear_probe", **_options(tmp_path, root))]
    home = str(Path.home())
    for res in done:
        text = res.path.read_text(encoding="utf-8")
        assert str(tmp_path) not in text and home not in text, text
        # what evaluate returns is what was stored, plus the two timings a file cannot hold about its own writing
        returned = {**res.data, "timings": {k: v for k, v in res.data["timings"].items()
                                            if k not in ("write_s", "total_s")}}
        stored = json.loads(text)
        assert stored == returned
        assert set(res.data["timings"]) - set(stored["timings"]) == {"write_s", "total_s"}
    tiny, local = (r.data["model"] for r in done)
    assert tiny["weights_path"] == tiny["weights"] == "../runs/w.pth"  # relative to the results folder
    assert local["weights_path"] == f"../runs/mae/{WEIGHTS_FILE}" and local["folder"] == "../runs/mae"
    assert local["source"] == "retbench local model ../runs/mae"  # paths inside texts too
    assert done[0].data["config"]["cache_dir"] == "<cache>" and done[0].data["config"]["results_dir"] == "."
    # the recorded file is found again: replaced in place, it is another version of the same file
    _tinyclip_weights(w, 2)
    with pytest.raises(RetbenchError, match=r"computed from another version of \.\./runs/w.pth"):
        retbench.evaluate("tinyclip", str(spec), "linear_probe", weights=str(w), **_options(tmp_path, root))


def test_portable_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = Path.home()
    monkeypatch.setenv("RETBENCH_WEIGHTS", "/opt/weights")
    monkeypatch.delenv("RETBENCH_DATA", raising=False)
    results = tmp_path / "project" / "results"
    result = {
        "config": {"cache_dir": str(home / ".cache" / "retbench"), "data_root": "/srv/data", "results_dir": str(results)},
        "task": {"file": str(shipped_tasks_dir() / "bundled" / "eye4class.yaml")},
        "model": {"weights_path": "/opt/weights/clip/ViT-B-16.pt", "source": "from folder /mnt/x/ckpt (seed 0)"},
        "data": {"warnings": ["/srv/data/a/b.png: unreadable", "see /srv/data/a, 3 of 4"], "dropped": ["a/b.png"]},
        "notes": [str(home / "models" / "m.pth"), str(tmp_path / "project" / "runs" / "w.pth"), "https://x.org/a/b"],
    }
    out = portable_result(result, results)
    assert out["config"] == {"cache_dir": "<cache>", "data_root": "<data>", "results_dir": "."}
    assert out["task"]["file"] == "<tasks>/bundled/eye4class.yaml"
    assert out["model"] == {"weights_path": "$RETBENCH_WEIGHTS/clip/ViT-B-16.pt",
                            "source": "from folder <elsewhere>/ckpt (seed 0)"}
    assert out["data"] == {"warnings": ["<data>/a/b.png: unreadable", "see <data>/a, 3 of 4"], "dropped": ["a/b.png"]}
    assert out["notes"] == ["~/models/m.pth", "../runs/w.pth", "https://x.org/a/b"]
    assert result["config"]["cache_dir"] == str(home / ".cache" / "retbench")  # the input is left alone
    assert recorded_file("../runs/w.pth", results) == results / "../runs/w.pth"
    assert recorded_file("$RETBENCH_WEIGHTS/clip/ViT-B-16.pt", results) == Path("/opt/weights/clip/ViT-B-16.pt")
    assert recorded_file("~/models/m.pth", results) == home / "models" / "m.pth"
    assert recorded_file("<elsewhere>/ckpt", results) is None
    assert recorded_file("/old/store/w.pth", results) == Path("/old/store/w.pth")  # results written before
