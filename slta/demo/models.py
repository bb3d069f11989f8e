"""The demo's Table 10 (`slta demo --ablations`, chat kind): merging 2, 3, 4 and 5 models.

The paper merges Coding & Translate, then adds Cosmos QA, Ropes and Winogrande one at a time, and
reports task arithmetic's and slta's average accuracy with the relative gap (slta − TA) / TA. Here
the chat zoo gets two more fine-tunes (slta.zoo.extend: `arith`, `back_translate`) and the chain is
CHAIN's prefixes: code & translate, + math, + arith, + back_translate.

Per prefix: the fine-tunes' average on their own tasks, weight averaging, task arithmetic with λ
validated on the prefix's validation split (the demo's grid), and slta at LEVELS with calibration
seed 0. slta's statistics are measured once, on all five fine-tunes, and each prefix is re-solved
from them (`slta solve --models`) with no forward pass, as the demo does for its pairs.
"""

from __future__ import annotations

import shutil
from typing import Any

import numpy as np

CHAIN = ("code", "translate", "math", "arith", "back_translate")
LEVELS = ("layer", "attn_mlp")


def model_ablation(demo: Any, grids: dict[str, list[dict[str, Any]]], threads: int = 1) -> dict[str, Any]:
    """Table 10 on one chat zoo (extended first if needed), with the demo's baseline `grids`; cached
    like every demo evaluation."""
    from slta.demo.resolve import resolved_scores
    from slta.demo.zoos import generation_budget
    from slta.zoo.extend import EXTEND_VERSION, extend_zoo

    extend_zoo(demo.zoo, progress=False, threads=threads)
    demo.budget = generation_budget(demo.zoo)
    tag = {"extend": EXTEND_VERSION}
    own = {t: 100 * demo.evaluate(demo.zoo / t, (t,), "test", demo.key({"model": t, "own": True, **tag}))[t]
           for t in CHAIN}
    base = demo.evaluate(demo.zoo / "base", CHAIN, "test", demo.key({"model": "base", "tasks": CHAIN, **tag}))
    prefixes = [CHAIN[:n] for n in range(2, len(CHAIN) + 1)]
    rows = [{"tasks": list(c), "fine_tuned": float(np.mean([own[t] for t in c])),
             "base": 100 * float(np.mean([base[t] for t in c])),
             "weight_average": demo.tuned("weight_average", c, grids["weight_average"], tag=tag),
             "task_arithmetic": demo.tuned("task_arithmetic", c, grids["task_arithmetic"], tag=tag), "slta": {}}
            for c in prefixes]
    for level in LEVELS:
        cfg = demo.merge_config("slta", CHAIN, {"granularity": level, "num_samples": 30, "seed": 0})
        folder = demo.work / f"models-{demo.key({'config': cfg, **tag})}"
        for row, combo in zip(rows, prefixes):  # one forward pass on all five, every prefix re-solved
            key = demo.key({"config": cfg, "models": len(combo), **tag})
            row["slta"][level] = {"test": resolved_scores(demo, cfg, folder, key, combo,
                                                          models=list(range(len(combo))))}
        shutil.rmtree(folder, ignore_errors=True)
    return {"chain": list(CHAIN), "own": own, "rows": rows}


def _avg(run: dict[str, Any], tasks: list[str]) -> float:
    return 100 * float(np.mean([run["test"][t] for t in tasks]))


def model_rows(ab: dict[str, Any]) -> list[dict[str, float]]:
    """Per prefix: the number of models and every column's average accuracy (%), plus the gaps."""
    out = []
    for r in ab["rows"]:
        t = r["tasks"]
        row = {"models": len(t), "fine_tuned": r["fine_tuned"], "base": r["base"],
               "weight_average": _avg(r["weight_average"], t), "task_arithmetic": _avg(r["task_arithmetic"], t),
               "lambda": r["task_arithmetic"]["params"].get("weight")}
        for level, run in r["slta"].items():
            row[level] = _avg(run, t)
            row[f"gap_{level}"] = 100 * (row[level] - row["task_arithmetic"]) / max(row["task_arithmetic"], 1e-9)
        out.append(row)
    return out


