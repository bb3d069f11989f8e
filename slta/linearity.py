"""Linearity analysis, `slta analyze` (SPEC section 4; paper sections 2.2-2.3, A.1.1, A.2, A.5.9).

For every fine-tuned model θ_t = θ_0 + τ_t and every module of the layer, attn, mlp and head cuts
(and the whole model) this measures, on the calibration samples:

  Non-linearity Score (Eq. 19)  θ_k = θ_0 + (k/N) τ, k = 0..N (N = 10);
                                score(x) = Σ_{i,j} ( D(f(x;θ_i), f(x;θ_j)) / D(f(x;θ_N), f(x;θ_0)) - |i-j|/N )²
  interpolation curve (Table 18) D(f(x;θ_0 + ατ), f(x;θ)) / D(f(x;θ_0), f(x;θ)), α = k/N (row N of the
                                same normalised distance matrix, which Figure 6 draws)
  merging linearity (Eq. 8, 15-17) for every 2-model combination over α ∈ {0.2,..,1}² and every
                                3-model one over {0.3,0.5,0.7}³:
      r(x) = ⟨Δf(x; θ_0 + Σα_t τ_t), Σα_t Δf_t(x)⟩ / ||Σα_t Δf_t(x)||²   (= ||Δf_merge|| cos / ||Σ α Δf||)
      projection distance = |1 - E_x r(x)|                                (Eq. 8)
      cosine_merge = E_x cos(Δf_merge(x), Σα_t Δf_t(x))                   (Eq. 15-16)
      cosine_base = E_x mean over pairs t<t' of cos(Δf_t(x), Δf_t'(x))    (Eq. 17; the paper's
                    1/(T(T-1)) factor halves the mean over pairs; we report the mean, as Zhou et al.)

D is the Euclidean distance over one sample's flattened features (real tokens only). Module
inputs are the base model's (A.3.3), exactly as the merge computes them (slta.features): a
module's versions all run on the same base input. The model level runs every version's own
forward, layer by layer, and compares the final hidden states (after the final norm).

Everything streams like the merge: one decoder layer's T+1 checkpoint versions are in memory at a
time and every interpolated or merged version of that layer is built on the fly, used on each
batch and dropped. The model level keeps one hidden-state stream per version (activations, not
weights); batches are grouped so those streams fit `stream_memory`, with one pass over the
checkpoints per group.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.func import functional_call
from tqdm.auto import tqdm

import slta
from slta.architecture import Plan, build_plan, head_dim, layer_prefix
from slta.checkpoint import dtype_name, parse_dtype, parse_size
from slta.config import ConfigError, MergeConfig, load_config
from slta.features import Batch, Runner, sub, to_compute
from slta.merge import (ROW_BLOCK, Inputs, _check_finite, calibration, embed_stage, input_paths, layer_groups,
                        load_group, open_inputs, resolve_device)

log = logging.getLogger("slta")

LEVELS = ("model", "layer", "attn", "mlp", "head")
MERGE_GRIDS = {2: (0.2, 0.4, 0.6, 0.8, 1.0), 3: (0.3, 0.5, 0.7)}  # Figures 3-4
STEPS = 10  # N of Eq. 19 (A.2)
# Calibration parameters read from the config (with slta's defaults when the config is for another method).
CALIB_DEFAULTS = {"num_samples": 30, "seed": 0, "max_length": 2048, "batch_size": 8}


# -- the formulas, on a batch of samples -------------------------------------------------------------

def pairwise_distances(x: torch.Tensor) -> torch.Tensor:
    """(b, K, D) -> (b, K, K): Euclidean distances between the K feature vectors of each sample,
    computed from differences (no Gram-matrix cancellation), accumulated in float64."""
    return torch.stack([torch.linalg.vector_norm(x[:, i:i + 1] - x, dim=-1, dtype=torch.float64)
                        for i in range(x.shape[1])], 1)


def normalised_distances(x: torch.Tensor) -> torch.Tensor:
    """D(f(θ_i), f(θ_j)) / D(f(θ_N), f(θ_0)) (Eq. 18-19, Figure 6) from the features of θ_0..θ_N,
    x of shape (b, N+1, D). Samples where θ_N and θ_0 give the same features come out NaN."""
    d = pairwise_distances(x)
    scale = d[:, -1, 0]
    scale = torch.where(scale > 0, scale, torch.full_like(scale, float("nan")))
    return d / scale[:, None, None]


def ideal_distances(n: int) -> np.ndarray:
    """|i - j| / N: the normalised distance matrix of a perfectly linear module (Eq. 18)."""
    k = np.arange(n + 1)
    return np.abs(k[:, None] - k[None, :]) / n


def nonlinearity_score(ratios: torch.Tensor) -> torch.Tensor:
    """Eq. 19 from normalised distance matrices (..., N+1, N+1): Σ_{i,j} (ratio_ij - |i-j|/N)²."""
    n = ratios.shape[-1] - 1
    ideal = torch.as_tensor(ideal_distances(n), dtype=ratios.dtype, device=ratios.device)
    return ((ratios - ideal) ** 2).sum((-1, -2))


def score_of_function(f: Callable[[torch.Tensor], torch.Tensor], theta0: torch.Tensor, tau: torch.Tensor,
                      steps: int = STEPS) -> float:
    """Non-linearity Score (Eq. 19) of any function of the weights on one input: f(θ_0 + (k/N)τ)."""
    feats = [f(theta0 + (k / steps) * tau).reshape(-1) for k in range(steps + 1)]
    x = torch.stack(feats)[None].to(torch.float64)
    return float(nonlinearity_score(normalised_distances(x))[0])


# -- the versions of a module: base, interpolations, merges ------------------------------------------

@dataclass
class Combo:
    models: tuple[int, ...]  # indices of the fine-tuned models merged
    alphas: list[tuple[float, ...]]  # grid of merge weights
    index: list[int]  # version index of each grid point


@dataclass
class Versions:
    """Every weight version the analysis evaluates, as task-vector coefficients c: θ_0 + Σ_t c_t τ_t.
    Version 0 is the base, 1..T the fine-tunes themselves."""

    T: int
    steps: int
    coefs: list[tuple[float, ...]]
    path: list[list[int]]  # path[t][k]: version index of θ_0 + (k/N) τ_t, k = 0..N
    combos: list[Combo]


def make_versions(T: int, steps: int = STEPS, merge_sizes: Sequence[int] = (2, 3)) -> Versions:
    coefs: list[tuple[float, ...]] = [(0.0,) * T] + [tuple(float(t == s) for s in range(T)) for t in range(T)]
    path = []
    for t in range(T):
        idx = [0]
        for k in range(1, steps):
            coefs.append(tuple(k / steps if s == t else 0.0 for s in range(T)))
            idx.append(len(coefs) - 1)
        path.append(idx + [1 + t])
    combos = []
    for size in merge_sizes:
        if size not in MERGE_GRIDS:
            raise ValueError(f"merging linearity is defined for 2 or 3 models (the paper's grids), not {size}")
        for models in itertools.combinations(range(T), size):
            alphas = list(itertools.product(MERGE_GRIDS[size], repeat=size))
            index = []
            for a in alphas:
                c = [0.0] * T
                for t, x in zip(models, a):
                    c[t] = x
                coefs.append(tuple(c))
                index.append(len(coefs) - 1)
            combos.append(Combo(models, alphas, index))
    return Versions(T, steps, coefs, path, combos)


def task_vectors(versions: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """[θ_0, θ_1, .., θ_T] -> [θ_0, τ_1, .., τ_T] (τ_t = θ_t - θ_0), replacing each θ_t as it goes."""
    base = versions[0]
    out = [base]
    for v in versions[1:]:
        out.append({k: v.pop(k) - base[k] for k in list(v)})
    return out


def interpolate(taus: list[dict[str, torch.Tensor]], coef: Sequence[float]) -> dict[str, torch.Tensor]:
    """θ_0 + Σ_t c_t τ_t (Eq. 1), tensor by tensor, from [θ_0, τ_1, .., τ_T]; the base itself when c = 0."""
    nz = [(t, c) for t, c in enumerate(coef) if c != 0.0]
    if not nz:
        return taus[0]
    out = {}
    for k, w0 in taus[0].items():
        w = torch.add(w0, taus[nz[0][0] + 1][k], alpha=nz[0][1])
        for t, c in nz[1:]:
            w.add_(taus[t + 1][k], alpha=c)
        out[k] = w
    return out


# -- accumulating statistics ------------------------------------------------------------------------

class Acc:
    """Running sum / sum of squares / count (float64) of values per sample, ignoring NaN."""

    def __init__(self, shape: tuple[int, ...] = ()):
        self.s, self.q, self.n = np.zeros(shape), np.zeros(shape), np.zeros(shape)

    def add(self, index: Any, values: np.ndarray) -> None:
        """values: (samples,) for one entry `index` of the accumulator."""
        ok = np.isfinite(values)
        self.s[index] += values[ok].sum()
        self.q[index] += (values[ok] ** 2).sum()
        self.n[index] += ok.sum()

    def mean(self) -> np.ndarray:
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.s / np.maximum(self.n, 1), np.nan)

    def std(self) -> np.ndarray:
        m = self.mean()
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.maximum(self.q / np.maximum(self.n, 1) - m ** 2, 0.0))


@dataclass
class ModuleStats:
    name: str
    level: str
    layer: int | None
    T: int
    steps: int
    num_samples: int
    combos: list[Combo]
    score: np.ndarray = field(init=False)  # (T, samples) Eq. 19 per sample
    curve: np.ndarray = field(init=False)  # (T, samples, N+1) Table 18 per sample
    matrix: Acc = field(init=False)  # (T, N+1, N+1) mean normalised distance matrix (Figure 6)
    ratio: list[Acc] = field(init=False)  # per combo (grid,) r(x) of Eq. 8
    cos: list[Acc] = field(init=False)  # per combo (grid,) Eq. 15
    cos_base: list[Acc] = field(init=False)  # per combo () Eq. 17

    def __post_init__(self) -> None:
        n1 = self.steps + 1
        self.score = np.full((self.T, self.num_samples), np.nan)
        self.curve = np.full((self.T, self.num_samples, n1), np.nan)
        self.matrix = Acc((self.T, n1, n1))
        self.ratio = [Acc((len(c.alphas),)) for c in self.combos]
        self.cos = [Acc((len(c.alphas),)) for c in self.combos]
        self.cos_base = [Acc(()) for _ in self.combos]

    def add_path(self, t: int, x: torch.Tensor, samples: list[int]) -> None:
        """x: (b, N+1, D) features of θ_0 + (k/N) τ_t, k = 0..N, for the samples of one batch."""
        r = normalised_distances(x)
        self.score[t, samples] = nonlinearity_score(r).cpu().numpy()
        r = r.cpu().numpy()
        self.curve[t, samples] = r[:, :, -1]  # D(f(θ_k), f(θ_N)) / D(f(θ_0), f(θ_N))
        for m in r:
            if np.isfinite(m).all():
                self.matrix.s[t] += m
                self.matrix.n[t] += 1

    def add_merge(self, c: int, k: int, dm: torch.Tensor, lin: torch.Tensor) -> None:
        """dm = Δf(θ_0 + Σ α τ), lin = Σ α Δf_t, both (b, D) (Eq. 8, 15); reductions in float64."""
        dot = (dm * lin).sum(-1, dtype=torch.float64)
        nl = torch.linalg.vector_norm(lin, dim=-1, dtype=torch.float64)
        nm = torch.linalg.vector_norm(dm, dim=-1, dtype=torch.float64)
        nan = torch.full_like(dot, float("nan"))
        self.ratio[c].add(k, torch.where(nl > 0, dot / nl ** 2, nan).cpu().numpy())
        self.cos[c].add(k, torch.where((nl > 0) & (nm > 0), dot / (nl * nm), nan).cpu().numpy())

    def add_cos_base(self, c: int, deltas: list[torch.Tensor]) -> None:
        """Mean over pairs t < t' of cos(Δf_t, Δf_t') per sample (Eq. 17)."""
        cs = [_cos(a, b) for a, b in itertools.combinations(deltas, 2)]
        self.cos_base[c].add((), torch.stack(cs).mean(0).cpu().numpy())


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    na = torch.linalg.vector_norm(a, dim=-1, dtype=torch.float64)
    nb = torch.linalg.vector_norm(b, dim=-1, dtype=torch.float64)
    ok = (na > 0) & (nb > 0)
    dot = (a * b).sum(-1, dtype=torch.float64)
    return torch.where(ok, dot / (na * nb).clamp_min(1e-300), torch.full_like(na, float("nan")))


# A module's features for one version and batch: a tensor (b, s, ...) or, for an attention head,
# (z, W): its slice of o_proj's input and its columns of o_proj, multiplied only when needed.
Feature = torch.Tensor | tuple[torch.Tensor, torch.Tensor]


def flat(f: Feature, valid: torch.Tensor) -> torch.Tensor:
    """Features of one batch -> (b, D) in the compute dtype, padding positions zeroed (so they drop
    out of every distance and inner product: 'real tokens only'). Reductions are done in float64."""
    if isinstance(f, tuple):
        f = f[0] @ f[1].T
    f = f * valid.reshape(*valid.shape, *([1] * (f.dim() - valid.dim()))).to(f.dtype)
    return f.reshape(f.shape[0], -1)


def accumulate(feat: Callable[[int], dict[str, Feature]], vs: Versions, stats: dict[str, ModuleStats],
               valid: torch.Tensor, samples: list[int]) -> None:
    """Evaluate every version of one batch in the order that keeps few alive: the N+1 points of one
    fine-tune's path at a time (the Non-linearity Score needs them together), then the base and
    the T fine-tunes stay while the merged versions are evaluated one by one."""
    f0 = feat(0)
    names = list(f0)
    finals = {}
    for t in range(vs.T):
        seq = [f0] + [feat(v) for v in vs.path[t][1:]]
        for name in names:
            x0 = flat(f0[name], valid)
            # differences from the base: the same distances, with less cancellation
            x = torch.stack([torch.zeros_like(x0)] + [flat(s[name], valid) - x0 for s in seq[1:]], 1)
            stats[name].add_path(t, x, samples)
            del x
        finals[t] = seq[-1]
        del seq
    for c, combo in enumerate(vs.combos):
        for name in names:
            x0 = flat(f0[name], valid)
            stats[name].add_cos_base(c, [flat(finals[t][name], valid) - x0 for t in combo.models])
        for k, (alpha, v) in enumerate(zip(combo.alphas, combo.index)):
            fm = feat(v)
            for name in names:
                x0 = flat(f0[name], valid)
                lin = sum(a * (flat(finals[t][name], valid) - x0) for a, t in zip(alpha, combo.models))
                stats[name].add_merge(c, k, flat(fm[name], valid) - x0, lin)
            del fm


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


def module_pass(ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], vs: Versions,
                stats: dict[str, ModuleStats], levels: set[str], progress: bool) -> None:
    groups = [g for g in layer_groups(plan) if g[0] not in ("embed", "head")]
    embed_stage(ins, plan, runner, batches, None)  # base embeddings: each batch's input of layer 0
    dev, dt = runner.device, runner.dtype
    for label, group in tqdm(groups, desc="slta analyze: modules", disable=not progress, unit="layer"):
        i = int(label.split()[1])
        versions = task_vectors([to_compute(sub(g, layer_prefix(i)), dev, dt) for g in load_group(ins, group)])
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


# -- model level: every version's own forward, layer by layer ----------------------------------------

def model_pass(ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], vs: Versions,
               stats: dict[str, ModuleStats], progress: bool, desc: str) -> None:
    """One pass over the checkpoints for a group of batches: each version's hidden states go through
    its own embedding, layers and final norm; features = final hidden states (after the norm)."""
    dev, dt = runner.device, runner.dtype
    V = len(vs.coefs)
    embed = plan.tensor_order[0]
    vocab, hidden = ins.base.shapes[embed]
    streams = {id(b): [torch.zeros(*b.ids.shape, hidden, device=dev, dtype=dt) for _ in range(V)] for b in batches}
    for lo in range(0, vocab, ROW_BLOCK):  # embedding rows, in row blocks like the merge
        hi = min(vocab, lo + ROW_BLOCK)
        blocks = [ck.get_rows(embed, lo, hi).to(dev, dt) for ck in ins.all]
        _check_finite(ins, embed, blocks)
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
    groups = [g for g in layer_groups(plan) if g[0] not in ("embed", "head")]
    for label, group in tqdm(groups, desc=desc, disable=not progress, unit="layer"):
        i = int(label.split()[1])
        versions = task_vectors([to_compute(sub(g, layer_prefix(i)), dev, dt) for g in load_group(ins, group)])
        for v in range(V):
            p = interpolate(versions, vs.coefs[v])
            for b in batches:
                streams[id(b)][v] = runner.layer_out(i, p, streams[id(b)][v], b)
            del p
        del versions
    norm_names = [n for n in ins.base.names() if n.startswith("model.norm.")]
    norms = task_vectors([to_compute(sub(g, "model.norm."), dev, dt) for g in load_group(ins, norm_names)])
    norm_mod = runner.model.model.norm
    for v in range(V):
        p = interpolate(norms, vs.coefs[v])
        for b in batches:
            streams[id(b)][v] = functional_call(norm_mod, p, (streams[id(b)][v],))
    for b in batches:
        s = streams.pop(id(b))
        accumulate(lambda v: {"model": s[v]}, vs, stats, b.valid, b.samples)


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


# -- summaries ---------------------------------------------------------------------------------------

def _num(x: Any) -> Any:
    """numpy -> JSON (NaN -> null)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        v = float(a)
        return v if math.isfinite(v) else None
    return [_num(y) for y in a]


