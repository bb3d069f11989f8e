"""Data-free methods merge any architecture whose tensor names and shapes agree, as mergekit does
(issue #14); the closed form and RegMean, which cut the model into modules, still name what they support."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config

from _mergekit_env import load_folder, run_mergekit
from slta.merge import run_merge
from tiny import make_data, make_tokenizer, save_model


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory) -> tuple[Path, list[Path], Path]:
    root = tmp_path_factory.mktemp("gpt2")
    torch.manual_seed(0)
    tok = make_tokenizer()
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=3, n_head=4, n_positions=64,
                        bos_token_id=1, eos_token_id=2)
    base = AutoModelForCausalLM.from_config(config).eval()
    dirs = [save_model(base, root / "base", tok)]
    for t in range(2):
        ft = AutoModelForCausalLM.from_config(config).eval()
        with torch.no_grad():
            for (n, p), (_, p0) in zip(ft.named_parameters(), base.named_parameters()):
                p.copy_(p0 + 0.02 * torch.randn_like(p0) * (p0.abs().mean() + 1e-3))
        dirs.append(save_model(ft, root / f"ft{t}", tok))
    return dirs[0], dirs[1:], root


def config(base: Path, tuned: list[Path], method: str, **params) -> dict:
    return {"merge_method": method, "base_model": str(base), "dtype": "float32",
            "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in zip(tuned, (0.7, 0.4))],
            "parameters": params}


@pytest.mark.parametrize("method,params", [("task_arithmetic", {}), ("ties", {"density": 0.5}),
                                           ("linear", {})])
def test_data_free_methods_merge_gpt2_like_mergekit(gpt2, tmp_path, method, params):
    base, tuned, root = gpt2
    cfg = config(base, tuned, method, **params)
    if method == "linear":  # mergekit averages a listed base_model in (with a weight it needs): leave it out
        del cfg["base_model"]
    out = run_merge(cfg, tmp_path / "out", progress=False)
    ours, ref = load_folder(out), load_folder(run_mergekit(cfg, tmp_path, method))
    assert set(ours) == set(ref) and len(ours) > 20
    for name in ref:
        torch.testing.assert_close(ours[name], ref[name], rtol=0, atol=0, msg=name)
    if method == "task_arithmetic":  # and the formula itself, θ_0 + Σ w_t τ_t
        sd = [load_folder(p) for p in (base, *tuned)]
        for name in ours:
            expect = sd[0][name] + 0.7 * (sd[1][name] - sd[0][name]) + 0.4 * (sd[2][name] - sd[0][name])
            torch.testing.assert_close(ours[name], expect, rtol=1e-6, atol=1e-7)
    merged = AutoModelForCausalLM.from_pretrained(out)  # loads as the same architecture
    assert type(merged).__name__ == "GPT2LMHeadModel"


def test_closed_form_names_the_unsupported_architecture(gpt2, tmp_path):
    base, tuned, root = gpt2
    data = make_data(tmp_path, T=2, n=4)
    cfg = {"merge_method": "slta", "base_model": str(base), "parameters": {"num_samples": 2},
           "models": [{"model": str(m), "data": str(d)} for m, d in zip(tuned, data)]}
    with pytest.raises(ValueError, match="architecture 'gpt2' .* is not supported yet; slta supports llama"):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
