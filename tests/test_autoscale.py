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


def test_scale_per_model_multiplies_each_tasks_alpha_and_solve_picks_the_subsets(tmp_path):
    """`scale: [c_1, ..., c_T]`: each task's α times its own factor, in the merge and in `slta solve`
    (a subset keeps its models' factors; `scale=` replaces them)."""
    from slta.merges.stats import run_solve

    T = 3
    base, tuned = make_family(tmp_path, "llama", T=T, layers=1, scale=0.3)
    data = make_data(tmp_path, T=T, n=8)
    params = dict(granularity="attn_mlp", num_samples=N)
    paper = run_merge(write_config(tmp_path / "p.yml", base, tuned, data, **params), tmp_path / "p", progress=False)
    factors = [1.5, 0.5, 2.0]
    out = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, scale=factors, **params), tmp_path / "c",
                    progress=False)
    ref = json.loads((paper / "slta_report.json").read_text())["modules"]
    got = json.loads((out / "slta_report.json").read_text())
    assert got["scale"] == factors
    for name, info in got["modules"].items():
        np.testing.assert_allclose(info["alpha"], np.array(ref[name]["alpha"]) * factors, rtol=1e-12)
    # the weights: θ_0 + Σ_t c_t α_t τ_t, recomputed here in float64 from the paper's α
    w0, ws = load_file(base / "model.safetensors"), [load_file(t / "model.safetensors") for t in tuned]
    merged = load_file(out / "model.safetensors")
    name = "model.layers.0.mlp.down_proj.weight"
    alpha = np.array(ref["layers.0.mlp"]["alpha"]) * factors
    expect = w0[name].double() + sum(a * (w[name].double() - w0[name].double()) for a, w in zip(alpha, ws))
    torch.testing.assert_close(merged[name].double(), expect, rtol=1e-5, atol=1e-6)
    # slta solve on models 0 and 2: their factors (1.5, 2.0); or factors given
    pair = json.loads((run_solve(out / "slta_stats.safetensors", tmp_path / "s", models=[0, 2], progress=False)
                       / "slta_report.json").read_text())
    plain = json.loads((run_solve(paper / "slta_stats.safetensors", tmp_path / "s1", models=[0, 2], progress=False)
                        / "slta_report.json").read_text())
    given = json.loads((run_solve(paper / "slta_stats.safetensors", tmp_path / "s2", models=[0, 2], progress=False,
                                  scale=[1.5, 2.0]) / "slta_report.json").read_text())
    for name, info in plain["modules"].items():
        np.testing.assert_allclose(pair["modules"][name]["alpha"], np.array(info["alpha"]) * [1.5, 2.0], rtol=1e-12)
        np.testing.assert_allclose(given["modules"][name]["alpha"], pair["modules"][name]["alpha"], rtol=1e-12)


