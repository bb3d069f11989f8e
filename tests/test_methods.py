"""The data-free merge methods against their definitions, written out independently here.

Each reference below is the method's definition from its paper computed entry by entry with Python
loops / numpy on small tensors; none of them calls slta's helpers. Tie rule slta documents for
magnitude ranks: among equal magnitudes the earlier (row-major) entry counts as the larger one.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from slta import methods
from slta.methods import common
from slta.methods import params as P

torch.set_num_threads(min(2, torch.get_num_threads()))

NAME = "model.layers.1.mlp.up_proj.weight"


def run(method: str, base, tuned, model_params, params=None, seed=0, name=NAME) -> torch.Tensor:
    """Call a method's tensor_fn with its defaults filled in, as the driver does after resolution."""
    m = methods.get(method)
    per_model = [{**{k: v for k, v in m.model_params.items()}, **p} for p in model_params]
    shared = {**m.method_params, **(params or {})}
    return m.tensor_fn(name, base.clone(), [t.clone() for t in tuned], per_model, shared, seed)


def family(T=3, shape=(6, 7), seed=0, scale=0.1):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    tuned = [base + scale * (1 + t) * torch.randn(shape, generator=g) for t in range(T)]
    return base, tuned


def taus(base, tuned):
    return [(t - base).numpy().astype(np.float64).ravel() for t in tuned]


# -- independent references --------------------------------------------------------------------

def ref_topk_keep(tau: np.ndarray, density: float) -> np.ndarray:
    """TIES trim: keep the k = max(1, int(density * n)) largest |tau|; earlier wins among equals."""
    n = tau.size
    if density >= 1:
        return np.ones(n, bool)
    k = max(1, int(density * n))
    order = sorted(range(n), key=lambda j: (-abs(tau[j]), j))
    keep = np.zeros(n, bool)
    keep[order[:k]] = True
    return keep


def ref_band_keep(tau: np.ndarray, density: float, gamma: float) -> np.ndarray:
    """Breadcrumbs: rank by |tau| ascending (earlier = larger among equals), drop the top int(gamma n),
    keep int(density n) just below them (fewer outliers dropped when the two overlap)."""
    n = tau.size
    if density >= 1:
        return np.ones(n, bool)
    keep_n, top_n = int(density * n), int(gamma * n)
    bottom_n = max(0, n - keep_n - top_n)
    ascending = sorted(range(n), key=lambda j: (abs(tau[j]), -j))
    keep = np.zeros(n, bool)
    keep[ascending[bottom_n:bottom_n + keep_n]] = True
    return keep


def ref_combine(tau_hat: list[np.ndarray], weights: list[float], sign_election: bool, normalize: bool,
                lam: float) -> np.ndarray:
    """TIES elect + disjoint merge entry by entry (weighted, as mergekit): elected sign = sign of the weighted
    sum (0 -> +); an entry joins where its weighted value has the elected sign; mean over the joining
    weights when normalizing. Without election: weighted sum, / sum of weights when normalizing."""
    n = tau_hat[0].size
    out = np.zeros(n)
    for j in range(n):
        vals = [w * t[j] for w, t in zip(weights, tau_hat)]
        if sign_election:
            elected = 1.0 if sum(vals) >= 0 else -1.0
            join = [i for i, v in enumerate(vals) if v != 0 and math.copysign(1.0, v) == elected]
            total = sum(vals[i] for i in join)
            div = sum(weights[i] for i in join)
            out[j] = total / div if (normalize and div != 0) else total
        else:
            total = sum(vals)
            out[j] = total / sum(weights) if (normalize and abs(sum(weights)) >= 1e-8) else total
    return lam * out


def close(ours: torch.Tensor, ref: np.ndarray, base: torch.Tensor, tol=1e-5):
    expect = base.numpy().astype(np.float64).ravel() + ref
    np.testing.assert_allclose(ours.numpy().ravel(), expect, rtol=tol, atol=tol)


# -- task arithmetic and linear ------------------------------------------------------------------

