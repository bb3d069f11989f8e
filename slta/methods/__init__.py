"""Registry of merge methods.

Two kinds of method exist:

* data-free methods (task_arithmetic, linear, ties, dare, ...) merge one tensor at a time
  from the base tensor and the T fine-tuned tensors. They implement :class:`TensorMethod`
  and the streaming engine (``slta.engine.walk``, client ``slta.merges.data_free``) feeds them tensor by tensor.
* data-driven methods (``slta``, ``regmean``) need calibration data and a streamed base
  forward pass; they run as their own engine clients (slta.merges.closed_form, slta.merges.regmean) and are only
  registered here by name so that config validation knows them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

# fn(name, base, tuned, model_params, params, seed) -> merged tensor (float32, base's shape)
#   name:         tensor name, e.g. "model.layers.3.mlp.up_proj.weight" (DARE derives its RNG from it)
#   base, tuned:  float32 tensors on the compute device; tuned is a list of T tensors
#   model_params: per-model parameters resolved for this tensor (e.g. {"weight": 0.5, "density": 0.2})
#   params:       method-level parameters resolved for this tensor (e.g. {"lambda": 1.0, "normalize": False})
#   seed:         the config's seed
TensorFn = Callable[[str, torch.Tensor, list[torch.Tensor], list[dict[str, Any]], dict[str, Any], int], torch.Tensor]


@dataclass(frozen=True)
class Method:
    name: str
    # For data-free methods: the per-tensor function. None for data-driven ones.
    tensor_fn: TensorFn | None
    # Accepted parameter names with defaults; "required" marks parameters without a default.
    model_params: dict[str, Any] = field(default_factory=dict)
    method_params: dict[str, Any] = field(default_factory=dict)
    needs_base: bool = True
    needs_data: bool = False
    aliases: tuple[str, ...] = ()
    reference: str = ""
    # The tensor function is slta.methods.common.combine's family (mergekit's "generalized task
    # arithmetic"). It takes the fine-tuned tensors in their stored dtype and forms `tuned[i] - base`
    # with the float32 base by an exact upcast, so no float32 copy of them is ever held (T copies of
    # the largest tensor: 2.6 GiB for a 70B MLP); and given a bfloat16/float16 base (a merge whose
    # `dtype` is that), it computes in that dtype in mergekit's order, for mergekit's bits.
    tuned_as_stored: bool = False
    # Every input entry reaches the output through arithmetic that keeps NaN/Inf (no masks, no
    # selection): a non-finite input always gives a non-finite output, which the writer refuses, so the
    # data-free client skips its separate pass over the T+1 inputs (one read of every input tensor).
    propagates_nonfinite: bool = False


REQUIRED = object()  # marker for a parameter with no default

_REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    for key in (method.name, *method.aliases):
        if key in _REGISTRY:
            raise ValueError(f"merge method {key!r} registered twice")
        _REGISTRY[key] = method
    return method


def get(name: str) -> Method:
    if name not in _REGISTRY:
        from difflib import get_close_matches

        close = get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise KeyError(f"unknown merge_method {name!r}{hint}; known: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def names() -> list[str]:
    return sorted(_REGISTRY)


# Importing the method modules registers them.
from slta.methods import breadcrumbs, consensus_ta, dare, linear, regmean, task_arithmetic, ties  # noqa: E402,F401

# slta's levels, coarsest first: where the model is cut into submodules, each with its own α per task
# (Sec. 3.2; slta.io.architecture cuts them)
GRANULARITIES = ("model", "layer", "attn_mlp", "head_mlp", "linear")

# Data-driven methods: implemented by engine clients (slta.merges.closed_form / slta.merges.regmean).
register(
    Method(
        name="slta",
        tensor_fn=None,
        needs_data=True,
        method_params={
            "granularity": "attn_mlp",
            "num_samples": 30,
            "balance": True,
            "max_length": 2048,
            "batch_size": 8,  # calibration samples per batch
            "batch_tokens": 16384,  # padded tokens per batch at most (bounds the activations; slta.merges.memory)
            "inputs": "base",  # beyond the paper: merged (A.5.3, slta.merges.progressive)
            "tokens": "all",  # beyond the paper: response, response_shifted (slta.engine.tokens)
            "refine": 0,  # beyond the paper: Gauss-Newton steps on Eq. 10 (slta.merges.refine)
            "targets": "module",  # beyond the paper: trajectory, the fine-tunes' own states (slta.merges.trajectory)
            "scale": 1.0,  # beyond the paper: every α times this; a one-parameter search, like λ (docs/methods.md)
            # (or one factor per model, or slta.solve.AUTO_SCALE: chosen from the calibration responses' loss)
            "scale_margin": 0.05,  # auto_task / auto_joint: nats per response token above the fine-tune's own loss
        },
        reference="Dai et al., Leveraging Submodule Linearity Enhances Task Arithmetic Performance in LLMs, ICLR 2025",
    )
)
