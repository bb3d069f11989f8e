"""`slta diagnose` (issue 15 item 5) against whole-model recomputations written here, and the
calibration-size re-solve (`slta solve --num-samples`, Table 11) against a fresh measurement.

The reference runs the HF models whole (hooks capture each module's base-model input, as in
test_merge_reference), builds the merged models' state dicts itself, and computes Eq. 10, Eq. 11
and the cosines in float64 from the features, one sample at a time.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_merge_reference import (
    NUM_SAMPLES,
    load_samples,
    module_features,
    reference_merge,
)
from tiny import make_data, make_family, write_config
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.analysis.diagnostics import run_diagnose
from slta.cli import main
from slta.merge import run_merge, run_solve
from slta.merges.stats import read_stats, sample_subset
from slta.solve import solve_module

LAM = 0.6


def _merge(tmp_path, granularity, scale=0.05, balance=True):
    base, tuned = make_family(tmp_path, "llama", T=3, layers=2, scale=scale)
    data = make_data(tmp_path, T=3, n=10)
    cfg = write_config(tmp_path / "c.yml", base, tuned, data, granularity=granularity, num_samples=NUM_SAMPLES,
                       balance=balance, batch_size=4)
    return run_merge(cfg, tmp_path / "out", progress=False), base, tuned, data


def _model_with(base_model, state):
    m = AutoModelForCausalLM.from_config(base_model.config).eval()
    m.load_state_dict(base_model.state_dict())
    m.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    return m


def _reference(base, tuned, data, granularity, alphas, balance, extra=None):
    """{module: (cosine T x T, zero, {point: eq10}, {point: eq11})} from whole models, float64.
    `extra`: more merge points, name -> per-module coefficients."""
    models = [AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval() for p in [base, *tuned]]
    T = len(tuned)
    lam = {k: np.full(T, LAM) for k in alphas}
    coeffs = {"slta": alphas, f"task_arithmetic {LAM:g}": lam, **(extra or {})}
    merged = [_model_with(models[0], reference_merge(models, a, granularity, False)) for a in coeffs.values()]
    acc: dict[str, dict] = {}
    for t, ids in load_samples(AutoTokenizer.from_pretrained(base), data):
        fs = module_features(models, ids, granularity, False)
        fm = module_features([models[0], *merged], ids, granularity, False)
        for name, f in fs.items():
            d = np.stack([(x - f[0]).double().numpy() for x in f[1:]])  # Δf_j, (T, D)
            dm = [(x - fm[name][0]).double().numpy() for x in fm[name][1:]]  # merged − base, per point
            w = 1.0 / np.mean((d ** 2).sum(axis=1)) if balance else 1.0
            a = acc.setdefault(name, {"dots": np.zeros((T, T, T)), "zero": np.zeros(T), "n": np.zeros(T),
                                      "eq10": {p: np.zeros(T) for p in coeffs}, "eq11": {p: np.zeros(T) for p in coeffs}})
            a["dots"][t] += d @ d.T
            a["zero"][t] += w * (d[t] ** 2).sum()
            a["n"][t] += 1
            for k, (p, c) in enumerate(coeffs.items()):
                a["eq11"][p][t] += w * ((c[name] @ d - d[t]) ** 2).sum()
                a["eq10"][p][t] += w * ((dm[k] - d[t]) ** 2).sum()
    out = {}
    for name, a in acc.items():
        s = a["dots"]
        cos = np.array([[s[t, j, t] / np.sqrt(s[t, j, j] * s[t, t, t]) for j in range(T)] for t in range(T)])
        out[name] = (cos, float((a["zero"] / a["n"]).sum()), {p: float((v / a["n"]).sum()) for p, v in a["eq10"].items()},
                     {p: float((v / a["n"]).sum()) for p, v in a["eq11"].items()})
    return out


@pytest.mark.parametrize("granularity", ["attn_mlp", "layer"])
def test_diagnostics_match_whole_model_recomputation(tmp_path, granularity):
    out, base, tuned, data = _merge(tmp_path, granularity)
    doc = run_diagnose(out, tmp_path / "diag", lambdas=[LAM], progress=False)
    assert (tmp_path / "diag" / "diagnostics.png").stat().st_size > 0
    assert json.loads((tmp_path / "diag" / "diagnostics.json").read_text()) == doc
    report = json.loads((out / "slta_report.json").read_text())
    alphas = {k: np.array(v["alpha"]) for k, v in report["modules"].items()}
    ref = _reference(base, tuned, data, granularity, alphas, balance=True)
    assert set(doc["modules"]) == set(alphas)
    assert list(doc["points"]) == ["slta", f"task_arithmetic {LAM:g}"]
    for name, (cos, zero, eq10, eq11) in ref.items():
        m = doc["modules"][name]
        np.testing.assert_allclose(m["alpha"], alphas[name])
        assert m["sum_alpha"] == pytest.approx(alphas[name].sum())
        np.testing.assert_allclose(m["cosine"], cos, atol=1e-5, err_msg=name)
        assert m["zero"] == pytest.approx(zero, rel=1e-4), name
        for p in eq10:
            assert m["eq11"][p] == pytest.approx(eq11[p], rel=1e-4), (name, p)
            assert m["eq10"][p] == pytest.approx(eq10[p], rel=1e-4), (name, p)
        # slta's α minimises Eq. 11: task arithmetic's λ cannot do better on the linearisation
        assert m["eq11"]["slta"] <= m["eq11"][f"task_arithmetic {LAM:g}"] * (1 + 1e-9)
    # the embedding is linear in its weights: Eq. 10 = Eq. 11 exactly (up to rounding)
    emb = doc["modules"]["embed"]
    assert emb["eq10"]["slta"] == pytest.approx(emb["eq11"]["slta"], rel=1e-4)


def test_per_task_scale_points_match_whole_model_recomputation(tmp_path):
    """`--task-scale c`: each task's α times its own factor (issue #28) is a merge point like the others,
    its Eq. 10 / 11 per task against whole models; the per-task summary is the modules' sum / mean."""
    out, base, tuned, data = _merge(tmp_path, "attn_mlp")
    c = [1.5, 1.0, 0.5]
    doc = run_diagnose(out, tmp_path / "diag", lambdas=[LAM], task_scales=[c], progress=False)
    name = "slta x[1.5,1,0.5]"
    assert doc["points"][name] == {"method": "slta", "task_scales": c}
    report = json.loads((out / "slta_report.json").read_text())
    alphas = {k: np.array(v["alpha"]) for k, v in report["modules"].items()}
    ref = _reference(base, tuned, data, "attn_mlp", alphas, balance=True, extra={name: {k: a * c for k, a in alphas.items()}})
    for module, (_, _, eq10, eq11) in ref.items():
        m = doc["modules"][module]
        assert m["eq10"][name] == pytest.approx(eq10[name], rel=1e-4), module
        assert m["eq11"][name] == pytest.approx(eq11[name], rel=1e-4), module
        assert sum(m["eq10_per_task"][name]) == pytest.approx(m["eq10"][name])
        assert sum(m["zero_per_task"]) == pytest.approx(m["zero"])
    summary = doc["summary"]
    np.testing.assert_allclose(summary["mean_alpha_per_task"], np.mean(list(alphas.values()), axis=0))
    np.testing.assert_allclose(summary["totals"][name]["eq10_per_task"],
                               np.sum([m["eq10_per_task"][name] for m in doc["modules"].values()], axis=0))
    assert summary["zero_per_task"] == pytest.approx([sum(m["zero_per_task"][t] for m in doc["modules"].values())
                                                     for t in range(3)])


