"""Which positions of a calibration sample the objective counts (`tokens:` of `merge_method: slta`).

The paper's objective (Eq. 10-14, balanced Eq. 33-34) flattens Δf over every token of the sample,
prompt and response (`tokens: all`). The fine-tunes were trained on the responses only, and the
prompts' feature changes are mostly interference (issue #16's probe: +7-9 points on the demo zoo's
triple when only response positions count). Beyond the paper, two readings:

  response           the positions holding response tokens: the response of a prompt/response sample,
                     the assistant turns of a `messages` sample (each turn from the start of its content
                     to its end-of-turn token, included: what a fine-tune is trained to emit; whitespace
                     the template writes after it, like ChatML's newline, is formatting the model never
                     generates), every position of a `text` sample (it has no prompt)
  response_shifted   the same, plus the position just before each response span (the last prompt
                     position, whose next-token prediction is the first response token): the spans
                     start one position earlier

Response spans are found in characters and mapped to tokens through the fast tokenizer's offsets, so
a token straddling the prompt/response boundary counts. A special token the tokenizer adds itself
(zero-width offsets: BOS, a trailing EOS) counts when the token before it counts. The assistant turns
of a chat template's rendering are located by rendering prefixes of the conversation: the turn's
content starts where the rendering of the messages before it with `add_generation_prompt=True` ends,
and ends where the rendering up to and including it ends, less trailing whitespace; a template whose
renderings are not prefixes of the whole falls back to finding the content text itself.
"""

from __future__ import annotations

from typing import Any

TOKENS = ("all", "response", "response_shifted")
# bumped when the positions a reading counts change (2: a chat turn ends at its end-of-turn token), so
# that results cached by what produced them (slta.demo) are not reused across the change
TOKENS_READING = 2
RESPONSE_KEYS = ("response", "completion", "answer")  # as slta.engine.calibration (which imports this) reads them


def response_spans(row: dict, text: str, tokenizer: Any) -> list[tuple[int, int]] | None:
    """Character spans [start, end) of the response(s) in `text`; None for a `text` sample (all count)."""
    if "text" in row:
        return None
    if "messages" in row:
        msgs, spans, prev = row["messages"], [], 0
        for k, m in enumerate(msgs):
            if m.get("role") != "assistant":
                continue
            start, end = _turn_span(msgs, k, text, tokenizer)
            if start is None:
                start = text.find(str(m["content"]), prev)
                if start < 0:
                    raise ValueError(f"tokens: response cannot find assistant turn {k} in the chat "
                                     f"template's rendering")
                end = start + len(str(m["content"]))
            spans.append((start, end))
            prev = end
        return spans
    key = next(k for k in RESPONSE_KEYS if k in row)
    return [(len(row["prompt"]), len(row["prompt"]) + len(row[key]))]


def _turn_span(msgs: list, k: int, text: str, tokenizer: Any) -> tuple[int | None, int]:
    """The k-th message's span from prefix renderings, or (None, 0) when they are not prefixes of `text`."""
    try:
        head = tokenizer.apply_chat_template(msgs[:k], tokenize=False, add_generation_prompt=True) if k else ""
        upto = tokenizer.apply_chat_template(msgs[:k + 1], tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a prefix: find the content instead
        return None, 0
    if not (isinstance(head, str) and isinstance(upto, str) and text.startswith(head) and text.startswith(upto)):
        return None, 0
    # ChatML renders "<|im_end|>\n": the newline is never trained on (SmolLM2's fine-tunes put 6 nats on
    # it), so counting it made a task's response loss look unreachable
    end = len(upto.rstrip())
    return (len(head), end) if end > len(head) else (None, 0)


def counted_positions(row: dict, text: str, tokenizer: Any, tokens: str, add_special_tokens: bool
                      ) -> tuple[list[int], list[bool]]:
    """(token ids, mask of the positions that count) for one sample under `tokens` (see module docstring).
    The ids are the same as `tokens: all` tokenizes (same call, offsets added). Raises ValueError."""
    if tokens not in TOKENS[1:]:
        raise ValueError(f"tokens: {tokens!r} is not one of {', '.join(TOKENS)}")
    spans = response_spans(row, text, tokenizer)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"tokens: {tokens} needs a fast tokenizer (character offsets)")
    enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), enc["offset_mapping"]
    if spans is None:
        return ids, [True] * len(ids)
    mask = []
    for j, (s, e) in enumerate(offsets):
        if e <= s:  # zero-width: a special token the tokenizer added
            mask.append(bool(j and mask[-1]))
        else:
            mask.append(any(s < hi and e > lo for lo, hi in spans))
    if tokens == "response_shifted":  # each span starts one position earlier
        mask = [m or (j + 1 < len(mask) and mask[j + 1]) for j, m in enumerate(mask)]
    return ids, mask
