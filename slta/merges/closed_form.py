"""The closed-form method (`merge_method: slta`; paper Algorithm 1) as a client of the engine.

For each layer the T+1 weight versions run on every task's base-model inputs, the per-sample Grams
of the feature differences are accumulated (slta.engine.features; the terms of Eq. 14), α is solved per module in
closed form (slta.solve, Eq. 12-14; balanced Eq. 33-34), and the merged tensors are written
(slta.merges.write, Eq. 1). The base output becomes the next layer's input. At model granularity the one α
is known only after the last layer, so a second pass writes every tensor.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slta.config import MergeConfig
from slta.engine.calibration import calibration_masks
from slta.engine.walk import ROW_BLOCK, Client, Loaded, Stream, walk
from slta.io.architecture import Plan, layer_prefix
from slta.io.checkpoint import ShardedWriter
from slta.io.inputs import Inputs, check_finite
from slta.io.journal import Journal
from slta.merges.write import write_alpha_tensors, write_alphas
from slta.solve import AUTO_SCALE, Solution, scale_factors, solve_module

if TYPE_CHECKING:  # slta.engine.features imports transformers' attention code (~1 s): only the closed form needs it
    from slta.engine.features import Batch, GramStore, Runner


# What the single model-level solve compares (SPEC section 3: final hidden states or logits; say which).
REFINE_OBJECTIVE = ("Eq. 10 (balanced: Eq. 33) on the calibration inputs, before (closed-form α) and after the "
                    "Gauss-Newton steps; modules not listed keep their closed form (slta.merges.refine)")
MODEL_FEATURES = "logits of each full version, lm_head_t(norm_t(h_t)), every token: one α for every parameter"


@dataclass
class SltaResult:
    """α per module, the per-sample Grams (the sufficient statistics), each sample's task, the
    calibration lines drawn per task, and timings."""

    solutions: dict[str, Solution]
    grams: dict[str, torch.Tensor]
    tasks: np.ndarray
    sample_indices: list[list[int]]
    timings: dict[str, float] = field(default_factory=dict)
    refined: dict[str, dict[str, Any]] = field(default_factory=dict)  # refine: N, E before/after per module
    scale_search: dict[str, Any] | None = None  # scale: auto (slta.merges.autoscale)


class ClosedForm(Client):
    """Accumulates each module's Grams on the base inputs, solves α per module and writes the layer."""

    desc = "slta: layers"

    def __init__(self, ins: Inputs, plan: Plan, writer: ShardedWriter | None, stream: Stream, store: GramStore,
                 task_of: np.ndarray, journal: Journal):
        self.ins, self.plan, self.writer, self.stream, self.store = ins, plan, writer, stream, store
        self.task_of, self.journal = task_of, journal
        self.balance, self.rcond = ins.cfg.param("balance"), 1e-9
        self.model_level = plan.granularity == "model"
        # beyond the paper (slta.merges.progressive, slta.merges.refine); the paper is inputs: base, refine: 0
        self.inputs, self.refine = ins.cfg.param("inputs"), int(ins.cfg.param("refine"))
        self.variant = self.inputs == "merged" or self.refine > 0
        self.targets = None  # targets: trajectory (slta.merges.trajectory): the products b is built from
        if ins.cfg.param("targets") == "trajectory":
            from slta.merges.trajectory import Targets

            self.targets = Targets(len(task_of), len(ins.tuned))
        # a number: every α times it (the one-parameter fallback); one per model: each task's α times its own
        # (issue #28); AUTO_SCALE: chosen after the solve (autoscale.py)
        self.scale = scale_factors(ins.cfg.param("scale"))
        self.refined: dict[str, dict[str, Any]] = {}
        self.sols: dict[str, Solution] = {}
        self.alphas: dict[str, np.ndarray] = {}
        for name, info in journal.modules.items():  # resuming: the modules solved so far
            self.sols[name] = Solution(np.array(info["alpha"]), info["rule"], info["rank"],
                                       float("inf") if info["cond"] is None else info["cond"], np.zeros(0),
                                       np.zeros(0), info["skipped_samples"])
            self.alphas[name] = self.sols[name].alpha

    def reads(self, label: str) -> bool:
        return label not in ("embed", "head")  # read in row blocks by their own stages

    def done(self, label: str) -> bool:
        return label in self.journal.done

    def solve(self, name: str) -> None:
        """α of one module from its Grams (Eq. 12-14; balanced: Eq. 33-34)."""
        cross = self.targets.get(name) if self.targets else None
        sol = solve_module(self.store.g[name].cpu().numpy(), self.task_of, self.balance, rcond=self.rcond, cross=cross)
        self.sols[name] = sol.scaled(self.scale)
        self.alphas[name] = self.sols[name].alpha

    def refine_module(self, name: str, kind: str, i: int, versions: list[dict[str, torch.Tensor]],
                      xs: list[torch.Tensor]) -> None:
        """`refine: N` Gauss-Newton steps on Eq. 10 / 33 from the closed-form α (slta.merges.refine), on the
        module's inputs `xs` (one per batch); records E before and after for the report."""
        if self.refine <= 0:
            return
        from slta.merges.progressive import module_call
        from slta.merges.refine import gauss_newton

        prefix = layer_prefix(i)
        module = self.plan.by_name()[name]
        owned = [p.tensor[len(prefix):] for p in module.parts]
        g = self.store.g[name].cpu().numpy()
        T = g.shape[1]
        den = np.einsum("nii->n", g) / T if self.balance else np.ones(len(g))
        counts = np.bincount(self.task_of, minlength=T).astype(np.float64)
        calls = [module_call(self.stream.runner, i, kind, b) for b in self.stream.batches]
        closed = self.sols[name].alpha
        alpha, before, after, taken = gauss_newton(calls, xs, self.stream.batches, versions, owned, closed, den,
                                                   counts, self.refine)
        sol = self.sols[name]
        self.sols[name] = Solution(alpha, sol.rule, sol.rank, sol.cond, sol.A, sol.b, sol.skipped_samples)
        self.alphas[name] = alpha
        self.refined[name] = {"objective_before": before, "objective_after": after, "steps_taken": taken,
                              "alpha_closed_form": [float(a) for a in closed]}

    def mark(self, label: str, names: list[str]) -> None:
        """Record a written group, its solved modules and the Grams so far in the resume journal."""
        if self.writer is not None:
            self.journal.mark(label, self.writer, {n: self.sols[n].to_json() for n in names}, self.store.g)

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        self.stream.embed(self.store, self.model_level)
        if not self.model_level and not self.plan.tied:
            self.solve("embed")
            if self.inputs == "merged":  # layer 0's input in the merged model (slta.merges.progressive)
                from slta.merges.progressive import merged_embedding_input

                merged_embedding_input(self, self.alphas["embed"])
            if self.writer:
                write_alpha_tensors(self.ins, self.plan, self.writer, self.alphas, names)
            self.mark("embed", ["embed"])
        elif not self.model_level:
            self.mark("embed", [])
        if self.targets:  # fine-tune a's own forward pass starts at its own embedding (slta.merges.trajectory)
            from slta.merges.trajectory import own_embedding

            own_embedding(self)

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        from slta.engine.features import layer_features, sub, to_compute, upcast_whole_layer

        runner, batches = self.stream.runner, self.stream.batches
        versions = [sub(g, layer_prefix(i)) for g in loaded]
        size = sum(t.numel() for g in versions for t in g.values()) * runner.dtype.itemsize
        if upcast_whole_layer(size, runner.device):  # else each submodule is converted when it runs
            versions = [to_compute(g, runner.device, runner.dtype) for g in versions]
        if self.model_level:  # every version's own hidden state: Grams of the final features only
            for batch in batches:
                batch.hv = [runner.layer_out(i, p, h, batch) for p, h in zip(versions, batch.hv)]
            for batch in batches:
                batch.h = batch.hv[0]  # layer i+1's (base) input
        elif self.variant:  # inputs: merged / refine: N (slta.merges.progressive); solves and advances h
            from slta.merges.progressive import variant_layer

            variant_layer(self, i, versions)
        else:  # Grams of layer i's modules; advances every batch's h to the base output
            layer_features(runner, i, self.plan.layer_modules(i), versions, batches, self.store)
            for m in self.plan.layer_modules(i):
                self.solve(m.name)
        if not self.model_level:
            if self.writer:
                write_alpha_tensors(self.ins, self.plan, self.writer, self.alphas, names, loaded)
            self.mark(f"layer {i}", [m.name for m in self.plan.layer_modules(i)])
        del versions

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        tied = self.plan.tied
        head_stage(self.ins, self.plan, self.stream.runner, self.stream.batches, self.store, self.model_level)
        if self.model_level:
            finals = ["model"]
        else:
            finals = ["embed_head"] if tied else ["head"]
        for name in finals:
            self.solve(name)
        if self.writer and not self.model_level:
            write_alpha_tensors(self.ins, self.plan, self.writer, self.alphas,
                                ([self.plan.tensor_order[0]] if tied else []) + names)


