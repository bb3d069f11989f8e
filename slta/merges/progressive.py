"""The closed form's variant layer pass: progressive inputs (`inputs: merged`, paper A.5.3) and the
Gauss-Newton refinement of Eq. 10 (`refine: N`, slta.merges.refine).

`inputs: merged`. The paper solves every module on the *base* model's inputs (A.3.3). A.5.3 suggests
solving layer i on "the fused output features" of the layers before it: H_t^i is then the input module
i receives in the model merged so far, and the targets f(x; θ_t^i) of Eq. 10-11 are every version of
the module on those same inputs (Δf_t(x) = f(x; θ_t^i) - f(x; θ_0^i) with x from the merged stream).
Through the engine's contract (slta.engine.walk): the client solves layer i, builds its merged weights
(θ_0 + Σ_t α_t τ_t, Eq. 1, exactly as written but before the output dtype cast) and runs them on
every batch's h, which then holds layer i+1's input in the merged model.

Within a layer, at `attn_mlp` and `head_mlp` the attention block (and its heads) is solved first;
the MLP block is then solved on the merged model's attention residual h + attn_merged(h), so the MLP
sees the attention it will actually follow. At `layer` the layer is one module. The layer-0 input is
the merged embedding's output (the embedding is solved first, on token ids); with tied embeddings
the embedding's α is solved last together with the head (one module), so layer 0 then starts from
the base embedding. The head is solved on the merged model's final hidden states. `model` (one
module: nothing to progress) and `linear` are not offered.

`targets: trajectory` (slta.merges.trajectory) runs the same pass with a third stream per batch, `own`: the
hidden state of the batch's task's fine-tune along its own forward pass, which gives each module's target.

With `inputs: base` and `refine: N > 0` the same pass runs with the base stream (h advances through
the base layer, exactly as slta.engine.features.layer_features does, so the Grams are bit-identical) and
only adds the refinement.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slta.engine.walk import ROW_BLOCK
from slta.io.architecture import Plan, layer_prefix
from slta.merges.write import combine

if TYPE_CHECKING:
    from slta.engine.features import Batch, Runner

INPUTS = ("base", "merged")


def merged_layer(plan: Plan, i: int, versions: list[dict[str, torch.Tensor]], alphas: dict[str, np.ndarray],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer i's merged weights θ_0 + Σ_t α_t τ_t (Eq. 1; `slta.merges.write.combine`, the written tensors
    before the output dtype cast), named relative to the layer like `versions`. Tensors whose module
    has no α yet keep the base's (they are not used by the call that follows)."""
    prefix, parts = layer_prefix(i), plan.tensor_parts()
    out = {}
    for rel, w0 in versions[0].items():
        owners = parts.get(prefix + rel)
        if owners and all(mod in alphas for _, mod in owners):
            out[rel] = combine(prefix + rel, w0, [v[rel] for v in versions[1:]], owners, alphas).to(dtype)
        else:
            out[rel] = w0
    return out


def module_call(runner: Runner, i: int, kind: str, batch: Batch):
    """f(p, x) of a layer module (Eq. 10's f): the whole layer, the attention block or the MLP block."""
    if kind == "layer":
        return lambda p, x: runner.layer_out(i, p, x, batch)
    if kind == "attn":
        return lambda p, x: runner.attn_out(i, p, x, batch)
    if kind == "mlp":
        return lambda p, x: runner.mlp_out(i, p, x)
    raise ValueError(f"no module call for kind {kind!r}")


