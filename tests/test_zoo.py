"""Tests for the demo zoo (tiny size): layout, loading, data, caching, determinism."""

from __future__ import annotations

import json
import shutil
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


SMALL = {"pretrain_steps": 4, "finetune_steps": 3, "finetune_max_steps": 3, "pretrain_docs": 300, "train_examples": 100}


def _files(zoo: Path) -> dict[str, bytes]:
    return {str(p.relative_to(zoo)): p.read_bytes() for p in sorted(zoo.rglob("*")) if p.is_file() and p.name != "zoo.json"}


def test_zoo_seed_drives_data_and_training(tmp_path):
    """Another seed gives other data, another base and other fine-tunes (tiny, cheap recipe)."""
    a = _files(build_zoo(tmp_path / "s0", size="tiny", seed=0, progress=False, overrides=SMALL))
    b = _files(build_zoo(tmp_path / "s1", size="tiny", seed=1, progress=False, overrides=SMALL))
    assert a.keys() == b.keys()
    for task in TASKS:
        assert a[f"data/{task}/test.jsonl"] != b[f"data/{task}/test.jsonl"]
    for d in MODEL_DIRS:
        assert a[f"{d}/model.safetensors"] != b[f"{d}/model.safetensors"], f"{d}: the seed did not change it"


def test_fine_tune_trains_to_its_target_loss():
    """The hard kind's fine-tunes go on past the schedule until the stop loss (up to max_steps)."""
    from slta.zoo.train import train_loop

    class Toy(torch.nn.Module):  # loss = w², so it falls below any threshold, slowly
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2, 2))

        def forward(self, **_) -> object:
            return type("Out", (), {"loss": (self.w ** 2).mean()})()

    batch = lambda step: (None, None, None)  # noqa: E731
    never = train_loop(Toy(), batch, steps=60, lr=1e-3, warmup=5, weight_decay=0.0, desc="", progress=False,
                       stop_loss=-1.0, max_steps=90)
    assert len(never) == 90  # not reached: runs to max_steps, not to the schedule's 60
    reached = train_loop(Toy(), batch, steps=60, lr=0.05, warmup=5, weight_decay=0.0, desc="", progress=False,
                         stop_loss=0.5, max_steps=500)
    assert 50 <= len(reached) < 500 and sum(reached[-50:]) / 50 < 0.5


# -- the chat kind ------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def chat_zoo(tiny_zoo, tmp_path_factory) -> Path:
    zoo, _ = tiny_zoo
    return build_zoo(tmp_path_factory.mktemp("chat") / "chat-seed0", size="tiny", seed=0, progress=False,
                     kind="chat", hard_zoo=zoo)