def test_eq10_equals_eq11_in_the_linear_regime(tmp_path):
    """Fine-tunes that are tiny perturbations: every module is linear in its weights there."""
    gaps = {}
    for scale in (1e-3, 0.1):
        out, *_ = _merge(tmp_path / str(scale), "attn_mlp", scale=scale)
        doc = run_diagnose(out, tmp_path / f"diag{scale}", lambdas=[LAM], alpha_scales=[1.5], progress=False)
        gaps[scale] = max(abs(m["eq10"][p] - m["eq11"][p]) / m["eq11"][p]
                          for m in doc["modules"].values() for p in doc["points"])
    assert gaps[1e-3] < 0.02, gaps
    assert gaps[0.1] > 5 * gaps[1e-3], gaps  # and it is the perturbation's size that makes the gap


def test_diagnose_cli(tmp_path, capsys):
    out, *_ = _merge(tmp_path, "attn_mlp")
    assert main(["diagnose", str(out), "-o", str(tmp_path / "d"), "--lambda", "0.5", "--alpha-scale", "2",
                 "--task-scale", "1,1,1.6", "-q"]) in (0, None)
    doc = json.loads((tmp_path / "d" / "diagnostics.json").read_text())
    assert list(doc["points"]) == ["slta", "slta x2", "slta x[1,1,1.6]", "task_arithmetic 0.5"]
    assert doc["points"]["slta x2"] == {"method": "slta", "alpha_scale": 2.0}
    m = doc["modules"]["layers.0.attn"]
    assert m["eq11"]["slta x2"] >= m["eq11"]["slta"]
    assert "Eq. 10" in capsys.readouterr().out
    with pytest.raises(Exception, match="needs 3 factors"):
        run_diagnose(out, tmp_path / "d2", task_scales=[[1.0, 2.0]], progress=False)


