"""Exact-match evaluation of a causal LM on JSONL task files.

A task file has one JSON object per line with a ``prompt`` and an ``answer``. The model
continues each prompt greedily (left-padded batches, ``model.generate``); the completion is
reduced to its final answer and compared with the reference after stripping whitespace:

* if the completion contains ``####`` (GSM8K convention for chain-of-thought answers),
  the final answer is what follows the last ``####``;
* only the first line counts (generation also stops at a newline by default), so a model
  that rambles on after its answer is judged on its answer.

Works on any Hugging Face causal LM folder that has a tokenizer, or on a loaded model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

import slta
from slta.engine.compat import cache_kwarg

SPLIT_NAMES = ("test", "val", "validation", "calib", "train", "dev")


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSONL task file (blank lines skipped); a bad line is a ValueError naming path:line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or "prompt" not in row:
                raise ValueError(f"{path}:{i}: expected an object with a 'prompt' field")
            rows.append(row)
    return rows


def final_answer(completion: str) -> str:
    """The part of a completion that is compared with the reference answer."""
    if "####" in completion:
        completion = completion.rsplit("####", 1)[1]
    return completion.strip().split("\n", 1)[0].strip()


def exact_match(completions: list[str], answers: list[str]) -> float:
    """Fraction of completions whose final answer equals the (stripped) reference."""
    if not answers:
        return 0.0
    hits = sum(final_answer(c) == str(a).strip() for c, a in zip(completions, answers, strict=True))
    return hits / len(answers)


def task_name(path: Path) -> str:
    """data/math/test.jsonl -> "math"; foo.jsonl -> "foo"."""
    return path.parent.name if path.stem in SPLIT_NAMES else path.stem


def resolve_task_files(specs: list[str | Path] | str | Path, split: str = "test") -> dict[str, Path]:
    """Task files from a list of JSONL files and/or directories.

    A directory holding ``{split}.jsonl`` is one task (named after the directory); a directory
    holding ``*/{split}.jsonl`` (e.g. a zoo's ``data/``) gives one task per subdirectory.
    """
    if isinstance(specs, (str, Path)):
        specs = [specs]
    files: dict[str, Path] = {}
    for spec in specs:
        p = Path(spec)
        if p.is_file():
            found = [p]
        elif (p / f"{split}.jsonl").is_file():
            found = [p / f"{split}.jsonl"]
        elif p.is_dir():
            found = sorted(p.glob(f"*/{split}.jsonl"))
            if not found:
                raise FileNotFoundError(f"{p}: no {split}.jsonl in it or in its subdirectories")
        else:
            raise FileNotFoundError(f"task file or directory not found: {p}")
        for f in found:
            name = task_name(f)
            if name in files and files[name] != f:
                raise ValueError(f"two task files named {name!r}: {files[name]} and {f}")
            files[name] = f
    return files


def local_model_folder(model: str | Path) -> Path:
    """The local folder of ``model``, checked before transformers would retry the hub for ~50 s: a
    folder with config.json, or a hub id (org/name) already in the Hugging Face cache."""
    p = Path(model).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise FileNotFoundError(f"model folder {p} has no config.json: not a Hugging Face model folder")
        return p
    if p.exists():
        raise ValueError(f"model {p} is a file; give the Hugging Face model folder that holds it")
    from slta.hub import parse_hub_id  # the one definition of a hub id, org/name[@revision]

    parsed = parse_hub_id(str(model))
    if parsed:
        from huggingface_hub import try_to_load_from_cache

        cached = try_to_load_from_cache(parsed[0], "config.json", revision=parsed[1])
        if isinstance(cached, str):
            return Path(cached).parent
        raise FileNotFoundError(f"model {model}: no such local folder, and as a Hugging Face hub id it is not in "
                                f"the local cache; check the path, or download it first (hf download {model})")
    raise FileNotFoundError(f"model folder {model} does not exist")


def load_model(model_dir: str | Path, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A model folder, or a hub id org/name[@revision] (see slta.hub), with its tokenizer."""
    from slta.hub import resolve_model_path

    model_dir = local_model_folder(resolve_model_path(model_dir))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    return model, tok


# Below this many shared tokens, prefilling the prefix once saves less than setting it up costs.
MIN_SHARED_PREFIX = 8


def shared_prefix_length(ids: list[list[int]]) -> int:
    """How many leading tokens every sequence shares, leaving each at least one of its own (the
    first generation step needs a token of the prompt's own to start from)."""
    limit, first = min(len(x) for x in ids) - 1, ids[0]
    n = 0
    while n < limit and all(x[n] == first[n] for x in ids):
        n += 1
    return n


def _generate_batch(model: PreTrainedModel, tok: PreTrainedTokenizerBase, batch: list[str], kwargs: dict,
                    share_prefix: bool) -> list[str]:
    """Greedy completions of one batch. Chat prompts share a long head (the template's system turn):
    prefilling it once and copying its KV cache to every row skips that part of the prefill, which is
    most of an evaluation's time (prompts of ~60 tokens, answers of ~15). The rows are laid out as
    [shared prefix | left padding | own tokens]; the mask hides the padding and positions follow it,
    so each row sees exactly its own prompt."""
    device = next(model.parameters()).device
    ids = tok(batch).input_ids  # the same tokens as the padded call below
    shareable = share_prefix and len(ids) > 1 and not model.config.is_encoder_decoder
    n_shared = shared_prefix_length(ids) if shareable else 0
    cache = None
    if n_shared >= MIN_SHARED_PREFIX:
        prefix = torch.tensor([ids[0][:n_shared]], device=device)
        cache = getattr(model(input_ids=prefix, use_cache=True), cache_kwarg(model))
        if not hasattr(cache, "batch_repeat_interleave"):  # a cache type that cannot be copied per row
            cache = None
    if cache is None:
        enc = tok(batch, return_tensors="pt", padding=True).to(device)
        gen = model.generate(**enc, **kwargs)
        return tok.batch_decode(gen[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    cache.batch_repeat_interleave(len(ids))
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    input_ids[:, :n_shared], mask[:, :n_shared] = prefix.cpu(), 1
    for row, x in enumerate(ids):
        own = x[n_shared:]
        input_ids[row, width - len(own) :], mask[row, width - len(own) :] = torch.tensor(own), 1
    gen = model.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device),
                         **{cache_kwarg(model): cache}, **kwargs)
    return tok.batch_decode(gen[:, width:], skip_special_tokens=True)


@torch.no_grad()
def generate(
    model: PreTrainedModel,
    tok: PreTrainedTokenizerBase,
    prompts: list[str],
    batch_size: int = 32,
    max_new_tokens: int = 64,
    stop_at_newline: bool = True,
    progress: bool = True,
    desc: str = "generate",
    share_prefix: bool = True,
) -> list[str]:
    """Greedy completions of ``prompts`` (decoded, special tokens removed). ``share_prefix``: prefill
    a batch's common leading tokens once (the same completions, faster; see _generate_batch)."""
    tok.padding_side = "left"  # decoder-only: the prompts must end where generation starts
    if tok.pad_token is None:  # many base models ship without one; the mask hides it anyway
        tok.pad_token = tok.eos_token
    kwargs = dict(max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    if stop_at_newline:
        kwargs.update(stop_strings=["\n"], tokenizer=tok)
    # Sort by length so batches hold similar lengths (less padding), then restore the order.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, leave=False):
        idx = order[start : start + batch_size]
        for i, text in zip(idx, _generate_batch(model, tok, [prompts[i] for i in idx], kwargs, share_prefix)):
            out[i] = text
    return out


def evaluate(
    model: str | Path | PreTrainedModel,
    task_files: dict[str, Path] | list[str | Path] | str | Path,
    batch_size: int = 32,
    max_new_tokens: int | dict[str, int] = 64,
    device: str = "cpu",
    limit: int | None = None,
    progress: bool = True,
    tokenizer: PreTrainedTokenizerBase | None = None,
    split: str = "test",
    return_predictions: bool = False,
) -> dict[str, float] | tuple[dict[str, float], dict[str, list[dict]]]:
    """Exact-match accuracy (0..1) per task.

    ``model`` is a model folder or a loaded model (then ``tokenizer`` is needed, or is loaded
    from ``model.name_or_path``). ``task_files`` maps task name to JSONL, or is a list of
    files/directories resolved with :func:`resolve_task_files`. ``limit`` keeps the first N
    examples per task. ``max_new_tokens`` may be given per task (a dict). With
    ``return_predictions`` also returns the per-example records.
    """
    if isinstance(model, (str, Path)):
        model, tok = load_model(model, device)
    else:
        tok = tokenizer or AutoTokenizer.from_pretrained(model.name_or_path)
        model.eval()
    if not isinstance(task_files, dict):
        task_files = resolve_task_files(task_files, split)
    scores: dict[str, float] = {}
    records: dict[str, list[dict]] = {}
    for name, path in task_files.items():
        rows = read_jsonl(path)[:limit]
        missing = [i for i, r in enumerate(rows) if "answer" not in r]
        if missing:
            raise ValueError(f"{path}: line {missing[0] + 1} has no 'answer' field")
        budget = max_new_tokens[name] if isinstance(max_new_tokens, dict) else max_new_tokens
        completions = generate(model, tok, [r["prompt"] for r in rows], batch_size, budget, progress=progress, desc=name)
        scores[name] = exact_match(completions, [r["answer"] for r in rows])
        records[name] = [
            {"prompt": r["prompt"], "answer": r["answer"], "completion": c, "correct": final_answer(c) == str(r["answer"]).strip()}
            for r, c in zip(rows, completions)
        ]
    return (scores, records) if return_predictions else scores


def format_table(results: dict[str, dict[str, float]]) -> str:
    """Rows = models, columns = tasks + average, accuracies in percent."""
    tasks = sorted({t for r in results.values() for t in r})
    width = max([len(m) for m in results] + [5])
    lines = [f"{'model':<{width}}  " + "  ".join(f"{t:>9}" for t in tasks) + f"  {'avg':>7}"]
    for m, r in results.items():
        cells = "  ".join(f"{100 * r[t]:9.1f}" if t in r else f"{'-':>9}" for t in tasks)
        avg = 100 * sum(r.values()) / max(1, len(r))
        lines.append(f"{m:<{width}}  {cells}  {avg:7.1f}")
    return "\n".join(lines)


def eval_main(
    model: str,
    tasks: list[str],
    split: str = "test",
    out: str | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    max_new_tokens: int = 64,
    limit: int | None = None,
    progress: bool = True,
) -> dict[str, float]:
    """`slta eval MODEL --tasks ...`: prints a table, writes JSON (scores + predictions) to ``out``."""
    from slta.config import check_device

    device = check_device(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    local_model_folder(model)  # a mistyped path fails now, not after the task files and a hub retry
    files = resolve_task_files(tasks, split)
    scores, records = evaluate(model, files, batch_size, max_new_tokens, device, limit, progress, return_predictions=True)
    print(format_table({str(model): scores}))
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        payload = {
            "model": str(model),
            "split": split,
            "task_files": {k: str(v) for k, v in files.items()},
            "accuracy": scores,
            "average": sum(scores.values()) / max(1, len(scores)),
            "predictions": records,
        }
        Path(out).write_text(json.dumps(payload, indent=2) + "\n")
    return scores


slta._as_command(__name__)  # `slta.evaluate(...)` runs evaluate (see slta/__init__.py)
