"""Batched logistic regression in torch.

One solve fits many independent problems at once — seeds × regularisation values × shot
counts — on a shared feature matrix: problem ``b`` sees the rows with non-zero
``weights[b]``, has its own inverse regularisation ``C[b]`` and, optionally, its own
feature standardisation. Objective per problem, as scikit-learn's ``LogisticRegression``
(L2, unpenalised intercept; multinomial for three or more classes, a single binomial
coefficient vector for two): ``C Σ_i w_i CE(x_i) + ½‖W‖²``, divided by ``C Σ_i w_i``
(which leaves the minimiser unchanged and is the scale scikit-learn's ``tol`` refers to).

Method: truncated Newton (Newton-CG, like scikit-learn's ``newton-cg``) for all problems
in lock-step. The problems share only the products with the feature matrix; each has its
own conjugate-gradient solve, its own line search and its own stopping test, and leaves
the batch once converged. Newton steps reach tight tolerances in tens of iterations even
for weak regularisation (large C), where first-order methods such as L-BFGS need
hundreds to thousands. Standardisation is an exact reparametrisation (the weights act on
per-problem z-scores; the data are never copied per problem) and the conjugate gradients
are diagonally preconditioned by each weight's curvature at zero.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch


@dataclass
class LinearModels:
    """``B`` fitted linear classifiers in the original feature space: logits = X @ W[b] + bias[b]."""

    weight: torch.Tensor  # (B, D, K)
    bias: torch.Tensor  # (B, K)
    n_iter: int
    max_grad: torch.Tensor  # (B,) largest |gradient| of each problem's normalised objective at the end
    tol: float | torch.Tensor = 1e-5  # the gradient tolerance, per problem (B,) when it depends on C
    internal: tuple[torch.Tensor, torch.Tensor] | None = None  # solver-space parameters, for warm starts

    @property
    def converged(self) -> torch.Tensor:
        """(B,) bool: problems whose gradient reached the tolerance (scikit-learn's own is 1e-4)."""
        return self.max_grad <= self.tol * 10

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) features → (B, N, K) logits."""
        b, d, k = self.weight.shape
        flat = x @ self.weight.permute(1, 0, 2).reshape(d, b * k)
        return flat.view(-1, b, k).permute(1, 0, 2) + self.bias[:, None, :]

    def predict_proba(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) → (B, N, K) class probabilities."""
        return torch.softmax(self.logits(x), dim=-1)


def balanced_weights(y: torch.Tensor, mask: torch.Tensor, n_classes: int) -> torch.Tensor:
    """scikit-learn's ``class_weight='balanced'`` per problem: n / (n_present_classes · n_k) on ``mask`` rows."""
    onehot = torch.nn.functional.one_hot(y, n_classes).to(mask.dtype)  # (N, K)
    counts = mask @ onehot  # (B, K)
    present = (counts > 0).sum(dim=1, keepdim=True).to(mask.dtype)
    per_class = torch.where(counts > 0, mask.sum(1, keepdim=True) / (present * counts.clamp(min=1)), 0.0)
    return mask * (per_class @ onehot.T)  # (B, N)


