"""What every protocol receives and returns, and the shared probe machinery."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from retbench.data.examples import Examples
from retbench.metrics import METRICS, compute_metrics
from retbench.progress import progress_bar
from retbench.solver import balanced_weights, fit_logistic
from retbench.spec import TaskSpec

if TYPE_CHECKING:
    from retbench.adapters import ZeroShotSetup


@dataclass
class Context:
    """Inputs of one protocol run; feature getters are lazy so protocols extract only what they use."""

    spec: TaskSpec
    examples: Examples
    splits: dict[str, np.ndarray]
    features: Callable[[], np.ndarray]
    joint_features: Callable[[], np.ndarray] | None
    encode_text: Callable[[list[str]], np.ndarray] | None
    device: torch.device
    valid: Callable[[], np.ndarray]
    zero_shot: ZeroShotSetup | None = None

    def split(self, name: str) -> np.ndarray:
        """Indices of a split, without rows whose image could not be read."""
        idx = self.splits[name]
        return idx[self.valid()[idx]]


@dataclass
class Run:
    """One fitted-and-evaluated instance: a seed (and shot count), its test predictions and metrics."""

    seed: int
    indices: np.ndarray
    y_true: np.ndarray
    proba: np.ndarray
    metrics: dict[str, Any]
    k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, with_predictions: bool = True) -> dict[str, Any]:
        """JSON-ready; predictions let metrics be recomputed later."""
        d = {"seed": self.seed, "k": self.k, "metrics": self.metrics, **self.extra}
        if with_predictions:
            d["predictions"] = {
                "index": self.indices.tolist(),
                "y_true": self.y_true.tolist(),
                "proba": np.asarray(self.proba, dtype=np.float64).tolist(),  # full precision: CIs resample these
            }
        return d


@dataclass
class ProtocolOutput:
    """All runs of a protocol plus the settings it actually used."""

    runs: list[Run]
    settings: dict[str, Any]


def evaluate_runs(metrics: tuple[str, ...], runs_raw: list[tuple], y: np.ndarray) -> list[Run]:
    """Build :class:`Run` objects computing ``metrics`` from (seed, k, indices, proba, extra) tuples."""
    out = []
    for seed, k, idx, proba, extra in runs_raw:
        out.append(Run(seed, idx, y[idx], proba, compute_metrics(metrics, y[idx], proba), k, extra))
    return out


@dataclass(frozen=True)
class Resampling:
    """How a task's test images group into resampling units: ``cluster_of`` maps an example index to
    its unit (patient), ``unit`` names it; ``seed`` is the task's fixed bootstrap seed."""

    cluster_of: dict[int, Any] | None
    unit: str
    seed: int

    @classmethod
    def of(cls, spec: TaskSpec, examples: Examples) -> Resampling:
        """Patients (the split groups) where the task splits by patient and ids exist, else images."""
        from retbench.resampling import task_seed

        patients = list(examples.patients)
        if spec.splits.by_patient and len(set(patients)) < len(patients):
            return cls(dict(enumerate(patients)), "patient", task_seed(spec.name))
        return cls(None, "image", task_seed(spec.name))

    def to_dict(self, index: Any) -> dict[str, Any]:
        """The units of the test images ``index`` (every image the runs scored), coded in order of first appearance."""
        index = sorted({int(i) for i in index})
        codes: dict[Any, int] = {}
        cluster = [codes.setdefault(self.cluster_of[i] if self.cluster_of else i, len(codes)) for i in index]
        return {"unit": self.unit, "seed": self.seed, "n_units": len(codes), "index": index, "cluster": cluster}


def summarize(runs: list[Run], metrics: tuple[str, ...], primary: str, resampling: Resampling) -> dict[str, Any]:
    """Mean over runs, std between runs and a 95% CI per scalar metric.

    The CI is the bootstrap over test units × runs of :mod:`retbench.resampling` (the leaderboard's
    computation, so stored and published intervals agree); metrics without a vectorised weighted
    form get it only when primary (resampling them by repeated indices is slow).
    """
    from retbench import resampling as rs

    summary: dict[str, Any] = {}
    preds = [rs.RunPredictions((r.seed, r.k or 0), np.asarray(r.indices), np.asarray(r.y_true), np.asarray(r.proba))
             for r in runs]
    for name in metrics:
        m = METRICS.get(name)
        values = [r.metrics[name] for r in runs]
        if m.per_class:
            summary[name] = {"mean": np.nanmean(np.array(values, dtype=float), axis=0).tolist()}
            continue
        arr = np.array(values, dtype=float)
        entry = {"mean": float(np.nanmean(arr)), "std": float(np.nanstd(arr, ddof=1)) if len(arr) > 1 else 0.0,
                 "n": int(len(arr)), "values": arr.tolist()}
        if m.weighted is not None or name == primary:
            interval = rs.bootstrap(m, preds, resampling.cluster_of, resampling.unit, seed=resampling.seed)
            if np.isfinite(interval.low) and np.isfinite(interval.high):
                entry["ci95"] = [interval.low, interval.high]
                entry["ci_method"] = interval.describe()
        summary[name] = entry
    return summary


