"""70B-shaped layers (issue #18): peak RSS per stage and wall per layer of task arithmetic, TIES and the
closed form on a Llama with Llama-2-70B's exact shapes (hidden 8192, intermediate 28672, 64 heads with
8 key/value heads, vocab 32000) but only `--layers` decoder layers, bfloat16, sharded like a hub
checkpoint (model-0000X-of-0000N.safetensors + model.safetensors.index.json), and T=3 fine-tunes
(base + 2% noise), written tensor by tensor (no 70B-shaped model is ever built in torch).

    python benchmarks/bench_70b_layers.py [--layers 2] [--methods task_arithmetic,ties,slta_attn_mlp]
                                          [--threads 1] [--keep]

Each merge runs through the real CLI (`slta merge`) in a child process that samples its own VmRSS
every 20 ms in a thread and tags each sample with the engine's current group (`slta.engine.walk.STAGE`:
setup, embed, layer i, head, finish); the child's peak RSS also comes from the kernel (wait4). Before
each merge `slta merge --dry-run` prints its estimate, shown beside the measured peak. The table
projects the full 80-layer model: wall = setup + embed + head + finish + 80 x (mean wall per layer);
memory = the largest stage peak, which does not depend on the number of layers (compare --layers 2
and 3). Checkpoints and outputs live under benchmarks/_work/ (git-ignored) and are deleted at the end
unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HIDDEN, INTER, HEADS, KV_HEADS, VOCAB, FULL_LAYERS = 8192, 28672, 64, 8, 32000, 80


def shapes_70b(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    from _bench import llama_shapes

    kv = KV_HEADS * (HIDDEN // HEADS)  # 1024: head_dim 128
    out = []
    for name, shape in llama_shapes(HIDDEN, layers, VOCAB, INTER, 1):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            shape = (kv, HIDDEN)
        out.append((name, shape))
    return out


def build(root: Path, layers: int, T: int, shard: int) -> tuple[Path, list[Path]]:
    """Base and T fine-tunes, all four written side by side one tensor at a time (cached: built.json)."""
    import torch
    from transformers import LlamaConfig
    from tiny import make_tokenizer

    from slta.io.checkpoint import ShardedWriter

    folders = [root / "base"] + [root / f"ft{t}" for t in range(T)]
    spec = {"layers": layers, "T": T, "shard": shard, "hidden": HIDDEN}
    marker = root / "built.json"
    if marker.exists() and json.loads(marker.read_text()) == spec:
        return folders[0], folders[1:]
    marker.unlink(missing_ok=True)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTER, num_hidden_layers=layers,
                         num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, max_position_embeddings=4096,
                         rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False, dtype="bfloat16",
                         architectures=["LlamaForCausalLM"], pad_token_id=0, bos_token_id=1, eos_token_id=2)
    shapes = shapes_70b(layers)
    tok = make_tokenizer()
    writers = []
    for f in folders:
        f.mkdir(parents=True, exist_ok=True)
        config.save_pretrained(f)
        tok.save_pretrained(f)
        writers.append(ShardedWriter(f, shapes, torch.bfloat16, shard))
    for name, shape in shapes:
        g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
        base = (1 + 0.1 * torch.randn(shape, generator=g)) if "norm" in name else \
            torch.randn(shape, generator=g).mul_(shape[-1] ** -0.5)
        scale = 0.02 * float(base.abs().mean())
        writers[0].write(name, base)
        for v in range(1, T + 1):
            gv = torch.Generator().manual_seed(zlib.crc32(f"{name}:{v}".encode()))
            writers[v].write(name, base + scale * torch.randn(shape, generator=gv))
        del base
    for w in writers:
        w.finish()
    marker.write_text(json.dumps(spec))
    return folders[0], folders[1:]


# -- the child: one merge through the CLI, with a stage-tagged RSS sampler -----------------------------

def vm_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def child(argv: list[str], report: Path) -> None:
    """Run `slta merge ARGV` in this process, sampling RSS per engine stage; write the stages to `report`."""
    from slta import cli
    from slta.engine import walk as engine

    peaks: dict[str, int] = {}
    first: dict[str, float] = {}
    last: dict[str, float] = {}
    stop = threading.Event()
    t0 = time.perf_counter()

    def sample() -> None:
        while not stop.is_set():
            stage, now = engine.STAGE, time.perf_counter() - t0
            peaks[stage] = max(peaks.get(stage, 0), vm_rss())
            first.setdefault(stage, now)
            last[stage] = now
            stop.wait(0.02)

    engine.STAGE = "setup"
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    code = cli.main(["merge", *argv])
    stop.set()
    th.join()
    stages = {s: {"peak": peaks[s], "start": first[s], "end": last[s]} for s in peaks}
    report.write_text(json.dumps({"exit": code, "wall": time.perf_counter() - t0, "stages": stages}))
    sys.exit(code)


# -- the parent --------------------------------------------------------------------------------------

def method_config(method: str, base: Path, tuned: list[Path], data: list[Path], samples: int) -> dict:
    if method.startswith("slta_"):
        return {"merge_method": "slta", "base_model": str(base), "dtype": "bfloat16",
                "parameters": {"granularity": method[5:], "num_samples": samples},
                "models": [{"model": str(m), "data": str(d)} for m, d in zip(tuned, data)]}
    weight = 1.0 if method == "ties" else round(1.0 / len(tuned), 6)
    params = {"weight": weight, **({"density": 0.2} if method == "ties" else {})}
    return {"merge_method": method, "base_model": str(base), "dtype": "bfloat16", "parameters": params,
            "models": [{"model": str(m)} for m in tuned]}


def dry_run(cfg_path: Path, env: dict[str, str]) -> tuple[float | None, str]:
    """`slta merge --dry-run`: its printed plan and its estimated peak RSS (bytes)."""
    res = subprocess.run([sys.executable, "-m", "slta.cli", "merge", str(cfg_path), "-o", "/nonexistent/out",
                          "--dry-run"], env=env, capture_output=True, text=True)
    est = None
    for line in res.stdout.splitlines():
        if line.startswith("estimated peak RAM"):
            est = float(line.split("(")[1].split()[0])
    return est, res.stdout + res.stderr


def gib(b: float) -> str:
    return f"{b / 2**30:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2, choices=(2, 3, 4))
    ap.add_argument("--T", type=int, default=3)
    ap.add_argument("--methods", default="task_arithmetic,ties,slta_attn_mlp")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of each merge (OMP_NUM_THREADS)")
    ap.add_argument("--samples", type=int, default=30, help="calibration samples per task")
    ap.add_argument("--tokens", type=int, default=128, help="tokens per calibration sample")
    ap.add_argument("--shard", default="2GB", help="input shard size (hub checkpoints use 2-10 GB)")
    ap.add_argument("--dir", default=str(HERE / "_work" / "70b"))
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints (and outputs) afterwards")
    ap.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.child[1:], Path(args.child[0]))
        return
    from _bench import make_data, run
    from slta.io.checkpoint import parse_size

    root = Path(args.dir) / f"L{args.layers}"
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(HERE.parent)}
    print(f"# 70B-shaped layers, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {args.layers} layers, "
          f"T={args.T}, {args.threads} torch thread(s)")
    print("uptime before:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    t0 = time.perf_counter()
    base, tuned = build(root, args.layers, args.T, parse_size(args.shard))
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"checkpoints ready in {time.perf_counter() - t0:.0f}s: {args.T + 1} x {gib(size)} GiB bfloat16, "
          f"shards {sorted(p.name for p in base.glob('*.safetensors'))}")
    data = make_data(root, args.T, args.samples, args.tokens)  # the test tokenizer: one token per character
    rows = []
    for method in args.methods.split(","):
        cfg_path = root / f"{method}.yml"
        import yaml

        cfg_path.write_text(yaml.safe_dump(method_config(method, base, tuned, data, args.samples)))
        est, plan = dry_run(cfg_path, env)
        print(f"\n## {method}: slta merge --dry-run\n{plan.rstrip()}")
        out, rep = root / f"out_{method}", root / f"{method}.stages.json"
        wall, rss, code = run([sys.executable, str(Path(__file__).resolve()), "--child", str(rep), str(cfg_path),
                               "-o", str(out), "--overwrite", "-q"], env=env)
        stages = json.loads(rep.read_text())["stages"] if rep.exists() else {}
        rows.append((method, wall, rss, code, stages, est))
        print(f"{method}: {wall:.0f}s, peak RSS {rss / 1024:.2f} GiB (wait4), exit {code}")
        for s, v in stages.items():
            print(f"  {s}: peak {gib(v['peak'])} GiB, {v['start']:.1f}-{v['end']:.1f}s")
        shutil.rmtree(out, ignore_errors=True)
    print_table(rows, args.layers)
    print("uptime after:", subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip())
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


def print_table(rows: list, layers: int) -> None:
    print(f"\n| method | peak RSS setup (GiB) | embed | layers | head+finish | peak (wait4) | dry-run estimate "
          f"| estimate / peak | wall (s) | wall per layer (s) | projected wall, {FULL_LAYERS} layers (h) | exit |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for method, wall, rss, code, st, est in rows:
        lay = [v for s, v in st.items() if s.startswith("layer ")]
        per_layer = sum(v["end"] - v["start"] for v in lay) / max(1, len(lay))
        fixed = wall - per_layer * len(lay)
        pk = lambda keys: max([st[k]["peak"] for k in keys if k in st] or [0])  # noqa: E731
        lay_peak = max([v["peak"] for v in lay] or [0])
        peak = rss * 2**20
        ratio = f"{est / peak:.2f}" if est else ""
        print(f"| {method} | {gib(pk(['setup']))} | {gib(pk(['embed']))} | {gib(lay_peak)} | "
              f"{gib(pk(['head', 'finish']))} | {gib(peak)} | {gib(est) if est else 'n/a'} | {ratio} | {wall:.0f} | "
              f"{per_layer:.0f} | {(fixed + FULL_LAYERS * per_layer) / 3600:.2f} | {code} |")
    print(f"\nprojection: measured wall minus the {layers} layers' wall (fixed: start-up, embedding, head, "
          f"finish) + {FULL_LAYERS} x the mean layer wall; peak memory does not grow with depth")


if __name__ == "__main__":
    main()
