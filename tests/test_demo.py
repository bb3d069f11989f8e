"""`slta demo`: the multi-zoo table on synthetic results, and `--size tiny` end to end (what CI runs)."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from slta.demo import COMBOS, LEVELS, METHOD_NAMES, TASKS, baseline_grids, table_rows
from slta.demo.table import baseline_summary, format_cell, multi_zoo_rows, results_table


def _fake_results(acc: float, ta_lambda: float, slta_seeds: list[float]) -> dict:
    """One zoo's results where every task of every combination scores ``acc`` (0..1)."""
    per = lambda v: {t: v for t in TASKS}  # noqa: E731
    combos = ["+".join(c) for c in COMBOS]
    return {
        "reference": {"base": per(0.1), **{t: per(acc) for t in TASKS}},
        "baselines": {"task_arithmetic": {c: {"params": {"weight": ta_lambda}, "test": per(acc / 2)} for c in combos}},
        "slta": {"attn_mlp": {c: [{"seed": i, "test": per(v)} for i, v in enumerate(slta_seeds)] for c in combos}},
    }


def test_multi_zoo_table_aggregates_across_zoos_and_calibration_seeds():
    zoos = [_fake_results(0.8, 0.4, [0.5, 0.7]), _fake_results(0.6, 0.6, [0.3, 0.3])]
    rows = dict(multi_zoo_rows(zoos))
    assert list(rows) == ["Base Model", "Fine-tuned Model", "Task Arithmetic", "slta Attn/MLP Level"]
    for j in range(len(COMBOS)):
        assert rows["Base Model"][j] == pytest.approx((10.0, 0.0, None))
        assert rows["Fine-tuned Model"][j] == pytest.approx((70.0, 10.0, None))  # mean, population std of 80, 60
        assert rows["Task Arithmetic"][j] == pytest.approx((35.0, 5.0, None))
        # slta: zoo means 60 and 30 -> 45 ± 15; calibration std 10 and 0 -> 5 on average
        assert rows["slta Attn/MLP Level"][j] == pytest.approx((45.0, 15.0, 5.0))
    assert format_cell(rows["slta Attn/MLP Level"][0]) == "45.00 ± 15.00 (calib ± 5.00)"
    assert format_cell((45.0, None, 5.0)) == "45.00 ± 5.00"  # one zoo: the calibration spread only
    text = results_table(list(rows.items()), 2)["text"]
    assert "over 2 zoo seeds" in text and "45.00 ± 15.00 (calib ± 5.00) *" in text

    one = dict(multi_zoo_rows(zoos[:1]))
    assert one["slta Attn/MLP Level"][0] == pytest.approx((60.0, None, 10.0))
    assert dict(table_rows(zoos[0]))["slta Attn/MLP Level"][0] == pytest.approx((60.0, 10.0))

    s = baseline_summary(zoos)
    assert s["mean"]["ta_lambda"] == pytest.approx(0.5) and s["mean"]["task_arithmetic"] == pytest.approx(35.0)
    assert s["mean"]["finetune_avg"] == pytest.approx(70.0) and "weight_average" not in s["mean"]

    with pytest.raises(ValueError, match="different methods"):
        multi_zoo_rows([zoos[0], {**zoos[1], "slta": {}}])


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    """One tiny zoo folder for this file's end-to-end runs: the first run builds its zoos, later runs
    reuse them (the demo builds whatever is missing, so any test also runs alone)."""
    return tmp_path_factory.mktemp("tiny-zoo")