def module_json(st: ModuleStats, task_of: np.ndarray, n_tasks: int) -> dict[str, Any]:
    with warnings.catch_warnings():  # modules a fine-tune left unchanged: empty means are NaN -> null
        warnings.simplefilter("ignore", RuntimeWarning)
        out: dict[str, Any] = {
            "level": st.level, "layer": st.layer,
            "score": {  # Eq. 19, per fine-tuned model: over samples
                "mean": _num(np.nanmean(st.score, 1)), "std": _num(np.nanstd(st.score, 1)),
                "n": [int(x) for x in np.isfinite(st.score).sum(1)],
                "per_task_mean": [_num(np.nanmean(st.score[:, task_of == a], 1)) for a in range(n_tasks)],
            },
            "curve": {"mean": _num(np.nanmean(st.curve, 1)), "std": _num(np.nanstd(st.curve, 1))},  # Table 18
            "distance_matrix": _num(st.matrix.mean()),  # Figure 6 (mean over samples)
        }
    merging = []
    for c, combo in enumerate(st.combos):
        merging.append({
            "models": list(combo.models), "alphas": [list(a) for a in combo.alphas],
            "projection_distance": _num(np.abs(1 - st.ratio[c].mean())),  # Eq. 8
            "ratio_std": _num(st.ratio[c].std()),
            "cosine_merge": _num(st.cos[c].mean()), "cosine_merge_std": _num(st.cos[c].std()),  # Eq. 15-16
            "cosine_base": _num(st.cos_base[c].mean()), "cosine_base_std": _num(st.cos_base[c].std()),  # Eq. 17
        })
    out["merging"] = merging
    return out


