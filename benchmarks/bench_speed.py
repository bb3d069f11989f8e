"""Speed and peak memory of slta against mergekit and against the machine's floors (issue #8).

One run = one checkpoint size and dtype. It builds (once, cached under --dir) a random Llama base
and T fine-tunes, writes calibration files, measures this machine's matmul rate, and then runs
every method as a child process, measuring wall time and peak RSS (wait4), side by side:

  io_floor_raw          read the T+1 input files front to back, write one (benchmarks/io_floor.py)
  io_floor_safetensors  the same through safetensors, tensor by tensor (a merge with no arithmetic)
  mergekit_*            mergekit 0.1.5's `mergekit-yaml` (own venv, tests/setup_peer.sh mergekit)
  slta_task_arithmetic, slta_ties, slta_layer, slta_attn_mlp   `python -m slta.cli merge`

The compute floor of the closed form is the FLOPs it cannot avoid (every task's calibration tokens
through the T+1 versions of every layer and of the output head; the base version's pass is the
one that gives the next layer's inputs), each matmul shape divided by this machine's measured
torch.matmul rate at that shape and at the dtype slta computes in (float32: feature *differences*
need it; bfloat16's rate is printed too).

    python benchmarks/bench_speed.py --size 50m --dtype float32
    python benchmarks/bench_speed.py --size 1b --dtype bfloat16 --clean
    python benchmarks/bench_speed.py --scaling          # how the closed form grows (small models)
    python benchmarks/bench_speed.py --size 250m --methods slta_attn_mlp --variants   # issue #16's cost table
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import ROOT, build_models, llama_config, make_data, run

SIZES = {  # name: (hidden, layers, vocab)
    "50m": (512, 8, 32000),
    "250m": (1024, 16, 32000),
    "1b": (2048, 20, 32000),
}
METHODS = ["io_floor_raw", "io_floor_safetensors", "mergekit_task_arithmetic", "mergekit_ties",
           "slta_task_arithmetic", "slta_ties", "slta_layer", "slta_attn_mlp"]
# `--variants`: slta's options beyond the paper and the data-driven baselines (issue #16), each reported
# as a multiple of the paper's closed form (slta_attn_mlp): name -> (merge_method, parameters)
VARIANTS = {
    "slta_attn_mlp_response": ("slta", {"granularity": "attn_mlp", "tokens": "response"}),
    "slta_attn_mlp_merged": ("slta", {"granularity": "attn_mlp", "inputs": "merged"}),
    "slta_attn_mlp_refine2": ("slta", {"granularity": "attn_mlp", "refine": 2}),
    "slta_attn_mlp_merged_refine2": ("slta", {"granularity": "attn_mlp", "inputs": "merged", "refine": 2}),
    "slta_attn_mlp_trajectory": ("slta", {"granularity": "attn_mlp", "inputs": "merged", "targets": "trajectory"}),
    "slta_attn_mlp_autoscale": ("slta", {"granularity": "attn_mlp", "scale": "auto"}),
    "slta_regmean": ("regmean", {}),
    "slta_regmean_plusplus": ("regmean_plusplus", {}),
}
MERGEKIT = ROOT / ".venv-mergekit" / "bin" / "mergekit-yaml"


# -- floors ---------------------------------------------------------------------------------------

def matmul_rate(m: int, k: int, n: int, dtype: torch.dtype, seconds: float = 1.0) -> float:
    """Measured FLOP/s of torch.matmul (m x k) @ (k x n) on this machine, all threads."""
    a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
    a @ b  # warm-up
    reps, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    return 2 * m * k * n * reps / (time.perf_counter() - t0)


def compute_floor(cfg, tokens: list[int], T: int, dtype: torch.dtype) -> tuple[float, float, dict[str, float]]:
    """(seconds, FLOPs, rates) of the closed form's unavoidable forward passes: (T+1) versions of
    every linear of every layer, attention scores (causal half) and the output head, on every token."""
    h, inter, v, L = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    n = sum(tokens)
    M = 2048  # rows per matmul: a task's calibration tokens, batched
    shapes = {  # name: (k, n, FLOPs per token per version)
        "q,o": (h, h, 2 * 2 * h * h * L),
        "k,v": (h, kv, 2 * 2 * h * kv * L),
        "gate,up": (h, inter, 2 * 2 * h * inter * L),
        "down": (inter, h, 2 * inter * h * L),
        "lm_head": (h, v, 2 * h * v),
    }
    rates, secs, flops = {}, 0.0, 0.0
    for name, (k, nn, f) in shapes.items():
        rates[name] = matmul_rate(M, k, nn, dtype)
        secs += (T + 1) * n * f / rates[name]
        flops += (T + 1) * n * f
    # attention scores and weighted sum: 2 matmuls of (s x hd) x (hd x s) per head, causal half
    att = (T + 1) * L * sum(2 * 2 * (s * (s + 1) / 2) * h for s in tokens)
    rates["attention(bmm)"] = rates["q,o"]
    secs += att / rates["q,o"]
    flops += att
    return secs, flops, rates


def calibration_tokens(base: Path, data: list[Path], num_samples: int) -> list[int]:
    """Token counts of the calibration samples exactly as slta selects and tokenizes them."""
    from transformers import AutoTokenizer

    from slta.engine.calibration import load_task

    tok = AutoTokenizer.from_pretrained(base)
    return [len(ids) for d in data for ids in load_task(d, tok, num_samples, 0, 2048).ids]


# -- runs -----------------------------------------------------------------------------------------

def method_config(method: str, base: Path, tuned: list[Path], data: list[Path], num_samples: int,
                  dtype: str) -> dict:
    """The YAML each tool runs. The data-free ones are plain mergekit YAML, identical for both tools."""
    kind = method.split("_", 1)[1]
    if method in VARIANTS:
        name, params = VARIANTS[method]
        return {"merge_method": name, "base_model": str(base), "dtype": dtype,
                "parameters": {**params, "num_samples": num_samples},
                "models": [{"model": str(m), "data": str(d)} for m, d in zip(tuned, data)]}
    if kind in ("layer", "attn_mlp"):
        return {"merge_method": "slta", "base_model": str(base), "dtype": dtype,
                "parameters": {"granularity": kind, "num_samples": num_samples},
                "models": [{"model": str(m), "data": str(d)} for m, d in zip(tuned, data)]}
    params = {"weight": 1.0, "density": 0.2} if kind == "ties" else {"weight": 1.0 / len(tuned)}
    return {"merge_method": kind, "base_model": str(base), "dtype": dtype,
            "models": [{"model": str(m), "parameters": params} for m in tuned]}


def drop_page_cache() -> bool:
    """Empty the kernel's page cache (needs root), so every run reads its inputs from disk, as a merge
    of freshly downloaded models does. False when not allowed: runs are then warm-cache runs."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def run_method(method: str, root: Path, base: Path, tuned: list[Path], data: list[Path], num_samples: int,
               dtype: str, device: str, keep: bool = False) -> dict:
    out = root / f"out_{method}"
    shutil.rmtree(out, ignore_errors=True)
    drop_page_cache()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    if method.startswith("io_floor"):
        out.mkdir(parents=True)
        cmd = [sys.executable, str(Path(__file__).parent / "io_floor.py"), str(out / "model.safetensors"),
               str(base), *map(str, tuned), "--mode", method.rsplit("_", 1)[1]]
    else:
        cfg_path = root / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(method_config(method, base, tuned, data, num_samples, dtype), sort_keys=False))
        if method.startswith("mergekit"):
            env["CUDA_VISIBLE_DEVICES"] = ""
            cmd = [str(MERGEKIT), str(cfg_path), str(out), "--no-cuda", "--quiet"]
        else:
            cmd = [sys.executable, "-m", "slta.cli", "merge", str(cfg_path), "-o", str(out), "-q", "--device", device]
    wall, rss, code = run(cmd, env=env)
    timings = {}
    report = out / "slta_report.json"
    if report.exists():
        timings = json.loads(report.read_text()).get("timings", {})
    if not (keep and code == 0):
        shutil.rmtree(out, ignore_errors=True)
    return {"method": method, "wall": wall, "rss": rss, "code": code, "timings": timings}


