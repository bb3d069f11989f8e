"""End-to-end merges through `run_merge` / `run_solve` on tiny models built here."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.optimize import minimize
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.io.checkpoint import Checkpoint
from slta.merge import run_merge, run_solve
from tiny import make_data, make_family, write_config


def tensors(folder):
    ck = Checkpoint(folder)
    return {n: ck.get(n).double() for n in ck.names()}


def alphas(folder):
    return {k: np.array(v["alpha"]) for k, v in json.loads((folder / "slta_report.json").read_text())["modules"].items()}


def close(a, b, rtol=1e-6):
    assert set(a) == set(b)
    for n in a:
        assert (a[n] - b[n]).abs().max() <= rtol * b[n].abs().max() + 1e-12, n


@pytest.mark.parametrize("granularity", ["model", "layer", "attn_mlp", "head_mlp"])
def test_single_model_gives_it_back(tmp_path, granularity):
    base, tuned = make_family(tmp_path, "qwen2", T=1)
    data = make_data(tmp_path, T=1)
    out = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, granularity=granularity, num_samples=5),
                    tmp_path / "out", progress=False)
    for name, a in alphas(out).items():
        np.testing.assert_allclose(a, [1.0], rtol=1e-9, err_msg=name)
    ft = tensors(tuned[0])
    ft.pop("lm_head.weight", None)  # tied
    close(tensors(out), ft)


@pytest.mark.parametrize("granularity", ["layer", "attn_mlp", "head_mlp"])
def test_same_finetune_twice_gives_it_back(tmp_path, granularity):
    base, tuned = make_family(tmp_path, "llama", T=2, same=(0, 1))
    data = make_data(tmp_path, T=2)
    out = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, granularity=granularity, num_samples=5),
                    tmp_path / "out", progress=False)
    report = json.loads((out / "slta_report.json").read_text())
    for name, m in report["modules"].items():
        assert np.all(np.isfinite(m["alpha"])), name
        assert m["rule"] == "min-norm" and m["rank"] == 1, name
        assert sum(m["alpha"]) == pytest.approx(1.0, rel=1e-6), name
    close(tensors(out), tensors(tuned[0]))


def test_linear_module_alpha_minimises_true_output_error(tmp_path):
    """For an exactly linear module (a bias-free nn.Linear), the closed form minimises Eq. 10 itself,
    evaluated with the merged weights on the base model's inputs."""
    T = 3
    base, tuned = make_family(tmp_path, "llama", T=T)
    data = make_data(tmp_path, T=T)
    out = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, granularity="linear", num_samples=5,
                                 balance=False), tmp_path / "out", progress=False)
    got = alphas(out)["layers.1.mlp.down_proj"]
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval() for p in [base, *tuned]]
    tok = AutoTokenizer.from_pretrained(base)
    import random
    xs = []
    for t, path in enumerate(data):
        rows = [json.loads(line) for line in open(path)]
        for i in sorted(random.Random(0).sample(range(len(rows)), 5)):
            r = rows[i]
            text = r["text"] if "text" in r else r["prompt"] + r["response"]
            cap = {}
            hook = models[0].model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: cap.setdefault("x", a[0]))
            with torch.no_grad():
                models[0](torch.tensor([tok(text)["input_ids"]]))
            hook.remove()
            xs.append((t, cap["x"][0]))
    W = [m.model.layers[1].mlp.down_proj.weight.detach() for m in models]

    def eq10(alpha):
        merged = W[0] + sum(a * (w - W[0]) for a, w in zip(alpha, W[1:]))
        return sum(np.mean([((x @ merged.T - x @ W[t + 1].T) ** 2).sum().item() for tt, x in xs if tt == t])
                   for t in range(T))

    best = minimize(eq10, np.full(T, 0.5), method="BFGS", options={"gtol": 1e-10})
    np.testing.assert_allclose(got, best.x, rtol=1e-4)
    assert eq10(got) <= best.fun * (1 + 1e-6)


