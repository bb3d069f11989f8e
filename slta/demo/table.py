"""The demo's tables and report: one zoo, and several zoos (mean ± std across zoo seeds).

A cell is (mean, zoo std, calibration std). Across zoos every method's per-zoo number (for slta
rows: the mean over calibration seeds) is averaged and its standard deviation over zoo seeds is
the spread a newcomer's own zoo build can land in; slta rows also show the calibration-seed
spread, averaged over zoos. Both are population std (numpy's default), like the single-zoo rows.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

TASKS = ("math", "code", "translate")
COMBOS = [("math", "code"), ("math", "translate"), ("code", "translate"), ("math", "code", "translate")]
LEVEL_NAMES = {"model": "slta Model Level", "layer": "slta Layer Level", "attn_mlp": "slta Attn/MLP Level",
               "head_mlp": "slta Head/MLP Level"}
METHOD_NAMES = {"weight_average": "Weight Avg", "task_arithmetic": "Task Arithmetic", "ties": "TIES",
                "dare_linear": "DARE", "breadcrumbs": "Breadcrumbs", "consensus_ta": "Consensus TA",
                "regmean": "RegMean", "regmean_plusplus": "RegMean++",
                "task_arithmetic_per_task": "Task Arithmetic · per-task λ"}
def level_name(key: str) -> str:
    """"attn_mlp" -> "slta Attn/MLP Level"; "attn_mlp|response" (a variant, slta.demo.variants) -> "... · response"."""
    level, _, variant = key.partition("|")
    return LEVEL_NAMES[level] + (f" · {variant}" if variant else "")


Cell = tuple[float, float | None, float | None]  # mean, std across zoo seeds, std across calibration seeds


NAN = float("nan")  # a combination the study did not merge (``--triple-only``)


def _avg(scores: dict[str, float], combo: tuple[str, ...]) -> float:
    return 100 * float(np.mean([scores[t] for t in combo]))


def _run(by_combo: dict[str, Any], combo: tuple[str, ...]) -> Any:
    return by_combo.get("+".join(combo))


def zoo_rows(results: dict[str, Any]) -> list[tuple[str, list[tuple[float, list[float] | None]]]]:
    """One zoo: (row name, [(value, per-calibration-seed values or None) per combo])."""
    refs = results["reference"]
    rows: list[tuple[str, list[tuple[float, list[float] | None]]]] = [
        ("Base Model", [(_avg(refs["base"], c), None) for c in COMBOS]),
        ("Fine-tuned Model", [(float(np.mean([100 * refs[t][t] for t in c])), None) for c in COMBOS])]
    for method, by_combo in results["baselines"].items():
        rows.append((METHOD_NAMES.get(method, method),
                     [(_avg(_run(by_combo, c)["test"], c) if _run(by_combo, c) else NAN, None) for c in COMBOS]))
    for level, by_combo in results["slta"].items():
        if level.endswith("|paper"):  # the paper's method at calibration seed 0, run for the variants' choice
            continue
        cells = []
        for c in COMBOS:
            vals = [_avg(r["test"], c) for r in _run(by_combo, c)] if _run(by_combo, c) else [NAN]
            cells.append((float(np.mean(vals)), vals))
        rows.append((level_name(level), cells))
    return rows


def table_rows(results: dict[str, Any]) -> list[tuple[str, list[tuple[float, float | None]]]]:
    """One zoo, in the paper's Table 1/3 order: (row name, [(mean, calibration std or None) per combo])."""
    return [(name, [(v, float(np.std(seeds)) if seeds is not None else None) for v, seeds in cells])
            for name, cells in zoo_rows(results)]


def multi_zoo_rows(per_zoo: list[dict[str, Any]]) -> list[tuple[str, list[Cell]]]:
    """Several zoos (one per zoo seed): (row name, [(mean, zoo std, calibration std) per combo]).

    With one zoo the zoo std is None. Rows present in only some zoos are an error: every zoo of a
    study runs the same methods.
    """
    tables = [zoo_rows(r) for r in per_zoo]
    names = [n for n, _ in tables[0]]
    if any([n for n, _ in t] != names for t in tables):
        raise ValueError("the zoos' results hold different methods")
    out: list[tuple[str, list[Cell]]] = []
    for k, name in enumerate(names):
        cells: list[Cell] = []
        for j in range(len(COMBOS)):
            vals = [t[k][1][j][0] for t in tables]
            seeds = [t[k][1][j][1] for t in tables]
            calib = float(np.mean([np.std(s) for s in seeds])) if seeds[0] is not None else None
            cells.append((float(np.mean(vals)), float(np.std(vals)) if len(vals) > 1 else None, calib))
        out.append((name, cells))
    return out


def format_cell(cell: Cell) -> str:
    mean, zoo_std, calib_std = cell
    if math.isnan(mean):
        return "–"
    s = f"{mean:.2f}"
    if zoo_std is not None:
        s += f" ± {zoo_std:.2f}"
    if calib_std is not None:
        s += f" (calib ± {calib_std:.2f})" if zoo_std is not None else f" ± {calib_std:.2f}"
    return s


