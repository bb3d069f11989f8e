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
inputs are the base model's (A.3.3), exactly as the merge computes them (slta.engine.features): a
module's versions all run on the same base input. The model level runs every version's own
forward, layer by layer, and compares the final hidden states (after the final norm).

Everything streams like the merge: one decoder layer's T+1 checkpoint versions are in memory at a
time and every interpolated or merged version of that layer is built on the fly, used on each
batch and dropped. The model level keeps one hidden-state stream per version (activations, not
weights); batches are grouped so those streams fit `stream_memory`, with one pass over the
checkpoints per group.

Layout: the formulas and accumulators are in slta.analysis.scores, the streaming passes (clients
of slta.engine.walk) in slta.analysis.stream; this module holds `analyze`, `run_analyze` and the CLI,
and re-exports the names the other two define.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

import slta
from slta.analysis.scores import (LEVELS, MERGE_GRIDS, STEPS, Acc, Combo, Feature, ModuleStats,  # noqa: F401
                                  Versions, accumulate, flat, ideal_distances, interpolate, level_of,
                                  make_versions, module_json, nonlinearity_score, normalised_distances,
                                  pairwise_distances, score_of_function, summarize, task_vectors)
from slta.analysis.stream import layer_module_features, model_pass, module_pass, stream_groups  # noqa: F401
from slta.config import ConfigError, MergeConfig, load_config
from slta.engine.calibration import calibration
from slta.engine.features import Runner
from slta.io.architecture import build_plan
from slta.io.checkpoint import dtype_name, parse_dtype, parse_size
from slta.io.inputs import input_paths, open_inputs, resolve_device

log = logging.getLogger("slta")

# Calibration parameters read from the config (with slta's defaults when the config is for another method).
CALIB_DEFAULTS = {"num_samples": 30, "seed": 0, "max_length": 2048, "batch_size": 8}


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
    from slta.analysis import figures
    from slta.io.output import atomic_output, check_output

    cfg = load_config(config)
    check_output(out, overwrite, input_paths(cfg))  # before the analysis: OUT must not hold an input
    modules = [module] if isinstance(module, str) else list(module or [])
    check_modules(cfg, modules, levels)  # before the analysis, not after it
    data = analyze(cfg, device=device, num_samples=num_samples, levels=levels, dtype=dtype, steps=steps,
                   merging=merging, stream_memory=stream_memory, progress=progress)
    missing = [m for m in modules if m not in data["modules"]]
    if missing:
        raise ConfigError(f"--module {missing[0]!r} was not analysed; analysed modules are e.g. "
                          f"{', '.join(list(data['modules'])[:6])}")
    out = Path(out)
    with atomic_output(out, overwrite, inputs=input_paths(cfg)) as tmp:
        (tmp / "linearity.json").write_text(json.dumps(data, indent=1) + "\n")
        figures.draw_analysis(data, tmp, modules or None)
    return out


def check_modules(cfg: MergeConfig, modules: list[str], levels: Sequence[str] | None) -> None:
    """`--module` names checked against the base's shape and the analysed levels before any work:
    model, layers.I, layers.I.attn, layers.I.mlp, layers.I.head.G."""
    if not modules:
        return
    from slta.io.architecture import load_config as load_hf_config

    base = cfg.model_path(cfg.base_model) if cfg.base_model else cfg.model_path(cfg.models[0].model)
    hf = load_hf_config(base, f"base_model {base}", trust_remote_code=cfg.trust_remote_code)
    L, G = hf.num_hidden_layers, getattr(hf, "num_key_value_heads", None) or hf.num_attention_heads
    valid = ["model"] + [f"layers.{i}{s}" for i in range(L) for s in ("", ".attn", ".mlp")] + \
            [f"layers.{i}.head.{g}" for i in range(L) for g in range(G)]
    wanted = set(levels or LEVELS)
    for m in modules:
        if m not in valid:
            raise ConfigError(f"--module {m!r} is not a module of {base} ({L} layers, {G} heads per layer: "
                              f"model, layers.0..layers.{L - 1}, layers.I.attn, layers.I.mlp, layers.I.head.0..{G - 1})")
        if level_of(m)[0] not in wanted:
            raise ConfigError(f"--module {m!r} is at level {level_of(m)[0]!r}, which --levels leaves out")


def add_cli(subparsers: Any) -> None:
    """Register `slta analyze` on the CLI's subparsers."""
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
