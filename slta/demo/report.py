"""The one-zoo report of `slta demo`: results.json, results.md (the table, per-task accuracy, the
ablation), the diagnostics, and the figures."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from slta.demo.models import models_table
from slta.demo.studies import ablation_table, write_diagnostics
from slta.demo.table import (
    METHOD_NAMES,
    TASKS,
    accuracy_bars,
    level_name,
    results_table,
    table_rows,
)


def write_report(results: dict[str, Any], folder: Path) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rows = [(name, [(m, None, sd) for m, sd in cells]) for name, cells in table_rows(results)]
    tables = results_table(rows, 1)
    (folder / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    detail = ["", "## Per-task accuracy (%)", "", "| Method | Combination | " + " | ".join(TASKS) + " |",
              "|---|---|" + "---|" * len(TASKS)]
    for method, by_combo in results["baselines"].items():
        for combo, r in by_combo.items():
            detail.append(f"| {METHOD_NAMES.get(method, method)} ({r['params']}) | {combo} | "
                          + " | ".join(f"{100 * r['test'][t]:.1f}" if t in r["test"] else "" for t in TASKS) + " |")
    for level, by_combo in results["slta"].items():
        for combo, runs in by_combo.items():
            cells = []
            for t in TASKS:
                vals = [100 * r["test"][t] for r in runs if t in r["test"]]
                cells.append(f"{np.mean(vals):.1f} ± {np.std(vals):.1f}" if vals else "")
            detail.append(f"| {level_name(level)} | {combo} | " + " | ".join(cells) + " |")
    refs = results["reference"]
    detail += ["", "## Base and fine-tunes on every task (%)", "", "| Model | " + " | ".join(TASKS) + " |",
               "|---|" + "---|" * len(TASKS)]
    for name, scores in refs.items():
        detail.append(f"| {name} | " + " | ".join(f"{100 * scores[t]:.1f}" for t in TASKS) + " |")
    (folder / "results.md").write_text(f"# slta demo ({results['size']} zoo {results['zoo']})\n\n" + tables["markdown"]
                                       + "\n" + "\n".join(detail) + "\n\n" + ablation_table(results)
                                       + "\n" + models_table(results))
    write_diagnostics(results, folder)
    accuracy_bars(rows, f"slta demo ({results['size']} zoo {Path(results['zoo']).name})", folder / "accuracy.png")
    heat = folder / "slta_attn_mlp_triple_seed0" / "slta_report.json"
    if heat.exists():
        from slta.analysis.figures import fig5_alpha

        fig5_alpha(json.loads(heat.read_text()), folder / "alpha_heatmap_attn_mlp_triple.png")
