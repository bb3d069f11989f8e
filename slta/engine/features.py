"""Streaming base forward, per-module inputs and feature differences Δf (SPEC section 3, paper A.3.3).

The calibration samples of every task are run through the *base* model one decoder layer at
a time. At layer i each module's input H_t^i is the base model's hidden state there; every
version v = 0..T of the module (base and fine-tunes) is run on it, and for each sample x the
Gram matrix G_x[b, c] = <Δf_b(x), Δf_c(x)> of the feature differences Δf_t = f(x; θ_t) - f(x; θ_0)
(flattened over the sample's real tokens and hidden units; padding excluded) is accumulated in
float64. Then the base output becomes the next layer's input. Only one layer's T+1 weight
versions and the calibration activations are in memory at a time.

Layers run through the `transformers` module classes themselves: a skeleton model lives on the
meta device and `torch.func.functional_call` supplies one version's weights at a time.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch.func import functional_call
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from slta.engine.compat import build_mask
from slta.io.architecture import Module, Plan, head_dim, skeleton


@dataclass
class Batch:
    """Calibration samples of one task, right-padded, with what every layer call needs (positions,
    rotary embeddings, attention masks) and the hidden state entering the current layer."""

    task: int
    samples: list[int]  # global sample indices (rows of the Gram store)
    ids: torch.Tensor  # (b, s), right-padded
    valid: torch.Tensor  # (b, s) bool: real tokens
    position_ids: torch.Tensor
    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    masks: dict[str, object]  # attention mask per layer type ("full_attention", "sliding_attention")
    h: torch.Tensor | None = None  # base hidden state entering the current layer
    # model granularity: every version's own hidden state
    hv: list[torch.Tensor] = field(default_factory=list)
    # (b, s) bool: the positions the objective counts (`tokens:`, slta.engine.tokens); None: every real token
    count: torch.Tensor | None = None
    own: torch.Tensor | None = None  # `targets: trajectory`: the batch's task's fine-tune's own hidden state

    @property
    def counted(self) -> torch.Tensor:
        """The positions whose feature differences enter the Grams: `count`, else every real token."""
        return self.valid if self.count is None else self.count


def layer_type(config: Any, i: int) -> str:
    """Attention type of layer i: "full_attention" or "sliding_attention" (the mask it needs)."""
    types = getattr(config, "layer_types", None)
    if types:
        return types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) and config.model_type == "mistral" \
        else "full_attention"


class Runner:
    """Runs a layer's submodules with any version's weights."""

    def __init__(self, plan: Plan, device: torch.device, dtype: torch.dtype):
        self.plan, self.config, self.device, self.dtype = plan, plan.config, device, dtype
        self.model = skeleton(self.config)
        rotary_cls = type(self.model.model.rotary_emb)
        with torch.device("cpu"):
            self.rotary = rotary_cls(config=self.config).to(device)  # real inv_freq buffers

    def layer(self, i: int) -> torch.nn.Module:
        """Decoder layer i of the meta-device skeleton."""
        return self.model.model.layers[i]

    # -- batches --------------------------------------------------------------------------------
    def make_batches(self, tasks: list[list[list[int]]], batch_size: int,
                     masks: list[list[list[bool]]] | None = None, batch_tokens: int = 1 << 62) -> list[Batch]:
        """Right-padded batches (`batch_plan`), never mixing tasks (so a subset merge computes the same
        numbers). `masks` (per task, per sample, per position): the positions the objective counts (`Batch.count`)."""
        batches, offset = [], 0
        types = {layer_type(self.config, i) for i in range(self.config.num_hidden_layers)}
        for t, samples in enumerate(tasks):
            for chunk, s in batch_plan([len(x) for x in samples], batch_size, batch_tokens):
                ids = torch.zeros(len(chunk), s, dtype=torch.long)
                valid = torch.zeros(len(chunk), s, dtype=torch.bool)
                count = None if masks is None else torch.zeros(len(chunk), s, dtype=torch.bool)
                for r, j in enumerate(chunk):
                    ids[r, :len(samples[j])] = torch.tensor(samples[j])
                    valid[r, :len(samples[j])] = True
                    if count is not None:
                        count[r, :len(samples[j])] = torch.tensor(masks[t][j], dtype=torch.bool)
                ids, valid = ids.to(self.device), valid.to(self.device)
                pos = torch.arange(s, device=self.device)[None]
                dummy = torch.empty(len(chunk), s, self.config.hidden_size, device=self.device, dtype=self.dtype)
                attn_masks = {}
                if "full_attention" in types:
                    attn_masks["full_attention"] = build_mask(create_causal_mask, self.config, dummy,
                                                              valid.long(), pos)
                if "sliding_attention" in types:
                    attn_masks["sliding_attention"] = build_mask(create_sliding_window_causal_mask, self.config,
                                                                 dummy, valid.long(), pos)
                batches.append(Batch(t, [offset + j for j in chunk], ids, valid, pos,
                                     self.rotary(dummy, pos), attn_masks,
                                     count=None if count is None else count.to(self.device)))
            offset += len(samples)
        return batches

    # -- submodule calls -------------------------------------------------------------------------
    def _attn_kwargs(self, i: int, batch: Batch) -> dict:
        return dict(attention_mask=batch.masks[layer_type(self.config, i)],
                    position_embeddings=batch.position_embeddings, position_ids=batch.position_ids)

    def w(self, p: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """p on the compute device and dtype: a no-op for weights converted up front; weights kept as
        stored (a layer too large to convert whole, see `upcast_whole_layer`) are converted here, one
        submodule at a time."""
        return to_compute(p, self.device, self.dtype)

    def layer_out(self, i: int, p: dict[str, torch.Tensor], h: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Decoder layer i with weights p on hidden state h (the whole layer, residuals included)."""
        out = functional_call(self.layer(i), self.w(p), (h,), self._attn_kwargs(i, batch))
        return out[0] if isinstance(out, tuple) else out

    def attn_out(self, i: int, p: dict[str, torch.Tensor], h: torch.Tensor, batch: Batch,
                 norm: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Attention block output (input norm + self-attention), before the residual add.
        `norm` overrides the input norm's weights (heads use the base's)."""
        layer = self.layer(i)
        x = functional_call(layer.input_layernorm, self.w(norm or sub(p, "input_layernorm.")), (h,))
        return functional_call(layer.self_attn, self.w(sub(p, "self_attn.")), (x,), self._attn_kwargs(i, batch))[0]

    def mlp_out(self, i: int, p: dict[str, torch.Tensor], m: torch.Tensor) -> torch.Tensor:
        """MLP block output (post-attention norm + MLP) on the attention residual m, before the residual add."""
        layer = self.layer(i)
        x = functional_call(layer.post_attention_layernorm, self.w(sub(p, "post_attention_layernorm.")), (m,))
        return functional_call(layer.mlp, self.w(sub(p, "mlp.")), (x,))

    def o_proj_input(self, i: int, p: dict[str, torch.Tensor], base: dict[str, torch.Tensor], h: torch.Tensor,
                     batch: Batch) -> torch.Tensor:
        """Per-head attention outputs (o_proj's input) with version p's q/k/v/o and the base's
        input norm and q/k norms: a head's features change only with its own rows (SPEC 3)."""
        mixed = dict(p)
        for k in base:
            if "norm" in k:
                mixed[k] = base[k]
        captured: list[torch.Tensor] = []
        hook = self.layer(i).self_attn.o_proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
        try:
            self.attn_out(i, mixed, h, batch)
        finally:
            hook.remove()
        return captured[0]


def batch_plan(lengths: list[int], batch_size: int, batch_tokens: int) -> list[tuple[list[int], int]]:
    """Batches of one task's samples as (sample indices, padded length): longest first (less padding),
    at most `batch_size` samples and at most `batch_tokens` padded tokens per batch (at least one
    sample). These two bound the calibration activations of one batch (see slta.merges.memory)."""
    order = sorted(range(len(lengths)), key=lambda j: -lengths[j])
    out: list[tuple[list[int], int]] = []
    for j in order:
        if out and len(out[-1][0]) < batch_size and (len(out[-1][0]) + 1) * out[-1][1] <= batch_tokens:
            out[-1][0].append(j)
        else:
            out.append(([j], lengths[j]))
    return out


def sub(p: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of p under `prefix`, with the prefix removed."""
    return {k[len(prefix):]: v for k, v in p.items() if k.startswith(prefix)}


class GramStore:
    """Per-module, per-sample Gram matrices G_x (N, T, T), float64 (the sufficient statistic)."""

    def __init__(self, modules: list[str], num_samples: int, T: int, device: torch.device):
        self.g = {m: torch.zeros(num_samples, T, T, dtype=torch.float64, device=device) for m in modules}

    def add(self, module: str, feats: list[torch.Tensor], batch: Batch, valid: torch.Tensor | None = None) -> None:
        """Accumulate G from T+1 feature tensors (version 0 = base) of shape (b, s, ...), over the
        positions the objective counts (`Batch.counted`; `valid` narrows them further)."""
        valid = batch.counted if valid is None else (valid if batch.count is None else valid & batch.count)
        base = feats[0]
        b, s = base.shape[0], base.shape[1]
        # Δf_t = f_t - f_0 is taken in the features' dtype and written straight into one float64
        # buffer (no stacked float32 copy, no masked copy); padding is zeroed in place.
        d = torch.empty(b, len(feats) - 1, base[0].numel(), dtype=torch.float64, device=base.device)
        for t, f in enumerate(feats[1:]):
            torch.sub(f.reshape(b, -1), base.reshape(b, -1), out=d[:, t])
        if not bool(valid.all()):
            d.view(b, d.shape[1], s, -1).masked_fill_(~valid[:, None, :, None], 0)
        self.g[module][batch.samples] += torch.bmm(d, d.transpose(1, 2))  # (b, T, T), float64

    def add_gram(self, module: str, g: torch.Tensor, samples: list[int]) -> None:
        """Add precomputed per-sample Grams (b, T, T) to the given samples' rows."""
        self.g[module][samples] += g


def to_compute(p: dict[str, torch.Tensor], device: torch.device, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of p on the compute device and in the compute dtype."""
    return {k: v.to(device=device, dtype=dtype) for k, v in p.items()}


def upcast_whole_layer(nbytes: int, device: torch.device) -> bool:
    """Whether a layer whose T+1 versions take `nbytes` in the compute dtype is converted whole, up
    front (UPCAST_FRACTION of the device's memory), or kept as stored and converted one submodule of
    one version at a time in `Runner.w` (a 70B layer: 13.7 GB in float32 for T=3). Lazily, each
    batch converts each version again: one pass over the layer's weights per batch and version. On
    the 2-core test machine, upcasting a 70B MLP matrix took 1.8-2.3 s against 58 s for the version's
    matmuls on a batch of 1024 tokens (one thread, contended): about 10%, less with larger batches
    (`batch_size`, `batch_tokens`)."""
    from slta.io.inputs import memory_total

    return nbytes <= memory_total(device) * UPCAST_FRACTION


UPCAST_FRACTION = 1 / 4


def layer_features(runner: Runner, i: int, modules: list[Module], versions: list[dict[str, torch.Tensor]],
                   batches: list[Batch], store: GramStore) -> None:
    """Accumulate the Grams of layer i's modules (G_x[b, c] = <Δf_b(x), Δf_c(x)>, the per-sample term
    of Eq. 14) and advance every batch's base hidden state.

    `versions[v]` maps names relative to the layer ("self_attn.q_proj.weight", ...) to version v's
    weights on the compute device.
    """
    kinds = {m.kind for m in modules}
    heads = [m for m in modules if m.kind == "attn_head"]
    linears = [m for m in modules if m.kind == "linear"]
    for batch in batches:
        h = batch.h
        if kinds == {"layer"}:
            outs = [runner.layer_out(i, p, h, batch) for p in versions]
            store.add(modules[0].name, outs, batch)
            batch.h = outs[0]
            continue
        attn = [runner.attn_out(i, p, h, batch) for p in versions]
        store.add(f"layers.{i}.attn", attn, batch)
        m = h + attn[0]  # the base's attention residual: the MLP block's input
        mlp = [runner.mlp_out(i, p, m) for p in versions]
        store.add(f"layers.{i}.mlp", mlp, batch)
        if heads:
            head_features(runner, i, heads, versions, h, batch, store)
        if linears:
            _linear_features(runner, i, linears, versions, h, batch, store)
        batch.h = m + mlp[0]


def head_features(runner: Runner, i: int, heads: list[Module], versions: list[dict[str, torch.Tensor]],
                   h: torch.Tensor, batch: Batch, store: GramStore) -> None:
    """Each key/value group's contribution to o_proj's output (paper A.3.5)."""
    cfg = runner.config
    hd = head_dim(cfg)
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    base = versions[0]
    zs = [runner.o_proj_input(i, p, base, h, batch) for p in versions]  # (b, s, n_heads * hd)
    for mod in heads:
        lo, hi = mod.group * per_group * hd, (mod.group + 1) * per_group * hd
        outs = [z[..., lo:hi] @ p["self_attn.o_proj.weight"][:, lo:hi].to(z).T for z, p in zip(zs, versions)]
        store.add(mod.name, outs, batch)


def _linear_features(runner: Runner, i: int, linears: list[Module], versions: list[dict[str, torch.Tensor]],
                     h: torch.Tensor, batch: Batch, store: GramStore) -> None:
    """Every nn.Linear on its base input: Δf = x (W_t - W_0)^T + (b_t - b_0)  (A.5.5; exactly linear)."""
    inputs, _ = capture_linear_inputs(runner, i, versions[0], h, batch)
    for mod in linears:
        x = inputs[mod.linear]
        outs = []
        for p in versions:
            y = x @ p[f"{mod.linear}.weight"].to(x).T
            if f"{mod.linear}.bias" in p:
                y = y + p[f"{mod.linear}.bias"].to(x)
            outs.append(y)
        store.add(mod.name, outs, batch)


def capture_linear_inputs(runner: Runner, i: int, base: dict[str, torch.Tensor], h: torch.Tensor,
                          batch: Batch) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Inputs of every nn.Linear of layer i in the base model (forward pre-hooks), and the base
    layer's output (the next layer's input)."""
    layer = runner.layer(i)
    captured: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_pre_hook(_capture(captured, name))
             for name, mod in layer.named_modules() if isinstance(mod, torch.nn.Linear)]
    try:
        m = h + runner.attn_out(i, base, h, batch)
        out = m + runner.mlp_out(i, base, m)
    finally:
        for hk in hooks:
            hk.remove()
    return captured, out


def _capture(store: dict[str, torch.Tensor], name: str) -> Callable:
    def hook(mod, args):
        store[name] = args[0]
    return hook

