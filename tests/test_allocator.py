"""retbench.allocator: glibc's malloc thresholds raised once per process for CPU extraction, with an opt-out."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator

import pytest

import retbench.allocator as allocator


class FakeLibc:
    """Stands in for ``ctypes.CDLL(None)``: records mallopt calls and answers ``result``."""

    def __init__(self, result: int) -> None:
        self.calls: list[tuple[int, int]] = []
        self.result = result

        def mallopt(param: int, value: int) -> int:
            self.calls.append((param, value))
            return self.result

        self.mallopt = mallopt


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], None]]:
    """A process that has not tuned yet (yields a function that forgets the last answer); forgets again afterwards."""
    allocator.tune_malloc.cache_clear()
    monkeypatch.delenv(allocator.DISABLE_ENV, raising=False)
    monkeypatch.setattr(sys, "platform", "linux")
    yield allocator.tune_malloc.cache_clear
    allocator.tune_malloc.cache_clear()  # the next caller asks the real libc


def test_raises_both_thresholds_once(fresh: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc(1)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    assert allocator.tune_malloc() is True
    assert libc.calls == [(allocator.M_MMAP_THRESHOLD, allocator.THRESHOLD),
                          (allocator.M_TRIM_THRESHOLD, allocator.THRESHOLD)]
    assert allocator.tune_malloc() is True and len(libc.calls) == 2  # once per process


@pytest.mark.parametrize("value", ["1", "yes", "true"])
def test_opt_out_leaves_glibc_alone(value: str, fresh: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> None:
    libc = FakeLibc(1)
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: libc)
    monkeypatch.setenv(allocator.DISABLE_ENV, value)
    assert allocator.tune_malloc() is False and libc.calls == []


def test_no_mallopt_or_a_refusal_is_not_tuned(fresh: Callable[[], None], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: FakeLibc(0))
    assert allocator.tune_malloc() is False
    fresh()
    monkeypatch.setattr(allocator.ctypes, "CDLL", lambda name: object())  # a libc without mallopt (musl, macOS)
    assert allocator.tune_malloc() is False
    fresh()
    monkeypatch.setattr(sys, "platform", "darwin")
    assert allocator.tune_malloc() is False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_cpu_extraction_tunes_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    import numpy as np

    from retbench.adapters import load_model
    from retbench.data.examples import ArrayImages, Examples
    from retbench.features import extract

    called: list[bool] = []
    monkeypatch.setattr("retbench.features.tune_malloc", lambda: called.append(True) or True)
    images = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3), dtype=np.uint8)
    ids = [f"train/{i}" for i in range(4)]
    examples = Examples(ids, np.zeros(4, dtype=int), ids, None, ArrayImages({"train": images}), {})
    adapter = load_model("classical", device="cpu")
    extract(adapter, examples, adapter.preprocess, batch_size=2, num_workers=0)
    assert called == [True]


def test_cpu_probe_solves_tune_this_process(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch probe solver on CPU asks for the same tuning as extraction (its temporaries are 0.1-1 MB)."""
    import numpy as np
    import torch

    from retbench.protocols.base import Probe, solve_probes

    called: list[bool] = []
    monkeypatch.setattr("retbench.protocols.base.tune_malloc", lambda: called.append(True) or True)
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(40, 3)), np.arange(40) % 2
    solve_probes(x, y, 2, [Probe(np.arange(30), 1.0, np.arange(30, 40))], torch.device("cpu"), True, True,
                 solver="torch")
    assert called == [True]
    solve_probes(x, y, 2, [Probe(np.arange(30), 1.0, np.arange(30, 40))], torch.device("cpu"), True, True,
                 solver="sklearn-lbfgs")
    assert called == [True]  # scikit-learn's loop is left as it is
