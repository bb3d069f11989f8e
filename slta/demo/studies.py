"""The demo's studies beside its results table: the slta diagnostics (issue 15 item 5) and the
calibration-sample-count ablation (the paper's Table 11, `slta demo --ablations`).

Diagnostics: for each level in DIAG_LEVELS, the calibration-seed-0 merge of the triple is diagnosed
(slta.analysis.diagnostics) at slta's α, at α x ALPHA_SCALES and at task arithmetic's validated λ on the
triple; the report gets diagnostics.json ({level: document}) and diagnostics_LEVEL.png.

Table 11: the statistics are measured once per level in ABLATION_LEVELS (layer and attn_mlp, the
paper's rows), on the triple with the largest count (50 per task, capped at the zoo's calibration
file), and every smaller count is re-solved from
`slta_stats.safetensors` (`slta solve --num-samples N --sample-seed D`: a seeded random subset of
the saved samples per task) with no forward pass, merged and evaluated on the test split. Counts
below the largest are drawn DRAWS times (mean ± std over draws).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from slta.demo.resolve import resolved_scores
from slta.demo.table import COMBOS, TASKS

DIAG_LEVELS = ("attn_mlp", "layer")
ALPHA_SCALES = (1.5,)
SAMPLE_COUNTS = (1, 3, 10, 30, 50)
DRAWS = 3
ABLATION_LEVELS = ("layer", "attn_mlp")  # the paper's Table 11 rows


def validated_lambda(baselines: dict[str, Any]) -> float | None:
    """Task arithmetic's λ chosen on the validation split for the triple (None if it did not run)."""
    run = baselines.get("task_arithmetic", {}).get("+".join(COMBOS[-1]))
    return None if run is None else run["params"].get("weight")


def diagnostics_path(demo: Any, level: str, seed: int, cfg: dict[str, Any]) -> Path | None:
    """The cached diagnostics of one slta merge of the demo, or None when the demo does not diagnose it."""
    from slta.analysis.diagnostics import SCHEMA

    if level not in DIAG_LEVELS or seed != 0 or not demo.diagnose:
        return None
    key = demo.key({"config": cfg, "diagnostics": SCHEMA, "lambda": demo.ta_lambda, "scales": ALPHA_SCALES})
    return demo.cache / f"diagnostics-{key}.json"


def diagnose_cached(demo: Any, folder: Path, path: Path) -> dict[str, Any]:
    """The diagnostics of the merge in `folder` (measured now unless cached at `path`)."""
    from slta.analysis.diagnostics import diagnose

    if not path.exists():
        lambdas = [] if demo.ta_lambda is None else [demo.ta_lambda]
        doc = diagnose(folder, lambdas, ALPHA_SCALES, demo.device, progress=False)
        path.write_text(json.dumps(doc) + "\n")
    return json.loads(path.read_text())


def write_diagnostics(results: dict[str, Any], folder: Path) -> None:
    """diagnostics.json ({level: document}), diagnostics_LEVEL.png and a summary in diagnostics.md."""
    from slta.analysis.diagnostics import draw

    docs = results.get("diagnostics") or {}
    if not docs:
        return
    (folder / "diagnostics.json").write_text(json.dumps(docs, indent=2) + "\n")
    md = ["# slta diagnostics (triple, calibration seed 0)", "",
          ("Objectives are Σ over modules, normalised as the solve normalises; 'zero' is the base "
           "(every coefficient 0). Eq. 10 = true merged-module error, Eq. 11 = its linearisation."), ""]
    for level, doc in docs.items():
        draw(doc, folder / f"diagnostics_{level}.png", f"slta diagnostics, {level} level ({Path(results['zoo']).name})")
        s = doc["summary"]
        md += [f"## {level}", "", (f"mean Σα {s['mean_sum_alpha']:.3f}, mean cross-task cosine "
                                   f"{s['mean_cross_cosine']:.3f}, objective at 0: {s['zero']:.4g}"), "",
               "| point | Eq. 10 | Eq. 11 | Eq. 10 / Eq. 11 |", "|---|---|---|---|"]
        for p, v in s["totals"].items():
            md.append(f"| {p} | {v['eq10']:.4g} | {v['eq11']:.4g} | {v['eq10'] / v['eq11']:.3f} |")
        md += ["", "| module | Σα | mean cos | " + " | ".join(f"Eq. 10 / Eq. 11 ({p})" for p in doc["points"]) + " |",
               "|---|---|---|" + "---|" * len(doc["points"])]
        for name, m in doc["modules"].items():
            md.append(f"| {name} | {m['sum_alpha']:.3f} | {m['mean_cross_cosine']:.3f} | "
                      + " | ".join(f"{m['eq10'][p]:.3g} / {m['eq11'][p]:.3g}" for p in doc["points"]) + " |")
        md.append("")
    (folder / "diagnostics.md").write_text("\n".join(md))


