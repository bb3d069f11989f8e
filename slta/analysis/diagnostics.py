"""`slta diagnose MERGED -o DIR`: why a closed-form merge does what it does, module by module.

For every module i of a closed-form merge (its folder holds slta_stats.safetensors) this reports

- Σ_t α_t, slta's total merge weight (task arithmetic's is T λ);
- the cosine between Δf_j and Δf_t on task t's calibration inputs (how much fine-tune j moves the
  module's output along, or against, fine-tune t's change on t's own data: interference), and
  the norm ratio ||Δf_j|| / ||Δf_t|| there;
- the paper's Eq. 10 objective, the true error of the merged module,
      Σ_t E_{x∈H_t} ||f(x; θ_0 + Σ_j c_j τ_j) − f(x; θ_t)||²,
  next to its linearisation Eq. 11, Σ_t E_{x∈H_t} ||Σ_j c_j Δf_j(x) − Δf_t(x)||², at slta's α
  (c = α: Eq. 11's minimiser), at task arithmetic's λ (c_j = λ) and at scaled α (c = s α).
  Both are normalised as the solve normalises (balanced, Eq. 33-34: each sample divided by
  (1/T) Σ_t ||Δf_t(x)||²), so Eq. 11 at α is exactly the minimum the solve reached; "zero" is
  the objective at c = 0 (the base module), the scale to read the others against.

How (one pass, no new feature code): each merge point is added as an extra *version* of the model,
a read-only view whose tensors are θ_0 + Σ_j c_j τ_j (slta.merges.write.combine, α varying by module as
in the merge). The closed form's own feature pass (slta.merges.closed_form.solve_closed_form, no writer)
then runs on base, the T fine-tunes and the P merged views over the same calibration samples,
and its per-sample Grams (T+P)x(T+P) hold everything: the T x T block is the saved statistics
(Σα, cosines, Eq. 11 need nothing else), and for a merged view m and a sample x of task t,
||f_m(x) − f_t(x)||² = G[m,m] − 2 G[m,t] + G[t,t] (Eq. 10). Cost: one feature pass with T+1+P
versions instead of the merge's T+1, and the merged views re-read the T+1 checkpoints per group.
A separate pass keeps the merge itself untouched and lets a saved merge be diagnosed at any λ.
At head_mlp the attention block's Eq. 10 is the block as merged (each head with its own α).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from slta.config import load_config as load_merge_config
from slta.io.inputs import MergeError, open_inputs, resolve_device
from slta.solve import solve_module

SCHEMA = "slta-diagnostics/1"


class MergedView:
    """A read-only checkpoint whose tensors are θ_0 + Σ_j c_j^(m) τ_j (Eq. 1), c per module."""

    def __init__(self, base: Any, tuned: list[Any], parts: dict[str, list], coeffs: dict[str, np.ndarray], label: str):
        self.base, self.tuned, self.parts, self.coeffs, self.label = base, tuned, parts, coeffs, label
        self.folder, self.file_of, self.shapes = base.folder, base.file_of, base.shapes

    def names(self) -> list[str]:
        return self.base.names()

    def _merge(self, name: str, base: torch.Tensor, tuned: list[torch.Tensor], rows=None) -> torch.Tensor:
        from slta.merges.write import combine

        if name not in self.parts:  # buffers no module owns: the base's, as the merge writes them
            return base
        return combine(name, base, tuned, self.parts[name], self.coeffs, rows)

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        base, tuned = self.base.get_many(names), [ck.get_many(names) for ck in self.tuned]
        return {n: self._merge(n, base[n], [t[n] for t in tuned]) for n in names}

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._merge(name, self.base.get_rows(name, start, stop),
                           [ck.get_rows(name, start, stop) for ck in self.tuned], (start, stop))


def merge_points(alphas: dict[str, np.ndarray], lambdas: list[float] = (), alpha_scales: list[float] = (),
                 task_scales: list[list[float]] = ()) -> dict[str, dict[str, np.ndarray]]:
    """The merges to diagnose: name -> per-module coefficients. slta's α, each α scale s (s α), each
    per-task factor vector c (α_t c_t: `scale: [c_1, ..., c_T]`, issue #28) and task arithmetic at each
    λ (c_j = λ for every module and fine-tune)."""
    points = {"slta": dict(alphas)}
    for s in alpha_scales:
        points[f"slta x{s:g}"] = {k: s * np.asarray(a) for k, a in alphas.items()}
    for c in task_scales:
        points[f"slta x[{','.join(f'{x:g}' for x in c)}]"] = {k: np.asarray(a) * np.asarray(c, dtype=np.float64)
                                                             for k, a in alphas.items()}
    for lam in lambdas:
        points[f"task_arithmetic {lam:g}"] = {k: np.full(len(a), float(lam)) for k, a in alphas.items()}
    return points


def measure(config: Any, points: dict[str, dict[str, np.ndarray]], device: str = "cpu",
            progress: bool = True) -> tuple[dict[str, np.ndarray], np.ndarray, str]:
    """Per-sample Grams (N, T+P, T+P) of [Δf_1..Δf_T, Δf_m1..Δf_mP] per module, on the base inputs of
    the config's calibration draw (the merge's draw), each sample's task, and the granularity."""
    from slta.io.architecture import build_plan
    from slta.merges.closed_form import solve_closed_form

    cfg = load_merge_config(config)
    ins = open_inputs(cfg)
    plan = build_plan(ins.hf_config, ins.base.names(), cfg.param("granularity"))
    parts = plan.tensor_parts()
    views = [MergedView(ins.base, ins.tuned, parts, c, f"merge point {name!r}") for name, c in points.items()]
    res = solve_closed_form(replace(ins, tuned=[*ins.tuned, *views]), plan, None, resolve_device(device), progress)
    return {k: v.numpy() for k, v in res.grams.items()}, res.tasks, plan.granularity