def _mean_std(values: list[float]) -> dict[str, Any]:
    a = np.array([v for v in values if v is not None], dtype=np.float64)
    if a.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(a.mean()), "std": float(a.std()), "n": int(a.size)}


def summarize(modules: dict[str, dict[str, Any]], T: int) -> dict[str, Any]:
    """Per level (Figures 2-4, Table 17): mean and std over modules (and over samples for the single
    model-level module), per fine-tuned model; merging numbers pooled over modules, combinations and α."""
    by_level: dict[str, list[dict[str, Any]]] = {}
    for m in modules.values():
        by_level.setdefault(m["level"], []).append(m)
    score, curve, merging = {}, {}, {}
    for level in LEVELS:
        mods = by_level.get(level)
        if not mods:
            continue
        per_model = []
        for t in range(T):
            means = _mean_std([m["score"]["mean"][t] for m in mods])
            sample_std = _mean_std([m["score"]["std"][t] for m in mods])["mean"]
            std = sample_std if level == "model" else means["std"]
            per_model.append({"mean": means["mean"], "std": std, "std_of": "samples" if level == "model" else "modules",
                              "std_over_modules": means["std"], "mean_std_over_samples": sample_std,
                              "modules": means["n"]})
        score[level] = per_model
        curves = []
        for t in range(T):
            c = np.array([m["curve"]["mean"][t] for m in mods if None not in m["curve"]["mean"][t]], dtype=float)
            curves.append({"mean": _num(c.mean(0)) if len(c) else None, "std": _num(c.std(0)) if len(c) else None})
        curve[level] = curves
        sizes: dict[str, dict[str, list]] = {}
        for m in mods:
            for entry in m["merging"]:
                d = sizes.setdefault(str(len(entry["models"])), {"pd": [], "cm": [], "cb": []})
                d["pd"] += entry["projection_distance"]
                d["cm"] += [None if x is None else 1 - x for x in entry["cosine_merge"]]
                d["cb"].append(None if entry["cosine_base"] is None else 1 - entry["cosine_base"])
        if sizes:
            merging[level] = {k: {"projection_distance": _mean_std(d["pd"]),
                                  "one_minus_cosine_merge": _mean_std(d["cm"]),
                                  "one_minus_cosine_base": _mean_std(d["cb"])} for k, d in sizes.items()}
    return {"score": score, "curve": curve, "merging": merging}