def standardizer(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-problem mean and std of ``x`` over each problem's ``mask`` rows: (B, D) each.

    Moments are taken about the mean of all masked rows, which avoids the cancellation of
    ``E[x²] - E[x]²`` for features far from zero.
    """
    n = mask.sum(1, keepdim=True).clamp(min=1)
    used = mask.sum(0) > 0
    centre = x[used].mean(0) if bool(used.any()) else x.new_zeros(x.shape[1])
    xc = x - centre
    mean_c = (mask @ xc) / n
    var = (mask @ (xc * xc)) / n - mean_c * mean_c
    return mean_c + centre, var.clamp(min=0).sqrt().clamp(min=eps)


def large_c_factor(C: torch.Tensor) -> torch.Tensor:
    """Per-problem multiplier of the gradient tolerance: ``min(1, 1 / C)``.

    The penalty's curvature, ``1 / (C Σ w)`` in the normalised objective, is all that bounds
    how far a small gradient can leave the weights from the optimum along flat directions of
    the data term (near-separable classes, more features than rows). With one tolerance for
    every C, weakly regularised problems stopped early: at C = 100 on classical eye4class
    features a gradient of 1e-5 left the validation ACA 0.0064 from the converged answer
    (scikit-learn ``newton-cg``, tol 1e-10). Scaling the tolerance by ``1 / C`` above C = 1
    costs a few Newton steps (they converge quadratically there) and keeps every C within
    0.005 of the converged ACA (``tests/test_solver.py``).
    """
    return (1.0 / C).clamp(max=1.0)


def solver_dtype(device: torch.device) -> torch.dtype:
    """The precision of a solve's objective, gradient and answers on ``device``: float64 on the CPU and on CUDA, so
    a GPU solve is the CPU's algorithm and differs from it by kernel rounding only (the Hessian products run in
    float32 on both); float32 on MPS, which has no float64. With float32 throughout (forced on the CPU, where it
    can be run without a GPU), the quick eye4class sweep (40 problems) ended up to 0.0032 ACA from the float64
    solve, a near-tie flipped at C = 13.9: more than ``gpu_check.sh``'s 1e-3 target for CUDA against CPU."""
    return torch.float32 if device.type == "mps" else torch.float64


LO_MIN_SPREAD = 1e-2
"""Single-precision Hessian products only when every standardised feature's spread on each problem's rows is at
least this fraction of its spread over all rows (else float32 rounding, scaled up by the z-score, dominates)."""
TOL = 1e-5
"""Default gradient tolerance of :func:`fit_logistic` (scikit-learn's is 1e-4), scaled per problem by :func:`large_c_factor`."""
ARMIJO = 1e-4  # sufficient-decrease constant of the line search
MAX_BACKTRACK = 40
MAX_CG = 250  # conjugate-gradient steps per Newton step (scikit-learn's newton-cg: 200)
FTOL = 64 * torch.finfo(torch.float64).eps  # relative decrease below which a problem has stalled (as scipy's)


@functools.cache
def _mkl_off_intel() -> bool:
    """True when torch's CPU products run on MKL on a CPU that is not Intel's."""
    from retbench.determinism import cpu_description

    return bool(torch.backends.mkl.is_available()) and cpu_description()["vendor"] != "GenuineIntel"


def product_orientation(device: torch.device) -> str:
    """How a solve on ``device`` multiplies by the feature matrix X: ``"rows"`` (X @ V) or ``"transposed"`` ((Vᵀ Xᵀ)ᵀ).

    Both compute the same products; they differ only in float rounding, which moves a solve's end point within its
    tolerance. With MKL on a CPU that is not Intel's, the transposed orientation: the products here are thin (X times
    a few problems' columns), and MKL's kernels for them ran 1.6-6.7x slower as X @ V than as Vᵀ Xᵀ on an AMD EPYC
    (2-12 float32 columns, 500-4,213 rows × 713), which made binary C searches 2.1x faster and four-class ones
    1.2-1.3x (``docs/benchmarks.md``). On Intel CPUs it was not measured and stays ``"rows"``: the committed
    leaderboards are an Intel Xeon's and stay byte-identical. Recorded with each result (``settings.solver``).
    """
    return "transposed" if device.type == "cpu" and _mkl_off_intel() else "rows"


