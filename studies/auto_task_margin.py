"""Fix `scale_margin` of `scale: auto_task` once, on the synthetic kinds (issue #28), never on the real one.

auto_task gives task t the smallest factor c_t (slta.merges.autoscale.TASK_FACTORS) whose merged loss on
t's calibration responses is within the margin of the fine-tune's own loss there. The search (every
candidate's loss) does not depend on the margin, so it runs once per zoo and level (one `scale: auto_task`
merge, cached like every demo merge); each margin then only picks factors from it, and the triple's
statistics are re-solved with those factors and scored on the validation split. The margin with the
highest mean validation accuracy over every zoo and level wins (a tie keeps the smaller margin, the
lighter touch). Test scores are printed for the record; they choose nothing.

Two fallbacks for a task whose loss comes within the margin at no factor compete too: `lowest` (the
factor of the lowest loss, the first rule) and `one` (keep the closed form's α: no factor is shown to bring
the task back, and each task's lowest loss is measured with the others at 1, so the per-task maxima need
not combine well).

    python studies/auto_task_margin.py ZOO [ZOO ...] --out OUT

ZOO: synthetic zoo folders (slta zoo build / slta demo); OUT/ZOO_NAME holds each zoo's demo cache.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

MARGINS = (0.01, 0.02, 0.05, 0.1, 0.2)  # nats per response token


def rule(own: float, loss: list[float], factors: tuple[float, ...], margin: float, fallback: str) -> float:
    """The smallest factor whose loss is within `margin` of the fine-tune's own; else, by `fallback`, the
    factor of the lowest loss or 1 (slta.merges.autoscale.task_factor is the rule this study chose)."""
    within = [f for f, v in zip(factors, loss) if v <= own + margin]
    if within:
        return min(within)
    return factors[int(np.argmin(loss))] if fallback == "lowest" else 1.0


def main() -> None:
    import torch

    from slta.demo import Demo
    from slta.demo.strength import auto_task, solved_scores, triple_stats
    from slta.demo.table import COMBOS
    from slta.demo.variants import VARIANT_LEVELS

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoos", nargs="+")
    p.add_argument("--out", required=True)
    p.add_argument("--margins", default=",".join(map(str, MARGINS)))
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    margins = [float(m) for m in a.margins.split(",")]
    triple = COMBOS[-1]
    rows = []
    for zoo in map(Path, a.zoos):
        recipe = json.loads((zoo / "zoo.json").read_text())["recipe"]
        demo = Demo(zoo, Path(a.out) / zoo.name, recipe["size"], "cpu", 1, False, {"slta"}, triple_only=True)
        for level in VARIANT_LEVELS:
            search = auto_task(demo, level, triple)["scale_search"]
            stats = triple_stats(demo, level)
            facs = tuple(search["factors"])
            cands = {"paper": [1.0] * len(triple)}
            for m in margins:
                pairs = list(zip(search["fine_tune_loss"], search["loss"]))
                cands[f"{m}/lowest"] = [rule(own, loss, facs, m, "lowest") for own, loss in pairs]
                cands[f"{m}/one"] = [rule(own, loss, facs, m, "one") for own, loss in pairs]
            for name, factors in cands.items():
                val = solved_scores(demo, stats, triple, factors, "val")
                test = solved_scores(demo, stats, triple, factors, "test")
                rows.append({"zoo": zoo.name, "kind": recipe.get("kind", "hard"), "level": level, "margin": name,
                             "factors": factors, "val": 100 * float(np.mean(list(val.values()))),
                             "test": 100 * float(np.mean(list(test.values()))), "val_per_task": val, "test_per_task": test})
                print(f"{zoo.name:16s} {level:9s} margin {name!s:11s} factors {factors} "
                      f"val {rows[-1]['val']:.1f} test {rows[-1]['test']:.1f}", flush=True)
    print("\nmargin   mean val (± std over zoos)   mean test   [per kind: val]")
    summary = {}
    names = ["paper", *(f"{m}/{fb}" for fb in ("lowest", "one") for m in margins)]
    for name in names:
        sel = [r for r in rows if r["margin"] == name]
        per_zoo = [np.mean([r["val"] for r in sel if r["zoo"] == z]) for z in dict.fromkeys(r["zoo"] for r in sel)]
        kinds = {k: float(np.mean([r["val"] for r in sel if r["kind"] == k])) for k in dict.fromkeys(r["kind"] for r in sel)}
        summary[str(name)] = {"val": float(np.mean(per_zoo)), "val_std_zoos": float(np.std(per_zoo)),
                              "test": float(np.mean([r["test"] for r in sel])), "val_per_kind": kinds}
        s = summary[str(name)]
        print(f"{name!s:11s} {s['val']:6.2f} ± {s['val_std_zoos']:5.2f}            {s['test']:6.2f}   "
              + ", ".join(f"{k} {v:.2f}" for k, v in kinds.items()))
    best = max(names[1:], key=lambda n: (round(summary[n]["val"], 6), -float(n.split("/")[0])))
    print(f"\nchosen on validation: scale_margin / fallback = {best}")
    out = Path(a.out) / "auto_task_margin.json"
    out.write_text(json.dumps({"margins": margins, "chosen": best, "summary": summary, "rows": rows}, indent=1))
    print(f"written {out}")


if __name__ == "__main__":
    main()
