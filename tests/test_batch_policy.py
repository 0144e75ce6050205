"""Batch-size choice: the largest batch that fits on CUDA (probed), fixed defaults on CPU."""

from __future__ import annotations

import torch

from retbench.adapters import load_model
from retbench.features import auto_batch_size, largest_fitting_batch
from retbench.preprocess import Preprocess


def test_largest_fitting_batch_halves_on_out_of_memory():
    tried = []

    def try_batch(n: int) -> None:
        tried.append(n)
        if n > 48:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")

    assert largest_fitting_batch(try_batch, start=512) == 32
    assert tried == [512, 256, 128, 64, 32]


def test_other_errors_are_not_mistaken_for_memory():
    def broken(n: int) -> None:
        raise ValueError("shape mismatch")

    try:
        largest_fitting_batch(broken)
    except ValueError:
        pass
    else:  # pragma: no cover
        raise AssertionError("a real error must propagate")


def test_cpu_defaults_depend_on_input_size():
    adapter = load_model("tinyclip")
    assert auto_batch_size(adapter, Preprocess(size=224), joint=False) == 64
    assert auto_batch_size(adapter, Preprocess(size=512), joint=False) == 16
