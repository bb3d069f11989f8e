"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

Every nn.Linear is merged in closed form so that its outputs on each task's inputs stay close to
that task's fine-tune: W = argmin Σ_t ||X_t Wᵀ - X_t W_tᵀ||², i.e. Wᵀ = (Σ_t G_t)⁻¹ Σ_t G_t W_tᵀ with
G_t = X_tᵀ X_t the Gram matrix of the layer's inputs on task t (summed over tokens, as in the paper).
The off-diagonal entries of each G_t are scaled by `alpha` (default 0.9, the paper's α; FusionBench
calls it reduce_non_diagonal_ratio), which regularises towards plain averaging.

As in slta, the inputs X_t come from the *base* model run on the same calibration samples, streamed
layer by layer. The lm_head is a linear layer too (input: the base's normalised final hidden states).
Parameters of no linear layer (embeddings, norms) and linear biases are averaged.
Linear systems are solved by Cholesky; when Σ G_t is singular (alpha = 1 with fewer tokens than
input features) the minimum-norm least-squares solution is used, and reported.
"""

from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from slta.methods import Method, register

register(
    Method(
        name="regmean",
        tensor_fn=None,
        needs_data=True,
        method_params={"alpha": 0.9, "num_samples": 30, "max_length": 2048, "batch_size": 8},
        reference="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
    )
)


def scaled_gram(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 - α) diag(G): off-diagonals scaled by α."""
    return alpha * g + (1 - alpha) * torch.diag_embed(torch.diagonal(g))


def regmean_weight(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float) -> tuple[torch.Tensor, str]:
    """Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ in float64. Returns (W, rule)."""
    lhs = rhs = None
    for g, w in zip(grams, weights):  # one task at a time: a few in x in matrices, not 2T of them
        gs = scaled_gram(g.double(), alpha)
        term = gs @ w.double().T
        lhs = gs if lhs is None else lhs.add_(gs)
        rhs = term if rhs is None else rhs.add_(term)
        del gs, term
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T, "cholesky"
    evals, evecs = torch.linalg.eigh(lhs)
    keep = evals > 1e-12 * evals[-1].clamp_min(0)
    inv = torch.where(keep, 1 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return (evecs @ (inv[:, None] * (evecs.T @ rhs))).T, "min-norm"


def run_regmean(ins, plan, writer, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Stream the base forward pass, accumulate per-task input Grams of every linear, merge, write."""
    from torch.func import functional_call

    from slta.architecture import layer_prefix
    from slta.features import Runner, capture_linear_inputs, sub, to_compute
    from slta.merge import calibration, embed_stage, layer_groups, load_group

    cfg = ins.cfg
    alpha = float(cfg.param("alpha"))
    if not 0 <= alpha <= 1:
        raise ValueError(f"regmean: parameters.alpha must be in [0, 1], got {alpha}")
    T = len(ins.tuned)
    t0 = time.perf_counter()
    tasks, indices = calibration(ins)
    runner = Runner(plan, device, torch.float32)
    batches = runner.make_batches(tasks, cfg.param("batch_size"))
    rules: dict[str, str] = {}

    def accumulate(grams: dict[str, list[torch.Tensor]], name: str, task: int, x: torch.Tensor) -> None:
        x = x.to(torch.float64)
        g = grams.setdefault(name, [torch.zeros(x.shape[-1], x.shape[-1], dtype=torch.float64, device=device)
                                    for _ in range(T)])
        g[task] += x.T @ x

    for label, group in tqdm(layer_groups(plan), desc="regmean: layers", disable=not progress, unit="layer"):
        loaded = load_group(ins, group)
        grams: dict[str, list[torch.Tensor]] = {}
        prefix = ""
        if label == "embed":
            embed_stage(ins, plan, runner, batches, None)  # the base's inputs only
        elif label == "head":
            if "lm_head.weight" in group:  # input: the base's normalised final hidden states
                norm = {"weight": loaded[0]["model.norm.weight"].to(device, torch.float32)}
                for b in batches:
                    accumulate(grams, "lm_head", b.task, functional_call(runner.model.model.norm, norm, (b.h,))[b.valid])
        else:
            i = int(label.split()[1])
            prefix = layer_prefix(i)
            base = to_compute(sub(loaded[0], prefix), device, torch.float32)
            for b in batches:
                captured, b.h = capture_linear_inputs(runner, i, base, b.h, b)
                for name, x in captured.items():
                    accumulate(grams, name, b.task, x[b.valid])  # real tokens only
        _merge_grams(grams, group, prefix, loaded, writer, T, alpha, rules, device)
        del loaded
    return {"regmean": {"alpha": alpha, "solver_rules": rules, "samples_per_task": [len(ix) for ix in indices]},
            "timings": {"total_regmean": time.perf_counter() - t0}}


def _merge_grams(grams, group, prefix, loaded, writer, T, alpha, rules, device) -> None:
    """Linear weights by RegMean; everything else in the group (biases, norms, embeddings) averaged."""
    done = set()
    for name in list(grams):
        g = grams.pop(name)  # free each linear's Grams once it is merged
        key = f"{prefix}{name}.weight"
        w, rule = regmean_weight(g, [ld[key].to(device) for ld in loaded[1:]], alpha)
        del g
        writer.write(key, w)
        rules[f"{prefix}{name}"] = rule
        done.add(key)
    for n in group:
        if n not in done:
            writer.write(n, sum(ld[n].to(torch.float32) for ld in loaded[1:]) / T)