def test_tiny_demo_end_to_end(tmp_path, tiny_zoo):
    zoo, out = tiny_zoo, tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--zoo-kind", "both", "--zoo", str(zoo),
                           "--out", str(out), "--ablations", "-q"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = json.loads((out / "report" / "results.json").read_text())
    assert list(study["kinds"]) == ["hard", "chat"] and study["zoo_seeds"] == [0]
    expected = ["Base Model", "Fine-tuned Model"] + [METHOD_NAMES[m] for m in baseline_grids("tiny")] + \
               [f"slta {n}" for n in ("Model Level", "Layer Level", "Attn/MLP Level", "Head/MLP Level")]
    first = {}
    for kind in ("hard", "chat"):
        assert [name for name, _ in study["kinds"][kind]["table"]] == expected
        results = first[kind] = json.loads((out / f"{kind}-seed0" / "report" / "results.json").read_text())
        rows = dict(table_rows(results))
        assert list(rows) == expected
        for name, cells in rows.items():
            assert len(cells) == len(COMBOS), name
            for mean, std in cells:
                assert math.isfinite(mean) and 0 <= mean <= 100, (name, mean)
                assert std is None or math.isfinite(std)
        for level in LEVELS:  # three calibration seeds per level and combination
            assert all(len(runs) == 3 for runs in results["slta"][level].values())
        for name in ("results.md", "accuracy.png", "alpha_heatmap_attn_mlp_triple.png", "diagnostics.md",
                     "diagnostics_attn_mlp.png", "diagnostics_layer.png"):
            assert (out / f"{kind}-seed0" / "report" / name).stat().st_size > 0, (kind, name)
        diag = json.loads((out / f"{kind}-seed0" / "report" / "diagnostics.json").read_text())
        assert list(diag) == ["layer", "attn_mlp"]  # the demo's LEVELS order
        lam = results["baselines"]["task_arithmetic"]["+".join(COMBOS[-1])]["params"]["weight"]
        assert list(diag["attn_mlp"]["points"]) == ["slta", "slta x1.5", f"task_arithmetic {lam:g}"]
        assert diag["attn_mlp"]["timings"]["total"] < 30  # the tiny path stays fast
        assert (out / "report" / f"accuracy_{kind}.png").stat().st_size > 0
    assert "== chat kind" in proc.stdout and "slta Attn/MLP Level" in proc.stdout
    # --ablations: Table 11 on both kinds; Table 10 (2..5 models) on the chat kind, its zoo extended
    from slta.demo.models import CHAIN, model_rows
    for kind in ("hard", "chat"):
        assert study["kinds"][kind]["ablations"]["levels"]["attn_mlp"]
    assert study["kinds"]["hard"]["models"] is None and "models" not in first["hard"]["ablations"]
    models = first["chat"]["ablations"]["models"]
    assert [r["tasks"] for r in models["rows"]] == [list(CHAIN[:n]) for n in range(2, 6)]
    assert (zoo / "chat-seed0" / "extra_tasks.json").is_file()
    for r in model_rows(models):
        assert all(0 <= r[c] <= 100 for c in ("fine_tuned", "weight_average", "task_arithmetic", "layer", "attn_mlp"))
    assert [r["models"] for r in study["kinds"]["chat"]["models"]["rows"]] == [2, 3, 4, 5]
    assert "Number of models merged (paper Table 10" in (out / "chat-seed0" / "report" / "results.md").read_text()
    assert "Number of models merged" in (out / "report" / "results.md").read_text()

    # a rerun reuses every cached merge and evaluation
    again = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--zoo-kind", "both", "--zoo", str(zoo),
                            "--out", str(out), "--ablations", "-q"], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0
    for kind in ("hard", "chat"):
        assert json.loads((out / f"{kind}-seed0" / "report" / "results.json").read_text())["baselines"] == \
            first[kind]["baselines"]
        work = out / f"{kind}-seed0" / "work"
        assert not work.exists() or not any(work.iterdir())
    # a report folder removed (or a new OUT sharing the cache) gets the attn_mlp merge's report back from
    # the cache, not from a second merge (whose report would differ in its timings)
    kept = out / "chat-seed0" / "report" / "slta_attn_mlp_triple_seed0" / "slta_report.json"
    before = kept.read_bytes()
    shutil.rmtree(out / "chat-seed0" / "report")
    third = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--zoo-kind", "chat", "--zoo",
                            str(zoo), "--out", str(out), "-q"], capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stderr[-3000:]
    assert kept.read_bytes() == before


def test_methods_option_restricts_the_study(tmp_path):
    from slta.demo import run_demo

    with pytest.raises(ValueError, match="unknown methods"):
        run_demo(tmp_path / "z", tmp_path / "o", size="tiny", methods=["no_such_method"])
    with pytest.raises(ValueError, match="unknown zoo kind"):
        run_demo(tmp_path / "z", tmp_path / "o", size="tiny", zoo_kind="soft")


