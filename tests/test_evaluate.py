"""Tests for slta.evaluate: scoring, task-file resolution, batched generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from slta.evaluate import eval_main, evaluate, exact_match, final_answer, generate, read_jsonl, resolve_task_files
from slta.zoo.tokenizer import train_tokenizer


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A small random Llama with the zoo's tokenizer: generation is arbitrary but deterministic."""
    texts = ["Question: Ann has 3 pens. How many pens?", "Code:\nx = [1, 2]\nprint(sorted(x))", "Zorbish: kalo miru\nVelarian:"] * 20
    tok = train_tokenizer(texts, 300)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    # Larger weights than the default init give confident, non-tied greedy choices.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    out = tmp_path_factory.mktemp("evalmodel") / "model"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


PROMPTS = ["Question: Ann has 3 pens.", "x", "Code:\nx = [1, 2]\nprint(sorted(x))\nOutput:", "Zorbish: kalo", "How many pens?"]


def test_final_answer_rules():
    assert final_answer(" 3 + 4 = 7. #### 7") == "7"
    assert final_answer("#### 1 #### 2") == "2"  # the last marker wins
    assert final_answer("  [1, 2]  \nQuestion: more text") == "[1, 2]"  # first line only
    assert final_answer("#### 5\nrambling") == "5"
    assert final_answer("") == ""


def test_exact_match_scoring():
    completions = [" 3 + 4 = 7. #### 7", " [1, 2, 3]", "zu mela ka\nmore", " 12", " wrong"]
    answers = ["7", "[1, 2, 3]", "zu mela ka", " 12 ", "right"]
    assert exact_match(completions, answers) == pytest.approx(4 / 5)
    assert exact_match([], []) == 0.0
    assert exact_match([" 7"], [7]) == 1.0  # numeric answers in JSON still compare as text
    with pytest.raises(ValueError):
        exact_match(["a"], ["a", "b"])


def test_resolve_task_files(tmp_path):
    for task in ("math", "code"):
        write_jsonl(tmp_path / "data" / task / "test.jsonl", [{"prompt": "p", "answer": "a"}])
        write_jsonl(tmp_path / "data" / task / "val.jsonl", [{"prompt": "p", "answer": "a"}])
    extra = write_jsonl(tmp_path / "other.jsonl", [{"prompt": "p", "answer": "a"}])
    files = resolve_task_files([tmp_path / "data", extra])
    assert files == {"math": tmp_path / "data/math/test.jsonl", "code": tmp_path / "data/code/test.jsonl", "other": extra}
    assert resolve_task_files(tmp_path / "data" / "math", split="val") == {"math": tmp_path / "data/math/val.jsonl"}
    with pytest.raises(FileNotFoundError):
        resolve_task_files(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        resolve_task_files(tmp_path / "data", split="calib")


def test_read_jsonl_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "answer": "b"}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_jsonl(bad)
    bad.write_text('{"question": "a"}\n')
    with pytest.raises(ValueError, match="prompt"):
        read_jsonl(bad)


def test_left_padded_batches_equal_unbatched(model_dir):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    lengths = {len(tok(p).input_ids) for p in PROMPTS}
    assert len(lengths) > 2  # the batch really needs padding
    one = [generate(model, tok, [p], batch_size=1, max_new_tokens=8, stop_at_newline=False, progress=False)[0] for p in PROMPTS]
    batched = generate(model, tok, PROMPTS, batch_size=len(PROMPTS), max_new_tokens=8, stop_at_newline=False, progress=False)
    assert batched == one
    assert any(c.strip() for c in one)  # the model does generate something


def test_evaluate_end_to_end(model_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    completions = generate(model, tok, PROMPTS, max_new_tokens=8, progress=False)
    # Reference answers = what the model says, except one: accuracy must be 4/5.
    rows = [{"prompt": p, "answer": final_answer(c)} for p, c in zip(PROMPTS, completions)]
    rows[1]["answer"] = final_answer(completions[1]) + " not this"
    task = write_jsonl(tmp_path / "data" / "toy" / "test.jsonl", rows)

    assert evaluate(model_dir, {"toy": task}, max_new_tokens=8, progress=False) == {"toy": pytest.approx(0.8)}
    # An already loaded model, a directory spec, batch size 2 and a limit give the same scoring.
    assert evaluate(model, [tmp_path / "data"], batch_size=2, max_new_tokens=8, progress=False, tokenizer=tok) == {"toy": pytest.approx(0.8)}
    assert evaluate(model, {"toy": task}, max_new_tokens=8, limit=1, progress=False, tokenizer=tok) == {"toy": 1.0}

    out = tmp_path / "res" / "eval.json"
    scores = eval_main(str(model_dir), [str(tmp_path / "data")], out=str(out), max_new_tokens=8, progress=False)
    saved = json.loads(out.read_text())
    assert scores == {"toy": pytest.approx(0.8)}
    assert saved["accuracy"]["toy"] == pytest.approx(0.8)
    assert len(saved["predictions"]["toy"]) == 5
    assert [r["correct"] for r in saved["predictions"]["toy"]] == [True, False, True, True, True]


def test_missing_answer_is_a_clear_error(model_dir, tmp_path):
    task = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "x"}])
    with pytest.raises(ValueError, match="answer"):
        evaluate(model_dir, {"t": task}, progress=False)


def test_shared_prefix_gives_the_plain_completions(model_dir, monkeypatch):
    """Prompts with a common head (a chat template's system turn): prefilling it once and copying its
    cache to every row gives the completions of plain left-padded batches, and the scores under them."""
    from transformers import DynamicCache

    from slta.evaluate import MIN_SHARED_PREFIX, shared_prefix_length

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    head = "Question: Ann has 3 pens. How many pens? Code:\nx = [1, 2]\n"
    prompts = [head + p for p in PROMPTS] + [head]  # the last one is all head: it keeps a token of its own
    ids = tok(prompts).input_ids
    assert len({len(x) for x in ids}) > 2  # the rows really need padding after the prefix
    n = shared_prefix_length(ids)
    assert MIN_SHARED_PREFIX <= n == min(len(x) for x in ids) - 1
    copies = []
    real = DynamicCache.batch_repeat_interleave
    monkeypatch.setattr(DynamicCache, "batch_repeat_interleave", lambda self, k: (copies.append(k), real(self, k))[1])
    shared = generate(model, tok, prompts, batch_size=len(prompts), max_new_tokens=8, stop_at_newline=False, progress=False)
    assert copies == [len(prompts)]  # the shared path ran
    plain = generate(model, tok, prompts, batch_size=len(prompts), max_new_tokens=8, stop_at_newline=False,
                     progress=False, share_prefix=False)
    one = [generate(model, tok, [p], batch_size=1, max_new_tokens=8, stop_at_newline=False, progress=False,
                    share_prefix=False)[0] for p in prompts]
    assert shared == plain == one
    assert len(set(shared)) > 2  # the completions differ between rows: the rows are not mixed up


def test_shared_prefix_length_rules():
    from slta.evaluate import shared_prefix_length

    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 3, 5, 6]]) == 3
    assert shared_prefix_length([[1, 2, 3], [1, 2, 3, 4]]) == 2  # each row keeps one token of its own
    assert shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert shared_prefix_length([[1, 2, 3]]) == 2
