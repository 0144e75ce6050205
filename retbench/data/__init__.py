"""Data: examples from a task's source, splits, and images as tensors."""

from retbench.data.examples import Examples, data_root
from retbench.data.loading import load_examples
from retbench.data.splits import make_splits

__all__ = ["Examples", "data_root", "load_examples", "make_splits"]
