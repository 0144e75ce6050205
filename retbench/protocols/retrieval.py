"""Retrieval protocols: image↔text and image↔image (cross-modal) ranking on the test pairs.

Every test pair is one query per direction (its ``query`` side); the gallery is the distinct
items of the ``gallery`` side among the test pairs (identical texts or image files count once);
the relevant items of a query are the gallery items paired with its query item. Scores are
cosine similarities. Ranks count ties explicitly: with h irrelevant items strictly above the
best relevant one, t irrelevant items tied with it and m relevant items tied there, the rank
is 1 + h + t / (m + 1) (half the ties for one relevant item) — the expectation over random
tie-breaks, and Recall@K and MRR are the same expectations (:mod:`retbench.metrics`). Nothing
is random: both protocols are deterministic given the task's fixed split.

``retrieval.zero_shot`` fits nothing: image↔text directions compare the model's image-text
embeddings; image↔image directions compare, for a model with a text tower, its image-text
embeddings and, for a vision-only model, its probe features — the raw feature spaces, so a
CFP and an OCT of one eye meet only as far as the encoder already maps them together.

``retrieval.linear_map`` learns where the two raw feature spaces correspond (image↔image
directions only, any model): both sides' probe features are standardised with statistics of
the train pairs, a ridge regression maps query features onto gallery features, fitted on the
train pairs (the regularisation chosen by grouped 5-fold cross-validation on the train pairs,
maximising MRR), and the mapped test queries are ranked by cosine similarity with the test
gallery. One map per direction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from sklearn.model_selection import GroupKFold

from retbench import resampling as rs
from retbench.data.pairs import PairData
from retbench.errors import DataError
from retbench.metrics import rank_metric, rank_values, tie_counts
from retbench.protocols.base import Context, ProtocolOutput, Run, part_means
from retbench.spec import DirectionSpec, TaskSpec

TOP = 10  # gallery items stored per query (the top of its ranking)
TEXT_BATCH = 256


def pairs_of(ctx: Context) -> PairData:
    """The pairs of a retrieval task's context (``ctx.splits`` index them)."""
    assert isinstance(ctx.data, PairData), "a retrieval protocol needs a retrieval task"
    return ctx.data


def side_features(ctx: Context, side: str, joint: bool) -> np.ndarray:
    """An image side's features, one row per pair (NaN rows: unreadable images); ``joint`` selects the
    image-text space (text models only)."""
    if joint:
        assert ctx.joint_features is not None
        return ctx.joint_features(side)
    return ctx.features(side)


