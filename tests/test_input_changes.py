"""Inputs that changed since: `slta solve` on statistics measured from other weights or data, and
`--resume` of a partial merge whose inputs changed, are refused with a clear error (issue #14), never
a silent mix of old and new. A retrained fine-tune keeps its safetensors header (same names, shapes,
offsets), so the check samples the weights' bytes too."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

from slta.io.inputs import MergeError
from slta.merge import run_merge, run_solve
from slta.merges.data_free import DataFree
from tiny import make_data, make_family, write_config


def retrain(folder):
    """New weights, same file layout: what re-running a fine-tune does."""
    f = folder / "model.safetensors"
    sd = load_file(f)
    save_file({k: v + 0.01 * torch.ones_like(v) for k, v in sd.items()}, str(f), metadata={"format": "pt"})


def test_solve_refuses_statistics_of_changed_inputs(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2)
    data = make_data(tmp_path, T=2)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity="layer", num_samples=4)
    out = run_merge(cfg, tmp_path / "m", progress=False)
    run_solve(out, tmp_path / "same", progress=False)  # unchanged inputs: fine
    retrain(tuned[1])
    with pytest.raises(MergeError, match="changed since") as e:
        run_solve(out, tmp_path / "s", progress=False)
    assert str(tuned[1]) in str(e.value) and not (tmp_path / "s").exists()


def test_solve_refuses_changed_calibration_data(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2)
    data = make_data(tmp_path, T=2)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity="layer", num_samples=4)
    out = run_merge(cfg, tmp_path / "m", progress=False)
    data[0].write_text(data[0].read_text().replace("+", "-"))
    with pytest.raises(MergeError, match="changed since") as e:
        run_solve(out, tmp_path / "s", progress=False)
    assert str(data[0]) in str(e.value)


def test_resume_refuses_a_partial_merge_of_changed_inputs(tmp_path, monkeypatch):
    base, tuned = make_family(tmp_path, "llama", T=2, layers=3)
    cfg = write_config(tmp_path / "c.yml", base, tuned, None, method="task_arithmetic", weight=0.5)
    original = DataFree.merge_group

    def interrupted(self, label, group, loaded):
        if label == "layer 1":
            raise KeyboardInterrupt
        original(self, label, group, loaded)

    monkeypatch.setattr(DataFree, "merge_group", interrupted)
    with pytest.raises(KeyboardInterrupt):
        run_merge(cfg, tmp_path / "out", progress=False, resume=True)
    monkeypatch.setattr(DataFree, "merge_group", original)
    partial = tmp_path / ".out.partial"
    assert (partial / "slta_progress.json").exists()
    retrain(tuned[0])
    with pytest.raises(MergeError, match="changed since") as e:
        run_merge(cfg, tmp_path / "out", progress=False, resume=True)
    assert str(tuned[0]) in str(e.value) and str(partial) in str(e.value)
    assert partial.exists() and not (tmp_path / "out").exists()  # nothing deleted: the user decides