def models_table(results: dict[str, Any]) -> str:
    """The Table 10 markdown of one zoo (empty without it)."""
    ab = (results.get("ablations") or {}).get("models")
    if not ab:
        return ""
    levels = list(ab["rows"][0]["slta"])
    md = ["## Number of models merged (paper Table 10)", "",
          (f"Tasks added in this order: {', '.join(ab['chain'])}; the fine-tunes on their own tasks: "
           + ", ".join(f"{t} {a:.1f}" for t, a in ab["own"].items())
           + ". Average accuracy %, test split; task arithmetic's λ validated per row; slta calibration seed 0, "
           "statistics measured once on all five and re-solved per row. Gap Δ = (slta − TA) / TA."), "",
          "| models | fine-tuned | base | weight avg | task arithmetic (λ) | "
          + " | ".join(f"slta {lv}" for lv in levels) + " | " + " | ".join(f"gap Δ {lv}" for lv in levels) + " |",
          "|---|---|---|---|---|" + "---|" * (2 * len(levels))]
    for r in model_rows(ab):
        md.append(f"| {r['models']} | {r['fine_tuned']:.1f} | {r['base']:.1f} | {r['weight_average']:.1f} | "
                  f"{r['task_arithmetic']:.1f} ({r['lambda']}) | " + " | ".join(f"{r[lv]:.1f}" for lv in levels)
                  + " | " + " | ".join(f"{r['gap_' + lv]:+.1f}%" for lv in levels) + " |")
    return "\n".join(md) + "\n"


def models_summary(per_zoo: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Table 10 across zoo seeds: per number of models, every column's mean and std over zoos
    (None unless every zoo has it)."""
    abs_ = [(r.get("ablations") or {}).get("models") for r in per_zoo]
    if not abs_ or any(a is None for a in abs_):
        return None
    tables = [model_rows(a) for a in abs_]
    cols = [c for c in tables[0][0] if c not in ("models", "lambda")]
    rows = [{"models": tables[0][k]["models"], "lambdas": [t[k]["lambda"] for t in tables],
             **{c: [float(np.mean([t[k][c] for t in tables])), float(np.std([t[k][c] for t in tables]))] for c in cols}}
            for k in range(len(tables[0]))]
    return {"zoos": len(abs_), "chain": abs_[0]["chain"], "rows": rows}


def models_summary_table(summary: dict[str, Any] | None) -> str:
    """Markdown of `models_summary` (empty when there is none)."""
    if not summary:
        return ""
    levels = [c for c in summary["rows"][0] if c in LEVELS]
    cell = (lambda m, s: f"{m:.1f} ± {s:.1f}") if summary["zoos"] > 1 else (lambda m, s: f"{m:.1f}")  # noqa: E731
    md = [(f"Number of models merged (paper Table 10; tasks added in the order {', '.join(summary['chain'])}; "
           f"average accuracy %, mean ± std over {summary['zoos']} zoo seed(s); gap Δ = (slta − TA) / TA):"), "",
          "| models | fine-tuned | weight avg | task arithmetic (λ per zoo) | "
          + " | ".join(f"slta {lv}" for lv in levels) + " | " + " | ".join(f"gap Δ {lv} (%)" for lv in levels) + " |",
          "|---|---|---|---|" + "---|" * (2 * len(levels))]
    for r in summary["rows"]:
        md.append(f"| {r['models']} | {cell(*r['fine_tuned'])} | {cell(*r['weight_average'])} | "
                  f"{cell(*r['task_arithmetic'])} ({', '.join(str(x) for x in r['lambdas'])}) | "
                  + " | ".join(cell(*r[lv]) for lv in levels) + " | "
                  + " | ".join(f"{r['gap_' + lv][0]:+.1f}" + (f" ± {r['gap_' + lv][1]:.1f}" if summary["zoos"] > 1 else "")
                               for lv in levels) + " |")
    return "\n".join(md) + "\n"
