"""``python -m retbench.cli``: the same as the ``retbench`` command."""

from retbench.cli.commands import main

raise SystemExit(main())
