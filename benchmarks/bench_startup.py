"""Start-up time of the `slta` command line: what a user waits for before any tensor work (issue #18).

    PYTHONPATH=. python benchmarks/bench_startup.py [--repeat 5]

Each row is a fresh process, timed from spawn to exit (median and range over --repeat runs, after one
warm-up run that fills the page cache): `--help` of the command and of `merge`, `import slta.merge`
alone, and on a tiny Llama family (tests/tiny.py: a few thousand parameters, so the tensor work is
negligible) a `--dry-run` and real merges, where the wall is start-up, input checks, tokenizer
handling and writing the output folder. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))


def timed(cmd: list[str], repeat: int) -> tuple[float, float, float]:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    walls = []
    for i in range(repeat + 1):
        t = time.perf_counter()
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-2000:]}")
        if i:  # the first run warms the page cache
            walls.append(time.perf_counter() - t)
    return statistics.median(walls), min(walls), max(walls)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    from tiny import make_data, make_family, write_config

    py, cli = sys.executable, [sys.executable, "-m", "slta.cli"]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base, tuned = make_family(root, "llama", T=3)
        data = make_data(root, T=3, n=30)
        ta = write_config(root / "ta.yml", base, tuned, None, method="task_arithmetic", weight=0.5)
        cf = write_config(root / "cf.yml", base, tuned, data, granularity="attn_mlp", num_samples=30)
        rows = [
            ("python -c pass (the interpreter alone)", [py, "-c", "pass"]),
            ("python -c 'import torch'", [py, "-c", "import torch"]),
            ("python -c 'import slta.merge'", [py, "-c", "import slta.merge"]),
            ("slta --help", [*cli, "--help"]),
            ("slta merge --help", [*cli, "merge", "--help"]),
            ("slta merge --dry-run (tiny, closed form)", [*cli, "merge", str(cf), "-o", str(root / "d"), "--dry-run"]),
            ("slta merge task_arithmetic (tiny)", [*cli, "merge", str(ta), "-o", str(root / "o1"), "-q", "--overwrite"]),
            ("slta merge slta attn_mlp (tiny, 3 x 30 samples)",
             [*cli, "merge", str(cf), "-o", str(root / "o2"), "-q", "--overwrite"]),
        ]
        print(f"# slta start-up, {date.today()}, median (min-max) of {args.repeat} fresh processes\n")
        print(f"uptime: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}\n")
        print("| command | wall (s) |")
        print("|---|---|")
        for label, cmd in rows:
            med, lo, hi = timed(cmd, args.repeat)
            print(f"| {label} | {med:.2f} ({lo:.2f}-{hi:.2f}) |", flush=True)


if __name__ == "__main__":
    main()
