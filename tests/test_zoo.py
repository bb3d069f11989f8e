"""Tests for the demo zoo (tiny size): layout, loading, data, caching, determinism."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from slta.zoo import SIZES, TASKS, build_zoo
from slta.zoo.build import MODEL_DIRS

MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(scope="session")
def tiny_zoo(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("zoo") / "tiny"
    t = time.perf_counter()
    build_zoo(out, size="tiny", seed=0, progress=False)
    return out, time.perf_counter() - t


def test_layout(tiny_zoo):
    zoo, seconds = tiny_zoo  # the build time is reported in zoo.json, not asserted (noisy machines)
    for d in MODEL_DIRS:
        for f in MODEL_FILES:
            assert (zoo / d / f).is_file(), f"missing {d}/{f}"
    meta = json.loads((zoo / "zoo.json").read_text())
    assert meta["recipe"]["size"] == "tiny" and meta["recipe"]["seed"] == 0
    assert set(meta["timings_s"]) >= {"base", *TASKS, "total"}
    assert not (zoo.parent / "tiny.tmp-build").exists()


def test_data_files(tiny_zoo):
    zoo, _ = tiny_zoo
    params = SIZES["tiny"]
    for task in TASKS:
        rows = {s: [json.loads(line) for line in (zoo / "data" / task / f"{s}.jsonl").read_text().splitlines()] for s in ("calib", "val", "test")}
        assert len(rows["calib"]) == params["n_calib"]
        assert len(rows["val"]) == params["n_val"] and len(rows["test"]) == params["n_test"]
        assert all(set(r) == {"prompt", "response"} for r in rows["calib"])
        assert all(set(r) == {"prompt", "answer"} and r["answer"] == r["answer"].strip() and r["answer"] for r in rows["val"] + rows["test"])
        prompts = [r["prompt"] for s in rows for r in rows[s]]
        assert len(set(prompts)) == len(prompts), f"{task}: a prompt appears in two splits"


def test_models_load_and_generate(tiny_zoo):
    zoo, _ = tiny_zoo
    base_state = load_file(zoo / "base" / "model.safetensors")
    for d in MODEL_DIRS:
        model = AutoModelForCausalLM.from_pretrained(zoo / d)
        tok = AutoTokenizer.from_pretrained(zoo / d)
        cfg = model.config
        assert cfg.model_type == "llama" and not cfg.tie_word_embeddings
        assert cfg.num_key_value_heads < cfg.num_attention_heads  # grouped-query attention
        assert tok.pad_token_id is not None and tok.eos_token_id is not None and tok.bos_token_id is not None
        prompt = json.loads((zoo / "data" / "math" / "test.jsonl").read_text().splitlines()[0])["prompt"]
        enc = tok(prompt, return_tensors="pt")
        assert enc.input_ids[0, 0] == tok.bos_token_id
        assert tok.decode(enc.input_ids[0], skip_special_tokens=True) == prompt  # lossless tokenizer
        out = model.generate(**enc, max_new_tokens=5, do_sample=False)
        assert out.shape[1] > enc.input_ids.shape[1]
        # Full fine-tunes: every tensor moved away from the base, same names and shapes.
        state = load_file(zoo / d / "model.safetensors")
        assert state.keys() == base_state.keys()
        if d != "base":
            assert all(not torch.equal(state[k], base_state[k]) for k in state), f"{d}: some tensor was not trained"


def test_cache_reused_and_recipe_change_rebuilds(tiny_zoo, tmp_path):
    zoo, _ = tiny_zoo
    stamp = (zoo / "math" / "model.safetensors").stat().st_mtime_ns
    t = time.perf_counter()
    assert build_zoo(zoo, size="tiny", seed=0, progress=False) == zoo
    assert time.perf_counter() - t < 2.0
    assert (zoo / "math" / "model.safetensors").stat().st_mtime_ns == stamp

    # A recipe change (here: a cheaper one, to keep the test fast) rebuilds.
    other = tmp_path / "zoo"
    small = {"pretrain_steps": 4, "finetune_steps": 3, "pretrain_docs": 300, "train_examples": 100}
    build_zoo(other, size="tiny", seed=0, progress=False, overrides=small)
    first = json.loads((other / "zoo.json").read_text())["recipe_hash"]
    build_zoo(other, size="tiny", seed=0, progress=False, overrides={**small, "finetune_steps": 2})
    second = json.loads((other / "zoo.json").read_text())["recipe_hash"]
    assert first != second
    assert json.loads((other / "zoo.json").read_text())["recipe"]["params"]["finetune_steps"] == 2

    with pytest.raises(ValueError, match="unknown zoo recipe"):
        build_zoo(other, size="tiny", overrides={"no_such_key": 1})
    with pytest.raises(ValueError, match="unknown zoo size"):
        build_zoo(other, size="huge")


def test_refuses_to_overwrite_a_non_zoo_folder(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        build_zoo(tmp_path, size="tiny", progress=False)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_deterministic(tiny_zoo, tmp_path):
    """Two builds with the same seed give byte-identical files."""
    zoo, _ = tiny_zoo
    again = build_zoo(tmp_path / "again", size="tiny", seed=0, progress=False)
    for d in MODEL_DIRS:
        for f in MODEL_FILES:
            assert (zoo / d / f).read_bytes() == (again / d / f).read_bytes(), f"{d}/{f} differs"
    for task in TASKS:
        for s in ("calib", "val", "test"):
            assert (zoo / "data" / task / f"{s}.jsonl").read_bytes() == (again / "data" / task / f"{s}.jsonl").read_bytes()
