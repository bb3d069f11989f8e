"""`slta demo`: the paper's section 4 on the demo zoo.

Builds (or reuses) the zoo, evaluates the base and the fine-tunes, then for every pair of tasks
and the triple merges with weight averaging and every baseline (hyper-parameters grid-searched on
the validation split, as the paper's A.3.4 does) and with slta at model, layer, attn_mlp and
head_mlp level over 3 calibration seeds. slta measures the Gram statistics once per seed and
level on the triple and re-solves every pair from them (`slta solve`), with no extra forward pass.
Prints the paper's Table 1/3 layout and writes a report folder (markdown, JSON, figures).

Every evaluation is cached under OUT/cache by a hash of what produced it, so a rerun reuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from slta.demo.grids import baseline_grids
from slta.demo.report import write_report
from slta.demo.table import (
    COMBOS,
    METHOD_NAMES,
    TASKS,
    baseline_summary,
    level_name,
    multi_zoo_rows,
    results_table,
    summary_line,
    table_rows,
    write_summary,
)
from slta.demo.variants import variant_levels
from slta.demo.zoos import KINDS, SYNTHETIC, build_zoos, generation_budget, in_processes, job_count, kind_size
from slta.engine.tokens import TOKENS_READING

LEVELS = ("model", "layer", "attn_mlp", "head_mlp")
DATA_METHODS = ("slta", "regmean", "regmean_plusplus")  # merges that read calibration data
__all__ = ["COMBOS", "LEVELS", "METHOD_NAMES", "TASKS", "baseline_grids", "run_demo", "table_rows"]


class Demo:
    def __init__(self, zoo: Path, out: Path, size: str, device: str, seeds: int, progress: bool,
                 methods: set[str] | None = None, triple_only: bool = False, variants: bool = False,
                 levels: tuple[str, ...] = LEVELS):
        self.zoo, self.out, self.size, self.device, self.progress = zoo, out, size, device, progress
        self.levels = levels  # slta's granularities (the paper's four by default)
        self.strength_levels = variant_levels(levels)  # where --strength runs (--strength-levels)
        self.variants = variants
        # RegMean++ runs with --variants, or when --methods names it (never silently skipped)
        self.extra_baselines = variants or (methods is not None and "regmean_plusplus" in methods)
        # the triple only: what a zoo's calibration targets are about, at a quarter of the evaluations
        self.combos = COMBOS[-1:] if triple_only else COMBOS
        self.methods = methods  # None: every baseline and slta
        self.seeds = list(range(seeds))
        self.cache = out / "cache"
        self.work = out / "work"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.val_limit = None if size == "tiny" else 100
        meta = json.loads((zoo / "zoo.json").read_text())
        self.zoo_hash, self.kind = meta["recipe_hash"], meta["recipe"].get("kind", "hard")
        self.budget = generation_budget(zoo)
        self.ta_lambda: float | None = None  # task arithmetic's validated λ on the triple: the diagnostics' λ
        self.diagnostics: dict[str, Any] = {}  # level -> slta.analysis.diagnostics document (slta.demo.studies)
        self.generation = {"seconds": 0.0, "prompts": 0}  # where a run's time goes: evaluations not cached
        self.diagnose = True  # `slta diagnose` the layer and attn_mlp merges (slta.demo.studies); --no-diagnostics

    # -- helpers ---------------------------------------------------------------------------------
    def files(self, tasks: tuple[str, ...], split: str) -> dict[str, Path]:
        return {t: self.zoo / "data" / t / f"{split}.jsonl" for t in tasks}

    def key(self, what: dict[str, Any]) -> str:
        params = what.get("config", {}).get("parameters", {})
        if params.get("tokens", "all") != "all" or str(params.get("scale", "")).startswith("auto"):
            # a result that reads response positions changes when their reading does (TOKENS_READING)
            what = {**what, "response_reading": TOKENS_READING}
        if params.get("scale") == "auto_joint":  # and auto_joint's, when its rule does
            from slta.merges.autoscale import JOINT_RULE

            what = {**what, "joint_rule": JOINT_RULE}
        blob = json.dumps({**what, "zoo": self.zoo_hash}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def evaluate(self, model: Path, tasks: tuple[str, ...], split: str, key: str) -> dict[str, float]:
        from slta.evaluate import evaluate

        path = self.cache / f"eval-{key}-{split}.json"
        if path.exists():
            return json.loads(path.read_text())
        limit = self.val_limit if split == "val" else None
        t = time.perf_counter()
        files = self.files(tasks, split)
        scores = evaluate(model, files, batch_size=64, max_new_tokens=self.budget,
                          device=self.device, limit=limit, progress=False)
        self.generation["seconds"] += time.perf_counter() - t  # loading the model included
        self.generation["prompts"] += sum(min(limit or 10**9, sum(1 for line in f.open() if line.strip()))
                                          for f in files.values())
        tmp = path.with_suffix(f".tmp{os.getpid()}")  # a killed run, or a second process, never leaves half a file
        tmp.write_text(json.dumps(scores))
        tmp.replace(path)
        return scores

    def merge_config(self, method: str, tasks: tuple[str, ...], params: dict[str, Any]) -> dict[str, Any]:
        return {"merge_method": method, "base_model": str(self.zoo / "base"),
                "models": [{"model": str(self.zoo / t), "data": str(self.zoo / "data" / t / "calib.jsonl")}
                           if method in DATA_METHODS else {"model": str(self.zoo / t)} for t in tasks],
                "parameters": params, "dtype": "float32"}

    def merged_scores(self, cfg: dict[str, Any], tasks: tuple[str, ...], split: str,
                      tag: dict[str, Any] | None = None) -> dict[str, float]:
        from slta.merge import run_merge

        key = self.key({"config": cfg, "limit": self.val_limit if split == "val" else None, **(tag or {})})
        path = self.cache / f"eval-{key}-{split}.json"
        if path.exists():
            return json.loads(path.read_text())
        folder = self.work / key
        run_merge(cfg, folder, overwrite=True, device=self.device, progress=False)
        try:
            return self.evaluate(folder, tasks, split, key)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- the steps --------------------------------------------------------------------------------
    def reference_rows(self) -> dict[str, dict[str, float]]:
        """Base and every fine-tune on every task's test split."""
        return {name: self.reference(name) for name in ("base", *TASKS)}

    def reference(self, name: str) -> dict[str, float]:
        """The base or one fine-tune (`name`) on every task's test split."""
        return self.evaluate(self.zoo / name, TASKS, "test", self.key({"model": name}))

    def grids(self) -> dict[str, list[dict[str, Any]]]:
        """The baselines this demo runs (--methods picks among them), each with its grid."""
        return {m: g for m, g in baseline_grids(self.size, self.extra_baselines).items()
                if self.methods is None or m in self.methods}

    def baselines(self, bar) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        for method, grid in self.grids().items():
            for combo in self.combos:
                results.setdefault(method, {})["+".join(combo)] = self.tuned(method, combo, grid, bar)
        return results

    def method_config(self, method: str, tasks: tuple[str, ...], params: dict[str, Any]) -> dict[str, Any]:
        """A grid point's merge config (the data-driven methods read 30 calibration samples per task)."""
        return self.merge_config(method, tasks, {**params, "num_samples": 30} if method in DATA_METHODS else params)

    def chosen(self, method: str, combo: tuple[str, ...], grid: list[dict[str, Any]], bar=None,
               tag: dict[str, Any] | None = None) -> tuple[dict[str, Any], float | None]:
        """(the grid point with the best mean validation accuracy (the first of ties), that accuracy)."""
        best, best_params = -1.0, None
        for params in grid:
            if bar is not None:
                bar.set_postfix_str(f"{method} {'+'.join(combo)} {params}")
                bar.update()
            if len(grid) == 1:  # nothing to choose: no validation run
                return params, None
            val = np.mean(list(self.merged_scores(self.method_config(method, combo, params), combo, "val", tag).values()))
            if val > best:
                best, best_params = val, params
        return best_params, best

    def tuned(self, method: str, combo: tuple[str, ...], grid: list[dict[str, Any]], bar=None,
              tag: dict[str, Any] | None = None) -> dict[str, Any]:
        """Grid search on the validation split (A.3.4), then the test split at the chosen point."""
        params, val = self.chosen(method, combo, grid, bar, tag)
        return {"params": params, "val_avg": val,
                "test": self.merged_scores(self.method_config(method, combo, params), combo, "test", tag)}

    def slta(self, bar) -> dict[str, dict[str, Any]]:
        """Per level and seed: one forward pass on the triple, every pair re-solved from its statistics."""
        results: dict[str, dict[str, Any]] = {}
        if self.methods is not None and "slta" not in self.methods:
            return results
        for level in self.levels:
            for seed in self.seeds:
                bar.set_postfix_str(f"slta {level} seed {seed}")
                for combo, scores in self.slta_one(level, seed).items():
                    results.setdefault(level, {}).setdefault(combo, []).append({"seed": seed, "test": scores})
                bar.update()
        return results

    def slta_one(self, level: str, seed: int) -> dict[str, dict[str, float]]:
        """One level and calibration seed: {combo: test scores}, every pair re-solved from the triple's statistics."""
        from slta.demo.studies import diagnose_cached, diagnostics_path
        from slta.merge import run_merge, run_solve

        triple = COMBOS[-1]
        cfg = self.merge_config("slta", triple, {"granularity": level, "num_samples": 30, "seed": seed})
        key = self.key({"config": cfg})
        folder = self.work / f"slta-{key}"
        keep = self.out / "report" / "slta_attn_mlp_triple_seed0" if (level, seed) == ("attn_mlp", 0) else None
        kept = self.cache / f"report-{key}"  # the merge's report and card, for a new OUT sharing this cache
        diag = diagnostics_path(self, level, seed, cfg)
        cached = all((self.cache / f"eval-{self.key({'config': cfg, 'combo': c})}-test.json").exists()
                     for c in self.combos) and (keep is None or keep.exists() or kept.exists()) and \
            (diag is None or diag.exists())
        if not cached:
            run_merge(cfg, folder, overwrite=True, device=self.device, progress=False)
            if seed == 0:  # the statistics, for re-solving without a forward pass (slta.demo.strength)
                stats = self.cache / f"stats-{key}.safetensors"
                shutil.copy2(folder / "slta_stats.safetensors", stats.with_suffix(".tmp"))
                stats.with_suffix(".tmp").replace(stats)
            if keep is not None:
                kept.mkdir(exist_ok=True)
                for f in ("slta_report.json", "README.md"):
                    shutil.copy2(folder / f, kept / f)
        if diag is not None:
            self.diagnostics[level] = diagnose_cached(self, folder, diag)
        scores: dict[str, dict[str, float]] = {}
        for combo in self.combos:
            ck = self.key({"config": cfg, "combo": combo})
            path = self.cache / f"eval-{ck}-test.json"
            if path.exists():
                scores["+".join(combo)] = json.loads(path.read_text())
            elif combo == triple:
                scores["+".join(combo)] = self.evaluate(folder, combo, "test", ck)
            else:
                sub = folder.with_name(folder.name + "-" + "+".join(combo))
                run_solve(folder / "slta_stats.safetensors", sub, models=[triple.index(t) for t in combo],
                          overwrite=True, progress=False)
                scores["+".join(combo)] = self.evaluate(sub, combo, "test", ck)
                shutil.rmtree(sub, ignore_errors=True)
        if keep is not None and not keep.exists() and kept.exists():
            keep.parent.mkdir(parents=True, exist_ok=True)
            shutil.copytree(kept, keep)
        shutil.rmtree(folder, ignore_errors=True)
        return scores

