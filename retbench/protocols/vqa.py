"""Closed-form VQA protocols: each question type is a small classification problem of its own.

For every question of the task, the images it is asked about become a classification task
whose classes are the question's candidate answers; the classification protocols then run
unchanged on it, on the task's split (by patient):

``vqa.zero_shot`` (image-text models) scores each candidate answer's "question + answer" text
(the spec's ``answer_template``, one text per phrasing of the answer, L2-normalised and averaged
per answer, renormalised) against the image's image-text embedding: softmax of 100 × cosine,
the best-scoring answer is the prediction — :mod:`retbench.protocols.zero_shot` on the
answer texts, on the test images.

``vqa.probe`` (every model) is :mod:`retbench.protocols.linear_probe` per question type: the
question selects its own logistic-regression head on the frozen image features (one head per
question type, not one probe on [features, one-hot question]); C searched on a validation split
carved from train by patient, refit on train+val, 5 seeds.

Metrics are computed per question type (``<question>/accuracy``, ``<question>/balanced_accuracy``)
and averaged without weights over the question types (``accuracy``, ``balanced_accuracy``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from retbench import resampling as rs
from retbench.data.examples import Examples
from retbench.data.questions import QuestionData
from retbench.errors import DataError
from retbench.protocols.base import Context, ProtocolOutput, Run, part_means
from retbench.protocols.linear_probe import LINEAR_PROBE
from retbench.protocols.zero_shot import ZERO_SHOT
from retbench.spec import ClassSpec, TaskSpec

ZERO_SHOT_SCALE = 100.0


def questions_of(ctx: Context) -> QuestionData:
    """The questions of a VQA task's context: per image (``ctx.examples``), its answer to each."""
    assert isinstance(ctx.data, QuestionData), "a VQA protocol needs a VQA task"
    return ctx.data


def question_task(ctx: Context, q: int) -> tuple[Context, np.ndarray]:
    """Question ``q`` as a classification :class:`Context` over the images it is asked about, and those images' indices."""
    assert ctx.spec.vqa is not None
    data = questions_of(ctx)
    question = ctx.spec.vqa.questions[q]
    rows = np.flatnonzero(data.asked(q) & ctx.valid())
    position = np.full(len(data.examples), -1)
    position[rows] = np.arange(len(rows))
    splits = {s: position[idx][position[idx] >= 0] for s, idx in ctx.splits.items()}
    for s in ("train", "test"):
        if s in splits and len(splits[s]) == 0:
            raise DataError(f"task '{ctx.spec.name}': question '{question.name}' is asked about no {s} image")
    texts = ctx.spec.vqa.answer_texts(question)
    classes = tuple(ClassSpec(a.name, a.match, tuple(t)) for a, t in zip(question.answers, texts))
    spec = dataclasses.replace(ctx.spec, name=f"{ctx.spec.name}/{question.name}", kind="classification",
                               problem="binary" if len(classes) == 2 else "multiclass", classes=classes,
                               prompt_template="{}", vqa=None)
    ex = data.examples
    examples = Examples(ids=[ex.ids[i] for i in rows], labels=data.answers[rows, q], patients=[ex.patients[i] for i in rows],
                        given_split=None, images=ex.images)
    joint = ctx.joint_features
    sub = Context(spec=spec, examples=examples, splits=splits, features=lambda: ctx.features()[rows],
                  joint_features=(lambda: joint()[rows]) if joint is not None else None, encode_text=ctx.encode_text,
                  device=ctx.device, valid=lambda: np.ones(len(rows), dtype=bool))
    return sub, rows