def variant_layer(client: Any, i: int, versions: list[dict[str, torch.Tensor]]) -> None:
    """Layer i of the closed form under `inputs` / `refine` (module docstring): accumulate each
    module's Grams on the current stream, solve α (Eq. 12-14 / 33-34), refine (slta.merges.refine), and
    leave layer i+1's input in every batch's h: the merged layer's output (inputs: merged) or the
    base layer's (inputs: base)."""
    from slta.engine.features import head_features

    runner, batches, store, plan = client.stream.runner, client.stream.batches, client.store, client.plan
    mods = plan.layer_modules(i)
    kinds = {m.kind for m in mods}
    merged_inputs = client.inputs == "merged"
    own = client.targets  # targets: trajectory (slta.merges.trajectory): fine-tune a's own stream, in b.own
    if kinds == {"layer"}:
        name = mods[0].name
        xs, base_out = [b.h for b in batches], []
        for b, x in zip(batches, xs):
            outs = [runner.layer_out(i, p, x, b) for p in versions]
            store.add(name, outs, b)
            if own:  # fine-tune a's own layer output, in the layer output's coordinates
                b.own = runner.layer_out(i, versions[b.task + 1], b.own, b)
                own.add(name, outs, b.own, b)
            if not merged_inputs:  # the base output is the next input
                base_out.append(outs[0])
        client.solve(name)
        client.refine_module(name, "layer", i, versions, xs)
        if merged_inputs:
            merged = merged_layer(plan, i, versions, client.alphas, runner.dtype)
            for b, x in zip(batches, xs):
                b.h = runner.layer_out(i, merged, x, b)
        else:
            for b, out in zip(batches, base_out):
                b.h = out
        return
    if not kinds <= {"attn", "mlp", "attn_head"}:
        raise ValueError(f"inputs: merged / refine are not offered at granularity {plan.granularity!r}")
    heads = [m for m in mods if m.kind == "attn_head"]
    xs, attn_base = [b.h for b in batches], []
    for b, x in zip(batches, xs):  # the attention block (and its heads) on the current stream
        attn = [runner.attn_out(i, p, x, b) for p in versions]
        store.add(f"layers.{i}.attn", attn, b)
        if own:  # fine-tune a's own attention residual, less the merged stream's x
            b.own = b.own + runner.attn_out(i, versions[b.task + 1], b.own, b)
            own.add(f"layers.{i}.attn", attn, b.own - x, b)
        if heads:
            head_features(runner, i, heads, versions, x, b, store)
        if not merged_inputs:
            attn_base.append(attn[0])
    for m in mods:
        if m.kind != "mlp":
            client.solve(m.name)
    client.refine_module(f"layers.{i}.attn", "attn", i, versions, xs)
    if merged_inputs:  # the MLP's input: the merged attention's residual
        merged = merged_layer(plan, i, versions, client.alphas, runner.dtype)
        ms = [x + runner.attn_out(i, merged, x, b) for b, x in zip(batches, xs)]
    else:
        ms = [x + a for x, a in zip(xs, attn_base)]
    del attn_base
    mlp_base = []
    for b, m in zip(batches, ms):
        mlp = [runner.mlp_out(i, p, m) for p in versions]
        store.add(f"layers.{i}.mlp", mlp, b)
        if own:  # fine-tune a's own layer output, less the merged stream's m
            b.own = b.own + runner.mlp_out(i, versions[b.task + 1], b.own)
            own.add(f"layers.{i}.mlp", mlp, b.own - m, b)
        if not merged_inputs:
            mlp_base.append(mlp[0])
    client.solve(f"layers.{i}.mlp")
    client.refine_module(f"layers.{i}.mlp", "mlp", i, versions, ms)
    if merged_inputs:
        merged = merged_layer(plan, i, versions, client.alphas, runner.dtype)
        for b, m in zip(batches, ms):
            b.h = m + runner.mlp_out(i, merged, m)
    else:
        for b, m, out in zip(batches, ms, mlp_base):
            b.h = m + out


def merged_embedding_input(client: Any, alpha: np.ndarray) -> None:
    """Set every batch's h to the merged embedding's rows, E_0[ids] + Σ_t α_t (E_t - E_0)[ids] (Eq. 1),
    read in row blocks like `slta.engine.walk.embed_stage`: the merged model's input of layer 0."""
    ins, plan, runner, batches = client.ins, client.plan, client.stream.runner, client.stream.batches
    name = plan.tensor_order[0]
    vocab = ins.base.shapes[name][0]
    dev, dt = runner.device, runner.dtype
    parts = plan.tensor_parts()[name]
    for b in batches:
        b.h = torch.zeros_like(b.h)
    for lo in range(0, vocab, ROW_BLOCK):
        hi = min(vocab, lo + ROW_BLOCK)
        blocks = [ck.get_rows(name, lo, hi) for ck in ins.all]
        merged = combine(name, blocks[0], blocks[1:], parts, {parts[0][1]: alpha}, (lo, hi)).to(dev, dt)
        for b in batches:
            sel = (b.ids >= lo) & (b.ids < hi) & b.valid
            if sel.any():
                b.h += merged[(b.ids - lo).clamp(0, hi - lo - 1)] * sel[..., None]
        del blocks, merged  # before the next block is read
