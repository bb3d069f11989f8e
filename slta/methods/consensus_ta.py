"""Consensus Task Arithmetic (Wang, Dimitriadis et al., "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024, arXiv:2405.07813).

TALL masks localise each task's information in the multi-task vector tau_MTL = sum_t tau_t:

    m_t = |tau_t| >= lambda_t * |tau_MTL - tau_t|          (per entry; ``tall_lambda`` per model)

An entry that no task needs ("catastrophic") or only one task needs ("selfish") hurts the merge, so
consensus merging keeps only the entries at least ``k`` tasks' masks agree on (k = 2 in the paper)
and applies task arithmetic to the masked multi-task vector:

    theta = theta_0 + lambda * (sum_t m_t >= k) * sum_t w_t tau_t

The masks are built from the unweighted tau_t as in the paper; the per-model ``weight`` (default 1,
the paper has none) only scales the final sum. k = 0 reduces to task arithmetic, k > T to the base.
mergekit has no such method.
"""

from __future__ import annotations

from typing import Any

import torch

from slta.methods import Method, register


def merge(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
          params: dict[str, Any], seed: int) -> torch.Tensor:
    """Consensus TA (Wang, Dimitriadis et al. 2024): TALL masks, keeping the entries at least k tasks agree on."""
    if not tuned:
        return base.clone()
    k = int(params.get("k", 2))
    weights = [float(p.get("weight", 1.0)) for p in model_params]

    multi = torch.zeros_like(base)  # tau_MTL
    for t in tuned:
        multi.add_(t - base)

    votes = torch.zeros(base.shape, dtype=torch.int32, device=base.device)
    merged = torch.zeros_like(base)
    for t, w, p in zip(tuned, weights, model_params):
        tau = t - base
        votes.add_(tau.abs() >= (multi - tau).abs().mul_(float(p.get("tall_lambda", 0.4))))
        merged.add_(tau, alpha=w)
        del tau
    del multi

    if params.get("normalize", False):
        weight_sum = sum(weights)
        if abs(weight_sum) >= 1e-8:
            merged.div_(weight_sum)
    merged.mul_(votes >= k)
    return merged.mul_(float(params.get("lambda", 1.0))).add_(base)


register(
    Method(
        name="consensus_ta",
        tensor_fn=merge,
        model_params={"weight": 1.0, "tall_lambda": 0.4},
        method_params={"lambda": 1.0, "k": 2, "normalize": False},
        aliases=("consensus",),
        reference="Wang et al., Localizing Task Information for Improved Model Merging and Compression, "
                  "ICML 2024 (arXiv:2405.07813)",
    )
)
