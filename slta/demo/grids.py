"""The baselines' hyper-parameter grids, searched on the validation split (the paper's A.3.4)."""

from __future__ import annotations

from typing import Any


def baseline_grids(size: str, variants: bool = False) -> dict[str, list[dict[str, Any]]]:
    """Hyper-parameter grids (top-level `parameters`), after the methods' papers and the paper's A.3.4.
    `variants` adds RegMean++ (issue #16), with RegMean's grid."""
    grids = _grids(size)
    if variants:
        grids["regmean_plusplus"] = grids["regmean"]
    return grids


def _grids(size: str) -> dict[str, list[dict[str, Any]]]:
    lambdas = [round(0.1 * i, 1) for i in range(1, 11)]
    if size == "tiny":  # CI: the same methods, fewer points
        return {
            "weight_average": [{}],
            "task_arithmetic": [{"weight": w} for w in (0.3, 0.6, 1.0)],
            "ties": [{"density": 0.5, "lambda": 1.0}],
            "dare_linear": [{"density": 0.2, "weight": 0.8}],
            "breadcrumbs": [{"density": 0.9, "gamma": 0.01, "weight": 0.6}],
            "consensus_ta": [{"k": 2, "tall_lambda": 0.4, "weight": 0.6}],
            "regmean": [{"alpha": 0.9}],
        }
    return {
        "weight_average": [{}],
        "task_arithmetic": [{"weight": w} for w in lambdas],  # A.3.4: α ∈ {0.1, ..., 1.0}
        "ties": [{"density": d, "lambda": lam} for d in (0.2, 0.5, 0.8) for lam in (0.6, 1.0, 1.4)],
        # A.3.4: drop ratio ∈ {0.6, ..., 0.9} x α ∈ {0.6, 0.8, 1.0}
        "dare_linear": [{"density": round(1 - p, 1), "weight": a} for p in (0.6, 0.7, 0.8, 0.9) for a in (0.6, 0.8, 1.0)],
        "breadcrumbs": [{"density": d, "gamma": g, "weight": w}
                        for d in (0.8, 0.9) for g in (0.01, 0.05) for w in (0.5, 0.8, 1.0)],
        "consensus_ta": [{"k": 2, "tall_lambda": tl, "weight": w} for tl in (0.2, 0.4, 0.6) for w in (0.4, 0.7, 1.0)],
        "regmean": [{"alpha": a} for a in (0.5, 0.9, 1.0)],
    }