def _weights(g: np.ndarray, balance: bool) -> np.ndarray:
    """Each sample's weight in the solve's objective: 1 (Eq. 14) or 1 / ((1/T) Σ_t ||Δf_t||²) (Eq. 33-34)."""
    if not balance:
        return np.ones(len(g))
    d = np.einsum("nii->n", g) / g.shape[1]
    return np.where(d > 0, 1.0 / np.where(d > 0, d, 1.0), 0.0)


def module_diagnostics(g: np.ndarray, tasks: np.ndarray, T: int, coeffs: dict[str, np.ndarray],
                       balance: bool) -> dict[str, Any]:
    """One module's entry from its extended Grams g (N, T+P, T+P), P = len(coeffs) merge points in order."""
    g = np.asarray(g, dtype=np.float64)
    ft = g[:, :T, :T]
    w = _weights(ft, balance)
    cos, ratio = np.zeros((T, T)), np.zeros((T, T))
    zero = np.zeros(T)
    for t in range(T):  # task t's inputs: cos(Δf_j, Δf_t) over the task's samples, features concatenated
        s = ft[tasks == t].sum(axis=0)
        for j in range(T):
            den = np.sqrt(s[j, j] * s[t, t])
            cos[t, j] = s[j, t] / den if den > 0 else 0.0
            ratio[t, j] = np.sqrt(s[j, j] / s[t, t]) if s[t, t] > 0 else 0.0
        zero[t] = _task_mean(w * ft[:, t, t], tasks, t)
    eq10, eq11 = {}, {}
    for p, (name, c) in enumerate(coeffs.items()):
        m = T + p
        e10, e11 = np.zeros(T), np.zeros(T)
        for t in range(T):
            lin = np.einsum("j,njk,k->n", c, ft, c) - 2 * ft[:, :, t] @ c + ft[:, t, t]  # ||Σ c_j Δf_j − Δf_t||²
            true = g[:, m, m] - 2 * g[:, m, t] + g[:, t, t]  # ||f(merged) − f(θ_t)||²
            e11[t], e10[t] = _task_mean(w * lin, tasks, t), _task_mean(w * true, tasks, t)
        eq10[name], eq11[name] = e10, e11
    first = next(iter(coeffs.values()))
    off = ~np.eye(T, dtype=bool)
    return {"alpha": [float(a) for a in first], "sum_alpha": float(np.sum(first)),
            "cosine": cos.tolist(), "mean_cross_cosine": float(cos[off].mean()) if T > 1 else 1.0,
            "norm_ratio": ratio.tolist(), "zero": float(zero.sum()), "zero_per_task": zero.tolist(),
            "eq10": {k: float(v.sum()) for k, v in eq10.items()}, "eq11": {k: float(v.sum()) for k, v in eq11.items()},
            "eq10_per_task": {k: v.tolist() for k, v in eq10.items()},
            "eq11_per_task": {k: v.tolist() for k, v in eq11.items()}}


def _task_mean(v: np.ndarray, tasks: np.ndarray, t: int) -> float:
    sel = tasks == t
    return float(v[sel].mean()) if sel.any() else 0.0