def test_task_arithmetic_is_eq1():
    base, tuned = family()
    w = [0.5, -0.2, 1.3]
    got = run("task_arithmetic", base, tuned, [{"weight": x} for x in w], {"lambda": 0.7})
    ref = 0.7 * sum(wi * t for wi, t in zip(w, taus(base, tuned)))
    close(got, ref, base)
    got = run("task_arithmetic", base, tuned, [{"weight": x} for x in w], {"lambda": 0.7, "normalize": True})
    close(got, ref / sum(w), base)


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.3, -0.5, 1.2]])
def test_fine_tunes_as_stored_give_the_bits_of_the_float32_upcast(method, weights):
    """Data-free methods take bfloat16 fine-tunes as stored (slta.merges.data_free, `tuned_as_stored`): the
    merge must be bit for bit the one on their exact float32 upcast, signed zeros included."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(64, 48, generator=g).bfloat16().float()
    tuned = [(base + 0.01 * torch.randn(64, 48, generator=g)).bfloat16() for _ in weights]
    base[0, :4], base[0, 4:8] = 0.0, -0.0
    tuned[0][0, :8] = -0.0
    kept = [t.clone() for t in tuned]
    m = methods.get(method)
    per_model = [{"weight": w, "density": 0.5} for w in weights]
    shared = {"lambda": 0.9, "normalize": method == "ties", "int8_mask": False}
    as_stored = m.tensor_fn("x", base, tuned, per_model, shared, 0)
    upcast = m.tensor_fn("x", base, [t.float() for t in tuned], per_model, shared, 0)
    assert torch.equal(as_stored.view(torch.int32), upcast.view(torch.int32))
    assert all(torch.equal(a, b) for a, b in zip(tuned, kept))  # the inputs were not modified in place


def mergekit_task_arithmetic(base, tuned, weights, normalize, lam):
    """mergekit's generalized task arithmetic without sparsification, written out: in the base's dtype,
    task vectors stacked, weighted, summed over the stack, divided, scaled, added to the base."""
    tvs = torch.stack([t.to(base.dtype) - base if base.dtype != torch.float32 else t.float() - base for t in tuned])
    w = torch.tensor(weights, dtype=base.dtype).reshape(-1, *([1] * base.dim()))
    mixed = (tvs * w).sum(dim=0)
    if normalize:
        div = w.sum(dim=0)
        div[div.abs() < 1e-8] = 1
        mixed = mixed / div
    return base + mixed * lam if lam != 1 else base + mixed


@pytest.mark.parametrize("dtype, tuned_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.bfloat16, torch.bfloat16), (torch.float16, torch.float16)])
@pytest.mark.parametrize("weights, normalize, lam", [([1.0, 1.0, 1.0], False, 1.0), ([1 / 3] * 3, False, 1.0),
                                                     ([0.5, -0.2, 1.3], True, 0.7), ([1.0, -1.0, 0.0], True, 1.0)])
@pytest.mark.parametrize("block", [7, 4096, common.BLOCK])
def test_task_arithmetic_in_blocks_gives_mergekits_bits(dtype, tuned_dtype, weights, normalize, lam, block):
    """Task arithmetic runs block by block on the CPU (common.plain_in_blocks): the blocks, the last
    one partial, must give the bits of the whole-tensor formula, signed zeros included."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(301, 97, generator=g).to(dtype)
    tuned = [(base.float() + 0.01 * torch.randn(301, 97, generator=g)).to(tuned_dtype) for _ in weights]
    base.view(-1)[:6] = torch.tensor([0.0, -0.0, 0.0, -0.0, 1.0, -1.0]).to(dtype)
    tuned[0].view(-1)[:6] = torch.tensor([-0.0, -0.0, 0.0, 0.0, -0.0, 0.0]).to(tuned_dtype)
    kept = [t.clone() for t in tuned]
    got = common.plain_in_blocks(base, tuned, weights, normalize=normalize, lam=lam, block=block)
    ref = mergekit_task_arithmetic(base, tuned, weights, normalize, lam)
    bits = torch.int16 if dtype != torch.float32 else torch.int32  # NaN included (float16: 1e-8 rounds to 0,
    # so weights summing to 0 divide by 0, as in mergekit)
    assert got.dtype == dtype and got.shape == base.shape
    assert torch.equal(got.view(bits), ref.view(bits))
    assert all(torch.equal(a, b) for a, b in zip(tuned, kept))  # inputs untouched
    whole = methods.get("task_arithmetic").tensor_fn("x", base, tuned, [{"weight": w} for w in weights],
                                                      {"lambda": lam, "normalize": normalize}, 0)
    assert torch.equal(whole.view(bits), got.view(bits))  # the method takes this path on the CPU


def test_task_arithmetic_defaults_and_zero_weight_sum():
    base, tuned = family(T=2)
    close(run("task_arithmetic", base, tuned, [{}, {}]), sum(taus(base, tuned)), base)  # weight 1, lambda 1
    # normalize with weights summing to ~0 leaves the sum undivided (mergekit's rule), no inf/NaN
    got = run("task_arithmetic", base, tuned, [{"weight": 1.0}, {"weight": -1.0}], {"normalize": True})
    tv = taus(base, tuned)
    close(got, tv[0] - tv[1], base)


