"""Closed-form merge weights from per-sample Gram matrices (paper Eq. 12-14, balanced Eq. 33-34).

For a module and a calibration sample x, G_x[b, c] = <Δf_b(x), Δf_c(x)> (T x T, float64) is a
sufficient statistic: with x in task a's samples H_a,

    plain     B[a, b, c] = mean_{x in H_a} G_x[b, c]                                  (Eq. 14)
    balanced  B[a, b, c] = mean_{x in H_a} G_x[b, c] / ((1/T) sum_t G_x[t, t])        (Eq. 34)
    A[j, k] = sum_t B[t, j, k],   b[j] = sum_t B[t, j, t],   α = A^-1 b                (Eq. 12-13)

and a subset S of the models is solved by restricting G to S x S and the samples to the tasks
in S (the balanced denominator is then the mean of the diagonal over S).

A is a sum of Gram matrices, so symmetric positive semi-definite. When it is singular or
ill-conditioned (two identical fine-tunes; a fine-tune that left the module unchanged) we use
the minimum-norm least-squares solution: eigenvalues below `rcond * λ_max` are dropped
(a pseudo-inverse). When A = 0 (no fine-tune changes this module's output on the calibration
data) α = 0. The rule used, the rank and the condition number are reported; α is always finite.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

import slta

DEFAULT_RCOND = 1e-9
# `scale` values chosen after the solve from the calibration responses' loss (slta.merges.autoscale): one
# global factor, one per task, one per task checked together (issue #28)
AUTO_SCALE = ("auto", "auto_task", "auto_joint")


@dataclass
class Solution:
    """One module's α with the solver's diagnostics: the rule used, the rank and condition number of
    A, the system itself (A α = b, Eq. 13) and, balanced, the samples left out (zero denominator)."""

    alpha: np.ndarray
    rule: str  # "exact" | "min-norm" | "zero"
    rank: int
    cond: float
    A: np.ndarray = field(repr=False)
    b: np.ndarray = field(repr=False)
    skipped_samples: int = 0  # balanced: samples whose every feature difference is zero

    def scaled(self, scale: float | np.ndarray) -> Solution:
        """The same solution with α multiplied by `scale` (the `scale` parameter; 1: the paper): a number,
        or one factor per task (issue #28)."""
        if np.all(np.asarray(scale) == 1):
            return self
        return Solution(self.alpha * scale, self.rule, self.rank, self.cond, self.A, self.b, self.skipped_samples)

    def to_json(self) -> dict:
        """The report's entry for the module (A and b left out)."""
        return {"alpha": [float(a) for a in self.alpha], "rule": self.rule, "rank": self.rank,
                "cond": float(self.cond) if np.isfinite(self.cond) else None,
                "skipped_samples": self.skipped_samples}


def restrict(grams: np.ndarray, tasks: np.ndarray, models: list[int] | None,
             cross: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Statistics of a subset of the models: rows/cols of G (and columns of `cross`) and the samples
    of their tasks."""
    if models is None:
        return grams, tasks, cross
    models = list(models)
    keep = np.isin(tasks, models)
    remap = {m: i for i, m in enumerate(models)}
    sub = grams[keep][:, models][:, :, models]
    sub_cross = None if cross is None else cross[keep][:, models]
    return sub, np.array([remap[t] for t in tasks[keep]], dtype=np.int64), sub_cross


def objective(grams: np.ndarray, tasks: np.ndarray, balance: bool,
              cross: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, int]:
    """A and b of Eq. 13 from per-sample Grams (N, T, T) and each sample's task index (N,).
    `cross` (N, T): per-sample products <Δf_j(x), e(x)> with another target e (slta.merges.trajectory) in
    place of the paper's <Δf_j(x), Δf_a(x)> = G_x[j, a] in b; A and the denominators are unchanged."""
    grams = np.asarray(grams, dtype=np.float64)
    N, T = grams.shape[0], grams.shape[1]
    rhs = grams[np.arange(N), :, tasks] if cross is None else np.asarray(cross, dtype=np.float64)  # (N, T)
    skipped = 0
    if balance:
        denom = np.einsum("nii->n", grams) / T  # (1/T) sum_t ||Δf_t(x)||^2 (Eq. 33)
        ok = denom > 0
        skipped = int((~ok).sum())
        safe = np.where(ok, denom, 1.0)
        grams = np.where(ok[:, None, None], grams / safe[:, None, None], 0.0)
        rhs = np.where(ok[:, None], rhs / safe[:, None], 0.0)
    A, b = np.zeros((T, T)), np.zeros(T)
    for a in range(T):
        sel = tasks == a
        if sel.any():
            A += grams[sel].mean(axis=0)
            b += rhs[sel].mean(axis=0)
    return A, b, skipped


def solve_system(A: np.ndarray, b: np.ndarray, rcond: float = DEFAULT_RCOND) -> tuple[np.ndarray, str, int, float]:
    """α = A⁻¹ b (Eq. 12) for symmetric PSD A by eigen-decomposition: exact when every eigenvalue
    exceeds rcond * λ_max, else the minimum-norm least-squares solution; A = 0 gives α = 0.
    Returns (α, rule, rank, condition number)."""
    A = (A + A.T) / 2  # exact symmetry; removes float round-off asymmetry
    evals, evecs = np.linalg.eigh(A)
    top = float(evals[-1]) if evals.size else 0.0
    if top <= 0:
        return np.zeros_like(b), "zero", 0, float("inf")
    keep = evals > rcond * top
    rank = int(keep.sum())
    cond = top / float(evals[0]) if evals[0] > 0 else float("inf")
    if rank == len(b):
        return np.linalg.solve(A, b), "exact", rank, cond
    inv = np.where(keep, 1.0 / np.where(keep, evals, 1.0), 0.0)
    return evecs @ (inv * (evecs.T @ b)), "min-norm", rank, cond


def solve_module(grams: np.ndarray, tasks: np.ndarray, balance: bool = True, models: list[int] | None = None,
                 rcond: float = DEFAULT_RCOND, cross: np.ndarray | None = None) -> Solution:
    """α of one module from its per-sample Grams (N, T, T) and each sample's task: Eq. 12-14, or
    balanced Eq. 33-34; `models` solves for a subset of the fine-tunes (see `restrict`); `cross`: another
    target's products (see `objective`)."""
    g, t, c = restrict(np.asarray(grams), np.asarray(tasks), models, cross)
    A, b, skipped = objective(g, t, balance, c)
    alpha, rule, rank, cond = solve_system(A, b, rcond)
    if not np.all(np.isfinite(alpha)):  # cannot happen with finite Grams; guard the promise anyway
        raise FloatingPointError(f"non-finite α {alpha} (A={A}, b={b})")
    return Solution(alpha, rule, rank, cond, A, b, skipped)


slta._as_command(__name__)  # `slta.solve(...)` runs slta.merges.stats.run_solve (see slta/__init__.py)


def scale_factors(scale: Any, models: list[int] | None = None) -> float | np.ndarray:
    """What α are multiplied by after the solve, from the merge's `scale` parameter: a number, or one factor
    per model (of the config's models; `models` picks a subset's, as `slta solve --models` does); 1 while
    `auto` / `auto_task` / `auto_joint` have not chosen yet (slta.merges.autoscale)."""
    if scale in AUTO_SCALE:
        return 1.0
    if isinstance(scale, (list, tuple, np.ndarray)):
        factors = np.asarray(scale, dtype=np.float64)
        return factors if models is None else factors[list(models)]
    return float(scale)