@dataclass
class DirectionResult:
    """Ranking of one direction: queries (pair indices), gallery (pair index of each item), tie counts, top items."""

    queries: np.ndarray
    gallery: np.ndarray
    higher: np.ndarray
    ties: np.ndarray
    tied_relevant: np.ndarray
    top: np.ndarray

    def values(self, name: str) -> np.ndarray:
        """Per-query values of rank metric ``name``."""
        return rank_values(name, self.higher, self.ties, self.tied_relevant)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: enough to recompute every rank metric (and Recall@K for K ≤ 10 from ``top``)."""
        return {"queries": self.queries.tolist(), "gallery": self.gallery.tolist(), "higher": self.higher.tolist(),
                "ties": self.ties.tolist(), "tied_relevant": self.tied_relevant.tolist(), "top": self.top.tolist()}


def _normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def encode_texts(encode: Callable[[list[str]], np.ndarray], texts: list[str]) -> np.ndarray:
    """Embeddings of ``texts``, each distinct text encoded once (identical texts get identical rows)."""
    unique, inverse = np.unique(np.asarray(texts, dtype=object), return_inverse=True)
    parts = [np.asarray(encode(list(unique[i: i + TEXT_BATCH])), dtype=np.float64) for i in range(0, len(unique), TEXT_BATCH)]
    return np.concatenate(parts)[inverse.reshape(-1)]


def rank_direction(pairs: PairData, direction: DirectionSpec, indices: np.ndarray, query_emb: np.ndarray,
                   gallery_emb: np.ndarray) -> DirectionResult:
    """Rank the gallery for every pair of ``indices`` (embeddings: one row per pair of ``indices``).

    The gallery is the distinct gallery-side items among ``indices`` (first occurrence's row);
    a query's relevant items are those paired, somewhere in ``indices``, with its query item.
    """
    q_keys = np.asarray([pairs.sides[direction.query].values[i] for i in indices], dtype=object)
    g_keys = np.asarray([pairs.sides[direction.gallery].values[i] for i in indices], dtype=object)
    _, first, g_code = np.unique(g_keys, return_index=True, return_inverse=True)
    order = np.argsort(first, kind="stable")  # gallery items in order of first appearance
    position = np.empty_like(order)
    position[order] = np.arange(len(order))
    g_code, first = position[g_code.reshape(-1)], first[order]
    _, q_code = np.unique(q_keys, return_inverse=True)
    q_code = q_code.reshape(-1)
    links = np.zeros((q_code.max() + 1, len(first)), dtype=bool)
    links[q_code, g_code] = True
    relevant = links[q_code]
    scores = _normalise(query_emb) @ _normalise(gallery_emb[first]).T
    h, t, m = tie_counts(relevant, scores)
    top = np.argsort(-scores, axis=1, kind="stable")[:, :TOP]
    return DirectionResult(np.asarray(indices), np.asarray(indices)[first], h, t, m, np.asarray(indices)[first][top])


def _valid_pairs(ctx: Context, sides: list[str], joint: bool) -> np.ndarray:
    pairs = pairs_of(ctx)
    valid = np.ones(len(pairs), dtype=bool)
    for name in sides:
        if pairs.sides[name].spec.type == "image":
            valid &= np.isfinite(side_features(ctx, name, joint)).all(axis=1)
    return valid


def _split(ctx: Context, name: str, valid: np.ndarray) -> np.ndarray:
    if name not in ctx.splits:
        raise DataError(f"task '{ctx.spec.name}': no '{name}' split")
    idx = ctx.splits[name]
    idx = idx[valid[idx]]
    if len(idx) < 2:
        raise DataError(f"task '{ctx.spec.name}': split '{name}' has {len(idx)} readable pairs; retrieval needs 2")
    return idx


def _units(ctx: Context, test: np.ndarray) -> tuple[list[Any], str]:
    """The resampling unit of each test pair: its patient where the task has patient ids, else the pair.

    The gallery stays fixed; the queries of the drawn units are scored against it.
    """
    pairs = pairs_of(ctx)
    patients = [pairs.patients[i] for i in test]
    if ctx.spec.splits.by_patient and len(set(pairs.patients)) < len(pairs.patients):
        return patients, "patient"
    return [int(i) for i in test], "pair"


def _finish(ctx: Context, results: dict[str, DirectionResult], test: np.ndarray, settings: dict[str, Any],
            extra: dict[str, Any], n_unreadable: int) -> ProtocolOutput:
    """Metrics per direction and their means, the bootstrap CI of a headline metric and the JSON-ready run."""
    names = ctx.spec.metrics
    per_direction = {d: {n: rank_metric(n, r.values(n)) for n in names} for d, r in results.items()}
    run_metrics = part_means(per_direction, names)
    values = {n: [r.values(n) for r in results.values()] for n in names}

    units, unit = _units(ctx, test)

    def interval(name: str) -> rs.Interval:  # a headline metric: the mean over directions; queries resampled
        return rs.bootstrap_statistic(lambda i: float(np.mean([rank_metric(name, v[i]) for v in values[name]])), units,
                                      unit, seed=rs.task_seed(ctx.spec.name))

    run = Run(0, run_metrics, None, {"directions": {d: r.to_dict() for d, r in results.items()}, **extra})
    return ProtocolOutput([run], settings, n_test=int(len(test)), notes={"unreadable_pairs": n_unreadable},
                          interval=interval)


@dataclass(frozen=True)
class ZeroShotRetrieval:
    """Cosine similarity in the model's own space; nothing fitted."""

    name: str = "retrieval.zero_shot"
    description: str = ("no training: cosine similarity on the test pairs (image-text: the image-text space; "
                        "image-image: the image-text space of text models, else the probe features); ties count half")
    kind: str = "retrieval"
    run_options: ClassVar[frozenset[str]] = frozenset()

    def needs_text(self, spec: TaskSpec) -> bool:
        """Whether any direction of ``spec`` ranks texts (vision-only models are then skipped)."""
        assert spec.retrieval is not None
        return any(spec.retrieval.needs_text(d) for d in spec.retrieval.directions)

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The task's rank metrics, each the mean over directions (``<direction>/<metric>`` besides)."""
        return spec.metrics

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> ZeroShotRetrieval:
        """Itself: nothing is sampled or fitted."""
        return self

    def run(self, ctx: Context) -> ProtocolOutput:
        """Rank every direction on the test pairs."""
        assert ctx.spec.retrieval is not None
        directions, pairs = ctx.spec.retrieval.directions, pairs_of(ctx)
        joint = ctx.has_text
        used = sorted({s for d in directions for s in (d.query, d.gallery)})
        valid = _valid_pairs(ctx, used, joint)
        test = _split(ctx, "test", valid)
        embeddings = {}
        for name in used:
            side = pairs.sides[name]
            if side.spec.type == "text":
                assert ctx.encode_text is not None
                embeddings[name] = encode_texts(ctx.encode_text, side.texts(test))
            else:
                embeddings[name] = side_features(ctx, name, joint)[test]
        results = {d.name: rank_direction(pairs, d, test, embeddings[d.query], embeddings[d.gallery])
                   for d in directions}
        space = "image-text embeddings" if joint else "probe features"
        settings = {"similarity": "cosine", "directions": [d.name for d in directions],
                    "ties": "expected over random tie-breaks: rank = 1 + higher + tied / (relevant tied + 1)"}
        return _finish(ctx, results, test, settings, {"image_space": space}, int((~valid[ctx.splits["test"]]).sum()))


def standardise(fit: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """``fit`` and ``others`` standardised with ``fit``'s column means and standard deviations (constant columns: 1)."""
    mean, std = fit.mean(axis=0), fit.std(axis=0)
    std = np.where(std > 1e-12, std, 1.0)
    return [(x - mean) / std for x in (fit, *others)]


def ridge_map(x: np.ndarray, y: np.ndarray, alpha: float) -> np.ndarray:
    """W minimising ‖xW − y‖² + λ‖W‖² with λ = alpha · ‖x‖²_F / min(n, d) (scale-free), via the SVD of x."""
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    lam = alpha * float((s ** 2).sum()) / max(1, min(x.shape))
    return vt.T @ ((s / (s ** 2 + lam))[:, None] * (u.T @ y))


@dataclass(frozen=True)
class LinearMapRetrieval:
    """Ridge map between the two image spaces, fitted on the train pairs (image↔image directions)."""

    name: str = "retrieval.linear_map"
    description: str = ("image-image: ridge map from query to gallery probe features, standardised and fitted on the "
                        "train pairs (alpha by grouped 5-fold CV, MRR), cosine on the test pairs; ties count half")
    kind: str = "retrieval"
    run_options: ClassVar[frozenset[str]] = frozenset()
    alphas: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
    folds: int = 5

    def needs_text(self, spec: TaskSpec) -> bool:
        """Never: it maps image features only."""
        return False

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The task's rank metrics, each the mean over its image-image directions (``<direction>/<metric>`` besides)."""
        return spec.metrics

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> LinearMapRetrieval:
        """Itself: its folds are deterministic (grouped, no seed)."""
        return self

    def run(self, ctx: Context) -> ProtocolOutput:
        """Fit one map per image↔image direction on train, rank the test pairs."""
        assert ctx.spec.retrieval is not None
        directions = [d for d in ctx.spec.retrieval.directions if not ctx.spec.retrieval.needs_text(d)]
        used = sorted({s for d in directions for s in (d.query, d.gallery)})
        valid = _valid_pairs(ctx, used, False)
        train, test = _split(ctx, "train", valid), _split(ctx, "test", valid)
        results, chosen, cv = {}, {}, {}
        for d in directions:
            xq, xg = ctx.features(d.query).astype(np.float64), ctx.features(d.gallery).astype(np.float64)
            alpha, scores = self._choose_alpha(ctx, d, train, xq, xg)
            q_fit, q_test = standardise(xq[train], xq[test])
            g_fit, g_test = standardise(xg[train], xg[test])
            mapped = q_test @ ridge_map(q_fit, g_fit, alpha)
            results[d.name] = rank_direction(pairs_of(ctx), d, test, mapped, g_test)
            chosen[d.name], cv[d.name] = alpha, scores
        settings = {"similarity": "cosine after the map", "directions": [d.name for d in directions],
                    "alphas": list(self.alphas), "folds": self.folds, "selection": "mean reciprocal rank over "
                    "grouped (patient) folds of the train pairs; ties: the larger alpha",
                    "lambda": "alpha x squared Frobenius norm of the standardised train features / min(n, d)",
                    "standardize": "train pairs' statistics, each side", "image_space": "probe features",
                    "n_train_pairs": int(len(train)),
                    "ties": "expected over random tie-breaks: rank = 1 + higher + tied / (relevant tied + 1)"}
        return _finish(ctx, results, test, settings, {"alpha": chosen, "cv_mrr": cv},
                       int((~valid[ctx.splits["test"]]).sum()))

    def _choose_alpha(self, ctx: Context, d: DirectionSpec, train: np.ndarray, xq: np.ndarray,
                      xg: np.ndarray) -> tuple[float, dict[str, float]]:
        pairs = pairs_of(ctx)
        groups = np.asarray(pairs.patients, dtype=object)[train]
        n_folds = min(self.folds, len(set(groups)))
        if n_folds < 2:
            return self.alphas[len(self.alphas) // 2], {}
        folds = list(GroupKFold(n_splits=n_folds).split(train, groups=groups))
        means = {}
        for alpha in self.alphas:
            mrr = []
            for fit, val in folds:
                if len(val) < 2:
                    continue
                q_fit, q_val = standardise(xq[train[fit]], xq[train[val]])
                g_fit, g_val = standardise(xg[train[fit]], xg[train[val]])
                res = rank_direction(pairs, d, train[val], q_val @ ridge_map(q_fit, g_fit, alpha), g_val)
                mrr.append(float(np.mean(res.values("mrr"))))
            means[alpha] = float(np.mean(mrr)) if mrr else float("nan")
        best = max(self.alphas, key=lambda a: (np.nan_to_num(means[a], nan=-1.0), a))  # ties: stronger penalty
        return best, {f"{a:g}": means[a] for a in self.alphas}


RETRIEVAL_ZERO_SHOT = ZeroShotRetrieval()
RETRIEVAL_LINEAR_MAP = LinearMapRetrieval()
