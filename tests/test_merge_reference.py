"""The streaming merge against a straightforward whole-model implementation written here.

The reference loads every model whole, runs the base model one sample at a time (no batching,
no padding) with hooks that capture each module's input, runs each version's module on that
input, builds Δf, the per-sample Grams, B, A, b (Eq. 12-14 / 33-34) with numpy, solves, and
merges a state dict. Nothing from slta's feature or solve code is used.
"""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.merge import run_merge
from tiny import make_data, make_family, write_config

NUM_SAMPLES = 6


def load_samples(tok, data_files):
    """Same draw as slta's: random.Random(seed).sample over lines, sorted (seed 0)."""
    import random

    out = []
    for t, path in enumerate(data_files):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        idx = sorted(random.Random(0).sample(range(len(rows)), NUM_SAMPLES))
        for i in idx:
            r = rows[i]
            text = r["text"] if "text" in r else r["prompt"] + r["response"]
            out.append((t, torch.tensor([tok(text)["input_ids"]])))
    return out


def module_features(models, ids, granularity, tied):
    """{module name: [f_v flattened for v in versions]} for one sample."""
    base = models[0]
    cfg = base.config
    L = cfg.num_hidden_layers
    captured = {}
    hooks = []
    for i, layer in enumerate(base.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: captured.__setitem__(("layer", i), (a[0] if a else kw["hidden_states"], kw)),
            with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: captured.__setitem__(("mid", i), a[0])))
    hooks.append(base.model.norm.register_forward_pre_hook(lambda m, a: captured.__setitem__("final", a[0])))
    with torch.no_grad():
        base(ids)
    for h in hooks:
        h.remove()

    feats = {}
    with torch.no_grad():
        if granularity == "model":  # one α for the whole model, lm_head included: its logits (Table 13)
            feats["model"] = [m(ids).logits.flatten() for m in models]
            return feats
        emb = [m.model.embed_tokens(ids).flatten() for m in models]
        logits = [m.lm_head(m.model.norm(captured["final"])).flatten() for m in models]
        if tied:
            feats["embed_head"] = [torch.cat([e, lg]) for e, lg in zip(emb, logits)]
        else:
            feats["embed"], feats["head"] = emb, logits
        for i in range(L):
            h, kw = captured[("layer", i)]
            kw = {k: v for k, v in kw.items() if k in ("attention_mask", "position_embeddings", "position_ids")}
            layers = [m.model.layers[i] for m in models]
            if granularity == "layer":
                feats[f"layers.{i}"] = [lay(h, **kw).flatten() for lay in layers]
                continue
            feats[f"layers.{i}.attn"] = [lay.self_attn(lay.input_layernorm(h), **kw)[0].flatten() for lay in layers]
            mid = captured[("mid", i)]
            feats[f"layers.{i}.mlp"] = [lay.mlp(lay.post_attention_layernorm(mid)).flatten() for lay in layers]
            if granularity == "head_mlp":
                feats.update(head_features(layers, h, kw, cfg, i))
    return feats


def head_features(layers, h, kw, cfg, i):
    """Each kv group's contribution to o_proj's output: version v's q/k/v/o, the base's norms."""
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    x = layers[0].input_layernorm(h)
    zs, wos = [], []
    for lay in layers:
        attn = copy.deepcopy(layers[0].self_attn)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(attn, proj).load_state_dict(getattr(lay.self_attn, proj).state_dict())
        z = {}
        attn.o_proj.register_forward_pre_hook(lambda m, a: z.__setitem__("z", a[0]))
        attn(x, **kw)
        zs.append(z["z"])
        wos.append(lay.self_attn.o_proj.weight)
    out = {}
    for g in range(cfg.num_key_value_heads):
        cols = slice(g * G * hd, (g + 1) * G * hd)
        out[f"layers.{i}.head.{g}"] = [(z[..., cols] @ w[:, cols].T).flatten() for z, w in zip(zs, wos)]
    return out


def reference_alphas(models, samples, granularity, tied, balance, T):
    grams: dict[str, list] = {}
    tasks = []
    for t, ids in samples:
        tasks.append(t)
        for name, fs in module_features(models, ids, granularity, tied).items():
            d = np.stack([(f - fs[0]).double().numpy() for f in fs[1:]])  # (T, D)
            grams.setdefault(name, []).append(d @ d.T)
    tasks = np.array(tasks)
    alphas = {}
    for name, gs in grams.items():
        B = np.zeros((T, T, T))
        for a in range(T):
            for b in range(T):
                for c in range(T):
                    vals = []
                    for x in np.where(tasks == a)[0]:
                        g = gs[x]
                        denom = np.trace(g) / T if balance else 1.0
                        vals.append(g[b, c] / denom)
                    B[a, b, c] = np.mean(vals)
        A = np.array([[sum(B[t, j, k] for t in range(T)) for k in range(T)] for j in range(T)])
        bvec = np.array([sum(B[t, j, t] for t in range(T)) for j in range(T)])
        alphas[name] = np.linalg.solve(A, bvec)
    return alphas