def test_triple_only_results_leave_the_pairs_empty():
    """`--triple-only` studies hold the triple alone: the pairs' cells print as "–", not as 0."""
    full = _fake_results(0.8, 0.4, [0.5, 0.7])
    triple = "+".join(COMBOS[-1])
    only = {**full, "baselines": {m: {triple: r[triple]} for m, r in full["baselines"].items()},
            "slta": {lvl: {triple: r[triple]} for lvl, r in full["slta"].items()}}
    rows = dict(multi_zoo_rows([only, only]))
    assert all(math.isnan(c[0]) for c in rows["Task Arithmetic"][:-1])
    assert rows["Task Arithmetic"][-1] == pytest.approx((40.0, 0.0, None))
    md = results_table(list(rows.items()), 2)["markdown"]
    assert "| Task Arithmetic | – | – | – | " in md and "nan" not in md


def test_unknown_levels_are_refused_before_any_work(tmp_path):
    from slta.demo import run_demo

    with pytest.raises(ValueError, match="unknown levels: block; known: model, layer, attn_mlp, head_mlp"):
        run_demo(tmp_path / "zoo", tmp_path / "out", "tiny", levels=["layer", "block"])
    assert not (tmp_path / "zoo").exists() and not (tmp_path / "out").exists()


def test_levels_and_no_diagnostics(tmp_path, tiny_zoo):
    """`--levels layer` runs slta at that level only; `--no-diagnostics` skips its `slta diagnose`."""
    from slta.demo import run_demo

    run_demo(tiny_zoo, tmp_path / "demo", "tiny", seeds=1, progress=False, zoo_kind="chat", methods=["slta"],
             triple_only=True, jobs=1, levels=["layer"], diagnostics=False)
    results = json.loads((tmp_path / "demo" / "chat-seed0" / "report" / "results.json").read_text())
    assert set(results["slta"]) == {"layer"} and "diagnostics" not in results
    assert not list((tmp_path / "demo" / "chat-seed0" / "cache").glob("diagnostics-*.json"))
    run_demo(tiny_zoo, tmp_path / "demo", "tiny", seeds=1, progress=False, zoo_kind="chat", methods=["slta"],
             triple_only=True, jobs=1, levels=["layer"])
    results = json.loads((tmp_path / "demo" / "chat-seed0" / "report" / "results.json").read_text())
    assert set(results["diagnostics"]) == {"layer"}


