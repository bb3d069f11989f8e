"""The `chat` zoo kind: the paper's fine-tuning recipe on the hard kind's pre-trained base.

The paper fine-tunes Llama-2 on GSM8K, code and translation data in one chat template
(FastChat's), a fixed 3 epochs each. This kind does the same on the zoo's tasks:

* every prompt is a conversation in one ``SYSTEM`` / ``USER:`` / ``ASSISTANT:`` template, saved
  as the tokenizer's ``chat_template`` so ``AutoTokenizer.apply_chat_template`` renders it
  (training, calibration files in the ``{"messages": [...]}`` form, evaluation prompts: one
  renderer);
* the base is the hard kind's base (same seed), optionally "mid-trained" for
  ``chat_base_steps`` steps on pre-training documents mixed with solved task examples, some in
  the template: a real base LLM has seen such data, and is partly able before fine-tuning;
* each fine-tune trains a fixed ``chat_epochs`` over ``chat_train_examples`` examples with the
  same schedule for every task, no early stop.

The template does not emit ``bos_token``: the zoo tokenizer adds ``<s>`` to every encoded text
(as Llama's does), so a rendered text tokenized as usual starts with exactly one ``<s>``.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from slta.zoo import tasks
from slta.zoo.train import IGNORE, encode_examples, packed_batches, train_loop

# FastChat-like (Vicuna v1.1): an optional system line, then USER / ASSISTANT turns; an
# assistant turn ends with </s>, which is what the fine-tunes learn to emit.
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' %}{{ m['content'] }}\n"
    "{% elif m['role'] == 'user' %}USER: {{ m['content'] }}\n"
    "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
SYSTEM = "A chat between a user and an assistant. The assistant answers the question exactly."

# Chat-kind knobs per size (merged into the size's recipe; overridable like any recipe key).
CHAT_SIZES: dict[str, dict] = {
    "tiny": dict(chat_base_steps=20, chat_base_task_frac=0.5, chat_base_template_frac=0.5, chat_base_lr=1e-3,
                 chat_system=True, chat_train_examples=300, chat_epochs=2, chat_batch=16, chat_lr=2e-3,
                 chat_warmup_frac=0.1),
    # small: recipe R11 of docs/zoo_calibration.md (the base mid-trained on the tasks, 3% of them in
    # the chat template, the rest in their raw formats; 3000 training examples per fine-tune): over
    # zoo seeds 0-2 the base scores 8.5% in the template, the fine-tunes 99.6 / 91.6 / 100, task
    # arithmetic's λ 0.6 / 0.5 / 0.1
    "small": dict(chat_base_steps=800, chat_base_task_frac=0.8, chat_base_template_frac=0.03, chat_base_lr=2e-3,
                  chat_system=True, chat_train_examples=3000, chat_epochs=8, chat_batch=16, chat_lr=1e-3,
                  chat_warmup_frac=0.1),
    # default: not calibrated yet (the default base was too slow to iterate on, see the doc)
    "default": dict(chat_base_steps=300, chat_base_task_frac=0.5, chat_base_template_frac=0.3, chat_base_lr=5e-4,
                    chat_system=True, chat_train_examples=2000, chat_epochs=3, chat_batch=16, chat_lr=3e-4,
                    chat_warmup_frac=0.1),
}


def user_content(prompt: str) -> str:
    """The hard kind's prompt without its answer cue ("Answer:", "Output:", "Velarian:"): the
    task header stays, so the merged model can still tell the tasks apart."""
    head, _, cue = prompt.rpartition("\n")
    if not head or not cue.endswith(":"):
        raise ValueError(f"unexpected prompt format: {prompt!r}")
    return head


def messages(example: dict, system: bool) -> list[dict[str, str]]:
    """A zoo example (hard-kind prompt + response) as a conversation."""
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    msgs.append({"role": "user", "content": user_content(example["prompt"])})
    if "response" in example:
        msgs.append({"role": "assistant", "content": example["response"].strip()})
    return msgs


def with_template(tok: PreTrainedTokenizerFast) -> PreTrainedTokenizerFast:
    tok = copy.deepcopy(tok)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def render_prompt(tok: PreTrainedTokenizerFast, msgs: list[dict[str, str]]) -> str:
    """The text a model continues: every turn but the answer, then the generation prompt."""
    if msgs and msgs[-1]["role"] == "assistant":
        msgs = msgs[:-1]
    return tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)


def training_pair(tok: PreTrainedTokenizerFast, example: dict, system: bool) -> dict[str, str]:
    """{"prompt", "response"} whose concatenation + </s> is the rendered conversation."""
    msgs = messages(example, system)
    return {"prompt": render_prompt(tok, msgs), "response": " " + msgs[-1]["content"]}


def epoch_batches(encoded: list[tuple[list[int], list[int]]], pad_id: int, batch: int, seed: int):
    """Fine-tuning batches that walk the training set in a fresh seeded order every epoch
    (a fixed number of epochs, as in the paper), right-padded to the longest in the batch."""
    gen = torch.Generator().manual_seed(seed)
    per_epoch = math.ceil(len(encoded) / batch)
    order: list[int] = []

    def get_batch(step: int) -> tuple:
        nonlocal order
        if step % per_epoch == 0:
            order = torch.randperm(len(encoded), generator=gen).tolist()
        idx = order[(step % per_epoch) * batch : (step % per_epoch + 1) * batch]
        rows = [encoded[i] for i in idx]
        n = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), n), pad_id, dtype=torch.long)
        labels = torch.full((len(rows), n), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), n), dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids)
            labels[i, : len(lab)] = torch.tensor(lab)
            mask[i, : len(ids)] = 1
        return input_ids, mask, labels
    return get_batch, per_epoch


def midtrain_documents(rng: random.Random, tok: PreTrainedTokenizerFast, docs: list[str], pool: dict[str, list[dict]],
                       p: dict, n: int) -> list[str]:
    """The chat base's extra corpus: pre-training documents mixed with solved task examples
    (a ``chat_base_task_frac`` of them), of which a ``chat_base_template_frac`` are in the chat
    template and the rest in the hard kind's raw formats (prompt + answer)."""
    out = []
    for _ in range(n):
        if rng.random() >= p["chat_base_task_frac"]:
            out.append(rng.choice(docs))
            continue
        ex = rng.choice(pool[rng.choice(tasks.TASKS)])
        if rng.random() < p["chat_base_template_frac"]:
            pair = training_pair(tok, ex, p["chat_system"])
            out.append(pair["prompt"] + pair["response"])  # </s> joins documents in the stream
        else:
            out.append(ex["prompt"] + ex["response"])
    return out