def test_output_loads_and_generates(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2)
    data = make_data(tmp_path, T=2)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity="attn_mlp", num_samples=4)
    out = run_merge(cfg, tmp_path / "out", progress=False, shard_size=20000)  # force several shards
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    for f in ("config.json", "tokenizer.json", "generation_config.json", "README.md", "slta_report.json",
              "slta_stats.safetensors"):
        assert (out / f).exists(), f
    model = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    ids = tok("12+3=?", return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5
    sd = model.state_dict()
    for n, w in tensors(out).items():
        assert torch.equal(sd[n].double(), w), n


@pytest.mark.parametrize("balance", [True, False])
def test_resolve_subset_from_stats_equals_fresh_merge(tmp_path, balance):
    T = 3
    base, tuned = make_family(tmp_path, "llama", T=T)
    data = make_data(tmp_path, T=T)
    full = run_merge(write_config(tmp_path / "full.yml", base, tuned, data, granularity="attn_mlp", num_samples=5,
                                  balance=True), tmp_path / "full", progress=False)
    sub = [0, 2]
    fresh = run_merge(write_config(tmp_path / "sub.yml", base, [tuned[i] for i in sub], [data[i] for i in sub],
                                   granularity="attn_mlp", num_samples=5, balance=balance),
                      tmp_path / "fresh", progress=False)
    solved = run_solve(full / "slta_stats.safetensors", tmp_path / "solved", models=sub, balance=balance,
                       progress=False)
    a, b = alphas(solved), alphas(fresh)
    assert set(a) == set(b)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-9, err_msg=name)
    close(tensors(solved), tensors(fresh), rtol=1e-7)


def test_pytorch_bin_checkpoints_read_like_safetensors(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2)
    data = make_data(tmp_path, T=2)
    for p in [base, *tuned]:  # a .bin copy of every checkpoint
        sd = load_file(p / "model.safetensors")
        b = tmp_path / f"bin_{p.name}"
        b.mkdir()
        torch.save(sd, b / "pytorch_model.bin")
        for f in p.iterdir():
            if f.suffix != ".safetensors":
                (b / f.name).write_bytes(f.read_bytes())
    a = run_merge(write_config(tmp_path / "a.yml", base, tuned, data, num_samples=4), tmp_path / "a", progress=False)
    bins = [tmp_path / f"bin_{p.name}" for p in [base, *tuned]]
    b = run_merge(write_config(tmp_path / "b.yml", bins[0], bins[1:], data, num_samples=4), tmp_path / "b",
                  progress=False)
    close(tensors(a), tensors(b), rtol=0)


def test_data_free_methods_match_direct_computation(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=3)
    w0, ws = tensors(base), [tensors(t) for t in tuned]
    cfg = write_config(tmp_path / "ta.yml", base, tuned, None, method="task_arithmetic", weight=0.4)
    out = run_merge(cfg, tmp_path / "ta", progress=False)
    close(tensors(out), {n: w0[n] + sum(0.4 * (w[n] - w0[n]) for w in ws) for n in w0})
    cfg = write_config(tmp_path / "wa.yml", base, tuned, None, method="weight_average")
    out = run_merge(cfg, tmp_path / "wa", progress=False)
    close(tensors(out), {n: sum(w[n] for w in ws) / 3 for n in w0})


def test_existing_output_refused_without_overwrite(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2)
    cfg = write_config(tmp_path / "ta.yml", base, tuned, None, method="task_arithmetic", weight=0.5)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("x")
    (tmp_path / "out" / "config.json").write_text("{}")  # an older model: --overwrite replaces only such folders
    with pytest.raises(FileExistsError):
        run_merge(cfg, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").exists()
    run_merge(cfg, tmp_path / "out", progress=False, overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists() and (tmp_path / "out" / "model.safetensors").exists()
    assert not list(tmp_path.glob(".out.*"))


@pytest.mark.parametrize("arch,granularity", [("llama", "attn_mlp"), ("llama", "layer"), ("qwen2", "attn_mlp"),
                                              ("llama", "model")])
def test_exported_mergekit_config_reproduces_the_merge(tmp_path, arch, granularity):
    """The α exported as a mergekit task_arithmetic YAML (per-layer gradients under filters) gives
    the same tensors as the closed-form merge itself."""
    base, tuned = make_family(tmp_path, arch, T=2, layers=3)
    data = make_data(tmp_path, T=2)
    out = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, granularity=granularity, num_samples=4),
                    tmp_path / "out", progress=False)
    exported = out / "mergekit_config.yml"
    assert exported.exists()
    again = run_merge(exported, tmp_path / "again", progress=False)
    close(tensors(again), tensors(out), rtol=1e-6)


