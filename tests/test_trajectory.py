"""`targets: trajectory` (slta.merges.trajectory) against an independent whole-model reference.

The reference loads the written merge (every module's α applied, so layer i's input is the merged
model's, as with `inputs: merged`) and each fine-tune, captures their hidden states with hooks, and solves
the least squares of the module docstring directly (numpy lstsq on stacked, weighted residuals):

    min_α Σ_a mean_{x in H_a} ||x + f(x; θ_0) + Σ_t α_t Δf_t(x) - r_a(x)||² / d(x)

with r_a fine-tune a's own residual stream after the module. It must give the α the merge reports.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tiny import (
    calibration_samples,
    make_data,
    make_family,
    module_inputs,
    module_out,
    write_config,
)
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.config import ConfigError
from slta.merge import run_merge

torch.set_num_threads(1)
N = 4


def reference_alpha(models, merged, smp, name, balance, T):
    parts = name.split(".")
    i, kind = int(parts[1]), (parts[2] if len(parts) > 2 else "layer")
    lays = [m.model.layers[i] for m in models]
    rows, targets, per_task = [], [], np.bincount([t for t, _ in smp], minlength=T)
    with torch.no_grad():
        for t, ids in smp:
            cap = module_inputs(merged, ids)  # the merged model's inputs of layer i (and its attention residual)
            own = module_inputs(models[t + 1], ids)  # fine-tune t's own forward pass
            fs = [module_out(lay, kind, cap, i).double().reshape(-1) for lay in lays]
            D = torch.stack([f - fs[0] for f in fs[1:]], 1)  # (positions * hidden, T)
            if kind == "layer":
                e = own[("out", i)].double().reshape(-1) - fs[0]
            elif kind == "attn":
                e = (own[("mid", i)] - cap[i][0]).double().reshape(-1) - fs[0]
            else:
                e = (own[("out", i)] - cap[("mid", i)]).double().reshape(-1) - fs[0]
            d = float((D * D).sum()) / T if balance else 1.0
            w = (1.0 / (d * per_task[t])) ** 0.5
            rows.append(w * D.numpy())
            targets.append(w * e.numpy())
    return np.linalg.lstsq(np.concatenate(rows), np.concatenate(targets), rcond=None)[0]


@pytest.mark.parametrize("granularity,balance", [("attn_mlp", True), ("layer", False)])
def test_trajectory_alpha_matches_whole_model_reference(tmp_path, granularity, balance):
    T = 3
    base, tuned = make_family(tmp_path, "llama", T=T, layers=2, scale=0.3)
    data = make_data(tmp_path, T=T, n=10)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity=granularity, num_samples=N,
                       batch_size=3, balance=balance, inputs="merged", targets="trajectory")
    out = run_merge(cfg, tmp_path / "out", progress=False)
    rep = json.loads((out / "slta_report.json").read_text())
    assert rep["targets"] == "trajectory"
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in [base, *tuned]]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    smp = calibration_samples(AutoTokenizer.from_pretrained(base), data, N)
    layer_modules = [m for m in rep["modules"] if m.startswith("layers.")]
    assert len(layer_modules) == (4 if granularity == "attn_mlp" else 2)
    paper = json.loads((run_merge(write_config(tmp_path / "p.yml", base, tuned, data, granularity=granularity,
                                               num_samples=N, batch_size=3, balance=balance, inputs="merged"),
                                  tmp_path / "paper", progress=False) / "slta_report.json").read_text())
    for name in layer_modules:
        alpha = np.array(rep["modules"][name]["alpha"])
        ref = reference_alpha(models, merged, smp, name, balance, T)
        np.testing.assert_allclose(alpha, ref, rtol=1e-4, atol=1e-6, err_msg=name)
    # the first module's input is the same merged embedding either way, and the target differs:
    # its α must move (a test that the option is not ignored)
    first = layer_modules[0]
    assert not np.allclose(rep["modules"][first]["alpha"], paper["modules"][first]["alpha"], atol=1e-4)
    # the embedding's target is fine-tune a's own embedding already: same α as inputs: merged alone
    np.testing.assert_allclose(rep["modules"]["embed"]["alpha"], paper["modules"]["embed"]["alpha"], rtol=1e-12)


def test_scale_multiplies_every_alpha_and_solve_keeps_it(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2, layers=1, scale=0.3)
    data = make_data(tmp_path, T=2, n=6)
    reps = {}
    for s in (1.0, 1.5):
        cfg = write_config(tmp_path / f"c{s}.yml", base, tuned, data, num_samples=3, scale=s)
        out = run_merge(cfg, tmp_path / f"out{s}", progress=False)
        reps[s] = json.loads((out / "slta_report.json").read_text())
    for name, info in reps[1.0]["modules"].items():
        np.testing.assert_allclose(reps[1.5]["modules"][name]["alpha"], 1.5 * np.array(info["alpha"]), rtol=1e-12)
    from slta.merges.stats import run_solve

    solved = run_solve(tmp_path / "out1.5" / "slta_stats.safetensors", tmp_path / "solved", progress=False)
    rep = json.loads((solved / "slta_report.json").read_text())
    for name, info in reps[1.5]["modules"].items():
        np.testing.assert_allclose(rep["modules"][name]["alpha"], info["alpha"], rtol=1e-12)


@pytest.mark.parametrize("params,needle", [
    ({"targets": "trajectory"}, "needs inputs: merged"),
    ({"targets": "trajectory", "inputs": "merged", "granularity": "head_mlp"}, "granularity layer or attn_mlp"),
    ({"targets": "own"}, "is not one of module, trajectory"),
    ({"scale": 0}, "positive number"),
    ({"scale": 1.2, "refine": 1}, "not with refine"),
])
def test_bad_variant_options_are_refused(tmp_path, params, needle):
    base, tuned = make_family(tmp_path, "llama", T=2, layers=1)
    data = make_data(tmp_path, T=2, n=4)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, num_samples=2, **params)
    with pytest.raises(ConfigError, match=needle):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