# What the mid-trained chat base depends on besides the hard recipe (chat_train_examples: the
# mid-training pool is the train split after the fine-tunes' share).
BASE_KEYS = ("chat_base_steps", "chat_base_task_frac", "chat_base_template_frac", "chat_base_lr", "chat_system",
             "chat_train_examples")


def same_base(recipe: dict, previous: Path) -> bool:
    """Whether the chat zoo in ``previous`` (being rebuilt) has the base this recipe would
    mid-train: a recipe that changes only the fine-tunes reuses it (deterministic, same bytes)."""
    try:
        old = json.loads((previous / "zoo.json").read_text())["recipe"]
    except (OSError, ValueError, KeyError):
        return False
    chat_keys = set(CHAT_SIZES[recipe["size"]])
    strip = lambda r: {k: v for k, v in r["params"].items() if k not in chat_keys or k in BASE_KEYS}  # noqa: E731
    return (old.get("kind") == "chat" and old["seed"] == recipe["seed"] and old["version"] == recipe["version"]
            and old["size"] == recipe["size"] and strip(old) == strip(recipe)
            and (previous / "base" / "model.safetensors").is_file())


def write_task_data(folder: Path, tok: PreTrainedTokenizerFast, split: dict[str, list[dict]], system: bool,
                    write_jsonl) -> None:
    """One task's calib.jsonl ({"messages"}) and val/test.jsonl (prompts rendered with the template)."""
    write_jsonl(folder / "calib.jsonl", [{"messages": messages(e, system)} for e in split["calib"]])
    for name in ("val", "test"):
        write_jsonl(folder / f"{name}.jsonl",
                    [{"prompt": render_prompt(tok, messages(e, system)), "answer": e["answer"]} for e in split[name]])


