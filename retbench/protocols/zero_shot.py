"""Zero-shot classification from class prompts (CLIP_benchmark / FLAIR style).

Each prompt is embedded and L2-normalised; a class embedding is the mean of its prompt
embeddings, renormalised (CLIP's ensembling; FLAIR leaves the mean un-renormalised); image
embeddings (in the image-text space) are L2-normalised; probabilities are the softmax of
logit_scale × similarity. Prompts, renormalisation and the scale follow the model's release
(:meth:`retbench.adapters.Adapter.zero_shot_setup`); scored on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from retbench.adapters import ZeroShotSetup
from retbench.protocols.base import Context, ProtocolOutput, evaluate_runs
from retbench.spec import TaskSpec


def class_embeddings(encode_text, prompts: list[list[str]], renormalize: bool = True, encode_class=None) -> np.ndarray:
    """(K, D) ensembled class embeddings from per-class prompt lists (renormalised unless told not to).

    ``encode_class`` embeds each class's prompts in one call (models whose text embedding
    depends on the batch's padding); otherwise every prompt goes through ``encode_text`` at once.
    """
    if encode_class is not None:
        emb = np.concatenate([np.asarray(encode_class(ps), dtype=np.float64) for ps in prompts])
    else:
        emb = np.asarray(encode_text([p for ps in prompts for p in ps]), dtype=np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out, start = [], 0
    for ps in prompts:
        mean = emb[start: start + len(ps)].mean(axis=0)
        out.append(mean / np.linalg.norm(mean) if renormalize else mean)
        start += len(ps)
    return np.stack(out)


@dataclass(frozen=True)
class ZeroShot:
    """Prompt-ensemble zero-shot classifier."""

    name: str = "zero_shot"
    description: str = ("prompt ensembles: normalise, average per class (renormalised unless the release does not); "
                        "softmax(logit_scale x similarity) on test")
    kind: str = "classification"
    run_options: ClassVar[frozenset[str]] = frozenset()

    def needs_text(self, spec: TaskSpec) -> bool:
        """Always: it scores class prompts."""
        return True

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The task's metrics."""
        return spec.metrics

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> ZeroShot:
        """Itself: nothing is sampled or fitted."""
        return self

    def run(self, ctx: Context) -> ProtocolOutput:
        """Score the test split against the class prompts of the model's convention."""
        test = ctx.split("test")
        setup = ctx.zero_shot or ZeroShotSetup(ctx.spec.class_prompts())
        prompts = setup.prompts
        classes = class_embeddings(ctx.encode_text, prompts, setup.renormalize, setup.encode_class)
        assert ctx.joint_features is not None  # zero_shot applies to image-text models only
        img = ctx.joint_features()[test].astype(np.float64)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        logits = setup.logit_scale * img @ classes.T
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba /= proba.sum(axis=1, keepdims=True)
        runs = evaluate_runs(self.metric_names(ctx.spec), [(0, None, test, proba, {})], ctx.examples.labels)
        return ProtocolOutput(runs, {"prompts": prompts, "logit_scale": setup.logit_scale,
                                     "renormalize_class_embeddings": setup.renormalize})


ZERO_SHOT = ZeroShot()
