"""The one place where the transformers releases slta supports (pyproject.toml) differ for slta.

Everything else slta uses from transformers (the decoder layers' `position_embeddings` argument,
`from_pretrained(dtype=...)`, the model classes) works unchanged from 5.0.0, CI's low end, to the newest
5.x, its high end.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch


def build_mask(create_mask: Callable[..., Any], config: Any, inputs_embeds: torch.Tensor,
               attention_mask: torch.Tensor, position_ids: torch.Tensor) -> Any:
    """`create_mask(...)` (a `transformers.masking_utils` mask function) for a cache-less forward
    over positions `position_ids` (1, s), with its arguments named as the installed release names them:

    - the embeddings: `input_embeds` in 5.0-5.1, `inputs_embeds` from 5.2;
    - the cache: `past_key_values` up to 5.23, `cache` from 5.24 (the old name warns with a
      FutureWarning and goes in 5.40; pyproject.toml turns that warning into a test error);
    - `cache_position` (the query positions): required up to 5.3, optional and unused from 5.4.

    The names are read from the function's signature, not from a version number, so a release that
    renames them again fails here with transformers' own TypeError rather than passing silently.
    """
    params = inspect.signature(create_mask).parameters  # deprecate_kwarg wraps with functools.wraps
    kw: dict[str, Any] = dict(config=config, attention_mask=attention_mask, position_ids=position_ids)
    kw["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = inputs_embeds
    kw["cache" if "cache" in params else "past_key_values"] = None
    cache_position = params.get("cache_position")
    if cache_position is not None and cache_position.default is inspect.Parameter.empty:
        kw["cache_position"] = position_ids[0]
    return create_mask(**kw)


def cache_kwarg(model: Any) -> str:
    """The name under which `model.generate` and forward take a KV cache, and a forward's output holds
    it: `past_key_values` up to 5.23, `cache` from 5.24 (the old name warns, and goes in 6.0). Read from
    forward's signature."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