def test_one_zoo_on_two_processes_gives_the_in_order_results(tmp_path, tiny_zoo, monkeypatch):
    """With spare cores a zoo's independent merges and evaluations run first in worker processes
    (slta.demo.parallel). Its results equal the one-process run's, and the warm-up leaves the in-order pass
    nothing to merge or evaluate: the parent process below cannot merge, solve or generate at all."""
    import slta.evaluate
    import slta.merge
    from slta.demo import demo_one_zoo, run_demo

    methods = ["weight_average", "task_arithmetic", "regmean_plusplus", "slta"]
    # strength at attn_mlp alone (`make demo`'s --strength-levels): the warm-up must not merge layer's auto_task
    run_demo(tiny_zoo, tmp_path / "one", "tiny", seeds=1, progress=False, zoo_kind="chat", methods=methods,
             jobs=1, levels=["layer", "attn_mlp"], strength=("auto_task",), strength_levels=["attn_mlp"])
    one = json.loads((tmp_path / "one" / "chat-seed0" / "report" / "results.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("the in-order pass merged or evaluated: the warm-up missed a unit")
    for module, name in ((slta.merge, "run_merge"), (slta.merge, "run_solve"), (slta.evaluate, "evaluate")):
        monkeypatch.setattr(module, name, refuse)
    two = demo_one_zoo(tiny_zoo / "chat-seed0", tmp_path / "two", "tiny", "cpu", 1, False, set(methods),
                       strength=("auto_task",), levels=("layer", "attn_mlp"), jobs=2, strength_levels=("attn_mlp",))
    for part in ("reference", "baselines", "slta"):
        assert two[part] == one[part], part
    assert set(two["slta"]) == {"layer", "attn_mlp", "attn_mlp|auto_task"} and len(two["baselines"]) == 3
    # attn_mlp's auto_task searches only, one per combination (layer's would make 8)
    assert len(list((tmp_path / "two" / "cache").glob("search-*.json"))) == len(COMBOS) == 4
    for level in ("layer", "attn_mlp"):
        assert two["diagnostics"][level]["summary"] == one["diagnostics"][level]["summary"]
    # the workers' generation is counted: the same prompts as the one-process run
    assert two["timings_s"]["prompts_generated"] == one["timings_s"]["prompts_generated"] > 0
    assert not list((tmp_path / "two" / "cache").glob("*.tmp*"))


def test_regmean_plusplus_named_in_methods_runs_without_variants(tmp_path, tiny_zoo):
    """`--methods regmean_plusplus` alone runs RegMean++ (it was once run only with `--variants`, so
    naming it did nothing)."""
    from slta.demo import run_demo

    study = run_demo(tiny_zoo, tmp_path / "demo", "tiny", seeds=1, progress=False, zoo_kind="chat",
                     methods=["regmean_plusplus"], triple_only=True, jobs=1)
    results = json.loads((tmp_path / "demo" / "chat-seed0" / "report" / "results.json").read_text())
    assert set(results["baselines"]) == {"regmean_plusplus"}
    assert set(results["baselines"]["regmean_plusplus"]) == {"+".join(COMBOS[-1])}
    assert "RegMean++" in [name for name, _ in study["kinds"]["chat"]["table"]]


def test_variants_rows_and_the_choice_on_validation(tmp_path, tiny_zoo):
    """`--variants` adds a row per slta variant and level, RegMean++ among the baselines, and picks
    the slta row with the best validation score on the triple (the paper's rows compete as `|paper`).
    The triple only, for CI's time: every combination runs through the same loops."""
    from slta.demo.table import level_name
    from slta.demo.variants import SCALED, SCALES, VARIANT_LEVELS, VARIANTS, chosen_by_validation

    zoo, out = tiny_zoo, tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--zoo-kind", "chat", "--zoo", str(zoo),
                           "--out", str(out), "--variants", "--seeds", "1", "--methods", "task_arithmetic,regmean_plusplus,slta",
                           "--triple-only", "-q"], capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "chat-seed0" / "report" / "results.json").read_text())
    assert set(results["baselines"]) == {"task_arithmetic", "regmean_plusplus"}
    names = [name for name, _ in table_rows(results)]
    assert "RegMean++" in names
    for level in VARIANT_LEVELS:
        for variant in VARIANTS:
            key = f"{level}|{variant}"
            runs = results["slta"][key]
            assert set(runs) == {"math+code+translate"} and "val" in runs["math+code+translate"][0]
            assert (level_name(key) in names) == (variant != "paper")
        for variant in SCALED:  # the scale fallback: one run per combination, its scale chosen on validation
            runs = results["slta"][f"{level}|{variant}×scale"]
            assert set(runs) == {"math+code+translate"}
            assert all(len(r) == 1 and r[0]["scale"] in SCALES and "val" in r[0] for r in runs.values())
            if variant == "paper":  # scale 1.0 is the variant's own run: its validation can't beat the choice
                unscaled = results["slta"][f"{level}|paper"]["math+code+translate"][0]["val"]
                assert np.mean(list(runs["math+code+translate"][0]["val"].values())) >= np.mean(list(unscaled.values()))
    study = json.loads((out / "report" / "results.json").read_text())
    chosen = study["kinds"]["chat"]["chosen_on_validation"][0]
    triple_runs = {k: v["math+code+translate"][0] for k, v in results["slta"].items()
                   if "val" in v["math+code+translate"][0]}
    best_val = max(100 * np.mean(list(r["val"].values())) for k, r in triple_runs.items() if not k.endswith("×scale"))
    assert chosen == chosen_by_validation(results) and math.isclose(chosen["val"], best_val)
    assert not chosen["row"].endswith("×scale")
    assert study["kinds"]["chat"]["chosen_with_scale"][0] == chosen_by_validation(results, searched=True)
    assert "chosen on the validation split" in proc.stdout and "with the scale search" in proc.stdout


