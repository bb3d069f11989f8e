"""Calibration data: JSONL files -> token id lists (SPEC section 2).

One sample per line, in one of three forms:
  {"text": ...}
  {"prompt": ..., "response": ...}    ("completion" or "answer" are accepted for "response";
                                        the sample is prompt + response, joined as written)
  {"messages": [{"role": ..., "content": ...}, ...]}  (rendered with the tokenizer's chat template)
A sample is the full text the model was fine-tuned on. `num_samples` are drawn per file with
`random.Random(seed)`: the draw depends only on the file and the seed, not on which other
tasks are merged, so a merge of a subset of the models sees exactly the same samples.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from slta.engine.tokens import RESPONSE_KEYS, counted_positions

if TYPE_CHECKING:
    from slta.io.inputs import Inputs

log = logging.getLogger("slta")


class CalibrationError(ValueError):
    pass


@dataclass
class TaskSamples:
    path: Path
    ids: list[list[int]]  # token ids per sample
    indices: list[int]  # line indices (0-based, among non-blank lines) of the chosen samples
    truncated: int
    warnings: list[str] = field(default_factory=list)  # also logged; the merge copies them into its report
    masks: list[list[bool]] | None = None  # tokens: response / response_shifted: the positions that count


def sample_text(row: object, tokenizer, where: str) -> str:
    """The full text of one sample (see :func:`is_templated` for how to tokenize it)."""
    if not isinstance(row, dict):
        raise CalibrationError(f"{where}: expected a JSON object, got {type(row).__name__}")
    if "text" in row:
        text = row["text"]
    elif "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or not all(isinstance(m, dict) and "content" in m for m in msgs):
            raise CalibrationError(f"{where}: 'messages' must be a list of {{role, content}} objects")
        if getattr(tokenizer, "chat_template", None):
            text = tokenizer.apply_chat_template(msgs, tokenize=False)
        else:
            raise CalibrationError(f"{where}: 'messages' sample but the tokenizer has no chat template; "
                                   "use {\"text\": ...} or {\"prompt\": ..., \"response\": ...}")
    elif "prompt" in row and any(k in row for k in RESPONSE_KEYS):
        key = next(k for k in RESPONSE_KEYS if k in row)
        for k in ("prompt", key):  # f-string joining would turn {"prompt": 1, "response": 2} into "12"
            if not isinstance(row[k], str):
                raise CalibrationError(f"{where}: '{k}' must be a string, got {type(row[k]).__name__} {row[k]!r}")
        text = f"{row['prompt']}{row[key]}"
    else:
        raise CalibrationError(f"{where}: a sample needs 'text', 'prompt'+'response', or 'messages' "
                               f"(found keys: {', '.join(sorted(row)) or 'none'})")
    if not isinstance(text, str) or not text:
        raise CalibrationError(f"{where}: empty or non-string sample text")
    return text


def is_templated(row: object) -> bool:
    """A `messages` sample is rendered by the chat template, which writes its own special tokens (BOS):
    like transformers' apply_chat_template(tokenize=True), it is tokenized without adding them again."""
    return isinstance(row, dict) and "text" not in row and "messages" in row


def read_jsonl(path: str | Path, label: str = "") -> list[tuple[int, object]]:
    """(line number, parsed object) for every non-blank line; clear errors otherwise."""
    path = Path(path)
    who = f"{label}: " if label else ""
    if not path.exists():
        raise CalibrationError(f"{who}calibration file {path} does not exist")
    if path.is_dir():
        raise CalibrationError(f"{who}calibration data {path} is a folder; it must be a JSONL file")
    rows = []
    with open(path, "rb") as f:  # bytes, so a bad line is reported with its number
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise CalibrationError(f"{who}{path}:{lineno}: not valid UTF-8 (byte {raw[e.start]:#04x} at "
                                       f"column {e.start + 1})") from None
            if not line.strip():
                continue
            try:
                rows.append((lineno, json.loads(line)))
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{who}{path}:{lineno}: not valid JSON ({e.msg})") from e
    if not rows:
        raise CalibrationError(f"{who}calibration file {path} is empty")
    return rows


