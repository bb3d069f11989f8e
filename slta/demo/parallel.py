"""One zoo's study on spare cores: its independent merges and evaluations in several processes.

The study (slta.demo.demo_one_zoo) runs in order and caches every evaluation by a hash of what produced
it. When one zoo has the machine to itself, a warm-up runs first: the study's units in `jobs` spawned
processes of one thread each, every unit writing the cache that the in-order pass then reads. The units
are the same calls with the same keys, so the results are the ones the in-order pass computes alone; only
the wall time changes. Some units wait for others' results:

- ready at once: the base's and the fine-tunes' evaluations, every baseline grid point on the validation
  split, the baselines with nothing to choose, the `auto_task` merges (`--strength auto_task`), the
  `--variants` rows (slta.demo.variants.variant_units: a scale search is one unit), and slta's merges when
  there are no diagnostics;
- a baseline's test run waits for its grid's validation runs (it needs the chosen point), and slta's
  merges wait for task arithmetic's on the triple when they are diagnosed (the diagnostics' λ).

A free process takes the ready unit with the longest chain ahead of it (its cost plus what waits for it),
so that no process idles at the end while the other finishes a long unit that could have started earlier.
The validation sweeps of `--strength per_task` / `ta_per_task` and `--ablations` stay in
the in-order pass: each step there depends on the one before. Why processes and not threads: greedy
decoding of SmolLM2 measured 1.95x one process's throughput with two one-thread processes, 1.58x with
one two-thread process (README, "make demo").
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable

from tqdm.auto import tqdm

from slta.demo.table import COMBOS, TASKS
from slta.demo.variants import SEARCHED, variant_units
from slta.demo.variants import run_unit as run_variant

Unit = tuple  # ("ref", name) | ("val" | "test", method, combo, params) | ("slta", level, seed) | ("auto_task", level, combo, mode)
#               | ("variant", combo, row)


@dataclass
class Later:
    """Units that wait: `make()` gives them once every unit numbered in `after` is done; `size` is what they
    cost (for the bar and the priorities, before they exist)."""
    after: set[int]
    make: Callable[[], list[Unit]]
    size: float


def plan(demo: Any, strength: tuple[str, ...]) -> tuple[list[Unit], list[Later]]:
    """(the units ready at once, the units that wait, each Later's `after` numbering the first list)."""
    grids = demo.grids()
    with_slta = demo.methods is None or "slta" in demo.methods
    ready: list[Unit] = []
    from slta.demo.strength import AUTO

    for mode in AUTO:
        if mode in strength and with_slta:
            ready += [("auto_task", level, combo, mode) for combo in demo.combos for level in demo.strength_levels]
    ready += [("ref", name) for name in ("base", *TASKS)]
    if demo.variants and with_slta:
        ready += [("variant", combo, u.row) for combo in demo.combos for u in variant_units(demo, combo)]
    later: list[Later] = []
    vals: dict[tuple[str, tuple[str, ...]], set[int]] = {}
    for method, grid in grids.items():
        for combo in demo.combos:
            if len(grid) == 1:
                ready.append(("test", method, combo, grid[0]))
                continue
            first = len(ready)
            ready += [("val", method, combo, params) for params in grid]
            vals[method, combo] = set(range(first, len(ready)))
            later.append(Later(vals[method, combo], lambda m=method, c=combo, g=grid: [("test", m, c, demo.chosen(m, c, g)[0])],
                               cost(demo, ("test", method, combo, None))))
    slta_units = [("slta", level, seed) for level in demo.levels for seed in demo.seeds] if with_slta else []
    diagnosed = ("task_arithmetic", COMBOS[-1])
    if not (demo.diagnose and "task_arithmetic" in grids and COMBOS[-1] in demo.combos):
        ready += slta_units  # no λ to wait for (slta.demo.studies.validated_lambda gives None)
    elif diagnosed not in vals:  # nothing to choose: the grid's one λ
        demo.ta_lambda = grids["task_arithmetic"][0].get("weight")
        ready += slta_units
    else:
        def with_lambda() -> list[Unit]:
            # the diagnostics' λ (slta.demo.studies.validated_lambda), from the cached validation runs
            demo.ta_lambda = demo.chosen(*diagnosed, grids["task_arithmetic"])[0].get("weight")
            return slta_units
        later.append(Later(vals[diagnosed], with_lambda, sum(cost(demo, u) for u in slta_units)))
    return ready, later


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
    elif kind == "variant":
        combo, row = rest
        run_variant(demo, next(u for u in variant_units(demo, combo) if u.row == row), combo)
    else:
        raise ValueError(f"unknown unit {unit!r}")
    return demo.generation


def cost(demo: Any, unit: Unit) -> float:
    """A unit's rough cost, in validation runs of a weight-only merge (about 0.9 min on SmolLM2: `make demo`'s
    log has an `auto_task` merge at 8.5 min, slta's at 3.4, a RegMean++ validation run at about 3; a `--variants`
    scale search 14-16 min, `refine: 2` 17-19, the options with a second pass 6-8, the others about 4), so that
    the bar's time left does not count unequal units as equal."""
    kind, *rest = unit
    if kind == "variant":
        row = rest[1]
        if row.endswith(SEARCHED):
            return 17.0
        return 20.0 if "refine" in row else 8.0 if any(w in row for w in ("merged", "trajectory", "autoscale")) else 5.0
    if kind in ("val", "test"):
        reads_data = "data" in demo.merge_config(rest[0], rest[1], {})["models"][0]  # a merge with forward passes
        return (1.0 if kind == "val" else 1.6) + (2.0 if reads_data else 0.0)
    return {"ref": 2.5, "slta": 4.0, "auto_task": 9.0}[kind]


def describe(unit: Unit) -> str:
    kind, *rest = unit
    if kind in ("val", "test"):
        return f"{rest[0]} {'+'.join(rest[1])} {rest[2]} ({kind})"
    if kind == "auto_task":
        return f"slta {rest[0]} {rest[2]} {'+'.join(rest[1])}"
    if kind == "variant":
        return f"slta {rest[1]} {'+'.join(rest[0])}"
    return {"ref": lambda: f"{rest[0]} (test)", "slta": lambda: f"slta {rest[0]} seed {rest[1]}"}[kind]()


def warm_up(demo: Any, demo_args: tuple, strength: tuple[str, ...], jobs: int, progress: bool) -> None:
    """Fill `demo`'s cache with the study's units, `jobs` processes at a time (module docstring).
    Adds the workers' generation time and prompts to demo.generation."""
    ready, later = plan(demo, strength)
    # a unit's priority: its cost plus the most that waits for it (the longest chain it starts)
    chain = {k: cost(demo, u) + max((w.size for w in later if k in w.after), default=0.0) for k, u in enumerate(ready)}
    queue = list(range(len(ready)))
    units = list(ready)
    done: set[int] = set()
    total = sum(cost(demo, u) for u in ready) + sum(w.size for w in later)
    # spawn, not fork: a forked child would inherit torch's thread pools and the parent's state
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool, \
            tqdm(total=total, desc=f"slta demo {demo.zoo.name}, {jobs} processes", disable=not progress,
                 bar_format="{l_bar}{bar}| {elapsed}<{remaining}{postfix}") as bar:
        running: dict[Any, int] = {}
        while queue or running:
            queue.sort(key=lambda k: -chain[k])
            while queue and len(running) < jobs:
                k = queue.pop(0)
                running[pool.submit(run_unit, type(demo), demo_args, demo.ta_lambda, demo.diagnose, units[k])] = k
            bar.set_postfix_str("running: " + "; ".join(describe(units[k]) for k in running.values()))
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for f in finished:
                k = running.pop(f)
                gen = f.result()  # a failed unit fails the study, naming itself in the traceback
                demo.generation["seconds"] += gen["seconds"]
                demo.generation["prompts"] += gen["prompts"]
                done.add(k)
                bar.update(cost(demo, units[k]))
            for w in [w for w in later if w.after <= done]:
                later.remove(w)
                for u in w.make():
                    chain[len(units)] = cost(demo, u)
                    queue.append(len(units))
                    units.append(u)


def study_jobs(jobs: int | None, threads: int, zoos_at_once: int, cores: int | None = None) -> int:
    """Processes for one zoo's warm-up: the cores (or `jobs`) left over by the zoos running at once, one
    thread each; 1 (no warm-up) when a zoo has a single core or several threads."""
    import os

    if threads > 1:
        return 1
    return max(1, (jobs or cores or os.cpu_count() or 1) // max(1, zoos_at_once))


__all__ = ["plan", "run_unit", "study_jobs", "warm_up"]
