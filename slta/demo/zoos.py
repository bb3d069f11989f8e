"""The demo's zoos: which size each kind is built at, where it lives, and building several at once.

The chat kind was calibrated at the `small` size (docs/zoo_calibration.md): the default-size base
trains too slowly on a 2-core machine to calibrate it there, and the hard kind's small fine-tunes
miss their target losses. So a default-size demo runs the hard kind at `default` and the chat kind
at `small`, each in its own folder.

Zoo builds are single-threaded by design (a second thread gains little on these models and makes
them slower on a shared 2-core machine), so on a machine with several cores the demo builds
independent zoos in parallel processes, each with one thread: the bytes are the same as a
sequential build (same seed, same thread count), only the wall time changes.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

KINDS = ("hard", "chat", "smollm2")
SYNTHETIC = ("hard", "chat")  # `--zoo-kind both`
CHAT_SIZE = {"tiny": "tiny", "small": "small", "default": "small"}


def kind_size(kind: str, size: str) -> str:
    """The model size a kind is built at in a demo of ``size`` (smollm2: its own recipes, tiny or default)."""
    if kind == "smollm2":
        from slta.zoo.smollm2 import SMOLLM2_SIZE

        return SMOLLM2_SIZE[size]
    return CHAT_SIZE[size] if kind == "chat" else size


def zoo_dir(root: Path, kind: str, seed: int, size: str) -> Path:
    """``root/KIND-seedN``, or ``root/KIND-SIZE-seedN`` where the kind runs at another size than the demo."""
    ks = kind_size(kind, size)
    return root / (f"{kind}-seed{seed}" if ks == size else f"{kind}-{ks}-seed{seed}")


def hard_base_dir(root: Path, kind: str, seed: int, size: str) -> Path:
    """The hard zoo whose base a zoo of ``kind`` starts from (its own folder for the hard kind)."""
    ks = kind_size(kind, size)
    return root / (f"hard-seed{seed}" if ks == size else f"hard-{ks}-seed{seed}")


def _build_group(jobs: list[dict[str, Any]], progress: bool) -> list[float]:
    """Build the zoos of one group in order (a chat zoo after the hard zoo whose base it shares)."""
    from slta.zoo import build_zoo

    times = []
    for job in jobs:
        t = time.perf_counter()
        build_zoo(job["path"], size=job["size"], seed=job["seed"], progress=progress, threads=job["threads"],
                  kind=job["kind"], hard_zoo=job["hard_zoo"], overrides=job["overrides"],
                  base_gguf=job["base_gguf"] if job["kind"] == "smollm2" else None, jobs=job.get("ft_jobs", 1))
        times.append(time.perf_counter() - t)
    return times


def job_count(jobs: int | None, threads: int, tasks: int) -> int:
    """Parallel processes: `jobs`, or one per core (cores / threads per process), at most one per task."""
    return max(1, min(jobs or (os.cpu_count() or 1) // max(1, threads), tasks))


def in_processes(fn: Any, calls: list[tuple], jobs: int) -> list[Any]:
    """fn(*args) for every args of `calls`, in order; in `jobs` spawned processes, or inline for one."""
    if jobs == 1:
        return [fn(*args) for args in calls]
    # spawn, not fork: a forked child would inherit torch's thread pools and the parent's state.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        return [f.result() for f in [pool.submit(fn, *args) for args in calls]]


def build_zoos(root: Path, size: str, kinds: tuple[str, ...], seeds: list[int] | tuple[int, ...],
               overrides: dict[str, Any] | None, threads: int, progress: bool, jobs: int | None = None,
               base_gguf: str | Path | None = None) -> dict[tuple[str, int], tuple[Path, float]]:
    """Build (or reuse) every zoo of the study; returns {(kind, seed): (folder, build seconds)}.

    Zoos that share a hard base (same seed and size) form one group, built in order; groups run
    in ``jobs`` parallel processes (default: one per core, at most one per group)."""
    from slta.zoo.build import recipe_for

    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for seed in seeds:
        for kind in kinds:
            ks = kind_size(kind, size)
            known = set(recipe_for(ks, seed, kind=kind)["params"])
            groups.setdefault((seed, ks), []).append({
                "kind": kind, "seed": seed, "size": ks, "threads": threads, "path": zoo_dir(root, kind, seed, size),
                "hard_zoo": hard_base_dir(root, kind, seed, size), "base_gguf": base_gguf,
                "overrides": {k: v for k, v in (overrides or {}).items() if k in known}})
    for group in groups.values():
        group.sort(key=lambda j: KINDS.index(j["kind"]))
    todo = list(groups.values())
    if len(todo) == 1 and job_count(jobs, threads, 2) > 1:
        # one zoo group: a smollm2 zoo trains its three fine-tunes at once instead (three single-threaded
        # processes keep two cores busy throughout; two-then-one leaves one idle for a third of the time)
        for j in todo[0]:
            j["ft_jobs"] = 3
    jobs = job_count(jobs, threads, len(todo))
    names = lambda g: ", ".join(j["path"].name for j in g)
    done: dict[tuple[str, int], tuple[Path, float]] = {}
    if jobs == 1:
        for g in todo:
            print(f"slta demo: building or reusing {names(g)} in {root} ...", flush=True)
            for j, s in zip(g, _build_group(g, progress)):
                done[(j["kind"], j["seed"])] = (j["path"], s)
        return done
    print(f"slta demo: building or reusing {len(todo)} zoo group(s) in {root}, {jobs} at a time "
          f"(one process each, {threads} thread(s); progress bars off) ...", flush=True)
    # spawn, not fork: a forked child would inherit torch's thread pools and the parent's state.
    with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [(g, pool.submit(_build_group, g, False)) for g in todo]
        for g, f in futures:
            times = f.result()
            print(f"  ready: {names(g)} ({', '.join(f'{s:.0f}s' for s in times)})", flush=True)
            for j, s in zip(g, times):
                done[(j["kind"], j["seed"])] = (j["path"], s)
    return done


def generation_budget(zoo: Path) -> dict[str, int]:
    """Per task, how many tokens a correct completion can need: the longest calibration
    response (training format, with its chain of thought) plus </s> and a 25% + 8 margin. A merged
    model that rambles is cut there instead of at 64 tokens; its answer would be wrong anyway."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(zoo / "base")
    budget = {}
    for t in sorted(d.name for d in (zoo / "data").iterdir() if (d / "calib.jsonl").is_file()):
        # calibration rows are {"prompt", "response"} (hard kind) or {"messages"} (chat kind)
        responses = [r["response"] if "response" in r else " " + r["messages"][-1]["content"]
                     for r in _read_rows(zoo / "data" / t / "calib.jsonl")]
        longest = max(len(ids) for ids in tok(responses, add_special_tokens=False).input_ids)
        budget[t] = int(1.25 * longest) + 8
    return budget


def _read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
