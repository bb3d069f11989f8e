"""Builds the demo zoo: tokenizer, pre-trained base, three full fine-tunes, task data.

Layout of ``out_dir``::

    zoo.json                    recipe, its hash, timings, training losses
    base/ math/ code/ translate/   Hugging Face model folders (config, safetensors, tokenizer)
    data/{task}/calib.jsonl     calibration samples in the training format: {"prompt", "response"}
                                (hard kind) or {"messages": [...]} (chat kind)
    data/{task}/val.jsonl       {"prompt", "answer"}: held-out validation set
    data/{task}/test.jsonl      {"prompt", "answer"}: held-out test set (chat kind: the prompt
                                is the chat template's rendering)

Three kinds: ``hard`` (here), ``chat`` (slta.zoo.chat, built on the hard zoo of the same seed) and
``smollm2`` (slta.zoo.smollm2: a real base from PyPI, built in resumable stages).
Everything is a deterministic function of the recipe (kind, size preset, overrides, seed,
generator version) and the torch thread count, on one machine: the seed drives the data, the
base's initialisation and pre-training batches, and the fine-tunes' batches. Another CPU can
round differently and build another zoo. A zoo whose stored recipe hash matches is reused as is.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import random
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, GenerationConfig

from slta.io.output import check_output
from slta.zoo import tasks
from slta.zoo import real_base
from slta.zoo.chat import CHAT_SIZES, build_chat
from slta.zoo.smollm2 import SMOLLM2_SIZES, build_smollm2
from slta.zoo.tokenizer import train_tokenizer
from slta.zoo.train import encode_examples, make_model, packed_batches, sft_batches, train_loop

# Bump when the generator code changes in a way that changes the output: cached zoos rebuild.
GENERATOR_VERSION = "zoo-3"
SMOLLM2_VERSION = "smollm2-1"  # the smollm2 kind's own (its data and fine-tuning code)

SIZES: dict[str, dict] = {
    "tiny": dict(
        vocab_size=384, hidden=64, layers=2, heads=4, kv_heads=2, ffn=176, max_len=256,
        n_nouns=12, n_verbs=6, n_adjs=6,
        math_min_steps=1, math_max_steps=2, math_quote=True, worked_frac=0.9, solved_frac=0.8, code_min_len=3, code_max_len=4,
        pretrain_docs=2000, pretrain_steps=100, pretrain_batch=16, block=64, pretrain_lr=3e-3,
        train_examples=1000, finetune_steps=60, finetune_batch=16, finetune_lr=2e-3,
        n_calib=32, n_val=32, n_test=48, warmup=20, pretrain_wd=0.1, finetune_wd=0.0, finetune_stop_loss=0.01,
        finetune_max_steps=60,  # tiny never reaches the stop loss; CI stays fast
    ),
    # The default architecture's shape at about a third of its training cost: where the chat
    # kind was calibrated over several zoo seeds on a shared 2-core machine (docs/zoo_calibration.md).
    "small": dict(
        vocab_size=512, hidden=96, layers=3, heads=4, kv_heads=2, ffn=256, max_len=256,
        n_nouns=16, n_verbs=8, n_adjs=8,
        math_min_steps=1, math_max_steps=2, math_quote=True, worked_frac=0.9, solved_frac=0.8, code_min_len=3, code_max_len=5,
        pretrain_docs=20000, pretrain_steps=1000, pretrain_batch=16, block=96, pretrain_lr=3e-3,
        train_examples=10000, finetune_steps=300, finetune_batch=16, finetune_lr=5e-4,
        n_calib=64, n_val=100, n_test=150, warmup=50, pretrain_wd=0.1, finetune_wd=0.0, finetune_stop_loss=0.01,
        finetune_max_steps=900,
    ),
    "default": dict(
        vocab_size=768, hidden=128, layers=4, heads=4, kv_heads=2, ffn=352, max_len=256,
        n_nouns=24, n_verbs=12, n_adjs=10,
        math_min_steps=2, math_max_steps=3, math_quote=True, worked_frac=0.9, solved_frac=0.8, code_min_len=3, code_max_len=6,
        pretrain_docs=60000, pretrain_steps=2400, pretrain_batch=16, block=128, pretrain_lr=2e-3,
        train_examples=40000, finetune_steps=400, finetune_batch=16, finetune_lr=3e-4,
        n_calib=128, n_val=200, n_test=300, warmup=100, pretrain_wd=0.1, finetune_wd=0.0, finetune_stop_loss=0.01,
        # A fine-tune goes on (at the schedule's final lr) until it reaches the stop loss: on
        # an Intel Xeon the code fine-tune was cut at 400 steps at loss 0.12 and scored 78%.
        finetune_max_steps=2000,
    ),
}
MODEL_DIRS = ("base", *tasks.TASKS)


KINDS = ("hard", "chat", "smollm2")


def recipe_for(size: str, seed: int, overrides: dict | None = None, kind: str = "hard",
               base_sha256: str | None = None) -> dict:
    """The recipe of one zoo. The seed drives everything: data, pre-training, fine-tuning.
    ``base_sha256``: the smollm2 kind's GGUF when it is not the pinned file (a test's own)."""
    if kind not in KINDS:
        raise ValueError(f"unknown zoo kind {kind!r}; known: {', '.join(KINDS)}")
    sizes = SMOLLM2_SIZES if kind == "smollm2" else SIZES
    if size not in sizes:
        raise ValueError(f"unknown zoo size {size!r} for the {kind} kind; known: {', '.join(sizes)}")
    if kind == "smollm2":  # a real base: its identity is the GGUF file's hash
        known = SMOLLM2_SIZES[size]
    else:
        known = dict(SIZES[size], **(CHAT_SIZES[size] if kind == "chat" else {}))
    unknown = set(overrides or {}) - set(known)
    if unknown:
        raise ValueError(f"unknown zoo recipe keys: {', '.join(sorted(unknown))}")
    params = dict(known, **(overrides or {}))
    recipe = {"version": GENERATOR_VERSION, "size": size, "seed": seed, "params": params}
    if kind != "hard":  # the hard recipe's hash is left as it was before kinds existed
        recipe["kind"] = kind
    if kind == "smollm2":
        recipe["version"] = SMOLLM2_VERSION
        recipe["base_sha256"] = base_sha256 or real_base.SHA256
    return recipe


def hard_recipe_of(recipe: dict) -> dict:
    """The hard zoo a chat zoo starts from: same size, seed, and hard-kind parameters."""
    hard = {k: v for k, v in recipe["params"].items() if k in SIZES[recipe["size"]]}
    return {"version": recipe["version"], "size": recipe["size"], "seed": recipe["seed"], "params": hard}


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def is_built(out_dir: Path, recipe: dict) -> bool:
    meta = out_dir / "zoo.json"
    if not meta.is_file():
        return False
    try:
        stored = json.loads(meta.read_text())
    except json.JSONDecodeError:
        return False
    complete = all((out_dir / d / "model.safetensors").is_file() for d in MODEL_DIRS) and all(
        (out_dir / "data" / t / f"{s}.jsonl").is_file() for t in tasks.TASKS for s in ("calib", "val", "test")
    )
    return stored.get("recipe_hash") == recipe_hash(recipe) and complete


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def save_model(model, tok, folder: Path) -> None:
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, do_sample=False
    )
    model.save_pretrained(folder)  # safetensors
    tok.save_pretrained(folder)


def make_data(recipe: dict) -> dict:
    """All text of the zoo: lexicon, pre-training documents, and per-task splits."""
    p, rng = recipe["params"], random.Random(recipe["seed"])
    lex = tasks.make_lexicon(rng, p["n_nouns"], p["n_verbs"], p["n_adjs"])
    splits = {}
    for task in tasks.TASKS:
        seen: set[str] = set()  # held-out prompts never appear in another split
        splits[task] = {
            name: tasks.make_split(task, rng, lex, p, n, seen)
            for name, n in (("test", p["n_test"]), ("val", p["n_val"]), ("calib", p["n_calib"]), ("train", p["train_examples"]))
        }
    docs = [tasks.pretrain_document(rng, lex, p) for _ in range(p["pretrain_docs"])]
    return {"lexicon": lex, "splits": splits, "docs": docs}


# Keys that only the hard kind's fine-tunes read: the base does not depend on them.
FINETUNE_ONLY = ("finetune_steps", "finetune_batch", "finetune_lr", "finetune_wd", "finetune_stop_loss", "finetune_max_steps")


def base_hash(recipe: dict) -> str:
    """Hash of what the pre-trained base depends on (a hard recipe less its fine-tuning keys)."""
    return recipe_hash({**recipe, "params": {k: v for k, v in recipe["params"].items() if k not in FINETUNE_ONLY}})


def has_base(out_dir: Path, recipe: dict) -> bool:
    """Whether ``out_dir`` holds the pre-trained base of this hard recipe (a full zoo, or one
    built with ``base_only`` for a chat zoo)."""
    try:
        stored = json.loads((out_dir / "zoo.json").read_text())
    except (OSError, json.JSONDecodeError):
        return False
    return stored.get("base_hash") == base_hash(recipe) and (out_dir / "base" / "model.safetensors").is_file()


def _build(out: Path, recipe: dict, progress: bool, base_only: bool = False, reuse_base: Path | None = None) -> dict:
    """Builds the zoo into ``out`` (an empty folder); returns the metadata for zoo.json.

    ``reuse_base``: a folder holding this recipe's base (skips pre-training). ``base_only``:
    stop after the base (what a chat zoo needs)."""
    p, seed = recipe["params"], recipe["seed"]
    timings: dict[str, float] = {}
    losses: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()

    data = make_data(recipe)
    splits = data["splits"]
    # The tokenizer learns from the pre-training corpus only, so the base does not depend on
    # the response formats (symbols only responses use, like "=", stay single bytes).
    tok = train_tokenizer(data["docs"], p["vocab_size"])
    for task in tasks.TASKS:
        write_jsonl(out / "data" / task / "calib.jsonl", [{"prompt": e["prompt"], "response": e["response"]} for e in splits[task]["calib"]])
        for name in ("val", "test"):
            write_jsonl(out / "data" / task / f"{name}.jsonl", [{"prompt": e["prompt"], "answer": e["answer"]} for e in splits[task][name]])
    timings["data"] = time.perf_counter() - t0

    # Pre-training: plain language modelling on the unlabeled corpus.
    t = time.perf_counter()
    if reuse_base is not None:
        shutil.copytree(reuse_base, out / "base")
    else:
        base = make_model(tok, p["hidden"], p["layers"], p["heads"], p["kv_heads"], p["ffn"], p["max_len"], seed)
        docs = tok(data["docs"]).input_ids
        batches = packed_batches(docs, tok.eos_token_id, p["pretrain_batch"], p["block"], seed)
        curve = train_loop(base, batches, p["pretrain_steps"], p["pretrain_lr"], p["warmup"], p["pretrain_wd"], "pretrain base", progress)
        save_model(base, tok, out / "base")
        losses["base"] = {"first": curve[0], "last": sum(curve[-20:]) / len(curve[-20:])}
    timings["base"] = time.perf_counter() - t
    if base_only:
        return {"timings_s": timings, "train_loss": losses, "base_only": True}
    # Fine-tunes start from the saved base, whether just trained or reused: one path, same bytes.
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)

    # Full fine-tunes: every parameter trained, loss on response tokens only.
    for i, task in enumerate(tasks.TASKS):
        t = time.perf_counter()
        model = copy.deepcopy(base)
        encoded = encode_examples(tok, splits[task]["train"])
        batches = sft_batches(encoded, tok.pad_token_id, p["finetune_batch"], seed + 1 + i)
        curve = train_loop(model, batches, p["finetune_steps"], p["finetune_lr"], p["warmup"], p["finetune_wd"], f"fine-tune {task}", progress, p["finetune_stop_loss"], p["finetune_max_steps"])
        save_model(model, tok, out / task)
        losses[task] = {"first": curve[0], "last": sum(curve[-20:]) / len(curve[-20:]), "steps": len(curve)}
        timings[task] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return {"timings_s": timings, "train_loss": losses}


@contextlib.contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Deterministic training for a build: a fixed number of torch threads and deterministic kernels
    (seeded everything else), restored afterwards. Bytes are reproducible for a given thread count."""
    prev_threads, prev_det = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(max(1, min(threads, os.cpu_count() or 1)))
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(prev_threads)
        torch.use_deterministic_algorithms(prev_det)


