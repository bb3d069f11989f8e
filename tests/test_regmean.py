"""RegMean against its definition: a direct least-squares solve on inputs captured with hooks here."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.io.checkpoint import Checkpoint
from slta.merge import run_merge
from slta.methods.regmean import regmean_weight, scaled_gram
from tiny import make_data, make_family, write_config


def tensors(folder):
    ck = Checkpoint(folder)
    return {n: ck.get(n).double() for n in ck.names()}


def base_inputs(base, data, module_path, n=5):
    """(task, X) of one linear layer on the base model, per calibration sample (slta's draw)."""
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(base)
    mod = model.get_submodule(module_path)
    out = []
    for t, path in enumerate(data):
        rows = [json.loads(line) for line in open(path)]
        for i in sorted(random.Random(0).sample(range(len(rows)), n)):
            r = rows[i]
            text = r["text"] if "text" in r else r["prompt"] + r["response"]
            cap = {}
            h = mod.register_forward_pre_hook(lambda m, a: cap.setdefault("x", a[0][0]))
            with torch.no_grad():
                model(torch.tensor([tok(text)["input_ids"]]))
            h.remove()
            out.append((t, cap["x"].double()))
    return out


def test_alpha_one_is_least_squares(tmp_path):
    T = 3
    base, tuned = make_family(tmp_path, "llama", T=T)
    data = make_data(tmp_path, T=T, n=10)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, method="regmean", alpha=1.0, num_samples=5)
    merged = tensors(run_merge(cfg, tmp_path / "out", progress=False))
    ws = [tensors(t) for t in tuned]
    for path in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        xs = base_inputs(base, data, path)
        X = torch.cat([x for _, x in xs])
        Y = torch.cat([x @ ws[t][f"{path}.weight"].T for t, x in xs])  # each task's fine-tune's outputs
        W = torch.linalg.lstsq(X, Y).solution.T
        got = merged[f"{path}.weight"]
        assert (got - W).abs().max() <= 1e-4 * W.abs().max(), path
    # lm_head is a linear too; norms and embeddings are averaged
    for n in ("model.embed_tokens.weight", "model.norm.weight", "model.layers.0.input_layernorm.weight"):
        assert torch.allclose(merged[n], sum(w[n] for w in ws) / T, rtol=1e-6, atol=1e-7), n


def test_one_model_gives_it_back(tmp_path):
    base, tuned = make_family(tmp_path, "qwen2", T=1)
    data = make_data(tmp_path, T=1)
    out = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, method="regmean", num_samples=6),
                    tmp_path / "out", progress=False)
    ft = tensors(tuned[0])
    for n, w in tensors(out).items():
        assert (w - ft[n]).abs().max() <= 1e-5 * ft[n].abs().max(), n
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False).shape[1] == 6


def test_regmean_weight_definition():
    g = torch.Generator().manual_seed(0)
    grams = [(lambda x: x.T @ x)(torch.randn(40, 6, generator=g, dtype=torch.float64)) for _ in range(2)]
    ws = [torch.randn(4, 6, generator=g, dtype=torch.float64) for _ in range(2)]
    for alpha in (0.0, 0.5, 0.9, 1.0):
        gs = [alpha * G + (1 - alpha) * torch.diag(torch.diag(G)) for G in grams]
        expect = torch.linalg.solve(gs[0] + gs[1], gs[0] @ ws[0].T + gs[1] @ ws[1].T).T
        got, rule = regmean_weight(grams, ws, alpha)
        assert rule == "cholesky" and torch.allclose(got, expect, rtol=1e-10)
        assert torch.allclose(scaled_gram(grams[0], alpha), gs[0])
    # alpha = 0 is a per-input-feature weighted average (diagonal Grams)
    got, _ = regmean_weight(grams, ws, 0.0)
    d = [torch.diag(G) for G in grams]
    assert torch.allclose(got, (d[0] * ws[0] + d[1] * ws[1]) / (d[0] + d[1]), rtol=1e-10)


def test_singular_gram_uses_min_norm():
    x = torch.randn(3, 6, dtype=torch.float64)  # 3 tokens, 6 features: rank 3
    w = torch.randn(2, 6, dtype=torch.float64)
    got, rule = regmean_weight([x.T @ x], [w], 1.0)
    assert rule == "min-norm" and torch.isfinite(got).all()
    assert torch.allclose(x @ got.T, x @ w.T, rtol=1e-8, atol=1e-10)  # same outputs on the data
