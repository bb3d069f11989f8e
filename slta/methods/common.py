"""Pieces shared by the sparsify-then-combine methods (TIES, DARE, Model Breadcrumbs).

mergekit calls this family "generalized task arithmetic": each task vector tau_t = theta_t - theta_0
is sparsified on its own (top-k by magnitude, at random, or a magnitude band), multiplied by its
weight w_t, optionally put through TIES's sign election (Yadav et al., NeurIPS 2023), summed,
optionally divided by the weights, scaled by lambda and added back to the base:

    theta = theta_0 + lambda * sum_t w_t * m_t * s_t * tau_t   [/ sum_t w_t m_t  if normalize]

with m_t the keep mask, s_t a rescale factor and, under sign election, m_t also zero where
sign(w_t tau_t) disagrees with the elected sign. :func:`combine` implements it for one tensor,
holding the T keep masks as booleans and at most four float copies of the tensor.
"""

from __future__ import annotations

import hashlib
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch

# nonzero() over a chunk of this many entries allocates at most 32 MiB of int64 indices.
_CHUNK = 1 << 22


def kth_smallest(magnitudes: torch.Tensor, k: int) -> torch.Tensor:
    """The k-th smallest (1-based) entry of a flat tensor of non-negative float32 values, as a 0-d tensor.

    A two-pass radix select: non-negative float32 values order like their bit patterns read as int32,
    so a histogram of the high 16 bits finds the bucket holding rank k and a histogram of the low 16
    bits inside that bucket finds the value. Linear time and one int32 temporary, where
    ``torch.kthvalue`` copies the values and allocates int64 indices (three float32 copies in all) and
    is several times slower on the CPU.
    """
    if magnitudes.dtype in (torch.bfloat16, torch.float16):  # exact upcast: the same k-th value, no int64 indices
        return kth_smallest(magnitudes.float(), k).to(magnitudes.dtype)
    if magnitudes.dtype != torch.float32:
        return torch.kthvalue(magnitudes, k).values
    bits = magnitudes.view(torch.int32)
    high = bits >> 16  # 0..32767: the sign bit is 0 for non-negative values
    cum = torch.bincount(high, minlength=1 << 15).cumsum(0)
    bucket = int(torch.searchsorted(cum, k))  # first bucket whose cumulative count reaches k
    before = int(cum[bucket - 1]) if bucket > 0 else 0
    del high, cum
    low = bits[(bits >> 16) == bucket] & 0xFFFF
    cum = torch.bincount(low, minlength=1 << 16).cumsum(0)
    value = (bucket << 16) | int(torch.searchsorted(cum, k - before))
    return torch.tensor([value], dtype=torch.int32, device=magnitudes.device).view(torch.float32)[0]


def lowest_ranked(values: torch.Tensor, count: int) -> torch.Tensor:
    """Boolean mask (same shape as ``values``, non-negative magnitudes) of the ``count`` entries that rank lowest.

    Entries rank by value; among equal values an earlier (row-major) position ranks higher. This
    fixed tie rule makes a top-k independent of the sort algorithm (mergekit leaves ties to
    ``torch.argsort``, which is not stable). The threshold comes from :func:`kth_smallest` instead of
    a full argsort, whose int64 indices would cost two extra copies of a float32 tensor: that matters
    for 70B-sized embedding matrices.
    """
    flat = values.reshape(-1)
    n = flat.numel()
    if count <= 0:
        return torch.zeros(values.shape, dtype=torch.bool, device=values.device)
    if count >= n:
        return torch.ones(values.shape, dtype=torch.bool, device=values.device)
    threshold = kth_smallest(flat, count)
    mask = flat < threshold
    need = count - int(torch.count_nonzero(mask))  # how many entries equal to the threshold still belong in
    equal = flat == threshold
    if need == int(torch.count_nonzero(equal)):
        mask |= equal
    else:
        # Later positions rank lower, so take the last `need` entries equal to the threshold,
        # scanning chunk by chunk from the end so the index buffer stays small.
        end = n
        while need > 0:
            start = max(0, end - _CHUNK)
            idx = equal[start:end].nonzero().reshape(-1)
            take = idx[idx.numel() - need:] if idx.numel() > need else idx
            mask[start + take] = True
            need -= take.numel()
            end = start
    return mask.reshape(values.shape)


