"""examples/lm_eval/ under lm-evaluation-harness scores a model as `slta eval` does.

lm-eval runs from its own venv (tests/setup_peer.sh lmeval creates it; `make test` runs that); when the venv
is missing this test FAILS, telling you to run the script. One `lm_eval --model hf` run on a tiny zoo
fine-tune, built here, covers:

* the shipped tasks (copied unchanged) on the zoo's test splits: the same completions, final answers,
  per-example verdicts and accuracy as slta.evaluate;
* the list-like-answer pitfall: an "echo" task whose answers are slta's own final answers for the
  model's completions (100% under slta by construction), a list-like answer such as "[0, 8, 8]" first.
  With the shipped `doc_to_target: answer` lm-eval also scores 100%; with the template "{{answer}}"
  it parses the list-like answers into lists of alternatives and scores less.

The tiny zoo's code model never writes "####", so the answer extraction (the template's filter and
metric options, run by lm-eval's own classes) is also checked on crafted completions.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from slta.evaluate import evaluate, final_answer
from slta.zoo import TASKS, build_zoo

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "examples" / "lm_eval"
VENV = Path(os.environ.get("LMEVAL_VENV", ROOT / ".venv-lmeval"))
LM_EVAL = VENV / "bin" / "lm_eval"
MODEL = "code"  # the tiny zoo fine-tune that scores above 0 on its task; it answers lists such as "[0, 8, 8]"


def require_lm_eval() -> Path:
    if not LM_EVAL.exists():
        pytest.fail(f"lm-eval's venv is missing ({LM_EVAL} not found): run tests/setup_peer.sh lmeval", pytrace=False)
    return LM_EVAL


def _is_list_like(s: str) -> bool:
    """What lm-eval literal-evals when a rendered target starts with '[' and ends with ']'."""
    if not (s.startswith("[") and s.endswith("]")):
        return False
    try:
        return isinstance(ast.literal_eval(s), list)
    except (SyntaxError, ValueError):
        return False


def _echo_task(tasks: Path, name: str, data: Path, target: str, plain_metric: bool = False) -> None:
    text = (f"include: shipped/_slta_zoo_template.yaml\ntask: {name}\ndoc_to_target: {json.dumps(target)}\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n")
    if plain_metric:  # without regexes_to_ignore, which would raise a TypeError on the parsed int alternatives
        text += "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n"
    (tasks / f"{name}.yaml").write_text(text)


def _run_lm_eval(model: Path, tasks: list[str], include: Path, cwd: Path) -> tuple[dict, dict[str, list[dict]]]:
    out = cwd / "lm_eval_out"
    env = {**os.environ, "HF_HOME": str(cwd / "hf_home"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("VIRTUAL_ENV", None)
    cmd = [str(require_lm_eval()), "--model", "hf", "--model_args", f"pretrained={model},dtype=float32",
           "--tasks", ",".join(tasks), "--include_path", str(include), "--device", "cpu", "--batch_size", "32",
           "--output_path", str(out), "--log_samples"]
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, f"lm_eval failed ({res.returncode}):\n{res.stderr[-4000:]}"
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]
    samples = {}
    for t in tasks:
        path = next(out.rglob(f"samples_{t}_*.jsonl"))
        samples[t] = sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["doc_id"])
    return results, samples


@pytest.mark.slow
def test_lm_eval_scores_like_slta_eval(tmp_path: Path) -> None:
    require_lm_eval()
    run = tmp_path / "run"  # the shipped task files read zoo/default/hard-seed0/data/<task>/test.jsonl from here
    zoo = run / "zoo" / "default" / "hard-seed0"
    build_zoo(zoo, size="tiny", seed=0, progress=False)
    model = zoo / MODEL
    files = {t: zoo / "data" / t / "test.jsonl" for t in TASKS}
    scores, records = evaluate(model, files, progress=False, return_predictions=True)  # `slta eval`'s defaults

    # the echo task: every test prompt with slta's final answer for it, list-like answers first
    rows = [{"prompt": r["prompt"], "answer": final_answer(r["completion"])} for t in TASKS for r in records[t]]
    rows.sort(key=lambda r: not _is_list_like(r["answer"]))
    n_list = sum(_is_list_like(r["answer"]) for r in rows)
    assert n_list > 0, "no list-like answer to test the pitfall with"
    echo = tmp_path / "echo.jsonl"
    echo.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tasks_dir = tmp_path / "tasks"
    shutil.copytree(SHIPPED, tasks_dir / "shipped")
    _echo_task(tasks_dir, "echo_field", echo, "answer")
    _echo_task(tasks_dir, "echo_template", echo, "{{answer}}", plain_metric=True)

    names = [f"slta_zoo_{t}" for t in TASKS]
    results, samples = _run_lm_eval(model, [*names, "echo_field", "echo_template"], tasks_dir, run)

    metric = "exact_match,final-answer"
    for t, name in zip(TASKS, names):
        assert len(samples[name]) == len(records[t])
        for s, r in zip(samples[name], records[t]):
            assert s["doc"]["prompt"] == r["prompt"]
            assert s["resps"][0][0] == r["completion"], (t, s["doc_id"])
            assert s["filtered_resps"][0] == final_answer(r["completion"]), (t, s["doc_id"])
            assert s["exact_match"] == float(r["correct"]), (t, s["doc_id"])
        assert results[name][metric] == pytest.approx(scores[t], abs=1e-12), t
    assert sum(scores.values()) > 0  # at least one right answer, so the equalities above are not all 0 == 0

    assert results["echo_field"][metric] == 1.0
    # "{{answer}}": the first target renders to a list, so lm-eval takes every target as a list of
    # alternatives; each list-like answer is then compared element by element, and all of them are lost
    template = samples["echo_template"]
    assert [s["exact_match"] for s in samples["echo_field"]] == [1.0] * len(rows)
    assert all(s["exact_match"] == 0.0 for s in template if _is_list_like(s["doc"]["answer"]))
    assert results["echo_template"][metric] <= 1 - n_list / len(rows)


# (completion, answer): "####" (last one wins), blank lines, whitespace around answers, lists, nothing
EXTRACTION_CASES = [
    ("", "0"), (" 9", "9"), ("9\n", "9"), (" 7 + 5 = 12. #### 12", "12"), (" x #### 1 #### 2 ", "2"),
    ("  \n 7\nmore", "7"), ("#### [1, 2]", "[1, 2]"), (" [0, 4, 6, 7, 8]", "[0, 4, 6, 7, 8]"),
    ("\t 12 \t", " 12 "), (" ####", ""), ("#### 5\n#### 6", "6"), ("#### 5\n#### 6", "5"),
    (" kal miru ter", "kal miru ter"), (" kal miru", "kal  miru"), ("a####", "a"),
]

FILTER_SCRIPT = """
import json, sys
import yaml
from lm_eval.api.metrics import exact_match_hf_evaluate
import lm_eval.filters  # noqa: F401  (registers the filters)
from lm_eval.api.registry import get_filter
cfg = yaml.safe_load(open(sys.argv[1]))
cases = json.load(sys.stdin)
resps, docs = [[c] for c, _ in cases], [{"answer": a} for _, a in cases]
for step in cfg["filter_list"][0]["filter"]:
    kwargs = {k: v for k, v in step.items() if k != "function"}
    resps = list(get_filter(step["function"])(**kwargs).apply(resps, docs))
metric = {k: v for k, v in cfg["metric_list"][0].items() if k not in ("metric", "aggregation", "higher_is_better")}
em = [exact_match_hf_evaluate(predictions=[r], references=[d["answer"]], **metric)["exact_match"]
      for r, d in zip(resps, docs)]
print(json.dumps({"filtered": resps, "exact_match": [float(x) for x in em]}))
"""


def test_answer_extraction_matches_final_answer() -> None:
    """The template's filter chain and exact_match options, through lm-eval's classes, = slta's scoring."""
    require_lm_eval()
    res = subprocess.run([str(VENV / "bin" / "python"), "-c", FILTER_SCRIPT, str(SHIPPED / "_slta_zoo_template.yaml")],
                         input=json.dumps(EXTRACTION_CASES), capture_output=True, text=True, timeout=300,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["filtered"] == [final_answer(c) for c, _ in EXTRACTION_CASES]
    assert got["exact_match"] == [float(final_answer(c) == a.strip()) for c, a in EXTRACTION_CASES]
    assert 0 < sum(got["exact_match"]) < len(EXTRACTION_CASES)
