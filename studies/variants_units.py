"""`slta demo --variants` on the triple, its units in several processes, or only some of them (issue #26).

`slta demo` runs the variants in its in-order pass, one unit after another (slta.demo.parallel), and
on SmolLM2 a zoo's 24 units take about 4 hours of one core. This script makes the same merges with the
same `slta.demo.variants.scores` calls, so the same cache keys: start it once per free core and each
process claims the next unit not yet cached (a lock file per unit under OUT/claims), longest units first.
A later `slta demo ... --variants` with the same --zoo/--out reads them all from the cache and prints the
table. `--only` runs the units named (the rows of a zoo a study still lacks, e.g. on a rebuilt zoo);
`--status` lists each unit as done or todo; `--table` prints each unit's test and validation scores.

    python studies/variants_units.py ZOO_DIR OUT_DIR [--only layer|paper×scale,...] [--status | --table]

ZOO_DIR: one zoo (e.g. zoo/smollm2-seed2); OUT_DIR: its demo folder (the demo's --out/KIND-seedN).
A unit is "LEVEL|VARIANT" (a merge, test and validation) or "LEVEL|VARIANT×scale" (α × s for s in
SCALES on validation, then the chosen s on test: slta.demo.variants.run_scaled), at calibration seed 0.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def units(demo) -> list[tuple[str, list[dict], bool]]:
    """(name, merge configs, searched) per unit: as slta.demo.variants.run_variants / run_scaled make them."""
    from slta.demo import variants as V

    combo, out = demo.combos[-1], []
    for level in V.variant_levels(demo.levels):
        for name, extra in V.VARIANTS.items():
            params = {"granularity": level, "num_samples": 30, "seed": 0, **extra}
            out.append((f"{level}{V.SEP}{name}", [demo.merge_config("slta", combo, params)], False))
        for name in V.SCALED:
            params = {"granularity": level, "num_samples": 30, "seed": 0, **V.VARIANTS[name]}
            cfgs = [demo.merge_config("slta", combo, {**params, **({"scale": s} if s != 1.0 else {})})
                    for s in V.SCALES]
            out.append((f"{level}{V.SEP}{name}{V.SEARCHED}", cfgs, True))
    return out


def cached(demo, cfg: dict, split: str) -> dict | None:
    key = demo.key({"config": cfg, "limit": demo.val_limit if split == "val" else None})
    path = demo.cache / f"eval-{key}-{split}.json"
    return json.loads(path.read_text()) if path.exists() else None


def chosen(demo, cfgs: list[dict]) -> tuple[dict, dict] | None:
    """The searched unit's chosen config (first best validation average, as run_scaled) and its validation."""
    vals = [cached(demo, c, "val") for c in cfgs]
    if any(v is None for v in vals):
        return None
    k = int(np.argmax([np.mean(list(v.values())) for v in vals]))
    return cfgs[k], vals[k]


def done(demo, unit) -> bool:
    _, cfgs, searched = unit
    if searched:
        best = chosen(demo, cfgs)
        return best is not None and cached(demo, best[0], "test") is not None
    return cached(demo, cfgs[0], "test") is not None and cached(demo, cfgs[0], "val") is not None


def run(demo, unit) -> None:
    from slta.demo.variants import scores

    combo, (_, cfgs, searched) = demo.combos[-1], unit
    if searched:
        for c in cfgs:
            scores(demo, c, combo, ("val",))
        scores(demo, chosen(demo, cfgs)[0], combo, ("test", "val"))
    else:
        scores(demo, cfgs[0], combo, ("test", "val"))


def claim(path: Path) -> bool:
    """A lock file holding this process's id: two processes never merge the same unit. A claim whose
    process is gone (a stopped run) is taken over."""
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                os.kill(int(path.read_text() or 0), 0)
                return False  # its process still runs
            except (ProcessLookupError, ValueError):
                path.unlink(missing_ok=True)
                continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def main() -> None:
    import torch

    from slta.demo import Demo

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("zoo")
    p.add_argument("out")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], help="comma-separated unit names")
    p.add_argument("--levels", default="layer,attn_mlp")
    p.add_argument("--status", action="store_true")
    p.add_argument("--table", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(1)  # one process per core (slta.demo.parallel: 1.95x one process's throughput with two)
    demo = Demo(Path(a.zoo), Path(a.out), "default", "cpu", 1, False, {"slta"}, True, True, tuple(a.levels.split(",")))
    todo = units(demo)
    if a.only:
        unknown = set(a.only) - {u[0] for u in todo}
        if unknown:
            raise SystemExit(f"variants_units: unknown units {sorted(unknown)}; known: {[u[0] for u in todo]}")
        todo = [u for u in todo if u[0] in a.only]
    if a.status or a.table:
        for u in todo:
            if not a.table or not done(demo, u):
                print(("done " if done(demo, u) else "todo ") + u[0])
                continue
            cfg, val = chosen(demo, u[1]) if u[2] else (u[1][0], cached(demo, u[1][0], "val"))
            test = cached(demo, cfg, "test")
            scale = f" s={cfg['parameters'].get('scale', 1.0)}" if u[2] else ""
            avg = {s: 100 * np.mean(list(d.values())) for s, d in (("test", test), ("val", val))}
            print(f"{u[0]}: test " + " / ".join(f"{t} {100 * v:.1f}" for t, v in test.items())
                  + f" (avg {avg['test']:.1f}), val avg {avg['val']:.1f}{scale}")
        return
    # longest first (searches, refine, then the options with a second pass), so no process idles at the end
    todo.sort(key=lambda u: (not u[2], "refine" not in u[0], not any(w in u[0] for w in ("trajectory", "autoscale"))))
    claims = Path(a.out) / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    for u in todo:
        if done(demo, u):
            continue
        if not claim(claims / u[0].replace("|", "_")):
            continue
        print(f"[{os.getpid()}] {u[0]}", flush=True)
        run(demo, u)


if __name__ == "__main__":
    main()