def topk_mask(tau: torch.Tensor, density: float) -> torch.Tensor | None:
    """Keep the ``max(1, int(density * n))`` largest |tau| (TIES "trim", Yadav et al. 2023, Sec. 3).

    ``None`` means keep everything (density >= 1), as in mergekit, which also keeps at least one
    entry of a non-empty tensor and drops everything at density <= 0.
    """
    n = tau.numel()
    if density >= 1:
        return None
    if density <= 0 or n == 0:
        return torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
    k = max(1, int(density * n))
    return ~lowest_ranked(tau.abs(), n - k)


def band_mask(tau: torch.Tensor, density: float, gamma: float) -> torch.Tensor | None:
    """Model Breadcrumbs mask (Davari & Belilovsky 2023): drop the largest ``gamma`` fraction of
    |tau| (outliers) and enough of the smallest that ``density`` of the entries remain.

    Counts as in mergekit: keep ``int(density * n)`` entries, drop the top ``int(gamma * n)``; when
    the two overlap the outlier cut shrinks so that exactly ``int(density * n)`` remain.
    """
    if density >= 1:
        return None
    n = tau.numel()
    keep = int(density * n)
    top = int(gamma * n)
    bottom = max(0, n - keep - top)
    magnitude = tau.abs()
    return lowest_ranked(magnitude, bottom + keep) & ~lowest_ranked(magnitude, bottom)


def tensor_generator(seed: int, name: str, index: int) -> torch.Generator:
    """A CPU generator for model ``index``'s mask of tensor ``name``.

    Derived from a stable hash (blake2b, not Python's salted ``hash()``) so a merge is
    reproducible across runs, machines and devices, and independent of the order in which the
    driver visits tensors.
    """
    digest = hashlib.blake2b(f"{seed}\x00{name}\x00{index}".encode(), digest_size=8).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest, "little") >> 1)


def random_mask(tau: torch.Tensor, density: float, generator: torch.Generator) -> torch.Tensor | None:
    """DARE's drop mask (Yu et al., ICML 2024): keep each entry with probability ``density`` = 1 - p.

    Drawn on the CPU and moved to ``tau``'s device so the same seed gives the same mask on any device.
    """
    if density >= 1:
        return None
    if density <= 0:
        return torch.zeros(tau.shape, dtype=torch.bool, device=tau.device)
    keep = torch.rand(tau.shape, generator=generator, dtype=torch.float32) < density
    return keep.to(tau.device)