def diagnostics(grams: dict[str, np.ndarray], tasks: np.ndarray, points: dict[str, dict[str, np.ndarray]],
                balance: bool, models: list[str], granularity: str) -> dict[str, Any]:
    """The diagnostics.json document (schema in the README of docs / the module docstring)."""
    T = len(models)
    modules = {name: module_diagnostics(g, tasks, T, {p: c[name] for p, c in points.items()}, balance)
               for name, g in grams.items()}
    totals = {p: {"eq10": sum(m["eq10"][p] for m in modules.values()),
                  "eq11": sum(m["eq11"][p] for m in modules.values()),
                  "eq10_per_task": np.sum([m["eq10_per_task"][p] for m in modules.values()], axis=0).tolist()}
              for p in points}
    return {"schema": SCHEMA, "granularity": granularity, "balance": balance, "models": models,
            "samples_per_task": [int((tasks == t).sum()) for t in range(T)],
            "normalisation": ("Σ_t mean over task t's samples of the per-sample squared error"
                              + (", each divided by (1/T) Σ_t ||Δf_t(x)||² (Eq. 33-34)" if balance else " (Eq. 14)")),
            "points": {p: _describe(p) for p in points}, "modules": modules,
            "summary": {"totals": totals, "zero": sum(m["zero"] for m in modules.values()),
                        "mean_sum_alpha": float(np.mean([m["sum_alpha"] for m in modules.values()])),
                        # per task (issue #28): its mean α over modules, and its ||Δf_t||² on its own samples
                        "mean_alpha_per_task": np.mean([m["alpha"] for m in modules.values()], axis=0).tolist(),
                        "zero_per_task": np.sum([m["zero_per_task"] for m in modules.values()], axis=0).tolist(),
                        "mean_cross_cosine": float(np.mean([m["mean_cross_cosine"] for m in modules.values()]))}}


def _describe(point: str) -> dict[str, Any]:
    if point.startswith("slta x["):
        return {"method": "slta", "task_scales": [float(x) for x in point[len("slta x["):-1].split(",")]}
    if point.startswith("task_arithmetic "):
        return {"method": "task_arithmetic", "lambda": float(point.split()[1])}
    if point.startswith("slta x"):
        return {"method": "slta", "alpha_scale": float(point[len("slta x"):])}
    return {"method": "slta", "alpha_scale": 1.0}


def diagnose(merged: str | Path, lambdas: list[float] = (), alpha_scales: list[float] = (), device: str = "cpu",
             progress: bool = True, task_scales: list[list[float]] = ()) -> dict[str, Any]:
    """The diagnostics document of a closed-form merge whose folder (or statistics file) holds
    slta_stats.safetensors. α is re-solved from the saved Grams exactly as the merge solved it (same
    function, same statistics); the pass's T x T Grams are checked against the saved ones."""
    from slta.io.output import changed_inputs
    from slta.merges.stats import read_stats

    started = time.perf_counter()
    saved, tasks, meta = read_stats(merged)
    cfg = dict(meta["config"])
    changed = changed_inputs(meta.get("inputs") or {}, [meta["base_model"], *meta["models"], *meta["data"]])
    if changed:
        raise MergeError(f"{merged}: {changed[0]} changed since the merge; its α no longer describes these inputs")
    balance = bool(load_merge_config(cfg).param("balance"))  # as the merge solved (its default included)
    alphas = {k: solve_module(g, tasks, balance).alpha for k, g in saved.items()}
    T = len(meta["models"])
    if any(len(c) != T for c in task_scales):
        raise MergeError(f"{merged}: a per-task scale needs {T} factors (one per model), got {list(task_scales)}")
    points = merge_points(alphas, list(lambdas), list(alpha_scales), list(task_scales))
    grams, got_tasks, granularity = measure(cfg, points, device, progress)
    for name, g in saved.items():  # the pass must see the merge's samples and features
        if not np.allclose(grams[name][:, :T, :T], g, rtol=1e-4, atol=1e-8 * max(1.0, float(np.abs(g).max()))):
            raise MergeError(f"{merged}: module {name}'s features differ from the saved statistics")
    doc = diagnostics(grams, got_tasks, points, balance, meta["models"], granularity)
    doc["timings"] = {"total": time.perf_counter() - started}
    return doc


def run_diagnose(merged: str | Path, out: str | Path, lambdas: list[float] = (), alpha_scales: list[float] = (),
                 device: str = "cpu", progress: bool = True, task_scales: list[list[float]] = ()) -> dict[str, Any]:
    """`slta diagnose MERGED -o DIR`: writes DIR/diagnostics.json (see `diagnose`) and DIR/diagnostics.png."""
    doc = diagnose(merged, lambdas, alpha_scales, device, progress, task_scales)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "diagnostics.json").write_text(json.dumps(doc, indent=2) + "\n")
    draw(doc, out / "diagnostics.png")
    return doc


