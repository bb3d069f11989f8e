"""Issue #14 ("Nothing lost, every mistake a clear error"), input items: each test is named after its item
and failed before the fix. mergekit parity cases run `mergekit-yaml` from its venv (tests/_mergekit_env.py)."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from slta import cli
from slta.config import ConfigError, load_config
from slta.engine.calibration import CalibrationError, load_task, read_jsonl, sample_text
from tiny import make_data, make_family, make_tokenizer

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = tmp_path_factory.mktemp("defects")
    base, tuned = make_family(root, "llama", T=2)
    data = make_data(root, T=2, n=6)
    return root, base, tuned, data


def write(path: Path, cfg: dict) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def ta_config(base, tuned, **extra) -> dict:
    return {"merge_method": "task_arithmetic", "base_model": str(base),
            "models": [{"model": str(t)} for t in tuned], "parameters": {"weight": 0.5}, "dtype": "float32", **extra}


def cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI in-process; it must fail with exit 2 and one `slta: error:` (or argparse) line."""
    try:
        code = cli.main(argv)
    except SystemExit as e:  # argparse-level rejection
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


# -- item 1: mergekit parity (base listed under models; mergekit's defaults) -----------------------------

@pytest.fixture(scope="module")
def mk(tmp_path_factory):
    from _mergekit_env import build_models, require_mergekit

    require_mergekit()
    root = tmp_path_factory.mktemp("mk")
    base, tuned = build_models(root, num_tuned=2)
    return root, str(base), [str(t) for t in tuned]


def assert_same_as_mergekit(cfg: dict, root: Path, name: str, tmp_path: Path) -> None:
    import copy

    from _mergekit_env import load_folder, run_mergekit
    from slta.merge import run_merge

    ref = load_folder(run_mergekit(cfg, root, name))
    ours = load_folder(run_merge(copy.deepcopy(cfg), tmp_path / name, progress=False))
    base = load_folder(Path(cfg["base_model"]))
    assert sorted(ours) == sorted(ref)
    for n, r in ref.items():
        d = float((ours[n].double() - r.double()).abs().max() / r.double().abs().max())
        assert d <= 1e-6, f"{name}: {n} differs from mergekit by {d:.3g} (relative)"
    assert any(not torch.equal(ref[n], base[n]) for n in ref)


# (ties is left out: its sign election already gave the base's zero task vector no say in the divisor.)
@pytest.mark.parametrize("method", ["task_arithmetic", "dare_linear", "breadcrumbs"])
def test_item1_base_listed_with_weight_is_not_counted_under_normalize(mk, tmp_path, method):
    """The base under `models:` with a weight: mergekit leaves it out of the normalisation (slta counted a
    zero task vector: 2/3 of mergekit's distance from the base)."""
    root, base, ft = mk
    cfg = {"merge_method": method, "base_model": base,
           "models": [{"model": base, "parameters": {"weight": 1.0}},
                      {"model": ft[0], "parameters": {"weight": 1.0}}, {"model": ft[1], "parameters": {"weight": 1.0}}],
           "parameters": {"normalize": True, "density": 1.0} if method != "task_arithmetic" else {"normalize": True},
           "dtype": "float32"}
    assert_same_as_mergekit(cfg, root, f"base_listed_{method}", tmp_path)


def test_item1_linear_with_base_model_and_top_level_weight_averages_the_base(mk, tmp_path):
    """mergekit's linear averages base_model in (weight from the top level); slta left it out."""
    root, base, ft = mk
    cfg = {"merge_method": "linear", "base_model": base, "models": [{"model": ft[0]}, {"model": ft[1]}],
           "parameters": {"weight": 1.0}, "dtype": "float32"}
    assert_same_as_mergekit(cfg, root, "linear_base_weight", tmp_path)


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "breadcrumbs", "breadcrumbs_ties"])
def test_item1_omitted_parameters_take_mergekits_defaults(mk, tmp_path, method):
    """`ties` without `density` (and DARE/Breadcrumbs without density/gamma) gives mergekit's tensors."""
    root, base, ft = mk
    cfg = {"merge_method": method, "base_model": base,
           "models": [{"model": ft[0], "parameters": {"weight": 0.7}}, {"model": ft[1], "parameters": {"weight": 0.4}}],
           "dtype": "float32"}
    assert_same_as_mergekit(cfg, root, f"defaults_{method}", tmp_path)


# -- item 2: one BOS for chat-templated samples ---------------------------------------------------------

def test_item2_messages_with_bos_in_chat_template_get_one_bos(tmp_path):
    from tokenizers import processors

    tok = make_tokenizer()
    tok.chat_template = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(  # adds BOS, like Llama's
        single="<s> $A", special_tokens=[("<s>", tok.bos_token_id)])
    msgs = [{"role": "user", "content": "1+2=?"}, {"role": "assistant", "content": " 3."}]
    f = tmp_path / "chat.jsonl"
    f.write_text(json.dumps({"messages": msgs}) + "\n" + json.dumps({"text": "ab"}) + "\n")
    ts = load_task(f, tok, 10, 0, 64)
    expected = tok.apply_chat_template(msgs, tokenize=True)
    expected = expected if isinstance(expected, list) else expected["input_ids"]  # BatchEncoding in v5
    assert ts.ids[0] == list(expected)
    assert ts.ids[0].count(tok.bos_token_id) == 1
    assert ts.ids[1][0] == tok.bos_token_id  # a plain text sample still gets its BOS