def fine_tune(base, tok: PreTrainedTokenizerFast, examples: list[dict], p: dict, seed: int, task: str,
              progress: bool, folder: Path, save_model) -> dict[str, float]:
    """The chat kind's fine-tune of ``base`` on one task, saved to ``folder``; returns its losses.
    The same seed for every task: the same schedule and the same batch order by index."""
    model = copy.deepcopy(base)
    encoded = encode_examples(tok, [training_pair(tok, e, p["chat_system"]) for e in examples])
    batches, per_epoch = epoch_batches(encoded, tok.pad_token_id, p["chat_batch"], seed + 200)
    steps = per_epoch * p["chat_epochs"]
    curve = train_loop(model, batches, steps, p["chat_lr"], max(1, int(p["chat_warmup_frac"] * steps)),
                       p["finetune_wd"], f"fine-tune {task} (chat)", progress)
    save_model(model, tok, folder)
    return {"first": curve[0], "last": sum(curve[-20:]) / len(curve[-20:]), "steps": len(curve)}


def build_chat(out: Path, recipe: dict, hard_dir: Path, data: dict, progress: bool,
               write_jsonl, save_model, previous: Path | None = None) -> dict:
    """Builds the chat kind into ``out`` from the hard zoo in ``hard_dir`` (same seed) and the
    zoo's data (``make_data``); returns the metadata for zoo.json. ``previous``: the chat zoo
    this build replaces, whose base is reused when the recipe keeps it."""
    p, seed = recipe["params"], recipe["seed"]
    timings: dict[str, float] = {}
    losses: dict[str, dict[str, float]] = {}
    t0 = time.perf_counter()
    tok = with_template(AutoTokenizer.from_pretrained(hard_dir / "base"))
    splits = data["splits"]
    system = p["chat_system"]
    for task in tasks.TASKS:
        write_task_data(out / "data" / task, tok, splits[task], system, write_jsonl)
    # The training set is the head of the hard kind's train split; mid-training draws from
    # the rest, so a fine-tune never trains on an example its base was mid-trained on.
    n_train = p["chat_train_examples"]
    if n_train >= p["train_examples"]:
        raise ValueError("chat_train_examples must be below train_examples (the rest feeds mid-training)")
    train = {t: splits[t]["train"][:n_train] for t in tasks.TASKS}
    pool = {t: splits[t]["train"][n_train:] for t in tasks.TASKS}
    timings["data"] = time.perf_counter() - t0

    t = time.perf_counter()
    if previous is not None and same_base(recipe, previous):
        shutil.copytree(previous / "base", out / "base")
        losses["base"] = {"reused_from_previous_build": True}
    else:
        _mid_train(out, tok, hard_dir, data, pool, p, seed, losses, progress, save_model)
    base = AutoModelForCausalLM.from_pretrained(out / "base", dtype=torch.float32)
    timings["base"] = time.perf_counter() - t

    for task in tasks.TASKS:
        t = time.perf_counter()
        losses[task] = fine_tune(base, tok, train[task], p, seed, task, progress, out / task, save_model)
        timings[task] = time.perf_counter() - t
    timings["total"] = time.perf_counter() - t0
    return {"timings_s": timings, "train_loss": losses}


def _mid_train(out: Path, tok, hard_dir: Path, data: dict, pool: dict, p: dict, seed: int, losses: dict,
               progress: bool, save_model) -> None:
    """The chat base: the hard base, mid-trained for ``chat_base_steps`` (0: the hard base as is)."""
    base = AutoModelForCausalLM.from_pretrained(hard_dir / "base", dtype=torch.float32)
    if p["chat_base_steps"] > 0:
        rng = random.Random(f"chat-base-{seed}")
        n_docs = p["chat_base_steps"] * p["pretrain_batch"] * 2  # more text than the steps read
        docs = tok(midtrain_documents(rng, tok, data["docs"], pool, p, n_docs)).input_ids
        batches = packed_batches(docs, tok.eos_token_id, p["pretrain_batch"], p["block"], seed + 100)
        curve = train_loop(base, batches, p["chat_base_steps"], p["chat_base_lr"], max(1, p["chat_base_steps"] // 10),
                           p["pretrain_wd"], "mid-train chat base", progress)
        losses["base"] = {"first": curve[0], "last": sum(curve[-20:]) / len(curve[-20:])}
    save_model(base, tok, out / "base")
