"""Task specs: YAML files validated into frozen, typed objects.

A spec may ``include:`` other YAML files (paths relative to itself, or a shipped base by name:
``classification``, ``_base/flair``); included mappings are merged depth-first, the including file
winning. ``metrics`` and ``protocols`` default by ``problem`` (``schema.DEFAULT_METRICS``,
``DEFAULT_PROTOCOLS``). Every error names the file, the key and what was allowed.

``kind`` selects the task type: ``classification`` (the default: one label per image),
``retrieval`` (pairs of images and texts, or of two images, ranked against each other;
its ``retrieval:`` section names the sides and the directions) or ``vqa`` (closed-form
questions generated from columns of the source; its ``vqa:`` section lists the questions
and their candidate answers).

Modules: :mod:`~retbench.spec.schema` (the dataclasses), :mod:`~retbench.spec.reader` (YAML and
includes), :mod:`~retbench.spec.sections` (one parser per section) and :mod:`~retbench.spec.parse`.
"""

from retbench.spec.parse import parse_spec
from retbench.spec.reader import load_yaml_with_includes
from retbench.spec.schema import (
    CLASSIFICATION_PROBLEMS,
    IMAGE_MODALITIES,
    KINDS,
    MODALITIES,
    PROBLEMS,
    ClassSpec,
    DirectionSpec,
    JoinSpec,
    QuestionSpec,
    RetrievalSpec,
    SideSpec,
    SourceSpec,
    SplitSpec,
    TaskSpec,
    VQASpec,
)

__all__ = [
    "CLASSIFICATION_PROBLEMS", "IMAGE_MODALITIES", "KINDS", "MODALITIES", "PROBLEMS", "ClassSpec", "DirectionSpec",
    "JoinSpec", "QuestionSpec", "RetrievalSpec", "SideSpec", "SourceSpec", "SplitSpec", "TaskSpec", "VQASpec",
    "load_yaml_with_includes", "parse_spec",
]