def test_subset_resolve_equals_a_fresh_run_on_the_subset(tmp_path):
    """Table 11 from saved statistics: re-solving n samples per task from a run measured on all of
    them gives the α of a merge that measures only those n samples."""
    base, tuned = make_family(tmp_path, "llama", T=3, layers=2)
    data = make_data(tmp_path, T=3, n=10)
    cfg = write_config(tmp_path / "all.yml", base, tuned, data, granularity="attn_mlp", num_samples=10, batch_size=4)
    full = run_merge(cfg, tmp_path / "full", progress=False)
    grams, tasks, meta = read_stats(full)
    assert meta["sample_indices"] == [list(range(10))] * 3  # row j of task t is line j of its file
    rows = sample_subset(tasks, 3, seed=1)
    assert [int((tasks[rows] == t).sum()) for t in range(3)] == [3, 3, 3]
    assert sample_subset(tasks, 3, seed=1).tolist() == rows.tolist() != sample_subset(tasks, 3, seed=2).tolist()
    sub_data = []
    for t, path in enumerate(data):  # the fresh run's data files hold only the chosen lines
        lines = path.read_text().splitlines()
        p = tmp_path / f"sub{t}.jsonl"
        p.write_text("\n".join(lines[r - 10 * t] for r in rows if tasks[r] == t) + "\n")
        sub_data.append(p)
    fresh_cfg = write_config(tmp_path / "sub.yml", base, tuned, sub_data, granularity="attn_mlp", num_samples=3,
                             batch_size=4)
    fresh = run_merge(fresh_cfg, tmp_path / "fresh", progress=False)
    fresh_grams, fresh_tasks, _ = read_stats(fresh)
    fresh_alpha = json.loads((fresh / "slta_report.json").read_text())["modules"]
    solved = run_solve(full, tmp_path / "solved", num_samples=3, sample_seed=1, progress=False)
    solved_report = json.loads((solved / "slta_report.json").read_text())
    assert solved_report["sample_subset"]["rows"] == rows.tolist()
    assert solved_report["samples_per_task"] == [3, 3, 3]
    for name, g in grams.items():
        # float32 features in batches of other lengths (other padding): equal to float32 rounding
        np.testing.assert_allclose(g[rows], fresh_grams[name], rtol=1e-4, atol=1e-6 * np.abs(g).max(), err_msg=name)
        a = solve_module(g[rows], tasks[rows]).alpha
        np.testing.assert_allclose(a, fresh_alpha[name]["alpha"], rtol=1e-4, atol=1e-6, err_msg=name)
        np.testing.assert_allclose(solved_report["modules"][name]["alpha"], a, rtol=1e-12, err_msg=name)
    assert (fresh_tasks == tasks[rows]).all()


class _FakeDemo:
    """What slta.demo.studies.sample_ablation uses of slta.demo.Demo, on a tiny family."""

    def __init__(self, tmp_path, base, tuned, data):
        from slta.demo.table import TASKS

        self.zoo, self.work, self.cache, self.device = tmp_path / "zoo", tmp_path / "work", tmp_path / "cache", "cpu"
        self.cache.mkdir()
        for t, p in zip(TASKS, data):
            (self.zoo / "data" / t).mkdir(parents=True)
            (self.zoo / "data" / t / "calib.jsonl").write_text(p.read_text())
        self.base, self.tuned, self.seen = base, tuned, []

    def key(self, what):
        import hashlib

        return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()[:16]

    def merge_config(self, method, tasks, params):
        return {"merge_method": method, "base_model": str(self.base), "dtype": "float32", "parameters": params,
                "models": [{"model": str(m), "data": str(self.zoo / "data" / t / "calib.jsonl")}
                           for m, t in zip(self.tuned, tasks)]}

    def evaluate(self, model, tasks, split, key):
        report = json.loads((model / "slta_report.json").read_text())
        self.seen.append((report["samples_per_task"], report.get("sample_subset", {}).get("seed")))
        scores = {t: report["samples_per_task"][0] / 100 for t in tasks}
        (self.cache / f"eval-{key}-{split}.json").write_text(json.dumps(scores))
        return scores


