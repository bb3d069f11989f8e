"""slta's options beyond the paper against references written here: `tokens: response` (features sliced
by hand), `inputs: merged` (a whole merged model built layer by layer, inputs captured with hooks),
and `slta solve`'s refusal of the variants that need a forward pass.

The references load whole models, run one sample at a time (no batching, no padding), compute
per-sample Grams and solve Eq. 12-14 / 33-34 with numpy; nothing from slta's feature or solve code."""

from __future__ import annotations

import copy
import json
import random
from collections import defaultdict

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from test_merge_reference import head_features, reference_merge
from tiny import make_data, make_family, make_tokenizer, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.config import ConfigError, load_config
from slta.engine.tokens import counted_positions
from slta.io.inputs import MergeError
from slta.merge import run_merge
from slta.merges.stats import run_solve

torch.set_num_threads(1)
N = 5  # samples per task
ZOO_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}USER: {{ m['content'] }}\n"
                "{% else %}ASSISTANT: {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}ASSISTANT:{% endif %}")


def samples(tok, data):
    """(task, ids, first response position or 0) with slta's draw. The tiny tokenizer is one token per
    character and adds no special token, so a prompt/response sample's response starts at len(prompt)."""
    out = []
    for t, path in enumerate(data):
        rows = [json.loads(line) for line in open(path) if line.strip()]
        for i in sorted(random.Random(0).sample(range(len(rows)), N)):
            r = rows[i]
            text = r["text"] if "text" in r else r["prompt"] + r["response"]
            out.append((t, torch.tensor([tok(text)["input_ids"]]), 0 if "text" in r else len(r["prompt"])))
    return out


def solve(per_sample, tasks, T, balance=True):
    """Eq. 12-14 (balanced Eq. 33-34) from per-sample lists of T+1 feature vectors, written out."""
    grams = []
    for fs in per_sample:
        d = np.stack([(f - fs[0]).double().numpy().ravel() for f in fs[1:]])
        grams.append(d @ d.T)
    B = np.zeros((T, T, T))
    for a in range(T):
        rows = [g / (np.trace(g) / T if balance else 1.0) for g, t in zip(grams, tasks) if t == a]
        B[a] = np.mean(rows, axis=0)
    A = B.sum(axis=0)
    b = np.array([sum(B[t, j, t] for t in range(T)) for j in range(T)])
    return np.linalg.solve(A, b)


def report_alphas(out):
    rep = json.loads((out / "slta_report.json").read_text())
    return {k: np.array(v["alpha"]) for k, v in rep["modules"].items()}, rep


# -- tokens: response -----------------------------------------------------------------------------

def hand_sliced_alphas(models, smp, T):
    """α of every module (attn_mlp, 2 layers) with each sample's features sliced by hand to positions
    start.. (the response), base-model inputs captured with hooks."""
    feats: dict[str, list] = {}
    with torch.no_grad():
        for _, ids, start in smp:
            cap = {}
            hooks = [lay.register_forward_pre_hook(lambda m, a, kw, i=i, cap=cap: cap.__setitem__(i, (a[0] if a else
                     kw["hidden_states"], kw)), with_kwargs=True) for i, lay in enumerate(models[0].model.layers)]
            hooks += [lay.post_attention_layernorm.register_forward_pre_hook(
                lambda m, a, i=i, cap=cap: cap.__setitem__(("mid", i), a[0]))
                for i, lay in enumerate(models[0].model.layers)]
            hooks.append(models[0].model.norm.register_forward_pre_hook(
                lambda m, a, cap=cap: cap.__setitem__("fin", a[0])))
            models[0](ids)
            for h in hooks:
                h.remove()
            keep = slice(start, None)  # the response positions, by hand
            per = {"embed": [m.model.embed_tokens(ids)[0, keep] for m in models],
                   "head": [m.lm_head(m.model.norm(cap["fin"]))[0, keep] for m in models]}
            for i in range(2):
                h, kw = cap[i]
                kw = {k: v for k, v in kw.items() if k in ("attention_mask", "position_embeddings", "position_ids")}
                lays = [m.model.layers[i] for m in models]
                per[f"layers.{i}.attn"] = [lay.self_attn(lay.input_layernorm(h), **kw)[0][0, keep] for lay in lays]
                mid = cap[("mid", i)]
                per[f"layers.{i}.mlp"] = [lay.mlp(lay.post_attention_layernorm(mid))[0, keep] for lay in lays]
            for k, v in per.items():
                feats.setdefault(k, []).append(v)
    tasks = [t for t, _, _ in smp]
    return {name: solve(per_sample, tasks, T) for name, per_sample in feats.items()}


