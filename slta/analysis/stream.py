"""The linearity analysis's streaming passes, as clients of the engine (slta.engine.walk).

Module levels (layer, attn, mlp, head): one walk over the layers on the base model's inputs (A.3.3),
exactly as the merge computes them (slta.engine.features): a module's versions all run on the same base
input, and the base layer's output becomes the next layer's input. Every interpolated or merged
version of a layer is built on the fly, used on each batch and dropped.

Model level: one hidden-state stream per version (activations, not weights), each through its own
embedding, layers and final norm; batches are grouped (`stream_groups`) so those streams fit
`stream_memory`, with one walk over the checkpoints per group.
"""

from __future__ import annotations

import logging

import torch
from torch.func import functional_call

from slta.analysis.scores import Feature, ModuleStats, Versions, accumulate, interpolate, task_vectors
from slta.engine.features import Batch, Runner, sub, to_compute
from slta.engine.walk import ROW_BLOCK, Client, Loaded, Stream, walk
from slta.io.architecture import Plan, head_dim, layer_prefix
from slta.io.inputs import Inputs, check_finite, load_group

log = logging.getLogger("slta")


# -- module levels: one pass over the layers on the base model's inputs -------------------------------

def layer_module_features(runner: Runner, i: int, p: dict[str, torch.Tensor], base: dict[str, torch.Tensor],
                          h: torch.Tensor, m0: torch.Tensor, batch: Batch, levels: set[str]) -> dict[str, Feature]:
    """Layer i's module features for weight version p on the base inputs (SPEC section 3):
    layer (on h), attention block (on h), MLP block (on the base's post-attention residual m0),
    heads (each kv group's o_proj contribution, with the base's norms)."""
    out: dict[str, Feature] = {}
    if levels & {"layer", "attn"}:
        a = runner.attn_out(i, p, h, batch)
        if "attn" in levels:
            out[f"layers.{i}.attn"] = a
        if "layer" in levels:  # the decoder layer itself: (h + a) + mlp(h + a), in its own op order
            mv = h + a
            out[f"layers.{i}"] = mv + runner.mlp_out(i, p, mv)
    if "mlp" in levels:
        out[f"layers.{i}.mlp"] = runner.mlp_out(i, p, m0)
    if "head" in levels:
        cfg = runner.config
        width = cfg.num_attention_heads // cfg.num_key_value_heads * head_dim(cfg)
        z = runner.o_proj_input(i, p, base, h, batch)
        w = p["self_attn.o_proj.weight"]
        for g in range(cfg.num_key_value_heads):
            out[f"layers.{i}.head.{g}"] = (z[..., g * width:(g + 1) * width], w[:, g * width:(g + 1) * width])
    return out


class ModulePass(Client):
    """Every module's versions on the base inputs of each layer; advances the base hidden state."""

    desc = "slta analyze: modules"

    def __init__(self, stream: Stream, vs: Versions, stats: dict[str, ModuleStats], levels: set[str]):
        self.stream, self.vs, self.stats, self.levels = stream, vs, stats, levels

    def reads(self, label: str) -> bool:
        return label not in ("embed", "head")

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        self.stream.embed()  # base embeddings: each batch's input of layer 0

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        runner, batches, vs, stats, levels = self.stream.runner, self.stream.batches, self.vs, self.stats, self.levels
        dev, dt = runner.device, runner.dtype
        versions = task_vectors([to_compute(sub(g, layer_prefix(i)), dev, dt) for g in loaded])
        base = versions[0]
        for batch in batches:
            h = batch.h
            m0 = h + runner.attn_out(i, base, h, batch)

            def feat(v: int) -> dict[str, Feature]:
                return layer_module_features(runner, i, interpolate(versions, vs.coefs[v]), base, h, m0, batch,
                                             levels)

            accumulate(feat, vs, stats, batch.valid, batch.samples)
            batch.h = m0 + runner.mlp_out(i, base, m0)  # the base layer's output: the next layer's input
        del versions


def module_pass(ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], vs: Versions,
                stats: dict[str, ModuleStats], levels: set[str], progress: bool) -> None:
    """Scores, curves and merging linearity (Eq. 8, 15-17, 19) of every module of `levels`, on the base inputs."""
    walk(ins, plan, ModulePass(Stream(ins, plan, runner, batches), vs, stats, levels), progress)