@dataclass
class Probe:
    """One logistic-regression problem: fit rows, inverse regularisation, rows to predict."""

    fit: np.ndarray
    C: float
    predict: np.ndarray


def solve_probes(
    x: np.ndarray, y: np.ndarray, n_classes: int, probes: list[Probe], device: torch.device,
    balanced: bool, standardize: bool, stats: dict[str, Any] | None = None,
) -> list[np.ndarray]:
    """Fit all ``probes`` batched; return each one's probabilities on its predict rows.

    Problems are solved in batches of equal C, in increasing C; a problem whose fit rows were
    already fitted at a smaller C starts from that solution (a warm-started regularisation path:
    strongly regularised problems converge fast and hand on a good start — a cold solve of weak
    regularisation on separable features can take thousands of iterations). ``stats``, when
    given, receives the solver's iteration count and how many problems did not converge.
    """
    if not probes:
        return []
    xt = torch.as_tensor(x, device=device)
    yt = torch.as_tensor(y, device=device)
    out: list[np.ndarray | None] = [None] * len(probes)
    solved: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # fit rows → latest solver-space solution
    with progress_bar(f"fit {len(probes)} probes", len(probes)) as advance, cpu_threads(1, device):
        for batch in _batches_by_c(probes):
            keys = [np.asarray(probes[i].fit).tobytes() for i in batch]
            models = _fit_batch(xt, yt, n_classes, [probes[i] for i in batch], balanced, standardize,
                                _warm_start(keys, solved))
            _record(stats, models, len(batch))
            for b, (i, key) in enumerate(zip(batch, keys)):
                solved[key] = (models.internal[0][b], models.internal[1][b])
                rows = torch.as_tensor(probes[i].predict, device=device)
                logits = xt[rows].to(models.weight.dtype) @ models.weight[b] + models.bias[b]
                out[i] = torch.softmax(logits, dim=-1).cpu().numpy()
            advance(len(batch))
    return out


@contextmanager
def cpu_threads(n: int, device: torch.device) -> Iterator[None]:
    """Limit torch's intra-op threads on CPU (L-BFGS is many small ops: on 2 cores, two OpenMP
    threads made the solve 6x slower than one, and far worse when another process is busy)."""
    if device.type != "cpu":
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(min(n, previous))
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _batches_by_c(probes: list[Probe]) -> list[list[int]]:
    """Probe indices grouped by C, in increasing C."""
    by_c: dict[float, list[int]] = {}
    for i, p in enumerate(probes):
        by_c.setdefault(p.C, []).append(i)
    return [by_c[c] for c in sorted(by_c)]


def _warm_start(keys: list[bytes], solved: dict[bytes, tuple[torch.Tensor, torch.Tensor]]) -> Any:
    """Stacked earlier solutions for the batch (zeros where a fit set is new), or None if all are new."""
    if not any(k in solved for k in keys):
        return None
    template = next(solved[k] for k in keys if k in solved)
    ws = [solved[k][0] if k in solved else torch.zeros_like(template[0]) for k in keys]
    cs = [solved[k][1] if k in solved else torch.zeros_like(template[1]) for k in keys]
    return torch.stack(ws), torch.stack(cs)


def _fit_batch(xt: torch.Tensor, yt: torch.Tensor, n_classes: int, probes: list[Probe], balanced: bool,
               standardize: bool, init: Any) -> Any:
    dtype = torch.float64 if xt.device.type == "cpu" else torch.float32
    mask = torch.zeros(len(probes), len(xt), device=xt.device, dtype=dtype)
    for b, p in enumerate(probes):
        mask[b, torch.as_tensor(p.fit, device=xt.device)] = 1.0
    weights = balanced_weights(yt, mask, n_classes) if balanced else mask
    C = torch.tensor([p.C for p in probes], device=xt.device)
    return fit_logistic(xt, yt, weights, C, n_classes, standardize=standardize, init=init)


def _record(stats: dict[str, Any] | None, models: Any, n: int) -> None:
    if stats is None:
        return
    stats["solver_iterations"] = stats.get("solver_iterations", 0) + models.n_iter
    stats["not_converged"] = stats.get("not_converged", 0) + int((~models.converged).sum())
    stats["problems"] = stats.get("problems", 0) + n
