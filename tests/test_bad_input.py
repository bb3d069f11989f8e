"""Bad input (SPEC section 9): clear message naming the culprit, non-zero exit, no traceback, no OUT."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from tiny import make_config, make_data, make_family, save_model


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("family")
    base, tuned = make_family(root, "llama", T=2)
    data = make_data(root, T=2, n=6)
    return root, base, tuned, data


def copy_model(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def config(tmp_path, base, tuned, data, method="slta", **extra):
    cfg = {"merge_method": method, "base_model": str(base),
           "models": [{"model": str(m), **({"data": str(d)} if d else {})} for m, d in zip(tuned, data)],
           "parameters": {"num_samples": 4} if method == "slta" else {"weight": 0.5}}
    cfg.update(extra)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_cli(tmp_path, cfg: Path, *extra: str) -> tuple[int, str]:
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "slta.cli", "merge", str(cfg), "-o", str(out), "-q", *extra],
                          capture_output=True, text=True, timeout=300)
    assert not out.exists(), "a failed merge left its output folder"
    assert not list(tmp_path.glob(".out.tmp-*")), "a failed merge left its temporary folder"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.returncode, proc.stderr


def expect_error(tmp_path, cfg, *needles, extra=()):
    code, err = run_cli(tmp_path, cfg, *extra)
    assert code != 0, err
    for n in needles:
        assert n in err, f"{n!r} not in: {err}"
    return err


def test_missing_model_folder(tmp_path, family):
    root, base, tuned, data = family
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], tmp_path / "nope"], data), "nope", "does not exist")


def test_architecture_differs(tmp_path, family):
    root, base, tuned, data = family
    from transformers import AutoModelForCausalLM

    other = save_model(AutoModelForCausalLM.from_config(make_config("llama", hidden=48)), tmp_path / "wide")
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], other], data), str(other), "hidden_size")


def test_unsupported_architecture(tmp_path, family):
    root, base, tuned, data = family
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt)
    expect_error(tmp_path, config(tmp_path, gpt, tuned, data), "gpt2", "not supported yet")


def _edit(folder: Path, fn) -> None:
    f = folder / "model.safetensors"
    sd = load_file(f)
    fn(sd)
    save_file(sd, f, metadata={"format": "pt"})


def test_missing_tensor(tmp_path, family):
    root, base, tuned, data = family
    m = copy_model(tuned[1], tmp_path / "m")
    _edit(m, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], m], data), str(m), "model.layers.1.mlp.up_proj.weight",
                 "missing")


def test_extra_tensor(tmp_path, family):
    root, base, tuned, data = family
    m = copy_model(tuned[1], tmp_path / "m")
    _edit(m, lambda sd: sd.__setitem__("model.layers.0.extra.weight", torch.zeros(3)))
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], m], data), "model.layers.0.extra.weight", "extra")


def test_shape_differs(tmp_path, family):
    root, base, tuned, data = family
    m = copy_model(tuned[1], tmp_path / "m")
    _edit(m, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(7)))
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], m], data), "model.norm.weight", "shape", "model.safetensors")


@pytest.mark.parametrize("method", ["slta", "task_arithmetic"])
def test_nan_in_weights(tmp_path, family, method):
    root, base, tuned, data = family
    m = copy_model(tuned[1], tmp_path / "m")

    def poison(sd):
        sd["model.layers.1.self_attn.o_proj.weight"][0, 0] = float("nan")

    _edit(m, poison)
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], m], data, method=method),
                 str(m), "model.layers.1.self_attn.o_proj.weight", "model.safetensors", "NaN")


@pytest.mark.parametrize("which, value, weight, dtype", [
    ("base", float("inf"), 0.5, None),        # inf - inf = NaN in every task vector
    ("tuned", float("nan"), 0.0, None),       # a zero weight keeps NaN (NaN x 0 = NaN)
    ("tuned", float("-inf"), 0.5, "bfloat16"),  # mergekit's bfloat16 arithmetic
    ("base", float("nan"), 0.5, "float16"),
])
def test_task_arithmetic_names_a_non_finite_input_without_an_input_pass(tmp_path, family, which, value, weight, dtype):
    """Task arithmetic skips the engine's finiteness pass over its inputs (a non-finite input always
    gives a non-finite output, which the writer refuses); the error must still name the input."""
    from slta.merges.data_free import DataFree
    from slta.methods import get

    assert get("task_arithmetic").propagates_nonfinite and not get("ties").propagates_nonfinite
    assert DataFree.output_checks_inputs is False  # the class default; set per method in __init__
    root, base, tuned, data = family
    m = copy_model(base if which == "base" else tuned[1], tmp_path / "m")
    name = "model.layers.1.mlp.down_proj.weight"
    _edit(m, lambda sd: sd[name].view(-1).__setitem__(3, value))
    b, t = (m, tuned[1]) if which == "base" else (base, m)
    cfg = yaml.safe_load(config(tmp_path, b, [tuned[0], t], data, method="task_arithmetic").read_text())
    cfg["models"][1]["parameters"] = {"weight": weight}
    if dtype:
        cfg["dtype"] = dtype
    (tmp_path / "c.yml").write_text(yaml.safe_dump(cfg))
    expect_error(tmp_path, tmp_path / "c.yml", str(m), name, "model.safetensors", "non-finite")


def test_truncated_safetensors(tmp_path, family):
    root, base, tuned, data = family
    m = copy_model(tuned[1], tmp_path / "m")
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], m], data), str(f), "truncated")


def test_garbage_safetensors(tmp_path, family):
    root, base, tuned, data = family
    m = copy_model(tuned[1], tmp_path / "m")
    (m / "model.safetensors").write_bytes(b"this is not a checkpoint at all, just text")
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], m], data), "model.safetensors")


def test_not_a_finetune_of_this_base(tmp_path, family):
    root, base, tuned, data = family
    stranger, _ = make_family(tmp_path / "other", "llama", T=0, seed=5)
    err = expect_error(tmp_path, config(tmp_path, base, [tuned[0], stranger], data), str(stranger),
                       "not a fine-tune", "relative distance")
    assert "base_model" in err


def test_tokenizer_differs(tmp_path, family):
    root, base, tuned, data = family
    m = copy_model(tuned[1], tmp_path / "m")
    tj = json.loads((m / "tokenizer.json").read_text())
    vocab = tj["model"]["vocab"]
    a, b = list(vocab)[10], list(vocab)[11]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, different ids: silently wrong embeddings otherwise
    (m / "tokenizer.json").write_text(json.dumps(tj))
    expect_error(tmp_path, config(tmp_path, base, [tuned[0], m], data), "tokenizer.json", "tokenizer")


@pytest.mark.parametrize("content,needles", [
    (None, ["does not exist"]),
    ("", ["is empty"]),
    ('{"text": "ok"}\n{"text": broken\n', [":2", "not valid JSON"]),
    ('{"text": "ok"}\n{"question": "x"}\n', [":2", "'text'", "question"]),
    ('{"text": ""}\n', [":1", "empty"]),
    ('[1, 2]\n', [":1", "JSON object"]),
])
def test_bad_calibration_file(tmp_path, family, content, needles):
    root, base, tuned, data = family
    bad = tmp_path / "bad.jsonl"
    if content is not None:
        bad.write_text(content)
    cfg = config(tmp_path, base, tuned, [data[0], bad], parameters={"num_samples": 30})
    expect_error(tmp_path, cfg, "bad.jsonl", *needles)


def test_calibration_data_missing_for_slta(tmp_path, family):
    root, base, tuned, data = family
    expect_error(tmp_path, config(tmp_path, base, tuned, [data[0], None]), str(tuned[1]), "data")


@pytest.mark.parametrize("edit,needles", [
    ({"merge_metod": "slta"}, ["merge_metod", "did you mean 'merge_method'"]),
    ({"parameters": {"granularty": "layer"}}, ["granularty", "did you mean 'granularity'"]),
    ({"parameters": {"num_samples": "thirty"}}, ["num_samples", "integer"]),
    ({"parameters": {"granularity": "block"}}, ["granularity", "block"]),
    ({"merge_method": "tie"}, ["tie", "did you mean 'ties'"]),
    ({"dtype": "float13"}, ["float13"]),
])
def test_bad_config_values(tmp_path, family, edit, needles):
    root, base, tuned, data = family
    cfg = yaml.safe_load(config(tmp_path, base, tuned, data).read_text())
    cfg.update(edit)
    path = tmp_path / "edited.yml"
    path.write_text(yaml.safe_dump(cfg))
    expect_error(tmp_path, path, *needles)


def test_malicious_pickle_is_refused(tmp_path, family):
    root, base, tuned, data = family
    import pickle

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    m = tmp_path / "evil"
    shutil.copytree(tuned[1], m)
    (m / "model.safetensors").unlink()
    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    code, err = run_cli(tmp_path, config(tmp_path, base, [tuned[0], m], data))
    assert code != 0 and "weights_only=True" in err and "pytorch_model.bin" in err


def test_debug_shows_the_traceback(tmp_path, family):
    root, base, tuned, data = family
    cfg = config(tmp_path, base, [tuned[0], tmp_path / "nope"], data)
    proc = subprocess.run([sys.executable, "-m", "slta.cli", "--debug", "merge", str(cfg), "-o", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
