"""`slta demo --variants`: slta's options beyond the paper (issue #16) as extra rows of the table.

Each variant is a set of `merge_method: slta` parameters (docs/methods.md) run at the layer and
attn_mlp levels with calibration seed 0, on every combination, merged directly (a variant with
`inputs: merged` or `refine` cannot be re-solved from the triple's statistics, so every variant is
treated alike). The triple is also scored on the validation split: a variant is *chosen* by
validation only, and its test score is what the report states. RegMean++ joins the baselines,
grid-searched like RegMean. The scale fallback (SCALES) adds one row per scaled variant and level.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

VARIANTS: dict[str, dict[str, Any]] = {
    "paper": {},  # the paper's method, scored on validation too so it competes in the choice (not a table row)
    "response": {"tokens": "response"},
    "response_shifted": {"tokens": "response_shifted"},
    "merged": {"inputs": "merged"},
    "response+merged": {"tokens": "response", "inputs": "merged"},
    "response+merged+refine2": {"tokens": "response", "inputs": "merged", "refine": 2},
    "trajectory": {"inputs": "merged", "targets": "trajectory"},
    "response+trajectory": {"tokens": "response", "inputs": "merged", "targets": "trajectory"},
    "autoscale": {"scale": "auto"},  # training-free: the scale with the lowest calibration response loss
    "response+autoscale": {"tokens": "response", "scale": "auto"},
}
VARIANT_LEVELS = ("layer", "attn_mlp")
SEP = "|"  # results["slta"] keys: "LEVEL" (the paper) or "LEVEL|VARIANT"
# The fallback of issue #16, a one-parameter search like task arithmetic's λ: every α times s, with s
# chosen on the validation split per combination (1.0 included), for the variants whose α come from
# the Grams alone. Rows "LEVEL|VARIANT×scale"; never a training-free candidate (`chosen_by_validation`).
SCALES = (1.0, 1.2, 1.4, 1.6)
SCALED = ("paper", "response")
SEARCHED = "×scale"


class Unit(NamedTuple):
    """One `--variants` row on one combination, at calibration seed 0: one merge, or (`searched`) a scale
    search, one config per SCALES in order."""
    row: str  # "LEVEL|VARIANT" or "LEVEL|VARIANT×scale"
    configs: list[dict[str, Any]]
    searched: bool


def variant_levels(levels: tuple[str, ...]) -> tuple[str, ...]:
    """The levels the variants (and --strength) run at: VARIANT_LEVELS among a run's --levels."""
    return tuple(lv for lv in VARIANT_LEVELS if lv in levels)


def variant_units(demo, combo: tuple[str, ...]) -> list[Unit]:
    """Every `--variants` unit on `combo`, in the table's row order: each variant at each level, then the
    scale searches. The one place their merge configs are made (the demo, its warm-up, studies/)."""
    levels = variant_levels(demo.levels)
    params = lambda level, name: {"granularity": level, "num_samples": 30, "seed": 0, **VARIANTS[name]}  # noqa: E731
    units = [Unit(f"{level}{SEP}{name}", [demo.merge_config("slta", combo, params(level, name))], False)
             for name in VARIANTS for level in levels]
    units += [Unit(f"{level}{SEP}{name}{SEARCHED}",
                   [demo.merge_config("slta", combo, {**params(level, name), **({"scale": s} if s != 1.0 else {})})
                    for s in SCALES], True)
              for name in SCALED for level in levels]
    return units


def n_variant_steps(n_combos: int, levels: tuple[str, ...]) -> int:
    return (len(VARIANTS) + len(SCALED)) * len(variant_levels(levels)) * n_combos


def eval_key(demo, cfg: dict[str, Any], split: str) -> str:
    """The cache key of a merge's evaluation on one split, as Demo.merged_scores makes it (no tag)."""
    return demo.key({"config": cfg, "limit": demo.val_limit if split == "val" else None})


def eval_path(demo, cfg: dict[str, Any], split: str) -> Path:
    """Where that evaluation is cached."""
    return demo.cache / f"eval-{eval_key(demo, cfg, split)}-{split}.json"


def scores(demo, cfg: dict[str, Any], combo: tuple[str, ...], splits: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """Merge once, evaluate on each split (cached per split like Demo.merged_scores)."""
    from slta.merge import run_merge

    keys = {s: eval_key(demo, cfg, s) for s in splits}
    paths = {s: eval_path(demo, cfg, s) for s in splits}
    todo = [s for s in splits if not paths[s].exists()]
    if todo:
        folder = demo.work / keys[todo[0]]
        run_merge(cfg, folder, overwrite=True, device=demo.device, progress=False)
        try:
            for s in todo:
                demo.evaluate(folder, combo, s, keys[s])
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return {s: json.loads(p.read_text()) for s, p in paths.items()}


def first_best(vals: list[float]) -> int:
    """The scale search's choice: the best validation average, the smallest scale among ties."""
    return int(np.argmax(vals))


def run_unit(demo, unit: Unit, combo: tuple[str, ...]) -> dict[str, Any]:
    """A unit's run: {"seed", "test", "val"}, or {"seed", "test"} for a variant on a pair (validation is
    for choosing, on the triple), or {"seed", "scale", "test", "val"} for a search (every combination)."""
    if not unit.searched:
        splits = ("test", "val") if combo == demo.combos[-1] else ("test",)
        return {"seed": 0, **scores(demo, unit.configs[0], combo, splits)}
    vals = [float(np.mean(list(scores(demo, c, combo, ("val",))["val"].values()))) for c in unit.configs]
    k = first_best(vals)
    return {"seed": 0, "scale": SCALES[k], **scores(demo, unit.configs[k], combo, ("test", "val"))}


def run_variants(demo, bar) -> dict[str, dict[str, list[dict[str, Any]]]]:
    """{"LEVEL|VARIANT": {"math+code": [run], ...}} for every unit (run_unit); from the cache where
    slta.demo.parallel's warm-up or studies/variants_units.py made them."""
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    for combo in demo.combos:
        for unit in variant_units(demo, combo):
            bar.set_postfix_str(f"slta {unit.row} {'+'.join(combo)}")
            results.setdefault(unit.row, {})["+".join(combo)] = [run_unit(demo, unit, combo)]
            bar.update()
    return results


def chosen_by_validation(results: dict[str, Any], triple: str = "math+code+translate",
                         searched: bool = False) -> dict[str, Any] | None:
    """The slta row (paper or variant) with the best validation average on the triple, and its test.
    The training-free rows only, unless `searched` (then the ×scale rows compete too)."""
    best = None
    for key, by_combo in results.get("slta", {}).items():
        if key.endswith(SEARCHED) and not searched:
            continue
        runs = by_combo.get(triple) or []
        if not runs or any("val" not in r for r in runs):
            continue
        val = 100 * float(np.mean([np.mean(list(r["val"].values())) for r in runs]))
        test = 100 * float(np.mean([np.mean(list(r["test"].values())) for r in runs]))
        if best is None or val > best["val"]:
            best = {"row": key, "val": val, "test": test}
    return best
