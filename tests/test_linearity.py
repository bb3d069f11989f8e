"""`slta analyze`: the linearity formulas, a whole-model float64 reference, the figures and the CLI.

The reference below loads every model whole (AutoModelForCausalLM, float64), builds each
interpolated / merged model as a state dict, runs the base model one sample at a time (no batching,
no padding) with hooks that capture each module's input, runs every version's module on it and
computes Eq. 8, 15-17 and 19 with numpy. Nothing from slta's streaming code is used.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import math
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.analysis import figures, linearity
from slta.analysis.linearity import analyze, run_analyze, score_of_function
from slta.config import ConfigError
from tiny import make_data, make_family, save_model, write_config


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matmuls: one thread avoids spin-waiting on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# -- 1. the formulas ---------------------------------------------------------------------------------

def square_score(theta0: float, tau: float, n: int) -> float:
    """Eq. 19 for f(θ) = θ², worked out by hand.

    θ_k = θ_0 + kτ/N, so D(f_i, f_j) = |θ_i² - θ_j²| = (|i-j|τ/N) |2θ_0 + (i+j)τ/N| and
    D(f_N, f_0) = τ |2θ_0 + τ|. With 2θ_0 + (i+j)τ/N > 0 everywhere the ratio minus |i-j|/N is
    (|i-j|/N) ((i+j)/N - 1) τ / (2θ_0 + τ). Writing a = i - N/2, b = j - N/2:
    (i-j)²(i+j-N)² = (a² - b²)², and Σ_{a,b} (a² - b²)² = 2(N+1) S4 - 2 S2² with
    S2 = Σ a² = N(N+1)(N+2)/12, S4 = Σ a⁴ = N(N+1)(N+2)(3N² + 6N - 4)/240. Hence
    score = (τ / (2θ_0 + τ))² (2(N+1) S4 - 2 S2²) / N⁴   (N = 10, θ_0 = τ = 1: 18876/90000).
    """
    s2 = n * (n + 1) * (n + 2) / 12
    s4 = n * (n + 1) * (n + 2) * (3 * n * n + 6 * n - 4) / 240
    return (tau / (2 * theta0 + tau)) ** 2 * (2 * (n + 1) * s4 - 2 * s2 * s2) / n ** 4


def test_square_has_the_hand_derived_score():
    assert square_score(1.0, 1.0, 10) == pytest.approx(18876 / 90000, rel=1e-15)
    got = score_of_function(lambda th: th ** 2, torch.tensor([1.0], dtype=torch.float64),
                            torch.tensor([1.0], dtype=torch.float64))
    assert got == pytest.approx(18876 / 90000, rel=1e-12)


@settings(max_examples=40, deadline=None)
@given(theta0=st.floats(0.05, 5.0), tau=st.floats(0.01, 5.0), n=st.integers(1, 30))
def test_square_score_matches_closed_form(theta0, tau, n):
    got = score_of_function(lambda th: th ** 2, torch.tensor([theta0], dtype=torch.float64),
                            torch.tensor([tau], dtype=torch.float64), steps=n)
    assert got == pytest.approx(square_score(theta0, tau, n), rel=1e-9, abs=1e-15)


def test_bias_free_linear_module_scores_zero():
    torch.manual_seed(0)
    x = torch.randn(7, 16, dtype=torch.float64)  # 7 tokens
    w0, tau = torch.randn(24, 16, dtype=torch.float64), 0.1 * torch.randn(24, 16, dtype=torch.float64)
    assert score_of_function(lambda w: x @ w.T, w0, tau) < 1e-24
    lin = torch.nn.Linear(16, 24, bias=False).double()  # the same through an nn.Linear, float32 too
    f = lambda w: torch.func.functional_call(lin, {"weight": w}, (x.to(w.dtype),))  # noqa: E731
    assert score_of_function(f, w0, tau) < 1e-24
    assert score_of_function(f, w0.float(), tau.float()) < 1e-9
    # and a non-linear one does not score 0
    assert score_of_function(lambda w: torch.tanh(3 * x @ w.T), w0, 5 * tau) > 1e-4


def test_ideal_matrix_and_curve():
    r = torch.as_tensor(linearity.ideal_distances(10))[None]
    assert float(linearity.nonlinearity_score(r)[0]) == 0.0
    assert np.allclose(r[0, :, -1].numpy(), 1 - np.arange(11) / 10)  # Table 18's ideal row


# -- 2. the streaming implementation against a whole-model float64 reference -------------------------

NUM_SAMPLES = 3
GRIDS = {2: (0.2, 0.4, 0.6, 0.8, 1.0), 3: (0.3, 0.5, 0.7)}


def reference_samples(tok, data_files, num):
    out = []
    for t, path in enumerate(data_files):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        idx = sorted(random.Random(0).sample(range(len(rows)), num)) if num < len(rows) else range(len(rows))
        for i in idx:
            r = rows[i]
            text = r["text"] if "text" in r else r["prompt"] + r["response"]
            out.append((t, torch.tensor([tok(text)["input_ids"]])))
    return out


def reference_versions(T, n):
    """{key: coefficient vector}: ("path", t, k) for θ_0 + (k/N)τ_t; ("merge", models, alphas)."""
    out = {}
    for t in range(T):
        for k in range(n + 1):
            out[("path", t, k)] = [k / n if s == t else 0.0 for s in range(T)]
    for size in (2, 3):
        for models in itertools.combinations(range(T), size) if size <= T else []:
            for alphas in itertools.product(GRIDS[size], repeat=size):
                c = [0.0] * T
                for t, a in zip(models, alphas):
                    c[t] = a
                out[("merge", models, alphas)] = c
    return out


def build_model(models, coef):
    """θ_0 + Σ c_t τ_t as a whole float64 model (the fine-tune itself for a unit vector)."""
    if all(c == 0 for c in coef):
        return models[0]
    nz = [t for t, c in enumerate(coef) if c != 0]
    if len(nz) == 1 and coef[nz[0]] == 1.0:
        return models[nz[0] + 1]
    sds = [m.state_dict() for m in models]
    sd = {k: v + sum(c * (sds[t + 1][k] - v) for t, c in enumerate(coef) if c != 0) for k, v in sds[0].items()}
    m = copy.deepcopy(models[0])
    m.load_state_dict(sd)
    return m


def reference_features(base, version, heads_attn, ids, cfg):
    """{module: flattened features} of one whole version model on one sample, module inputs from the base."""
    captured, hooks = {}, []
    for i, layer in enumerate(base.model.layers):
        hooks.append(layer.register_forward_pre_hook(
            lambda m, a, kw, i=i: captured.__setitem__(("h", i), (a[0] if a else kw["hidden_states"], kw)),
            with_kwargs=True))
        hooks.append(layer.post_attention_layernorm.register_forward_pre_hook(
            lambda m, a, i=i: captured.__setitem__(("m", i), a[0])))
    base(ids)
    for h in hooks:
        h.remove()
    feats = {"model": version.model(ids).last_hidden_state.flatten()}
    hd = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    width = cfg.num_attention_heads // cfg.num_key_value_heads * hd
    for i, lay in enumerate(version.model.layers):
        h, kw = captured[("h", i)]
        kw = {k: v for k, v in kw.items() if k in ("attention_mask", "position_embeddings", "position_ids")}
        feats[f"layers.{i}"] = lay(h, **kw).flatten()
        feats[f"layers.{i}.attn"] = lay.self_attn(lay.input_layernorm(h), **kw)[0].flatten()
        feats[f"layers.{i}.mlp"] = lay.mlp(lay.post_attention_layernorm(captured[("m", i)])).flatten()
        attn = heads_attn[i]  # the base's attention (its q/k norms) with this version's q/k/v/o
        z = {}
        hook = attn.o_proj.register_forward_pre_hook(lambda m, a: z.__setitem__("z", a[0]))
        attn(base.model.layers[i].input_layernorm(h), **kw)
        hook.remove()
        for g in range(cfg.num_key_value_heads):
            cols = slice(g * width, (g + 1) * width)
            feats[f"layers.{i}.head.{g}"] = (z["z"][..., cols] @ attn.o_proj.weight[:, cols].T).flatten()
    return {k: v.numpy() for k, v in feats.items()}


def head_attention(base, version, i):
    attn = copy.deepcopy(base.model.layers[i].self_attn)
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        getattr(attn, proj).load_state_dict(getattr(version.model.layers[i].self_attn, proj).state_dict())
    return attn


def reference_analysis(base_dir, tuned_dirs, data, num, n=10):
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float64).eval() for p in [base_dir, *tuned_dirs]]
    cfg = models[0].config
    T = len(tuned_dirs)
    samples = reference_samples(AutoTokenizer.from_pretrained(base_dir), data, num)
    versions = reference_versions(T, n)
    feats = {}  # key -> [per sample {module: vector}]
    with torch.no_grad():
        for key, coef in versions.items():
            m = build_model(models, coef)
            heads = [head_attention(models[0], m, i) for i in range(cfg.num_hidden_layers)]
            feats[key] = [reference_features(models[0], m, heads, ids, cfg) for _, ids in samples]
    names = list(feats[("path", 0, 0)][0])
    ideal = np.abs(np.arange(n + 1)[:, None] - np.arange(n + 1)[None]) / n
    out = {}
    for name in names:
        res = {"score_mean": [], "score_std": [], "curve": [], "matrix": [], "merging": {}}
        for t in range(T):
            scores, curves, mats = [], [], []
            for x in range(len(samples)):
                f = [feats[("path", t, k)][x][name] for k in range(n + 1)]
                d = np.array([[np.linalg.norm(a - b) for b in f] for a in f])
                r = d / d[n, 0]
                scores.append(((r - ideal) ** 2).sum())
                curves.append(r[:, n])
                mats.append(r)
            res["score_mean"].append(np.mean(scores))
            res["score_std"].append(np.std(scores))
            res["curve"].append(np.mean(curves, 0))
            res["matrix"].append(np.mean(mats, 0))
        for size in (2, 3):
            for models_ in itertools.combinations(range(T), size) if size <= T else []:
                pd, cm, cb = [], [], []
                for x in range(len(samples)):
                    f0 = feats[("path", 0, 0)][x][name]
                    dts = {t: feats[("path", t, n)][x][name] - f0 for t in models_}
                    cos = lambda a, b: a @ b / (np.linalg.norm(a) * np.linalg.norm(b))  # noqa: E731
                    cb.append(np.mean([cos(dts[a], dts[b]) for a, b in itertools.combinations(models_, 2)]))
                rs, cs = [], []
                for alphas in itertools.product(GRIDS[size], repeat=size):
                    r_x, c_x = [], []
                    for x in range(len(samples)):
                        f0 = feats[("path", 0, 0)][x][name]
                        dm = feats[("merge", models_, alphas)][x][name] - f0
                        lin = sum(a * (feats[("path", t, n)][x][name] - f0) for a, t in zip(alphas, models_))
                        r_x.append(dm @ lin / (lin @ lin))  # ||Δf_m|| cos / ||lin||  (Eq. 8)
                        c_x.append(dm @ lin / (np.linalg.norm(dm) * np.linalg.norm(lin)))  # Eq. 15
                    rs.append(abs(1 - np.mean(r_x)))
                    cs.append(np.mean(c_x))
                res["merging"][models_] = {"projection_distance": rs, "cosine_merge": cs, "cosine_base": np.mean(cb)}
        out[name] = res
    return out


def close(got, want, name):
    np.testing.assert_allclose(np.asarray(got, dtype=float), np.asarray(want, dtype=float), rtol=1e-6, atol=1e-13,
                               err_msg=name)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "mistral"])
def test_streaming_matches_whole_model_reference(tmp_path, arch):
    T = 3
    base, tuned = make_family(tmp_path, arch, T=T, layers=2, scale=0.1)
    data = make_data(tmp_path, T=T, n=6)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, num_samples=NUM_SAMPLES, batch_size=2)
    got = analyze(cfg, dtype="float64", progress=False, stream_memory=1)  # one model pass per batch
    ref = reference_analysis(base, tuned, data, NUM_SAMPLES)
    assert set(got["modules"]) == set(ref)
    assert got["timings"]["model_passes"] == math.ceil(NUM_SAMPLES / 2) * T
    for name, r in ref.items():
        g = got["modules"][name]
        close(g["score"]["mean"], r["score_mean"], f"{name} score")
        close(g["score"]["std"], r["score_std"], f"{name} score std")
        close(g["curve"]["mean"], r["curve"], f"{name} curve")
        close(g["distance_matrix"], r["matrix"], f"{name} matrix")
        assert len(g["merging"]) == 3 + 1
        for entry in g["merging"]:
            rm = r["merging"][tuple(entry["models"])]
            close(entry["projection_distance"], rm["projection_distance"], f"{name} {entry['models']} Eq. 8")
            close(entry["cosine_merge"], rm["cosine_merge"], f"{name} {entry['models']} Eq. 16")
            close(entry["cosine_base"], rm["cosine_base"], f"{name} {entry['models']} Eq. 17")


def test_float32_default_is_close_to_float64(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2, layers=2, scale=0.1)
    data = make_data(tmp_path, T=2, n=4)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, num_samples=2, batch_size=4)
    a = analyze(cfg, progress=False, levels=["model", "mlp"])
    b = analyze(cfg, progress=False, levels=["model", "mlp"], dtype="float64")
    assert a["dtype"] == "float32" and b["dtype"] == "float64"
    for name in b["modules"]:
        np.testing.assert_allclose(a["modules"][name]["curve"]["mean"], b["modules"][name]["curve"]["mean"],
                                   rtol=1e-3, atol=1e-4)


# -- exactly linear modules through the pipeline ------------------------------------------------------

def only_output_projections(root, T=3):
    """Fine-tunes that move only o_proj and down_proj: the attention block, every head and the MLP
    block are then exactly linear in their weights (on fixed inputs); layers and the model are not."""
    base_dir, tuned = make_family(root, "llama", T=T, layers=2, scale=0.2)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    sd0 = base.state_dict()
    for d in tuned:
        m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        sd = {k: (v if ("o_proj" in k or "down_proj" in k) else sd0[k]) for k, v in m.state_dict().items()}
        m.load_state_dict(sd)
        save_model(m, d)
    return base_dir, tuned


def test_exactly_linear_modules_score_zero_in_the_pipeline(tmp_path):
    base, tuned = only_output_projections(tmp_path)
    data = make_data(tmp_path, T=3, n=4)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, num_samples=2, batch_size=4)
    got = analyze(cfg, dtype="float64", progress=False)
    ideal_curve = 1 - np.arange(11) / 10
    for name, m in got["modules"].items():
        if m["level"] in ("attn", "mlp", "head"):
            assert max(m["score"]["mean"]) < 1e-20, name
            np.testing.assert_allclose(m["curve"]["mean"], [ideal_curve] * 3, atol=1e-12)
            for entry in m["merging"]:
                assert max(entry["projection_distance"]) < 1e-12, name
                assert min(entry["cosine_merge"]) > 1 - 1e-12, name
    assert min(got["modules"]["model"]["score"]["mean"]) > 1e-8
    assert min(got["modules"]["layers.1"]["score"]["mean"]) > 1e-10
    summary = got["summary"]["score"]
    assert list(summary) == ["model", "layer", "attn", "mlp", "head"]
    assert summary["model"][0]["mean"] > 100 * summary["mlp"][0]["mean"]


# -- 3. the command: JSON and figures -----------------------------------------------------------------

def cli(argv):
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    linearity.add_cli(sub)
    figures.add_cli(sub)
    a = p.parse_args(argv)
    a.func(a)


def is_png(path):
    return path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000


def test_analyze_command_writes_json_and_figures(tmp_path, capsys):
    base, tuned = make_family(tmp_path, "llama", T=3, layers=3, scale=0.1)
    data = make_data(tmp_path, T=3, n=6)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, num_samples=2, batch_size=4)
    out = tmp_path / "report"
    cli(["analyze", str(cfg), "-o", str(out), "-q", "--module", "layers.2.attn", "--module", "model"])
    printed = capsys.readouterr().out
    assert "| model |" in printed and "| mlp |" in printed
    data_ = json.loads((out / "linearity.json").read_text())
    # the model level sits beside every module level
    assert list(data_["summary"]["score"]) == ["model", "layer", "attn", "mlp", "head"]
    assert "model" in data_["modules"] and "layers.0.head.1" in data_["modules"]
    assert data_["samples_per_task"] == [2, 2, 2]
    for level, per_model in data_["summary"]["score"].items():
        assert len(per_model) == 3 and all(e["mean"] is not None and e["mean"] >= 0 for e in per_model), level
    assert set(data_["summary"]["merging"]["attn"]) == {"2", "3"}
    for f in ("fig2_nonlinearity_score.png", "fig3_projection_distance.png", "fig4_cosine.png",
              "fig6_distance_matrix.png", "interpolation_curves.png"):
        assert is_png(out / f), f
    assert not list(tmp_path.glob(".report.tmp-*"))
    # an existing folder is refused, and an unknown --module leaves nothing behind
    with pytest.raises(FileExistsError):
        cli(["analyze", str(cfg), "-o", str(out), "-q"])
    with pytest.raises(ConfigError, match="layers.9"):
        cli(["analyze", str(cfg), "-o", str(tmp_path / "r2"), "-q", "--levels", "mlp", "--module", "layers.9"])
    assert not (tmp_path / "r2").exists()
    # the figures can be redrawn from the JSON alone
    redraw = tmp_path / "redraw"
    redraw.mkdir()
    assert all(is_png(p) for p in figures.draw_analysis(data_, redraw))


def test_levels_subset_two_models_and_no_merging(tmp_path):
    base, tuned = make_family(tmp_path, "qwen3", T=2, layers=2, scale=0.1)
    data = make_data(tmp_path, T=2, n=4)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, num_samples=2)
    out = run_analyze(cfg, tmp_path / "r", levels=["attn", "head"], progress=False)
    d = json.loads((out / "linearity.json").read_text())
    assert {m["level"] for m in d["modules"].values()} == {"attn", "head"}
    assert set(d["summary"]["merging"]["head"]) == {"2"}  # two models: no 3-model merges
    assert is_png(out / "fig6_distance_matrix.png") and is_png(out / "fig3_projection_distance.png")
    d2 = analyze(cfg, levels=["model"], merging=False, steps=4, progress=False)
    assert list(d2["modules"]) == ["model"] and d2["modules"]["model"]["merging"] == []
    assert len(d2["modules"]["model"]["curve"]["mean"][0]) == 5


def test_config_without_data_is_refused(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2, layers=1)
    cfg = write_config(tmp_path / "c.yml", base, tuned, None, method="task_arithmetic")
    with pytest.raises(ConfigError, match="calibration data"):
        analyze(cfg, progress=False)


def test_report_draws_alpha_heatmap_from_a_merge(tmp_path, capsys):
    from slta.merge import run_merge

    base, tuned = make_family(tmp_path, "llama", T=3, layers=3)
    data = make_data(tmp_path, T=3, n=6)
    for g in ("head_mlp", "layer", "model"):
        cfg = write_config(tmp_path / f"{g}.yml", base, tuned, data, granularity=g, num_samples=3)
        merged = run_merge(cfg, tmp_path / f"m_{g}", progress=False)
        cli(["report", str(merged), "-o", str(tmp_path / g)])
        assert is_png(tmp_path / g / "fig5_alpha.png"), g
    rows, cols, grid = figures.alpha_grid(json.loads((tmp_path / "m_head_mlp" / "slta_report.json").read_text())["modules"])
    assert rows == [figures.OUTER_ROW, "attn", "head.0", "head.1", "mlp"] and cols == ["embed", "0", "1", "2", "head"]
    assert grid.shape == (3, 5, 5) and np.isfinite(grid[:, 1:, 1:4]).all()
    png = tmp_path / "fig5.png"
    cli(["report", str(tmp_path / "m_layer" / "slta_report.json"), "-o", str(png)])
    assert is_png(png) and "figure written" in capsys.readouterr().out


def test_a_fine_tune_equal_to_the_base_gives_null_not_nan(tmp_path):
    """A module a fine-tune left unchanged has D(f(θ_N), f(θ_0)) = 0: its score is undefined, reported
    as null (valid JSON), and the figures still draw."""
    base, tuned = make_family(tmp_path, "llama", T=2, layers=2, scale=0.1)
    same = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    save_model(same, tuned[1])
    data = make_data(tmp_path, T=2, n=4)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, num_samples=2)
    out = run_analyze(cfg, tmp_path / "r", progress=False, levels=["model", "mlp"])
    text = (out / "linearity.json").read_text()
    assert "NaN" not in text
    d = json.loads(text)
    assert d["modules"]["layers.0.mlp"]["score"]["mean"][1] is None
    assert d["modules"]["layers.0.mlp"]["score"]["mean"][0] > 0
    assert d["summary"]["score"]["mlp"][1]["mean"] is None
    assert d["modules"]["model"]["merging"][0]["projection_distance"][0] is not None  # α_1 τ_1 alone still defined
    assert is_png(out / "fig2_nonlinearity_score.png") and is_png(out / "fig6_distance_matrix.png")


def test_module_of_a_smaller_model_is_refused_before_the_analysis(tmp_path, monkeypatch):
    """`--module layers.9` on a 2-layer model used to fail only after the whole analysis (issue #14)."""
    import slta.analysis.linearity as lin
    from slta.config import ConfigError

    base, tuned = make_family(tmp_path, "llama", T=2, layers=2)
    data = make_data(tmp_path, T=2, n=4)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, num_samples=2)
    monkeypatch.setattr(lin, "analyze", lambda *a, **k: pytest.fail("the analysis ran before the check"))
    with pytest.raises(ConfigError, match=r"'layers\.9' is not a module of .*2 layers"):
        lin.run_analyze(cfg, tmp_path / "rep", module="layers.9", progress=False)
    with pytest.raises(ConfigError, match="which --levels leaves out"):
        lin.run_analyze(cfg, tmp_path / "rep", module="layers.1.mlp", levels=["model", "attn"], progress=False)
    assert not (tmp_path / "rep").exists()