def test_tokens_response_equals_hand_sliced_features(tmp_path):
    T = 3
    base, tuned = make_family(tmp_path, "llama", T=T, layers=2)
    data = make_data(tmp_path, T=T, n=10)  # tasks 0, 2: prompt/response; task 1: text (every position)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity="attn_mlp", num_samples=N,
                       batch_size=3, tokens="response")
    got, rep = report_alphas(run_merge(cfg, tmp_path / "out", progress=False))
    assert rep["tokens"] == "response"
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in [base, *tuned]]
    ref = hand_sliced_alphas(models, samples(AutoTokenizer.from_pretrained(base), data), T)
    for name, a in ref.items():
        np.testing.assert_allclose(got[name], a, rtol=1e-5, atol=1e-7, err_msg=name)
    # the paper's objective (every token) gives other α on this data
    all_tokens, _ = report_alphas(run_merge(write_config(tmp_path / "d.yml", base, tuned, data, granularity="attn_mlp",
                                                         num_samples=N, batch_size=3), tmp_path / "all",
                                            progress=False))
    assert not np.allclose(all_tokens["layers.1.mlp"], got["layers.1.mlp"], rtol=1e-4)


@pytest.mark.parametrize("tokens,shift", [("response", 0), ("response_shifted", 1)])
def test_tokens_on_messages_equal_hand_sliced_features(tmp_path, tokens, shift):
    """`messages` samples rendered by the chat template (the demo zoo's chat kind): the assistant turn's
    positions, counted by hand on the rendering "USER: q\nASSISTANT: a</s>" (one token per character,
    </s> one token, no special token added)."""
    T = 2
    base, tuned = make_family(tmp_path, "llama", T=T, layers=2)
    tok = make_tokenizer()
    tok.chat_template = ZOO_TEMPLATE
    for folder in [base, *tuned]:
        tok.save_pretrained(folder)
    rng = random.Random(1)
    data, smp = [], []
    for t in range(T):
        rows = []
        for _ in range(N):
            q, a = f"{rng.randint(0, 99)}+{rng.randint(0, 99)}=?", f"{rng.randint(0, 99)} ok" * (1 + t)
            rows.append({"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]})
            smp.append((t, torch.tensor([tok(f"USER: {q}\nASSISTANT: {a}</s>", add_special_tokens=False)["input_ids"]]),
                        len(f"USER: {q}\nASSISTANT:") - shift))
        (tmp_path / f"m{t}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        data.append(tmp_path / f"m{t}.jsonl")
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity="attn_mlp", num_samples=N, batch_size=3,
                       tokens=tokens)
    got, _ = report_alphas(run_merge(cfg, tmp_path / "out", progress=False))
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in [base, *tuned]]
    for name, a in hand_sliced_alphas(models, smp, T).items():
        np.testing.assert_allclose(got[name], a, rtol=1e-5, atol=1e-7, err_msg=name)


def test_response_positions_by_hand():
    tok = make_tokenizer()
    tok.chat_template = ZOO_TEMPLATE
    row = {"prompt": "1+2=?", "response": " 3."}
    ids, mask = counted_positions(row, row["prompt"] + row["response"], tok, "response", True)
    assert len(ids) == 8 and mask == [False] * 5 + [True] * 3  # 5 prompt characters, then 3
    _, shifted = counted_positions(row, row["prompt"] + row["response"], tok, "response_shifted", True)
    assert shifted == [False] * 4 + [True] * 4  # starts at the last prompt position
    text_row = {"text": "abc"}
    assert counted_positions(text_row, "abc", tok, "response", True)[1] == [True] * 3
    msgs = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"},
                         {"role": "user", "content": "x"}, {"role": "assistant", "content": "yes"}]}
    text = tok.apply_chat_template(msgs["messages"], tokenize=False)
    ids, mask = counted_positions(msgs, text, tok, "response", False)
    # "USER: hi\n" (9) "ASSISTANT:" (10) " ok" (3) "</s>" (1) "USER: x\n" (8) "ASSISTANT:" (10) " yes" (4) "</s>"
    expect = [False] * 19 + [True] * 4 + [False] * 18 + [True] * 5
    assert len(ids) == len(expect) and mask == expect


