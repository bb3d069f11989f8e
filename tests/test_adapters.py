"""PEFT LoRA adapters as merge inputs: every merge of adapters equals the same merge of the
checkpoints peft's own `merge_and_unload()` writes, and adapters that do not fit are refused.

The adapters are real peft adapters on a tiny Llama (plain LoRA with an embedding, rsLoRA with
modules_to_save, DoRA with rank/alpha patterns and trainable tokens), their factors randomised so
that every delta is non-zero (peft initialises B to zero).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from peft import IA3Config, LoraConfig, get_peft_model  # a test dependency: missing peft fails, never skips
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from slta.analysis.linearity import analyze
from slta.config import ConfigError
from slta.io.adapter import AdapterCheckpoint, AdapterError
from slta.io.checkpoint import Checkpoint
from slta.merge import run_merge
from tiny import make_data, make_family, save_model, write_config

torch.set_num_threads(1)

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {  # three kinds of LoRA a user brings
    "plain": dict(r=4, lora_alpha=8, target_modules=ALL + ["embed_tokens", "lm_head"]),
    "rslora": dict(r=4, lora_alpha=6, use_rslora=True, target_modules=ALL, modules_to_save=["lm_head"]),
    "dora": dict(r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                 rank_pattern={"down_proj": 2}, alpha_pattern={"layers.1.self_attn.q_proj": 3},
                 trainable_token_indices=[3, 5, 7]),
}


def make_adapter(base_dir: Path, out: Path, seed: int, peft_config, dtype: torch.dtype = torch.float32) -> Path:
    """Save a peft adapter with random non-zero factors to `out`, and its merge_and_unload() to `out`-full."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=dtype), peft_config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.05 * torch.randn_like(p))
            elif "lora_" in name or "trainable_tokens" in name or "modules_to_save" in name:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    save_model(model.merge_and_unload(), out.with_name(out.name + "-full"))
    return out


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("adapters")
    base, _ = make_family(root, "llama", T=0, layers=2)
    adapters = [make_adapter(base, root / name, i, LoraConfig(**kw)) for i, (name, kw) in enumerate(ADAPTERS.items())]
    return {"root": root, "base": base, "adapters": adapters,
            "full": [a.with_name(a.name + "-full") for a in adapters], "data": make_data(root, T=3, n=6)}


def merged(path: Path) -> dict[str, torch.Tensor]:
    ck = Checkpoint(path)
    return ck.get_many(ck.names())


def assert_same_merge(zoo: dict, method: str, tmp: Path, **params) -> None:
    outs = []
    for kind in ("adapters", "full"):
        cfg = write_config(tmp / f"{kind}.yml", zoo["base"], zoo[kind], zoo["data"], method, **params)
        outs.append(merged(run_merge(cfg, tmp / kind, progress=False)))
    a, b = outs
    assert a.keys() == b.keys()
    for name in b:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0, msg=lambda m: f"{method} {name}: {m}")
    moved = [n for n in b if not torch.equal(b[n], merged_base(zoo)[n])]
    assert len(moved) > len(b) // 2, "the merge must move most tensors, or the comparison proves little"


_BASE: dict[str, dict[str, torch.Tensor]] = {}


def merged_base(zoo: dict) -> dict[str, torch.Tensor]:
    key = str(zoo["base"])
    if key not in _BASE:
        _BASE[key] = merged(zoo["base"])
    return _BASE[key]


def test_adapter_reads_equal_merge_and_unload(zoo):
    """Tensor by tensor, whole and by row blocks (embedding, lm_head), for every adapter kind."""
    base = Checkpoint(zoo["base"])
    for ad, full in zip(zoo["adapters"], zoo["full"]):
        ck, ref = AdapterCheckpoint(ad, ad.name, base, "base"), Checkpoint(full)
        assert ck.names() == base.names()
        want, got = ref.get_many(ref.names()), ck.get_many(ck.names())
        changed = [n for n in want if not torch.equal(want[n], base.get(n))]
        assert changed and all(ck.file_of[n].name == "adapter_model.safetensors" for n in changed)
        for n in want:
            torch.testing.assert_close(got[n], want[n], atol=1e-6, rtol=0, msg=lambda m: f"{ad.name} {n}: {m}")
        for n in ("model.embed_tokens.weight", "lm_head.weight"):
            for lo, hi in ((0, 5), (4, 20), (40, 100)):
                torch.testing.assert_close(ck.get_rows(n, lo, hi), want[n][lo:hi], atol=1e-6, rtol=0)


@pytest.mark.parametrize("method,params", [
    ("task_arithmetic", {}), ("ties", {"density": 0.5}), ("dare_linear", {"density": 0.7}), ("linear", {}),
    ("slta", {"granularity": "attn_mlp", "num_samples": 4}), ("slta", {"granularity": "layer", "num_samples": 4}),
    ("regmean", {"num_samples": 4}),
])
def test_merge_of_adapters_equals_merge_of_merged_checkpoints(zoo, tmp_path, method, params):
    assert_same_merge(zoo, method, tmp_path, **params)