def results_table(rows: list[tuple[str, list[Cell]]], n_zoos: int) -> dict[str, str]:
    merged = [r for r in rows if r[0] not in ("Base Model", "Fine-tuned Model")]
    best = [max((r[1][j][0] for r in merged if not math.isnan(r[1][j][0])), default=None) for j in range(len(COMBOS))]
    header = ["Method"] + [" & ".join(t.capitalize() for t in c) for c in COMBOS]
    md = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    widths = [max(len(h), 22) for h in header]
    widths[0] = max([widths[0]] + [len(name) for name, _ in rows])
    text = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
    for name, cells in rows:
        is_merge = name not in ("Base Model", "Fine-tuned Model")
        strs = [format_cell(c) for c in cells]
        bold = [is_merge and c[0] == best[j] for j, c in enumerate(cells)]
        md.append("| " + " | ".join([name] + [f"**{s}**" if b else s for s, b in zip(strs, bold)]) + " |")
        text.append("  ".join([name.ljust(widths[0])] + [(s + " *" if b else s).ljust(w)
                                                          for s, b, w in zip(strs, bold, widths[1:])]))
    spread = (f"mean ± std over {n_zoos} zoo seeds; slta rows also the calibration-seed std, averaged over zoos"
              if n_zoos > 1 else "slta rows: mean ± std over calibration seeds")
    text.append(f"(average exact-match accuracy, %, on the test splits; * = best merge; {spread})")
    return {"markdown": "\n".join(md), "text": "\n".join(text)}


def baseline_summary(per_zoo: list[dict[str, Any]]) -> dict[str, Any]:
    """The chat kind's calibration targets (issue 15), per zoo and averaged over zoos: base and
    fine-tunes in the template, weight averaging and task arithmetic (validated λ) on the triple."""
    triple = "+".join(COMBOS[-1])
    per = []
    for r in per_zoo:
        refs, b = r["reference"], r["baselines"]
        row = {"base": _avg(refs["base"], COMBOS[-1]), "finetunes": {t: 100 * refs[t][t] for t in TASKS}}
        row["finetune_avg"] = float(np.mean(list(row["finetunes"].values())))
        if "weight_average" in b:
            row["weight_average"] = _avg(b["weight_average"][triple]["test"], COMBOS[-1])
        if "task_arithmetic" in b:
            row["task_arithmetic"] = _avg(b["task_arithmetic"][triple]["test"], COMBOS[-1])
            row["ta_lambda"] = b["task_arithmetic"][triple]["params"].get("weight")
        per.append(row)
    mean: dict[str, Any] = {}
    for k in ("base", "finetune_avg", "weight_average", "task_arithmetic", "ta_lambda"):
        vals = [p[k] for p in per if p.get(k) is not None]
        if vals:
            mean[k] = float(np.mean(vals))
    mean["finetunes"] = {t: float(np.mean([p["finetunes"][t] for p in per])) for t in TASKS}
    return {"per_zoo": per, "mean": mean}


def summary_line(s: dict[str, Any]) -> str:
    m = s["mean"]
    ft = " / ".join(f"{m['finetunes'][t]:.1f}" for t in TASKS)
    line = f"base {m['base']:.1f} | fine-tunes {ft} (avg {m['finetune_avg']:.1f})"
    if "weight_average" in m:
        line += f" | weight avg (triple) {m['weight_average']:.1f}"
    if "task_arithmetic" in m:
        lams = ", ".join(str(p.get("ta_lambda")) for p in s["per_zoo"])
        line += f" | task arithmetic (triple) {m['task_arithmetic']:.1f} at λ {lams}"
    return line


def write_summary(study: dict[str, Any], folder: Path) -> None:
    """The multi-zoo report: results.json, results.md (a table per kind), accuracy_KIND.png."""
    from slta.demo.models import models_summary_table

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(study, indent=2) + "\n")
    md = [f"# slta demo ({study['size']} zoos, zoo seeds {', '.join(map(str, study['zoo_seeds']))})", ""]
    for kind, k in study["kinds"].items():
        rows = [(n, [tuple(c) for c in cells]) for n, cells in k["table"]]
        md += [f"## {kind} kind", "", results_table(rows, len(k["zoos"]))["markdown"], "",
               f"Baselines in brief: {summary_line(k['summary'])}", "", ablation_summary_table(k.get("ablations")),
               models_summary_table(k.get("models")),
               "Per-zoo reports: " + ", ".join(f"`{z['report']}`" for z in k["zoos"]), ""]
        accuracy_bars(rows, f"slta demo ({study['size']}, {kind} kind, {len(k['zoos'])} zoo seeds)",
                      folder / f"accuracy_{kind}.png")
    (folder / "results.md").write_text("\n".join(md))


def ablation_summary_table(summary: dict[str, Any] | None) -> str:
    """Markdown of slta.demo.studies.ablation_summary, the paper's Table 11 (empty when there is none)."""
    if not summary:
        return ""
    md = [(f"Calibration samples per task (paper Table 11; slta on the triple, average accuracy %; mean ± std over "
           f"{summary['zoos']} zoo seed(s), draws ± averaged over zoos):"), "",
          "| level | samples per task | average accuracy (%) |", "|---|---|---|"]
    for level, rows in summary["levels"].items():
        for r in rows:
            spread = f" ± {r['zoo_std']:.2f}" if summary["zoos"] > 1 else ""  # one zoo: no zoo spread
            md.append(f"| {level} | {r['samples']} | {r['mean']:.2f}{spread} (draws ± {r['draw_std']:.2f}) |")
    return "\n".join(md) + "\n"


def accuracy_bars(rows: list[tuple[str, list[Cell]]], title: str, path: Path) -> None:
    """The accuracy chart (slta.analysis.figures: a colour per method, grouped by family, slta hatched). The
    error bar is the zoo spread where there is one, else the calibration spread."""
    from slta.analysis.figures import accuracy_chart

    bars = [(name, [(0.0 if math.isnan(c[0]) else c[0], c[1] if c[1] is not None else c[2]) for c in cells])
            for name, cells in rows]
    accuracy_chart(bars, [" & ".join(c) for c in COMBOS], title, path)
