"""Plain PyTorch training loops for the zoo: pre-training on packed text, and full
fine-tuning with the loss on response tokens only. Deterministic given the seed
(single process, seeded generators, deterministic algorithms, fixed thread count).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

IGNORE = -100  # label value the loss skips


def make_model(tok: PreTrainedTokenizerFast, hidden: int, layers: int, heads: int, kv_heads: int, ffn: int, max_len: int, seed: int) -> LlamaForCausalLM:
    """A small Llama: RMSNorm, RoPE, SwiGLU, grouped-query attention, untied embeddings."""
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=ffn,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_len,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        attn_implementation="sdpa",
    )
    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def train_loop(
    model: LlamaForCausalLM,
    get_batch: Callable[[int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    steps: int,
    lr: float,
    warmup: int,
    weight_decay: float,
    desc: str,
    progress: bool = True,
    stop_loss: float | None = None,
    max_steps: int | None = None,
    loss_fn: Callable[..., torch.Tensor] | None = None,
    autocast: torch.dtype | None = None,
    position: int | None = None,
) -> list[float]:
    """AdamW with linear warmup then cosine decay to 10% of lr over ``steps``; returns the loss per step.

    With ``stop_loss`` training stops once the mean loss of the last 50 steps is below it:
    a converged fine-tune keeps drifting under Adam (normalized noise steps) and every
    extra step only adds noise to its task vector. With ``max_steps`` > ``steps`` a run that
    has not reached ``stop_loss`` after the schedule goes on at the final 10% lr up to
    ``max_steps``: the target is the loss, not a step count (on a CPU whose float rounding
    differs, the same recipe can need more steps). Runs that stop within ``steps`` are
    unchanged by ``max_steps``.

    ``loss_fn(model, input_ids, attention_mask, labels)`` replaces the model's own loss (the
    smollm2 kind computes logits only where the loss is taken). ``autocast`` runs the forward
    pass in that dtype (mixed precision: the weights and the optimizer stay in float32). ``position``:
    the progress bar's line, when several processes train at once.
    """
    # No weight decay on norms (1-d tensors), as usual for Llama-style training.
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=lr,
        betas=(0.9, 0.95),
    )

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, steps - warmup))
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))

    model.train()
    losses = []
    total = max(steps, max_steps or 0) if stop_loss is not None else steps
    bar = tqdm(range(total), desc=desc, disable=not progress, mininterval=1.0, position=position)
    for step in bar:
        input_ids, attention_mask, labels = get_batch(step)
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            if loss_fn is None:
                loss = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss
            else:
                loss = loss_fn(model, input_ids, attention_mask, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % 20 == 0:
            bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.3f}")
        if stop_loss is not None and len(losses) >= 50 and sum(losses[-50:]) / 50 < stop_loss:
            break
    model.eval()
    return losses


def packed_batches(docs: list[list[int]], eos_id: int, batch: int, block: int, seed: int) -> Callable[[int], tuple]:
    """Pre-training batches: all documents joined by </s> into one stream, random blocks."""
    stream = torch.tensor([t for d in docs for t in (*d, eos_id)], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)

    def get_batch(step: int) -> tuple:
        starts = torch.randint(0, len(stream) - block - 1, (batch,), generator=gen)
        x = torch.stack([stream[s : s + block] for s in starts])
        return x, torch.ones_like(x), x  # HF shifts labels internally
    return get_batch


def encode_examples(tok: PreTrainedTokenizerFast, examples: list[dict]) -> list[tuple[list[int], list[int]]]:
    """(input ids, labels) per example: <s> prompt response </s>, loss on response + </s>."""
    prompts = tok([e["prompt"] for e in examples]).input_ids
    responses = tok([e["response"] for e in examples], add_special_tokens=False).input_ids
    out = []
    for p, r in zip(prompts, responses):
        r = r + [tok.eos_token_id]
        out.append((p + r, [IGNORE] * len(p) + r))
    return out


def sft_batches(encoded: list[tuple[list[int], list[int]]], pad_id: int, batch: int, seed: int) -> Callable[[int], tuple]:
    """Fine-tuning batches: random examples, right-padded to the longest in the batch."""
    gen = torch.Generator().manual_seed(seed)

    def get_batch(step: int) -> tuple:
        idx = torch.randint(0, len(encoded), (batch,), generator=gen).tolist()
        rows = [encoded[i] for i in idx]
        n = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((batch, n), pad_id, dtype=torch.long)
        labels = torch.full((batch, n), IGNORE, dtype=torch.long)
        mask = torch.zeros((batch, n), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return input_ids, mask, labels
    return get_batch
