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
    tol: float = 1e-5
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


ARMIJO = 1e-4  # sufficient-decrease constant of the line search
MAX_BACKTRACK = 40
MAX_CG = 250  # conjugate-gradient steps per Newton step (scikit-learn's newton-cg: 200)
FTOL = 64 * torch.finfo(torch.float64).eps  # relative decrease below which a problem has stalled (as scipy's)


def fit_logistic(
    x: torch.Tensor,
    y: torch.Tensor,
    weights: torch.Tensor,
    C: torch.Tensor,
    n_classes: int,
    standardize: bool = False,
    max_iter: int = 3000,
    tol: float = 1e-5,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> LinearModels:
    """Fit ``B = len(C)`` problems; ``weights`` (B, N) are sample weights (0 = row unused).

    A problem stops when the largest absolute entry of its gradient (with respect to the
    weights of the standardised features, when ``standardize``, and the intercepts) is at
    most ``tol`` — scikit-learn's rule, whose default is a looser 1e-4 — when its objective
    stops decreasing, or after ``max_iter`` Newton steps. ``n_iter`` is the most Newton
    steps any problem took. ``init`` warm-starts from another fit's ``internal``
    parameters (same rows and standardisation).
    """
    with torch.no_grad():
        return _Solve(x, y, weights, C, n_classes, standardize).run(max_iter, tol, init)


class _Consts:
    """Per-problem constants of a subset of problems, gathered once, in the solver's layouts."""

    def __init__(self, s: _Solve, idx: torch.Tensor, dtype: torch.dtype) -> None:
        self.idx = idx
        self.a = s.a[:, idx, None].to(dtype)  # (D, n, 1): z-score scale × preconditioner
        self.shift = s.shift[:, idx, None].to(dtype)  # (D, n, 1)
        self.wt = s.wt[:, idx, None].to(dtype)  # (N, n, 1)
        self.pen = s.pen[:, idx, None].to(dtype)  # (D, n, 1): penalty curvature in solver coordinates
        self.reg = s.reg[idx]

    def take(self, keep: torch.Tensor) -> _Consts:
        out = object.__new__(_Consts)
        out.idx = self.idx[keep]
        out.a, out.shift, out.wt = self.a[:, keep], self.shift[:, keep], self.wt[:, keep]
        out.pen, out.reg = self.pen[:, keep], self.reg[keep]
        return out


class _Solve:
    """One batched solve: the shared data, per-problem constants and the maps between coordinates.

    Solver coordinates of problem b: ``Z`` (D, Kp) and ``c`` (Kp). The model weights of the
    z-scored features are ``W = g_b · Z`` (``g_b`` the diagonal preconditioner), intercepts
    ``hc · c``. Logits are computed on the globally standardised rows ``x0`` with
    ``U = a_b · Z``, ``a_b = g_b / scale_b``, and ``e = hc · c - shift_b · U``.
    Layouts put the feature axis first — (D, problems, Kp) — so products need no copies.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, weights: torch.Tensor, C: torch.Tensor, n_classes: int,
                 standardize: bool) -> None:
        dtype = self.dtype = torch.float64 if x.device.type == "cpu" else torch.float32
        dev = self.device = x.device
        weights, C, y = weights.to(dev, dtype), C.to(dev, dtype), y.to(dev)
        self.B, self.D = len(C), x.shape[1]
        self.binary = n_classes == 2
        self.Kp = 1 if self.binary else n_classes  # one coefficient vector for two classes, as scikit-learn
        rows = (weights > 0).any(0).nonzero().squeeze(1)  # rows no problem uses never enter a product
        if len(rows) == 0:
            raise ValueError("no problem has a row with positive weight")
        x, y, weights = x[rows].to(dtype), y[rows], weights[:, rows]
        self.N = len(rows)
        used = (weights > 0).to(dtype)
        # global standardisation of the used rows: well-scaled arithmetic, undone at the end
        self.mu = x.mean(0)
        sigma = x.std(0, unbiased=False)
        self.sigma = torch.where(sigma > 1e-10 * self.mu.abs(), sigma, torch.ones_like(sigma))  # constant → 1
        self.x0 = (x - self.mu) / self.sigma
        self.x0t = self.x0.T.contiguous()
        n_b = used.sum(1, keepdim=True).clamp(min=1)
        shift = (used @ self.x0) / n_b  # (B, D) per-problem means, x0 units
        var = ((used @ (self.x0 * self.x0)) / n_b - shift * shift).clamp(min=0)
        # standardize: per-problem std, clamped at standardizer's eps (raw units); otherwise centring
        # alone, an exact reparametrisation (the intercept is free)
        scale = torch.maximum(var.sqrt(), 1e-6 / self.sigma) if standardize else (1.0 / self.sigma).expand_as(var)
        wsum = weights.sum(1).clamp(min=1e-12)
        self.wt = (weights / wsum[:, None]).T.contiguous()  # (N, B) normalised sample weights
        self.reg = 0.5 / (C * wsum)  # (B,) penalty reg · ‖W‖²
        curv = 0.25 if self.binary else 1.0 / n_classes  # softmax curvature at W = 0
        g = 1.0 / torch.sqrt(var / scale**2 * curv + 2 * self.reg[:, None])  # (B, D) diagonal preconditioner
        self.g = g.T.contiguous()  # (D, B)
        self.a = (g / scale).T.contiguous()
        self.shift = shift.T.contiguous()
        self.pen = 2 * self.reg[None, :] * self.g**2  # (D, B)
        self.hc = 1.0 / math.sqrt(curv)
        self.y = y
        self.onehot = torch.nn.functional.one_hot(y, n_classes).to(dtype)[:, None, :]  # (N, 1, K)
        if self.binary:
            self.onehot = self.onehot[:, :, 1:]
        # Hessian-vector products tolerate single precision (they only shape the Newton step)
        self.hdtype = torch.float32
        self.x0h, self.x0th = self.x0.to(self.hdtype), self.x0t.to(self.hdtype)

    # ---------------------------------------------------------------- model maps
    def logits(self, Z: torch.Tensor, c: torch.Tensor, k: _Consts) -> torch.Tensor:
        """Solver coordinates → logits (N, n, Kp) (in the dtype of ``Z``)."""
        D, n, Kp = Z.shape
        U = Z * k.a
        e = c * self.hc - (U * k.shift).sum(0)
        x0 = self.x0 if Z.dtype == self.dtype else self.x0h
        return (x0 @ U.reshape(D, n * Kp)).view(self.N, n, Kp).add_(e)

    def back(self, R: torch.Tensor, k: _Consts) -> tuple[torch.Tensor, torch.Tensor]:
        """Logit gradients R (N, n, Kp) → gradients in solver coordinates (data term only)."""
        N, n, Kp = R.shape
        dE = R.sum(0)
        x0t = self.x0t if R.dtype == self.dtype else self.x0th
        G = (x0t @ R.reshape(N, n * Kp)).view(self.D, n, Kp)
        return (G - k.shift * dE).mul_(k.a), dE * self.hc

    def value(self, Z: torch.Tensor, c: torch.Tensor, k: _Consts) -> tuple[torch.Tensor, torch.Tensor]:
        """Objectives (n,) and logits."""
        L = self.logits(Z, c, k)
        if self.binary:
            loss = torch.nn.functional.softplus(L) - self.onehot * L
        else:
            loss = torch.logsumexp(L, dim=2, keepdim=True) - (L * self.onehot).sum(2, keepdim=True)
        f = (loss * k.wt).sum((0, 2)) + 0.5 * (k.pen * Z * Z).sum((0, 2))
        return f, L

    def probabilities(self, L: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(L) if self.binary else torch.softmax(L, dim=2)

    def gradient(self, Z: torch.Tensor, prob: torch.Tensor, k: _Consts) -> tuple[torch.Tensor, ...]:
        """Gradient (solver coordinates) and the natural gradient's max and L1 norms (n,) each."""
        gZ, gc = self.back((prob - self.onehot).mul_(k.wt), k)
        gZ += k.pen * Z
        nat_w, nat_c = (gZ / self.g[:, k.idx, None]).abs(), (gc / self.hc).abs()
        gmax = torch.maximum(nat_w.amax((0, 2)), nat_c.amax(1))
        return gZ, gc, gmax, nat_w.sum((0, 2)) + nat_c.sum(1)

    def hvp(self, vZ: torch.Tensor, vc: torch.Tensor, prob: torch.Tensor, k: _Consts,
            ) -> tuple[torch.Tensor, torch.Tensor]:
        """Hessian-vector products (single precision) at the points with probabilities ``prob``."""
        dL = self.logits(vZ, vc, k)
        if self.binary:
            R = prob * (1 - prob) * dL
        else:
            pdl = prob * dL
            R = pdl.sub_(prob * pdl.sum(2, keepdim=True))
        hZ, hc = self.back(R.mul_(k.wt), k)
        return hZ.add_(k.pen * vZ), hc

    # ---------------------------------------------------------------- Newton-CG
    def run(self, max_iter: int, tol: float, init: tuple[torch.Tensor, torch.Tensor] | None) -> LinearModels:
        B, dev = self.B, self.device
        Z, c = self._start(init)
        allk = _Consts(self, torch.arange(B, device=dev), self.dtype)
        f, L = self.value(Z, c, allk)
        prob = self.probabilities(L)
        gZ, gc, gmax, gl1 = self.gradient(Z, prob, allk)
        n_iter = torch.zeros(B, dtype=torch.long, device=dev)
        active = gmax > tol
        while bool(active.any()):
            idx = active.nonzero().squeeze(1)
            k = _Consts(self, idx, self.dtype)
            dZ, dc = self._direction(gZ[:, idx], gc[idx], gl1[idx], prob[:, idx], k)
            ok, t, f_new = self._line_search(Z[:, idx], c[idx], f[idx], gZ[:, idx], gc[idx], dZ, dc, k)
            active[idx[~ok]] = False  # no decrease possible: optimal to working precision
            if not bool(ok.any()):
                break
            k, t, f_new = k.take(ok), t[ok], f_new[ok]
            idx = k.idx
            Zn = Z[:, idx] + t[None, :, None] * dZ[:, ok]
            cn = c[idx] + t[:, None] * dc[ok]
            _, Ln = self.value(Zn, cn, k)
            pn = self.probabilities(Ln)
            gZn, gcn, gmaxn, gl1n = self.gradient(Zn, pn, k)
            stalled = (f[idx] - f_new) <= FTOL * torch.maximum(f[idx].abs(), f_new.abs()).clamp(min=1.0)
            Z[:, idx], c[idx], f[idx], prob[:, idx] = Zn, cn, f_new, pn
            gZ[:, idx], gc[idx], gmax[idx], gl1[idx] = gZn, gcn, gmaxn, gl1n
            n_iter[idx] += 1
            active[idx] = (gmaxn > tol) & ~stalled & (n_iter[idx] < max_iter)
        return self._models(Z, c, int(n_iter.max()), gmax, tol)

    def _direction(self, gZ: torch.Tensor, gc: torch.Tensor, gl1: torch.Tensor, prob: torch.Tensor,
                   k: _Consts) -> tuple[torch.Tensor, torch.Tensor]:
        """Newton steps: conjugate gradients on H d = -g to relative residual min(0.5, √‖g‖₁) (as scikit-learn)."""
        h = self.hdtype
        n = len(k.idx)
        outZ, outc = torch.zeros_like(gZ), torch.zeros_like(gc)
        # compact working set, in the Hessian's precision; finished problems are dropped in bulk
        pos = torch.arange(n, device=gZ.device)
        kc = _Consts(self, k.idx, h)
        pr = prob.to(h)
        if h == torch.float32:  # tiny probabilities would make denormal products, which are very slow
            pr = torch.where(pr < 1e-12, 0.0, pr)
        xZ, xc = torch.zeros_like(gZ, dtype=h), torch.zeros_like(gc, dtype=h)
        rZ, rc = (-gZ).to(h), (-gc).to(h)
        pZ, pc = rZ.clone(), rc.clone()
        rs = (rZ * rZ).sum((0, 2)) + (rc * rc).sum(1)
        stop = rs.sqrt() * gl1.to(h).sqrt().clamp(max=0.5)
        live = torch.ones(n, dtype=torch.bool, device=gZ.device)
        for _ in range(MAX_CG):
            hZ, hc = self.hvp(pZ, pc, pr, kc)
            pHp = (pZ * hZ).sum((0, 2)) + (pc * hc).sum(1)
            good = live & (pHp > 0)
            alpha = torch.where(good, rs / pHp.clamp(min=1e-30), 0.0)
            xZ.add_(alpha[None, :, None] * pZ)
            xc.add_(alpha[:, None] * pc)
            rZ.sub_(alpha[None, :, None] * hZ)
            rc.sub_(alpha[:, None] * hc)
            rs_new = (rZ * rZ).sum((0, 2)) + (rc * rc).sum(1)
            live &= good & (rs_new.sqrt() > stop)
            beta = torch.where(live, rs_new / rs.clamp(min=1e-30), 0.0)
            pZ = rZ + beta[None, :, None] * pZ
            pc = rc + beta[:, None] * pc
            rs = rs_new
            n_live = int(live.sum())
            if n_live < len(pos) and (n_live == 0 or n_live <= 0.75 * len(pos)):
                done = ~live
                outZ[:, pos[done]], outc[pos[done]] = xZ[:, done].to(gZ.dtype), xc[done].to(gc.dtype)
                if n_live == 0:
                    break
                keep = live
                pos, kc, pr = pos[keep], kc.take(keep), pr[:, keep]
                xZ, xc, rZ, rc, pZ, pc = xZ[:, keep], xc[keep], rZ[:, keep], rc[keep], pZ[:, keep], pc[keep]
                rs, stop, live = rs[keep], stop[keep], live[keep]
        else:
            outZ[:, pos], outc[pos] = xZ.to(gZ.dtype), xc.to(gc.dtype)
        empty = (outZ == 0).all(2).all(0) & (outc == 0).all(1)  # no curvature found: steepest descent
        outZ[:, empty], outc[empty] = -gZ[:, empty], -gc[empty]
        return outZ, outc

    def _line_search(self, Z: torch.Tensor, c: torch.Tensor, f: torch.Tensor, gZ: torch.Tensor, gc: torch.Tensor,
                     dZ: torch.Tensor, dc: torch.Tensor, k: _Consts) -> tuple[torch.Tensor, ...]:
        """Backtracking (Armijo, quadratic interpolation) from the Newton step t = 1, per problem."""
        slope = (gZ * dZ).sum((0, 2)) + (gc * dc).sum(1)
        t = torch.ones_like(f)
        f_new = torch.full_like(f, math.inf)
        ok = torch.zeros_like(f, dtype=torch.bool)
        pending = (slope < 0).nonzero().squeeze(1)
        for _ in range(MAX_BACKTRACK):
            if len(pending) == 0:
                break
            tp = t[pending]
            fp, _ = self.value(Z[:, pending] + tp[None, :, None] * dZ[:, pending],
                               c[pending] + tp[:, None] * dc[pending], k.take(pending))
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

    def _start(self, init: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zeros, or solver coordinates of ``init`` = (z-score weights (B, D, Kp), intercepts (B, Kp))."""
        B, D, Kp = self.B, self.D, self.Kp
        Z = torch.zeros(D, B, Kp, device=self.device, dtype=self.dtype)
        c = torch.zeros(B, Kp, device=self.device, dtype=self.dtype)
        if init is None:
            return Z, c
        W0, c0 = (t.to(self.device, self.dtype) for t in init)
        if self.binary and W0.shape[-1] == 2:  # two symmetric columns → one binomial vector
            W0, c0 = W0[:, :, 1:] - W0[:, :, :1], c0[:, 1:] - c0[:, :1]
        if W0.shape != (B, D, Kp) or c0.shape != (B, Kp):
            return Z, c
        return (W0.permute(1, 0, 2) / self.g[:, :, None]).contiguous(), c0 / self.hc

    def _models(self, Z: torch.Tensor, c: torch.Tensor, n_iter: int, max_grad: torch.Tensor,
                tol: float) -> LinearModels:
        """Weights and intercepts in the original feature space (binary: ± half the logit, as softmax of two)."""
        U = Z * self.a[:, :, None]  # (D, B, Kp), x0 units
        e = c * self.hc - (U * self.shift[:, :, None]).sum(0)
        weight = (U / self.sigma[:, None, None]).permute(1, 0, 2)  # (B, D, Kp)
        bias = e - torch.einsum("d,bdk->bk", self.mu, weight)
        internal = ((Z * self.g[:, :, None]).permute(1, 0, 2).contiguous(), c * self.hc)
        if self.binary:
            weight = torch.cat([-weight, weight], 2) / 2
            bias = torch.cat([-bias, bias], 1) / 2
        return LinearModels(weight.contiguous(), bias, n_iter, max_grad, tol, internal)
