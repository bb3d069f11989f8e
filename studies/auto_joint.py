"""`scale: auto_joint` beside `scale: auto_task` on built zoos (issue #28): the training-free rows only.

auto_task gives each task the smallest factor within `scale_margin` of its fine-tune's calibration loss,
each measured with the other tasks' α as solved; on SmolLM2 those choices did not combine (math lost in the
triple on every zoo). auto_joint starts from the same choice, checks every task's loss under all factors
together and raises the tasks that fell out of the margin (slta.merges.autoscale.joint_factors). Same
margin (0.05, fixed on the synthetic kinds), no new tuning. Each merge and its evaluations go through the
demo's cache (slta.demo.strength.auto_task), so `slta demo --strength auto_joint` with the same --out
reads them back. Prints one line per zoo and combination: the one-at-a-time and joint factors, each check,
validation and test per task, the merge's timings.

    python studies/auto_joint.py ZOO [ZOO ...] --out OUT [--combos math+code+translate,math+code] [--level attn_mlp]

ZOO: zoo folders (`slta zoo build`); OUT/ZOO_NAME holds each zoo's demo cache.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np


def main() -> None:
    import torch

    from slta.demo import Demo
    from slta.demo.strength import auto_config, auto_task

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoos", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--combos", default="math+code+translate,math+code,math+translate,code+translate")
    p.add_argument("--level", default="attn_mlp")
    p.add_argument("--mode", default="auto_joint", choices=("auto_task", "auto_joint"))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    rows = []
    for zoo in map(Path, a.zoos):
        recipe = json.loads((zoo / "zoo.json").read_text())["recipe"]
        demo = Demo(zoo, Path(a.out) / zoo.name, recipe["size"], "cpu", 1, False, {"slta"})
        for name in a.combos.split(","):
            combo = tuple(name.split("+"))
            t = time.perf_counter()
            run = auto_task(demo, a.level, combo, a.mode)
            search = run["scale_search"]
            row = {"zoo": zoo.name, "combo": name, "level": a.level, "mode": a.mode, "factors": run["scale"],
                   "one_at_a_time": search.get("one_at_a_time", search["chosen"]), "joint": search.get("joint"),
                   "fine_tune_loss": search["fine_tune_loss"],
                   "timings": json.loads((demo.cache / f"search-{auto_config(demo, a.level, combo, a.mode)[1]}.json")
                                         .read_text())["timings"],
                   "test": run["test"], "val": run["val"], "seconds": time.perf_counter() - t}
            rows.append(row)
            checks = "; ".join(f"{c['factors']} loss {c['loss']} over {c['over']}"
                               for c in (row["joint"] or {}).get("checks", []))
            print(f"{zoo.name} {name} {a.level} {a.mode}: one-at-a-time {row['one_at_a_time']} -> {row['factors']}"
                  f" | checks: {checks} | own {row['fine_tune_loss']}"
                  f" | val {100 * np.mean(list(run['val'].values())):.1f} "
                  f"{ {k: round(100 * v, 1) for k, v in run['val'].items()} }"
                  f" | test {100 * np.mean(list(run['test'].values())):.1f} "
                  f"{ {k: round(100 * v, 1) for k, v in run['test'].items()} }"
                  f" | {row['seconds']:.0f} s (merge timings {row['timings']})", flush=True)
    out = Path(a.out) / f"{a.mode}-{int(time.time())}.json"
    out.write_text(json.dumps(rows, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