# -- item 3: fail early, with one clear line ------------------------------------------------------------

@pytest.mark.parametrize("source", ["union", "./some/model"])
def test_item3_tokenizer_source_union_or_model_rejected_at_load(family, source):
    root, base, tuned, data = family
    with pytest.raises(ConfigError, match=rf"tokenizer_source: '{source}' is not supported.*tokenizer_source: base"):
        load_config(ta_config(base, tuned, tokenizer_source=source))


def test_item3_invalid_utf8_calibration_names_file_and_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CalibrationError, match=r"bad\.jsonl:2: not valid UTF-8"):
        read_jsonl(f)


def test_item3_data_naming_a_folder(family, tmp_path):
    root, base, tuned, data = family
    cfg = {"merge_method": "slta", "base_model": str(base),
           "models": [{"model": str(tuned[0]), "data": str(tmp_path)}, {"model": str(tuned[1]), "data": str(data[1])}]}
    with pytest.raises(ConfigError, match=r"models\[0\].*data: .* is a folder; it must name a JSONL file"):
        load_config(cfg)
    with pytest.raises(CalibrationError, match="is a folder"):
        read_jsonl(tmp_path)


@pytest.mark.parametrize("model,needle", [("{tmp}/no_such_model", "does not exist"),
                                          ("no-such-org-x/no-such-model-y", "hub id")])
def test_item3_eval_mistyped_model_path(capsys, tmp_path, model, needle):
    tasks = tmp_path / "t.jsonl"
    tasks.write_text(json.dumps({"prompt": "a", "answer": "b"}) + "\n")
    t0 = time.perf_counter()
    line = cli_error(capsys, ["eval", model.format(tmp=tmp_path), "--tasks", str(tasks), "-q"])
    assert time.perf_counter() - t0 < 20  # no hub retries
    assert line.startswith("slta: error:") and needle in line