def run_demo(zoo: str | Path | None = None, out: str | Path | None = None, size: str = "default",
             device: str = "cpu", seeds: int = 3, progress: bool = True, threads: int = 1,
             zoo_seeds: list[int] | tuple[int, ...] = (0,), zoo_kind: str = "both",
             methods: list[str] | None = None, zoo_overrides: dict[str, Any] | None = None,
             triple_only: bool = False, jobs: int | None = None, ablations: bool = False,
             variants: bool = False, base_gguf: str | Path | None = None,
             strength: bool | tuple[str, ...] = False, levels: list[str] | tuple[str, ...] | None = None,
             diagnostics: bool = True, strength_levels: list[str] | tuple[str, ...] | None = None) -> dict[str, Any]:
    """Run the demo on every zoo kind and zoo seed; returns the study and writes OUT/report.

    ``zoo`` is the folder holding the zoos (``hard-seed0/``, ``chat-seed0/``, ...; default
    zoo/SIZE; the chat kind of a default-size demo is built at `small`, in ``chat-small-seedN/``,
    see slta.demo.zoos). The zoos are built first, then merged and evaluated, ``jobs`` at a time (default:
    one per core); with fewer zoos than processes, each zoo's independent merges and evaluations first run
    on the spare ones (slta.demo.parallel; one thread each). Each zoo gets its own report in
    OUT/KIND-seedN/report; OUT/report holds a table per kind with every method as mean ± std across zoo seeds. ``methods`` restricts the merge
    methods (baseline names and/or ``slta``), e.g. to calibrate a zoo on baselines only.
    ``zoo_overrides`` changes zoo recipe keys (e.g. the chat kind's ``chat_lr``), for every kind
    that has them. ``levels``: slta's granularities (default the paper's four, LEVELS). ``diagnostics``:
    `slta diagnose` the layer and attn_mlp merges (slta.demo.studies). ``strength_levels``: where
    ``strength`` runs (default: layer and attn_mlp among ``levels``).

    ``threads`` sets torch's CPU threads. The default is 1: the zoo's models are so small that
    a second thread gains little, and on a 2-core machine that another process also uses, an
    evaluation measured 55 s with 2 threads against 2.7 s with 1 (threads wait on each other).
    """
    import torch
    from transformers.utils import logging as hf_logging

    from slta.demo.models import models_summary
    from slta.demo.parallel import study_jobs
    from slta.demo.strength import strength_options
    from slta.demo.studies import ablation_summary
    from slta.demo.variants import chosen_by_validation
    from slta.zoo.build import recipe_for

    kinds = SYNTHETIC if zoo_kind == "both" else (zoo_kind,)
    if any(k not in KINDS for k in kinds):
        raise ValueError(f"unknown zoo kind {zoo_kind!r}; known: {', '.join(KINDS)}, both")
    levels = tuple(levels or LEVELS)
    if not set(levels) <= set(LEVELS):
        raise ValueError(f"unknown levels: {', '.join(sorted(set(levels) - set(LEVELS)))}; known: {', '.join(LEVELS)}")
    strength_options(strength)  # an unknown option fails here, not after the zoos are built
    strength_levels = tuple(variant_levels(levels) if strength_levels is None else strength_levels)
    if not set(strength_levels) <= set(variant_levels(levels)):
        raise ValueError(f"--strength-levels must be among {', '.join(variant_levels(levels))} (layer and attn_mlp "
                         f"among --levels), got {', '.join(strength_levels)}")
    known = set(baseline_grids(size, True)) | {"slta"}
    if methods is not None and not set(methods) <= known:
        raise ValueError(f"unknown methods: {', '.join(sorted(set(methods) - known))}; known: {', '.join(sorted(known))}")
    hf_logging.disable_progress_bar()  # one "Loading weights" bar per evaluated model is noise here
    torch.set_num_threads(max(1, threads))
    started = time.perf_counter()
    root = Path(zoo or f"zoo/{size}")
    out = Path(out or f"demo_out/{size}")
    unknown = set(zoo_overrides or {}) - {k for kind in kinds for k in recipe_for(kind_size(kind, size), 0, kind=kind)["params"]}
    if unknown:
        raise ValueError(f"unknown zoo recipe keys: {', '.join(sorted(unknown))}")
    study: dict[str, Any] = {"size": size, "zoo_root": str(root), "zoo_seeds": list(zoo_seeds),
                             "zoo_overrides": zoo_overrides or {},
                             "methods": sorted(methods) if methods is not None else "all", "kinds": {},
                             "timings_s": {}}
    t = time.perf_counter()
    zoos = build_zoos(root, size, kinds, zoo_seeds, zoo_overrides, threads, progress, jobs, base_gguf)
    study["timings_s"]["zoos"] = time.perf_counter() - t
    # every zoo's merges and evaluations, `jobs` zoos at a time (each one process, `threads` threads)
    todo = [(kind, zs) for kind in kinds for zs in zoo_seeds]
    n_jobs = job_count(jobs, threads, len(todo))
    for kind, zs in todo:
        print(f"slta demo ({kind_size(kind, size)} {kind} zoo, seed {zs}): merging and evaluating {zoos[kind, zs][0]}", flush=True)
    done = dict(zip(todo, in_processes(_one_zoo, [(
        zoos[(k, zs)][0], out / f"{k}-seed{zs}", kind_size(k, size), device, seeds, progress and n_jobs == 1,
        set(methods) if methods is not None else None, triple_only, ablations, variants, strength, levels, diagnostics,
        study_jobs(jobs, threads, n_jobs), strength_levels, threads)
        for k, zs in todo],
        n_jobs)))
    for kind in kinds:
        per_zoo = []
        for zs in zoo_seeds:
            res = done[(kind, zs)]
            res.update(kind=kind, zoo_seed=zs, report=str(out / f"{kind}-seed{zs}" / "report"))
            res["timings_s"]["zoo"] = zoos[(kind, zs)][1]
            per_zoo.append(res)
        rows = multi_zoo_rows(per_zoo)
        study["kinds"][kind] = {"table": rows, "summary": baseline_summary(per_zoo), "ablations": ablation_summary(per_zoo),
                                "models": models_summary(per_zoo),
                                "zoos": [{"zoo_seed": r["zoo_seed"], "zoo": r["zoo"], "report": r["report"],
                                          "zoo_recipe_hash": r["zoo_recipe_hash"]} for r in per_zoo]}
        print(f"\n== {kind} kind, zoo seeds {', '.join(map(str, zoo_seeds))} ==")
        print(results_table(rows, len(per_zoo))["text"])
        print(f"baselines in brief: {summary_line(study['kinds'][kind]['summary'])}")
        print("time per zoo (merging and evaluating what was not cached): " + "; ".join(
            f"seed {r['zoo_seed']}: {r['timings_s']['total']:.0f} s, of which generation {r['timings_s']['generation']:.0f} s "
            + (f"summed over {r['timings_s']['processes']} processes " if r["timings_s"].get("processes", 1) > 1 else "")
            + f"({r['timings_s']['prompts_generated']} prompts)" for r in per_zoo))
        if variants:
            study["kinds"][kind]["chosen_on_validation"] = chosen = [chosen_by_validation(r) for r in per_zoo]
            print("slta chosen on the validation split (triple, calibration seed 0), per zoo: " + "; ".join(
                f"{level_name(c['row'])}: val {c['val']:.1f}, test {c['test']:.1f}" for c in chosen if c))
            study["kinds"][kind]["chosen_with_scale"] = with_scale = [chosen_by_validation(r, searched=True)
                                                                      for r in per_zoo]
            print("... with the scale search (a one-parameter search) competing: " + "; ".join(
                f"{level_name(c['row'])}: val {c['val']:.1f}, test {c['test']:.1f}" for c in with_scale if c))
    study["timings_s"]["total"] = time.perf_counter() - started
    write_summary(study, out / "report")
    print(f"\nreport written to {out / 'report'} ({study['timings_s']['total']:.0f}s)")
    return study


