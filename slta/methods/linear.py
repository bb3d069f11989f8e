"""Weight averaging (Wortsman et al., "Model soups", ICML 2022): theta = sum_t w_t theta_t / sum_t w_t.

mergekit calls it ``linear``; same parameters: per-model ``weight`` and ``normalize`` (default true).
The base model is not used. slta differs in two small ways: ``weight`` defaults to 1 (a uniform soup;
mergekit requires it), and weights summing to zero under ``normalize`` are an error instead of inf/NaN.
"""

from __future__ import annotations

from typing import Any

import torch

from slta.methods import Method, register


def merge(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
          params: dict[str, Any], seed: int) -> torch.Tensor:
    """Weight averaging (model soups): Σ_t w_t θ_t, divided by Σ_t w_t when `normalize` (mergekit's `linear`)."""
    weights = [float(p.get("weight", 1.0)) for p in model_params]
    out = torch.zeros_like(tuned[0])
    for w, t in zip(weights, tuned):
        out.add_(t, alpha=w)
    if params.get("normalize", True):
        total = float(torch.tensor(weights, dtype=torch.float32).sum())  # float32, like mergekit
        if total == 0:
            raise ValueError(f"{name}: the models' weights sum to zero, cannot normalize (set normalize: false)")
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
        reference="Wortsman et al., Model soups: averaging weights of multiple fine-tuned models improves "
                  "accuracy without increasing inference time, ICML 2022 (arXiv:2203.05482)",
    )
)
