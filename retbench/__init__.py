"""retbench: a benchmark and evaluation harness for retinal foundation models."""

from retbench.evaluate import Result, evaluate, run

__version__ = "0.1.0"
__all__ = ["Result", "evaluate", "run", "__version__"]