def test_sample_ablation_measures_once_and_resolves_every_count(tmp_path, monkeypatch):
    import slta.merge
    from slta.demo.studies import (
        ablation_rows,
        ablation_table,
        sample_ablation,
        sample_counts,
    )

    base, tuned = make_family(tmp_path, "llama", T=3, layers=1)
    demo = _FakeDemo(tmp_path, base, tuned, make_data(tmp_path, T=3, n=12))
    assert sample_counts(demo.zoo) == (12, [1, 3, 10, 12])  # 30 and 50 capped at the 12 lines
    merges = []
    real = slta.merge.run_merge
    monkeypatch.setattr(slta.merge, "run_merge", lambda *a, **k: merges.append(a) or real(*a, **k))
    ab = sample_ablation(demo, levels=("attn_mlp",))
    assert len(merges) == 1  # one forward pass; every count re-solved from its statistics
    assert demo.seen == [([1] * 3, 0), ([1] * 3, 1), ([1] * 3, 2), ([3] * 3, 0), ([3] * 3, 1), ([3] * 3, 2),
                         ([10] * 3, 0), ([10] * 3, 1), ([10] * 3, 2), ([12] * 3, 0)]
    rows = ablation_rows(ab["levels"]["attn_mlp"])
    assert [(n, k) for n, _, k in rows] == [(1, 3), (3, 3), (10, 3), (12, 1)]
    assert rows[1][1]["average"] == pytest.approx((3.0, 0.0)) and rows[1][1]["math"] == pytest.approx((3.0, 0.0))
    assert not any((tmp_path / "work").iterdir())
    again = sample_ablation(demo, levels=("attn_mlp",))  # cached: no merge, the same table
    assert len(merges) == 1 and again == ab
    md = ablation_table({"ablations": {"samples": ab}, "baselines": {}})
    assert "| attn_mlp | 3 | 3.00 ± 0.00 | 3.00 ± 0.00 | 3.00 ± 0.00 | 3.00 ± 0.00 |" in md
    assert "| attn_mlp | 12 | 12.00 | 12.00 | 12.00 | 12.00 |" in md


def test_ablation_summary_across_zoos():
    from slta.demo.studies import ablation_summary
    from slta.demo.table import TASKS, ablation_summary_table

    def zoo(accs):  # {count: [accuracy per draw]}
        runs = {str(n): [{"draw": d, "test": {t: a for t in TASKS}} for d, a in enumerate(v)] for n, v in accs.items()}
        return {"ablations": {"samples": {"levels": {"layer": runs}}}}

    s = ablation_summary([zoo({1: [0.2, 0.4], 5: [0.5]}), zoo({1: [0.4, 0.4], 5: [0.7]})])
    rows = s["levels"]["layer"]
    assert [r["samples"] for r in rows] == [1, 5]
    assert rows[0] == pytest.approx({"samples": 1, "mean": 35.0, "zoo_std": 5.0, "draw_std": 5.0})
    assert rows[1] == pytest.approx({"samples": 5, "mean": 60.0, "zoo_std": 10.0, "draw_std": 0.0})
    assert "| layer | 1 | 35.00 ± 5.00 (draws ± 5.00) |" in ablation_summary_table(s)
    one = ablation_summary([zoo({1: [0.2, 0.4]})])
    assert "| layer | 1 | 30.00 (draws ± 10.00) |" in ablation_summary_table(one)
    assert ablation_summary([{}]) is None and ablation_summary_table(None) == ""


@pytest.mark.parametrize("granularity", ["model", "head_mlp"])
def test_diagnose_other_granularities(tmp_path, granularity):
    """Every cut runs; at head_mlp the heads and the attention blocks (shared tensors) both appear."""
    out, *_ = _merge(tmp_path, granularity)
    doc = run_diagnose(out, tmp_path / "d", lambdas=[LAM], progress=False)
    names = set(doc["modules"])
    if granularity == "model":
        assert names == {"model"}
    else:
        assert {"layers.0.head.0", "layers.0.attn", "layers.0.mlp"} <= names
    for name, m in doc["modules"].items():
        for p in doc["points"]:
            assert np.isfinite(m["eq10"][p]) and m["eq10"][p] >= 0, (name, p)
        assert m["eq11"]["slta"] <= m["eq11"][f"task_arithmetic {LAM:g}"] * (1 + 1e-9), name  # α minimises Eq. 11
