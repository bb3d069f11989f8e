"""slta.engine.compat.build_mask names the mask functions' arguments as each supported transformers release does.

CI runs the suite at both ends of the range (5.0.0 and the newest); the releases in between combine
the names differently (`inputs_embeds` with `past_key_values`), so the three signatures are stood in
for here, copied from transformers' masking_utils, and the call is also checked against the real one.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig
from transformers.masking_utils import create_causal_mask

from slta.engine.compat import build_mask

CALLS: list[dict] = []


def v5_0(config, input_embeds, attention_mask, cache_position, past_key_values, position_ids=None,
         or_mask_function=None, and_mask_function=None):  # 5.0.0-5.1.x
    CALLS.append(dict(input_embeds=input_embeds, cache_position=cache_position, past_key_values=past_key_values))


def v5_4(config, inputs_embeds, attention_mask, cache_position=None, *, past_key_values, position_ids=None,
         or_mask_function=None, and_mask_function=None):  # 5.4.0-5.5.x (5.2-5.3: cache_position required)
    CALLS.append(dict(inputs_embeds=inputs_embeds, cache_position=cache_position, past_key_values=past_key_values))


def v5_24(config, inputs_embeds, attention_mask, cache, position_ids=None, or_mask_function=None,
          and_mask_function=None, block_sequence_ids=None, layer_idx=None, allow_is_causal_skip=True):  # 5.24.0-
    CALLS.append(dict(inputs_embeds=inputs_embeds, cache=cache))


def test_build_mask_names_the_arguments_as_each_release_does():
    embeds, valid, pos = torch.zeros(2, 5, 8), torch.ones(2, 5, dtype=torch.long), torch.arange(5)[None]
    expected = {v5_0: {"input_embeds", "cache_position", "past_key_values"},
                v5_4: {"inputs_embeds", "cache_position", "past_key_values"}, v5_24: {"inputs_embeds", "cache"}}
    for fn, names in expected.items():
        CALLS.clear()
        build_mask(fn, None, embeds, valid, pos)
        [got] = CALLS
        assert got.keys() == names, fn.__name__
        assert got.get("input_embeds", got.get("inputs_embeds")) is embeds, fn.__name__
        assert got.get("cache", got.get("past_key_values", "missing")) is None, fn.__name__
        if fn is v5_0:  # required there: the query positions
            assert torch.equal(got["cache_position"], torch.arange(5))
        if fn is v5_4:  # optional and unused there: left out
            assert got["cache_position"] is None


def test_build_mask_matches_the_installed_transformers_mask():
    config = LlamaConfig(hidden_size=8, num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=1,
                         intermediate_size=16, vocab_size=10)
    config._attn_implementation = "eager"  # a dense additive mask, whatever the default attention
    valid = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    mask = build_mask(create_causal_mask, config, torch.zeros(2, 4, 8), valid, torch.arange(4)[None])
    allowed = mask[:, 0] == 0  # (b, q, k): True where attention may look
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    assert torch.equal(allowed[1], causal)
    assert torch.equal(allowed[0, :, :3], causal[:, :3]) and not allowed[0, :, 3].any()  # the pad is never seen


def test_cache_kwarg_is_the_name_forward_takes_and_returns():
    """The KV cache's name (`past_key_values` up to 5.23, `cache` from 5.24) is a parameter of the model's
    forward and the field of its output that holds the cache, at whichever end of the range runs."""
    import inspect

    from transformers import LlamaForCausalLM

    from slta.engine.compat import cache_kwarg

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(config).eval()
    name = cache_kwarg(model)
    assert name in inspect.signature(model.forward).parameters
    with torch.no_grad():
        first = model(input_ids=torch.tensor([[1, 2, 3]]), use_cache=True)
        cache = getattr(first, name)
        assert cache.get_seq_length() == 3
        model(input_ids=torch.tensor([[4]]), use_cache=True, **{name: cache})  # taken back under the same name
    assert cache.get_seq_length() == 4
