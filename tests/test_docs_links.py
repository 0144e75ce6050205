"""Every relative link in the README and docs/ lands on a file that exists and, for ``#anchors``, on a heading.

The README is slim and points into docs/; a section moved or renamed must not leave a dead link behind.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = sorted([REPO / "README.md", REPO / "CONTRIBUTING.md", REPO / "CHANGELOG.md", *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|<[^>]+>", "", heading).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose(text: str) -> str:
    """The text outside fenced code blocks (links in code are examples, not links)."""
    return re.sub(r"(?ms)^```.*?^```", "", text)


def anchors(path: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"(?m)^#{1,6} (.+)$", prose(path.read_text(encoding="utf-8")))}


def test_slug_follows_github() -> None:
    assert slug("Public benchmarks: from download to run") == "public-benchmarks-from-download-to-run"
    assert slug("Results, cache and reproducibility") == "results-cache-and-reproducibility"
    assert slug("`retbench data check`") == "retbench-data-check"


def dead_links(page: Path) -> list[str]:
    """One line per relative link of ``page`` whose file or heading does not exist."""
    dead = []
    for label, target in LINK.findall(prose(page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            dead.append(f"[{label}]({target}): no {dest.relative_to(REPO) if dest.is_relative_to(REPO) else dest}")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            dead.append(f"[{label}]({target}): no heading #{anchor} in {dest.name}")
    return dead


def test_dead_links_are_found(tmp_path: Path) -> None:
    page = tmp_path / "page.md"
    page.write_text("# Title\n\n[ok](#title) [gone](missing.md) [moved](#old-heading) [web](https://x.org)\n"
                    "```\n[in code](nowhere.md)\n```\n", encoding="utf-8")
    assert dead_links(page) == [f"[gone](missing.md): no {tmp_path / 'missing.md'}",
                                "[moved](#old-heading): no heading #old-heading in page.md"]


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_relative_links_resolve(page: Path) -> None:
    dead = dead_links(page)
    assert not dead, "\n".join(dead)