def combine(ctx: Context, outputs: dict[str, tuple[ProtocolOutput, np.ndarray]]) -> ProtocolOutput:
    """Per-seed runs with per-question and mean metrics; each run's predictions are its questions' (the
    bootstrap resamples test patients × runs, a replicate's metric the mean over questions)."""
    names = ctx.spec.metrics
    seeds = sorted({r.seed for out, _ in outputs.values() for r in out.runs})
    runs, test_images = [], set()
    for seed in seeds:
        per_q, records, parts = {}, {}, []
        for qname, (out, rows) in outputs.items():
            run = next(r for r in out.runs if r.seed == seed)
            per_q[qname] = {n: run.metrics[n] for n in names}
            proba = np.asarray(run.proba, dtype=np.float64)
            records[qname] = {"index": rows[run.indices].tolist(), "y_true": run.y_true.tolist(),
                              "proba": proba.tolist(), **run.extra}
            parts.append((qname, rs.RunPredictions((seed, 0), rows[run.indices], np.asarray(run.y_true), proba)))
        predictions = rs.RunPredictions.of_parts((seed, 0), [p for _, p in sorted(parts, key=lambda qp: qp[0])])
        runs.append(Run(seed, part_means(per_q, names), None, {"questions": records}, predictions))
        test_images.update(predictions.index.tolist())
    return ProtocolOutput(runs, {}, n_test=len(test_images))


@dataclass(frozen=True)
class VQAZeroShot:
    """Candidate answers' "question + answer" texts scored against the image (image-text models)."""

    name: str = "vqa.zero_shot"
    description: str = ("each candidate answer's 'question + answer' texts against the image-text embedding, "
                        "softmax(100 x cosine), best answer; per question type, on test")
    kind: str = "vqa"
    run_options: ClassVar[frozenset[str]] = frozenset()

    def needs_text(self, spec: TaskSpec) -> bool:
        """Always: it scores answer texts."""
        return True

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The task's metrics, each the mean over question types (``<question>/<metric>`` besides)."""
        return spec.metrics

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> VQAZeroShot:
        """Itself: nothing is sampled or fitted."""
        return self

    def run(self, ctx: Context) -> ProtocolOutput:
        """Answer every question about every test image it is asked about."""
        assert ctx.spec.vqa is not None
        outputs = {}
        for q, question in enumerate(ctx.spec.vqa.questions):
            sub, rows = question_task(ctx, q)
            outputs[question.name] = (ZERO_SHOT.run(sub), rows)
        result = combine(ctx, outputs)
        result.settings = {
            "answer_template": ctx.spec.vqa.answer_template,
            "answer_texts": {q.name: ctx.spec.vqa.answer_texts(q) for q in ctx.spec.vqa.questions},
            "logit_scale": ZERO_SHOT_SCALE, "renormalize": True,
            "scoring": "answer texts L2-normalised, averaged per answer and renormalised; softmax(scale x cosine)",
        }
        return result


@dataclass(frozen=True)
class VQAProbe:
    """One logistic-regression head per question type on frozen image features (every model)."""

    name: str = "vqa.probe"
    description: str = ("per question type, a logistic-regression head on frozen image features (the question selects "
                        "the head); C searched on validation carved from train by patient, 5 seeds")
    kind: str = "vqa"
    seeds: tuple[int, ...] = LINEAR_PROBE.seeds
    run_options: ClassVar[frozenset[str]] = frozenset({"seeds"})

    def needs_text(self, spec: TaskSpec) -> bool:
        """Never: it fits heads on image features."""
        return False

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The task's metrics, each the mean over question types (``<question>/<metric>`` besides)."""
        return spec.metrics

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> VQAProbe:
        """Seeds ``0 .. seeds - 1``; shots do not apply."""
        return dataclasses.replace(self, seeds=tuple(range(seeds))) if seeds else self

    def run(self, ctx: Context) -> ProtocolOutput:
        """Fit and score one head per question, per seed."""
        assert ctx.spec.vqa is not None
        probe = dataclasses.replace(LINEAR_PROBE, seeds=self.seeds)
        outputs, solver, settings = {}, {}, {}
        for q, question in enumerate(ctx.spec.vqa.questions):
            sub, rows = question_task(ctx, q)
            out = probe.run(sub)
            outputs[question.name] = (out, rows)
            settings = {k: v for k, v in out.settings.items() if k not in ("solver", "seeds")}
            solver[question.name] = out.settings.get("solver", {})
        result = combine(ctx, outputs)
        result.settings = {"heads": "one multinomial logistic regression per question type (the question selects the "
                           "head)", "seeds": list(self.seeds), **settings, "solver": solver,
                           "selection_metric": ctx.spec.primary_metric}
        return result


VQA_ZERO_SHOT = VQAZeroShot()
VQA_PROBE = VQAProbe()
