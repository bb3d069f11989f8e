"""`slta demo --size tiny` end to end (what CI runs): the results table is complete and finite."""

from __future__ import annotations

import json
import math
import subprocess
import sys

from slta.demo import COMBOS, LEVELS, METHOD_NAMES, baseline_grids, table_rows


def test_tiny_demo_end_to_end(tmp_path):
    zoo, out = tmp_path / "zoo", tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--zoo", str(zoo),
                           "--out", str(out), "-q"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "report" / "results.json").read_text())
    rows = dict(table_rows(results))
    expected = ["Base Model", "Fine-tuned Model"] + [METHOD_NAMES[m] for m in baseline_grids("tiny")] + \
               [f"slta {n}" for n in ("Model Level", "Layer Level", "Attn/MLP Level", "Head/MLP Level")]
    assert list(rows) == expected
    for name, cells in rows.items():
        assert len(cells) == len(COMBOS), name
        for mean, std in cells:
            assert math.isfinite(mean) and 0 <= mean <= 100, (name, mean)
            assert std is None or math.isfinite(std)
    for level in LEVELS:  # three calibration seeds per level and combination
        assert all(len(runs) == 3 for runs in results["slta"][level].values())
    for name in ("results.md", "accuracy.png", "alpha_heatmap_attn_mlp_triple.png"):
        assert (out / "report" / name).stat().st_size > 0, name
    assert "Fine-tuned Model" in proc.stdout and "slta Attn/MLP Level" in proc.stdout

    # a rerun reuses every cached merge and evaluation
    again = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--zoo", str(zoo),
                            "--out", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    assert json.loads((out / "report" / "results.json").read_text())["baselines"] == results["baselines"]
    assert not (out / "work").exists() or not any((out / "work").iterdir())
