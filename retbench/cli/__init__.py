"""``retbench`` command line: run, data, list, validate, results, leaderboard, pretrain, sweep.

:mod:`retbench.cli.commands` holds the parser and the commands; :mod:`retbench.cli.common` the helpers every
subcommand shares (also those defined in :mod:`retbench.pretrain.cli` and :mod:`retbench.sweep.cli`).
"""

from __future__ import annotations

from retbench.cli.commands import COMMANDS, build_parser, format_rows, main

__all__ = ["COMMANDS", "build_parser", "format_rows", "main"]