def load_task(path: str | Path, tokenizer: Any, num_samples: int, seed: int, max_length: int,
              label: str = "", tokens: str = "all") -> TaskSamples:
    """Draw `num_samples` samples of one task's JSONL with `seed`, tokenize them and cut them at `max_length`.
    With `tokens` other than "all", also each sample's mask of the positions that count (slta.engine.tokens)."""
    rows = read_jsonl(path, label)
    who = f"{label}: " if label else ""
    n = len(rows)
    warnings = []
    if num_samples > n:
        warnings.append(f"{who}{path}: num_samples={num_samples} but the file has only {n} samples; using {n}")
        log.warning("%s", warnings[-1])
    chosen = sorted(random.Random(seed).sample(range(n), num_samples)) if num_samples < n else list(range(n))
    ids, masks, truncated = [], [], 0
    for i in chosen:
        lineno, row = rows[i]
        where = f"{who}{path}:{lineno}"
        text = sample_text(row, tokenizer, where)
        if tokens == "all":  # the paper: every position (no offsets asked for: today's exact call)
            toks = tokenizer(text, add_special_tokens=not is_templated(row))["input_ids"]
        else:
            try:
                toks, mask = counted_positions(row, text, tokenizer, tokens, not is_templated(row))
            except ValueError as e:
                raise CalibrationError(f"{where}: {e}") from None
            masks.append(mask[:max_length])
        if len(toks) > max_length:
            toks, truncated = toks[:max_length], truncated + 1
        if not toks:
            raise CalibrationError(f"{where}: sample tokenizes to nothing")
        ids.append(list(toks))
    if truncated:
        warnings.append(f"{who}{path}: {truncated} of {len(chosen)} samples were longer than "
                        f"max_length={max_length} tokens and were cut")
        log.warning("%s", warnings[-1])
    return TaskSamples(Path(path), ids, chosen, truncated, warnings, masks if tokens != "all" else None)


# -- a merge's calibration: every task's file, with the base's tokenizer ------------------------------

def calibration(ins: Inputs) -> tuple[list[list[list[int]]], list[list[int]]]:
    """Every task's calibration samples as token ids, with the base's tokenizer: (ids per task, the
    line indices drawn per task). Ids beyond the model's vocabulary are a MergeError; warnings (cut
    samples, too few samples, max_length beyond the model's positions) go to `ins.warnings`."""
    tasks, indices, _ = calibration_masks(ins, "all")
    return tasks, indices


def calibration_masks(ins: Inputs, tokens: str = "all"
                      ) -> tuple[list[list[list[int]]], list[list[int]], list[list[list[bool]]] | None]:
    """`calibration` plus, unless `tokens` is "all", each sample's mask of the positions the objective
    counts (slta.engine.tokens; None for "all": every real token counts)."""
    from transformers import AutoTokenizer

    from slta.io.inputs import VOCAB_FILES, MergeError

    cfg = ins.cfg
    if not any((ins.base.folder / n).exists() for n in VOCAB_FILES):
        raise MergeError(f"{ins.base.label}: no tokenizer in {ins.base.folder} (no {' or '.join(VOCAB_FILES[:2])}); "
                         f"merge_method {cfg.method().name!r} tokenizes the calibration data with the base "
                         f"model's tokenizer: copy the tokenizer files into that folder")
    try:
        tok = AutoTokenizer.from_pretrained(ins.base.folder, trust_remote_code=cfg.trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers' messages run over many lines: keep the first
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        raise MergeError(f"{ins.base.label}: cannot load its tokenizer from {ins.base.folder} ({first})") from e
    positions = getattr(ins.hf_config, "max_position_embeddings", None)
    if "max_length" in cfg.parameters and positions and cfg.param("max_length") > positions:
        ins.warnings.append(f"max_length={cfg.param('max_length')} exceeds the model's max_position_embeddings="
                            f"{positions}: longer samples run past the positions it was trained on")
        log.warning("%s", ins.warnings[-1])
    tasks, indices, masks = [], [], []
    for entry in cfg.models:
        ts = load_task(cfg.path(entry.data), tok, cfg.param("num_samples"), cfg.param("seed"),
                       cfg.param("max_length"), label=f"model {entry.model}", tokens=tokens)
        for ids in ts.ids:
            bad = [t for t in ids if t >= ins.hf_config.vocab_size]
            if bad:
                raise MergeError(f"model {entry.model}: {entry.data} tokenizes to id {bad[0]} >= vocab_size "
                                 f"{ins.hf_config.vocab_size}: the tokenizer does not match the model")
        ins.warnings.extend(ts.warnings)
        tasks.append(ts.ids)
        indices.append(ts.indices)
        masks.append(ts.masks)
    return tasks, indices, (None if tokens == "all" else masks)
