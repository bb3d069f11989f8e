"""Where the closed form's time goes: one `slta merge` run in-process under cProfile, summarised.

    python benchmarks/profile_closed_form.py CONFIG.yml [--out DIR] [--top 25]

CONFIG is any slta config (bench_speed.py leaves slta_attn_mlp.yml beside its checkpoints).
Prints the wall time and the cumulative seconds of the driver's stages (the T+1 versions' forward
passes, the Gram accumulation, waiting for the reader thread, merging and writing, the head and
embedding stages, the solves), then cProfile's top functions by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import shutil
import time

import torch

# (label, file suffix, function name): cumulative times of these calls
STAGES = [
    ("whole merge (run_merge)", "slta/merge.py", "run_merge"),
    ("open and check inputs", "slta/io/inputs.py", "open_inputs"),
    ("calibration (tokenize)", "slta/engine/calibration.py", "calibration"),
    ("embedding stage (rows, Grams)", "slta/engine/walk.py", "embed_stage"),
    ("layer features (forwards + Grams)", "slta/engine/features.py", "layer_features"),
    ("  attention blocks, T+1 versions", "slta/engine/features.py", "attn_out"),
    ("  MLP blocks, T+1 versions", "slta/engine/features.py", "mlp_out"),
    ("  whole layers, T+1 versions", "slta/engine/features.py", "layer_out"),
    ("  Gram accumulation (float64)", "slta/engine/features.py", "add"),
    ("output head stage (logits, Grams)", "slta/merges/closed_form.py", "head_stage"),
    ("solve α (all modules)", "slta/solve.py", "solve_module"),
    ("merge + hand to writer", "slta/merges/write.py", "write_alpha_tensors"),
    ("waiting for the reader thread", "concurrent/futures/_base.py", "result"),
    ("finish folder (report, card)", "slta/io/output.py", "finish_folder"),
    ("statistics file", "slta/merges/stats.py", "write_stats"),
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--out", default="bench_out/profile_out")
    ap.add_argument("--top", type=int, default=25)
    a = ap.parse_args()
    from slta.merge import run_merge

    prof = cProfile.Profile()
    t0 = time.perf_counter()
    prof.runcall(run_merge, a.config, a.out, overwrite=True, progress=False)
    wall = time.perf_counter() - t0
    shutil.rmtree(a.out, ignore_errors=True)
    stats = pstats.Stats(prof)
    cum: dict[str, float] = {}
    for (file, _, func), (_, _, _, ct, _) in stats.stats.items():  # type: ignore[attr-defined]
        for label, suffix, name in STAGES:
            if func == name and file.endswith(suffix):
                cum[label] = cum.get(label, 0.0) + ct
    print(f"wall {wall:.1f}s (under cProfile), torch {torch.get_num_threads()} threads\n")
    print("| stage | cumulative s | % of wall |")
    print("|---|---|---|")
    for label, _, _ in STAGES:
        if label in cum:
            print(f"| {label} | {cum[label]:.1f} | {100 * cum[label] / wall:.0f} |")
    buf = io.StringIO()
    stats.stream = buf  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(a.top)
    print("\n" + "\n".join(line for line in buf.getvalue().splitlines() if line.strip()))


if __name__ == "__main__":
    main()
