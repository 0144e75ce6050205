"""RETFound's metric set (``linear_probe.retfound``) against RETFound's own evaluation code.

``tests/fixtures/retfound_engine_metrics.py`` holds the metric lines of RETFound's
``engine_finetune.evaluate`` (rmaphoh/RETFound_MAE); the same logits go through it and, as
softmax probabilities, through retbench's registered metrics.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from retbench.metrics import METRICS
from retbench.protocols.linear_probe import LINEAR_PROBE_RETFOUND, RETFOUND_METRICS
from retbench.tasks import get_task

FIXTURE = Path(__file__).parent / "fixtures" / "retfound_engine_metrics.py"
# retbench metric -> the name RETFound's evaluate() logs it under
RETFOUND_NAMES = {"accuracy": "accuracy", "f1_macro": "f1", "auroc": "roc_auc", "aupr_retfound": "average_precision",
                  "kappa_unweighted": "kappa"}


def retfound_metrics(logits: torch.Tensor, y: np.ndarray, with_roc_auc: bool = True) -> dict:
    spec = importlib.util.spec_from_file_location("retfound_engine_metrics", FIXTURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.retfound_evaluate_metrics(logits, torch.as_tensor(y), logits.shape[1], with_roc_auc=with_roc_auc)


def logits_and_labels(n_classes: int, seed: int, absent: int | None = None) -> tuple[torch.Tensor, np.ndarray]:
    """Informative but noisy float64 logits; ``absent`` removes one class from the labels."""
    rng = np.random.default_rng(seed)
    classes = [k for k in range(n_classes) if k != absent]
    y = np.concatenate([classes, rng.choice(classes, 240 - len(classes))])
    logits = rng.normal(size=(len(y), n_classes)) + 1.3 * np.eye(n_classes)[y]
    return torch.from_numpy(logits), y


def test_preset_reports_retfounds_aupr():
    assert RETFOUND_METRICS == ("accuracy", "f1_macro", "auroc", "aupr_retfound", "kappa_unweighted")
    assert set(RETFOUND_NAMES) == set(RETFOUND_METRICS)
    assert LINEAR_PROBE_RETFOUND.metrics == RETFOUND_METRICS and "aupr_retfound" in LINEAR_PROBE_RETFOUND.description
    assert "aupr_retfound" in get_task("aptos2019").metrics  # tasks/_base/retfound.yaml
    assert "one-hot column" in METRICS.get("aupr_retfound").description


@pytest.mark.parametrize("n_classes", [2, 5])
@pytest.mark.parametrize("seed", [0, 1])
def test_retfound_metric_set_matches_retfounds_code(n_classes, seed):
    logits, y = logits_and_labels(n_classes, seed)
    proba = torch.softmax(logits, dim=1).numpy()  # what RETFound's nn.Softmax gives, in float64
    theirs = retfound_metrics(logits, y)
    for name, their_name in RETFOUND_NAMES.items():
        assert METRICS.get(name)(y, proba) == pytest.approx(theirs[their_name], abs=1e-12), name


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_aupr_differs_from_the_positive_class_ap(seed):
    """RETFound averages both columns' AP for binary tasks; retbench's ``aupr`` is the positive column's."""
    logits, y = logits_and_labels(2, seed)
    proba = torch.softmax(logits, dim=1).numpy()
    theirs = retfound_metrics(logits, y)["average_precision"]
    assert METRICS.get("aupr_retfound")(y, proba) == pytest.approx(theirs, abs=1e-12)
    assert abs(METRICS.get("aupr")(y, proba) - theirs) > 1e-3  # the test tells the two apart


@pytest.mark.filterwarnings("ignore:No positive class found")  # scikit-learn, inside RETFound's code
def test_class_absent_from_the_test_labels_counts_zero_as_in_retfound():
    logits, y = logits_and_labels(5, 3, absent=2)
    proba = torch.softmax(logits, dim=1).numpy()
    theirs = retfound_metrics(logits, y, with_roc_auc=False)  # RETFound's roc_auc_score raises on such data
    got = METRICS.get("aupr_retfound")(y, proba)
    assert got == pytest.approx(theirs["average_precision"], abs=1e-12)
    assert got < METRICS.get("aupr")(y, proba)  # retbench's aupr averages over the classes present only
    for name in ("accuracy", "f1_macro", "kappa_unweighted"):
        assert METRICS.get(name)(y, proba) == pytest.approx(theirs[RETFOUND_NAMES[name]], abs=1e-12), name