def compare_outputs(a: Path, b: Path) -> str:
    """Tensor by tensor, whether two merged checkpoints hold the same bits (names matched across shards)."""
    from safetensors import safe_open

    def index(folder: Path) -> dict[str, Path]:
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, "pt") as h:
                out.update({k: f for k in h.keys()})
        return out

    ia, ib = index(a), index(b)
    if set(ia) != set(ib):
        return f"different tensor names ({len(set(ia) ^ set(ib))} not in both)"
    differ, worst = 0, 0.0
    for name in sorted(ia):
        with safe_open(ia[name], "pt") as ha, safe_open(ib[name], "pt") as hb:
            x, y = ha.get_tensor(name), hb.get_tensor(name)
        if x.dtype != y.dtype or x.shape != y.shape:
            return f"{name}: {x.dtype} {tuple(x.shape)} vs {y.dtype} {tuple(y.shape)}"
        bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[x.dtype.itemsize]
        if not torch.equal(x.flatten().view(bits), y.flatten().view(bits)):
            differ += 1
            worst = max(worst, float((x.double() - y.double()).abs().max()))
    return (f"all {len(ia)} tensors bit-identical" if not differ
            else f"{differ} of {len(ia)} tensors differ (max |difference| {worst:.3g})")


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def fmt_ratio(x: float | None) -> str:
    return "" if x is None else f"{x:.2f}"


