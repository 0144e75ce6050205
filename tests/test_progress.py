"""Progress output: a live bar on a terminal, one plain line per tenth of the work in logs."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

import retbench.progress
from retbench.progress import progress_bar


def _console(terminal: bool) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, force_terminal=terminal, width=200), buf


@pytest.fixture(autouse=True)
def _loud(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RETBENCH_QUIET", raising=False)


def test_log_output_prints_one_line_per_tenth_with_status(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retbench.progress, "LOG_EVERY_S", 0.0)
    out, buf = _console(terminal=False)
    with progress_bar("pretrain mae", 50, out=out) as advance:
        for step in range(50):
            advance(1, status=f"loss {1 / (step + 1):.4f}")
    lines = buf.getvalue().splitlines()
    assert len(lines) == 10
    assert lines[0].startswith("pretrain mae: 5/50 (10%), ") and "left" in lines[0] and lines[0].endswith("loss 0.2000")
    assert lines[-1].startswith("pretrain mae: 50/50 (100%), ") and "left" not in lines[-1]
    assert lines[-1].endswith("loss 0.0200")


def test_log_output_with_large_steps_prints_once_per_step_reached(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retbench.progress, "LOG_EVERY_S", 0.0)
    out, buf = _console(terminal=False)
    with progress_bar("extract", 1000, out=out) as advance:
        advance(640)  # crosses six tenths at once: one line
        advance(360)
    lines = buf.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == ["extract: 640/1000 (64%)", "extract: 1000/1000 (100%)"]


def test_log_output_of_quick_work_is_its_closing_line() -> None:
    out, buf = _console(terminal=False)  # the default interval: nothing between tenths a few microseconds apart
    with progress_bar("decode", 40, out=out) as advance:
        for _ in range(40):
            advance(1)
    lines = buf.getvalue().splitlines()
    assert len(lines) == 1 and lines[0].startswith("decode: 40/40 (100%), 00:00 elapsed")


def test_terminal_shows_a_rich_bar_with_status() -> None:
    out, buf = _console(terminal=True)
    with progress_bar("pretrain dino", 4, out=out) as advance:
        for _ in range(4):
            advance(1, status="loss 1.2345")
    text = buf.getvalue()
    assert "pretrain dino" in text and "4/4" in text and "loss 1.2345" in text
    assert "(100%)" not in text  # not the log format


def test_quiet_prints_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RETBENCH_QUIET", "1")
    out, buf = _console(terminal=False)
    with progress_bar("x", 3, out=out) as advance:
        advance(3, status="s")
    assert buf.getvalue() == ""


@pytest.mark.filterwarnings("ignore:install \"ipywidgets\":UserWarning")  # rich falls back without them
def test_notebook_keeps_the_rich_bar() -> None:
    buf = io.StringIO()
    out = Console(file=buf, force_jupyter=True, width=200)
    with progress_bar("extract", 3, out=out) as advance:
        advance(3)
    assert "(100%)" not in buf.getvalue()  # a live display, not log lines