# -- the figure ------------------------------------------------------------------------------------

def draw(doc: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """Per module: Σα (slta, against T λ), the mean cross-task cosine, and Eq. 10 / Eq. 11 at each merge
    point divided by the objective at c = 0 (log scale: below 1 the merge beats the base module)."""
    from matplotlib.figure import Figure

    names = list(doc["modules"])
    mods = [doc["modules"][n] for n in names]
    x = np.arange(len(names))
    T = len(doc["models"])
    fig = Figure(figsize=(max(8, 0.28 * len(names) + 3), 9), layout="constrained")
    ax1, ax2, ax3 = fig.subplots(3, 1, sharex=True)
    ax1.bar(x, [m["sum_alpha"] for m in mods], color="#55a868", label="slta Σα")
    for p, d in doc["points"].items():
        if d["method"] == "task_arithmetic":
            ax1.axhline(T * d["lambda"], color="#c44e52", ls="--", label=f"task arithmetic T·λ ({p})")
    ax1.axhline(T, color="grey", lw=0.8, ls=":", label="T (every α = 1)")
    ax1.set_ylabel("Σ_t α_t")
    ax1.legend(fontsize=7)
    ax2.plot(x, [m["mean_cross_cosine"] for m in mods], "o-", ms=3, color="#4c72b0", label="mean over t≠j")
    ax2.plot(x, [np.min(np.array(m["cosine"])[~np.eye(T, dtype=bool)]) if T > 1 else 1 for m in mods],
             "v:", ms=3, color="#8172b3", label="min over t≠j")
    ax2.axhline(0, color="grey", lw=0.8)
    ax2.set_ylabel("cos(Δf_j, Δf_t) on task t")
    ax2.legend(fontsize=7)
    styles = ["-", "--", "-.", ":"]
    for k, p in enumerate(doc["points"]):
        rel10 = [m["eq10"][p] / m["zero"] if m["zero"] > 0 else np.nan for m in mods]
        rel11 = [m["eq11"][p] / m["zero"] if m["zero"] > 0 else np.nan for m in mods]
        ax3.plot(x, rel10, styles[k % 4], marker="o", ms=3, color="#c44e52", label=f"Eq. 10 (true), {p}")
        ax3.plot(x, rel11, styles[k % 4], marker="x", ms=3, color="#4c72b0", label=f"Eq. 11 (linear), {p}")
    ax3.axhline(1, color="grey", lw=0.8, ls=":")
    ax3.set_yscale("log")
    ax3.set_ylabel("objective / objective at c=0")
    ax3.legend(fontsize=6, ncol=2, loc="best")
    ax3.set_xticks(x, names, rotation=90, fontsize=6)
    fig.suptitle(title or f"slta diagnostics ({doc['granularity']})")
    fig.savefig(path, dpi=110)
    return Path(path)


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("diagnose", help="per-module diagnostics of a closed-form merge: Σα, fine-tune "
                       "interference (cosines), Eq. 10 vs Eq. 11 at slta's α and task arithmetic's λ")
    p.add_argument("merged", help="the merged folder holding slta_stats.safetensors (or the file)")
    p.add_argument("-o", "--output", required=True, help="report folder: diagnostics.json, diagnostics.png")
    p.add_argument("--lambda", dest="lambdas", type=float, action="append", default=[],
                   help="also diagnose task arithmetic at this λ (repeatable), e.g. its validated λ")
    p.add_argument("--alpha-scale", dest="scales", type=float, action="append", default=[],
                   help="also diagnose slta's α multiplied by this factor (repeatable)")
    p.add_argument("--task-scale", dest="task_scales", action="append", default=[],
                   type=lambda s: [float(x) for x in s.split(",")], metavar="C1,...,CT",
                   help="also diagnose each task's α times its own factor (repeatable), e.g. 1,1,1.6")
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto (default: cpu)")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=_cli)


def _cli(a: argparse.Namespace) -> None:
    doc = run_diagnose(a.merged, a.output, a.lambdas, a.scales, a.device, not a.quiet, a.task_scales)
    for p, v in doc["summary"]["totals"].items():
        print(f"{p:>24}: Eq. 10 {v['eq10']:.4g}  Eq. 11 {v['eq11']:.4g}  (objective at 0: {doc['summary']['zero']:.4g})")
    print(f"diagnostics written to {a.output}")


__all__ = ["MergedView", "diagnose", "diagnostics", "draw", "measure", "merge_points", "module_diagnostics", "run_diagnose"]
