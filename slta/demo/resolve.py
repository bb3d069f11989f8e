"""Scores of a re-solved merge, for the demo's studies (slta.demo.studies: Table 11; slta.demo.models:
Table 10): the statistics are measured once by a full merge, and every variant (a subset of the
samples, of the models) is re-solved from them with `slta solve`, merged and evaluated, with no
forward pass. Each evaluation is cached like every demo evaluation.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any


def resolved_scores(demo: Any, cfg: dict[str, Any], folder: Path, key: str, tasks: tuple[str, ...],
                    **solve: Any) -> dict[str, float]:
    """Test scores of a merge re-solved (`slta solve` with `solve`'s options) from the statistics of
    `cfg`'s merge in `folder`, which is measured on first need: the one forward pass. Cached under `key`."""
    from slta.merge import run_merge, run_solve

    path = demo.cache / f"eval-{key}-test.json"
    if not path.exists():
        if not (folder / "slta_stats.safetensors").exists():
            run_merge(cfg, folder, overwrite=True, device=demo.device, progress=False)
        sub = folder.with_name(f"{folder.name}-{key}")
        run_solve(folder / "slta_stats.safetensors", sub, overwrite=True, progress=False, **solve)
        demo.evaluate(sub, tasks, "test", key)
        shutil.rmtree(sub, ignore_errors=True)
    return json.loads(path.read_text())