def test_analyze_of_adapters_equals_analyze_of_merged_checkpoints(zoo, tmp_path):
    res = []
    for kind in ("adapters", "full"):
        cfg = write_config(tmp_path / f"{kind}.yml", zoo["base"], zoo[kind], zoo["data"], "slta", num_samples=3)
        res.append(analyze(cfg, progress=False, levels=["model", "mlp", "attn"], merging=False, steps=4))
    a, b = res
    assert a["modules"].keys() == b["modules"].keys()
    for name, entry in b["modules"].items():
        np.testing.assert_allclose(a["modules"][name]["score"]["mean"], entry["score"]["mean"], rtol=1e-5,
                                   atol=1e-6, err_msg=name)
        np.testing.assert_allclose(a["modules"][name]["curve"]["mean"], entry["curve"]["mean"], rtol=1e-5,
                                   atol=1e-6, err_msg=name)
    assert all(s > 0 for s in b["modules"]["model"]["score"]["mean"])


# -- refused inputs ------------------------------------------------------------------------------

def edit_config(folder: Path, **changes) -> Path:
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))
    return folder


def merge_one(zoo: dict, adapter: Path, tmp: Path, base: Path | None = None) -> Path:
    tmp.mkdir(exist_ok=True)
    cfg = write_config(tmp / "c.yml", base or zoo["base"], [adapter], None, "task_arithmetic")
    return run_merge(cfg, tmp / "out", progress=False)


def test_adapter_of_another_shape_names_adapter_module_and_shapes(zoo, tmp_path):
    other, _ = make_family(tmp_path / "wide", "llama", T=0, layers=2, hidden=48, heads=4)
    ad = make_adapter(other, tmp_path / "wide-lora", 0, LoraConfig(r=2, target_modules=["q_proj"]))
    # base_model_name_or_path names an existing local folder of another architecture: refused by name
    with pytest.raises(AdapterError, match=r"wide-lora.*base_model_name_or_path.*hidden_size=48.*another model"):
        merge_one(zoo, ad, tmp_path)
    # without the name, the shapes decide
    edit_config(ad, base_model_name_or_path=None)
    with pytest.raises(AdapterError, match=r"model .*wide-lora \(adapter_model.safetensors\): module "
                                           r"model.layers.0.self_attn.q_proj: lora A \[2, 48\] and B \[48, 2\] "
                                           r"does not fit .*shape \[32, 32\]"):
        merge_one(zoo, ad, tmp_path)


def test_adapter_module_missing_from_base_is_named(zoo, tmp_path):
    deeper, _ = make_family(tmp_path / "deep", "llama", T=0, layers=3)
    ad = edit_config(make_adapter(deeper, tmp_path / "deep-lora", 0, LoraConfig(r=2, target_modules=["v_proj"])),
                     base_model_name_or_path=None)
    with pytest.raises(AdapterError, match=r"deep-lora \(adapter_model.safetensors\): module "
                                           r"model.layers.2.self_attn.v_proj has no tensor .* in base_model"):
        merge_one(zoo, ad, tmp_path)


def test_hub_id_of_another_model_is_refused(zoo, tmp_path):
    # a base in a Hugging Face cache folder knows its hub id
    cache = tmp_path / "hub" / "models--org--tiny-base" / "snapshots" / "abc"
    cache.parent.mkdir(parents=True)
    cache.symlink_to(zoo["base"], target_is_directory=True)
    ad = tmp_path / "lora"
    shutil.copytree(zoo["adapters"][0], ad)
    edit_config(ad, base_model_name_or_path="Org/Tiny-Base")
    merge_one(zoo, ad, tmp_path / "ok", base=cache)  # the same hub id (any case) is accepted
    edit_config(ad, base_model_name_or_path="org/tiny-base-instruct")
    with pytest.raises(AdapterError, match=r"'org/tiny-base-instruct' is not base_model .*\(org/tiny-base\)"):
        merge_one(zoo, ad, tmp_path / "bad", base=cache)


def test_ia3_adapter_is_not_supported(zoo, tmp_path):
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(zoo["base"]),
                           IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]))
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterError, match=r"ia3.*peft_type 'IA3' is not supported: slta merges LoRA adapters; "
                                           r"merge_and_unload it first"):
        merge_one(zoo, tmp_path / "ia3", tmp_path)


def test_pissa_adapter_without_conversion_is_refused(zoo, tmp_path):
    ad = shutil.copytree(zoo["adapters"][0], tmp_path / "pissa")
    edit_config(ad, init_lora_weights="pissa_niter_4")
    with pytest.raises(AdapterError, match="path_initial_model_for_weight_conversion"):
        merge_one(zoo, ad, tmp_path)


def test_adapters_need_base_model(zoo, tmp_path):
    cfg = {"merge_method": "linear", "models": [{"model": str(a)} for a in zoo["adapters"][:2]]}
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(ConfigError, match=r"models\[0\] .*plain.* is a PEFT adapter: set base_model"):
        run_merge(tmp_path / "c.yml", tmp_path / "out", progress=False)


