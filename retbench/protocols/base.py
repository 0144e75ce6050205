"""The protocol contract: what every protocol is, receives and returns; and the shared probe machinery.

One evaluation track serves every kind of task: the runner builds one :class:`Context`, calls
the protocol's :meth:`~EvaluationProtocol.run` and summarises the :class:`ProtocolOutput`
it gets back the same way for classification, retrieval and VQA protocols. Entries of the
protocol registry (built in, or from the ``retbench.protocols`` entry-point group) must
satisfy :class:`EvaluationProtocol`; the registry refuses those that do not.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

from retbench.allocator import tune_malloc
from retbench.data.examples import Examples
from retbench.errors import RetbenchError
from retbench.metrics import compute_metrics
from retbench.progress import progress_bar
from retbench.registry import Contract
from retbench.resampling import Interval, RunPredictions
from retbench.solver import Designs, balanced_weights, fit_logistic, product_orientation, solver_dtype
from retbench.timing import timed

if TYPE_CHECKING:
    from pathlib import Path

    from retbench.adapters import Adapter, ZeroShotSetup
    from retbench.preprocess import Preprocess
    from retbench.spec import TaskSpec

TASK_KINDS = ("classification", "retrieval", "vqa")
"""The kinds of task a protocol may evaluate (its ``kind``)."""

RUN_OPTIONS = frozenset({"shots", "seeds"})
"""The run options (``--shots``, ``--seeds``) a protocol may take (its ``run_options``)."""


@dataclass
class Context:
    """Inputs of one protocol run, for every kind of task; feature getters are lazy (extracted or read
    from the cache on first use), so a protocol extracts only what it uses.

    ``examples`` are the task's images and ``splits`` the indices of the evaluated items per split:
    images (classification, VQA) or pairs (retrieval). The getters return one row per image, or,
    called with an image side's name (retrieval), one row per pair of that side:
    ``features(side=None)`` the probe features, ``joint_features(side=None)`` the image-text
    embeddings (None: the model has no text tower), ``valid(side=None)`` which rows have features
    (unreadable images have none). ``encode_text`` embeds texts (None without a text tower);
    ``zero_shot`` is the model's zero-shot convention for class prompts (classification tasks of
    image-text models); ``data`` the task's own structure: the pairs (:class:`~retbench.data.pairs.PairData`)
    of a retrieval task, the questions (:class:`~retbench.data.questions.QuestionData`) of a VQA task.

    For protocols that train the network (``finetune*``): ``model`` is the adapter (never to be modified: train a
    copy), ``preprocess`` its preprocessing on this task's images, ``artifacts`` a folder beside the result file
    where the protocol may keep files (checkpoints, plots), and ``skip_bad_images`` the run's choice about
    unreadable images. Feature-based protocols ignore them.
    """

    spec: TaskSpec
    examples: Examples
    splits: dict[str, np.ndarray]
    features: Callable[..., np.ndarray]
    joint_features: Callable[..., np.ndarray] | None
    encode_text: Callable[[list[str]], np.ndarray] | None
    device: torch.device
    valid: Callable[..., np.ndarray]
    zero_shot: ZeroShotSetup | None = None
    data: Any = None
    model: Adapter | None = None
    preprocess: Preprocess | None = None
    artifacts: Path | None = None
    skip_bad_images: bool = False

    @property
    def has_text(self) -> bool:
        """Whether the model has a text tower (and an image-text space)."""
        return self.encode_text is not None

    def split(self, name: str) -> np.ndarray:
        """Indices of a split, without rows whose image could not be read."""
        idx = self.splits[name]
        return idx[self.valid()[idx]]


@dataclass
class Run:
    """One fitted-and-evaluated instance: a seed (and shot count), its metrics and what they came from.

    ``extra`` holds JSON-ready records stored with the run after its metrics (the chosen C, a
    retrieval direction's ranks, a VQA question's predictions). ``predictions`` are the test
    predictions the bootstrap CIs resample: a classification run's are stored with it
    (``predictions`` in the result), a run of parts (VQA: one classification per question type)
    keeps its parts' in ``extra``; None where the protocol brings its own interval (retrieval).
    """

    seed: int
    metrics: dict[str, Any]
    k: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    predictions: RunPredictions | None = None

    @property
    def indices(self) -> np.ndarray:
        """Test example indices the run scored (runs with predictions)."""
        assert self.predictions is not None
        return self.predictions.index

    @property
    def y_true(self) -> np.ndarray:
        """Their labels."""
        assert self.predictions is not None
        return self.predictions.y

    @property
    def proba(self) -> np.ndarray:
        """Their class probabilities."""
        assert self.predictions is not None
        return self.predictions.proba

    def to_dict(self, with_predictions: bool = True) -> dict[str, Any]:
        """JSON-ready; stored predictions let metrics be recomputed later."""
        d = {"seed": self.seed, "k": self.k, "metrics": self.metrics, **self.extra}
        if with_predictions and self.predictions is not None and not self.predictions.parts:
            d["predictions"] = {
                "index": self.indices.tolist(),
                "y_true": self.y_true.tolist(),
                "proba": np.asarray(self.proba, dtype=np.float64).tolist(),  # full precision: CIs resample these
            }
        return d


@dataclass
class ProtocolOutput:
    """What every protocol returns: its runs and the settings it actually used, and optionally

    ``n_test``, how many test items it scored (default: the readable images of the task's test
    split); ``notes``, further fields for the result's data summary; ``interval``, the 95% CI of
    a headline metric by name, for runs without predictions (default: the cluster bootstrap of
    :mod:`retbench.resampling` over the runs' predictions).
    """

    runs: list[Run]
    settings: dict[str, Any]
    n_test: int | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    interval: Callable[[str], Interval | None] | None = None


@runtime_checkable
class EvaluationProtocol(Protocol):
    """The contract of an evaluation protocol (every entry of :data:`retbench.protocols.PROTOCOLS`).

    - ``name``: the registry name, stored in every result and naming its file;
    - ``description``: one line for ``retbench list protocols`` and the result;
    - ``kind``: the kind of task it evaluates, one of :data:`TASK_KINDS` (a task lists only
      protocols of its own kind);
    - ``run_options``: the run options (of :data:`RUN_OPTIONS`) that change what it computes;
    - ``needs_text(spec)``: whether it scores texts on task ``spec`` (models without a text
      tower are then skipped with the reason);
    - ``metric_names(spec)``: the headline metrics every run reports on ``spec`` (runs may add
      others, e.g. per retrieval direction); these get the 95% CIs;
    - ``with_options(shots, seeds)``: a copy with the run's ``--shots`` and ``--seeds`` (a count)
      applied where they are among its ``run_options`` (itself when nothing applies);
    - ``run(ctx)``: evaluate on a :class:`Context`, returning a :class:`ProtocolOutput`.
    """

    name: str
    description: str
    kind: str
    run_options: frozenset[str]

    def needs_text(self, spec: TaskSpec) -> bool:
        """Whether the protocol scores texts on ``spec``."""
        ...

    def metric_names(self, spec: TaskSpec) -> tuple[str, ...]:
        """The headline metrics of every run on ``spec``."""
        ...

    def with_options(self, shots: tuple[int, ...] | None = None, seeds: int | None = None) -> EvaluationProtocol:
        """The protocol with the run's options applied."""
        ...

    def run(self, ctx: Context) -> ProtocolOutput:
        """Evaluate on ``ctx``."""
        ...


def _kind_and_options(protocol: Any) -> str | None:
    """What is wrong with a protocol's ``kind`` or ``run_options`` (None: nothing)."""
    if protocol.kind not in TASK_KINDS:
        return f"its kind {protocol.kind!r} is none of {', '.join(TASK_KINDS)}"
    options = protocol.run_options
    if not isinstance(options, (set, frozenset)) or not options <= RUN_OPTIONS:
        return f"its run_options {options!r} are not a set of {', '.join(sorted(RUN_OPTIONS))}"
    return None


PROTOCOL_CONTRACT = Contract.of_protocol(EvaluationProtocol, check=_kind_and_options)
"""What the protocol registry holds every entry to (built in, or from the ``retbench.protocols`` entry points)."""


def part_means(per_part: dict[str, dict[str, float]], names: tuple[str, ...]) -> dict[str, float]:
    """Flat run metrics of a run of parts (retrieval directions, VQA question types): ``<part>/<name>``
    for every part, and ``<name>`` = their unweighted mean (the headline)."""
    out: dict[str, float] = {}
    for name in names:
        values = [per_part[p][name] for p in per_part]
        out[name] = float(np.nanmean(values)) if values and not np.isnan(values).all() else float("nan")
    for part, metrics in per_part.items():
        for name in names:
            out[f"{part}/{name}"] = float(metrics[name])
    return out


def evaluate_runs(metrics: tuple[str, ...], runs_raw: list[tuple], y: np.ndarray) -> list[Run]:
    """Build :class:`Run` objects computing ``metrics`` from (seed, k, indices, proba, extra) tuples."""
    out = []
    for seed, k, idx, proba, extra in runs_raw:
        predictions = RunPredictions((seed, k or 0), np.asarray(idx), y[idx], np.asarray(proba))
        out.append(Run(seed, compute_metrics(metrics, y[idx], proba), k, extra, predictions))
    return out


@dataclass
class Probe:
    """One logistic-regression problem: fit rows, inverse regularisation, rows to predict."""

    fit: np.ndarray
    C: float
    predict: np.ndarray


SOLVERS = ("auto", "torch", "sklearn-lbfgs")
"""Probe solvers :func:`solve_probes` takes: ``auto`` (:func:`choose_solver`), the batched torch Newton-CG of
:mod:`retbench.solver`, or a loop of scikit-learn ``LogisticRegression(solver="lbfgs")`` fits."""

def choose_solver(device: torch.device, n_problems: int, n_rows: int, n_features: int, n_classes: int) -> str:
    """The probe solver ``auto`` runs for ``n_problems`` on ``n_rows`` × ``n_features`` with ``n_classes``.

    Chosen by measurement, at equal answers (every problem's ACA within 0.005 of scikit-learn
    ``newton-cg`` run to tol 1e-10), one thread each, ``benchmarks/solver_sizes.py`` on classical
    eye4class features (figures in docs/benchmarks.md). On CPU, scikit-learn time ÷
    torch time for the fastest scikit-learn way that reached equal ACA: the 4-class C search
    (5 seeds × 8 C, ~1,300 × 712) 3.8× slower; on 64 features 1.9× (lbfgs path; newton-cholesky
    2.5×); on 150 rows 0.9×; binary 0.78×; a 5-problem refit 0.77×; the few-shot sweep (50 problems of
    4-64 rows, C = 1) ~0.8×, where torch also leaves one 64-row problem 0.0065 from the converged ACA
    (as before this change; lbfgs to tol 1e-6 reached 0.0032). Where scikit-learn led, it led by
    seconds, within the run-to-run spread of the shared 2-core machine it was measured on (load
    4-8), and switching would move stored results by up to 0.005; so ``auto`` keeps the batched
    torch solver on CPU as on a GPU (the same algorithm and precisions there, :func:`retbench.solver.solver_dtype`;
    not measured here). ``sklearn-lbfgs`` stays selectable.
    """
    return "torch"


def solve_probes(
    x: np.ndarray, y: np.ndarray, n_classes: int, probes: list[Probe], device: torch.device,
    balanced: bool, standardize: bool, stats: dict[str, Any] | None = None, solver: str = "auto",
) -> list[np.ndarray]:
    """Fit all ``probes``; return each one's probabilities on its predict rows.

    ``solver`` (one of :data:`SOLVERS`) picks the method; ``auto`` asks :func:`choose_solver`. Both
    solve the same objective (scikit-learn's, class-balanced when ``balanced``, on features
    z-scored with the fit rows' statistics when ``standardize``) to the same gradient tolerance,
    1e-5 × min(1, 1 / C) (:func:`retbench.solver.large_c_factor`). Problems are solved in batches
    of equal C, in increasing C; a problem whose fit rows were already fitted at a smaller C starts
    from that solution (a warm-started regularisation path: strongly regularised problems converge
    fast and hand on a good start — a cold solve of weak regularisation on separable features can
    take thousands of iterations). ``stats``, when given, receives the solver that ran, its
    iteration count and how many problems did not converge.
    """
    if not probes:
        return []
    if solver not in SOLVERS:
        raise ValueError(f"unknown probe solver {solver!r} (one of {', '.join(SOLVERS)})")
    if solver == "auto":
        n_rows = len(np.unique(np.concatenate([np.asarray(p.fit) for p in probes])))
        solver = choose_solver(device, len(probes), n_rows, x.shape[1], n_classes)
    if solver != "torch" and any(len(np.unique(y[np.asarray(p.fit)])) < n_classes for p in probes):
        solver = "torch"  # scikit-learn fits only the classes present; the torch solver keeps every column
    if stats is not None:
        stats["backend"] = solver
    with timed("probe_fit_s"):
        if solver == "sklearn-lbfgs":
            return _solve_sklearn(x, y, n_classes, probes, balanced, standardize, stats)
        return _solve_torch(x, y, n_classes, probes, device, balanced, standardize, stats)


def _solve_torch(x: np.ndarray, y: np.ndarray, n_classes: int, probes: list[Probe], device: torch.device,
                 balanced: bool, standardize: bool, stats: dict[str, Any] | None) -> list[np.ndarray]:
    """The probes with the batched torch solver, in batches of equal C along warm-started C paths."""
    xt = torch.as_tensor(x, device=device)
    yt = torch.as_tensor(y, device=device)
    out: list[np.ndarray | None] = [None] * len(probes)
    solved: dict[bytes, tuple[torch.Tensor, torch.Tensor]] = {}  # fit rows → latest solver-space solution
    designs = Designs()  # every C's batch uses the same rows: standardise them once
    if device.type == "cpu":
        tune_malloc()  # the solve's 0.1-1 MB temporaries reused from the heap, not mapped anew (retbench.allocator)
    threads = solver_threads()
    if stats is not None:
        stats["threads"] = threads if device.type == "cpu" else None
        stats["products"] = product_orientation(device)  # the orientation of the products moves float rounding
    with progress_bar(f"fit {len(probes)} probes", len(probes)) as advance, cpu_threads(threads, device):
        for batch in _batches_by_c(probes):
            keys = [np.asarray(probes[i].fit).tobytes() for i in batch]
            models = _fit_batch(xt, yt, n_classes, [probes[i] for i in batch], balanced, standardize,
                                _warm_start(keys, solved), designs)
            _record(stats, models, len(batch))
            for b, (i, key) in enumerate(zip(batch, keys)):
                solved[key] = (models.internal[0][b], models.internal[1][b])
                rows = torch.as_tensor(probes[i].predict, device=device)
                logits = xt[rows].to(models.weight.dtype) @ models.weight[b] + models.bias[b]
                out[i] = torch.softmax(logits, dim=-1).cpu().numpy()
            advance(len(batch))
    return cast("list[np.ndarray]", out)  # the batches cover every probe, so no None is left


def _solve_sklearn(x: np.ndarray, y: np.ndarray, n_classes: int, probes: list[Probe], balanced: bool,
                   standardize: bool, stats: dict[str, Any] | None) -> list[np.ndarray]:
    """The probes as a loop of scikit-learn lbfgs fits (one BLAS thread), warm-started along each fit set's C path."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from threadpoolctl import threadpool_limits

    from retbench.solver import TOL

    out: list[np.ndarray | None] = [None] * len(probes)
    fitted: dict[bytes, Any] = {}  # fit rows → (mean, scale, the last model fitted on them)
    iterations = unconverged = 0
    with progress_bar(f"fit {len(probes)} probes", len(probes)) as advance, threadpool_limits(1):
        for batch in _batches_by_c(probes):
            for i in batch:
                p = probes[i]
                fit, key = np.asarray(p.fit), np.asarray(p.fit).tobytes()
                if key not in fitted:
                    xf = x[fit].astype(np.float64)
                    mean = xf.mean(0) if standardize else np.zeros(x.shape[1])
                    scale = np.maximum(xf.std(0), 1e-6) if standardize else np.ones(x.shape[1])
                    fitted[key] = [mean, scale, None]
                mean, scale, previous = fitted[key]
                clf = previous if previous is not None else LogisticRegression(
                    class_weight="balanced" if balanced else None, warm_start=True)
                clf.set_params(C=p.C, tol=TOL * min(1.0, 1.0 / p.C), max_iter=10000)  # as large_c_factor
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", ConvergenceWarning)
                    clf.fit((x[fit] - mean) / scale, y[fit])
                fitted[key][2] = clf
                iterations += int(np.max(clf.n_iter_))
                unconverged += any(issubclass(w.category, ConvergenceWarning) for w in caught)
                proba = np.zeros((len(p.predict), n_classes))
                proba[:, clf.classes_] = clf.predict_proba((x[np.asarray(p.predict)] - mean) / scale)
                out[i] = proba
            advance(len(batch))
    if stats is not None:
        stats["solver_iterations"] = stats.get("solver_iterations", 0) + iterations
        stats["not_converged"] = stats.get("not_converged", 0) + unconverged
        stats["problems"] = stats.get("problems", 0) + len(probes)
    return cast("list[np.ndarray]", out)  # every probe was fitted, so no None is left


SOLVER_THREADS_ENV = "RETBENCH_SOLVER_THREADS"


def solver_threads() -> int:
    """Torch threads of a batched probe solve on CPU: ``$RETBENCH_SOLVER_THREADS``, default 1.

    One thread is the default because it is robust: on 2 cores, 2 threads solved the eye4class
    C search 1.5-1.8× faster when the machine was otherwise idle but 1.6-2.2× *slower* than one
    thread while another process kept one core busy (OpenMP threads spin waiting for each other;
    ``benchmarks/run_benchmarks.py --only b --contended``, docs/benchmarks.md). Give a job with
    dedicated cores (a Slurm task's ``--cpus-per-task``) more. With the ``rows`` product orientation
    the answers did not change with the thread count on the problems measured (the products split
    their output, not their sums); with the ``transposed`` one (MKL off Intel,
    :func:`retbench.solver.product_orientation`) they moved by rounding (3.6e-6 in probability on a
    2,400-row test problem; none on the eye4class sweep). The thread count is recorded with each result.
    """
    raw = os.environ.get(SOLVER_THREADS_ENV, "1")
    if not raw.isdigit() or int(raw) < 1:
        raise RetbenchError(f"${SOLVER_THREADS_ENV} must be a positive integer, not {raw!r}")
    return int(raw)


@contextmanager
def cpu_threads(n: int, device: torch.device) -> Iterator[None]:
    """Limit torch's intra-op threads on CPU to ``n`` (at most what torch already uses) for the block."""
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
               standardize: bool, init: Any, designs: Designs | None = None) -> Any:
    dtype = solver_dtype(xt.device)
    mask = torch.zeros(len(probes), len(xt), device=xt.device, dtype=dtype)
    for b, p in enumerate(probes):
        mask[b, torch.as_tensor(p.fit, device=xt.device)] = 1.0
    weights = balanced_weights(yt, mask, n_classes) if balanced else mask
    C = torch.tensor([p.C for p in probes], device=xt.device)
    return fit_logistic(xt, yt, weights, C, n_classes, standardize=standardize, init=init, designs=designs)


def _record(stats: dict[str, Any] | None, models: Any, n: int) -> None:
    if stats is None:
        return
    stats["solver_iterations"] = stats.get("solver_iterations", 0) + models.n_iter
    stats["not_converged"] = stats.get("not_converged", 0) + int((~models.converged).sum())
    stats["problems"] = stats.get("problems", 0) + n
