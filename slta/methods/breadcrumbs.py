"""Model Breadcrumbs (Davari & Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with
Sparse Masks", ECCV 2024, arXiv:2312.06795).

Per tensor ("layer-wise" in the paper), each task vector loses its largest-magnitude entries (outliers)
and its smallest ones (negligible perturbations); the remaining "breadcrumbs" are merged by task
arithmetic (``breadcrumbs``) or with TIES's sign election (``breadcrumbs_ties``).

Parameterised as in mergekit: ``gamma`` is the fraction of the LARGEST magnitudes dropped and ``density``
the fraction kept, so the smallest 1 - density - gamma are dropped. (The authors' code,
github.com/rezazzr/breadcrumbs, calls the same two numbers beta = kept and gamma = largest removed, and
cuts per row where mergekit and slta cut per tensor.) Defaults are mergekit's, density 1.0 (keep all)
and gamma 0.01, so the same YAML gives the same tensors; the authors' hyper-parameter search starts at
density 0.15, gamma 0.006 (find_best_hyperparam.py, "middle_keep") and tunes both on validation data.
"""

from __future__ import annotations

from typing import Any

import torch

from slta.methods import Method, register
from slta.methods.common import band_mask, combine, l1_rescale


def _merge(base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
           params: dict[str, Any], sign_consensus: bool) -> torch.Tensor:
    rescale = bool(params.get("rescale", False))

    def sparsify(i: int, tau: torch.Tensor):
        p = model_params[i]
        mask = band_mask(tau, float(p.get("density", 1.0)), float(p.get("gamma", 0.01)))
        return mask, (l1_rescale(tau, mask) if rescale else 1.0)

    return combine(
        base, tuned, [float(p.get("weight", 1.0)) for p in model_params], sparsify,
        sign_consensus=sign_consensus, normalize=bool(params.get("normalize", False)),
        lam=float(params.get("lambda", 1.0)),
    )


def merge(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
          params: dict[str, Any], seed: int) -> torch.Tensor:
    """Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest (`gamma`) and smallest magnitudes
    of τ_t, keeping the fraction `density`; then task arithmetic."""
    return _merge(base, tuned, model_params, params, sign_consensus=False)


def merge_ties(name: str, base: torch.Tensor, tuned: list[torch.Tensor], model_params: list[dict[str, Any]],
               params: dict[str, Any], seed: int) -> torch.Tensor:
    """Breadcrumbs' masks, then TIES's sign election and disjoint mean."""
    return _merge(base, tuned, model_params, params, sign_consensus=True)


_REFERENCE = ("Davari & Belilovsky, Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks, "
              "ECCV 2024 (arXiv:2312.06795)")

for _name, _fn in (("breadcrumbs", merge), ("breadcrumbs_ties", merge_ties)):
    register(
        Method(
            name=_name,
            tensor_fn=_fn,
            model_params={"weight": 1.0, "density": 1.0, "gamma": 0.01},
            method_params={"lambda": 1.0, "normalize": False, "rescale": False, "int8_mask": False},
            tuned_as_stored=True,
            reference=_REFERENCE,
        )
    )
