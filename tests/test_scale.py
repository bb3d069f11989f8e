"""Scale (issue #18): `slta merge --dry-run` (plan and memory estimate, nothing written) and the memory
knobs of huge models: calibration batches bounded by batch_size and batch_tokens, no read-ahead and
per-submodule upcasting of huge layers, fine-tunes kept as stored by the data-free methods."""

from __future__ import annotations

import torch

from slta.cli import main
from slta.engine.features import batch_plan
from tiny import make_data, make_family, write_config


def test_dry_run_prints_a_plan_and_writes_nothing(tmp_path, capsys):
    base, tuned = make_family(tmp_path, T=2)
    data = make_data(tmp_path, T=2)
    cfg = write_config(tmp_path / "m.yml", base, tuned, data, granularity="attn_mlp")
    out = tmp_path / "out"
    assert main(["merge", str(cfg), "-o", str(out), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "plan: slta, granularity attn_mlp, T=2" in text
    assert "estimated peak RAM" in text and "nothing written" in text
    assert not out.exists() and not (tmp_path / "out.partial").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["base", "ft0", "ft1", "m.yml", "task0.jsonl",
                                                                  "task1.jsonl"])


def test_estimate_grows_with_the_calibration_batch_and_not_with_depth(tmp_path):
    from slta.config import load_config
    from slta.engine.calibration import calibration
    from slta.io.architecture import build_plan
    from slta.io.inputs import open_inputs
    from slta.merges.memory import estimate

    peaks = {}
    for layers in (2, 4):
        root = tmp_path / f"L{layers}"
        root.mkdir()
        base, tuned = make_family(root, T=2, layers=layers, hidden=64, heads=4, kv_heads=2)
        data = make_data(root, T=2, n=16)
        for bs in (1, 8):
            cfg = load_config(write_config(root / "m.yml", base, tuned, data, granularity="attn_mlp", batch_size=bs))
            ins = open_inputs(cfg, check_weights=False)
            plan = build_plan(ins.hf_config, ins.base.names(), "attn_mlp")
            peaks[layers, bs] = estimate(ins, plan, torch.device("cpu"), calibration(ins)[0]).peak_ram
    assert peaks[2, 8] > peaks[2, 1]  # a larger batch holds more activations
    assert peaks[4, 8] == peaks[2, 8]  # one layer at a time: depth adds nothing


def test_dry_run_of_a_data_free_merge(tmp_path, capsys):
    base, tuned = make_family(tmp_path, T=2)
    cfg = write_config(tmp_path / "m.yml", base, tuned, None, method="ties", density=0.5, weight=1.0)
    assert main(["merge", str(cfg), "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "plan: ties" in text and "estimated peak RAM" in text


def test_batch_plan_bounds_samples_and_tokens():
    lengths = [5, 20, 7, 20, 3, 11]
    assert batch_plan(lengths, 8, 1 << 30) == [([1, 3, 5, 2, 0, 4], 20)]  # longest first, as before
    plan = batch_plan(lengths, 2, 30)
    assert all(len(c) <= 2 and len(c) * s <= 30 or len(c) == 1 for c, s in plan)
    assert sorted(j for c, _ in plan for j in c) == list(range(6))
    assert batch_plan([50, 10], 8, 16) == [([0], 50), ([1], 10)]  # a sample longer than the budget goes alone


def test_batch_tokens_leaves_the_merge_unchanged(tmp_path):
    """Smaller batches change only how the same per-sample Grams are computed."""
    from slta.io.checkpoint import Checkpoint
    from slta.merge import run_merge

    base, tuned = make_family(tmp_path, T=2)
    data = make_data(tmp_path, T=2)
    outs = []
    for k, bt in enumerate((16384, 24)):
        cfg = write_config(tmp_path / f"m{k}.yml", base, tuned, data, granularity="attn_mlp", batch_tokens=bt)
        outs.append(Checkpoint(run_merge(cfg, tmp_path / f"out{k}", progress=False)))
    for n in outs[0].names():
        torch.testing.assert_close(outs[0].get(n), outs[1].get(n), rtol=1e-5, atol=1e-6)


def test_huge_layers_are_not_read_ahead_nor_upcast_whole(tmp_path, monkeypatch):
    """The 70B path (no read-ahead, submodules upcast one at a time) gives the same merge."""
    from slta.engine import features
    from slta.io.checkpoint import Checkpoint
    from slta.merge import run_merge

    base, tuned = make_family(tmp_path, T=2)
    data = make_data(tmp_path, T=2)
    cfg = write_config(tmp_path / "m.yml", base, tuned, data, granularity="head_mlp")
    ref = Checkpoint(run_merge(cfg, tmp_path / "ref", progress=False))
    monkeypatch.setenv("SLTA_PREFETCH_MAX", "0")
    monkeypatch.setattr(features, "UPCAST_FRACTION", 0.0)
    out = Checkpoint(run_merge(cfg, tmp_path / "lazy", progress=False))
    for n in ref.names():
        assert torch.equal(ref.get(n), out.get(n)), n


def test_tuned_as_stored_is_bit_identical_to_float32_fine_tunes():
    """TA, TIES, DARE and breadcrumbs take bfloat16 fine-tunes as stored: `tuned - base` promotes exactly."""
    from slta.methods import get

    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, 48, generator=g).bfloat16()
    tuned = [(base.float() + 0.05 * torch.randn(64, 48, generator=g)).bfloat16() for _ in range(3)]
    for name, params in [("task_arithmetic", {"weight": 0.3}), ("ties", {"weight": 1.0, "density": 0.3}),
                         ("dare_ties", {"weight": 1.0, "density": 0.5}),
                         ("breadcrumbs", {"weight": 1.0, "density": 0.8, "gamma": 0.05})]:
        m = get(name)
        assert m.tuned_as_stored, name
        as_stored = m.tensor_fn("w", base.float(), tuned, [params] * 3, {}, 0)
        as_f32 = m.tensor_fn("w", base.float(), [t.float() for t in tuned], [params] * 3, {}, 0)
        assert as_stored.dtype == torch.float32 and torch.equal(as_stored, as_f32), name


def test_estimate_counts_the_scale_search_of_scale_auto(tmp_path):
    """`scale: auto` adds a stage: one hidden state per candidate scale (slta.merges.autoscale), so it grows
    with the calibration data like the layer stage, and without it there is no such stage."""
    from slta.config import load_config
    from slta.engine.calibration import calibration
    from slta.io.architecture import build_plan
    from slta.io.inputs import open_inputs
    from slta.merges.autoscale import AUTO_SCALES
    from slta.merges.memory import estimate

    base, tuned = make_family(tmp_path, T=2, layers=2, hidden=64, heads=4, kv_heads=2)
    data = make_data(tmp_path, T=2, n=16)
    stages = {}
    for n in (4, 16):
        for scale in (1.0, "auto"):
            cfg = load_config(write_config(tmp_path / "m.yml", base, tuned, data, num_samples=n, scale=scale))
            ins = open_inputs(cfg, check_weights=False)
            plan = build_plan(ins.hf_config, ins.base.names(), "attn_mlp")
            est = estimate(ins, plan, torch.device("cpu"), calibration(ins)[0])
            stages[n, scale] = est.ram
            assert (f"{len(AUTO_SCALES)} copies of the calibration activations" in " ".join(est.notes)) == \
                (scale == "auto")
    assert "scale search" not in stages[16, 1.0] and "scale search" in stages[16, "auto"]
    assert stages[16, "auto"]["scale search"] > stages[4, "auto"]["scale search"]
    assert {k: v for k, v in stages[16, "auto"].items() if k != "scale search"} == stages[16, 1.0]