def test_base_listed_among_models_is_dropped_like_mergekit(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2)
    w0, ws = tensors(base), [tensors(t) for t in tuned]
    import yaml
    cfg = {"merge_method": "linear", "base_model": str(base),
           "models": [{"model": str(base)}] + [{"model": str(t), "parameters": {"weight": 1.0}} for t in tuned]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    out = run_merge(tmp_path / "c.yml", tmp_path / "out", progress=False)
    close(tensors(out), {n: (ws[0][n] + ws[1][n]) / 2 for n in w0})


def test_model_level_is_one_alpha_for_the_whole_model_lm_head_included(tmp_path):
    """Paper Table 13: one α vector for the whole model. lm_head used to get its own α (issue #14)."""
    from safetensors.torch import load_file

    base, tuned = make_family(tmp_path, "llama", T=2, tied=False)
    data = make_data(tmp_path, T=2, n=6)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity="model", num_samples=4)
    out = run_merge(cfg, tmp_path / "out", progress=False)
    report = json.loads((out / "slta_report.json").read_text())
    assert list(report["modules"]) == ["model"]
    assert "logits" in report["model_features"]
    alpha = report["modules"]["model"]["alpha"]
    sds = [load_file(p / "model.safetensors") for p in (base, *tuned)]
    merged = load_file(out / "model.safetensors")
    for name in ("lm_head.weight", "model.layers.0.mlp.up_proj.weight"):
        expect = sds[0][name] + sum(a * (sd[name] - sds[0][name]) for a, sd in zip(alpha, sds[1:]))
        torch.testing.assert_close(merged[name], expect, rtol=1e-5, atol=1e-6)


def test_random_model_of_the_same_shape_is_not_a_fine_tune(tmp_path):
    """Hidden size 64: with norm weights in the distance a random model measured 0.474 < 0.5 (issue #14)."""
    from slta.io.inputs import MergeError

    base, tuned = make_family(tmp_path, "llama", T=2, hidden=64, heads=4, kv_heads=2)
    torch.manual_seed(123)
    stranger = AutoModelForCausalLM.from_pretrained(base)
    with torch.no_grad():
        for n, p in stranger.named_parameters():
            if "norm" not in n:
                p.copy_(torch.randn_like(p) * p.std())
    stranger.save_pretrained(tmp_path / "stranger")
    AutoTokenizer.from_pretrained(base).save_pretrained(tmp_path / "stranger")
    cfg = write_config(tmp_path / "c.yml", base, [tuned[0], tmp_path / "stranger"], None,
                       method="task_arithmetic", weight=0.5)
    with pytest.raises(MergeError, match=r"stranger: not a fine-tune of .* weight matrices .*tensor model\.layers\.0\."):
        run_merge(cfg, tmp_path / "out", progress=False)


def test_zero_and_duplicate_task_vectors_warn_in_console_and_report(tmp_path, caplog):
    import logging
    import shutil

    base, tuned = make_family(tmp_path, "llama", T=2)
    shutil.copytree(tuned[0], tmp_path / "dup")
    shutil.copytree(base, tmp_path / "same_as_base")
    cfg = write_config(tmp_path / "c.yml", base, [tuned[0], tuned[1], tmp_path / "dup", tmp_path / "same_as_base"],
                       None, method="task_arithmetic", weight=0.3)
    with caplog.at_level(logging.WARNING, logger="slta"):
        out = run_merge(cfg, tmp_path / "out", progress=False)
    warnings = json.loads((out / "slta_report.json").read_text())["warnings"]
    assert any("same_as_base" in w and "zero task vector" in w for w in warnings), warnings
    assert any("dup" in w and "identical" in w and "ft0" in w for w in warnings), warnings
    assert all(any(w in r.getMessage() for r in caplog.records) for w in warnings)


def test_base_without_tokenizer_warns_that_the_output_has_none(tmp_path, caplog):
    import logging

    base, tuned = make_family(tmp_path, "llama", T=2)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            f.unlink()
    cfg = write_config(tmp_path / "c.yml", base, tuned, None, method="task_arithmetic", weight=0.5)
    with caplog.at_level(logging.WARNING, logger="slta"):
        out = run_merge(cfg, tmp_path / "out", progress=False)
    warnings = json.loads((out / "slta_report.json").read_text())["warnings"]
    assert any("no tokenizer files" in w for w in warnings), warnings
    assert any("no tokenizer files" in r.getMessage() for r in caplog.records)