def level_of(name: str) -> tuple[str, int | None]:
    if name == "model":
        return "model", None
    parts = name.split(".")
    layer = int(parts[1])
    if len(parts) == 2:
        return "layer", layer
    return parts[2], layer  # attn | mlp | head


# -- the command -------------------------------------------------------------------------------------

def analysis_config(config: str | Path | dict | MergeConfig, num_samples: int | None) -> MergeConfig:
    """The merge YAML, read for its models, base, data files and calibration parameters."""
    cfg = load_config(config)
    params = {k: cfg.parameters.get(k, v) for k, v in CALIB_DEFAULTS.items()}
    if num_samples is not None:
        params["num_samples"] = num_samples
    for key, v in params.items():
        if not isinstance(v, int) or isinstance(v, bool) or (v < 1 and key != "seed"):
            raise ConfigError(f"parameters.{key}: expected a positive integer, got {v!r}")
    if not cfg.base_model:
        raise ConfigError("linearity analysis needs base_model (task vectors are θ_t - θ_0)")
    for i, entry in enumerate(cfg.models):
        if not entry.data:
            raise ConfigError(f"models[{i}] ({entry.model}): the analysis needs calibration data: "
                              f"add 'data: path/to/task.jsonl'")
    models = [e.model_copy(update={"parameters": {}}) for e in cfg.models]
    return cfg.model_copy(update={"merge_method": "slta", "parameters": params, "models": models})