def l1_rescale(tau: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor | float:
    """Factor that gives the masked tau the L1 norm of tau (mergekit's ``rescale``, RescaleNorm.l1).

    Returns 1.0 when either norm is below 1e-7 (an all-zero or all-dropped task vector), as mergekit does.
    """
    if mask is None:
        return 1.0
    before = tau.abs().sum()
    after = (tau * mask).abs().sum()
    if before < 1e-7 or after < 1e-7:
        return 1.0
    return before / after


# Entries per block of `plain_in_blocks`: a block of the T+1 inputs, one difference and the sum (2 MiB
# each in float32) stay in the CPU's caches from one operation to the next.
BLOCK = 1 << 19


def plain_in_blocks(base: torch.Tensor, tuned: list[torch.Tensor], weights: list[float], *, normalize: bool,
                    lam: float, block: int = BLOCK) -> torch.Tensor:
    """:func:`combine` without sparsification or sign election (task arithmetic, θ_0 + λ Σ_t w_t τ_t,
    Eq. 1), one block of entries at a time: per entry the same operations in the same order as the
    whole-tensor code (in float32, or in a bfloat16/float16 base's dtype as :func:`combine_in_dtype`),
    so the same bits. Whole-tensor operations stream every tensor through memory once per operation
    (3T + 4 times for T models); in blocks each input is read from memory once and the output written once.

    The blocks are shared out to torch's number of threads, each running single-threaded operations
    and taking the next free block: no operation waits for a second core, which stalls whole-tensor
    operations when another process holds one of two cores.
    """
    reduced = base.dtype in (torch.bfloat16, torch.float16)
    n, T = base.numel(), len(tuned)
    out = torch.empty_like(base, memory_format=torch.contiguous_format)
    o, b, ts = out.view(-1), base.reshape(-1), [t.reshape(-1) for t in tuned]
    if reduced:  # combine_in_dtype's weights and divisor
        w = torch.tensor(weights, dtype=base.dtype, device=base.device).reshape(-1, 1)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    else:
        weight_sum = float(torch.tensor(weights, dtype=torch.float32).sum())  # float32, like mergekit
    starts = iter(range(0, n, block))  # shared by the workers: next() is atomic under the GIL

    def worker() -> None:
        scratch = base.new_empty((T, block) if reduced else (block,))
        for lo in starts:
            hi = min(n, lo + block)
            ob, bb = o[lo:hi], b[lo:hi]
            if reduced:  # the stacked task vectors, contiguous (a partial block gets its own buffer)
                deltas = scratch if hi - lo == block else base.new_empty((T, hi - lo))
                for i in range(T):
                    torch.sub(ts[i][lo:hi], bb, out=deltas[i])
                deltas.mul_(w)
                torch.sum(deltas, dim=0, out=ob)  # accumulated in float32, rounded once
                if normalize:
                    ob.div_(divisor)
            else:
                d = scratch[:hi - lo]
                ob.zero_()
                for i in range(T):
                    if ts[i].dtype == base.dtype:
                        torch.sub(ts[i][lo:hi], bb, out=d)
                    else:  # tuned as stored (e.g. bfloat16): an exact upcast, then the float32 subtraction
                        d.copy_(ts[i][lo:hi]).sub_(bb)
                    ob.add_(d if weights[i] == 1.0 else d.mul_(weights[i]))
                if normalize and abs(weight_sum) >= 1e-8:
                    ob.div_(weight_sum)
            if lam != 1:
                ob.mul_(lam)
            ob.add_(bb)

    threads = torch.get_num_threads()
    workers = max(1, min(threads, -(-n // block)))
    if workers == 1:
        worker()
        return out
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers) as pool:
            for f in [pool.submit(worker) for _ in range(workers)]:
                f.result()
    finally:
        torch.set_num_threads(threads)
    return out


# sparsify(index, tau) -> (keep mask or None for "keep all", rescale factor)
Sparsify = Callable[[int, torch.Tensor], "tuple[torch.Tensor | None, torch.Tensor | float]"]


def combine(
    base: torch.Tensor,
    tuned: list[torch.Tensor],
    weights: list[float],
    sparsify: Sparsify | None,
    *,
    sign_consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """Sparsify each task vector, weight, (elect signs,) sum, (normalize,) scale by lambda, add to base.

    ``sparsify=None`` keeps every entry (plain task arithmetic).

    Sign election is TIES's (Yadav et al. 2023, Sec. 3, "elect" and "disjoint merge") as mergekit
    implements it: the elected sign of an entry is that of sum_t w_t tau_hat_t (a zero sum elects +);
    an entry of model t takes part where sign(w_t tau_hat_t) equals it (zeros never do); with
    ``normalize`` the sum is divided by the sum of the weights that take part (the weighted
    "disjoint mean"; entries where none do stay at the base). Without sign election, ``normalize``
    divides by sum_t w_t (left alone when |sum_t w_t| < 1e-8).
    """
    if not tuned:
        return base.clone()
    if sparsify is None and not sign_consensus:  # task arithmetic: cache-sized blocks on the CPU, whole on a GPU
        block = BLOCK if base.device.type == "cpu" else max(1, base.numel())
        return plain_in_blocks(base, tuned, weights, normalize=normalize, lam=lam, block=block)
    if base.dtype in (torch.bfloat16, torch.float16):
        return combine_in_dtype(base, tuned, weights, sparsify, sign_consensus=sign_consensus, normalize=normalize,
                                lam=lam)

    def difference(i: int, out: torch.Tensor | None = None) -> torch.Tensor:
        # tuned as stored (e.g. bfloat16) minus the float32 base: an exact upcast, then a float32
        # subtraction, is the same bits as the mixed-dtype `tuned - base` and about 2x faster on the CPU
        if tuned[i].dtype == base.dtype:
            return torch.sub(tuned[i], base, out=out) if out is not None else tuned[i] - base
        return (torch.empty_like(base) if out is None else out).copy_(tuned[i]).sub_(base)

    def sparse_tau(i: int, mask: torch.Tensor | None, scale: torch.Tensor | float,
                   tau: torch.Tensor | None = None) -> torch.Tensor:
        # Same operation order as mergekit ((tau * mask) * scale) * weight, so results agree to rounding.
        tau = difference(i) if tau is None else tau
        if mask is not None:
            tau.masked_fill_(~mask, 0)  # = tau * mask, without casting the mask to float
        if not (isinstance(scale, float) and scale == 1.0):
            tau.mul_(scale)
        # x * 1.0 == x bit for bit (signed zeros included): skip the pass
        return tau if weights[i] == 1.0 else tau.mul_(weights[i])

    masks: list[tuple[torch.Tensor | None, torch.Tensor | float]] = []
    total = torch.zeros_like(base)
    buf = torch.empty_like(base) if sparsify is None else None  # one reused difference buffer: no page faults per model
    for i in range(len(tuned)):
        tau = difference(i, buf)
        mask, scale = sparsify(i, tau) if sparsify is not None else (None, 1.0)
        if sign_consensus:  # the second pass needs them; booleans cost a quarter of a float32 copy each
            masks.append((mask, scale))
        total.add_(sparse_tau(i, mask, scale, tau))
        del tau

    if sign_consensus:
        positive = total >= 0  # the elected sign: + where the weighted sum is >= 0
        total.zero_()
        divisor = torch.zeros_like(base)
        for i, (mask, scale) in enumerate(masks):
            delta = sparse_tau(i, mask, scale)
            agree = torch.where(positive, delta > 0, delta < 0)
            total.add_(delta.masked_fill_(~agree, 0))
            divisor.add_(agree, alpha=weights[i])
            del delta, agree
        if normalize:
            divisor[divisor == 0] = 1
            total.div_(divisor)
    elif normalize:
        weight_sum = float(torch.tensor(weights, dtype=torch.float32).sum())  # float32, like mergekit
        if abs(weight_sum) >= 1e-8:
            total.div_(weight_sum)

    if lam != 1:
        total.mul_(lam)
    return total.add_(base)


def combine_in_dtype(
    base: torch.Tensor,
    tuned: list[torch.Tensor],
    weights: list[float],
    sparsify: Sparsify | None,
    *,
    sign_consensus: bool,
    normalize: bool,
    lam: float,
) -> torch.Tensor:
    """:func:`combine` computed in a reduced merge dtype (bfloat16, float16), as mergekit computes it.

    mergekit casts every input to the merge's ``dtype`` and does the arithmetic there: each task
    vector rounded to that dtype, masked by multiplication, the weights rounded to it, the T weighted
    vectors stacked and summed (torch accumulates the sum in float32 and rounds once), the sign
    election, the divisor, λ and the base addition each rounded to it. Doing the same operations
    in the same order gives mergekit's bits; computing in float32 and rounding once (the float32
    path) is closer to the exact value but differs from mergekit in the last bit.
    """
    deltas = base.new_empty((len(tuned), *base.shape))
    for i, t in enumerate(tuned):
        tau = t - base
        if sparsify is not None:
            mask, scale = sparsify(i, tau)
            if mask is not None:
                tau = tau * mask  # multiplication, not masked_fill: -x * 0 = -0, as in mergekit
                if not (isinstance(scale, float) and scale == 1.0):
                    tau = tau * scale
        deltas[i] = tau
        del tau
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).reshape(-1, *([1] * base.dim()))
    deltas.mul_(w)
    if sign_consensus:  # TIES's election (the "sum" method), mergekit's get_mask
        majority = (deltas.sum(dim=0) >= 0).to(base.dtype) * 2 - 1
        agree = deltas.sign() == majority
        del majority
        mixed = (deltas * agree).sum(dim=0)
        divisor = (w * agree).sum(dim=0)
        divisor[divisor == 0] = 1
    else:
        mixed = deltas.sum(dim=0)
        divisor = w.sum(dim=0)
        divisor[divisor.abs() < 1e-8] = 1
    del deltas
    if normalize:
        mixed /= divisor
    if lam != 1:
        mixed *= lam
    return base + mixed