def test_item3_base_without_tokenizer_when_calibration_needed(family, tmp_path):
    from slta.merge import run_merge

    root, base, tuned, data = family
    bare = tmp_path / "bare_base"
    shutil.copytree(base, bare, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    cfg = {"merge_method": "slta", "base_model": str(bare), "dtype": "float32", "parameters": {"num_samples": 2},
           "models": [{"model": str(t), "data": str(d)} for t, d in zip(tuned, data)]}
    with pytest.raises(ValueError) as e:
        run_merge(cfg, tmp_path / "out", progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "no tokenizer" in msg and str(bare) in msg, msg


def test_item3_non_string_prompt_response_rejected(tmp_path):
    with pytest.raises(CalibrationError, match=r"f\.jsonl:3: 'prompt' must be a string, got int 1"):
        sample_text({"prompt": 1, "response": 2}, None, "f.jsonl:3")
    with pytest.raises(CalibrationError, match=r"'response' must be a string"):
        sample_text({"prompt": "a", "response": ["b"]}, None, "f.jsonl:4")


def test_item3_solve_models_not_indices(capsys, tmp_path):
    line = cli_error(capsys, ["solve", str(tmp_path), "-o", str(tmp_path / "o"), "--models", "a,b"])
    assert "--models" in line and "comma-separated model indices" in line and "'a,b'" in line


def test_item3_shard_size_parsed_before_work(capsys, family, tmp_path):
    root, base, tuned, data = family
    cfg = write(tmp_path / "c.yml", ta_config(base, tuned))
    line = cli_error(capsys, ["merge", str(cfg), "-o", str(tmp_path / "out"), "--shard-size", "5XB", "-q"])
    assert "shard size '5XB'" in line
    assert not (tmp_path / "out").exists()
    from slta.io.checkpoint import parse_size

    with pytest.raises(ValueError, match="shard size '5XB'"):
        parse_size("5XB")


@pytest.mark.parametrize("command", ["merge", "eval"])
def test_item3_device_validated_up_front(capsys, tmp_path, command):
    argv = ["merge", str(tmp_path / "c.yml"), "-o", str(tmp_path / "o")] if command == "merge" else \
        ["eval", str(tmp_path), "--tasks", str(tmp_path)]
    line = cli_error(capsys, [*argv, "--device", "tpu"])
    assert "device 'tpu' is not supported" in line and "cuda:N" in line
    from slta.merge import resolve_device

    with pytest.raises(ConfigError, match="device 'tpu' is not supported"):
        resolve_device("tpu")
    assert str(resolve_device("cpu")) == "cpu"


@pytest.mark.parametrize("flag,value", [("--batch-size", "0"), ("--limit", "0"), ("--limit", "-3"),
                                        ("--max-new-tokens", "0")])
def test_item3_eval_counts_must_be_positive(capsys, tmp_path, flag, value):
    line = cli_error(capsys, ["eval", str(tmp_path), "--tasks", str(tmp_path), flag, value])
    assert flag in line and "expected a positive integer" in line


# -- item 4: warnings in the console and in the report --------------------------------------------------

@pytest.fixture(scope="module")
def warned_merge(family, tmp_path_factory):
    """One closed-form merge with num_samples above the file's 6 samples and max_length above the model's
    256 positions; its log records and report."""
    from slta.merge import run_merge

    root, base, tuned, data = family
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger("slta")
    logger.addHandler(handler)
    try:
        cfg = {"merge_method": "slta", "base_model": str(base), "dtype": "float32",
               "parameters": {"num_samples": 50, "max_length": 1000, "granularity": "layer"},
               "models": [{"model": str(t), "data": str(d)} for t, d in zip(tuned, data)]}
        out = run_merge(cfg, tmp_path_factory.mktemp("warned") / "out", progress=False)
    finally:
        logger.removeHandler(handler)
    report = json.loads((out / "slta_report.json").read_text())
    return [r.getMessage() for r in records if r.levelno == logging.WARNING], report["warnings"]


def test_item4_num_samples_beyond_the_file_warns(warned_merge, family):
    console, report = warned_merge
    for path in family[3]:
        expected = f"{path}: num_samples=50 but the file has only 6 samples; using 6"
        assert any(expected in m for m in console), console
        assert any(expected in m for m in report), report


def test_item4_max_length_beyond_max_position_embeddings_warns(warned_merge):
    console, report = warned_merge
    expected = "max_length=1000 exceeds the model's max_position_embeddings=256"
    assert any(expected in m for m in console), console
    assert any(expected in m for m in report), report


# -- item 5: mergekit's tokenizer / chat_template keys; positional OUT ----------------------------------

def test_item5_mergekit_tokenizer_and_chat_template_keys(family):
    root, base, tuned, data = family
    load_config(ta_config(base, tuned, tokenizer={"source": "base"}, chat_template=None))  # what slta does
    for extra, needle in [({"tokenizer": {"source": "union"}}, "tokenizer.source: 'union' is not supported"),
                          ({"tokenizer": {"source": "base", "tokens": {"<x>": {"source": "base"}}}},
                           "tokenizer.tokens is not supported"),
                          ({"chat_template": "chatml"}, "chat_template: 'chatml' is not supported")]:
        with pytest.raises(ConfigError, match="base model's tokenizer") as e:
            load_config(ta_config(base, tuned, **extra))
        assert needle in str(e.value)


def test_item5_positional_output_folder(capsys, family, tmp_path):
    root, base, tuned, data = family
    cfg = write(tmp_path / "c.yml", ta_config(base, tuned))
    assert cli.main(["merge", str(cfg), str(tmp_path / "out"), "-q"]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()
    capsys.readouterr()
    line = cli_error(capsys, ["merge", str(cfg), str(tmp_path / "a"), "-o", str(tmp_path / "b"), "-q"])
    assert "two output folders" in line
    assert "no output folder" in cli_error(capsys, ["merge", str(cfg), "-q"])
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# -- item 6 (issue #17 item 5): mergekit configs slta does not run --------------------------------------

UNSUPPORTED = {
    "slices": ({"slices": [{"sources": [{"model": "m", "layer_range": [0, 2]}]}], "models": None}, "'slices'"),
    "layer_range": ({"models": [{"model": "m", "layer_range": [0, 2]}]}, "'layer_range'"),
    **{m: ({"merge_method": m}, f"merge_method '{m}'")
       for m in ("slerp", "nuslerp", "della", "della_linear", "model_stock", "karcher", "passthrough")},
    "moe": ({"experts": [{"source_model": "m", "positive_prompts": ["x"]}], "gate_mode": "hidden",
             "merge_method": None, "models": None}, "mixture-of-experts"),
    "tokenizer_source_union": ({"tokenizer_source": "union"}, "tokenizer_source: 'union'"),
    "tokenizer_source_model": ({"tokenizer_source": "org/other"}, "tokenizer_source: 'org/other'"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_item6_unsupported_mergekit_configs(family, case):
    root, base, tuned, data = family
    edit, needle = UNSUPPORTED[case]
    cfg = {k: v for k, v in {**ta_config(base, tuned), **edit}.items() if v is not None}
    with pytest.raises(ConfigError) as e:
        load_config(cfg)
    msg = str(e.value)
    assert "not supported" in msg and needle in msg and "\n" not in msg, msg
    assert "slta" in msg  # says what slta offers instead


def test_item6_unsupported_method_via_cli(capsys, family, tmp_path):
    root, base, tuned, data = family
    cfg = write(tmp_path / "c.yml", ta_config(base, tuned, merge_method="slerp"))
    line = cli_error(capsys, ["merge", str(cfg), "-o", str(tmp_path / "out"), "-q"])
    assert line.startswith("slta: error:") and "merge_method 'slerp'" in line and "not supported" in line
    assert "linear" in line  # what to use instead