def test_linear_is_weighted_average_and_ignores_base():
    base, tuned = family()
    w = [1.0, 2.0, 0.5]
    got = run("linear", torch.full_like(base, 123.0), tuned, [{"weight": x} for x in w])
    ref = sum(x * t.numpy().astype(np.float64) for x, t in zip(w, tuned)) / sum(w)
    np.testing.assert_allclose(got.numpy(), ref, rtol=1e-6, atol=1e-6)
    got = run("weight_average", base, tuned, [{"weight": x} for x in w], {"normalize": False})
    np.testing.assert_allclose(got.numpy(), ref * sum(w), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="sum to zero"):
        run("linear", base, tuned[:2], [{"weight": 1.0}, {"weight": -1.0}])


# -- TIES ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("densities", [(0.2, 0.2, 0.2), (0.5, 0.3, 1.0), (0.01, 0.9, 0.45)])
def test_ties_matches_definition(normalize, densities):
    base, tuned = family(seed=1)
    w = [1.0, 0.6, -0.4]
    got = run("ties", base, tuned, [{"weight": x, "density": d} for x, d in zip(w, densities)],
              {"lambda": 1.3, "normalize": normalize})
    tv = taus(base, tuned)
    tau_hat = [t * ref_topk_keep(t, d) for t, d in zip(tv, densities)]
    close(got, ref_combine(tau_hat, w, True, normalize, 1.3), base)


def test_ties_default_density_is_mergekits_no_trim_and_disjoint_mean():
    base, tuned = family(shape=(10, 10), seed=2)
    got = run("ties", base, tuned, [{}, {}, {}])  # mergekit's density 1.0: sign election alone
    close(got, ref_combine(taus(base, tuned), [1, 1, 1], True, True, 1.0), base)
    got = run("ties", base, tuned, [{"density": 0.2}] * 3)  # the paper's k = 20%
    tau_hat = [t * ref_topk_keep(t, 0.2) for t in taus(base, tuned)]
    assert all(int((th != 0).sum()) == 20 for th in tau_hat)
    close(got, ref_combine(tau_hat, [1, 1, 1], True, True, 1.0), base)


def test_ties_rescale_matches_l1_norm():
    base, tuned = family(seed=3)
    got = run("ties", base, tuned, [{"density": 0.3}] * 3, {"rescale": True, "normalize": False})
    tau_hat = []
    for t in taus(base, tuned):
        kept = t * ref_topk_keep(t, 0.3)
        tau_hat.append(kept * np.abs(t).sum() / np.abs(kept).sum())
    close(got, ref_combine(tau_hat, [1, 1, 1], True, False, 1.0), base)


def test_ties_magnitude_ties_keep_the_earlier_entry():
    base = torch.zeros(8)
    tau = torch.tensor([3.0, -3.0, 1.0, 3.0, -2.0, 3.0, 0.5, -1.0])
    got = run("ties", base, [base + tau], [{"density": 0.25}])  # k = 2 of the four 3's: positions 0 and 1
    assert got.tolist() == [3.0, -3.0, 0, 0, 0, 0, 0, 0]
    got = run("ties", base, [base + tau], [{"density": 0.5}])  # k = 4: all four 3's
    assert got.tolist() == [3.0, -3.0, 0, 3.0, 0, 3.0, 0, 0]


def test_ties_all_zero_task_vectors():
    base, _ = family()
    assert torch.equal(run("ties", base, [base.clone(), base.clone()], [{}, {}]), base)
    # one all-zero task vector among others takes no part in the disjoint mean (it would halve it)
    _, tuned = family(T=1, seed=4)
    got = run("ties", base, [tuned[0], base.clone()], [{"density": 1.0}, {"density": 1.0}])
    torch.testing.assert_close(got, tuned[0])


def test_ties_sign_election_zero_sum_elects_plus():
    base = torch.zeros(1)
    got = run("ties", base, [base + 1.0, base - 1.0], [{"density": 1.0}, {"density": 1.0}])
    assert got.item() == 1.0  # sum 0 elects +, only +1 joins