def solve_closed_form(ins: Inputs, plan: Plan, writer: ShardedWriter | None, device: torch.device,
                      progress: bool = True, compute_dtype: torch.dtype = torch.float32,
                      journal: Journal | None = None) -> SltaResult:
    """Stream the layers, accumulate Grams, solve α per module and (if a writer is given) write."""
    from slta.engine.features import GramStore

    cfg = ins.cfg
    T = len(ins.tuned)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tasks, indices, masks = calibration_masks(ins, cfg.param("tokens"))
    timings["calibration"] = time.perf_counter() - t0
    stream = Stream.open(ins, plan, tasks, device, compute_dtype, cfg.param("batch_size"), masks,
                         cfg.param("batch_tokens"))
    N = sum(len(t) for t in tasks)
    task_of = np.concatenate([np.full(len(t), k, dtype=np.int64) for k, t in enumerate(tasks)])
    store = GramStore([m.name for m in plan.modules], N, T, device)
    journal = journal or Journal(None, "")
    for name, g in journal.grams().items():  # resuming: the statistics gathered so far
        store.g[name].copy_(g.to(device))
    auto = cfg.param("scale") in AUTO_SCALE  # α are final only after the search: written afterwards
    client = ClosedForm(ins, plan, None if auto else writer, stream, store, task_of, journal)
    t_feat = time.perf_counter()
    walk(ins, plan, client, progress, show_label=True)  # a reader thread loads layer i+1 while layer i computes
    timings["features_and_solve"] = time.perf_counter() - t_feat
    search = None
    if auto:  # a second pass: the merged model's response loss per candidate scale (slta.merges.autoscale)
        from slta.merges.autoscale import search_scale, search_task_scales

        client.stream = None  # the Grams' batches are not needed any more
        del stream
        t_s = time.perf_counter()
        if cfg.param("scale") == "auto":
            search = search_scale(ins, plan, client.alphas, device, compute_dtype, progress)
        else:
            search = search_task_scales(ins, plan, client.alphas, device, compute_dtype, progress,
                                        float(cfg.param("scale_margin")), joint=cfg.param("scale") == "auto_joint")
        client.sols = {k: s.scaled(np.asarray(search["chosen"])) for k, s in client.sols.items()}
        client.alphas = {k: s.alpha for k, s in client.sols.items()}
        timings["scale_search"] = time.perf_counter() - t_s
    if (client.model_level or auto) and writer:  # α is known only now: another pass writes every tensor
        t_w = time.perf_counter()
        write_alphas(ins, plan, writer, client.alphas, progress, "slta: writing")
        timings["write"] = time.perf_counter() - t_w
    return SltaResult(client.sols, {k: v.cpu() for k, v in store.g.items()}, task_of, indices, timings,
                      client.refined, search)


