"""Weight averaging (Wortsman et al., 2022): θ = Σ_t w_t θ_t / Σ_t w_t. mergekit calls it `linear`."""

from __future__ import annotations

from typing import Any

import torch

from slta.methods import Method, register


def merge(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
          params: dict[str, Any], seed: int) -> torch.Tensor:
    weights = [float(p.get("weight", 1.0)) for p in model_params]
    out = torch.zeros_like(tuned[0])
    for w, t in zip(weights, tuned):
        out.add_(t, alpha=w)
    if params.get("normalize", True):
        total = sum(weights)
        if total == 0:
            raise ValueError(f"{name}: weights sum to zero, cannot normalize")
        out.div_(total)
    return out


register(
    Method(
        name="weight_average",
        tensor_fn=merge,
        model_params={"weight": 1.0},
        method_params={"normalize": True},
        needs_base=False,
        aliases=("linear",),
        reference="Wortsman et al., Model soups, ICML 2022",
    )
)