def test_ties_chunked_tie_break(monkeypatch):
    # Many equal magnitudes at the threshold, scanned in chunks smaller than the tensor.
    monkeypatch.setattr(common, "_CHUNK", 3)
    g = torch.Generator().manual_seed(5)
    tau = torch.where(torch.rand(40, generator=g) < 0.6, 1.0, torch.rand(40, generator=g)) * torch.sign(
        torch.randn(40, generator=g))
    for density in (0.05, 0.3, 0.55, 0.9):
        got = run("ties", torch.zeros(40), [tau], [{"density": density}])
        expect = tau.numpy() * ref_topk_keep(tau.numpy().astype(np.float64), density)
        np.testing.assert_array_equal(got.numpy(), expect)


# -- DARE --------------------------------------------------------------------------------------------

def test_dare_p0_equals_task_arithmetic():
    base, tuned = family()
    w = [{"weight": 0.5}, {"weight": 0.3}, {"weight": -0.1}]
    ta = run("task_arithmetic", base, tuned, w, {"lambda": 0.9})
    assert torch.equal(run("dare_linear", base, tuned, [{**p, "density": 1.0} for p in w], {"lambda": 0.9}), ta)
    assert torch.equal(run("dare", base, tuned, [{**p, "density": 1.0} for p in w], {"lambda": 0.9}), ta)


def test_dare_p0_ties_equals_ties_without_trim():
    base, tuned = family(seed=6)
    w = [{"weight": 0.5, "density": 1.0}, {"weight": 0.3, "density": 1.0}, {"weight": 0.8, "density": 1.0}]
    got = run("dare_ties", base, tuned, w, {"normalize": True})
    close(got, ref_combine(taus(base, tuned), [0.5, 0.3, 0.8], True, True, 1.0), base)


def test_dare_drops_and_rescales_by_one_over_one_minus_p():
    base, tuned = family(T=1, shape=(100, 100), seed=7)
    tau = (tuned[0] - base).double()
    for density in (0.1, 0.5):  # p = 0.9 (the paper's) and p = 0.5
        delta = run("dare_linear", base, tuned, [{"density": density}]).double() - base.double()
        kept = delta != 0
        assert abs(float(kept.double().mean()) - density) < 0.03
        torch.testing.assert_close(delta[kept], tau[kept] / density, rtol=1e-5, atol=1e-6)
    delta = run("dare_linear", base, tuned, [{"density": 0.5}], {"rescale": False}).double() - base.double()
    kept = delta != 0
    torch.testing.assert_close(delta[kept], tau[kept], rtol=1e-6, atol=1e-7)
    default = run("dare", base, tuned, [{}]).double() - base.double()  # mergekit's density 1.0: no drop
    torch.testing.assert_close(default, tau, rtol=1e-6, atol=1e-7)


def test_dare_is_reproducible_and_seeded():
    base, tuned = family(shape=(50, 40), seed=8)
    mp = [{"weight": 0.5, "density": 0.3}] * 3
    a = run("dare_linear", base, tuned, mp, seed=0)
    b = run("dare_linear", base, tuned, mp, seed=0)
    assert a.numpy().tobytes() == b.numpy().tobytes()
    assert not torch.equal(a, run("dare_linear", base, tuned, mp, seed=1))
    assert not torch.equal(a, run("dare_linear", base, tuned, mp, seed=0, name="model.layers.2.mlp.up_proj.weight"))
    c = run("dare_ties", base, tuned, mp, seed=3)
    assert c.numpy().tobytes() == run("dare_ties", base, tuned, mp, seed=3).numpy().tobytes()
    assert not torch.equal(c, run("dare_ties", base, tuned, mp, seed=4))


def test_dare_ties_matches_definition_on_its_own_masks():
    """Recover each model's drop mask from dare_linear with one-hot weights (the mask depends only on the
    seed, tensor name and model index), then check dare_ties against TIES's election on those masks."""
    base, tuned = family(shape=(8, 9), seed=9)
    dens = [0.4, 0.6, 0.5]
    tv = taus(base, tuned)
    masks = []
    for i in range(3):
        one_hot = [{"weight": 1.0 if j == i else 0.0, "density": d} for j, d in enumerate(dens)]
        delta = run("dare_linear", base, tuned, one_hot, seed=11).numpy().astype(np.float64).ravel() - \
            base.numpy().astype(np.float64).ravel()
        masks.append(delta != 0)
        np.testing.assert_allclose(delta[masks[i]], tv[i][masks[i]] / dens[i], rtol=1e-5, atol=1e-6)
    w = [1.0, 0.5, 0.7]
    got = run("dare_ties", base, tuned, [{"weight": x, "density": d} for x, d in zip(w, dens)], {"normalize": True},
              seed=11)
    tau_hat = [t * m / d for t, m, d in zip(tv, masks, dens)]
    close(got, ref_combine(tau_hat, w, True, True, 1.0), base)


