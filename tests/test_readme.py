"""The generated parts of the docs stay in step with the code."""

from __future__ import annotations

import re
from pathlib import Path

from retbench.adapters import list_models
from retbench.cli import format_rows

MODELS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_models_table_is_what_retbench_list_models_prints():
    text = MODELS_PAGE.read_text(encoding="utf-8")
    block = re.search(r"<!-- models-table:[^\n]*-->\n(.*?)<!-- /models-table -->", text, re.S)
    assert block, "docs/models.md lacks the generated models table"
    expected = format_rows(list_models(), ["model", "source", "licence", "input", "feature", "text", "differs"], "markdown")
    assert block.group(1) == expected, "regenerate with: retbench list models --format markdown"