class Design:
    """The feature matrix of one row set as every solve on those rows multiplies it: standardised over the rows
    (``x0 = (x - mu) / sigma``, a constant feature keeps sigma 1), with a column of ones appended (``full``, (N, D + 1)),
    transposed (``full_t``) and, made on first use, in single precision (:meth:`low`). Building it is the part of a
    solve that depends only on the rows, ~5-7% of a C sweep's time when every C rebuilt it."""

    def __init__(self, x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> None:
        xr = x[rows].to(dtype)
        self.mu = xr.mean(0)
        sigma = xr.std(0, unbiased=False)
        self.sigma = torch.where(sigma > 1e-10 * self.mu.abs(), sigma, torch.ones_like(sigma))  # constant → 1
        self.x0 = (xr - self.mu) / self.sigma  # (N, D), contiguous
        self.full = torch.cat([self.x0, torch.ones(len(rows), 1, device=x.device, dtype=dtype)], 1)  # (N, D1)
        self.full_t = self.full.T.contiguous()
        self._low: tuple[torch.Tensor, torch.Tensor] | None = None

    def low(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``full`` and ``full_t`` in single precision (made once)."""
        if self._low is None:
            self._low = (self.full.float(), self.full_t.float())
        return self._low


class Designs:
    """Keeps the :class:`Design` of the last row set of one feature matrix, for a sequence of solves on it.

    A C sweep solves the same fit sets once per C, so every solve after the first finds its rows' design here
    instead of standardising and copying the matrix again; the design is the same computation either way, so the
    solves' answers are identical bit for bit with or without it. Only one design is kept, between solves: the
    matrices a solve holds while it runs (``x0`` as well, which a solve used to free after its set-up). Pass one
    instance to :func:`fit_logistic` for all solves on the same ``x`` (the tensor itself, not a copy).
    """

    def __init__(self) -> None:
        self._key: tuple[torch.dtype, bytes] | None = None
        self._x: torch.Tensor | None = None  # the matrix the kept design was made from, compared by identity
        self._design: Design | None = None
        self.hits = 0

    def get(self, x: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype) -> Design:
        key = (dtype, rows.cpu().numpy().tobytes())
        if self._design is not None and self._x is x and self._key == key:
            self.hits += 1
            return self._design
        self._design = None  # release the old design before building the new one
        self._design, self._x, self._key = Design(x, rows, dtype), x, key
        return self._design


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    C: torch.Tensor,
    n_classes: int,
    standardize: bool = False,
    max_iter: int = 3000,
    tol: float = TOL,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    designs: Designs | None = None,
) -> LinearModels:
    """Fit ``B = len(C)`` problems; ``weights`` (B, N) are sample weights (0 = row unused).

    A problem stops when the largest absolute entry of its gradient (with respect to the
    weights of the standardised features, when ``standardize``, and the intercepts) is at
    most ``tol`` — scikit-learn's rule, whose default is a looser 1e-4 — when its objective
    stops decreasing, or after ``max_iter`` Newton steps. ``n_iter`` is the most Newton
    steps any problem took. ``init`` warm-starts from another fit's ``internal``
    parameters (same rows and standardisation). ``designs`` lets consecutive calls on the same ``x`` and rows share
    the standardised matrix (:class:`Designs`); it does not change the answers.
    """
    with torch.no_grad():
        # identical problems (a refit of several seeds on the same rows with the same C) are solved once
        key = torch.cat([C.to(weights.device, weights.dtype)[:, None], weights], 1)
        unique, inverse = torch.unique(key, dim=0, return_inverse=True)
        if len(unique) == len(key):
            return _Solve(x, y, weights, C, n_classes, standardize, designs).run(max_iter, tol, init)
        first = torch.full((len(unique),), len(key), dtype=torch.long, device=key.device)
        first.scatter_reduce_(0, inverse, torch.arange(len(key), device=key.device), "amin")
        sub_init = None if init is None else (init[0][first.to(init[0].device)], init[1][first.to(init[1].device)])
        m = _Solve(x, y, weights[first], C.to(weights.device)[first], n_classes, standardize, designs).run(
            max_iter, tol, sub_init)
        internal = None if m.internal is None else (m.internal[0][inverse], m.internal[1][inverse])
        tol_b = m.tol[inverse] if isinstance(m.tol, torch.Tensor) else m.tol
        return LinearModels(m.weight[inverse], m.bias[inverse], m.n_iter, m.max_grad[inverse], tol_b, internal)


class _Consts:
    """Per-problem constants of a subset of problems, gathered once, in the solver's layouts."""

    def __init__(self, s: _Solve, idx: torch.Tensor) -> None:
        self.idx = idx
        self.a = s.a[:, idx, None]  # (D1, n, 1): z-score scale × preconditioner
        self.shift = s.shift[:, idx, None]  # (D1, n, 1); 0 on the intercept row
        self.wt = s.wt[:, idx, None]  # (N, n, 1) normalised sample weights
        self.pen = s.pen[:, idx, None]  # (D1, n, 1) penalty curvature; 0 on the intercept row
        self.g = s.g[:, idx, None]  # (D1, n, 1) solver → natural coordinates

    def take(self, keep: torch.Tensor) -> _Consts:
        out = object.__new__(_Consts)
        out.idx, out.a, out.shift = self.idx[keep], self.a[:, keep], self.shift[:, keep]
        out.wt, out.pen, out.g = self.wt[:, keep], self.pen[:, keep], self.g[:, keep]
        return out


class _Solve:
    """One batched solve: the shared data, per-problem constants and the maps between coordinates.

    Solver coordinates of problem b: ``θ`` (D + 1, Kp), weights then intercepts. Natural
    coordinates (weights of the z-scored features, intercepts) are ``g_b · θ``, ``g_b`` the
    diagonal preconditioner. Logits are computed on the globally standardised rows with a
    column of ones appended, ``x0`` (N, D + 1): ``L = x0 @ U + e`` with ``U = a_b · θ``,
    ``a_b = g_b / scale_b`` (``scale`` 1 on the intercept row) and ``e = -shift_b · U``, the
    per-problem centring. Layouts put the feature axis first — (D + 1, problems, Kp) — so
    products need no copies.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, C: torch.Tensor, n_classes: int,
                 standardize: bool, designs: Designs | None = None) -> None:
        dtype = self.dtype = solver_dtype(x.device)
        dev = self.device = x.device
        weights, C, y = weights.to(dev, dtype), C.to(dev, dtype), y.to(dev)
        self.B, self.D = len(C), x.shape[1]
        self.C = C
        self.binary = n_classes == 2
        self.Kp = 1 if self.binary else n_classes  # one coefficient vector for two classes, as scikit-learn
        rows = (weights > 0).any(0).nonzero().squeeze(1)  # rows no problem uses never enter a product
        if len(rows) == 0:
            raise ValueError("no problem has a row with positive weight")
        # global standardisation of the used rows: well-scaled arithmetic, undone at the end
        design = designs.get(x, rows, dtype) if designs is not None else Design(x, rows, dtype)
        y, weights = y[rows], weights[:, rows]
        self.N = len(rows)
        used = (weights > 0).to(dtype)
        self.mu, self.sigma, x0 = design.mu, design.sigma, design.x0
        n_b = used.sum(1, keepdim=True).clamp(min=1)
        shift = (used @ x0) / n_b  # (B, D) per-problem means, x0 units
        var = ((used @ (x0 * x0)) / n_b - shift * shift).clamp(min=0)
        # standardize: per-problem std, clamped at standardizer's eps (raw units); otherwise centring
        # alone, an exact reparametrisation (the intercept is free)
        scale = torch.maximum(var.sqrt(), 1e-6 / self.sigma) if standardize else (1.0 / self.sigma).expand_as(var)
        wsum = weights.sum(1).clamp(min=1e-12)
        self.wt = (weights / wsum[:, None]).T.contiguous()  # (N, B)
        reg = 0.5 / (C * wsum)  # (B,) penalty reg · ‖W‖²
        curv = 0.25 if self.binary else 1.0 / n_classes  # softmax curvature at W = 0
        ones = torch.ones(self.B, 1, device=dev, dtype=dtype)
        g = 1.0 / torch.sqrt(var / scale**2 * curv + 2 * reg[:, None])  # (B, D) diagonal preconditioner
        self.g = torch.cat([g, ones / math.sqrt(curv)], 1).T.contiguous()  # (D1, B)
        self.a = torch.cat([g / scale, ones / math.sqrt(curv)], 1).T.contiguous()
        self.shift = torch.cat([shift, 0 * ones], 1).T.contiguous()
        self.pen = torch.cat([2 * reg[:, None] * g**2, 0 * ones], 1).T.contiguous()
        self.x0, self.x0t = design.full, design.full_t  # (N, D1), (D1, N)
        # Hessian-vector products in single precision: they only shape the Newton direction, while the
        # gradient and objective, which decide where the solve ends, stay in double. The products with the
        # feature matrix are 80-90% of a CPU solve and memory-bound; halving the bytes halved the solve
        # (eye4class classical features, 40 problems: 23-28 s → 12 s at load 5) at the same answers. Not when a
        # problem z-scores a feature that barely varies on its rows (few-shot supports of a handful of images):
        # there float32's rounding of the global rows, divided by that tiny spread, would swamp the direction.
        self.lo = dtype == torch.float64 and (not standardize or bool((var.sqrt() >= LO_MIN_SPREAD).all()))
        self.x0_lo, self.x0t_lo = design.low() if self.lo else (self.x0, self.x0t)
        self.transposed = product_orientation(dev) == "transposed"
        onehot = torch.nn.functional.one_hot(y, n_classes).to(dtype)[:, None, :]  # (N, 1, K)
        self.onehot = onehot[:, :, 1:] if self.binary else onehot

    # ---------------------------------------------------------------- model maps
    def logits(self, th: torch.Tensor, k: _Consts, lo: bool = False) -> torch.Tensor:
        """Solver coordinates (D1, n, Kp) → logits (N, n, Kp); ``lo``: the product in single precision."""
        D1, n, Kp = th.shape
        U = th * k.a
        L = self._times(U.reshape(D1, n * Kp), lo, transpose_x=False)
        return L.view(self.N, n, Kp).sub_((U * k.shift).sum(0))

    def back(self, R: torch.Tensor, k: _Consts, lo: bool = False) -> torch.Tensor:
        """Logit gradients R (N, n, Kp) → gradient in solver coordinates (data term)."""
        N, n, Kp = R.shape
        G = self._times(R.reshape(N, n * Kp), lo, transpose_x=True).view(-1, n, Kp)
        return G.sub_(k.shift * G[-1:]).mul_(k.a)  # the last row of G is ΣR, the intercept gradient

    def _times(self, M: torch.Tensor, lo: bool, transpose_x: bool) -> torch.Tensor:
        """x0 @ M, or x0ᵀ @ M when ``transpose_x``; in single precision when ``lo`` (and allowed), in
        :func:`product_orientation`'s orientation."""
        low = lo and self.lo
        x, xt = (self.x0_lo, self.x0t_lo) if low else (self.x0, self.x0t)
        if transpose_x:
            x, xt = xt, x
        m = M.float() if low else M
        return ((m.T @ xt).T if self.transposed else x @ m).to(M.dtype)

    def value(self, th: torch.Tensor, k: _Consts) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectives (n,) and logits."""
        L = self.logits(th, k)
        if self.binary:
            loss = torch.nn.functional.softplus(L) - self.onehot * L
        else:
            loss = torch.logsumexp(L, dim=2, keepdim=True) - (L * self.onehot).sum(2, keepdim=True)
        return (loss * k.wt).sum((0, 2)) + 0.5 * (k.pen * th * th).sum((0, 2)), L

    def probabilities(self, L: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(L) if self.binary else torch.softmax(L, dim=2)

    def gradient(self, th: torch.Tensor, prob: torch.Tensor, k: _Consts) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
        """Gradient (solver coordinates) and the natural gradient's max and L1 norms, (n,) each."""
        grad = self.back((prob - self.onehot).mul_(k.wt), k).add_(k.pen * th)
        natural = (grad / k.g).abs_()
        return grad, natural.amax((0, 2)), natural.sum((0, 2))

    def hvp(self, v: torch.Tensor, prob: torch.Tensor, k: _Consts) -> torch.Tensor:
        """Hessian-vector products at the points with probabilities ``prob``."""
        dL = self.logits(v, k, lo=True)
        if self.binary:
            R = dL.mul_(prob * (1 - prob))
        else:
            pdl = dL.mul_(prob)
            R = pdl.sub_(prob * pdl.sum(2, keepdim=True))
        return self.back(R.mul_(k.wt), k, lo=True).add_(k.pen * v)

    # ---------------------------------------------------------------- Newton-CG
    def run(self, max_iter: int, tol: float, init: tuple[torch.Tensor, torch.Tensor] | None) -> LinearModels:
        B, dev = self.B, self.device
        th = self._start(init)
        allk = _Consts(self, torch.arange(B, device=dev))
        f, L = self.value(th, allk)
        prob = self.probabilities(L)
        grad, gmax, gl1 = self.gradient(th, prob, allk)
        n_iter = torch.zeros(B, dtype=torch.long, device=dev)
        tol_b = tol * large_c_factor(self.C)
        active = gmax > tol_b
        while bool(active.any()):
            idx = active.nonzero().squeeze(1)
            k = _Consts(self, idx)
            d = self._direction(grad[:, idx], gl1[idx], prob[:, idx], k)
            ok, t, f_new = self._line_search(th[:, idx], f[idx], grad[:, idx], d, k)
            active[idx[~ok]] = False  # no decrease possible: optimal to working precision
            if not bool(ok.any()):
                break
            k, t, f_new = k.take(ok), t[ok], f_new[ok]
            idx = k.idx
            th_new = th[:, idx].add_(t[None, :, None] * d[:, ok])
            _, L_new = self.value(th_new, k)
            p_new = self.probabilities(L_new)
            g_new, gmax_new, gl1_new = self.gradient(th_new, p_new, k)
            stalled = (f[idx] - f_new) <= FTOL * torch.maximum(f[idx].abs(), f_new.abs()).clamp(min=1.0)
            th[:, idx], f[idx], prob[:, idx] = th_new, f_new, p_new
            grad[:, idx], gmax[idx], gl1[idx] = g_new, gmax_new, gl1_new
            n_iter[idx] += 1
            active[idx] = (gmax_new > tol_b[idx]) & ~stalled & (n_iter[idx] < max_iter)
        return self._models(th, int(n_iter.max()), gmax, tol_b)

    def _direction(self, grad: torch.Tensor, gl1: torch.Tensor, prob: torch.Tensor, k: _Consts) -> torch.Tensor:
        """Newton steps: conjugate gradients on H d = -g to relative residual min(0.5, √‖g‖₁) (as scikit-learn)."""
        out = torch.zeros_like(grad)
        # a compact working set: problems whose solve has finished are dropped in bulk
        pos, kc, pr = torch.arange(grad.shape[1], device=grad.device), k, prob
        r = -grad
        x, p = torch.zeros_like(r), r.clone()
        rs = (r * r).sum((0, 2))
        stop = rs.sqrt() * gl1.sqrt().clamp(max=0.5)
        live = torch.ones_like(rs, dtype=torch.bool)
        for _ in range(MAX_CG):
            hp = self.hvp(p, pr, kc)
            php = (p * hp).sum((0, 2))
            live &= php > 0  # the objective is strictly convex (up to the softmax-invariant direction)
            alpha = torch.where(live, rs / php.clamp(min=1e-30), 0.0)[None, :, None]
            x.add_(alpha * p)
            r.sub_(alpha * hp)
            rs_new = (r * r).sum((0, 2))
            live &= rs_new.sqrt() > stop
            p = r + torch.where(live, rs_new / rs.clamp(min=1e-30), 0.0)[None, :, None] * p
            rs = rs_new
            n_live = int(live.sum())
            if n_live <= 0.75 * len(pos):
                done = ~live
                out[:, pos[done]] = x[:, done]
                if n_live == 0:
                    break
                pos, kc, pr, x, r, p = pos[live], kc.take(live), pr[:, live], x[:, live], r[:, live], p[:, live]
                rs, stop, live = rs[live], stop[live], live[live]
        else:
            out[:, pos] = x
        empty = (out == 0).all(2).all(0)  # no curvature found: steepest descent
        out[:, empty] = -grad[:, empty]
        return out

    def _line_search(self, th: torch.Tensor, f: torch.Tensor, grad: torch.Tensor, d: torch.Tensor,
                     k: _Consts) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Backtracking (Armijo, quadratic interpolation) from the Newton step t = 1, per problem."""
        slope = (grad * d).sum((0, 2))
        t = torch.ones_like(f)
        f_new = torch.full_like(f, math.inf)
        ok = torch.zeros_like(f, dtype=torch.bool)
        pending = (slope < 0).nonzero().squeeze(1)
        for _ in range(MAX_BACKTRACK):
            if len(pending) == 0:
                break
            tp = t[pending]
            fp, _ = self.value(th[:, pending] + tp[None, :, None] * d[:, pending], k.take(pending))
            accept = fp <= f[pending] + ARMIJO * tp * slope[pending]
            ok[pending[accept]] = True
            f_new[pending[accept]] = fp[accept]
            rest, fr, tr = pending[~accept], fp[~accept], tp[~accept]
            sr = slope[rest]
            curv = fr - f[rest] - sr * tr
            t_q = torch.where(torch.isfinite(fr) & (curv > 0), -sr * tr * tr / (2 * curv.clamp(min=1e-300)), 0.1 * tr)
            t[rest] = torch.minimum(torch.maximum(t_q, 0.1 * tr), 0.5 * tr)
            pending = rest
        return ok, t, f_new

    def _start(self, init: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        """Zeros, or solver coordinates of ``init`` = (z-score weights (B, D, Kp), intercepts (B, Kp))."""
        B, D, Kp = self.B, self.D, self.Kp
        th = torch.zeros(D + 1, B, Kp, device=self.device, dtype=self.dtype)
        if init is None:
            return th
        W0, c0 = (t.to(self.device, self.dtype) for t in init)
        if self.binary and W0.shape[-1] == 2:  # two symmetric columns → one binomial vector
            W0, c0 = W0[:, :, 1:] - W0[:, :, :1], c0[:, 1:] - c0[:, :1]
        if W0.shape != (B, D, Kp) or c0.shape != (B, Kp):
            return th
        return torch.cat([W0.permute(1, 0, 2), c0[None]], 0) / self.g[:, :, None]

    def _models(self, th: torch.Tensor, n_iter: int, max_grad: torch.Tensor, tol: torch.Tensor) -> LinearModels:
        """Weights and intercepts in the original feature space (binary: ± half the logit, as softmax of two)."""
        U = th * self.a[:, :, None]  # (D1, B, Kp), x0 units
        bias = U[-1] - (U * self.shift[:, :, None]).sum(0)
        weight = (U[:-1] / self.sigma[:, None, None]).permute(1, 0, 2)  # (B, D, Kp), raw units
        bias = bias - torch.einsum("d,bdk->bk", self.mu, weight)
        natural = th * self.g[:, :, None]
        internal = (natural[:-1].permute(1, 0, 2).contiguous(), natural[-1].clone())
        if self.binary:
            weight = torch.cat([-weight, weight], 2) / 2
            bias = torch.cat([-bias, bias], 1) / 2
        return LinearModels(weight.contiguous(), bias, n_iter, max_grad, tol, internal)
