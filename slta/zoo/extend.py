"""Two more fine-tunes on a built chat zoo: the five tasks of the paper's Table 10 (merging 2..5 models).

``extend_zoo(zoo)`` adds ``arith`` and ``back_translate`` (slta.zoo.tasks.EXTRA_TASKS) to a chat
zoo: their data in ``data/TASK/{calib,val,test}.jsonl`` (the chat template, like the other tasks)
and a fine-tune per task in ``TASK/``, trained from the zoo's base with the chat kind's fixed
schedule (same epochs, batch, learning rate and batch-order seed as the three fine-tunes). The
zoo's own files are not touched: its recipe hash, data and three fine-tunes stay byte for byte
what they were, so every result on the three-task zoo stands. ``extra_tasks.json`` is written
last and names the zoo's recipe hash; a rebuilt zoo loses the extension with the rest.

The extra tasks draw from their own seeded stream (``extra-tasks-SEED``), not the zoo's, and a
``back_translate`` question is never a sentence of the ``translate`` task's splits.
"""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.zoo import tasks
from slta.zoo.chat import fine_tune, write_task_data

EXTEND_VERSION = 1
MARKER = "extra_tasks.json"


def is_extended(zoo: Path) -> bool:
    """Whether ``zoo`` holds this version's extension for its current recipe."""
    try:
        mark = json.loads((zoo / MARKER).read_text())
        own = json.loads((zoo / "zoo.json").read_text())["recipe_hash"]
    except (OSError, ValueError, KeyError):
        return False
    return (mark.get("version") == EXTEND_VERSION and mark.get("recipe_hash") == own
            and all((zoo / t / "model.safetensors").is_file() for t in tasks.EXTRA_TASKS))


def extra_splits(recipe: dict, lex: tasks.Lexicon, translate: dict[str, list[dict]]) -> dict[str, dict[str, list[dict]]]:
    """Per extra task: test, val, calib and train splits (hard-kind prompts), from the task's own stream."""
    p = recipe["params"]
    rng = random.Random(f"extra-tasks-{recipe['seed']}")
    out = {}
    for task in tasks.EXTRA_TASKS:
        seen: set[str] = set()
        if task == "back_translate":  # never ask back a sentence the translate task holds
            seen = {tasks.format_prompt(task, e["response"].strip()) for split in translate.values() for e in split}
        out[task] = {name: tasks.make_split(task, rng, lex, p, n, seen)
                     for name, n in (("test", p["n_test"]), ("val", p["n_val"]), ("calib", p["n_calib"]),
                                     ("train", p["chat_train_examples"]))}
    return out


def extend_zoo(zoo: str | Path, progress: bool = True, threads: int = 1) -> Path:
    """Adds the extra tasks' data and fine-tunes to the chat zoo in ``zoo`` (nothing if already there)."""
    from slta.zoo.build import deterministic, hard_recipe_of, make_data, save_model, write_jsonl

    zoo = Path(zoo)
    if is_extended(zoo):
        return zoo
    meta = json.loads((zoo / "zoo.json").read_text())
    recipe = meta["recipe"]
    if recipe.get("kind") != "chat" or not meta.get("recipe_hash"):
        raise ValueError(f"{zoo}: the five-task extension needs a built chat zoo (zoo.json kind 'chat')")
    p, seed = recipe["params"], recipe["seed"]
    tmp = zoo / ".extend-build"
    shutil.rmtree(tmp, ignore_errors=True)
    (zoo / MARKER).unlink(missing_ok=True)
    info: dict = {"version": EXTEND_VERSION, "recipe_hash": meta["recipe_hash"], "tasks": list(tasks.EXTRA_TASKS),
                  "train_loss": {}, "timings_s": {}}
    try:
        with deterministic(threads):
            data = make_data(hard_recipe_of(recipe))
            splits = extra_splits(recipe, data["lexicon"], data["splits"]["translate"])
            tok = AutoTokenizer.from_pretrained(zoo / "base")
            for task in tasks.EXTRA_TASKS:
                write_task_data(tmp / "data" / task, tok, splits[task], p["chat_system"], write_jsonl)
            base = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32)
            for task in tasks.EXTRA_TASKS:  # the chat kind's fine-tune, as for its three tasks
                t = time.perf_counter()
                info["train_loss"][task] = fine_tune(base, tok, splits[task]["train"], p, seed, task, progress,
                                                     tmp / task, save_model)
                info["timings_s"][task] = time.perf_counter() - t
        for task in tasks.EXTRA_TASKS:  # move into place; the marker last
            for src, dst in ((tmp / task, zoo / task), (tmp / "data" / task, zoo / "data" / task)):
                shutil.rmtree(dst, ignore_errors=True)
                src.rename(dst)
        (zoo / MARKER).write_text(json.dumps(info, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return zoo
