"""The closed form (Eq. 12-14, 33-34) against brute-force minimisation of the objective itself."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.optimize import minimize

from slta.solve import solve_module, solve_system


def random_features(T: int, seed: int, per_task: int = 5):
    """Per-sample feature differences Δf_t(x) (T, D_x) with varying lengths and task-dependent scales."""
    rng = np.random.default_rng(seed)
    samples = []
    for task in range(T):
        for _ in range(per_task):
            D = int(rng.integers(20, 60))
            shared = rng.normal(size=D)
            d = np.stack([rng.normal(size=D) * (1 + t) + 0.5 * shared for t in range(T)])
            samples.append((task, d * rng.uniform(0.1, 10)))  # per-sample scale: what balancing is for
    return samples


def objective(alpha, samples, T, balance):
    """Eq. 11 (plain) / Eq. 33 (balanced), computed directly from the features."""
    total = 0.0
    for t in range(T):
        vals = []
        for task, d in samples:
            if task != t:
                continue
            r = alpha @ d - d[t]  # Σ_t' α_t' Δf_t' - Δf_t
            denom = np.mean(np.sum(d ** 2, axis=1)) if balance else 1.0
            vals.append(r @ r / denom)
        total += np.mean(vals)
    return total


def grams_of(samples):
    return np.stack([d @ d.T for _, d in samples]), np.array([t for t, _ in samples])


@pytest.mark.parametrize("T", [2, 3, 5])
@pytest.mark.parametrize("balance", [False, True])
def test_closed_form_equals_brute_force(T, balance):
    samples = random_features(T, seed=T)
    grams, tasks = grams_of(samples)
    sol = solve_module(grams, tasks, balance=balance)
    assert sol.rule == "exact"
    best = minimize(objective, np.full(T, 1.0 / T), args=(samples, T, balance), method="BFGS",
                    options={"gtol": 1e-12, "maxiter": 10000})
    np.testing.assert_allclose(sol.alpha, best.x, rtol=1e-5, atol=1e-7)
    # and it is a minimum: no nearby point is better
    f0 = objective(sol.alpha, samples, T, balance)
    rng = np.random.default_rng(0)
    for _ in range(20):
        assert objective(sol.alpha + 1e-3 * rng.normal(size=T), samples, T, balance) >= f0


def test_balanced_and_plain_differ_when_sample_scales_differ():
    samples = random_features(3, seed=1)
    grams, tasks = grams_of(samples)
    a = solve_module(grams, tasks, balance=False).alpha
    b = solve_module(grams, tasks, balance=True).alpha
    assert np.abs(a - b).max() > 1e-3


def test_subset_equals_solving_the_subset_directly():
    samples = random_features(4, seed=7)
    grams, tasks = grams_of(samples)
    sub = [(list((0, 2)).index(t), d[[0, 2]]) for t, d in samples if t in (0, 2)]
    g2, t2 = grams_of(sub)
    for balance in (False, True):
        np.testing.assert_allclose(solve_module(grams, tasks, balance, models=[0, 2]).alpha,
                                   solve_module(g2, t2, balance).alpha, rtol=1e-12)


def test_singular_systems_give_min_norm_finite_alpha():
    rng = np.random.default_rng(0)
    # two identical fine-tunes: A has rank 1 along (1, 1); min-norm splits the weight evenly
    samples = []
    for task in range(2):
        for _ in range(4):
            d = rng.normal(size=30)
            samples.append((task, np.stack([d, d])))
    grams, tasks = grams_of(samples)
    sol = solve_module(grams, tasks, balance=True)
    assert sol.rule == "min-norm" and sol.rank == 1
    np.testing.assert_allclose(sol.alpha, [0.5, 0.5], rtol=1e-12)
    # a module no fine-tune changed: α = 0, never NaN
    sol = solve_module(np.zeros((4, 3, 3)), np.array([0, 1, 2, 0]), balance=True)
    assert sol.rule == "zero" and np.all(sol.alpha == 0) and sol.skipped_samples == 4
    # one fine-tune left the module unchanged: its α is 0, the others are solved exactly
    samples = [(t, np.stack([rng.normal(size=20), np.zeros(20), rng.normal(size=20)])) for t in (0, 1, 2) for _ in range(3)]
    grams, tasks = grams_of(samples)
    sol = solve_module(grams, tasks, balance=False)
    assert sol.rule == "min-norm" and sol.rank == 2 and sol.alpha[1] == pytest.approx(0, abs=1e-12)
    assert np.all(np.isfinite(sol.alpha))


def test_solve_system_exact_and_min_norm_against_numpy():
    rng = np.random.default_rng(3)
    M = rng.normal(size=(4, 4))
    A, b = M @ M.T + np.eye(4), rng.normal(size=4)
    np.testing.assert_allclose(solve_system(A, b)[0], np.linalg.solve(A, b), rtol=1e-10)
    U = rng.normal(size=(4, 2))
    A = U @ U.T  # rank 2
    b = A @ rng.normal(size=4)
    np.testing.assert_allclose(solve_system(A, b)[0], np.linalg.pinv(A) @ b, rtol=1e-8, atol=1e-10)