def test_a_variant_in_a_warm_up_worker_is_what_the_in_order_pass_reads(tmp_path, tiny_zoo, monkeypatch):
    """With `--jobs` > 1 the `--variants` units run in the warm-up (slta.demo.parallel.plan lists them:
    test_warm_up_plan_waits_only_where_a_result_is_needed): a unit run by a worker's run_unit is read back
    by slta.demo.variants.run_unit, which then merges and evaluates nothing (the same configs, so the same
    cache keys)."""
    import slta.evaluate
    import slta.merge
    from slta.demo import Demo
    from slta.demo.parallel import run_unit
    from slta.demo.variants import run_unit as run_variant
    from slta.demo.variants import variant_units
    from slta.demo.zoos import build_zoos

    zoo = build_zoos(tiny_zoo, "tiny", ("chat",), [0], None, 1, False, 1)[("chat", 0)][0]  # or the one built before
    args = (zoo, tmp_path / "demo", "tiny", "cpu", 1, False, {"slta"}, True, True, ("layer",))
    triple = Demo(*args).combos[-1]
    unit = next(u for u in variant_units(Demo(*args), triple) if u.row == "layer|response")
    run_unit(Demo, args, None, False, ("variant", triple, unit.row))

    def refuse(*a, **k):
        raise AssertionError("the in-order pass merged or evaluated a variant the worker had run")
    for module, name in ((slta.merge, "run_merge"), (slta.evaluate, "evaluate")):
        monkeypatch.setattr(module, name, refuse)
    got = run_variant(Demo(*args), unit, triple)
    assert set(got) == {"seed", "test", "val"} and set(got["test"]) == set(triple)


def test_choice_on_validation_takes_the_best_validation_row_not_the_best_test_row():
    from slta.demo.variants import chosen_by_validation

    def run(val: float, test: float) -> list[dict]:
        return [{"seed": 0, "val": {"math": val, "code": val}, "test": {"math": test, "code": test}}]

    results = {"slta": {"layer": {"math+code": [{"seed": 0, "test": {"math": 0.9, "code": 0.9}}]},  # no val: not a candidate
                        "layer|paper": {"math+code": run(0.20, 0.30)},
                        "layer|response": {"math+code": run(0.40, 0.35)},
                        "attn_mlp|response": {"math+code": run(0.30, 0.60)}}}
    assert chosen_by_validation(results, "math+code") == {"row": "layer|response", "val": 40.0, "test": 35.0}
    results["slta"]["layer|response×scale"] = {"math+code": run(0.50, 0.20)}  # a one-parameter search: apart
    assert chosen_by_validation(results, "math+code")["row"] == "layer|response"
    assert chosen_by_validation(results, "math+code", searched=True) == {"row": "layer|response×scale",
                                                                          "val": 50.0, "test": 20.0}


def test_models_table_and_summary_aggregate_synthetic_results():
    """Table 10 (slta.demo.models) on made-up scores: per-row averages over the row's tasks, the gap
    (slta − TA) / TA, and mean ± std across zoos."""
    from slta.demo.models import models_summary, models_summary_table, models_table

    def zoo(ta: float, slta: float) -> dict:
        rows = []
        for n in (2, 3):
            tasks = ["code", "translate", "math"][:n]
            run = lambda a: {"test": {t: a for t in tasks}}  # noqa: E731
            rows.append({"tasks": tasks, "fine_tuned": 90.0, "base": 5.0, "weight_average": {**run(0.1), "params": {}},
                         "task_arithmetic": {**run(ta), "params": {"weight": 0.5}},
                         "slta": {"layer": run(slta), "attn_mlp": run(slta / 2)}})
        return {"ablations": {"models": {"chain": ["code", "translate", "math"], "own": {"code": 90.0}, "rows": rows}}}

    md = models_table(zoo(0.4, 0.5))
    assert "| 2 | 90.0 | 5.0 | 10.0 | 40.0 (0.5) | 50.0 | 25.0 | +25.0% | -37.5% |" in md
    s = models_summary([zoo(0.4, 0.5), zoo(0.2, 0.3)])
    r = s["rows"][0]
    assert r["models"] == 2 and r["lambdas"] == [0.5, 0.5]
    assert r["task_arithmetic"] == pytest.approx([30.0, 10.0]) and r["layer"] == pytest.approx([40.0, 10.0])
    assert r["gap_layer"] == pytest.approx([37.5, 12.5])  # the mean of each zoo's gap (+25 %, +50 %)
    assert "| 2 | 90.0 ± 0.0 | 10.0 ± 0.0 | 30.0 ± 10.0 (0.5, 0.5) | 40.0 ± 10.0 | 20.0 ± 5.0 | +37.5 ± 12.5 |" \
        in models_summary_table(s)
    assert models_summary([zoo(0.4, 0.5), {}]) is None and models_summary_table(None) == "" and models_table({}) == ""