# -- model level: every version's own forward, layer by layer ----------------------------------------

class ModelPass(Client):
    """Each version's hidden states through its own embedding, layers and final norm; features =
    final hidden states (after the norm)."""

    def __init__(self, ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], vs: Versions,
                 stats: dict[str, ModuleStats], desc: str):
        self.ins, self.plan, self.runner, self.batches, self.vs, self.stats = ins, plan, runner, batches, vs, stats
        self.desc = desc
        self.streams: dict[int, list[torch.Tensor]] = {}

    def reads(self, label: str) -> bool:
        return label not in ("embed", "head")

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        ins, plan, runner, batches, vs = self.ins, self.plan, self.runner, self.batches, self.vs
        dev, dt = runner.device, runner.dtype
        V = len(vs.coefs)
        embed = plan.tensor_order[0]
        vocab, hidden = ins.base.shapes[embed]
        streams = self.streams
        streams.update({id(b): [torch.zeros(*b.ids.shape, hidden, device=dev, dtype=dt) for _ in range(V)]
                        for b in batches})
        for lo in range(0, vocab, ROW_BLOCK):  # embedding rows, in row blocks like the merge
            hi = min(vocab, lo + ROW_BLOCK)
            blocks = [ck.get_rows(embed, lo, hi).to(dev, dt) for ck in ins.all]
            check_finite(ins, embed, blocks)
            taus = task_vectors([{"w": x} for x in blocks])
            del blocks
            for b in batches:  # gather the batch's rows of θ_0 and every τ_t, then combine them per version
                sel = (b.ids >= lo) & (b.ids < hi) & b.valid
                if not sel.any():
                    continue
                local = (b.ids - lo).clamp(0, hi - lo - 1)
                rows = [{"w": x["w"][local] * sel[..., None]} for x in taus]
                for v in range(V):
                    streams[id(b)][v] += interpolate(rows, vs.coefs[v])["w"]
            del taus

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        runner, streams = self.runner, self.streams
        dev, dt = runner.device, runner.dtype
        versions = task_vectors([to_compute(sub(g, layer_prefix(i)), dev, dt) for g in loaded])
        for v in range(len(self.vs.coefs)):
            p = interpolate(versions, self.vs.coefs[v])
            for b in self.batches:
                streams[id(b)][v] = runner.layer_out(i, p, streams[id(b)][v], b)
            del p
        del versions

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        ins, runner, streams, vs = self.ins, self.runner, self.streams, self.vs
        dev, dt = runner.device, runner.dtype
        norm_names = [n for n in ins.base.names() if n.startswith("model.norm.")]
        norms = task_vectors([to_compute(sub(g, "model.norm."), dev, dt) for g in load_group(ins, norm_names)])
        norm_mod = runner.model.model.norm
        for v in range(len(vs.coefs)):
            p = interpolate(norms, vs.coefs[v])
            for b in self.batches:
                streams[id(b)][v] = functional_call(norm_mod, p, (streams[id(b)][v],))
        for b in self.batches:
            s = streams.pop(id(b))
            accumulate(lambda v: {"model": s[v]}, vs, self.stats, b.valid, b.samples)


def model_pass(ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], vs: Versions,
               stats: dict[str, ModuleStats], progress: bool, desc: str) -> None:
    """One pass over the checkpoints for a group of batches: each version's hidden states go through
    its own embedding, layers and final norm; features = final hidden states (after the norm)."""
    walk(ins, plan, ModelPass(ins, plan, runner, batches, vs, stats, desc), progress)


def stream_groups(batches: list[Batch], V: int, hidden: int, itemsize: int, budget: int) -> list[list[Batch]]:
    """Group batches so that V hidden-state streams of a group fit the budget (at least one batch)."""
    groups: list[list[Batch]] = [[]]
    used = 0
    for b in batches:
        need = V * b.ids.numel() * hidden * itemsize
        if groups[-1] and used + need > budget:
            groups.append([])
            used = 0
        if need > budget:
            log.warning("model level: one batch's %d hidden-state streams need %.0f MiB, over stream_memory "
                        "(%.0f MiB); lower parameters.batch_size to use less", V, need / 2**20, budget / 2**20)
        groups[-1].append(b)
        used += need
    return groups
