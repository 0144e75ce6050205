"""`python -m retbench`: the same as the `retbench` command."""

from retbench.cli import main

raise SystemExit(main())