def test_strength_sweep_is_coordinate_ascent_on_the_mean():
    """One coordinate sweep: each task's factor moves in turn, the others where the sweep left them;
    a candidate is kept only if it raises the mean (ties keep the earlier)."""
    from slta.demo.strength import RELATIVE, sweep

    want = [0.8, 1.5]  # each task's best factor (relative to the start 1.0), separable
    seen = []

    def val_of(f):
        seen.append(list(f))
        return {f"t{i}": 1 - (x - w) ** 2 for i, (x, w) in enumerate(zip(f, want))}

    got = sweep(val_of, 1.0, 2)
    assert got["factors"] == [0.8, 1.5]
    assert len(seen) == 1 + 2 * len(RELATIVE) and seen[1:1 + len(RELATIVE)] == [[r, 1.0] for r in RELATIVE]
    assert seen[1 + len(RELATIVE):] == [[0.8, r] for r in RELATIVE]  # task 1 moves with task 0 at its choice
    assert got["val_avg"] == max(np.mean(list(h["val"].values())) for h in got["sweep"])
    flat = sweep(lambda f: {"t": 0.5}, 1.2, 3)  # nothing beats the start: it stays
    assert flat["factors"] == [1.2, 1.2, 1.2]


def test_strength_rows_on_the_tiny_zoo(tmp_path, tiny_zoo):
    """`--strength`: a per-task factor on slta's α (searched on validation from the triple's statistics)
    and on task arithmetic's λ, and slta's training-free auto_task, as rows; the triple only and one level,
    attn_mlp (CI time; --levels also picks the levels the strength rows run at)."""
    from slta.demo.strength import TA_PER_TASK

    zoo, out = tiny_zoo, tmp_path / "demo"
    proc = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--zoo-kind", "chat", "--zoo",
                           str(zoo), "--out", str(out), "--strength", "--seeds", "1", "--methods",
                           "task_arithmetic,slta", "--triple-only", "--levels", "attn_mlp", "-q"],
                          capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "chat-seed0" / "report" / "results.json").read_text())
    tri = "math+code+translate"
    assert set(results["slta"]) == {"attn_mlp", "attn_mlp|per-task×scale", "attn_mlp|auto_task", "attn_mlp|auto_joint"}
    names = [name for name, _ in table_rows(results)]
    assert "Task Arithmetic · per-task λ" in names
    ta, ta_row = results["baselines"]["task_arithmetic"][tri], results["baselines"][TA_PER_TASK][tri]
    assert ta_row["params"]["global_lambda"] == ta["params"]["weight"]
    start = ta_row["sweep"][0]  # the sweep starts at the validated λ for every task: the same validation run
    assert start["factors"] == [ta["params"]["weight"]] * 3
    assert math.isclose(np.mean(list(start["val"].values())), ta["val_avg"])
    run = results["slta"]["attn_mlp|per-task×scale"][tri][0]
    assert len(run["scale"]) == 3 and run["scale"] == run["factors"]
    means = [np.mean(list(h["val"].values())) for h in run["sweep"]]
    assert math.isclose(run["val_avg"], max(means)) and run["sweep"][int(np.argmax(means))]["factors"] == run["scale"]
    auto = results["slta"]["attn_mlp|auto_task"][tri][0]
    assert auto["scale"] == auto["scale_search"]["chosen"] and len(auto["scale"]) == 3
    assert {"test", "val"} <= set(auto)
    joint = results["slta"]["attn_mlp|auto_joint"][tri][0]  # auto_task's search, then checked together
    search = joint["scale_search"]
    assert search["one_at_a_time"] == auto["scale"] and search["joint"]["checks"][0]["factors"] == auto["scale"]
    assert joint["scale"] == search["chosen"] == search["joint"]["chosen"]
    assert all(j >= a for j, a in zip(joint["scale"], auto["scale"]))  # factors only rise