# -- inputs: merged (progressive, A.5.3) ----------------------------------------------------------

def combine(models, names, alpha):
    """{name: θ_0 + Σ_t α_t τ_t} for the given parameter names (Eq. 1)."""
    sds = [m.state_dict() for m in models]
    return {n: sds[0][n] + sum(a * (sd[n] - sds[0][n]) for a, sd in zip(alpha, sds[1:])) for n in names}


def capture(model, ids, module):
    """(args[0], kwargs) entering `module` when `model` runs on ids."""
    cap = {}
    h = module.register_forward_pre_hook(
        lambda m, a, kw: cap.__setitem__("x", (a[0] if a else kw["hidden_states"], kw)), with_kwargs=True)
    with torch.no_grad():
        model(ids)
    h.remove()
    x, kw = cap["x"]
    return x, {k: v for k, v in kw.items() if k in ("attention_mask", "position_embeddings", "position_ids")}


def progressive_reference(models, smp, granularity, T):
    """α of every module solved on the inputs of the model merged so far, layer by layer, with hooks
    on a whole merged model (deep copy of the base whose parameters are replaced as α are solved)."""
    merged = copy.deepcopy(models[0])
    tasks = [t for t, _, _ in smp]
    tied = models[0].config.tie_word_embeddings
    alphas = {}
    with torch.no_grad():
        emb = [[m.model.embed_tokens(ids) for m in models] for _, ids, _ in smp]
        if not tied:  # tied: the embedding is solved last, with the head; layer 0 starts from the base's
            alphas["embed"] = solve(emb, tasks, T)
            merged.load_state_dict(combine(models, ["model.embed_tokens.weight"], alphas["embed"]), strict=False)
        for i in range(models[0].config.num_hidden_layers):
            lays = [m.model.layers[i] for m in models]
            pre = f"model.layers.{i}."
            names = [n for n in models[0].state_dict() if n.startswith(pre)]
            ins = [capture(merged, ids, merged.model.layers[i]) for _, ids, _ in smp]
            if granularity == "layer":
                alphas[f"layers.{i}"] = a = solve([[lay(h, **kw) for lay in lays] for h, kw in ins], tasks, T)
                merged.load_state_dict(combine(models, names, a), strict=False)
                continue
            alphas[f"layers.{i}.attn"] = a = solve(
                [[lay.self_attn(lay.input_layernorm(h), **kw)[0] for lay in lays] for h, kw in ins], tasks, T)
            attn = [n for n in names if "self_attn" in n or "input_layernorm" in n]
            if granularity == "head_mlp":  # each kv group's α on its q/k/v rows and o_proj columns
                per_head = [head_features(lays, h, kw, models[0].config, i) for h, kw in ins]
                for g in per_head[0]:
                    alphas[g] = solve([p[g] for p in per_head], tasks, T)
                full = reference_merge(models, defaultdict(lambda: np.zeros(T), alphas), "head_mlp",
                                       models[0].config.tie_word_embeddings)
                merged.load_state_dict({n: full[n].float() for n in attn}, strict=False)
            else:
                merged.load_state_dict(combine(models, attn, a), strict=False)
            mids = [capture(merged, ids, merged.model.layers[i].post_attention_layernorm)[0] for _, ids, _ in smp]
            alphas[f"layers.{i}.mlp"] = a = solve(
                [[lay.mlp(lay.post_attention_layernorm(m)) for lay in lays] for m in mids], tasks, T)
            merged.load_state_dict(combine(models, [n for n in names if n not in attn], a), strict=False)
        fins = [capture(merged, ids, merged.model.norm)[0] for _, ids, _ in smp]
        logits = [[m.lm_head(m.model.norm(x)) for m in models] for x in fins]
        if tied:  # one module, both outputs
            alphas["embed_head"] = a = solve([[torch.cat([e.flatten(), lg.flatten()]) for e, lg in zip(es, ls)]
                                              for es, ls in zip(emb, logits)], tasks, T)
            merged.load_state_dict(combine(models, ["model.norm.weight", "model.embed_tokens.weight"], a), strict=False)
        else:
            alphas["head"] = a = solve(logits, tasks, T)
            merged.load_state_dict(combine(models, ["model.norm.weight", "lm_head.weight"], a), strict=False)
    return alphas, merged.state_dict()


