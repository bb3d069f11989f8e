"""`refine: N`: Gauss-Newton steps on the paper's exact objective Eq. 10 (balanced: Eq. 33).

The closed form (Eq. 12-14) minimises Eq. 11, Eq. 10 with the module's output linearised in α
around the base, with the secant Δf_t = f(θ_t) - f(θ_0) standing for the derivative along τ_t. For a
module that is not exactly linear in its weights the minimiser of Eq. 11 is not that of Eq. 10:

    E(α) = Σ_a mean_{x in H_a} ||f(x; θ_0 + Σ_t α_t τ_t) - f(x; θ_a)||² / d(x)             (Eq. 10 / 33)

with d(x) = 1, or balanced d(x) = (1/T) Σ_t ||Δf_t(x)||² (Eq. 33, fixed: the closed form's denominator).
Each Gauss-Newton step re-linearises f around the current merge θ(α): J_t(x) = ∂f(x; θ(α))/∂α_t,
the Jacobian-vector product of the module along τ_t (`torch.func.jvp`, forward mode, exact), and
solves the linearised least squares for the step δ:

    M δ = g,   M = Σ_a mean_x J(x)ᵀ J(x) / d(x),   g = Σ_a mean_x J(x)ᵀ (f(x; θ_a) - f(x; θ(α))) / d(x)

with the closed form's solver (min-norm when M is singular). Started at α = 0 with the secant in
place of J this is exactly Eq. 11-14; here it starts from the closed-form α. A step is halved up to
four times until E decreases (a backtracking line search, so E never increases); when no halving
helps, the module has converged and refinement stops. Positions and samples are those of the
Grams (`tokens:`, padding excluded; balanced: samples with d(x) = 0 are left out, as in the solve).

Refined: the decoder-layer modules of `layer` and `attn_mlp` (whole layer, attention block, MLP block).
The embedding is exactly linear in its weights (Eq. 10 = Eq. 11: the closed form is already the
minimiser) and the head (final norm + lm_head, read in vocabulary row blocks) is left at its closed
form; slta_report.json says which modules were refined, with E before and after each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.func import jvp
from torch.nn.attention import SDPBackend, sdpa_kernel

from slta.solve import solve_system

if TYPE_CHECKING:
    from slta.engine.features import Batch

MAX_HALVINGS = 4


def _merge(p0: dict[str, torch.Tensor], taus: list[dict[str, torch.Tensor]], alpha: np.ndarray
           ) -> dict[str, torch.Tensor]:
    """θ_0 + Σ_t α_t τ_t on the module's own tensors (Eq. 1), the other tensors of p0 unchanged."""
    out = dict(p0)
    for n in taus[0]:
        w = p0[n].clone()
        for a, tau in zip(alpha, taus):
            w += float(a) * tau[n]
        out[n] = w
    return out


def _flat(y: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(b, s, ...) -> (b, D) in float64 with the positions that do not count zeroed."""
    b, s = y.shape[0], y.shape[1]
    return (y.reshape(b, s, -1).double() * mask[:, :, None]).reshape(b, -1)


def gauss_newton(calls: list[Callable], xs: list[torch.Tensor], batches: list[Batch],
                 versions: list[dict[str, torch.Tensor]], owned: list[str], alpha0: np.ndarray,
                 den: np.ndarray, task_count: np.ndarray, steps: int) -> tuple[np.ndarray, float, float, int]:
    """N Gauss-Newton steps on Eq. 10 / 33 for one module (module docstring). `calls[k](p, x)` is the
    module on batch k with weights p; `den` the per-sample denominator d(x) (0: left out); `task_count`
    the number of samples of each task. Returns (α, E before, E after, steps taken)."""
    p0 = versions[0]
    taus = [{n: v[n] - p0[n] for n in owned} for v in versions[1:]]
    T = len(taus)

    def weights(b: Batch) -> torch.Tensor:
        d = den[b.samples]
        w = np.where(d > 0, 1.0 / (np.where(d > 0, d, 1.0) * task_count[b.task]), 0.0)
        return torch.as_tensor(w, dtype=torch.float64, device=xs[0].device)

    def objective(alpha: np.ndarray) -> float:
        p = _merge(p0, taus, alpha)
        total = 0.0
        with torch.no_grad():
            for call, x, b in zip(calls, xs, batches):
                mask = b.counted.double()
                r = _flat(call(versions[b.task + 1], x) - call(p, x), mask)
                total += float((weights(b) * (r * r).sum(1)).sum())
        return total

    def system(alpha: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
        p = _merge(p0, taus, alpha)
        M, g, total = np.zeros((T, T)), np.zeros(T), 0.0
        for call, x, b in zip(calls, xs, batches):
            mask, w = b.counted.double(), weights(b)
            cols = []
            with torch.no_grad():
                target = call(versions[b.task + 1], x)
            for tau in taus:  # J_t = ∂f/∂α_t: the JVP along τ_t (SDPA's math kernel has forward-mode AD)
                with sdpa_kernel([SDPBackend.MATH]):
                    out, tangent = jvp(lambda *ws, call=call, x=x: call({**p, **dict(zip(owned, ws))}, x),
                                       tuple(p[n] for n in owned), tuple(tau[n] for n in owned))
                cols.append(_flat(tangent.detach(), mask))
            r = _flat(target - out.detach(), mask)
            J = torch.stack(cols, 1)  # (b, T, D)
            M += torch.einsum("n,nid,njd->ij", w, J, J).cpu().numpy()
            g += torch.einsum("n,nid,nd->i", w, J, r).cpu().numpy()
            total += float((w * (r * r).sum(1)).sum())
        return M, g, total

    alpha = np.asarray(alpha0, dtype=np.float64).copy()
    before = current = None
    taken = 0
    for _ in range(steps):
        M, g, e = system(alpha)
        if before is None:
            before = current = e
        delta = solve_system(M, g)[0]
        for h in range(MAX_HALVINGS + 1):
            cand = alpha + delta / 2 ** h
            e_new = objective(cand)
            if e_new < current:
                alpha, current = cand, e_new
                taken += 1
                break
        else:
            break  # no step lowers E: converged
    if before is None:
        before = current = objective(alpha)
    return alpha, float(before), float(current), taken
