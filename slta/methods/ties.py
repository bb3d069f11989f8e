"""TIES-Merging (Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023).

Per tensor: trim each task vector to its top-``density`` fraction of magnitudes (the paper's k = 20%),
elect the sign of every entry by the weighted sum of the trimmed vectors, and average (the
"disjoint mean") only the entries that agree with the elected sign; scale by lambda and add to the base.
Parameters, their interaction and their defaults follow mergekit's ``ties``, so the same YAML gives the
same result: an omitted ``density`` is mergekit's 1.0 (no trim); the paper's k = 20% is ``density: 0.2``.
"""

from __future__ import annotations

from typing import Any

import torch

from slta.methods import Method, register
from slta.methods.common import combine, l1_rescale, topk_mask


def merge(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
          params: dict[str, Any], seed: int) -> torch.Tensor:
    """TIES (Yadav et al. 2023): trim each τ_t to its top-`density` magnitudes, elect a sign, disjoint mean."""
    rescale = bool(params.get("rescale", False))

    def sparsify(i: int, tau: torch.Tensor):
        mask = topk_mask(tau, float(model_params[i].get("density", 1.0)))
        return mask, (l1_rescale(tau, mask) if rescale else 1.0)

    return combine(
        base, tuned, [float(p.get("weight", 1.0)) for p in model_params], sparsify,
        sign_consensus=True, normalize=bool(params.get("normalize", True)), lam=float(params.get("lambda", 1.0)),
    )


register(
    Method(
        name="ties",
        tensor_fn=merge,
        model_params={"weight": 1.0, "density": 1.0},
        method_params={"lambda": 1.0, "normalize": True, "rescale": False, "int8_mask": False},
        tuned_as_stored=True,
        reference="Yadav et al., TIES-Merging: Resolving Interference When Merging Models, NeurIPS 2023 "
                  "(arXiv:2306.01708)",
    )
)