def head_stage(ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], store: GramStore,
               model_level: bool) -> None:
    """Output head features: logits = lm_head(norm(h)), vocab in row blocks (the Gram is a sum over
    vocabulary blocks, so the full logits never exist). Model level: each version's own logits,
    lm_head_t(norm_t(h_t)), the whole model's output (MODEL_FEATURES)."""
    dev, dt = runner.device, runner.dtype
    norm_mod = runner.model.model.norm
    norms = [ {"weight": ck.get("model.norm.weight").to(dev, dt)} for ck in ins.all]
    check_finite(ins, "model.norm.weight", [n["weight"] for n in norms])
    from torch.func import functional_call

    weight = "model.embed_tokens.weight" if plan.tied else "lm_head.weight"
    if model_level:
        module = "model"
        xs = {id(b): [functional_call(norm_mod, n, (h,)) for n, h in zip(norms, b.hv)] for b in batches}
    else:
        module = "embed_head" if plan.tied else "head"
        xs = {id(b): [functional_call(norm_mod, n, (b.h,)) for n in norms] for b in batches}
    vocab = ins.base.shapes[weight][0]
    for lo in range(0, vocab, ROW_BLOCK):
        hi = min(vocab, lo + ROW_BLOCK)
        blocks = [ck.get_rows(weight, lo, hi).to(dev, dt) for ck in ins.all]
        check_finite(ins, weight, blocks)
        for b in batches:
            store.add(module, [x @ w.T for x, w in zip(xs[id(b)], blocks)], b)
        del blocks  # before the next block is read (measured at 70B: 5.13 GiB held, 3.31 estimated)


def slta_report(cfg: MergeConfig, plan: Plan, res: SltaResult) -> dict[str, Any]:
    """The closed form's part of slta_report.json: parameters, solver rule, every module's α and diagnostics."""
    return {
        "granularity": plan.granularity,
        **({"model_features": MODEL_FEATURES} if plan.granularity == "model" else {}),
        "balance": cfg.param("balance"),
        "tokens": cfg.param("tokens"),
        "inputs": cfg.param("inputs"),
        "refine": cfg.param("refine"),
        "targets": cfg.param("targets"),
        "scale": cfg.param("scale"),
        "num_samples": cfg.param("num_samples"),
        "seed": cfg.param("seed"),
        "samples_per_task": [len(ix) for ix in res.sample_indices],
        "solver": {"rule": "eigen-decomposition of the symmetric PSD A: exact solve when every eigenvalue "
                           "exceeds rcond * max; else the minimum-norm least-squares solution over the "
                           "eigenvalues above it; A = 0 gives α = 0", "rcond": 1e-9},
        "modules": {name: sol.to_json() for name, sol in res.solutions.items()},
        **({"refine_objective": {"objective": REFINE_OBJECTIVE, "modules": res.refined}} if res.refined else {}),
        **({"scale_search": res.scale_search} if res.scale_search else {}),
        "timings": res.timings,
    }


