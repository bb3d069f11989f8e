"""Peak RSS and wall time of `slta analyze` on ~1 GB-per-checkpoint models (issue #6, must-show 4).

Reuses bench_merge_memory.py's checkpoints (a float32 Llama base of about 1.1 GB, hidden 1024,
24 layers, GQA, and T fine-tunes; cached under --dir, built once: if another process is building
them, this waits for its built.json) and calibration files, then runs the analysis as a child
process and reads the child's peak RSS from the kernel (wait4 rusage).

    python benchmarks/bench_analyze_memory.py [--dir bench_out/mem] [--num-samples 4] [--chars 64]

Every level (model, layer, attn, mlp, head), N = 10 interpolation steps, and the 2- and 3-model
merge grids: 1 + T*N + 3*25 + 27 = 133 weight versions per layer for T = 3. The claim: peak RSS
stays below one checkpoint's size, because one layer's T+1 versions are loaded at a time and every
interpolated or merged version is built from them on the fly.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))

from bench_merge_memory import build_models, make_data, run

CHILD = """
import sys, torch
from slta.analysis.linearity import run_analyze
a = sys.argv[1:]
if int(a[6]) > 0:
    torch.set_num_threads(int(a[6]))
run_analyze(a[0], a[1], levels=a[2].split(','), num_samples=int(a[3]), stream_memory=a[4], merging=a[5] == '1',
            overwrite=True, progress=False)
"""


def wait_for_models(root: Path, T: int, hidden: int, layers: int, timeout: float = 3600) -> None:
    """Another process may be building the cache right now: don't build it concurrently."""
    marker = root / "built.json"
    want = {"T": T, "hidden": hidden, "layers": layers}
    if (root / "base").exists() and not marker.exists():
        print(f"waiting for {marker} (checkpoints being built by another process)...", flush=True)
        t0 = time.time()
        while not marker.exists() and time.time() - t0 < timeout:
            time.sleep(10)
    if marker.exists() and json.loads(marker.read_text()) != want:
        raise SystemExit(f"{marker} holds {marker.read_text()}, not {want}: use another --dir")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="bench_out/mem")
    ap.add_argument("--T", type=int, default=3)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--num-samples", type=int, default=4, help="calibration samples per task")
    ap.add_argument("--chars", type=int, default=64, help="characters (= tokens) per calibration sample")
    ap.add_argument("--levels", default="model,layer,attn,mlp,head")
    ap.add_argument("--stream-memory", default="1GB", help="slta analyze's budget for model-level streams")
    ap.add_argument("--no-merging", action="store_true")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch threads in the child (default: torch's; 1 is much faster on a busy shared CPU)")
    args = ap.parse_args()
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    wait_for_models(root, args.T, args.hidden, args.layers)
    base, tuned, nbytes = build_models(root, args.T, args.hidden, args.layers)
    data_dir = root / f"analyze_data_{args.num_samples}x{args.chars}"
    data_dir.mkdir(exist_ok=True)
    data = make_data(data_dir, args.T, args.num_samples, args.chars)
    cfg = {"merge_method": "slta", "base_model": str(base), "dtype": "float32",
           "parameters": {"num_samples": args.num_samples},
           "models": [{"model": str(m), "data": str(d)} for m, d in zip(tuned, data)]}
    path = data_dir / "analyze.json"  # YAML is a superset of JSON
    path.write_text(json.dumps(cfg))
    out = root / "out_analyze"
    wall, rss, code = run([sys.executable, "-c", CHILD, str(path), str(out), args.levels, str(args.num_samples),
                           args.stream_memory, "0" if args.no_merging else "1", str(args.threads)])
    ck = nbytes / 2**20
    timings = {}
    if code == 0:
        res = json.loads((out / "linearity.json").read_text())
        timings = res["timings"]
        print("\nNon-linearity Score per level (mean over models):")
        for level, per_model in res["summary"]["score"].items():
            vals = [e["mean"] for e in per_model if e["mean"] is not None]
            print(f"  {level:6s} {sum(vals) / len(vals):.4g}")
    print(f"\n| run | wall (s) | peak RSS (MiB) | peak RSS / checkpoint ({ck:.0f} MiB) | exit |")
    print("|---|---|---|---|---|")
    print(f"| analyze {args.levels}{' no-merging' if args.no_merging else ''} | {wall:.1f} | {rss:.0f} | "
          f"{rss / ck:.2f} | {code} |")
    if timings:
        print("\ntimings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in timings.items()))
    print(f"T={args.T}, {args.num_samples} samples x {args.chars} tokens per task, stream memory "
          f"{args.stream_memory}, torch threads {args.threads or torch.get_num_threads()}, {os.cpu_count()} CPUs")


if __name__ == "__main__":
    main()
