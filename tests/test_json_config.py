"""Data-free merges read config.json without transformers (JsonConfig): every value they read, and every
architecture comparison, must equal what transformers' own config classes give for the same file."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from transformers import AutoConfig, PretrainedConfig

from slta.io.architecture import SUPPORTED, ArchitectureError, JsonConfig, config_differences, load_config
from slta.io.checkpoint import parse_dtype
from tests.tiny import make_config, make_family, write_config


def saved(tmp_path, name: str, arch: str, edit=None, **kw):
    """A config.json as transformers writes it, then edited as a dict (keys renamed, removed, added)."""
    folder = tmp_path / name
    config = make_config(arch, **kw)
    config.dtype = "bfloat16"
    config.save_pretrained(folder)
    if edit is not None:
        raw = json.loads((folder / "config.json").read_text())
        edit(raw)
        (folder / "config.json").write_text(json.dumps(raw))
    return folder


def rename(old: str, new: str):
    return lambda raw: raw.__setitem__(new, raw.pop(old))


EDITS = {
    "as written": None,
    "torch_dtype": rename("dtype", "torch_dtype"),
    "no dtype": lambda raw: raw.pop("dtype"),
    "dtype null": lambda raw: raw.__setitem__("dtype", None),
    "float16": lambda raw: raw.__setitem__("dtype", "float16"),
}
FALLBACKS = {  # only transformers' per-class defaults (or code) can settle these
    "no tie_word_embeddings": lambda raw: raw.pop("tie_word_embeddings"),
    "no num_hidden_layers": lambda raw: raw.pop("num_hidden_layers"),
    "auto_map": lambda raw: raw.__setitem__("auto_map", {"AutoConfig": "x.Y"}),
    "two dtypes": lambda raw: raw.__setitem__("torch_dtype", "float32"),
}


@pytest.mark.parametrize("arch", SUPPORTED)
@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("edit", list(EDITS))
def test_json_config_reads_what_transformers_reads(tmp_path, arch, tied, edit):
    folder = saved(tmp_path, "m", arch, EDITS[edit], tied=tied)
    light, full = load_config(folder, require_supported=False), AutoConfig.from_pretrained(folder)
    assert isinstance(light, JsonConfig)
    assert (light.model_type, light.num_hidden_layers, light.tie_word_embeddings) == \
           (full.model_type, full.num_hidden_layers, full.tie_word_embeddings)
    want = getattr(full, "dtype", None)
    assert (None if light.dtype is None else parse_dtype(light.dtype)) == (None if want is None else parse_dtype(want))


@pytest.mark.parametrize("edit", list(FALLBACKS))
def test_configs_json_cannot_settle_go_through_transformers(tmp_path, edit):
    folder = saved(tmp_path, "m", "llama", FALLBACKS[edit])
    assert isinstance(load_config(folder, require_supported=False), PretrainedConfig)
    assert isinstance(load_config(folder), PretrainedConfig)  # the closed form always uses transformers


@pytest.mark.parametrize("value", ["auto", ["bfloat16"]])
def test_a_dtype_transformers_refuses_is_refused_by_name(tmp_path, value):
    folder = saved(tmp_path, "m", "llama", lambda raw: raw.__setitem__("dtype", value))
    with pytest.raises(ArchitectureError, match="m: cannot read .*config.json"):
        load_config(folder, "m", require_supported=False)


CHANGES = [  # (arch, key, value): architecture keys, keys that derive one, and keys that feed none
    ("llama", "hidden_size", 64), ("llama", "num_hidden_layers", 3), ("llama", "rms_norm_eps", 1e-5),
    ("llama", "tie_word_embeddings", True), ("llama", "max_position_embeddings", 512),
    ("llama", "bos_token_id", 5), ("llama", "_name_or_path", "elsewhere"), ("llama", "use_cache", False),
    ("llama", "mlp_bias", False), ("llama", "head_dim", 8),
    ("mistral", "sliding_window", 16), ("mistral", "sliding_window", None),
    ("qwen2", "use_sliding_window", True), ("qwen2", "max_window_layers", 1), ("qwen3", "attention_bias", True),
]


@pytest.mark.parametrize("arch,key,value", CHANGES)
def test_architecture_comparison_equals_transformers(tmp_path, arch, key, value):
    a = saved(tmp_path, "a", arch)
    b = saved(tmp_path, "b", arch, lambda raw: raw.__setitem__(key, value))
    la, lb = load_config(a, require_supported=False), load_config(b, require_supported=False)
    assert isinstance(la, JsonConfig) and isinstance(lb, JsonConfig)
    want = config_differences(AutoConfig.from_pretrained(a), AutoConfig.from_pretrained(b))
    assert config_differences(la, lb) == want
    assert config_differences(la, AutoConfig.from_pretrained(b)) == want  # one of each kind


def test_a_data_free_merge_never_imports_transformers(tmp_path):
    base, tuned = make_family(tmp_path, "qwen2", T=2)
    cfg = write_config(tmp_path / "m.yml", base, tuned, None, method="task_arithmetic")
    code = ("import sys; from slta.merge import run_merge; "
            f"run_merge({str(cfg)!r}, {str(tmp_path / 'out')!r}, progress=False); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'transformers'))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert res.stdout.strip().splitlines()[-1] == "[]"
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_a_file_transformers_refuses_is_named_when_the_comparison_needs_transformers(tmp_path):
    a = saved(tmp_path, "a", "llama")
    # linear RoPE scaling without its `factor`: every supported transformers refuses it (5.0.0 still
    # accepts heads that do not divide hidden_size, which later releases refuse)
    b = saved(tmp_path, "b", "llama",
              lambda raw: raw.__setitem__("rope_parameters", {"rope_type": "linear", "rope_theta": 10000.0}))
    la, lb = load_config(a, "base_model A", require_supported=False), load_config(b, "model B", require_supported=False)
    assert isinstance(lb, JsonConfig)  # config.json alone does not know transformers' validation
    with pytest.raises(ArchitectureError, match=r"model B: cannot read .*b/config.json"):
        config_differences(la, lb)
