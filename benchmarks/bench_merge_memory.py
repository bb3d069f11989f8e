"""Peak RSS and wall time of slta merges of ~1 GB-per-checkpoint models (issue #3, must-show 7).

Builds (once, cached under --dir) a float32 Llama base of about 1.1 GB (hidden 1024, 24 layers,
GQA) and T fine-tunes (base + small noise), plus calibration files, then runs each merge as a
child process (`slta merge`) and reads the child's peak RSS from the kernel (wait4 rusage).

    python benchmarks/bench_merge_memory.py [--dir bench_out/mem] [--methods slta_attn_mlp,task_arithmetic]

Prints one table: method, wall time, peak RSS, and peak RSS as a fraction of one checkpoint.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import build_models, make_data, run


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