def test_warm_up_plan_waits_only_where_a_result_is_needed():
    """slta.demo.parallel.plan: a baseline's test run waits for its grid's validation runs, slta's merges wait
    for task arithmetic's triple validation runs only when they are diagnosed (the diagnostics' λ), and
    everything else is ready at once, auto_task at the strength levels only."""
    from slta.demo import COMBOS, DATA_METHODS, baseline_grids
    from slta.demo.parallel import plan
    from slta.demo.variants import variant_units

    grids = baseline_grids("tiny", True)
    chosen_calls = []

    def chosen(method, combo, grid):
        chosen_calls.append((method, combo))
        return grid[-1], 0.5

    for diagnose in (False, True):
        demo = SimpleNamespace(size="tiny", extra_baselines=True, combos=COMBOS, levels=("layer", "attn_mlp"),
                               strength_levels=("attn_mlp",), seeds=[0], diagnose=diagnose, ta_lambda=None, variants=False,
                               methods={"weight_average", "task_arithmetic", "regmean_plusplus", "slta"}, chosen=chosen,
                               merge_config=lambda m, c, p: {"models": [{"data": "x"} if m in DATA_METHODS else {}]},
                               grids=lambda: {m: g for m, g in grids.items()
                                              if m in ("weight_average", "task_arithmetic", "regmean_plusplus")})
        ready, later = plan(demo, ("auto_task", "auto_joint"))
        slta_units = [("slta", "layer", 0), ("slta", "attn_mlp", 0)]
        assert [u for u in ready if u[0] == "auto_task"] == [("auto_task", "attn_mlp", c, m)
                                                             for m in ("auto_task", "auto_joint") for c in COMBOS]
        assert all((u in ready) != diagnose for u in slta_units)
        for w in later:
            vals = {ready[k][1:3] for k in w.after}
            assert len(vals) == 1 and all(ready[k][0] == "val" for k in w.after)
            method, combo = vals.pop()
            assert len(w.after) == len(grids[method]) > 1
            made = w.make()
            if made == slta_units:
                assert diagnose and (method, combo) == ("task_arithmetic", COMBOS[-1])
                assert demo.ta_lambda == grids["task_arithmetic"][-1]["weight"]
            else:
                assert made == [("test", method, combo, grids[method][-1])]
        tests = {(w.make()[0][1], w.make()[0][2]) for w in later if w.make() != slta_units}
        methods = ("weight_average", "task_arithmetic", "regmean_plusplus")
        assert tests == {(m, c) for m in methods if len(grids[m]) > 1 for c in COMBOS} != set()
        assert [u for u in ready if u[0] == "test"] == [("test", m, c, grids[m][0]) for m in methods
                                                        if len(grids[m]) == 1 for c in COMBOS]
    # --variants: every unit ready at once, a scale search as one unit
    demo.variants = True
    ready, _ = plan(demo, ())
    rows = [u.row for u in variant_units(demo, COMBOS[0])]
    assert [u for u in ready if u[0] == "variant"] == [("variant", c, r) for c in COMBOS for r in rows]