def analyze(config: str | Path | dict | MergeConfig, device: str = "cpu", num_samples: int | None = None,
            levels: Sequence[str] | None = None, dtype: str | torch.dtype = "float32", steps: int = STEPS,
            merging: bool = True, stream_memory: str | int = "1GB", progress: bool = True) -> dict[str, Any]:
    """Compute the analysis and return it as the dict written to linearity.json."""
    started = time.perf_counter()
    levels = list(LEVELS if not levels else levels)
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad:
        raise ConfigError(f"unknown level {bad[0]!r}; use some of {', '.join(LEVELS)}")
    if steps < 1:
        raise ConfigError(f"steps must be at least 1, got {steps}")
    original = load_config(config)
    cfg = analysis_config(original, num_samples)
    dev = resolve_device(device)
    dt = parse_dtype(dtype)
    ins = open_inputs(cfg)
    T = len(ins.tuned)
    plan = build_plan(ins.hf_config, ins.base.names(), "head_mlp")
    vs = make_versions(T, steps, [s for s in (2, 3) if s <= T] if merging else [])
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tasks, indices = calibration(ins)
    timings["calibration"] = time.perf_counter() - t0
    task_of = np.concatenate([np.full(len(t), a, dtype=np.int64) for a, t in enumerate(tasks)])
    S = len(task_of)
    runner = Runner(plan, dev, dt)

    stats: dict[str, ModuleStats] = {}

    def add(name: str) -> None:
        level, layer = level_of(name)
        stats[name] = ModuleStats(name, level, layer, T, steps, S, vs.combos)

    module_levels = set(levels) - {"model"}
    if module_levels:
        for i in range(plan.num_layers):
            for m in plan.layer_modules(i):
                kind = {"attn_head": "head"}.get(m.kind, m.kind)
                if kind in module_levels:
                    add(m.name)
            if "layer" in module_levels:
                add(f"layers.{i}")
        t0 = time.perf_counter()
        module_pass(ins, plan, runner, runner.make_batches(tasks, cfg.param("batch_size")), vs, stats,
                    module_levels, progress)
        timings["modules"] = time.perf_counter() - t0
    if "model" in levels:
        add("model")
        t0 = time.perf_counter()
        batches = runner.make_batches(tasks, cfg.param("batch_size"))
        itemsize = torch.empty((), dtype=dt).element_size()
        groups = stream_groups(batches, len(vs.coefs), ins.hf_config.hidden_size, itemsize, parse_size(stream_memory))
        if len(groups) > 1:
            need = len(vs.coefs) * sum(b.ids.numel() for b in batches) * ins.hf_config.hidden_size * itemsize
            log.info("model level: %d hidden-state streams need %.2f GiB, over stream_memory: %d passes over the "
                     "checkpoints (raise --stream-memory for fewer)", len(vs.coefs), need / 2**30, len(groups))
        for g, group in enumerate(groups):
            desc = "slta analyze: model" + (f" ({g + 1}/{len(groups)})" if len(groups) > 1 else "")
            model_pass(ins, plan, runner, group, vs, stats, progress, desc)
        timings["model"] = time.perf_counter() - t0
        timings["model_passes"] = len(groups)

    order = (["model"] if "model" in stats else []) + [n for n in stats if n != "model"]
    modules = {name: module_json(stats[name], task_of, T) for name in order}
    timings["total"] = time.perf_counter() - started
    return {
        "slta_version": slta.__version__,
        "base_model": str(ins.base.folder),
        "models": [str(ck.folder) for ck in ins.tuned],
        "data": [str(cfg.path(e.data)) for e in cfg.models],
        "samples_per_task": [len(t) for t in tasks],
        "sample_indices": indices,
        "num_layers": plan.num_layers,
        "levels": [lv for lv in LEVELS if lv in levels],
        "steps": steps,
        "interpolation_alphas": [k / steps for k in range(steps + 1)],
        "merge_grids": {str(k): list(v) for k, v in MERGE_GRIDS.items() if k <= T} if merging else {},
        "dtype": dtype_name(dt),
        "device": str(dev),
        "config": original.model_dump(mode="json"),
        "calibration": {k: cfg.param(k) for k in CALIB_DEFAULTS},
        "definitions": {
            "score": "Eq. 19: sum over i,j in 0..N of (D(f(θ_i),f(θ_j)) / D(f(θ_N),f(θ_0)) - |i-j|/N)^2 per sample; "
                     "mean/std over samples (all tasks' calibration samples, base-model inputs)",
            "curve": "Table 18: D(f(θ_0 + ατ), f(θ)) / D(f(θ_0), f(θ)), α = k/N",
            "distance_matrix": "Figure 6: D(f(θ_i), f(θ_j)) / D(f(θ_N), f(θ_0)), mean over samples",
            "projection_distance": "Eq. 8: |1 - E_x <Δf_merge, Σ α Δf_t> / ||Σ α Δf_t||^2|",
            "cosine_merge": "Eq. 15-16: E_x cos(Δf_merge, Σ α Δf_t)",
            "cosine_base": "Eq. 17: E_x mean over pairs t<t' of cos(Δf_t, Δf_t')",
            "summary_std": "score: std over modules of the per-module means (model level: std over samples)",
        },
        "summary": summarize(modules, T),
        "modules": modules,
        "timings": timings,
    }