def test_dare_all_zero_task_vectors():
    base, _ = family()
    assert torch.equal(run("dare_ties", base, [base.clone()] * 2, [{}, {}]), base)
    assert torch.equal(run("dare_linear", base, [base.clone()] * 2, [{}, {}]), base)


# -- Model Breadcrumbs --------------------------------------------------------------------------------

@pytest.mark.parametrize("method,election", [("breadcrumbs", False), ("breadcrumbs_ties", True)])
@pytest.mark.parametrize("dg", [(0.15, 0.006), (0.9, 0.01), (0.6, 0.1), (0.5, 0.7), (0.3, 0.0)])
def test_breadcrumbs_matches_definition(method, election, dg):
    density, gamma = dg
    base, tuned = family(shape=(10, 12), seed=10)
    w = [0.5, 1.0, 0.3]
    got = run(method, base, tuned, [{"weight": x, "density": density, "gamma": gamma} for x in w], {"lambda": 0.8})
    tau_hat = [t * ref_band_keep(t, density, gamma) for t in taus(base, tuned)]
    close(got, ref_combine(tau_hat, w, election, False, 0.8), base)


def test_breadcrumbs_keep_15_percent_below_the_top_0_6_percent():
    base, tuned = family(T=1, shape=(50, 20), seed=12)
    default = (run("breadcrumbs", base, tuned, [{}]) - base).numpy().ravel()  # mergekit's density 1: keep all
    np.testing.assert_allclose(default, taus(base, tuned)[0].ravel(), rtol=1e-6, atol=1e-7)
    delta = (run("breadcrumbs", base, tuned, [{"density": 0.15, "gamma": 0.006}]) - base).numpy().ravel()
    tau = taus(base, tuned)[0]
    order = np.argsort(-np.abs(tau))  # largest first (no ties in random data)
    expect = np.zeros(1000, bool)
    expect[order[6:156]] = True  # drop the top int(0.006 * 1000) = 6, keep the next int(0.15 * 1000) = 150
    np.testing.assert_array_equal(ref_band_keep(tau, 0.15, 0.006), expect)
    np.testing.assert_allclose(delta, tau * expect, rtol=1e-6, atol=1e-7)


def test_breadcrumbs_magnitude_ties():
    tau = torch.tensor([2.0, 1.0, 1.0, 5.0, 1.0, 5.0, 3.0, 1.0, 4.0, 2.0])
    got = run("breadcrumbs", torch.zeros(10), [tau], [{"density": 0.5, "gamma": 0.1}])
    # drop the top 1: the two 5's tie and the EARLIER one (position 3) ranks higher, so it goes;
    # drop the bottom 4: the four 1's; keep 5: the later 5, 4, 3 and the two 2's.
    assert got.tolist() == [2.0, 0, 0, 0, 0, 5.0, 3.0, 0, 4.0, 2.0]


def test_breadcrumbs_all_zero():
    base, _ = family()
    assert torch.equal(run("breadcrumbs", base, [base.clone()] * 3, [{}] * 3), base)


# -- consensus TA -----------------------------------------------------------------------------------

def ref_consensus(tv: list[np.ndarray], weights, lambdas, k, lam, normalize=False) -> np.ndarray:
    n = tv[0].size
    out = np.zeros(n)
    for j in range(n):
        multi = sum(t[j] for t in tv)
        votes = sum(1 for t, lt in zip(tv, lambdas) if abs(t[j]) >= lt * abs(multi - t[j]))
        if votes >= k:
            s = sum(w * t[j] for w, t in zip(weights, tv))
            out[j] = s / sum(weights) if normalize else s
    return lam * out


@pytest.mark.parametrize("k", [0, 1, 2, 3, 4])
def test_consensus_matches_tall_mask_definition(k):
    base, tuned = family(shape=(12, 10), seed=13)
    lambdas, w = [0.2, 0.4, 0.6], [1.0, 0.5, 0.8]
    got = run("consensus_ta", base, tuned, [{"weight": x, "tall_lambda": lt} for x, lt in zip(w, lambdas)],
              {"k": k, "lambda": 0.6})
    ref = ref_consensus(taus(base, tuned), w, lambdas, k, 0.6)
    close(got, ref, base)
    if k == 0:  # keeps everything: task arithmetic
        close(got, 0.6 * sum(x * t for x, t in zip(w, taus(base, tuned))), base)
    if k == 4:  # more than T tasks must agree: nothing survives
        assert torch.equal(got, base)