def test_variant_units_make_each_row_once_and_the_scale_search():
    """slta.demo.variants.variant_units: one merge per variant and level (calibration seed 0), one config per
    scale for a search (1.0 is the variant's own config); run_unit picks the first best validation."""
    from slta.demo.variants import SCALED, SCALES, VARIANTS, first_best, variant_units

    demo = SimpleNamespace(levels=("layer", "attn_mlp", "model"),
                           merge_config=lambda m, c, p: {"merge_method": m, "tasks": c, "parameters": p})
    units = variant_units(demo, ("math", "code"))
    assert [u.row for u in units] == [f"{lv}|{v}" for v in VARIANTS for lv in ("layer", "attn_mlp")] + [
        f"{lv}|{v}×scale" for v in SCALED for lv in ("layer", "attn_mlp")]
    by_row = {u.row: u for u in units}
    assert by_row["attn_mlp|response+merged"].configs == [{"merge_method": "slta", "tasks": ("math", "code"), "parameters": {
        "granularity": "attn_mlp", "num_samples": 30, "seed": 0, "tokens": "response", "inputs": "merged"}}]
    search = by_row["layer|response×scale"]
    assert search.searched and not by_row["layer|response"].searched
    assert search.configs[0] == by_row["layer|response"].configs[0]
    assert [c["parameters"].get("scale", 1.0) for c in search.configs] == list(SCALES)
    assert first_best([0.2, 0.5, 0.5, 0.1]) == 1


def test_strength_options_pick_the_rows(monkeypatch):
    """`--strength auto_task` (or any subset of OPTIONS) runs only those rows, and the progress bar's
    total counts exactly the steps run; an unknown option is refused by name."""
    import slta.demo.strength as strength

    calls = []
    monkeypatch.setattr(strength, "slta_per_task", lambda demo, level, combo: calls.append(("per_task", level)) or {})
    monkeypatch.setattr(strength, "auto_task", lambda demo, level, combo, mode: calls.append((mode, level)) or {})
    monkeypatch.setattr(strength, "ta_per_task", lambda demo, combo: calls.append(("ta_per_task", None)) or {})
    for levels in (("layer", "attn_mlp"), ("attn_mlp",)):  # --strength-levels: attn_mlp alone
        demo = SimpleNamespace(combos=[("math", "code"), ("math", "code", "translate")], strength_levels=levels)
        for options, want in [(("auto_task",), {"auto_task"}), (("per_task", "ta_per_task"), {"per_task", "ta_per_task"}),
                              (("auto_joint",), {"auto_joint"}),
                              (True, set(strength.OPTIONS))]:
            calls.clear()
            bar = SimpleNamespace(n=0, set_postfix_str=lambda s: None)
            bar.update = lambda: setattr(bar, "n", bar.n + 1)
            ours, base = strength.run_strength(demo, bar, options)
            assert {c[0] for c in calls} == want and {c[1] for c in calls} - {None} == set(levels)
            assert bar.n == len(calls) == strength.n_strength_steps(2, levels, strength.strength_options(options))
            assert bool(base) == ("ta_per_task" in want)
            rows = {"per_task": "per-task×scale", "auto_task": "auto_task", "auto_joint": "auto_joint"}
            assert set(ours) == {f"{level}|{rows[o]}" for level in levels for o in want if o in rows}
    with pytest.raises(ValueError, match="unknown --strength options: auto"):
        strength.strength_options(("auto",))
    proc = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--strength", "auto",
                           "--zoo", "/nonexistent-zoo"], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "unknown --strength options: auto" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--strength", "auto_task",
                           "--levels", "layer", "--strength-levels", "attn_mlp", "--zoo", "/nonexistent-zoo"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--strength-levels must be among layer" in proc.stderr and "Traceback" not in proc.stderr


def test_cache_keys_of_response_readings_change_with_the_reading(monkeypatch):
    """A merge that reads response positions (`scale: auto*`, `tokens: response*`) is cached under a key
    holding the reading's version; one that does not keeps its key when the reading changes."""
    import slta.demo
    from slta.demo import Demo

    demo = SimpleNamespace(zoo_hash="z")
    configs = {"auto_task": {"parameters": {"granularity": "layer", "scale": "auto_task"}},
               "tokens": {"parameters": {"tokens": "response"}},
               "plain": {"parameters": {"granularity": "layer"}}, "ta": {"merge_method": "task_arithmetic"}}
    before = {n: Demo.key(demo, {"config": c}) for n, c in configs.items()}
    monkeypatch.setattr(slta.demo, "TOKENS_READING", slta.demo.TOKENS_READING + 1)
    after = {n: Demo.key(demo, {"config": c}) for n, c in configs.items()}
    assert [n for n in configs if before[n] != after[n]] == ["auto_task", "tokens"]
