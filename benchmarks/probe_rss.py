"""Which operation holds a merge's memory: peak RSS per engine stage and per function running.

    PYTHONPATH=. python benchmarks/probe_rss.py CONFIG.yml OUT_DIR

Runs `run_merge` in this process with a thread that samples VmRSS every 5 ms and labels each sample
with the engine's stage (`slta.engine.walk.STAGE`) and the innermost wrapped function running: the closed
form's head solve (`head_stage`), the row-block writes (`write_alpha_tensors`, `write.combine`) and the
writer. Prints the peak per label. Used to find what the 70B-shaped head stage held beyond the dry-run
estimate (benchmarks/RESULTS.md, session 8).
"""

from __future__ import annotations

import functools
import sys
import threading
import time

import slta.engine.walk as engine
import slta.io.checkpoint as checkpoint
import slta.merges.closed_form as closed_form
import slta.merges.write as write
from slta.merge import run_merge

running = ["-"]
peaks: dict[str, float] = {}


def rss_gib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 2**20
    return 0.0


def sample(stop: threading.Event) -> None:
    while not stop.is_set():
        key = f"{engine.STAGE} | {running[0]}"
        peaks[key] = max(peaks.get(key, 0.0), rss_gib())
        time.sleep(0.005)


def labelled(fn, label: str):
    @functools.wraps(fn)
    def inner(*args, **kwargs):
        outer, running[0] = running[0], label
        try:
            return fn(*args, **kwargs)
        finally:
            running[0] = outer
    return inner


def main() -> None:
    config, out = sys.argv[1], sys.argv[2]
    closed_form.head_stage = labelled(closed_form.head_stage, "head_stage")
    closed_form.write_alpha_tensors = labelled(closed_form.write_alpha_tensors, "write_alpha_tensors")
    write.combine = labelled(write.combine, "write.combine")
    checkpoint.ShardedWriter.write = labelled(checkpoint.ShardedWriter.write, "writer.write")
    stop = threading.Event()
    thread = threading.Thread(target=sample, args=(stop,), daemon=True)
    thread.start()
    run_merge(config, out, overwrite=True, progress=False)
    stop.set()
    thread.join()
    print("| stage | running | peak RSS (GiB) |\n|---|---|---|")
    for key, gib in peaks.items():
        stage, fn = key.split(" | ")
        print(f"| {stage} | {fn} | {gib:.2f} |")


if __name__ == "__main__":
    main()
