"""Train/val/test splits: given by the source, or stratified (by patient) with a fixed seed."""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

from retbench.data.examples import Examples
from retbench.errors import DataError, warn
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
        return _item_splits(spec, examples, examples.item_of)
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
    if spec.kind == "classification":
        check_class_coverage(spec, examples, splits)
    return splits


def _class_counts(spec: TaskSpec, labels: np.ndarray) -> str:
    counts = np.bincount(labels, minlength=len(spec.classes))
    return ", ".join(f"{c.name} {n}" for c, n in zip(spec.classes, counts))


def check_class_coverage(spec: TaskSpec, examples: Examples, splits: dict[str, np.ndarray]) -> None:
    """Never score an N-class task over fewer classes, nor at another test fraction than asked, silently.

    A class without examples is an error. With a stratified split, a class too small for the
    requested fraction (the split would hold out another fraction) or left without train or test
    images (grouped by patient) is an error naming it and the counts; with a given split, a class
    missing from train or test is recorded in ``examples.warnings`` (and printed once).
    """
    labels, names = examples.labels, spec.class_names
    counts = np.bincount(labels, minlength=len(names))
    absent = [n for n, c in zip(names, counts) if c == 0]
    if absent:
        raise DataError(f"task '{spec.name}': class '{absent[0]}' has no examples in the data "
                        f"({len(absent)} of {len(names)} classes absent; per class: {_class_counts(spec, labels)}); "
                        f"a {len(names)}-class task cannot be scored over {len(names) - len(absent)} classes: check "
                        "the classes' match values against the source")
    given = spec.splits.strategy == "given"
    if not given:
        fractions = [("test_fraction", spec.splits.test_fraction, labels)]
        if spec.splits.val_fraction > 0:
            rest = np.setdiff1d(np.arange(len(labels)), splits["test"])
            fractions.append(("val_fraction", spec.splits.val_fraction / (1 - spec.splits.test_fraction), labels[rest]))
        for key, fraction, subset in fractions:
            wanted, n_splits, n_held = fold_plan(subset, fraction)
            if n_splits != wanted and not np.isclose(n_held / n_splits, wanted_share(fraction, wanted)):
                sub = np.bincount(subset, minlength=len(names))
                k = int(np.flatnonzero(sub == sub[sub > 0].min())[0])
                raise DataError(
                    f"task '{spec.name}': class '{names[k]}' has only {sub[k]} examples; splits.{key} "
                    f"{getattr(spec.splits, key):g} needs {wanted} per class ({wanted_share(fraction, wanted):.2f} held "
                    f"out), with {sub[k]} it would hold out {n_held / n_splits:.2f} (per class: "
                    f"{_class_counts(spec, subset)}): add examples, merge the class or change the fraction")
    for split in ("train", "test"):
        held = np.bincount(labels[splits[split]], minlength=len(names))
        empty = [k for k in range(len(names)) if held[k] == 0]
        if not empty:
            continue
        other = "test" if split == "train" else "train"
        where = "; ".join(f"{s}: {_class_counts(spec, labels[splits[s]])}" for s in (split, other))
        message = (f"task '{spec.name}': class '{names[empty[0]]}' has no {split} images ({len(empty)} of {len(names)} "
                   f"classes; {where})")
        if not given:
            raise DataError(f"{message}; its images come from too few patients to split: add examples or merge "
                            "the class")
        note = f"{message}; the given split is used as it is, so metrics cover fewer classes"
        if note not in examples.warnings:
            examples.warnings.append(note)
            warn(note)


def _item_splits(spec: TaskSpec, examples: Examples, item_of: np.ndarray) -> dict[str, np.ndarray]:
    items, first = np.unique(item_of, return_index=True)
    per_item = Examples(
        ids=[examples.ids[i] for i in first], labels=examples.labels[first],
        patients=[examples.patients[i] for i in first],
        given_split=None if examples.given_split is None else [examples.given_split[i] for i in first],
        images=examples.images,
    )
    return {name: np.flatnonzero(np.isin(item_of, items[idx])) for name, idx in make_splits(spec, per_item).items()}


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
    _, n_splits, n_held = fold_plan(labels, fraction)
    if groups is not None and len(set(groups)) < len(groups):
        folds = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(idx, labels, groups)
    else:
        folds = StratifiedKFold(n_splits=n_splits, shuffle=True, random_state=seed).split(idx, labels)
    held = np.sort(np.concatenate([test for _, (_, test) in zip(range(n_held), folds)]))
    rest = np.setdiff1d(np.arange(len(idx)), held)
    return idx[rest], idx[held]


def fold_plan(labels: np.ndarray, fraction: float) -> tuple[int, int, int]:
    """(folds wanted, folds used, folds held out) of :func:`holdout`: fewer folds when the smallest class is smaller."""
    inverse = 1 / fraction
    wanted = round(inverse) if abs(inverse - round(inverse)) < 1e-9 else 20
    counts = np.bincount(labels)
    n_splits = max(2, min(wanted, int(counts[counts > 0].min()), len(labels)))
    n_held = min(n_splits - 1, max(1, round(fraction * n_splits)))
    return wanted, n_splits, n_held


def wanted_share(fraction: float, wanted: int) -> float:
    """The share :func:`holdout` holds out with its wanted number of folds."""
    return min(wanted - 1, max(1, round(fraction * wanted))) / wanted


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