# -- Table 11: the number of calibration samples --------------------------------------------------

def sample_counts(zoo: Path) -> tuple[int, list[int]]:
    """(the count measured, every count studied): SAMPLE_COUNTS capped at the smallest calibration file."""
    lines = min(sum(1 for ln in (zoo / "data" / t / "calib.jsonl").read_text().splitlines() if ln.strip())
                for t in TASKS)
    n_max = min(max(SAMPLE_COUNTS), lines)
    return n_max, sorted({min(c, n_max) for c in SAMPLE_COUNTS})


def sample_ablation(demo: Any, levels: tuple[str, ...] = ABLATION_LEVELS) -> dict[str, Any]:
    """Table 11 on the triple: per level, measure once with the largest count, re-solve every smaller one
    from the saved statistics (no forward pass), merge and evaluate. Cached like every demo evaluation."""
    triple = COMBOS[-1]
    n_max, counts = sample_counts(demo.zoo)
    out: dict[str, Any] = {}
    for level in levels:
        cfg = demo.merge_config("slta", triple, {"granularity": level, "num_samples": n_max, "seed": 0})
        folder = demo.work / f"ablation-{demo.key({'config': cfg})}"
        runs: dict[str, list[dict[str, Any]]] = {}
        for n in counts:
            for d in range(DRAWS if n < n_max else 1):
                key = demo.key({"config": cfg, "subset": n, "draw": d})
                scores = resolved_scores(demo, cfg, folder, key, triple, num_samples=n, sample_seed=d)
                runs.setdefault(str(n), []).append({"draw": d, "test": scores})
        shutil.rmtree(folder, ignore_errors=True)
        out[level] = runs
    return {"combo": "+".join(triple), "measured_samples": n_max, "draws": DRAWS, "levels": out}


def ablation_rows(runs: dict[str, list[dict[str, Any]]]) -> list[tuple[int, dict[str, tuple[float, float]], int]]:
    """One level's runs -> (count, {task and "average": (mean %, std over draws)}, draws) per count."""
    rows = []
    for n, rs in runs.items():
        cols = {t: [100 * r["test"][t] for r in rs] for t in TASKS}
        cols["average"] = [float(np.mean([cols[t][k] for t in TASKS])) for k in range(len(rs))]
        rows.append((int(n), {c: (float(np.mean(v)), float(np.std(v))) for c, v in cols.items()}, len(rs)))
    return rows


def _cell(mean: float, std: float, k: int) -> str:
    return f"{mean:.2f} ± {std:.2f}" if k > 1 else f"{mean:.2f}"


def ablation_table(results: dict[str, Any]) -> str:
    """The Table 11 markdown of one zoo (empty without `--ablations`)."""
    ab = (results.get("ablations") or {}).get("samples")
    if not ab:
        return ""
    md = [f"## Calibration samples per task (paper Table 11): slta on {ab['combo'].replace('+', ' & ')}", "",
          (f"Measured once per level with {ab['measured_samples']} samples per task; smaller counts re-solved from "
           f"the saved statistics (a seeded random subset, {ab['draws']} draws: mean ± std). Accuracy %, test split."),
          "", "| level | samples per task | " + " | ".join(TASKS) + " | average |", "|---|---|" + "---|" * (len(TASKS) + 1)]
    for level, runs in ab["levels"].items():
        for n, cols, k in ablation_rows(runs):
            md.append(f"| {level} | {n} | " + " | ".join(_cell(*cols[c], k) for c in (*TASKS, "average")) + " |")
    ta = results.get("baselines", {}).get("task_arithmetic", {}).get(ab["combo"])
    if ta:
        accs = [100 * ta["test"][t] for t in TASKS]
        md.append(f"| task arithmetic (λ {ta['params'].get('weight')}) | | " + " | ".join(f"{a:.2f}" for a in accs)
                  + f" | {np.mean(accs):.2f} |")
    return "\n".join(md) + "\n"


def ablation_summary(per_zoo: list[dict[str, Any]]) -> dict[str, Any] | None:
    """Table 11 across zoo seeds, per level and count: the mean over zoos of each zoo's average accuracy
    (mean over draws), its std across zoos and the draw std averaged over zoos (None without `--ablations`)."""
    abs_ = [(r.get("ablations") or {}).get("samples") for r in per_zoo]
    if not abs_ or any(a is None for a in abs_):
        return None
    levels = {}
    for level in abs_[0]["levels"]:
        tables = [ablation_rows(a["levels"][level]) for a in abs_]
        levels[level] = [{"samples": n, "mean": float(np.mean([t[k][1]["average"][0] for t in tables])),
                          "zoo_std": float(np.std([t[k][1]["average"][0] for t in tables])),
                          "draw_std": float(np.mean([t[k][1]["average"][1] for t in tables]))}
                         for k, (n, _, _) in enumerate(tables[0])]
    return {"zoos": len(abs_), "levels": levels}
