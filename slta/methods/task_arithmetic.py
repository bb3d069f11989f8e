"""Task arithmetic (Ilharco et al., ICLR 2023): θ = θ_0 + λ Σ_t w_t τ_t  (paper Eq. 1)."""

from __future__ import annotations

from typing import Any

import torch

from slta.methods import REQUIRED, Method, register


def merge(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
          params: dict[str, Any], seed: int) -> torch.Tensor:
    weights = [float(p["weight"]) for p in model_params]
    delta = torch.zeros_like(base)
    for w, t in zip(weights, tuned):
        delta.add_(t - base, alpha=w)
    if params.get("normalize") and sum(weights) != 0:
        delta.div_(sum(weights))
    return base + float(params.get("lambda", 1.0)) * delta


register(
    Method(
        name="task_arithmetic",
        tensor_fn=merge,
        model_params={"weight": REQUIRED},
        method_params={"lambda": 1.0, "normalize": False},
        reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023",
    )
)