def speed(args: argparse.Namespace) -> None:
    hidden, layers, vocab = SIZES[args.size]
    root = Path(args.dir) / f"{args.size}_{args.dtype}"
    root.mkdir(parents=True, exist_ok=True)
    print(f"# slta speed benchmark, {date.today()}, size {args.size} {args.dtype}\n")
    print(f"uptime before: {uptime()}")
    t0 = time.perf_counter()
    base, tuned, nbytes = build_models(root, args.T, hidden, layers, vocab=vocab, dtype=args.dtype)
    cfg = llama_config(hidden, layers, vocab, args.dtype)
    params = nbytes // torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f}s: {args.T + 1} x {nbytes / 2**20:.0f} MiB "
          f"({params / 1e6:.0f}M parameters, hidden {hidden}, {layers} layers, vocab {vocab}, {args.dtype})")
    data = make_data(root, args.T, args.num_samples, args.chars)
    tokens = calibration_tokens(base, data, args.num_samples)
    floor_s, flops, rates = compute_floor(cfg, tokens, args.T, torch.float32)
    floor_bf16, _, rates_bf16 = compute_floor(cfg, tokens, args.T, torch.bfloat16)
    print(f"calibration: T={args.T} x {args.num_samples} samples, {sum(tokens)} tokens in all")
    print("matmul rate (GFLOP/s, 2048 rows):", ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates.items()),
          "| bfloat16:", ", ".join(f"{k} {v / 1e9:.0f}" for k, v in rates_bf16.items()))
    print(f"compute floor of the closed form: {flops / 1e12:.2f} TFLOP -> {floor_s:.1f}s at float32 "
          f"({floor_bf16:.1f}s at bfloat16 rates)")
    cold = drop_page_cache()
    print("page cache: " + ("dropped before every run (cold: inputs come from disk)" if cold else
                            "cannot be dropped here (warm-cache runs, after one warm-up read)"))
    if not cold:  # warm the page cache with every input once, so no method pays for the first read
        run_method("io_floor_raw", root, base, tuned, data, args.num_samples, args.dtype, args.device)
    rows = []
    methods = args.methods.split(",")
    if args.variants:  # the paper's closed form first: the variants are reported as multiples of it
        methods = ([] if "slta_attn_mlp" in methods else ["slta_attn_mlp"]) + methods + list(VARIANTS)
    # data-free methods that both tools run: their outputs are kept until compared, bit for bit
    peers = {m for m in methods if m.startswith("mergekit_") and "slta_" + m.split("_", 1)[1] in methods}
    peers |= {"slta_" + m.split("_", 1)[1] for m in peers}
    for method in methods:
        r = run_method(method, root, base, tuned, data, args.num_samples, args.dtype, args.device, method in peers)
        rows.append(r)
        print(f"  {method}: {r['wall']:.1f}s, {r['rss']:.0f} MiB, exit {r['code']}", flush=True)
    for m in sorted(p for p in peers if p.startswith("mergekit_")):
        ours, theirs = root / f"out_slta_{m.split('_', 1)[1]}", root / f"out_{m}"
        if ours.exists() and theirs.exists():
            print(f"  parity, slta_{m.split('_', 1)[1]} vs {m}: {compare_outputs(ours, theirs)}", flush=True)
        shutil.rmtree(ours, ignore_errors=True)
        shutil.rmtree(theirs, ignore_errors=True)
    by = {r["method"]: r for r in rows}
    floor = by.get("io_floor_raw")
    mk = by.get("mergekit_task_arithmetic")
    cf = by.get("slta_attn_mlp")
    print("\n| method | wall (s) | peak RSS (MiB) | wall / I/O floor | wall / (I/O + compute floor) "
          "| wall / mergekit TA | RSS / mergekit TA | wall / slta_attn_mlp | RSS / slta_attn_mlp | exit |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        closed = r["method"] in ("slta_layer", "slta_attn_mlp")
        print(f"| {r['method']} | {r['wall']:.1f} | {r['rss']:.0f} "
              f"| {fmt_ratio(r['wall'] / floor['wall'] if floor else None)} "
              f"| {fmt_ratio(r['wall'] / (floor['wall'] + floor_s) if floor and closed else None)} "
              f"| {fmt_ratio(r['wall'] / mk['wall'] if mk else None)} "
              f"| {fmt_ratio(r['rss'] / mk['rss'] if mk else None)} "
              f"| {fmt_ratio(r['wall'] / cf['wall'] if cf else None)} "
              f"| {fmt_ratio(r['rss'] / cf['rss'] if cf else None)} | {r['code']} |")
    print(f"\nI/O floor = io_floor_raw ({floor['wall']:.1f}s)" if floor else "", end="")
    print(f"; compute floor {floor_s:.1f}s; one checkpoint {nbytes / 2**20:.0f} MiB")
    for r in rows:
        if r["timings"]:
            print(f"{r['method']} internal timings (s): "
                  + ", ".join(f"{k} {v:.1f}" for k, v in r["timings"].items()))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} CPUs, device {args.device}")
    print(f"uptime after: {uptime()}")
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)


