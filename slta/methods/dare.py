"""DARE (Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024): Drop And REscale.

Each entry of each task vector is dropped with probability p and the survivors are multiplied by
1 / (1 - p), which keeps the task vector's expected value (the paper's Eq. 2-3); the sparse task
vectors are then merged by task arithmetic (``dare_linear``, alias ``dare``) or by TIES's sign
election and disjoint merge (``dare_ties``). As in mergekit, p is given as ``density`` = 1 - p,
and an omitted density is mergekit's 1.0 (no drop; the same YAML gives the same tensors); the paper's
p = 0.9 is ``density: 0.1``.

The drop mask of model t for tensor ``name`` comes from a generator seeded with a stable hash of
(seed, name, t): a merge is byte-for-byte reproducible and does not depend on tensor order.
mergekit draws from torch's global RNG and rescales to match the L1 norm instead of by 1 / (1 - p),
so only density = 1 (no drop) can match mergekit exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from slta.methods import Method, register
from slta.methods.common import combine, random_mask, tensor_generator


def _merge(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
           params: dict[str, Any], seed: int, sign_consensus: bool) -> torch.Tensor:
    rescale = bool(params.get("rescale", True))

    def sparsify(i: int, tau: torch.Tensor):
        density = float(model_params[i].get("density", 1.0))
        mask = random_mask(tau, density, tensor_generator(seed, name, i))
        # 1 / (1 - p): the paper's rescale (Eq. 3); nothing to rescale when nothing was dropped or all was.
        return mask, (1.0 / density if rescale and mask is not None and density > 0 else 1.0)

    return combine(
        base, tuned, [float(p.get("weight", 1.0)) for p in model_params], sparsify,
        sign_consensus=sign_consensus, normalize=bool(params.get("normalize", False)),
        lam=float(params.get("lambda", 1.0)),
    )


def merge_linear(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
                 params: dict[str, Any], seed: int) -> torch.Tensor:
    """DARE (Yu et al. 2024) + task arithmetic: drop entries of τ_t with probability 1 - density, rescale."""
    return _merge(name, base, tuned, model_params, params, seed, sign_consensus=False)


def merge_ties(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
               params: dict[str, Any], seed: int) -> torch.Tensor:
    """DARE's drop-and-rescale, then TIES's sign election and disjoint mean."""
    return _merge(name, base, tuned, model_params, params, seed, sign_consensus=True)


_REFERENCE = ("Yu et al., Language Models are Super Mario: Absorbing Abilities from Homologous Models "
              "as a Free Lunch, ICML 2024 (arXiv:2311.03099)")

register(
    Method(
        name="dare_linear",
        tensor_fn=merge_linear,
        model_params={"weight": 1.0, "density": 1.0},
        method_params={"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False},
        aliases=("dare",),
        tuned_as_stored=True,
        reference=_REFERENCE,
    )
)

register(
    Method(
        name="dare_ties",
        tensor_fn=merge_ties,
        model_params={"weight": 1.0, "density": 1.0},
        method_params={"lambda": 1.0, "normalize": False, "rescale": True, "int8_mask": False},
        tuned_as_stored=True,
        reference=_REFERENCE,
    )
)
