"""RegMean's streaming merge (Jin et al., ICLR 2023) as a client of the engine; the formulas
(`scaled_gram`, `regmean_weight`) and the method's registration are in slta.methods.regmean.

The inputs X_t of every nn.Linear come from the *base* model run on each task's calibration samples,
streamed layer by layer (the base output is the next layer's input). Per layer, the per-task input
Grams G_t = X_tᵀ X_t are accumulated, each linear weight is solved as Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ
and written; everything else in the group (embeddings, norms, biases) is averaged.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from slta.engine.calibration import calibration
from slta.engine.walk import Client, Loaded, Stream, walk
from slta.io.architecture import Plan, layer_prefix
from slta.io.checkpoint import ShardedWriter
from slta.io.inputs import Inputs
from slta.methods.regmean import regmean_weight


class RegMean(Client):
    """Accumulates every linear's per-task input Grams on the base inputs and merges each group."""

    desc = "regmean: layers"

    def __init__(self, ins: Inputs, plan: Plan, writer: ShardedWriter, stream: Stream, alpha: float,
                 device: torch.device):
        self.ins, self.plan, self.writer, self.stream, self.alpha, self.device = ins, plan, writer, stream, alpha, device
        self.T = len(ins.tuned)
        self.rules: dict[str, str] = {}

    def accumulate(self, grams: dict[str, list[torch.Tensor]], name: str, task: int, x: torch.Tensor) -> None:
        """G_t += Xᵀ X for one linear and one batch of task t's tokens, in float64."""
        x = x.to(torch.float64)
        g = grams.setdefault(name, [torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=self.device)
                                    for _ in range(self.T)])
        g[task] += x.T @ x

    def merge(self, grams: dict[str, list[torch.Tensor]], group: list[str], prefix: str, loaded: Loaded,
              keep: bool = False) -> dict[str, torch.Tensor]:
        """Merge and write one group: linears by RegMean, the rest averaged (`keep`: return the merged tensors)."""
        return _merge_grams(grams, group, prefix, loaded, self.writer, self.T, self.alpha, self.rules, self.device,
                            keep)

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        self.stream.embed()  # the base's inputs only
        self.merge({}, names, "", loaded)

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        from slta.engine.features import capture_linear_inputs, sub, to_compute

        grams: dict[str, list[torch.Tensor]] = {}
        prefix = layer_prefix(i)
        base = to_compute(sub(loaded[0], prefix), self.device, torch.float32)
        runner = self.stream.runner
        for b in self.stream.batches:  # the base layer's output becomes b.h: layer i+1's input
            captured, b.h = capture_linear_inputs(runner, i, base, b.h, b)
            for name, x in captured.items():
                self.accumulate(grams, name, b.task, x[b.valid])  # real tokens only
        self.merge(grams, names, prefix, loaded)

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        from torch.func import functional_call

        grams: dict[str, list[torch.Tensor]] = {}
        if "lm_head.weight" in names:  # input: the base's normalised final hidden states
            norm = {"weight": loaded[0]["model.norm.weight"].to(self.device, torch.float32)}
            for b in self.stream.batches:
                x = functional_call(self.stream.runner.model.model.norm, norm, (b.h,))[b.valid]
                self.accumulate(grams, "lm_head", b.task, x)
        self.merge(grams, names, "", loaded)


class RegMeanPlusPlus(RegMean):
    """RegMean++ (Nguyen et al. 2025): the same closed form on the merge's own inputs. Task t's stream
    enters layer l as the merged layers 0..l-1 left it (cross-layer), starting from the merged (averaged)
    embedding; inside layer l each linear's input is the one candidate t's layer l computes on that
    stream (intra-layer, as in the authors' and FusionBench's implementations); after layer l is merged
    the stream advances through the merged layer. The lm_head's input for task t: candidate t's final
    norm on the merged stream."""

    desc = "regmean++: layers"

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        kept = self.merge({}, names, "", loaded, keep=True)
        emb = kept[self.plan.tensor_order[0]].to(self.device)
        for b in self.stream.batches:  # the merged embedding's rows: layer 0's input in the merge
            b.h = emb[b.ids] * b.valid[..., None]

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        from slta.engine.features import capture_linear_inputs, sub, to_compute

        grams: dict[str, list[torch.Tensor]] = {}
        prefix = layer_prefix(i)
        versions = [to_compute(sub(ld, prefix), self.device, torch.float32) for ld in loaded]
        runner = self.stream.runner
        for b in self.stream.batches:  # candidate t's layer on task t's merged stream
            captured, _ = capture_linear_inputs(runner, i, versions[b.task + 1], b.h, b)
            for name, x in captured.items():
                self.accumulate(grams, name, b.task, x[b.valid])
        merged = to_compute(sub(self.merge(grams, names, prefix, loaded, keep=True), prefix), self.device,
                            torch.float32)
        for b in self.stream.batches:  # the merged layer's output: layer i+1's input
            b.h = runner.layer_out(i, merged, b.h, b)

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        from torch.func import functional_call

        grams: dict[str, list[torch.Tensor]] = {}
        if "lm_head.weight" in names:
            norms = [{"weight": ld["model.norm.weight"].to(self.device, torch.float32)} for ld in loaded[1:]]
            for b in self.stream.batches:
                x = functional_call(self.stream.runner.model.model.norm, norms[b.task], (b.h,))[b.valid]
                self.accumulate(grams, "lm_head", b.task, x)
        self.merge(grams, names, "", loaded)


def run_regmean(ins: Inputs, plan: Plan, writer: ShardedWriter, device: torch.device,
                progress: bool = True, progressive: bool = False) -> dict[str, Any]:
    """Stream the base forward pass (RegMean++, `progressive`: the merge's own forward pass), accumulate
    per-task input Grams of every linear, merge, write."""
    cfg = ins.cfg
    alpha = float(cfg.param("alpha"))
    if not 0 <= alpha <= 1:
        name = "regmean_plusplus" if progressive else "regmean"
        raise ValueError(f"{name}: parameters.alpha must be in [0, 1], got {alpha}")
    t0 = time.perf_counter()
    tasks, indices = calibration(ins)
    stream = Stream.open(ins, plan, tasks, device, torch.float32, cfg.param("batch_size"))
    client = (RegMeanPlusPlus if progressive else RegMean)(ins, plan, writer, stream, alpha, device)
    walk(ins, plan, client, progress)
    key = "regmean_plusplus" if progressive else "regmean"
    return {key: {"alpha": alpha, "solver_rules": client.rules, "samples_per_task": [len(ix) for ix in indices]},
            "timings": {"total_regmean": time.perf_counter() - t0}}


def _merge_grams(grams, group, prefix, loaded, writer, T, alpha, rules, device, keep=False) -> dict[str, torch.Tensor]:
    """Linear weights by RegMean; everything else in the group (biases, norms, embeddings) averaged.
    With `keep`, returns the merged tensors as written (before the output dtype cast), in float32."""
    done, kept = set(), {}
    for name in list(grams):
        g = grams.pop(name)  # free each linear's Grams once it is merged
        key = f"{prefix}{name}.weight"
        w, rule = regmean_weight(g, [ld[key].to(device) for ld in loaded[1:]], alpha)
        del g
        writer.write(key, w)
        if keep:
            kept[key] = w.to(torch.float32)
        rules[f"{prefix}{name}"] = rule
        done.add(key)
    for n in group:
        if n not in done:
            w = sum(ld[n].to(torch.float32) for ld in loaded[1:]) / T
            writer.write(n, w)
            if keep:
                kept[n] = w
    return kept


