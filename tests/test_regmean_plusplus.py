"""RegMean++ (Nguyen et al. 2025) against a direct implementation here: a whole merged model built
layer by layer, each task's inputs captured with hooks on it (cross-layer: the merged layers so far)
and on the candidate's own layer (intra-layer: each linear's input inside candidate t's layer),
RegMean's closed form solved with torch.linalg.solve. Nothing from slta's RegMean code."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import load_file
from tiny import calibration_samples, make_data, make_family, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.merge import run_merge

torch.set_num_threads(1)
N, ALPHA = 5, 0.9


def entering(model, ids, module):
    """(args[0], kwargs) entering `module` when `model` runs on ids."""
    cap = {}
    h = module.register_forward_pre_hook(lambda m, a, kw: cap.__setitem__("x", (a[0] if a else kw["hidden_states"],
                                                                                kw)), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    h.remove()
    x, kw = cap["x"]
    return x, {k: v for k, v in kw.items() if k in ("attention_mask", "position_embeddings", "position_ids")}


def regmean(grams, weights):
    """Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ with G̃ = α G + (1 - α) diag(G) (Jin et al. 2023)."""
    gs = [ALPHA * g + (1 - ALPHA) * torch.diag(torch.diag(g)) for g in grams]
    return torch.linalg.solve(sum(gs), sum(g @ w.double().T for g, w in zip(gs, weights))).T


def reference(models, smp, T):
    merged = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    avg = {n: sum(sd[n] for sd in sds[1:]) / T for n in sds[0]}  # everything not a linear weight
    merged.load_state_dict({"model.embed_tokens.weight": avg["model.embed_tokens.weight"]}, strict=False)
    with torch.no_grad():
        for i in range(models[0].config.num_hidden_layers):
            lays = [m.model.layers[i] for m in models]
            linears = [n for n, mod in lays[0].named_modules() if isinstance(mod, torch.nn.Linear)]
            grams = {n: [0] * T for n in linears}
            for t, ids in smp:
                h, kw = entering(merged, ids, merged.model.layers[i])  # the merged stream
                cand, cap = lays[t + 1], {}
                hooks = [cand.get_submodule(n).register_forward_pre_hook(
                    lambda m, a, n=n, cap=cap: cap.__setitem__(n, a[0][0].double())) for n in linears]
                cand(h, **kw)  # candidate t's own layer: the linears' inputs
                for hk in hooks:
                    hk.remove()
                for n in linears:
                    grams[n][t] = grams[n][t] + cap[n].T @ cap[n]
            new = {n[len(f"model.layers.{i}."):]: v for n, v in avg.items() if n.startswith(f"model.layers.{i}.")}
            for n in linears:
                new[f"{n}.weight"] = regmean(grams[n], [lay.get_submodule(n).weight for lay in lays[1:]]).float()
            merged.model.layers[i].load_state_dict(new)
        if not models[0].config.tie_word_embeddings:
            grams = [0] * T
            for t, ids in smp:
                x = models[t + 1].model.norm(entering(merged, ids, merged.model.norm)[0])[0].double()
                grams[t] = grams[t] + x.T @ x
            lm = regmean(grams, [m.lm_head.weight for m in models[1:]]).float()
            merged.load_state_dict({"lm_head.weight": lm}, strict=False)
        merged.load_state_dict({"model.norm.weight": avg["model.norm.weight"]}, strict=False)
    return merged.state_dict()


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_regmean_plusplus_equals_direct_implementation(tmp_path, arch):
    T = 3
    base, tuned = make_family(tmp_path, arch, T=T, layers=2, scale=0.2)
    data = make_data(tmp_path, T=T, n=10)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, method="regmean_plusplus", num_samples=N, batch_size=3)
    out = run_merge(cfg, tmp_path / "out", progress=False)
    assert "regmean_plusplus" in json.loads((out / "slta_report.json").read_text())
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in [base, *tuned]]
    ref = reference(models, calibration_samples(AutoTokenizer.from_pretrained(base), data, N), T)
    got = load_file(out / "model.safetensors")
    assert set(got) <= set(ref)
    for n, w in got.items():
        assert (w - ref[n]).abs().max().item() <= 1e-5 * ref[n].abs().max().item(), n
    # the merge's own inputs differ from the base's: RegMean++ is not RegMean after the first layer
    plain = load_file(run_merge(write_config(tmp_path / "r.yml", base, tuned, data, method="regmean", num_samples=N,
                                             batch_size=3), tmp_path / "rm", progress=False) / "model.safetensors")
    assert not torch.allclose(plain["model.layers.1.mlp.down_proj.weight"], got["model.layers.1.mlp.down_proj.weight"],
                              rtol=1e-4)
