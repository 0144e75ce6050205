"""benchmarks/run_benchmarks.py and pixel_cache.py: their section letters, and one command for every figure.

The figures themselves are timings and are not tested (docs/benchmarks.md); what is checked is that a section
letter reaches the section that measures it and that a wrong letter is refused instead of running nothing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture()
def scripts(monkeypatch: pytest.MonkeyPatch) -> tuple[Any, Any]:
    monkeypatch.syspath_prepend(str(BENCH))
    import pixel_cache
    import run_benchmarks

    return run_benchmarks, pixel_cache


@pytest.mark.parametrize("script, wrong", [("run_benchmarks", "bx"), ("pixel_cache", "ab"), ("run_benchmarks", "")])
def test_unknown_sections_are_refused(scripts: tuple[Any, Any], capsys: pytest.CaptureFixture[str], script: str,
                                      wrong: str) -> None:
    module = dict(zip(("run_benchmarks", "pixel_cache"), scripts))[script]
    with pytest.raises(SystemExit) as exit_:
        module.main(["--only", wrong])
    assert exit_.value.code == 2
    assert f"--only takes letters of {module.SECTIONS!r}" in capsys.readouterr().err


def test_one_command_runs_the_pixel_cache_sections_too(scripts: tuple[Any, Any], monkeypatch: pytest.MonkeyPatch,
                                                       data_root: Path, tmp_path: Path) -> None:
    """``run_benchmarks.py --only dg`` runs pixel_cache.py's (d) and (g) in its own table and JSON."""
    run_benchmarks, pixel_cache = scripts
    calls = []

    def sections(root: str, only: str, quick: bool, table: Any, images: int | None = None) -> dict[str, Any]:
        calls.append((root, only, quick, images))
        table.add("(g) draft", "a figure", 1.0)
        return {"draft": {"figure": 1.0}}

    monkeypatch.setattr(pixel_cache, "run_sections", sections)
    out = tmp_path / "not-yet" / "figures.json"  # its folder is made, as gpu_check.py does
    assert run_benchmarks.main(["--quick", "--only", "dg", "--data-root", str(data_root), "--json", str(out)]) == 0
    assert calls == [(str(data_root), "dg", True, None)]
    figures = json.loads(out.read_text())
    assert figures["draft"] == {"figure": 1.0}
    assert [r["measure"] for r in figures["table"]] == ["a figure"]
    assert "probes" not in figures and "extraction" not in figures  # a-c were not asked for
