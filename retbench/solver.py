"""Batched multinomial logistic regression in torch.

One L-BFGS solve fits many independent problems at once — seeds × regularisation values
× shot counts — on a shared feature matrix: problem ``b`` sees the rows with non-zero
``weights[b]``, has its own inverse regularisation ``C[b]`` and, optionally, its own
feature standardisation. Objective per problem, as scikit-learn's ``LogisticRegression``
(L2, unpenalised intercept): ``C Σ_i w_i CE(x_i) + ½‖W‖²``. Each problem's objective is
divided by ``C Σ_i w_i`` before summing, which leaves every minimiser unchanged and puts
the problems on one scale for the shared line search.
"""

from __future__ import annotations

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
    """Per-problem mean and std of ``x`` over each problem's ``mask`` rows: (B, D) each."""
    n = mask.sum(1, keepdim=True).clamp(min=1)
    mean = (mask @ x) / n
    var = (mask @ (x * x)) / n - mean * mean
    return mean, var.clamp(min=0).sqrt().clamp(min=eps)


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

    ``init`` warm-starts from another fit's ``internal`` parameters (same rows and standardisation).
    """
    x = x.to(torch.float64) if x.device.type == "cpu" else x.float()
    dtype, dev = x.dtype, x.device
    weights, C, y = weights.to(dev, dtype), C.to(dev, dtype), y.to(dev)
    B, (N, D), K = len(C), x.shape, n_classes
    used = (weights > 0).to(dtype)
    if standardize:
        shift, scale = standardizer(x, used)
    else:  # centring alone is an exact reparametrisation (the intercept is free) and helps L-BFGS
        shift, scale = (used @ x / used.sum(1, keepdim=True).clamp(min=1)), torch.ones(B, D, device=dev, dtype=dtype)
    norm = 1.0 / weights.sum(1).clamp(min=1e-12)  # (B,)
    # Two classes: scikit-learn fits one binomial vector v = w1 - w0 with penalty ½‖v‖²; the symmetric
    # two-column optimum has w1 = -w0 = v/2, so the penalty on both columns must be ‖W‖², not ½‖W‖².
    reg = (1.0 if K == 2 else 0.5) / (C * weights.sum(1).clamp(min=1e-12))  # (B,)
    onehot = torch.nn.functional.one_hot(y, K).to(dtype)
    if init is None:
        w = torch.zeros(B, D, K, device=dev, dtype=dtype, requires_grad=True)
        c = torch.zeros(B, K, device=dev, dtype=dtype, requires_grad=True)
    else:
        w, c = (t.detach().to(dev, dtype).clone().requires_grad_(True) for t in init)

    def logits_of(w_: torch.Tensor, c_: torch.Tensor) -> torch.Tensor:
        w_eff = w_ / scale[:, :, None]
        c_eff = c_ - torch.einsum("bd,bdk->bk", shift, w_eff)
        flat = x @ w_eff.permute(1, 0, 2).reshape(D, B * K)
        return flat.view(N, B, K).permute(1, 0, 2) + c_eff[:, None, :]

    def objective() -> torch.Tensor:
        logp = torch.log_softmax(logits_of(w, c), dim=-1)  # (B, N, K)
        nll = -(logp * onehot[None]).sum(-1)  # (B, N)
        return ((weights * nll).sum(1) * norm + reg * (w * w).sum((1, 2))).sum()

    opt = torch.optim.LBFGS([w, c], lr=1, max_iter=max_iter, tolerance_grad=tol, tolerance_change=1e-12,
                            history_size=20, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        w_eff = w / scale[:, :, None]
        c_eff = c - torch.einsum("bd,bdk->bk", shift, w_eff)
    closure()  # gradients at the solution; each problem's block is its own (the objective is a sum)
    max_grad = torch.maximum(w.grad.abs().amax(dim=(1, 2)), c.grad.abs().amax(dim=1)).detach()
    n_iter = opt.state[opt._params[0]].get("n_iter", 0)
    return LinearModels(w_eff.detach(), c_eff.detach(), int(n_iter), max_grad, tol, (w.detach(), c.detach()))