def _one_zoo(*args: Any) -> dict[str, Any]:
    """`demo_one_zoo` in a worker process: torch's threads and transformers' bars set there too."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(max(1, args[-1]))
    return demo_one_zoo(*args[:-1])


def demo_one_zoo(zoo: Path, out: Path, size: str, device: str, seeds: int, progress: bool,
                 methods: set[str] | None, triple_only: bool = False, ablations: bool = False,
                 variants: bool = False, strength: bool | tuple[str, ...] = False, levels: tuple[str, ...] = LEVELS,
                 diagnostics: bool = True, jobs: int = 1,
                 strength_levels: tuple[str, ...] | None = None) -> dict[str, Any]:
    """Evaluate, merge every way, and write the one-zoo report in OUT/report; returns its results.
    `ablations`: also the calibration-sample-count study (slta.demo.studies, paper Table 11) and, on a
    chat zoo, the number of models merged (slta.demo.models, paper Table 10).
    `variants`: also slta's options beyond the paper and RegMean++ (slta.demo.variants).
    `strength`: also a factor per task on slta's α and task arithmetic's λ (slta.demo.strength): True for
    every option there, or a tuple of its OPTIONS, at `strength_levels` (default: layer and attn_mlp among `levels`).
    `jobs` > 1: the independent merges and evaluations first run in that many processes (slta.demo.parallel)."""
    from torch import get_num_threads

    from slta.demo.models import model_ablation
    from slta.demo.parallel import warm_up
    from slta.demo.strength import n_strength_steps, run_strength, strength_options
    from slta.demo.studies import sample_ablation, validated_lambda
    from slta.demo.variants import n_variant_steps, run_variants

    started = time.perf_counter()
    demo = Demo(zoo, out, size, device, seeds, progress, methods, triple_only, variants, levels)
    demo.diagnose = diagnostics
    if strength_levels is not None:
        demo.strength_levels = tuple(strength_levels)
    grids = demo.grids()
    n_slta = len(demo.levels) * len(demo.seeds) if methods is None or "slta" in methods else 0
    n_slta += n_variant_steps(len(demo.combos), demo.levels) if variants and (methods is None or "slta" in methods) else 0
    steps = len(TASKS) + 1 + sum(len(g) * len(demo.combos) for g in grids.values()) + n_slta
    strength = strength_options(strength)
    steps += n_strength_steps(len(demo.combos), demo.strength_levels, strength) if strength else 0
    warm = time.perf_counter()
    if jobs > 1:
        warm_up(demo, (zoo, out, size, device, seeds, False, methods, triple_only, variants, levels), strength, jobs,
                progress)
    warm = time.perf_counter() - warm
    with tqdm(total=steps, desc=f"slta demo {zoo.name}", disable=not progress) as bar:
        bar.set_postfix_str("base and fine-tunes")
        refs = demo.reference_rows()
        bar.update(len(TASKS) + 1)
        base = demo.baselines(bar)
        demo.ta_lambda = validated_lambda(base)
        ours = demo.slta(bar)
        if variants and (methods is None or "slta" in methods):
            ours.update(run_variants(demo, bar))
        if strength:
            per_task, ta = run_strength(demo, bar, strength)
            ours.update(per_task)
            base.update(ta)
        bar.set_postfix_str("ablations" if ablations else "")
        studies = {"samples": sample_ablation(demo)} if ablations and (methods is None or "slta" in methods) else {}
        if studies and demo.kind == "chat":
            studies["models"] = model_ablation(demo, baseline_grids(size), get_num_threads())
    results = {"size": size, "zoo": str(zoo), "zoo_recipe_hash": demo.zoo_hash, "reference": refs,
               "baselines": base, "slta": ours, "seeds": demo.seeds,
               "timings_s": {"total": time.perf_counter() - started, "generation": demo.generation["seconds"],
                             "prompts_generated": demo.generation["prompts"], "processes": jobs,
                             "warm_up": warm},
               **({"diagnostics": demo.diagnostics} if demo.diagnostics else {}), **({"ablations": studies} if studies else {})}
    write_report(results, out / "report")
    return results
