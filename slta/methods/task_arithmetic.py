"""Task arithmetic (Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023):

    theta = theta_0 + lambda * sum_t w_t tau_t,   tau_t = theta_t - theta_0      (paper Eq. 1)

One lambda for all tasks, or per-model weights w_t (default 1), or both. As in mergekit's
``task_arithmetic``: ``normalize`` (default false) divides the weighted sum by sum_t w_t (skipped when
that sum is ~0), and lambda scales after that.
"""

from __future__ import annotations

from typing import Any

import torch

from slta.methods import Method, register
from slta.methods.common import combine


def merge(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
          params: dict[str, Any], seed: int) -> torch.Tensor:
    """Task arithmetic (Ilharco et al. 2023): θ_0 + λ Σ_t w_t τ_t (Eq. 1), mergekit's `normalize`, `lambda`."""
    return combine(
        base, tuned, [float(p.get("weight", 1.0)) for p in model_params], None,
        sign_consensus=False, normalize=bool(params.get("normalize", False)), lam=float(params.get("lambda", 1.0)),
    )


register(
    Method(
        name="task_arithmetic",
        tensor_fn=merge,
        model_params={"weight": 1.0},
        method_params={"lambda": 1.0, "normalize": False, "int8_mask": False},
        tuned_as_stored=True,
        propagates_nonfinite=True,  # θ_0 + λ Σ w_t (θ_t - θ_0): NaN/Inf survive every step, also × 0
        reference="Ilharco et al., Editing Models with Task Arithmetic, ICLR 2023 (arXiv:2212.04089)",
    )
)
