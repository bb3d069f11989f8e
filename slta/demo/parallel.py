"""One zoo's study on spare cores: its independent merges and evaluations in several processes.

The study (slta.demo.demo_one_zoo) runs in order and caches every evaluation by a hash of what produced
it. When one zoo has the machine to itself, a warm-up runs first: the study's independent units in
`jobs` spawned processes of one thread each, every unit writing the cache that the in-order pass then
reads. The units are the same calls with the same keys, so the results are the ones the in-order pass
computes alone; only the wall time changes. Two waves, because some units depend on others' results:

1. the base's and the fine-tunes' evaluations, every baseline grid point on the validation split, the
   baselines with nothing to choose, and the `auto_task` merges (`--strength auto_task`);
2. the chosen baselines on the test split, and slta's merges (their diagnostics need task arithmetic's
   validated λ from wave 1).

The validation sweeps of `--strength per_task` / `ta_per_task`, `--variants` and `--ablations` stay in
the in-order pass: each step there depends on the one before. Why processes and not threads: greedy
decoding of SmolLM2 measured 1.95x one process's throughput with two one-thread processes, 1.58x with
one two-thread process (README, "make demo").
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from typing import Any

from tqdm.auto import tqdm

from slta.demo.grids import baseline_grids
from slta.demo.table import COMBOS, TASKS

Unit = tuple  # ("ref", name) | ("val" | "test", method, combo, params) | ("slta", level, seed) | ("auto_task", level, combo)


def waves(demo: Any, strength: tuple[str, ...]) -> tuple[list[Unit], Any]:
    """(wave 1's units, a function of the demo giving wave 2's units once wave 1 is cached)."""
    grids = {m: g for m, g in baseline_grids(demo.size, demo.extra_baselines).items()
             if demo.methods is None or m in demo.methods}
    with_slta = demo.methods is None or "slta" in demo.methods
    first: list[Unit] = []
    if "auto_task" in strength and with_slta:  # the longest units first: the two processes finish together
        from slta.demo.variants import variant_levels
        first += [("auto_task", level, combo) for combo in demo.combos for level in variant_levels(demo.levels)]
    first += [("ref", name) for name in ("base", *TASKS)]
    for method, grid in grids.items():
        for combo in demo.combos:
            first += [("val", method, combo, p) for p in grid] if len(grid) > 1 else [("test", method, combo, grid[0])]

    def second(demo: Any, choose: bool = True) -> list[Unit]:
        """Wave 2; `choose=False`: the same units with their grid points left open (to size the progress bar)."""
        units: list[Unit] = [("slta", level, seed) for level in demo.levels for seed in demo.seeds] if with_slta else []
        for method, grid in grids.items():
            if len(grid) > 1:
                units += [("test", method, combo, demo.chosen(method, combo, grid)[0] if choose else None)
                          for combo in demo.combos]
        return units

    return first, second


def run_unit(make_demo: Any, demo_args: tuple, ta_lambda: float | None, diagnose: bool, unit: Unit) -> dict[str, float]:
    """One unit in a worker process (one thread), on `make_demo(*demo_args)` (slta.demo.Demo, passed in so
    that this module does not import the package above it); returns its generation time and prompt count."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    torch.set_num_threads(1)
    demo = make_demo(*demo_args)
    demo.ta_lambda, demo.diagnose = ta_lambda, diagnose
    kind, *rest = unit
    if kind == "ref":
        demo.reference(rest[0])
    elif kind in ("val", "test"):
        method, combo, params = rest
        demo.merged_scores(demo.method_config(method, combo, params), combo, kind)
    elif kind == "slta":
        demo.slta_one(*rest)
    elif kind == "auto_task":
        from slta.demo.strength import auto_task
        auto_task(demo, *rest)
    else:
        raise ValueError(f"unknown unit {unit!r}")
    return demo.generation


def cost(demo: Any, unit: Unit) -> float:
    """A unit's rough cost, in validation runs of a weight-only merge (about 0.9 min on SmolLM2: `make demo`'s
    log has an `auto_task` merge at 8.5 min, slta's at 3.4, a RegMean++ validation run at about 3), so that the
    bar's time left does not count unequal units as equal."""
    kind, *rest = unit
    if kind in ("val", "test"):
        reads_data = "data" in demo.merge_config(rest[0], rest[1], {})["models"][0]  # a merge with forward passes
        return (1.0 if kind == "val" else 1.6) + (2.0 if reads_data else 0.0)
    return {"ref": 2.5, "slta": 4.0, "auto_task": 9.0}[kind]


def describe(unit: Unit) -> str:
    kind, *rest = unit
    if kind in ("val", "test"):
        return f"{rest[0]} {'+'.join(rest[1])} {rest[2]} ({kind})"
    if kind == "auto_task":
        return f"slta {rest[0]} auto_task {'+'.join(rest[1])}"
    return {"ref": lambda: f"{rest[0]} (test)", "slta": lambda: f"slta {rest[0]} seed {rest[1]}"}[kind]()


def warm_up(demo: Any, demo_args: tuple, strength: tuple[str, ...], jobs: int, progress: bool) -> None:
    """Fill `demo`'s cache with the study's independent units, `jobs` processes at a time (module docstring).
    Adds the workers' generation time and prompts to demo.generation."""
    first, second = waves(demo, strength)
    total = sum(cost(demo, u) for u in first + second(demo, choose=False))
    # spawn, not fork: a forked child would inherit torch's thread pools and the parent's state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool, \
            tqdm(total=total, desc=f"slta demo {demo.zoo.name}, {jobs} processes", disable=not progress,
                 bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}") as bar:
        for wave in (1, 2):
            if wave == 2:
                if COMBOS[-1] in demo.combos and (demo.methods is None or "task_arithmetic" in demo.methods):
                    # the diagnostics' λ (slta.demo.studies.validated_lambda), from wave 1's cached validation runs
                    grid = baseline_grids(demo.size)["task_arithmetic"]
                    demo.ta_lambda = demo.chosen("task_arithmetic", COMBOS[-1], grid)[0].get("weight")
                units = second(demo)
            else:
                units = first
            running = {pool.submit(run_unit, type(demo), demo_args, demo.ta_lambda, demo.diagnose, u): u for u in units}
            bar.set_postfix_str("running: " + "; ".join(describe(u) for u in units[:jobs]))
            while running:
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for f in done:
                    unit = running.pop(f)
                    gen = f.result()  # a failed unit fails the study, naming itself in the traceback
                    demo.generation["seconds"] += gen["seconds"]
                    demo.generation["prompts"] += gen["prompts"]
                    bar.update(cost(demo, unit))
                if running:
                    bar.set_postfix_str("running: " + "; ".join(describe(u) for u in list(running.values())[:jobs]))


def study_jobs(jobs: int | None, threads: int, zoos_at_once: int, cores: int | None = None) -> int:
    """Processes for one zoo's warm-up: the cores (or `jobs`) left over by the zoos running at once, one
    thread each; 1 (no warm-up) when a zoo has a single core or several threads."""
    import os

    if threads > 1:
        return 1
    return max(1, (jobs or cores or os.cpu_count() or 1) // max(1, zoos_at_once))


__all__ = ["run_unit", "study_jobs", "warm_up", "waves"]