def owner(name, granularity, tied, cfg):
    """Module (and head slicing) of each tensor, written out for Llama-style names."""
    if granularity == "model":
        return "model"
    if name == "model.embed_tokens.weight" or (tied and name == "model.norm.weight"):
        return "embed_head" if tied else "embed"
    if name in ("model.norm.weight", "lm_head.weight"):
        return "head"
    i = int(name.split(".")[2])
    if granularity == "layer":
        return f"layers.{i}"
    if ".mlp." in name or "post_attention_layernorm" in name:
        return f"layers.{i}.mlp"
    if granularity == "head_mlp" and any(p in name for p in ("q_proj", "k_proj", "v_proj", "o_proj.weight")):
        return "heads"
    return f"layers.{i}.attn"


def reference_merge(models, alphas, granularity, tied):
    cfg = models[0].config
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    G = cfg.num_attention_heads // cfg.num_key_value_heads
    sds = [m.state_dict() for m in models]
    out = {}
    for name, w0 in sds[0].items():
        if tied and name == "lm_head.weight":
            continue
        mod = owner(name, granularity, tied, cfg)
        merged = w0.clone().double()
        for t in range(1, len(sds)):
            tau = (sds[t][name] - w0).double()
            if mod == "heads":
                i = int(name.split(".")[2])
                coef = torch.zeros(w0.shape[1] if "o_proj" in name else w0.shape[0], dtype=torch.float64)
                per = G * hd if ("q_proj" in name or "o_proj" in name) else hd
                for g in range(cfg.num_key_value_heads):
                    coef[g * per:(g + 1) * per] = alphas[f"layers.{i}.head.{g}"][t - 1]
                coef = coef[None, :] if "o_proj" in name else coef.reshape(-1, *([1] * (w0.dim() - 1)))
                merged += coef * tau
            else:
                merged += alphas[mod][t - 1] * tau
        out[name] = merged
    return out


CASES = [("llama", g) for g in ("model", "layer", "attn_mlp", "head_mlp")] + \
        [("qwen2", g) for g in ("model", "layer", "attn_mlp", "head_mlp")] + \
        [("mistral", g) for g in ("model", "layer", "attn_mlp", "head_mlp")] + [("qwen3", "head_mlp")]


@pytest.mark.parametrize("arch,granularity", CASES)
@pytest.mark.parametrize("balance", [True, False])
def test_streaming_merge_matches_whole_model_reference(tmp_path, arch, granularity, balance):
    T = 3
    base, tuned = make_family(tmp_path, arch, T=T, layers=2)
    data = make_data(tmp_path, T=T, n=10)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity=granularity,
                       num_samples=NUM_SAMPLES, balance=balance, batch_size=4)
    out = run_merge(cfg, tmp_path / "out", progress=False)

    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in [base, *tuned]]
    tied = bool(models[0].config.tie_word_embeddings)
    samples = load_samples(AutoTokenizer.from_pretrained(base), data)
    ref = reference_alphas(models, samples, granularity, tied, balance, T)

    report = json.loads((out / "slta_report.json").read_text())
    got = {k: np.array(v["alpha"]) for k, v in report["modules"].items()}
    assert set(got) == set(ref) | ({f"layers.{i}.attn" for i in range(2)} if granularity == "head_mlp" else set())
    for name, a in ref.items():
        np.testing.assert_allclose(got[name], a, rtol=1e-5, atol=1e-7, err_msg=name)

    merged = load_file(out / "model.safetensors")
    expect = reference_merge(models, got, granularity, tied)  # tensors from the reported α...
    expect_ref = reference_merge(models, ref, granularity, tied)  # ...and from the reference α
    assert set(merged) == set(expect)
    for name, w in merged.items():
        w = w.double()
        scale = expect_ref[name].abs().max().item()
        assert (w - expect[name]).abs().max().item() <= 1e-6 * scale, name
        assert (w - expect_ref[name]).abs().max().item() <= 1e-5 * scale, name
