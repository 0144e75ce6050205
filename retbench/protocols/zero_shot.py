"""Zero-shot classification from class prompts (CLIP_benchmark / FLAIR style).

Each prompt is embedded and L2-normalised; a class embedding is the mean of its prompt
embeddings, renormalised; image embeddings (in the image-text space) are L2-normalised;
probabilities are the softmax of 100 × cosine similarity. Scored on the test split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from retbench.protocols.base import Context, ProtocolOutput, evaluate_runs


def class_embeddings(encode_text, prompts: list[list[str]]) -> np.ndarray:
    """(K, D) ensembled, renormalised class embeddings from per-class prompt lists."""
    flat = [p for ps in prompts for p in ps]
    emb = np.asarray(encode_text(flat), dtype=np.float64)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    out, start = [], 0
    for ps in prompts:
        mean = emb[start: start + len(ps)].mean(axis=0)
        out.append(mean / np.linalg.norm(mean))
        start += len(ps)
    return np.stack(out)


@dataclass(frozen=True)
class ZeroShot:
    """Prompt-ensemble zero-shot classifier."""

    name: str = "zero_shot"
    description: str = "prompt ensembles: normalise, average per class, renormalise; softmax(100 cos) on test"
    logit_scale: float = 100.0
    needs_text: bool = True

    def run(self, ctx: Context) -> ProtocolOutput:
        """Score the test split against the task's class prompts."""
        test = ctx.split("test")
        prompts = ctx.spec.class_prompts()
        classes = class_embeddings(ctx.encode_text, prompts)
        img = ctx.joint_features()[test].astype(np.float64)
        img /= np.linalg.norm(img, axis=1, keepdims=True)
        logits = self.logit_scale * img @ classes.T
        proba = np.exp(logits - logits.max(axis=1, keepdims=True))
        proba /= proba.sum(axis=1, keepdims=True)
        runs = evaluate_runs(ctx.spec.metrics, [(0, None, test, proba, {})], ctx.examples.labels)
        return ProtocolOutput(runs, {"prompts": prompts, "logit_scale": self.logit_scale})


ZERO_SHOT = ZeroShot()