def build_zoo(
    out_dir: str | Path,
    size: str = "default",
    seed: int = 0,
    force: bool = False,
    progress: bool = True,
    overrides: dict | None = None,
    threads: int = 1,
    kind: str = "hard",
    hard_zoo: str | Path | None = None,
    base_only: bool = False,
    base_gguf: str | Path | None = None,
    jobs: int = 1,
) -> Path:
    """Builds (or reuses) the demo zoo in ``out_dir`` and returns its path.

    ``kind`` is ``hard`` (each task in its own prompt format, fine-tunes trained to their
    target loss) or ``chat`` (one chat template, fixed epochs; see slta.zoo.chat). A chat zoo
    starts from the hard zoo of the same size and seed, built (or reused) in ``hard_zoo``
    (default: ``hard-seedN`` beside ``out_dir``); only its base is needed, so a hard zoo that
    is not there is built with ``base_only`` (no fine-tunes) and completed later if asked for.

    The zoo is rebuilt only when ``force`` is set or the recipe (size preset, ``overrides``
    of its hyper-parameters, seed, generator version) differs from the stored one.
    ``threads`` bounds torch's CPU threads; results are reproducible for a given value. The
    default is 1: these models are small, and on 2 cores that another process also uses, 2
    threads measured 3-4x slower than 1 (13 vs 42 steps/s on the tiny model). ``jobs`` (smollm2
    kind): fine-tunes trained at once in separate processes, each with ``threads`` threads.
    """
    out_dir = Path(out_dir)
    if kind == "smollm2":
        return _build_smollm2_zoo(out_dir, size, seed, force, progress, overrides, threads, base_gguf, jobs)
    recipe = recipe_for(size, seed, overrides, kind)
    if not force and (is_built(out_dir, recipe) or (base_only and has_base(out_dir, recipe))):
        return out_dir
    hard_dir = None
    if kind == "chat":
        hard_dir = Path(hard_zoo) if hard_zoo else out_dir.with_name(f"hard-seed{seed}")
        hard = hard_recipe_of(recipe)
        build_zoo(hard_dir, size, seed, progress=progress, threads=threads, base_only=True,
                  overrides={k: v for k, v in (overrides or {}).items() if k in hard["params"]})
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "zoo.json").exists():
        raise FileExistsError(f"{out_dir} exists and is not a zoo (no zoo.json); refusing to overwrite it")
    check_output(out_dir, overwrite=True)  # never the working directory or a parent of it (rebuilds delete it)

    # Build beside the target and move into place at the end: a crash never leaves a
    # folder that looks like a complete zoo.
    tmp = out_dir.with_name(out_dir.name + ".tmp-build")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    reuse = out_dir / "base" if kind == "hard" and not force and has_base(out_dir, recipe) else None
    try:
        with deterministic(threads):
            if kind == "chat":
                meta = build_chat(tmp, recipe, hard_dir, make_data(hard_recipe_of(recipe)), progress, write_jsonl,
                                  save_model, previous=None if force else out_dir)
                meta["hard_zoo"] = {"path": str(hard_dir), "recipe_hash": recipe_hash(hard_recipe_of(recipe))}
            else:
                meta = _build(tmp, recipe, progress, base_only, reuse)
                meta["base_hash"] = base_hash(recipe)
            # A base-only folder is not a built zoo: no recipe hash, so is_built stays false.
            done = recipe_hash(recipe) if not meta.get("base_only") else None
            meta = {"recipe": recipe, "recipe_hash": done, "torch_threads": torch.get_num_threads(), **meta}
        (tmp / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _build_smollm2_zoo(out_dir: Path, size: str, seed: int, force: bool, progress: bool, overrides: dict | None,
                       threads: int, base_gguf: str | Path | None, jobs: int = 1) -> Path:
    """The smollm2 kind (slta.zoo.smollm2): built in stages in ``OUT.partial`` that a stopped build
    resumes from, moved to ``OUT`` once complete. ``base_gguf``: the GGUF file, instead of the wheel's."""
    if base_gguf is not None and not Path(base_gguf).is_file():
        raise real_base.ZooError(f"--base-gguf {base_gguf}: no such file")
    recipe = recipe_for(size, seed, overrides, "smollm2",
                        real_base.sha256_file(Path(base_gguf)) if base_gguf else None)
    if not force and is_built(out_dir, recipe):
        return out_dir
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / "zoo.json").exists():
        raise FileExistsError(f"{out_dir} exists and is not a zoo (no zoo.json); refusing to overwrite it")
    check_output(out_dir, overwrite=True)
    work = out_dir.with_name(out_dir.name + ".partial")
    if force:
        shutil.rmtree(work, ignore_errors=True)
    elif out_dir.exists() and not work.exists():
        out_dir.rename(work)  # a rebuild under a new recipe keeps the stages that still match (the base)
    t0 = time.perf_counter()
    with deterministic(threads):
        meta = build_smollm2(work, recipe, recipe_hash(recipe), progress, write_jsonl, base_gguf, jobs=jobs)
        meta = {"recipe": recipe, "recipe_hash": recipe_hash(recipe), "torch_threads": torch.get_num_threads(),
                "build_seconds_this_run": time.perf_counter() - t0, **meta}
    (work / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    return out_dir