def test_consensus_defaults_and_edge_cases():
    base, tuned = family(seed=14)
    got = run("consensus_ta", base, tuned, [{}, {}, {}])  # k = 2, tall_lambda 0.4, weight 1, lambda 1
    close(got, ref_consensus(taus(base, tuned), [1, 1, 1], [0.4] * 3, 2, 1.0), base)
    got = run("consensus_ta", base, tuned, [{}, {}, {}], {"normalize": True})
    close(got, ref_consensus(taus(base, tuned), [1, 1, 1], [0.4] * 3, 2, 1.0, normalize=True), base)
    # one model, k = 1: |tau| >= lambda * |tau - tau| = 0 always holds -> task arithmetic
    close(run("consensus_ta", base, tuned[:1], [{}], {"k": 1}), taus(base, tuned[:1])[0], base)
    # all-zero task vectors: nothing to add
    assert torch.equal(run("consensus_ta", base, [base.clone()] * 3, [{}] * 3, {"k": 1}), base)


def test_consensus_drops_selfish_and_catastrophic_entries():
    # entry 0: both tasks move it a lot in opposite directions -> both masks claim it;
    # entry 1: task 0 moves it slightly, task 1 a lot the other way -> only task 1 claims it ("selfish");
    # entry 2: tiny opposite moves -> both claim it.
    base = torch.zeros(3)
    t0 = torch.tensor([1.0, 0.01, 0.001])
    t1 = torch.tensor([-1.0, -1.0, -0.001])
    torch.testing.assert_close(run("consensus_ta", base, [t0, t1], [{}, {}], {"k": 1}), t0 + t1)
    torch.testing.assert_close(run("consensus_ta", base, [t0, t1], [{}, {}], {"k": 2}), torch.zeros(3))
    # with tall_lambda 2, equal moves are claimed by no task ("catastrophic"): |1| >= 2 |2 - 1| fails
    got = run("consensus_ta", base, [base + 1.0, base + 1.0], [{"tall_lambda": 2.0}] * 2, {"k": 1})
    assert torch.equal(got, base)


# -- registry and parameters -------------------------------------------------------------------------

def test_registry_names_and_aliases():
    for name in ("task_arithmetic", "linear", "weight_average", "ties", "dare_linear", "dare", "dare_ties",
                 "breadcrumbs", "breadcrumbs_ties", "consensus_ta"):
        m = methods.get(name)
        assert m.tensor_fn is not None and m.reference
    assert methods.get("dare") is methods.get("dare_linear")
    assert methods.get("linear") is methods.get("weight_average")
    with pytest.raises(KeyError, match="did you mean 'ties'"):
        methods.get("tie")


def test_resolve_scalars_gradients_and_conditions():
    r = P.resolve
    assert r(0.3, "x", 2, 5) == 0.3
    assert r([0.0, 1.0], "model.layers.0.mlp.up_proj.weight", 0, 5) == 0.0
    assert r([0.0, 1.0], "model.layers.4.mlp.up_proj.weight", 4, 5) == 1.0
    assert r([0.0, 1.0], "model.layers.1.mlp.up_proj.weight", 1, 5) == pytest.approx(0.25)
    assert r([0.0, 1.0, 0.0], "l", 1, 4) == pytest.approx(2 / 3)  # t = 1/3 -> 2/3 of the way to the middle
    assert r([1.0, 3.0], "model.embed_tokens.weight", None, 5) == 1.0  # outside the layers: t = 0
    assert r([1.0, 3.0], "model.layers.0.x", 0, 1) == 3.0  # a single layer sits at t = 1
    assert r([True, False, False], "x", 1, 3) is False  # booleans are picked, not interpolated
    assert r([True, False], "x", 1, 3) is True  # int(0.5 * 1) = 0
    conds = [{"filter": "mlp", "value": [0.0, 1.0]}, {"filter": "self_attn", "value": 0.4}, {"value": 0.7}]
    assert r(conds, "model.layers.2.mlp.up_proj.weight", 2, 3) == 1.0
    assert r(conds, "model.layers.2.self_attn.q_proj.weight", 2, 3) == 0.4
    assert r(conds, "model.norm.weight", None, 3) == 0.7
    assert r([{"filter": "mlp", "value": 1.0}], "model.norm.weight", None, 3) is None  # falls through
    assert r({"filter": "*", "value": 2.0}, "anything", None, 3) == 2.0
    assert P.layer_index("model.layers.12.self_attn.o_proj.weight") == 12
    assert P.layer_index("transformer.h.3.attn.c_attn.weight") == 3
    assert P.layer_index("lm_head.weight") is None


