"""Train/val/test splits: given by the source, or stratified (by patient) with a fixed seed."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from retbench.data.examples import Examples
from retbench.errors import DataError
from retbench.spec import TaskSpec

SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test", "testing": "test", "eval": "test"}


def make_splits(spec: TaskSpec, examples: Examples) -> dict[str, np.ndarray]:
    """Index arrays per split (``train``, optional ``val``, ``test``), never empty.

    Examples grouped into items (``examples.item_of``: the images of one retrieval pair) are split
    item by item, each item with the label, patient and given split of its first row. With
    ``splits.group_near_duplicates``, images showing the same photograph first join one patient group.
    """
    if spec.splits.group_near_duplicates and examples.near_duplicate_pairs is None:
        from retbench.data.dedup import merge_near_duplicate_groups

        # once per Examples: probes carve validation folds from the same (merged) groups
        examples.patients, examples.near_duplicate_pairs = merge_near_duplicate_groups(spec.name, examples)
    if examples.item_of is not None:
        return _item_splits(spec, examples)
    if spec.splits.strategy == "given":
        splits = _given(spec, examples)
    else:
        idx = np.arange(len(examples))
        train, test = holdout(idx, examples.labels, _groups(spec, examples), spec.splits.test_fraction, spec.splits.seed)
        splits = {"train": train, "test": test}
        if spec.splits.val_fraction > 0:
            frac = spec.splits.val_fraction / (1 - spec.splits.test_fraction)
            tr, va = holdout(train, examples.labels[train], _groups(spec, examples, train), frac, spec.splits.seed)
            splits.update(train=tr, val=va)
    for name, ids in splits.items():
        if len(ids) == 0:
            raise DataError(f"task '{spec.name}': split '{name}' is empty")
    return splits


def _item_splits(spec: TaskSpec, examples: Examples) -> dict[str, np.ndarray]:
    items, first = np.unique(examples.item_of, return_index=True)
    per_item = Examples(
        ids=[examples.ids[i] for i in first], labels=examples.labels[first],
        patients=[examples.patients[i] for i in first],
        given_split=None if examples.given_split is None else [examples.given_split[i] for i in first],
        images=examples.images,
    )
    return {name: np.flatnonzero(np.isin(examples.item_of, items[idx])) for name, idx in make_splits(spec, per_item).items()}


def _groups(spec: TaskSpec, examples: Examples, subset: np.ndarray | None = None) -> np.ndarray | None:
    if not spec.splits.by_patient:
        return None
    patients = np.asarray(examples.patients, dtype=object)
    return patients if subset is None else patients[subset]


def _given(spec: TaskSpec, examples: Examples) -> dict[str, np.ndarray]:
    if examples.given_split is None:
        raise DataError(f"task '{spec.name}': splits.strategy is 'given' but the source gives no split per example")
    names = np.array([SPLIT_ALIASES.get(str(s).lower(), str(s).lower()) for s in examples.given_split])
    unknown = sorted(set(names.tolist()) - {"train", "val", "test"})
    if unknown:
        raise DataError(f"task '{spec.name}': unknown split names {unknown}; allowed: train, val, test")
    out = {s: np.flatnonzero(names == s) for s in ("train", "val", "test") if (names == s).any()}
    for required in ("train", "test"):
        if required not in out:
            raise DataError(f"task '{spec.name}': split '{required}' is empty")
    return out


def holdout(
    idx: np.ndarray, labels: np.ndarray, groups: np.ndarray | None, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Split ``idx`` into (rest, held-out ≈ ``fraction``), stratified by label and grouped by patient.

    The data are cut into ``n`` stratified (grouped) folds and ``round(fraction · n)`` of them are held
    out: ``n = 1 / fraction`` when that is a whole number (0.2 → 5 folds, 1 held out), else 20.
    """
    inverse = 1 / fraction
    n_splits = round(inverse) if abs(inverse - round(inverse)) < 1e-9 else 20
    counts = np.bincount(labels)
    n_splits = max(2, min(n_splits, int(counts[counts > 0].min()), len(idx)))
    n_held = min(n_splits - 1, max(1, round(fraction * n_splits)))
    if groups is not None and len(set(groups)) < len(groups):
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(idx, labels, groups)
    else:
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(idx, labels)
    held = np.sort(np.concatenate([test for _, (_, test) in zip(range(n_held), folds)]))
    rest = np.setdiff1d(np.arange(len(idx)), held)
    return idx[rest], idx[held]


def per_class_holdout(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """FLAIR's split: within each class, shuffle with ``seed`` and hold out ``fraction``."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for k in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == k))
        n_test = int(round(len(members) * fraction))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))