def scaling(args: argparse.Namespace) -> None:
    """The closed form (attn_mlp) on small models, varying one factor at a time from a reference."""
    ref = {"layers": 4, "hidden": 256, "T": 3, "samples": 30}
    grid = [("reference", None)] + [("layers", v) for v in (8, 16)] + [("hidden", v) for v in (512, 1024)] \
        + [("T", v) for v in (2, 5)] + [("samples", v) for v in (60, 120)]
    root = Path(args.dir) / "scaling"
    print(f"# closed-form scaling, {date.today()}, attn_mlp, {args.chars} tokens per sample, float32, vocab 8000, "
          f"torch {torch.get_num_threads()} threads\n")
    print(f"uptime before: {uptime()}")
    print("| varied | layers | hidden | T | samples/task | wall (s) | features+solve (s) | peak RSS (MiB) | compute floor (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for what, value in grid:
        p = dict(ref)
        if what != "reference":
            p[what] = value
        d = root / f"L{p['layers']}_H{p['hidden']}"
        base, tuned, _ = build_models(d, 5, p["hidden"], p["layers"], vocab=8000)
        tuned = tuned[:p["T"]]
        data = make_data(d, p["T"], p["samples"], args.chars)
        r = run_method("slta_attn_mlp", d, base, tuned, data, p["samples"], "float32", args.device)
        cfg = llama_config(p["hidden"], p["layers"], 8000, "float32")
        floor_s, _, _ = compute_floor(cfg, calibration_tokens(base, data, p["samples"]), p["T"], torch.float32)
        print(f"| {what} | {p['layers']} | {p['hidden']} | {p['T']} | {p['samples']} | {r['wall']:.1f} "
              f"| {r['timings'].get('features_and_solve', float('nan')):.1f} | {r['rss']:.0f} | {floor_s:.2f} |",
              flush=True)
    print(f"\nuptime after: {uptime()}")
    if args.clean:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=list(SIZES), default="50m")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--dir", default="bench_out/speed")
    ap.add_argument("--T", type=int, default=3)
    ap.add_argument("--num-samples", type=int, default=30)
    ap.add_argument("--chars", type=int, default=64, help="characters (= tokens) per calibration sample")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--device", default="cpu", help="slta's --device (cpu | cuda)")
    ap.add_argument("--scaling", action="store_true", help="print the closed form's scaling table instead")
    ap.add_argument("--variants", action="store_true",
                    help="also run slta's options beyond the paper, RegMean and RegMean++ (VARIANTS), "
                         "reported as multiples of slta_attn_mlp")
    ap.add_argument("--clean", action="store_true", help="delete the checkpoints at the end")
    args = ap.parse_args()
    if any(m.startswith("mergekit") for m in args.methods.split(",")) and not MERGEKIT.exists() and not args.scaling:
        subprocess.run(["bash", str(ROOT / "tests" / "setup_peer.sh"), "mergekit"], check=True)
    scaling(args) if args.scaling else speed(args)


if __name__ == "__main__":
    main()