def test_resolve_tensor_params_precedence():
    m = methods.get("ties")
    own, top = P.validate_params(m, [{"density": [{"filter": "mlp", "value": 0.5}]}, None],
                                 {"density": 0.3, "weight": 0.7, "lambda": 2})
    per, shared = P.resolve_tensor_params(m, own, top, "model.layers.0.mlp.up_proj.weight", 0, 2)
    assert per == [{"weight": 0.7, "density": 0.5}, {"weight": 0.7, "density": 0.3}]
    assert shared == {"lambda": 2.0, "normalize": True, "rescale": False, "int8_mask": False}
    per, _ = P.resolve_tensor_params(m, own, top, "model.layers.0.self_attn.q_proj.weight", 0, 2)
    assert per[0]["density"] == 0.3  # no filter matched: the top-level value
    per, shared = P.resolve_tensor_params(m, [{}, {}], {}, "x", None, 2)
    assert per == [{"weight": 1.0, "density": 1.0}] * 2 and shared["normalize"] is True
    # raw settings (not passed through validate_params) are coerced on resolution too
    per, shared = P.resolve_tensor_params(m, [{"density": "2e-1"}], {"normalize": "false", "seed": 0}, "x", None, 2)
    assert per == [{"weight": 1.0, "density": 0.2}] and shared["normalize"] is False
    with pytest.raises(ValueError, match=r"models\[0\], tensor x: parameter 'density' must be in \(0, 1\]"):
        P.resolve_tensor_params(m, [{"density": 2}], {}, "x", None, 2)
    c = methods.get("consensus_ta")
    with pytest.raises(ValueError, match="'k' must be an integer, got 1.5"):
        P.resolve_tensor_params(c, [{}], {"k": [1, 2]}, "model.layers.1.x", 1, 3)
    _, top = P.validate_params(c, [None], {"k": [1, 3]})
    assert P.resolve_tensor_params(c, [{}], top, "model.layers.1.x", 1, 3)[1]["k"] == 2


def test_validate_coerces_types():
    m = methods.get("breadcrumbs")
    own, top = P.validate_params(m, [{"density": "9e-1", "gamma": 0}], {"normalize": "true", "lambda": 1, "seed": 3})
    assert own == [{"density": 0.9, "gamma": 0.0}]
    assert top == {"normalize": True, "lambda": 1.0, "seed": 3}
    assert isinstance(top["lambda"], float)


@pytest.mark.parametrize("method,model_params,params,match", [
    ("ties", [{"densty": 0.2}], {}, r"models\[0\] \(./zoo/math\): unknown parameter 'densty'.*did you mean 'density'"),
    ("ties", [{}], {"lamda": 1.0}, r"parameters: unknown parameter 'lamda'.*did you mean 'lambda'"),
    ("ties", [{"lambda": 0.5}], {}, r"'lambda' is a method-level parameter of 'ties'.*top-level"),
    ("ties", [{"density": 0.0}], {}, r"'density' must be in \(0, 1\], got 0.0"),
    ("ties", [{"density": [0.5, 1.5]}], {}, r"'density' must be in \(0, 1\], got 1.5"),
    ("ties", [{"density": "high"}], {}, r"models\[0\] \(./zoo/math\): parameter 'density' must be a number"),
    ("ties", [{}], {"normalize": "maybe"}, r"'normalize' must be true or false"),
    ("ties", [{"weight": float("nan")}], {}, r"'weight' must be a finite number"),
    ("ties", [{"weight": [{"filtr": "mlp", "value": 1}]}], {}, r"unknown key 'filtr' \(did you mean 'filter'\?\)"),
    ("ties", [{"weight": [{"filter": "mlp"}]}], {}, r"has no 'value'"),
    ("ties", [{"weight": [{"filter": "mlp", "value": 1}, 0.5]}], {}, r"mixes conditions and values"),
    ("ties", [{"weight": []}], {}, r"empty list"),
    ("breadcrumbs", [{"gamma": -0.1}], {}, r"'gamma' must be in \[0, 1\]"),
    ("consensus_ta", [{}], {"k": 1.5}, r"'k' must be an integer"),
    ("consensus_ta", [{"tall_lambda": -1}], {}, r"'tall_lambda' must be in \[0, inf\)"),
    ("dare_linear", [{"p": 0.9}], {}, r"unknown parameter 'p' for merge_method 'dare_linear'"),
    ("linear", [{"weight": True}], {}, r"'weight' must be a number"),
])
def test_validation_errors(method, model_params, params, match):
    with pytest.raises(ValueError, match=match):
        P.validate_params(methods.get(method), model_params, params, ["./zoo/math"])


