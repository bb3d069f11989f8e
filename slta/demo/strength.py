"""`slta demo --strength`: how much of each task a merge keeps (issue #28), as extra rows.

The closed form gives each module's α from feature differences; it does not see which task's answers
break when its vector shrinks, and on a real model the tasks need different strengths (a language the
base never saw needs its whole vector while math degrades as λ grows). These rows give each task its own
factor on top of a method's weights:

- `LEVEL|per-task×scale` (slta): each task's α times its own factor, chosen on the validation split by
  one coordinate sweep (below) from the best global scale in SCALES; every candidate is the triple's
  statistics re-solved (`slta solve`, no forward pass). Calibration seed 0, like the variants.
- `task_arithmetic_per_task` (the baseline it must beat): per-model weights λ_t, the same sweep from
  task arithmetic's validated λ.
- `LEVEL|auto_task`: training-free, from the calibration responses' loss (slta.merges.autoscale).
- `LEVEL|auto_joint`: auto_task's factors checked together and raised where a task lost its answers.

The sweep: start from the method's validated global strength g (the same for every task); for each task
in turn, try g·r for r in RELATIVE with the other tasks' factors where the sweep left them, and keep
what raises the mean validation accuracy over the combination's tasks (ties keep the earlier). T·|RELATIVE|
validation runs, never a T-dimensional grid. Every candidate's per-task validation accuracy is recorded
("sweep"): each task's accuracy as its factor moves, and what it costs the others.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, Callable

import numpy as np

from slta.demo.table import COMBOS
from slta.demo.variants import SCALES, SEP

RELATIVE = (0.6, 0.8, 1.25, 1.5, 2.0)  # a task's factor relative to the global strength (1.0 is the start)
TA_PER_TASK = "task_arithmetic_per_task"
# `--strength OPTIONS`: which rows; the validation searches cost ~10x a closed-form merge on SmolLM2,
# auto_task ~4x (docs/methods.md), so a short demo can run the training-free row alone
OPTIONS = ("per_task", "auto_task", "ta_per_task", "auto_joint")
AUTO = ("auto_task", "auto_joint")  # the training-free options: one `scale:` merge each


def strength_options(strength: bool | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """`--strength`'s rows: () for none, every one of OPTIONS for True, else those named (checked)."""
    if strength is True:
        return OPTIONS
    options = tuple(strength or ())
    unknown = set(options) - set(OPTIONS)
    if unknown:
        raise ValueError(f"unknown --strength options: {', '.join(sorted(unknown))}; known: {', '.join(OPTIONS)}")
    return options


def n_strength_steps(n_combos: int, levels: tuple[str, ...], options: tuple[str, ...] = OPTIONS) -> int:
    """Progress-bar steps; `levels`: the levels strength runs at (Demo.strength_levels)."""
    per_level = sum(o in options for o in ("per_task", *AUTO))
    return (per_level * len(levels) + ("ta_per_task" in options)) * n_combos


def sweep(val_of: Callable[[list[float]], dict[str, float]], start: float, T: int) -> dict[str, Any]:
    """The coordinate sweep (module docstring): {"factors", "val_avg", "sweep": [{"factors", "val"}]}."""
    current = [start] * T
    history = [{"factors": current, "val": val_of(current)}]
    best = float(np.mean(list(history[0]["val"].values())))
    for t in range(T):
        chosen = current
        for r in RELATIVE:
            trial = [round(start * r, 6) if u == t else f for u, f in enumerate(current)]
            val = val_of(trial)
            history.append({"factors": trial, "val": val})
            mean = float(np.mean(list(val.values())))
            if mean > best:
                best, chosen = mean, trial
        current = chosen
    return {"factors": current, "val_avg": best, "sweep": history}


def triple_stats(demo, level: str) -> Path:
    """The triple's statistics at `level`, calibration seed 0 (kept in the cache by Demo.slta, or measured here)."""
    from slta.merge import run_merge

    cfg = demo.merge_config("slta", COMBOS[-1], {"granularity": level, "num_samples": 30, "seed": 0})
    path = demo.cache / f"stats-{demo.key({'config': cfg})}.safetensors"
    if not path.exists():
        folder = demo.work / f"stats-{level}"
        run_merge(cfg, folder, overwrite=True, device=demo.device, progress=False)
        shutil.copy2(folder / "slta_stats.safetensors", path.with_suffix(".tmp"))
        path.with_suffix(".tmp").rename(path)
        shutil.rmtree(folder, ignore_errors=True)
    return path


