"""The statistics file and `slta solve`: measure once, solve many.

A closed-form merge saves every module's per-sample Grams (the sufficient statistics of Eq. 12-14)
with each sample's task in OUT/slta_stats.safetensors. `slta solve` re-solves α from them for any
subset of the models, plain (Eq. 12-14) or balanced (Eq. 33-34), and writes the merge: no forward
pass, only the T+1 checkpoints are read again.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

import slta
from slta.config import MergeConfig, load_config as load_merge_config
from slta.io.architecture import Plan, build_plan
from slta.io.checkpoint import ShardedWriter, parse_size
from slta.io.inputs import Inputs, MergeError, input_paths, open_inputs, output_bytes
from slta.io.output import atomic_output, changed_inputs, check_output, finish_folder, input_fingerprints
from slta.merges.closed_form import SltaResult
from slta.merges.write import write_alphas
from slta.solve import AUTO_SCALE, scale_factors, solve_module


def write_stats(path: Path, cfg: MergeConfig, ins: Inputs, plan: Plan, res: SltaResult) -> None:
    """Save the Grams (gram/MODULE: (samples, T, T) float64), each sample's task and, as metadata, the
    inputs, calibration parameters and drawn sample indices."""
    tensors = {f"gram/{k}": v.contiguous() for k, v in res.grams.items()}
    tensors["tasks"] = torch.from_numpy(res.tasks)
    meta = {
        "base_model": str(ins.base.folder.resolve()),
        "models": [str(ck.folder.resolve()) for ck in ins.tuned],
        "data": [str(cfg.path(m.data).resolve()) for m in cfg.models],
        "granularity": plan.granularity,
        "num_samples": cfg.param("num_samples"),
        "seed": cfg.param("seed"),
        "max_length": cfg.param("max_length"),
        "sample_indices": res.sample_indices,
        "config": cfg.model_dump(mode="json"),
        "slta_version": slta.__version__,
        "inputs": input_fingerprints(input_paths(cfg).values()),  # compared by `slta solve`
    }
    save_file(tensors, str(path), metadata={"slta": json.dumps(meta)})


def read_stats(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    """(Grams per module, each sample's task, metadata) from a statistics file or the folder holding one."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "slta_stats.safetensors"
    if not path.exists():
        raise MergeError(f"statistics file {path} does not exist (written by `slta merge` with merge_method: slta)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["slta"])
            grams = {k[len("gram/"):]: f.get_tensor(k).numpy() for k in f.keys() if k.startswith("gram/")}
            tasks = f.get_tensor("tasks").numpy()
    except (KeyError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: not an slta statistics file ({e})") from e
    return grams, tasks, meta


def check_solvable(meta: dict[str, Any], stats: str | Path) -> None:
    """The saved Grams determine α only for the paper's solve on its inputs. `tokens: response` changes
    which positions the Grams sum over: solvable. `inputs: merged` measured each layer on the inputs of a
    merge with its own α (another subset or balance changes them), and `refine` moves α off the Grams'
    closed form: both need a forward pass (`slta merge`)."""
    params = (meta.get("config") or {}).get("parameters") or {}
    needs = [f"{k}: {params[k]}" for k, paper in (("inputs", "base"), ("refine", 0), ("targets", "module"))
             if params.get(k, paper) != paper] + ([f"scale: {params['scale']}"]
                                                  if params.get("scale") in AUTO_SCALE else [])
    if needs:
        raise MergeError(f"statistics {stats}: measured with {' and '.join(needs)}, which needs a forward pass: "
                         f"`slta solve` cannot re-solve it from saved statistics; run `slta merge` instead")


def sample_subset(tasks: np.ndarray, num_samples: int, seed: int = 0) -> np.ndarray:
    """Rows of the statistics to keep: per task, `num_samples` of its saved samples drawn with
    random.Random(seed) (all of them when it has no more), in their saved order. The per-sample Grams
    make a re-solve on these rows equal to a merge measured on these samples alone (Table 11)."""
    rng = random.Random(seed)
    keep = []
    for t in sorted(set(tasks.tolist())):
        rows = np.flatnonzero(tasks == t).tolist()
        keep += rows if num_samples >= len(rows) else sorted(rng.sample(rows, num_samples))
    return np.array(sorted(keep), dtype=np.int64)


def run_solve(stats: str | Path, out: str | Path, models: list[int] | None = None, balance: bool | None = None,
              overwrite: bool = False, shard_size: str | int = "5GB", dtype: str | None = None,
              progress: bool = True, num_samples: int | None = None, sample_seed: int = 0,
              scale: float | list[float] | None = None) -> Path:
    """`slta solve STATS -o OUT`: re-solve α from saved Grams for any subset of the models, plain or
    balanced, and write the merge. No forward pass: only the T+1 checkpoints are read again.
    `num_samples` keeps that many saved samples per task (`sample_subset`, seeded by `sample_seed`).
    `scale` replaces the merge's `scale` (a number, or one factor per model of the subset, in its order)."""
    started = time.perf_counter()
    grams, tasks, meta = read_stats(stats)
    check_solvable(meta, stats)
    subset = None
    if num_samples is not None:
        subset = sample_subset(tasks, num_samples, sample_seed)
        grams, tasks = {k: g[subset] for k, g in grams.items()}, tasks[subset]
    stats_inputs = {f"statistics {stats}": stats, f"base_model {meta['base_model']}": meta["base_model"],
                    **{f"model {p}": p for p in meta["models"]}, **{f"data {p}": p for p in meta["data"]}}
    check_output(out, overwrite, stats_inputs)
    T = len(meta["models"])
    models = list(range(T)) if models is None else list(models)
    if not models or any(not 0 <= m < T for m in models) or len(set(models)) != len(models):
        raise MergeError(f"--models must be distinct indices in 0..{T - 1} (the statistics hold {T} models: "
                         + ", ".join(f"{i}={p}" for i, p in enumerate(meta["models"])) + ")")
    used = [meta["base_model"], *(meta["models"][m] for m in models), *(meta["data"][m] for m in models)]
    changed = changed_inputs(meta.get("inputs") or {}, used)
    if changed:
        raise MergeError(f"statistics {stats}: {changed[0]} changed since the statistics were measured"
                         + (f" (and {len(changed) - 1} more)" if len(changed) > 1 else "")
                         + "; solving would mix old statistics with new weights or data: run `slta merge` "
                         "again to measure them")
    raw = dict(meta["config"])
    raw["base_model"] = meta["base_model"]
    raw["models"] = [{**raw["models"][m], "model": meta["models"][m], "data": meta["data"][m]} for m in models]
    raw["parameters"] = dict(raw.get("parameters") or {})
    if scale is not None:
        raw["parameters"]["scale"] = scale
    elif isinstance(raw["parameters"].get("scale"), list):  # the merge's factors of the subset's models
        raw["parameters"]["scale"] = [raw["parameters"]["scale"][m] for m in models]
    if balance is not None:
        raw["parameters"]["balance"] = balance
    if dtype is not None:
        raw["dtype"], raw["out_dtype"] = dtype, None
    cfg = load_merge_config(raw)
    ins = open_inputs(cfg)
    plan = build_plan(ins.hf_config, ins.base.names(), meta["granularity"])
    bal = cfg.param("balance")
    factors = scale_factors(cfg.param("scale"))  # applied after the solve as in slta.merges.closed_form
    sols = {name: solve_module(g, tasks, bal, models=models).scaled(factors) for name, g in grams.items()}
    alphas = {k: s.alpha for k, s in sols.items()}
    with atomic_output(out, overwrite, inputs=stats_inputs, needed=output_bytes(ins, plan)) as tmp:
        writer = ShardedWriter(tmp, [(n, ins.base.shapes[n]) for n in plan.tensor_order], ins.out_dtype,
                               parse_size(shard_size))
        try:
            write_alphas(ins, plan, writer, alphas, progress, "slta solve: writing")
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        report = {"method": "slta", "granularity": plan.granularity, "balance": bal, "tokens": cfg.param("tokens"),
                  "scale": cfg.param("scale"), "num_samples": meta["num_samples"], "seed": meta["seed"], "solved_from": str(Path(stats)),
                  "models_subset": models,
                  **({"sample_subset": {"num_samples": num_samples, "seed": sample_seed, "rows": subset.tolist()}}
                     if subset is not None else {}),
                  "samples_per_task": [int((tasks == m).sum()) for m in models],
                  "modules": {k: s.to_json() for k, s in sols.items()},
                  "timings": {"total": time.perf_counter() - started}}
        finish_folder(tmp, ins, cfg, report)
    return Path(out)