def test_adapter_without_weights_is_named(zoo, tmp_path):
    ad = shutil.copytree(zoo["adapters"][1], tmp_path / "empty")
    (ad / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match=r"empty .*has adapter_config.json but no adapter_model.safetensors"):
        merge_one(zoo, ad, tmp_path)
    assert not (tmp_path / "out").exists()
    assert load_file(zoo["adapters"][1] / "adapter_model.safetensors")  # the fixture's copy is untouched


def test_fan_in_fan_out_and_lora_bias_read_as_merge_and_unload(tmp_path):
    """GPT-2 stores its projections transposed (Conv1D: peft's fan_in_fan_out) and has biases (lora_bias).
    slta does not merge GPT-2, but the adapter reader is architecture-free, so it is checked here."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=40, n_positions=32)).eval()
    base.save_pretrained(tmp_path / "gpt2")
    cfg = LoraConfig(r=3, lora_alpha=5, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True)
    ad = make_adapter(tmp_path / "gpt2", tmp_path / "gpt2-lora", 1, cfg)
    ref = Checkpoint(tmp_path / "gpt2-lora-full")
    ck = AdapterCheckpoint(ad, "gpt2-lora", Checkpoint(tmp_path / "gpt2"), "gpt2")
    want = ref.get_many(ref.names())
    got = ck.get_many([n for n in want if n in ck])
    assert "transformer.h.0.attn.c_attn.bias" in ck.bias and ck.shapes["transformer.h.0.attn.c_attn.weight"] == (16, 48)
    for n, t in got.items():
        torch.testing.assert_close(t, want[n], atol=1e-6, rtol=0, msg=lambda m: f"{n}: {m}")
    n = "transformer.h.1.mlp.c_fc.weight"  # rows of a transposed weight are columns of lora_A
    torch.testing.assert_close(ck.get_rows(n, 3, 11), want[n][3:11], atol=1e-6, rtol=0)


def test_solve_from_statistics_of_adapters(zoo, tmp_path):
    """`slta solve` reopens the adapters named in the saved statistics."""
    from slta.merge import run_solve

    outs = []
    for kind in ("adapters", "full"):
        cfg = write_config(tmp_path / f"{kind}.yml", zoo["base"], zoo[kind], zoo["data"], "slta", num_samples=3,
                           granularity="layer")
        run_merge(cfg, tmp_path / kind, progress=False)
        outs.append(merged(run_solve(tmp_path / kind, tmp_path / f"{kind}-02", models=[0, 2], progress=False)))
    for name, t in outs[1].items():
        torch.testing.assert_close(outs[0][name], t, atol=1e-6, rtol=0, msg=lambda m: f"{name}: {m}")


def test_pickle_adapter_reads_as_its_safetensors_twin(zoo, tmp_path):
    """Older peft saves adapter_model.bin; it is read with weights_only=True and gives the same tensors."""
    src = zoo["adapters"][2]  # DoRA + patterns + trainable tokens
    ad = shutil.copytree(src, tmp_path / "bin")
    (ad / "adapter_model.safetensors").unlink()
    torch.save(load_file(src / "adapter_model.safetensors"), ad / "adapter_model.bin")
    base = Checkpoint(zoo["base"])
    a, b = AdapterCheckpoint(ad, "bin", base, "base"), AdapterCheckpoint(src, "st", base, "base")
    assert a.weights.name == "adapter_model.bin" and a.lora.keys() == b.lora.keys() and a.tokens
    names = base.names()
    for n, t in b.get_many(names).items():
        assert torch.equal(a.get(n), t), n
    assert torch.equal(a.get_rows("model.embed_tokens.weight", 2, 9), b.get_rows("model.embed_tokens.weight", 2, 9))


@pytest.mark.parametrize("dora", [False, True])
def test_bfloat16_base_reads_bit_identical_to_merge_and_unload(zoo, tmp_path, dora):
    """peft keeps the factors in float32 and rounds W + ΔW once to the base's dtype; so does slta."""
    save_model(AutoModelForCausalLM.from_pretrained(zoo["base"], dtype=torch.bfloat16), tmp_path / "base16")
    ad = make_adapter(tmp_path / "base16", tmp_path / "lora16", 3,
                      LoraConfig(r=4, target_modules=["q_proj", "down_proj", "lm_head"], use_dora=dora), torch.bfloat16)
    ck, ref = AdapterCheckpoint(ad, "lora16", Checkpoint(tmp_path / "base16"), "base16"), Checkpoint(tmp_path / "lora16-full")
    assert ref.dtypes["lm_head.weight"] == torch.bfloat16
    for n in ref.names():
        assert torch.equal(ck.get(n), ref.get(n)), n
    assert torch.equal(ck.get_rows("lm_head.weight", 7, 30), ref.get_rows("lm_head.weight", 7, 30))


def test_adapters_and_full_fine_tunes_mix(zoo, tmp_path):
    mixed = {**zoo, "adapters": [zoo["adapters"][0], zoo["full"][1], zoo["adapters"][2]]}
    assert_same_merge(mixed, "slta", tmp_path, granularity="layer", num_samples=3)
