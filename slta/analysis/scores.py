"""The linearity analysis's mathematics (paper sections 2.2-2.3, A.1.1, A.2; SPEC section 4): the
Non-linearity Score (Eq. 19), interpolation curves (Table 18), merging linearity (Eq. 8, 15-17),
the weight versions they are evaluated on, per-sample accumulators, and the per-level summaries.
Nothing here streams or reads a checkpoint (that is slta.analysis.stream).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

LEVELS = ("model", "layer", "attn", "mlp", "head")
MERGE_GRIDS = {2: (0.2, 0.4, 0.6, 0.8, 1.0), 3: (0.3, 0.5, 0.7)}  # Figures 3-4
STEPS = 10  # N of Eq. 19 (A.2)


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
    """A combination of fine-tunes merged at every point of a grid of merge weights (Figures 3-4)."""

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
    """The base, the T fine-tunes, each fine-tune's interpolation path θ_0 + (k/N) τ_t (Eq. 19) and
    the merges θ_0 + Σ α_t τ_t over MERGE_GRIDS of every combination of `merge_sizes` models (Eq. 8)."""
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
        """Mean over the finite values added (NaN where none)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.n > 0, self.s / np.maximum(self.n, 1), np.nan)

    def std(self) -> np.ndarray:
        """Population standard deviation over the finite values added."""
        m = self.mean()
        with np.errstate(invalid="ignore"):
            return np.sqrt(np.maximum(self.q / np.maximum(self.n, 1) - m ** 2, 0.0))


@dataclass
class ModuleStats:
    """Per-sample Non-linearity Scores (Eq. 19) and curves (Table 18), and the accumulated distance
    matrix (Figure 6) and merging statistics (Eq. 8, 15-17) of one module."""

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


# -- summaries ---------------------------------------------------------------------------------------

def _num(x: Any) -> Any:
    """numpy -> JSON (NaN -> null)."""
    a = np.asarray(x, dtype=np.float64)
    if a.ndim == 0:
        v = float(a)
        return v if math.isfinite(v) else None
    return [_num(y) for y in a]


def module_json(st: ModuleStats, task_of: np.ndarray, n_tasks: int) -> dict[str, Any]:
    """One module's entry of linearity.json: score (Eq. 19), curve (Table 18), distance matrix
    (Figure 6) and merging linearity (Eq. 8, 15-17) per combination."""
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
    """"model" -> ("model", None); "layers.3" -> ("layer", 3); "layers.3.mlp" -> ("mlp", 3)."""
    if name == "model":
        return "model", None
    parts = name.split(".")
    layer = int(parts[1])
    if len(parts) == 2:
        return "layer", layer
    return parts[2], layer  # attn | mlp | head
