"""``python -m retbench.sweep GRID.yaml``: the same as ``retbench sweep``."""

import sys

from retbench.sweep.cli import main

if __name__ == "__main__":
    sys.exit(main())
