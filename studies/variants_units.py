"""`slta demo --variants` on the triple: some of its units, or all of them in processes started by hand (issue #26).

`slta demo --jobs N --variants` runs a zoo's variant units in its warm-up (slta.demo.parallel), but only as
part of the whole study. This script runs the units alone, on the triple, with the same units and calls
(slta.demo.variants.variant_units / run_unit), so the same cache keys: start it once per free core and each
process claims the next unit not yet cached (a lock file per unit under OUT/claims), longest units first.
A later `slta demo ... --variants` with the same --zoo/--out reads them all from the cache and prints the
table. `--only` runs the units named (the rows of a zoo a study still lacks, e.g. on a rebuilt zoo);
`--status` lists each unit as done or todo; `--table` prints each unit's test and validation scores.

    python studies/variants_units.py ZOO_DIR OUT_DIR [--only layer|paper×scale,...] [--status | --table]

ZOO_DIR: one zoo (e.g. zoo/smollm2-seed2); OUT_DIR: its demo folder (the demo's --out/KIND-seedN).
A unit is "LEVEL|VARIANT" (a merge, test and validation) or "LEVEL|VARIANT×scale" (α × s for s in
SCALES on validation, then the chosen s on test), at calibration seed 0. On SmolLM2 a zoo's 24 units take
about 190 core-minutes.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np


def cached(demo, cfg: dict, split: str) -> dict | None:
    from slta.demo.variants import eval_path

    path = eval_path(demo, cfg, split)
    return json.loads(path.read_text()) if path.exists() else None


def chosen(demo, unit) -> tuple[dict, dict] | None:
    """A unit's merge config (for a search, the scale slta.demo.variants.run_unit chooses) and its validation."""
    from slta.demo.variants import first_best

    vals = [cached(demo, c, "val") for c in unit.configs]
    if any(v is None for v in vals):
        return None
    k = first_best([float(np.mean(list(v.values()))) for v in vals])
    return unit.configs[k], vals[k]


def done(demo, unit) -> bool:
    best = chosen(demo, unit)
    return best is not None and cached(demo, best[0], "test") is not None


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
    from slta.demo.variants import run_unit, variant_units

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
    combo = demo.combos[-1]
    todo = variant_units(demo, combo)
    if a.only:
        unknown = set(a.only) - {u.row for u in todo}
        if unknown:
            raise SystemExit(f"variants_units: unknown units {sorted(unknown)}; known: {[u.row for u in todo]}")
        todo = [u for u in todo if u.row in a.only]
    if a.status or a.table:
        for u in todo:
            if not a.table or not done(demo, u):
                print(("done " if done(demo, u) else "todo ") + u.row)
                continue
            cfg, val = chosen(demo, u)
            test = cached(demo, cfg, "test")
            scale = f" s={cfg['parameters'].get('scale', 1.0)}" if u.searched else ""
            avg = {s: 100 * np.mean(list(d.values())) for s, d in (("test", test), ("val", val))}
            print(f"{u.row}: test " + " / ".join(f"{t} {100 * v:.1f}" for t, v in test.items())
                  + f" (avg {avg['test']:.1f}), val avg {avg['val']:.1f}{scale}")
        return
    # longest first (searches, refine, then the options with a second pass), so no process idles at the end
    todo.sort(key=lambda u: (not u.searched, "refine" not in u.row, not any(w in u.row for w in ("trajectory", "autoscale"))))
    claims = Path(a.out) / "claims"
    claims.mkdir(parents=True, exist_ok=True)
    for u in todo:
        if done(demo, u):
            continue
        if not claim(claims / u.row.replace("|", "_")):
            continue
        print(f"[{os.getpid()}] {u.row}", flush=True)
        run_unit(demo, u, combo)


if __name__ == "__main__":
    main()
