"""Peak RSS and wall time of slta merges of ~1 GB-per-checkpoint models (issue #3, must-show 7).

Builds (once, cached under --dir) a float32 Llama base of about 1.1 GB (hidden 1024, 24 layers,
GQA) and T fine-tunes (base + small noise), plus calibration files, then runs each merge as a
child process (`slta merge`) and reads the child's peak RSS from the kernel (wait4 rusage).

    python benchmarks/bench_merge_memory.py [--dir bench_out/mem] [--methods slta_attn_mlp,task_arithmetic]

Prints one table: method, wall time, peak RSS, and peak RSS as a fraction of one checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml
import zlib

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def build_models(root: Path, T: int, hidden: int, layers: int, seed: int = 0) -> tuple[Path, list[Path], int]:
    from transformers import LlamaConfig

    from slta.checkpoint import ShardedWriter
    from tiny import make_tokenizer

    config = LlamaConfig(vocab_size=8000, hidden_size=hidden, intermediate_size=int(2.75 * hidden),
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 256,
                         max_position_embeddings=1024, tie_word_embeddings=False, dtype="float32")
    hd, kv = 64, config.num_key_value_heads * 64
    inter = config.intermediate_size
    shapes = [("model.embed_tokens.weight", (config.vocab_size, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden,)), (p + "post_attention_layernorm.weight", (hidden,)),
                   (p + "self_attn.q_proj.weight", (hidden, hidden)), (p + "self_attn.k_proj.weight", (kv, hidden)),
                   (p + "self_attn.v_proj.weight", (kv, hidden)), (p + "self_attn.o_proj.weight", (hidden, hidden)),
                   (p + "mlp.gate_proj.weight", (inter, hidden)), (p + "mlp.up_proj.weight", (inter, hidden)),
                   (p + "mlp.down_proj.weight", (hidden, inter))]
    shapes += [("model.norm.weight", (hidden,)), ("lm_head.weight", (config.vocab_size, hidden))]
    nbytes = sum(torch.Size(s).numel() * 4 for _, s in shapes)
    folders = [root / "base"] + [root / f"ft{t}" for t in range(T)]
    marker = root / "built.json"
    if marker.exists() and json.loads(marker.read_text()) == {"T": T, "hidden": hidden, "layers": layers}:
        return folders[0], folders[1:], nbytes
    tok = make_tokenizer()
    for v, folder in enumerate(folders):
        folder.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(folder)
        tok.save_pretrained(folder)
        w = ShardedWriter(folder, shapes, torch.float32, 10 ** 10)
        for name, shape in shapes:  # one tensor at a time: building needs no more memory than merging
            g = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
            base = (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name else \
                torch.randn(shape, generator=g) / shape[-1] ** 0.5
            if v:
                gv = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}:{v}".encode()))
                base += 0.02 * base.abs().mean() * torch.randn(shape, generator=gv)
            w.write(name, base)
        w.finish()
    marker.write_text(json.dumps({"T": T, "hidden": hidden, "layers": layers}))
    return folders[0], folders[1:], nbytes


def make_data(root: Path, T: int, n: int, chars: int) -> list[Path]:
    rng = random.Random(0)
    paths = []
    for t in range(T):
        p = root / f"task{t}.jsonl"
        with open(p, "w") as f:
            for _ in range(n):
                f.write(json.dumps({"text": "".join(rng.choice(string.ascii_lowercase + " ") for _ in range(chars))}) + "\n")
        paths.append(p)
    return paths


def run(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds, peak RSS (MiB) of the child, exit code."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    code = os.waitstatus_to_exitcode(status)
    if code:
        print(err[-3000:], file=sys.stderr)
    return wall, usage.ru_maxrss / 1024, code


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="bench_out/mem")
    ap.add_argument("--T", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--num-samples", type=int, default=30)
    ap.add_argument("--chars", type=int, default=64, help="characters (= tokens) per calibration sample")
    ap.add_argument("--methods", default="slta_attn_mlp,task_arithmetic",
                    help="comma-separated: slta_<granularity> or any merge_method, e.g. ties,dare_linear,regmean")
    ap.add_argument("--keep", action="store_true", help="keep the merged outputs")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    base, tuned, nbytes = build_models(root, args.T, args.hidden, args.layers)
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f}s: {args.T + 1} x {nbytes / 2**20:.0f} MiB float32 "
          f"(hidden {args.hidden}, {args.layers} layers)")
    data = make_data(root, args.T, args.num_samples, args.chars)
    rows = []
    for method in args.methods.split(","):
        if method.startswith("slta_"):
            cfg = {"merge_method": "slta", "parameters": {"granularity": method[5:], "num_samples": args.num_samples},
                   "models": [{"model": str(m), "data": str(d)} for m, d in zip(tuned, data)]}
        elif method == "regmean":
            cfg = {"merge_method": method, "parameters": {"num_samples": args.num_samples},
                   "models": [{"model": str(m), "data": str(d)} for m, d in zip(tuned, data)]}
        else:
            params = {"weight": 1.0} if method in ("ties", "dare_ties", "breadcrumbs_ties") else {"weight": 1.0 / args.T}
            cfg = {"merge_method": method, "parameters": params, "models": [{"model": str(m)} for m in tuned]}
        cfg.update(base_model=str(base), dtype="float32")
        path = root / f"{method}.yml"
        path.write_text(yaml.safe_dump(cfg))
        out = root / f"out_{method}"
        wall, rss, code = run([sys.executable, "-m", "slta.cli", "merge", str(path), "-o", str(out), "--overwrite", "-q"])
        rows.append((method, wall, rss, code))
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    ck = nbytes / 2**20
    print(f"\n| method | wall (s) | peak RSS (MiB) | peak RSS / checkpoint ({ck:.0f} MiB) | exit |")
    print("|---|---|---|---|---|")
    for method, wall, rss, code in rows:
        print(f"| {method} | {wall:.1f} | {rss:.0f} | {rss / ck:.2f} | {code} |")
    print(f"\nT={args.T}, {args.num_samples} samples x {args.chars} tokens per task, torch threads "
          f"{torch.get_num_threads()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