def test_scale_auto_task_matches_whole_models_and_the_margin_rule(tmp_path):
    """`scale: auto_task`: each task's fine-tune loss and its loss under every factor (that task's α times f)
    equal whole transformers models' on that task's calibration responses; the chosen factors follow
    the rule (the smallest f within the margin of the fine-tune's loss, else 1) and the
    written merge is the merge with those factors."""
    from slta.merges.autoscale import TASK_FACTORS

    T = 2
    base, tuned = make_family(tmp_path, "llama", T=T, layers=2, scale=0.3)
    data = make_data(tmp_path, T=T, n=10)
    params = dict(granularity="layer", num_samples=N, batch_size=3)
    margin = 0.02
    auto = run_merge(write_config(tmp_path / "a.yml", base, tuned, data, scale="auto_task", scale_margin=margin,
                                  **params), tmp_path / "auto", progress=False)
    search = json.loads((auto / "slta_report.json").read_text())["scale_search"]
    ins = open_inputs(load_config(tmp_path / "a.yml"))
    tasks, _, masks = calibration_masks(ins, "response")
    own = [reference_losses(tuned[t], tasks, masks)[t] for t in range(T)]
    np.testing.assert_allclose(search["fine_tune_loss"], own, rtol=1e-5)
    chosen = []
    for t in range(T):
        loss = []
        for f in TASK_FACTORS:
            factors = [f if u == t else 1.0 for u in range(T)]
            folder = run_merge(write_config(tmp_path / f"f{t}{f}.yml", base, tuned, data, scale=factors, **params),
                               tmp_path / f"f{t}-{f}", progress=False)
            loss.append(reference_losses(folder, tasks, masks)[t])
        np.testing.assert_allclose(search["loss"][t], loss, rtol=1e-5, err_msg=f"task {t}")
        within = [f for f, v in zip(TASK_FACTORS, loss) if v <= own[t] + margin]
        chosen.append(min(within) if within else 1.0)
    assert search["chosen"] == chosen
    fixed = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, scale=chosen, **params), tmp_path / "c",
                      progress=False)
    a, b = load_file(auto / "model.safetensors"), load_file(fixed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("params,match", [
    ({"scale": [1.0]}, "one positive number per model"),
    ({"scale": [1.0, 0.0]}, "one positive number per model"),
    ({"scale": [1.0, True]}, "one positive number per model"),
    ({"scale": "auto_task", "inputs": "merged"}, "auto_task needs inputs: base"),
    ({"scale": [1.0, 1.2], "refine": 1}, "not with refine"),
    ({"scale_margin": -0.1}, "scale_margin: expected a non-negative number"),
    ({"scale": "autotask"}, "auto, auto_task or auto_joint"),
    ({"scale": "auto_joint", "refine": 1}, "auto_joint needs inputs: base"),
])
def test_scale_config_errors(tmp_path, params, match):
    raw = {"merge_method": "slta", "base_model": str(tmp_path), "parameters": params,
           "models": [{"model": str(tmp_path / m), "data": str(tmp_path / f"{m}.jsonl")} for m in "ab"]}
    with pytest.raises(ConfigError, match=match):
        load_config(raw)


def test_task_factor_rule():
    from slta.merges.autoscale import task_factor

    factors = (0.8, 1.0, 1.2, 1.4)
    assert task_factor(0.1, [0.5, 0.3, 0.12, 0.11], factors, 0.05) == 1.2  # the smallest within the margin
    assert task_factor(0.1, [0.5, 0.3, 0.12, 0.11], factors, 0.0) == 1.0  # none within: α as solved
    assert task_factor(0.1, [0.09, 0.3, 0.12, 0.11], factors, 0.0) == 0.8  # below the fine-tune's own counts


def test_joint_factors_rule():
    """auto_joint's rule on a loss table written by hand: a task over its margin under the factors together
    gets the smallest larger factor that brings it back (the others as they are); one that none brings
    back is given up on and keeps its factor; factors only rise; the last check is what is reported."""
    from slta.merges.autoscale import joint_factors

    factors = (0.8, 1.0, 1.2, 1.4)
    own, margin = [0.0, 0.0], 0.1

    def losses(cands, only):  # task 0 needs 1.2 while task 1 is at 1.0, 1.4 once task 1 is at 1.2
        out = []
        for c, t in zip(cands, only):
            if t == 0:
                out.append(0.0 if c[0] >= 1.2 + 0.2 * (c[1] > 1.0) - 1e-9 else 1.0)
            else:  # task 1 is within its margin from 1.2 on, whatever task 0 does
                out.append(0.05 if c[1] >= 1.2 - 1e-9 else 0.5)
        return out

    got = joint_factors(losses, own, [1.0, 1.0], factors, margin)
    # check [1, 1]: both over; raise: task 0 -> 1.2 (task 1 at 1), task 1 -> 1.2; check [1.2, 1.2]: task 0
    # over again (task 1 moved); raise task 0 -> 1.4; check [1.4, 1.2]: none over
    assert [c["factors"] for c in got["checks"]] == [[1.0, 1.0], [1.2, 1.2], [1.4, 1.2]]
    assert [c["over"] for c in got["checks"]] == [[0, 1], [0], []]
    assert [c["excess"] for c in got["checks"]] == pytest.approx([0.9 + 0.4, 0.9, 0.0])
    assert got["chosen"] == [1.4, 1.2] and got["kept"] == 2 and got["given_up"] == []

    never = joint_factors(lambda cands, only: [1.0 if t == 0 else 0.0 for t in only], own, [0.8, 1.0], factors, margin)
    assert never["chosen"] == [0.8, 1.0] and never["given_up"] == [0]  # nothing brings task 0 back: kept
    assert len(never["checks"]) == 1

    capped = joint_factors(losses, own, [1.0, 1.0], factors, margin, rounds=1)
    assert capped["checks"][-1] == {"factors": [1.2, 1.2], "loss": [1.0, 0.05], "over": [0], "excess": 0.9}
    assert capped["chosen"] == [1.2, 1.2] and capped["kept"] == 1  # out of raises: the least excess so far

    def worse(cands, only):  # task 1's raise pushes task 0 far out, and nothing brings task 0 back
        return [(2.0 if c[1] > 1.0 else 0.0) if t == 0 else (0.0 if c[1] > 1.0 else 0.3) for c, t in zip(cands, only)]

    back = joint_factors(worse, own, [1.0, 1.0], factors, margin)
    assert [c["factors"] for c in back["checks"]] == [[1.0, 1.0], [1.0, 1.2]] and back["given_up"] == [0]
    assert back["chosen"] == [1.0, 1.0] and back["kept"] == 0  # excess 0.2 against 1.9: the earlier list


@pytest.mark.parametrize("margin,raises", [(0.05, 1), (0.1, 1)])
def test_scale_auto_joint_matches_whole_models(tmp_path, margin, raises):
    """`scale: auto_joint`: starts from auto_task's choice; every check's losses (all factors together) equal
    whole transformers models' on each task's calibration responses; each raise picks what whole models
    say (the smallest larger factor within the margin, others as they were); the written merge is the
    merge with the final factors. On this family the parameters make it raise (asserted, so the test
    cannot pass on the no-raise path alone)."""
    from slta.merges.autoscale import JOINT_ROUNDS, TASK_FACTORS

    T = 3
    base, tuned = make_family(tmp_path, "llama", T=T, layers=2, scale=0.3)
    data = make_data(tmp_path, T=T, n=10)
    params = dict(granularity="layer", num_samples=N, batch_size=3)
    auto = run_merge(write_config(tmp_path / "a.yml", base, tuned, data, scale="auto_joint", scale_margin=margin,
                                  **params), tmp_path / "auto", progress=False)
    search = json.loads((auto / "slta_report.json").read_text())["scale_search"]
    ins = open_inputs(load_config(tmp_path / "a.yml"))
    tasks, _, masks = calibration_masks(ins, "response")
    own = search["fine_tune_loss"]  # checked against whole models by the auto_task test
    memo: dict[tuple[float, ...], list[float]] = {}

    def loss_of(factors: list[float]) -> list[float]:
        key = tuple(factors)
        if key not in memo:
            name = "-".join(map(str, key))
            folder = run_merge(write_config(tmp_path / f"{name}.yml", base, tuned, data, scale=list(key), **params),
                               tmp_path / name, progress=False)
            memo[key] = reference_losses(folder, tasks, masks)
        return memo[key]

    current, gave_up, excess = list(search["one_at_a_time"]), set(), []
    for r, check in enumerate(search["joint"]["checks"]):
        assert check["factors"] == current
        ref = loss_of(current)
        np.testing.assert_allclose(check["loss"], ref, rtol=1e-5, err_msg=f"check {r}")
        assert check["over"] == [t for t in range(T) if ref[t] > own[t] + margin]
        excess.append((sum(max(0.0, v - o - margin) for v, o in zip(ref, own)), check["factors"]))
        todo = [t for t in check["over"] if t not in gave_up]
        if not todo or r == JOINT_ROUNDS:
            break
        raised = list(current)
        for t in todo:
            ok = [f for f in TASK_FACTORS if f > current[t]
                  and loss_of([f if u == t else c for u, c in enumerate(current)])[t] <= own[t] + margin]
            if ok:
                raised[t] = min(ok)
            else:
                gave_up.add(t)
        current = raised
    assert search["joint"]["given_up"] == sorted(gave_up)
    best = min(e for e, _ in excess)  # the least total excess over the margins, the earliest of (near) equals
    kept = next(f for e, f in excess if e <= best + 1e-5)
    assert search["chosen"] == kept
    current = kept
    assert len(search["joint"]["checks"]) - 1 >= raises
    fixed = run_merge(write_config(tmp_path / "c.yml", base, tuned, data, scale=current, **params), tmp_path / "c",
                      progress=False)
    a, b = load_file(auto / "model.safetensors"), load_file(fixed / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