def solved_scores(demo, stats: Path, combo: tuple[str, ...], factors: list[float], split: str) -> dict[str, float]:
    """The triple's statistics re-solved for `combo` with each task's α times its factor, evaluated (cached)."""
    from slta.merge import run_solve

    key = demo.key({"strength": "slta", "stats": stats.name, "combo": combo, "scale": factors,
                    "limit": demo.val_limit if split == "val" else None})
    path = demo.cache / f"eval-{key}-{split}.json"
    if path.exists():
        return json.loads(path.read_text())
    folder = demo.work / key
    run_solve(stats, folder, models=[COMBOS[-1].index(t) for t in combo], overwrite=True, progress=False, scale=factors)
    try:
        return demo.evaluate(folder, combo, split, key)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def slta_per_task(demo, level: str, combo: tuple[str, ...]) -> dict[str, Any]:
    stats = triple_stats(demo, level)
    val_of = lambda f: solved_scores(demo, stats, combo, f, "val")  # noqa: E731
    glob = max(SCALES, key=lambda s: (float(np.mean(list(val_of([s] * len(combo)).values()))), -s))
    got = sweep(val_of, glob, len(combo))
    return {"seed": 0, "global_scale": glob, **got, "scale": got["factors"],
            "test": solved_scores(demo, stats, combo, got["factors"], "test")}


def ta_config(demo, combo: tuple[str, ...], weights: list[float]) -> dict[str, Any]:
    cfg = demo.merge_config("task_arithmetic", combo, {})
    cfg["models"] = [{**m, "parameters": {"weight": w}} for m, w in zip(cfg["models"], weights)]
    return cfg


def ta_per_task(demo, combo: tuple[str, ...]) -> dict[str, Any]:
    from slta.demo.grids import baseline_grids

    lam = demo.tuned("task_arithmetic", combo, baseline_grids(demo.size)["task_arithmetic"])["params"]["weight"]
    got = sweep(lambda w: demo.merged_scores(ta_config(demo, combo, w), combo, "val"), lam, len(combo))
    return {"params": {"weights": got["factors"], "global_lambda": lam}, **got,
            "test": demo.merged_scores(ta_config(demo, combo, got["factors"]), combo, "test")}


def auto_config(demo, level: str, combo: tuple[str, ...], mode: str) -> tuple[dict[str, Any], str]:
    """A training-free row's merge config (`scale: MODE`) and its cache key."""
    cfg = demo.merge_config("slta", combo, {"granularity": level, "num_samples": 30, "seed": 0, "scale": mode})
    return cfg, demo.key({"config": cfg})


def auto_task(demo, level: str, combo: tuple[str, ...], mode: str = "auto_task") -> dict[str, Any]:
    """A training-free row: one merge with `scale: MODE` (auto_task or auto_joint; its search is in the
    merge's report, kept in the cache as search-KEY.json with the merge's timings)."""
    from slta.merge import run_merge

    cfg, key = auto_config(demo, level, combo, mode)
    paths = {s: demo.cache / f"eval-{key}-{s}.json" for s in ("test", "val")}
    search_path = demo.cache / f"search-{key}.json"
    if not all(p.exists() for p in (*paths.values(), search_path)):
        folder = demo.work / key
        run_merge(cfg, folder, overwrite=True, device=demo.device, progress=False)
        try:
            report = json.loads((folder / "slta_report.json").read_text())
            search_path.write_text(json.dumps({**report["scale_search"], "timings": report["timings"]}))
            for s in paths:
                demo.evaluate(folder, combo, s, key)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    search = json.loads(search_path.read_text())
    search.pop("timings", None)  # the results are the same whichever process or run merged
    return {"seed": 0, "scale": search["chosen"], "scale_search": search,
            **{s: json.loads(p.read_text()) for s, p in paths.items()}}


def run_strength(demo, bar, options: tuple[str, ...] = OPTIONS) -> tuple[dict[str, Any], dict[str, Any]]:
    """(slta rows {"LEVEL|per-task×scale" | "LEVEL|auto_task" | "LEVEL|auto_joint": {combo: [run]}}, {TA_PER_TASK: {combo: run}}),
    for the `options` (OPTIONS) asked for."""
    options = strength_options(options)
    ours: dict[str, Any] = {}
    base: dict[str, Any] = {}
    for combo in demo.combos:
        name = "+".join(combo)
        for level in demo.strength_levels:
            if "per_task" in options:
                bar.set_postfix_str(f"slta {level} per-task scale {name}")
                ours.setdefault(f"{level}{SEP}per-task×scale", {})[name] = [slta_per_task(demo, level, combo)]
                bar.update()
            for mode in (m for m in AUTO if m in options):
                bar.set_postfix_str(f"slta {level} {mode} {name}")
                ours.setdefault(f"{level}{SEP}{mode}", {})[name] = [auto_task(demo, level, combo, mode)]
                bar.update()
        if "ta_per_task" in options:
            bar.set_postfix_str(f"task arithmetic per-task λ {name}")
            base.setdefault(TA_PER_TASK, {})[name] = ta_per_task(demo, combo)
            bar.update()
    return ours, base