def run_analyze(config: str | Path | dict | MergeConfig, out: str | Path, device: str = "cpu",
                num_samples: int | None = None, levels: Sequence[str] | None = None,
                module: str | Sequence[str] | None = None, progress: bool = True,
                dtype: str | torch.dtype = "float32", steps: int = STEPS, merging: bool = True,
                stream_memory: str | int = "1GB", overwrite: bool = False) -> Path:
    """`slta analyze CONFIG -o DIR`: linearity.json and the paper's figures (2, 3, 4, 6 and the
    interpolation curves of Table 18), written atomically. `module` picks Figure 6's module(s)."""
    from slta import figures
    from slta.output import atomic_output, check_output

    cfg = load_config(config)
    check_output(out, overwrite, input_paths(cfg))  # before the analysis: OUT must not hold an input
    data = analyze(cfg, device=device, num_samples=num_samples, levels=levels, dtype=dtype, steps=steps,
                   merging=merging, stream_memory=stream_memory, progress=progress)
    modules = [module] if isinstance(module, str) else list(module or [])
    missing = [m for m in modules if m not in data["modules"]]
    if missing:
        raise ConfigError(f"--module {missing[0]!r} was not analysed; analysed modules are e.g. "
                          f"{', '.join(list(data['modules'])[:6])}")
    out = Path(out)
    with atomic_output(out, overwrite, inputs=input_paths(cfg)) as tmp:
        (tmp / "linearity.json").write_text(json.dumps(data, indent=1) + "\n")
        figures.draw_analysis(data, tmp, modules or None)
    return out