def test_required_parameter_error():
    m = methods.Method(name="needs_w", tensor_fn=None, model_params={"weight": methods.REQUIRED})
    with pytest.raises(ValueError, match=r"models\[1\] \(b\): missing required parameter 'weight'"):
        P.validate_params(m, [{"weight": 1.0}, {}], {}, ["a", "b"])
    P.validate_params(m, [{}, {}], {"weight": 0.5})  # a top-level value serves every model
    own, top = P.validate_params(m, [{"weight": [{"filter": "mlp", "value": 1.0}]}], {})
    with pytest.raises(ValueError, match="required parameter 'weight'.*no filter matched"):
        P.resolve_tensor_params(m, own, top, "model.norm.weight", None, 2)


def test_kth_smallest_radix_select_matches_sort():
    # The threshold finder behind every top-k / band: checked against a full sort, including ties,
    # zeros, subnormals, and huge and infinite magnitudes.
    g = torch.Generator().manual_seed(21)
    for trial in range(200):
        n = int(torch.randint(1, 300, (1,), generator=g))
        a = torch.rand(n, generator=g)
        if trial % 4 == 1:
            a = (a * 5).floor()
        elif trial % 4 == 2:
            a = a * torch.exp(25 * torch.randn(n, generator=g))
        elif trial % 4 == 3:
            a = torch.zeros(n)
        k = int(torch.randint(1, n + 1, (1,), generator=g))
        assert common.kth_smallest(a, k).item() == torch.sort(a).values[k - 1].item()
        for dt in (torch.bfloat16, torch.float16):  # reduced merge dtypes: upcast, the same value
            r = a.to(dt)
            got = common.kth_smallest(r, k)
            assert got.dtype == dt and got.item() == torch.sort(r).values[k - 1].item()
    a = torch.tensor([float("inf"), 0.0, 1e-45, 3.4e38])
    assert [common.kth_smallest(a, k).item() for k in (1, 2, 3, 4)] == sorted(a.tolist())


def _mergekit_ties_stable(base, tuned, weights, density, normalize=True, lam=1.0):
    """mergekit 0.1.5's generalized task arithmetic for TIES (merge_group + sparsify.magnitude +
    get_mask), written out here in the tensors' own dtype, with one change: its top-k argsort is made
    stable (mergekit's is not, so ties between equal magnitudes land anywhere)."""
    deltas = base.new_empty((len(tuned), *base.shape))
    for i, t in enumerate(tuned):
        delta = t - base
        k = max(1, int(density * delta.numel()))
        mask = torch.zeros(delta.numel(), dtype=delta.dtype)
        top = torch.sort(delta.abs().reshape(-1).float(), descending=True, stable=True).indices[:k]
        mask[top] = 1
        deltas[i] = delta * mask.reshape_as(delta)
    w = torch.tensor(weights, dtype=deltas.dtype).reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    sign = deltas.sign().to(base.dtype)
    majority = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
    agree = sign == majority
    mixed = (deltas * agree).sum(dim=0)
    divisor = (w * agree).sum(dim=0)
    divisor[divisor == 0] = 1
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_in_a_reduced_dtype_is_mergekits_algorithm_up_to_tie_order(dtype):
    """In bfloat16 many magnitudes are equal; slta keeps the earlier of equal entries (a stable order),
    mergekit wherever its unstable sort puts them. Against mergekit's algorithm with a stable sort,
    slta's TIES is bit for bit the same: the only difference from mergekit is the tie order."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(96, 80, generator=g).to(dtype)
    tuned = [base + (0.02 * torch.randn(96, 80, generator=g)).to(dtype) for _ in range(3)]
    weights, density = [1.0, 0.6, 0.3], 0.3
    m = methods.get("ties")
    ours = m.tensor_fn("x", base, tuned, [{"weight": w, "density": density} for w in weights],
                       {"lambda": 0.9, "normalize": True, "rescale": False, "int8_mask": False}, 0)
    ref = _mergekit_ties_stable(base, tuned, weights, density, lam=0.9)
    assert ours.dtype == dtype
    assert torch.equal(ours.view(torch.int16), ref.view(torch.int16))
    mags = (tuned[0] - base).abs().reshape(-1)
    assert mags.unique().numel() < mags.numel() // 4  # plenty of ties: the order matters here
