"""Merge LoRA adapters with slta: train three peft LoRA adapters on the demo zoo's tasks, merge the
adapter folders directly (no merge_and_unload copies) with slta and with task arithmetic, and print
exact-match accuracy (the same evaluation as `slta eval`).

    OMP_NUM_THREADS=1 python examples/lora_zoo.py --zoo /tmp/zoo_tiny --size tiny --out /tmp/lora_zoo

Needs `pip install peft`. The zoo is built (or reused) with `slta zoo build`'s code; the LoRA
adapters train on the same training examples as the zoo's full fine-tunes.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.demo import generation_budget
from slta.evaluate import evaluate
from slta.merge import run_merge
from slta.zoo import tasks
from slta.zoo.build import build_zoo, make_data
from slta.zoo.train import encode_examples, sft_batches, train_loop

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_adapter(zoo: Path, task: str, train: list[dict], out: Path, args: argparse.Namespace) -> Path:
    if (out / "adapter_config.json").exists():
        return out
    tok = AutoTokenizer.from_pretrained(zoo / "base")
    model = AutoModelForCausalLM.from_pretrained(zoo / "base", dtype=torch.float32)
    torch.manual_seed(args.seed)
    model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules=TARGETS,
                                             use_rslora=args.rslora))
    batches = sft_batches(encode_examples(tok, train), tok.pad_token_id, 16, args.seed + 1)
    train_loop(model, batches, args.steps, args.lr, 20, 0.0, f"LoRA {task}", stop_loss=0.01)
    model.save_pretrained(out)
    return out


def scores(model: Path, zoo: Path, budget: dict[str, int]) -> dict[str, float]:
    files = {t: zoo / "data" / t / "test.jsonl" for t in tasks.TASKS}
    return evaluate(model, files, batch_size=64, max_new_tokens=budget, progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=Path("/tmp/zoo_tiny"))
    ap.add_argument("--size", default="tiny")
    ap.add_argument("--out", type=Path, default=Path("/tmp/lora_zoo"))
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--rslora", action="store_true")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    zoo = build_zoo(args.zoo, size=args.size)
    recipe = json.loads((zoo / "zoo.json").read_text())["recipe"]
    splits = make_data(recipe)["splits"]  # deterministic: the zoo's own training examples
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    adapters = {t: train_adapter(zoo, t, splits[t]["train"], args.out / f"lora-{t}", args) for t in tasks.TASKS}
    print(f"adapters ready in {time.perf_counter() - t0:.0f} s (r={args.rank}, {args.steps} steps max; reused when saved)")

    budget = generation_budget(zoo)
    rows: dict[str, dict[str, float]] = {"base": scores(zoo / "base", zoo, budget)}
    for t in tasks.TASKS:  # each adapter alone, applied by slta (a one-model task arithmetic with weight 1)
        rows[f"LoRA {t} alone"] = merge_and_score(zoo, {t: adapters[t]}, "task_arithmetic", {}, args.out, budget)
    for t in tasks.TASKS:
        rows[f"full fine-tune {t}"] = scores(zoo / t, zoo, budget)
    for method, params in (("task_arithmetic", {"lambda": 1.0}), ("task_arithmetic", {"lambda": 0.6}),
                           ("slta", {"granularity": "layer"}), ("slta", {"granularity": "attn_mlp"})):
        label = f"{method} " + ", ".join(f"{k}={v}" for k, v in params.items())
        rows[label] = merge_and_score(zoo, adapters, method, params, args.out, budget)
    names = list(tasks.TASKS)
    print(f"\nexact match (%) on the test splits, zoo size {args.size}\n")
    print("| model | " + " | ".join(names) + " | mean |\n|---|" + "---|" * (len(names) + 1))
    for label, s in rows.items():
        vals = [100 * s[t] for t in names]
        print(f"| {label} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / len(vals):.1f} |")


def merge_and_score(zoo: Path, adapters: dict[str, Path], method: str, params: dict, out: Path,
                    budget: dict[str, int]) -> dict[str, float]:
    cfg = {"merge_method": method, "base_model": str(zoo / "base"), "parameters": params, "dtype": "float32",
           "models": [{"model": str(a), **({"data": str(zoo / "data" / t / "calib.jsonl")} if method == "slta" else {})}
                      for t, a in adapters.items()]}
    folder = out / "merged"
    run_merge(cfg, folder, overwrite=True, progress=False)
    try:
        return scores(folder, zoo, budget)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
