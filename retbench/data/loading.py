"""Loading a task's examples: the reader its source and kind call for, then the check that every image is there.

The top of ``retbench.data``: it imports the readers (:mod:`~retbench.data.sources`, :mod:`~retbench.data.pairs`,
:mod:`~retbench.data.questions`), none of which imports it.
"""

from __future__ import annotations

from pathlib import Path

from retbench.data.examples import Examples, check_examples
from retbench.data.pairs import load_pairs
from retbench.data.questions import load_questions
from retbench.data.sources import SOURCES
from retbench.spec import TaskSpec


def load_examples(spec: TaskSpec, root: Path) -> Examples:
    """Read ``spec``'s source under ``root`` and check that every image is there.

    For a retrieval task these are the images of every image side (one row per image, tied to
    its pair by ``item_of``); for a VQA task, one row per image.
    """
    if spec.kind == "retrieval":
        examples = load_pairs(spec, root).examples
    elif spec.kind == "vqa":
        examples = load_questions(spec, root).examples
    else:
        examples = SOURCES.get(spec.source.kind)(spec, root)
        check_examples(spec, root, examples)
    return examples
