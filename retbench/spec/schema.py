"""The task-spec schema: allowed values and the frozen dataclasses a spec is validated into."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

KINDS = ("classification", "retrieval", "vqa")
IMAGE_MODALITIES = ("cfp", "oct")
MODALITIES = IMAGE_MODALITIES + ("cfp+oct",)  # cfp+oct: a cross-modal retrieval task
CLASSIFICATION_PROBLEMS = ("binary", "multiclass", "ordinal", "multilabel")
PROBLEMS = CLASSIFICATION_PROBLEMS + ("retrieval", "vqa")  # the last two are the kinds' own
SOURCE_KINDS = ("csv", "folder", "npz", "hf_disk")
SIDE_TYPES = ("image", "text")
DEFAULT_ANSWER_TEMPLATE = "Q: {question} A: {answer}"
SPLIT_STRATEGIES = ("given", "stratified")
LABEL_FORMATS = ("value", "list")

# Defaults of a classification task that lists no ``metrics`` / ``protocols``: the lists of tasks/_base/classification.yaml,
# which every shipped classification task uses. An ordinal (grading) task reports the same metrics with
# kappa_quadratic first, since the primary metric defaults to the first one and the shipped grading tasks rank by it.
_CLASSIFICATION_METRICS = ("aca", "accuracy", "f1_macro", "auroc", "aupr", "kappa_quadratic", "kappa_unweighted", "mcc",
                           "sensitivity_per_class", "specificity_per_class")
DEFAULT_METRICS = {
    "binary": _CLASSIFICATION_METRICS,
    "multiclass": _CLASSIFICATION_METRICS,
    "ordinal": ("kappa_quadratic",) + tuple(m for m in _CLASSIFICATION_METRICS if m != "kappa_quadratic"),
}
_CLASSIFICATION_PROTOCOLS = ("linear_probe", "linear_probe.flair", "linear_probe.flair_grouped", "linear_probe.retfound",
                             "few_shot", "zero_shot")
DEFAULT_PROTOCOLS = dict.fromkeys(DEFAULT_METRICS, _CLASSIFICATION_PROTOCOLS)


@dataclass(frozen=True)
class ClassSpec:
    """One class: its name, the raw values that mean it, and its text prompts."""

    name: str
    match: tuple[str, ...]
    prompts: tuple[str, ...]


@dataclass(frozen=True)
class JoinSpec:
    """A second CSV merged into a CSV source's rows on a key column (every row must find its match)."""

    path: str
    key: str  # the key column of the source CSV
    join_key: str  # the key column of the joined CSV (default: the same name)
    columns: tuple[str, ...] = ()  # the joined CSV's columns to bring in (default: all); the base CSV wins on clashes


@dataclass(frozen=True)
class SourceSpec:
    """Where the examples come from, relative to the data root."""

    kind: str
    path: str
    files: dict[str, str] = field(default_factory=dict)
    image_column: str = "image"
    image_root: str | None = None
    label_column: str = "label"
    label_format: str = "value"
    bins: tuple[float, ...] = ()
    patient_column: str | None = None
    patient_patterns: tuple[tuple[str, str], ...] = ()
    split_column: str | None = None
    split_dirs: dict[str, str] = field(default_factory=dict)
    drop_missing_labels: bool = False
    drop_conflicting_duplicates: bool = False
    layout: str = ""
    download: str = ""
    join: tuple[JoinSpec, ...] = ()


@dataclass(frozen=True)
class SplitSpec:
    """How train/val/test are obtained: given by the source, or made with a fixed seed."""

    strategy: str = "stratified"
    test_fraction: float = 0.2
    val_fraction: float = 0.0
    seed: int = 0
    by_patient: bool = True
    group_near_duplicates: bool = False  # images showing the same photograph (perceptual hash) share a group


@dataclass(frozen=True)
class SideSpec:
    """One side of a retrieval pair: a column of images (with their modality and preprocessing hints) or of texts."""

    name: str
    type: str
    column: str
    modality: str = ""
    preprocess: dict[str, Any] = field(default_factory=dict)
    template: str = "{}"


@dataclass(frozen=True)
class DirectionSpec:
    """Queries from one side ranked against the gallery of another (``<query>_to_<gallery>``)."""

    name: str
    query: str
    gallery: str


@dataclass(frozen=True)
class RetrievalSpec:
    """The sides of each pair and the directions evaluated."""

    sides: tuple[SideSpec, ...]
    directions: tuple[DirectionSpec, ...]

    def side(self, name: str) -> SideSpec:
        """The side called ``name``."""
        return next(s for s in self.sides if s.name == name)

    def needs_text(self, direction: DirectionSpec) -> bool:
        """Whether ``direction`` involves a text side."""
        return "text" in (self.side(direction.query).type, self.side(direction.gallery).type)


@dataclass(frozen=True)
class QuestionSpec:
    """One closed-form question: its text, the source column that answers it and the candidate answers."""

    name: str
    question: str
    column: str
    answers: tuple[ClassSpec, ...]
    bins: tuple[float, ...] = ()
    missing: tuple[str, ...] = ()  # raw values meaning "not asked for this image" (besides empty cells)


@dataclass(frozen=True)
class VQASpec:
    """The question set and the text template each candidate answer is scored with."""

    questions: tuple[QuestionSpec, ...]
    answer_template: str = DEFAULT_ANSWER_TEMPLATE

    def answer_texts(self, question: QuestionSpec) -> list[list[str]]:
        """Per candidate answer, its "question + answer" texts (one per phrasing of the answer)."""
        return [[self.answer_template.format(question=question.question, answer=p) for p in a.prompts]
                for a in question.answers]

    def offsets(self) -> list[int]:
        """Index of each question's first answer in the flattened class list of the task."""
        out, start = [], 0
        for q in self.questions:
            out.append(start)
            start += len(q.answers)
        return out


@dataclass(frozen=True)
class TaskSpec:
    """A validated task: data, classes and prompts, splits, preprocessing, metrics.

    For ``kind: vqa`` the classes are the flattened (question, answer) candidates, their prompts
    the "question + answer" texts; for ``kind: retrieval`` they are optional labels of the pairs
    (used to stratify the split).
    """

    name: str
    version: str
    file: str
    description: str
    modality: str
    problem: str
    source: SourceSpec
    classes: tuple[ClassSpec, ...]
    splits: SplitSpec
    preprocess: dict[str, Any]
    metrics: tuple[str, ...]
    primary_metric: str
    protocols: tuple[str, ...]
    groups: tuple[str, ...]
    prompt_template: str
    citation: str
    raw: dict[str, Any] = field(repr=False, compare=False, default_factory=dict)
    kind: str = "classification"
    retrieval: RetrievalSpec | None = None
    vqa: VQASpec | None = None
    # the release's file manifest (see docs/adding_a_task.md), read by ``retbench data``; not part of spec_hash
    manifest: dict[str, Any] | None = field(repr=False, compare=False, default=None)

    @property
    def class_names(self) -> list[str]:
        """Class names in label-index order."""
        return [c.name for c in self.classes]

    @property
    def spec_hash(self) -> str:
        """sha256 of the fully resolved spec (includes merged), recorded with results."""
        blob = json.dumps(self.raw, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def class_prompts(self) -> list[list[str]]:
        """Per class, the texts used for zero-shot (template applied to each prompt)."""
        return [[self.prompt_template.format(p) for p in c.prompts] for c in self.classes]
