"""`scale: auto` (slta.merges.autoscale): the streamed response losses against whole Hugging Face models.

For every candidate s the reference writes the merge with `scale: s` (α × s), loads it with
transformers, runs each calibration sample through it and takes torch's cross-entropy at the positions
whose next token is a response token. The streamed search must report the same per-task losses, pick
their argmin, and write exactly the merge with that scale.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import make_data, make_family, write_config
from transformers import AutoModelForCausalLM

from slta.config import ConfigError, load_config
from slta.engine.calibration import calibration_masks
from slta.io.inputs import open_inputs
from slta.merge import run_merge

torch.set_num_threads(1)
N = 4


def reference_losses(folder, tasks, masks) -> list[float]:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    out = []
    for t, samples in enumerate(tasks):
        total, count = 0.0, 0
        for ids, mask in zip(samples, masks[t]):
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(x).logits[0, :-1].double()
            nll = torch.nn.functional.cross_entropy(logits, x[0, 1:], reduction="none")
            keep = torch.tensor(mask[1:])
            total += float(nll[keep].sum())
            count += int(keep.sum())
        out.append(total / count)
    return out


@pytest.mark.parametrize("granularity,tied", [("attn_mlp", False), ("layer", True)])
def test_scale_search_matches_whole_models_and_writes_the_chosen_scale(tmp_path, granularity, tied):
    T = 3
    base, tuned = make_family(tmp_path, "llama", T=T, layers=2, scale=0.3, tied=tied)
    data = make_data(tmp_path, T=T, n=10)
    params = dict(granularity=granularity, num_samples=N, batch_size=3)
    auto = run_merge(write_config(tmp_path / "a.yml", base, tuned, data, scale="auto", **params),
                     tmp_path / "auto", progress=False)
    rep = json.loads((auto / "slta_report.json").read_text())
    search = rep["scale_search"]
    ins = open_inputs(load_config(tmp_path / "a.yml"))
    tasks, _, masks = calibration_masks(ins, "response")
    assert search["response_tokens"] == [sum(sum(m[1:]) for m in masks[t]) for t in range(T)]
    for j, s in enumerate(search["scales"]):
        fixed = run_merge(write_config(tmp_path / f"s{j}.yml", base, tuned, data, scale=s, **params),
                          tmp_path / f"s{j}", progress=False)
        np.testing.assert_allclose(search["loss"][j], reference_losses(fixed, tasks, masks), rtol=1e-5,
                                   err_msg=f"scale {s}")
    best = int(np.argmin(search["objective"]))
    assert search["chosen"] == search["scales"][best]
    chosen = tmp_path / f"s{best}"
    a, b = load_file(auto / "model.safetensors"), load_file(chosen / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    paper = json.loads((tmp_path / "s0" / "slta_report.json").read_text())["modules"]
    for name, info in rep["modules"].items():
        np.testing.assert_allclose(info["alpha"], search["chosen"] * np.array(paper[name]["alpha"]), rtol=1e-12)


def test_scale_auto_is_refused_where_the_stream_would_use_other_alphas(tmp_path):
    for extra in ({"inputs": "merged"}, {"refine": 1}):
        raw = {"merge_method": "slta", "base_model": str(tmp_path), "parameters": {"scale": "auto", **extra},
               "models": [{"model": str(tmp_path / "a"), "data": str(tmp_path / "a.jsonl")}]}
        with pytest.raises(ConfigError, match="scale: auto needs inputs: base"):
            load_config(raw)


def test_solve_refuses_scale_auto_statistics(tmp_path):
    from slta.io.inputs import MergeError
    from slta.merges.stats import run_solve

    base, tuned = make_family(tmp_path, "llama", T=2, layers=1)
    data = make_data(tmp_path, T=2, n=6)
    out = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, num_samples=3, scale="auto"),
                    tmp_path / "out", progress=False)
    with pytest.raises(MergeError, match="scale: auto, which needs a forward pass"):
        run_solve(out, tmp_path / "solved", progress=False)
    assert not (tmp_path / "solved").exists()