@pytest.mark.parametrize("arch,granularity", [("llama", "layer"), ("llama", "attn_mlp"), ("qwen2", "attn_mlp"),
                                               ("qwen2", "head_mlp")])
def test_inputs_merged_equals_layer_by_layer_reference(tmp_path, arch, granularity):
    T = 3
    base, tuned = make_family(tmp_path, arch, T=T, layers=2, scale=0.2)
    data = make_data(tmp_path, T=T, n=10)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity=granularity, num_samples=N,
                       batch_size=3, inputs="merged")
    out = run_merge(cfg, tmp_path / "out", progress=False)
    got, rep = report_alphas(out)
    assert rep["inputs"] == "merged"
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in [base, *tuned]]
    ref, ref_sd = progressive_reference(models, samples(AutoTokenizer.from_pretrained(base), data), granularity, T)
    assert set(got) == set(ref)
    for name, a in ref.items():
        np.testing.assert_allclose(got[name], a, rtol=1e-5, atol=1e-6, err_msg=name)
    written = load_file(out / "model.safetensors")
    assert set(written) <= set(ref_sd)
    for name, w in written.items():
        scale = ref_sd[name].abs().max().item()
        assert (w - ref_sd[name]).abs().max().item() <= 1e-5 * scale, name
    # progressive inputs change the α after the first layer
    paper, _ = report_alphas(run_merge(write_config(tmp_path / "d.yml", base, tuned, data, granularity=granularity,
                                                    num_samples=N, batch_size=3), tmp_path / "paper", progress=False))
    last = "embed_head" if "embed_head" in got else "head"
    assert np.allclose(paper.get("embed", 0), got.get("embed", 0))
    assert not np.allclose(paper[last], got[last], rtol=1e-4)


# -- slta solve and config --------------------------------------------------------------------------

def test_solve_refuses_variants_that_need_a_forward_pass(tmp_path):
    base, tuned = make_family(tmp_path, "llama", T=2, layers=1)
    data = make_data(tmp_path, T=2, n=8)
    ok = run_merge(write_config(tmp_path / "a.yml", base, tuned, data, num_samples=4, tokens="response"),
                   tmp_path / "a", progress=False)
    solved = run_solve(ok, tmp_path / "a2", progress=False)  # tokens: response is solvable from its Grams
    a, _ = report_alphas(ok)
    b, _ = report_alphas(solved)
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
    for i, extra in enumerate(({"inputs": "merged"}, {"refine": 1})):
        out = run_merge(write_config(tmp_path / f"v{i}.yml", base, tuned, data, num_samples=4, **extra),
                        tmp_path / f"v{i}", progress=False)
        with pytest.raises(MergeError, match="needs a forward pass") as e:
            run_solve(out, tmp_path / f"s{i}", progress=False)
        assert "\n" not in str(e.value)
        assert not (tmp_path / f"s{i}").exists()


@pytest.mark.parametrize("params,msg", [({"tokens": "prompt"}, "tokens"), ({"inputs": "merge"}, "inputs"),
                                        ({"refine": -1}, "refine"), ({"refine": 1.5}, "refine"),
                                        ({"inputs": "merged", "granularity": "model"}, "granularity"),
                                        ({"refine": 2, "granularity": "head_mlp"}, "granularity")])
def test_variant_parameters_are_checked(tmp_path, params, msg):
    raw = {"merge_method": "slta", "base_model": str(tmp_path), "parameters": params,
           "models": [{"model": str(tmp_path / "a"), "data": str(tmp_path / "a.jsonl")}]}
    with pytest.raises(ConfigError, match=msg):
        load_config(raw)