def add_cli(subparsers: Any) -> None:
    p = subparsers.add_parser("analyze", help="linearity analysis of the fine-tunes (Non-linearity Score, "
                              "projection distance, cosine): linearity.json + figures")
    p.add_argument("config", help="merge config (YAML): base_model, models with their calibration data")
    p.add_argument("-o", "--output", required=True, help="report folder to write")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("--num-samples", type=int, help="calibration samples per task (default: the config's, or 30)")
    p.add_argument("--levels", nargs="+", metavar="LEVEL",
                   help=f"levels to analyse, among {', '.join(LEVELS)} (default: all)")
    p.add_argument("--module", action="append", metavar="NAME",
                   help="module(s) for Figure 6, e.g. model, layers.9, layers.9.mlp (default: model and the "
                        "middle layer)")
    p.add_argument("--steps", type=int, default=STEPS, help=f"N of Eq. 19: interpolation steps (default {STEPS})")
    p.add_argument("--dtype", default="float32", choices=["float32", "float64"], help="compute dtype")
    p.add_argument("--no-merging", action="store_true", help="skip the merging linearity (Figures 3-4)")
    p.add_argument("--stream-memory", default="1GB",
                   help="memory for the model level's hidden-state streams; more passes when over (default 1GB)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cli)


def _cli(a: argparse.Namespace) -> None:
    levels = [x for lv in a.levels for x in lv.split(",") if x] if a.levels else None
    out = run_analyze(a.config, a.output, device=a.device, num_samples=a.num_samples, levels=levels,
                      module=a.module, progress=not a.quiet, dtype=a.dtype, steps=a.steps, merging=not a.no_merging,
                      stream_memory=a.stream_memory, overwrite=a.overwrite)
    data = json.loads((Path(out) / "linearity.json").read_text())
    print(format_summary(data))
    print(f"linearity report written to {out}")


def format_summary(data: dict[str, Any]) -> str:
    """A short table: Non-linearity Score per level and model (mean ± std), like Table 17."""
    score = data["summary"]["score"]
    names = [Path(m).name for m in data["models"]]
    lines = ["| level | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for level, per_model in score.items():
        # significant digits, not decimals: module scores of ~1e-5 must not print as 0.0000
        cells = [("n/a" if e["mean"] is None else f"{e['mean']:.3g} ± {e['std'] or 0:.2g}") for e in per_model]
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
