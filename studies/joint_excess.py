"""Would `scale: auto_joint` do better with the paper's α among its candidates? (issue #28; read-only)

auto_joint keeps, of the factor lists it checked, the one with the least total excess over the margins,
Σ_t max(0, loss_t − own_t − margin) (slta.merges.autoscale.joint_factors). The paper's α (every factor 1)
is never checked jointly, but its losses are already in auto_task's search: the factor-1 candidate of
task t is the paper's merge measured on t's calibration responses. This script reads every cached
auto_joint search under the given demo output folders and prints, per search, the kept list and its
excess beside the paper's; `PAPER` marks where a rule "keep the least excess, the paper's α included"
would switch to the paper's merge. No forward pass: the test scores of both merges are in the demo's
tables (docs/methods.md, "scale: auto_joint").

    python studies/joint_excess.py OUT [OUT ...]

OUT: `--out` folders of `slta demo` or studies/auto_joint.py (OUT/ZOO_NAME/cache/search-*.json).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    from slta.merges.autoscale import total_excess

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("outs", nargs="+")
    a = p.parse_args()
    for out in map(Path, a.outs):
        for f in sorted(out.glob("*/cache/search-*.json")):
            d = json.loads(f.read_text())
            joint = d.get("joint")
            if not joint or "kept" not in joint:  # auto_task searches, and rule-1 caches without a keep step
                continue
            one = d["factors"].index(1.0)
            paper = total_excess([row[one] for row in d["loss"]], d["fine_tune_loss"], d["margin"])
            kept = joint["checks"][joint["kept"]]
            flag = "PAPER" if paper < kept["excess"] else ""
            print(f"{f.parent.parent.name:16s} {len(d['fine_tune_loss'])} tasks, own {d['fine_tune_loss']}: "
                  f"kept {kept['factors']} excess {kept['excess']:.3f} | paper's α excess {paper:.3f} {flag}")


if __name__ == "__main__":
    main()