def test_chat_template_renders_calibration_and_evaluation(chat_zoo):
    """Training text, the calibration files ({"messages"}) and the evaluation prompts are one
    rendering of the tokenizer's chat_template, each with exactly one <s>."""
    from slta.engine.calibration import sample_text
    from slta.zoo.chat import CHAT_TEMPLATE
    from slta.zoo.train import encode_examples

    for d in MODEL_DIRS:
        assert AutoTokenizer.from_pretrained(chat_zoo / d).chat_template == CHAT_TEMPLATE
    tok = AutoTokenizer.from_pretrained(chat_zoo / "base")
    for task in TASKS:
        calib = [json.loads(x) for x in (chat_zoo / "data" / task / "calib.jsonl").read_text().splitlines()]
        assert all(set(r) == {"messages"} and [m["role"] for m in r["messages"]] == ["system", "user", "assistant"]
                   for r in calib)
        msgs = calib[0]["messages"]
        text = sample_text(calib[0], tok, "calib")  # the calibration path of `slta merge`
        assert text == tok.apply_chat_template(msgs, tokenize=False)
        assert "USER: " in text and text.endswith(msgs[-1]["content"] + tok.eos_token)
        prompt = tok.apply_chat_template(msgs[:-1], tokenize=False, add_generation_prompt=True)
        ids, labels = encode_examples(tok, [{"prompt": prompt, "response": " " + msgs[-1]["content"]}])[0]
        assert tok(text).input_ids == ids  # what the fine-tune trained on, token for token
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id
        for split in ("val", "test"):
            rows = [json.loads(x) for x in (chat_zoo / "data" / task / f"{split}.jsonl").read_text().splitlines()]
            for r in rows[:5]:
                assert r["prompt"].endswith("\nASSISTANT:") and r["prompt"].startswith(msgs[0]["content"])
                user = r["prompt"].split("USER: ", 1)[1].rsplit("\nASSISTANT:", 1)[0]
                again = tok.apply_chat_template([msgs[0], {"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)
                assert again == r["prompt"]
                assert tok(r["prompt"]).input_ids.count(tok.bos_token_id) == 1


def test_chat_zoo_shares_the_hard_kinds_data_and_evaluates(chat_zoo, tiny_zoo):
    from slta.evaluate import evaluate

    hard, _ = tiny_zoo
    meta = json.loads((chat_zoo / "zoo.json").read_text())
    assert meta["recipe"]["kind"] == "chat" and meta["hard_zoo"]["path"] == str(hard)
    for task in TASKS:  # same held-out answers, in the template
        a = [json.loads(x)["answer"] for x in (hard / "data" / task / "test.jsonl").read_text().splitlines()]
        b = [json.loads(x)["answer"] for x in (chat_zoo / "data" / task / "test.jsonl").read_text().splitlines()]
        assert a == b
    scores = evaluate(chat_zoo / "math", chat_zoo / "data", limit=4, progress=False, max_new_tokens=8)
    assert set(scores) == set(TASKS)


def test_chat_base_without_mid_training_is_the_hard_base(tiny_zoo, tmp_path):
    hard, _ = tiny_zoo
    chat = build_zoo(tmp_path / "chat-seed0", size="tiny", seed=0, progress=False, kind="chat", hard_zoo=hard,
                     overrides={"chat_base_steps": 0, "chat_train_examples": 32, "chat_epochs": 1})
    assert load_file(chat / "base" / "model.safetensors").keys() == load_file(hard / "base" / "model.safetensors").keys()
    a, b = load_file(chat / "base" / "model.safetensors"), load_file(hard / "base" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_chat_zoo_deterministic(chat_zoo, tiny_zoo, tmp_path):
    hard, _ = tiny_zoo
    again = build_zoo(tmp_path / "chat-seed0", size="tiny", seed=0, progress=False, kind="chat", hard_zoo=hard)
    assert _files(chat_zoo) == _files(again)


def test_chat_rebuild_that_keeps_the_base_reuses_it(chat_zoo, tiny_zoo, tmp_path):
    """Changing only the fine-tunes' schedule reuses the mid-trained base (same bytes, no
    mid-training); changing a base knob mid-trains again."""
    hard, _ = tiny_zoo
    folder = tmp_path / "chat-seed0"
    shutil.copytree(chat_zoo, folder)
    build_zoo(folder, size="tiny", seed=0, progress=False, kind="chat", hard_zoo=hard, overrides={"chat_epochs": 1})
    meta = json.loads((folder / "zoo.json").read_text())
    assert meta["train_loss"]["base"] == {"reused_from_previous_build": True}
    assert (folder / "base" / "model.safetensors").read_bytes() == (chat_zoo / "base" / "model.safetensors").read_bytes()
    build_zoo(folder, size="tiny", seed=0, progress=False, kind="chat", hard_zoo=hard,
              overrides={"chat_epochs": 1, "chat_base_steps": 5})
    assert "first" in json.loads((folder / "zoo.json").read_text())["train_loss"]["base"]


def test_parallel_zoo_builds_match_sequential_ones(tmp_path):
    """The demo builds independent zoos in parallel processes (one thread each): same bytes as one at
    a time. The chat kind of a default-size demo lives in its own small-size folders."""
    from slta.demo.zoos import build_zoos, zoo_dir

    built = build_zoos(tmp_path / "par", "tiny", ("hard",), [0, 1], SMALL, threads=1, progress=False, jobs=2)
    assert set(built) == {("hard", 0), ("hard", 1)}
    for seed in (0, 1):
        alone = build_zoo(tmp_path / f"seq{seed}", size="tiny", seed=seed, progress=False, overrides=SMALL)
        assert built[("hard", seed)][0] == tmp_path / "par" / f"hard-seed{seed}"
        assert _files(built[("hard", seed)][0]) == _files(alone)
    assert zoo_dir(tmp_path, "chat", 2, "default") == tmp_path / "chat-small-seed2"
    assert zoo_dir(tmp_path, "hard", 2, "default") == tmp_path / "hard-seed2"


def test_five_task_extension_adds_two_fine_tunes_and_leaves_the_zoo_as_it_was(chat_zoo, tmp_path):
    """slta.zoo.extend (the paper's Table 10): two more tasks' data and fine-tunes in the chat template,
    deterministic, idempotent, no back-translate question from the translate task, the zoo untouched."""
    from slta.zoo.extend import MARKER, extend_zoo, is_extended
    from slta.zoo.tasks import EXTRA_TASKS

    a, b = tmp_path / "a" / "chat-seed0", tmp_path / "b" / "chat-seed0"
    shutil.copytree(chat_zoo, a)
    shutil.copytree(chat_zoo, b)
    before = _files(a)
    assert not is_extended(a)
    extend_zoo(a, progress=False)
    after = _files(a)
    assert {k: v for k, v in after.items() if k in before} == before  # the three-task zoo, byte for byte
    assert is_extended(a) and (a / MARKER).is_file()
    tok = AutoTokenizer.from_pretrained(a / "base")
    for task in EXTRA_TASKS:
        assert AutoTokenizer.from_pretrained(a / task).chat_template == tok.chat_template
        calib = [json.loads(x) for x in (a / "data" / task / "calib.jsonl").read_text().splitlines()]
        assert all([m["role"] for m in r["messages"]] == ["system", "user", "assistant"] for r in calib)
        test = [json.loads(x) for x in (a / "data" / task / "test.jsonl").read_text().splitlines()]
        assert test and all(r["prompt"].endswith("\nASSISTANT:") for r in test)
        assert len({r["prompt"] for r in test}) == len(test)
        ft, base = load_file(a / task / "model.safetensors"), load_file(a / "base" / "model.safetensors")
        assert any(not torch.equal(ft[k], base[k]) for k in ft)  # trained
    asked = {json.loads(x)["prompt"].split("USER: Velarian: ", 1)[1].split("\n", 1)[0]
             for s in ("val", "test") for x in (a / "data" / "back_translate" / f"{s}.jsonl").read_text().splitlines()}
    translated = {json.loads(x)["answer"] for s in ("val", "test")
                  for x in (a / "data" / "translate" / f"{s}.jsonl").read_text().splitlines()}
    assert asked and translated and not asked & translated  # never asked back
    extend_zoo(b, progress=False)
    strip = lambda files: {k: v for k, v in files.items() if k != MARKER}  # noqa: E731 (its timings differ)
    assert strip(_files(b)) == strip(after)  # deterministic
    stamp = (a / "arith" / "model.safetensors").stat().st_mtime_ns
    extend_zoo(a, progress=False)  # already there: nothing rebuilt
    assert (a / "arith" / "model.safetensors").stat().st_mtime_ns == stamp
    with pytest.raises(ValueError, match="chat zoo"):
        extend_zoo(Path(json.loads((chat_zoo / "zoo.json").read_text())["hard_zoo"]["path"]), progress=False)
