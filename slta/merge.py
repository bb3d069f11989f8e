"""The streaming merge driver: checkpoint -> architecture -> calibration -> features -> solve -> write.

One pass over the layers. For the closed-form method (`merge_method: slta`), each layer's T+1
weight versions are loaded, every task's base-model inputs are pushed through each version, the
per-sample Grams are accumulated, α is solved per module, the merged tensors are written and the
base output becomes the next layer's input (paper Algorithm 1). Data-free methods read, merge and
write tensor group by tensor group. Memory is bounded by one layer, never by the model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import platform
import shutil
import struct
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm

import slta
from slta.adapter import AdapterCheckpoint, is_adapter
from slta.architecture import (Plan, build_plan, config_differences, layer_prefix, load_config,
                               read_config_json)
from slta.calibration import load_task
from slta.checkpoint import (Checkpoint, ShardedWriter, dtype_name, parse_dtype,
                             parse_size)
from slta.config import ConfigError, MergeConfig, load_config as load_merge_config
from slta.output import atomic_output, check_output
from slta.solve import Solution, solve_module

if TYPE_CHECKING:  # slta.features imports transformers' attention code (~1 s): only the closed form needs it
    from slta.features import Batch, GramStore, Runner

log = logging.getLogger("slta")

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
                   "generation_config.json")
ROW_BLOCK = 16384  # rows per block when streaming vocab-sized tensors


class MergeError(ValueError):
    """Bad input found while merging; the message names the model, file and tensor."""


@dataclass
class Inputs:
    cfg: MergeConfig
    base: Checkpoint
    tuned: list[Checkpoint]
    hf_config: Any
    out_dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)  # logged when found; the report's "warnings"

    @property
    def all(self) -> list[Checkpoint]:
        return [self.base, *self.tuned]


def resolve_device(device: str) -> torch.device:
    from slta.config import check_device

    device = check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {device} asked for, but torch sees no CUDA device")
    return torch.device(device)


def input_paths(cfg: MergeConfig) -> dict[str, Path]:
    """Every path a merge reads, labelled as the config names it (for the output-folder checks)."""
    paths = {f"base_model {cfg.base_model}": cfg.path(cfg.base_model)} if cfg.base_model else {}
    for m in cfg.models:
        paths[f"model {m.model}"] = cfg.path(m.model)
        if m.data:
            paths[f"data {m.data} of model {m.model}"] = cfg.path(m.data)
    return paths


def output_bytes(ins: Inputs, plan: Plan) -> int:
    """Size of the written shards (the model in the output dtype), known before any work."""
    item = torch.empty((), dtype=ins.out_dtype).element_size()
    return sum(math.prod(ins.base.shapes[n]) * item for n in plan.tensor_order)


def open_inputs(cfg: MergeConfig) -> Inputs:
    """Open and cross-check every checkpoint before any heavy work."""
    base_path = cfg.model_path(cfg.base_model) if cfg.base_model else cfg.model_path(cfg.models[0].model)
    base_label = f"base_model {cfg.base_model}" if cfg.base_model else f"model {cfg.models[0].model}"
    if cfg.trust_remote_code:
        log.warning("trust_remote_code is on: Python code shipped inside the model folders will run")
    hf = load_config(base_path, base_label, trust_remote_code=cfg.trust_remote_code)
    base = Checkpoint(base_path, base_label)
    tuned = []
    for entry in cfg.models:
        label = f"model {entry.model}"
        if is_adapter(cfg.model_path(entry.model)):  # a PEFT LoRA folder: read as base + its delta, base's config
            tuned.append(AdapterCheckpoint(cfg.model_path(entry.model), label, base, base_label, cfg.base_model))
            continue
        c = load_config(cfg.model_path(entry.model), label, trust_remote_code=cfg.trust_remote_code)
        diff = config_differences(hf, c)
        if diff:
            raise MergeError(f"{label}: architecture differs from {base_label}: {'; '.join(diff)}")
        ck = Checkpoint(cfg.model_path(entry.model), label)
        missing = [n for n in base.names() if n not in ck and not _tied_copy(hf, n)]
        if missing:
            raise MergeError(f"{label}: tensor {missing[0]} is missing ({ck.folder}) but present in {base_label}"
                             + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        extra = [n for n in ck.names() if n not in base and not _tied_copy(hf, n)]
        if extra:
            raise MergeError(f"{label}: extra tensor {extra[0]} in {ck.file_of[extra[0]]} not present in {base_label}")
        for n in base.names():
            if n in ck and ck.shapes[n] != base.shapes[n]:
                raise MergeError(f"{label}: tensor {n} in {ck.file_of[n]} has shape {list(ck.shapes[n])}, "
                                 f"{base_label} has {list(base.shapes[n])}")
        tuned.append(ck)
    check_distances(base, tuned, base_label, hf.num_hidden_layers)
    check_tokenizers(base, tuned, base_label)
    out = cfg.out_dtype or cfg.dtype
    if out is None:
        out = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    if out is None or str(out) == "None":
        out = base.dtypes[next(iter(base.names()))]
    try:
        out_dtype = parse_dtype(out)
    except ValueError as e:
        raise ConfigError(f"dtype: {e}") from e
    return Inputs(cfg, base, tuned, hf, out_dtype)


# A fine-tune moves its weights by a few percent at most; independently initialised weights of the
# same shape are ~1.4 apart (relative). Above this the model is not a fine-tune of the base.
MAX_RELATIVE_DISTANCE = 0.5


def check_distances(base: Checkpoint, tuned: list[Checkpoint], base_label: str, num_layers: int) -> list[float]:
    """Relative distance ||θ_t - θ_0|| / ||θ_0|| of each fine-tune on layer 0, before any heavy work."""
    names = [n for n in base.names() if n.startswith(layer_prefix(0))] or base.names()[:1]
    b = base.get_many(names)
    # squared norms accumulated in float64 per tensor, without float64 copies of the tensors
    norm0 = math.sqrt(sum(float(v.float().pow(2).sum(dtype=torch.float64)) for v in b.values()))
    dists = []
    for ck in tuned:
        sq = 0.0
        for n in names:
            sq += float((ck.get(n).float() - b[n].float()).pow(2).sum(dtype=torch.float64))
        d = math.sqrt(sq) / max(norm0, 1e-30)
        if d > MAX_RELATIVE_DISTANCE:
            raise MergeError(f"{ck.label}: not a fine-tune of {base_label}: its layer-0 weights are at relative "
                             f"distance {d:.3f} from the base's (fine-tunes are typically below 0.1; limit "
                             f"{MAX_RELATIVE_DISTANCE}). Check base_model and the model paths.")
        dists.append(d)
    med = float(np.median(dists))
    for ck, d in zip(tuned, dists):
        if len(dists) > 2 and med > 0 and d > 10 * med:
            log.warning("%s: relative distance from the base %.4f is over 10x the others' median %.4f",
                        ck.label, d, med)
    return dists


def check_tokenizers(base: Checkpoint, tuned: list[Checkpoint], base_label: str) -> None:
    """Fine-tunes must share the base's tokenizer (same tokenizer.json / vocab files when present)."""
    for name in ("tokenizer.json", "vocab.json", "tokenizer.model"):
        ref = base.folder / name
        if not ref.exists():
            continue
        for ck in tuned:
            other = ck.folder / name
            if other.exists() and _tokenizer_vocab(other) != _tokenizer_vocab(ref):
                raise MergeError(f"{ck.label}: {other} differs from {base_label}'s {ref}: the models do not "
                                 f"share a tokenizer, so their embeddings cannot be merged row by row")


def _tokenizer_vocab(path: Path) -> object:
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        return data.get("model", {}).get("vocab", data) if path.name == "tokenizer.json" else data
    return path.read_bytes()


def _tied_copy(hf, name: str) -> bool:
    return name == "lm_head.weight" and bool(getattr(hf, "tie_word_embeddings", False))


def all_finite(t: torch.Tensor) -> bool:
    """True when no entry is NaN or infinite. A non-finite entry makes the sum non-finite, so the sum
    (one pass, no temporary) decides; only a sum that overflowed is checked entry by entry (about 30x
    faster than `isfinite(t).all()` on the CPU)."""
    if not t.is_floating_point():
        return True
    return bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all())


def read_group(ins: Inputs, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Read a group of tensors from the T+1 checkpoints (no checks: safe to run in a reader thread)."""
    return [ck.get_many(names) for ck in ins.all]


def check_group(ins: Inputs, loaded: list[dict[str, torch.Tensor]]) -> list[dict[str, torch.Tensor]]:
    """Raise a MergeError naming the model, file and tensor if any loaded tensor is not finite."""
    for ck, group in zip(ins.all, loaded):
        for n, t in group.items():
            if not all_finite(t):
                bad = int((~torch.isfinite(t)).sum())
                raise MergeError(f"{ck.label}: tensor {n} in {ck.file_of[n]} has {bad} non-finite values (NaN/Inf)")
    return loaded


def load_group(ins: Inputs, names: list[str]) -> list[dict[str, torch.Tensor]]:
    """Read a group of tensors from the T+1 checkpoints, checking they are finite."""
    return check_group(ins, read_group(ins, names))


def prefetched(ins: Inputs, groups: list[tuple[str, list[str]]], skip: Callable[[str], bool] = lambda label: False
               ) -> Iterator[tuple[str, list[str], list[dict[str, torch.Tensor]] | None]]:
    """Yield (label, names, loaded T+1 tensors) for each group, reading the next group in a background
    thread while the caller works on this one (file reads release the GIL, so the two cores overlap
    reading and arithmetic). Groups for which `skip(label)` holds are yielded unread (None).
    Memory: two groups at a time."""
    todo = groups
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slta-reader") as pool:
        futures = {}

        def submit(k: int) -> None:
            while k < len(todo) and k not in futures:
                if not skip(todo[k][0]):
                    futures[k] = pool.submit(read_group, ins, todo[k][1])
                    return
                k += 1

        submit(0)
        for k, (label, names) in enumerate(todo):
            if skip(label):
                yield label, names, None
                continue
            loaded = futures.pop(k).result()
            submit(k + 1)
            yield label, names, check_group(ins, loaded)


def layer_groups(plan: Plan) -> list[tuple[str, list[str]]]:
    """Tensor groups in write order: ("embed", [...]), ("layer 0", [...]), ..., ("head", [...])."""
    order = plan.tensor_order
    groups = [("embed", [order[0]])]
    for i in range(plan.num_layers):
        groups.append((f"layer {i}", [n for n in order if n.startswith(layer_prefix(i))]))
    groups.append(("head", [n for n in order[1:] if not n.startswith("model.layers.")]))
    return groups


# -- combining tensors with per-module α ------------------------------------------------------------

def combine(name: str, base: torch.Tensor, tuned: list[torch.Tensor], parts: list, alphas: dict[str, np.ndarray],
            rows: tuple[int, int] | None = None) -> torch.Tensor:
    """θ_0 + Σ_t α_t τ_t for one tensor (or a block of its rows), α varying along sliced dims."""
    base32 = base.to(torch.float32)
    out = base32.clone()
    for t, tt in enumerate(tuned):
        coef = _coef(name, base.shape, parts, alphas, t, rows)
        out += coef * (tt.to(torch.float32) - base32)
    return out


def _coef(name, shape, parts, alphas, t, rows):
    if len(parts) == 1 and parts[0][0].dim is None:
        return float(alphas[parts[0][1]][t])
    dims = {p.dim for p, _ in parts}
    if len(dims) != 1 or None in dims:
        raise RuntimeError(f"internal error: {name} has mixed whole/sliced ownership")
    dim = dims.pop()
    vec = torch.full((shape[dim],), float("nan"))
    for p, mod in parts:
        vec[p.start:p.stop] = float(alphas[mod][t])
    if torch.isnan(vec).any():
        raise RuntimeError(f"internal error: {name} has slices owned by no module")
    if dim == 0:
        if rows is not None:
            vec = vec[rows[0]:rows[1]]
        return vec.reshape(-1, *([1] * (len(shape) - 1)))
    return vec.reshape(*([1] * dim), -1, *([1] * (len(shape) - dim - 1)))


def write_alpha_tensors(ins: Inputs, plan: Plan, writer: ShardedWriter, alphas: dict[str, np.ndarray],
                        names: list[str], loaded: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Write merged tensors; vocab-sized ones are read and written in row blocks."""
    parts = plan.tensor_parts()
    for n in names:
        if n not in parts:  # e.g. rotary inv_freq buffers in old checkpoints: copied from the base
            writer.write(n, (loaded[0][n] if loaded else ins.base.get(n)))
            continue
        if loaded is not None:
            writer.write(n, combine(n, loaded[0][n], [g[n] for g in loaded[1:]], parts[n], alphas))
            continue
        rows = ins.base.shapes[n][0] if ins.base.shapes[n] else 1
        for lo in range(0, rows, ROW_BLOCK):
            hi = min(rows, lo + ROW_BLOCK)
            blocks = [ck.get_rows(n, lo, hi) for ck in ins.all]
            _check_finite(ins, n, blocks)
            writer.write(n, combine(n, blocks[0], blocks[1:], parts[n], alphas, (lo, hi)), row_offset=lo)


def _check_finite(ins: Inputs, name: str, tensors: list[torch.Tensor]) -> None:
    for ck, t in zip(ins.all, tensors):
        if not all_finite(t):
            raise MergeError(f"{ck.label}: tensor {name} in {ck.file_of[name]} has non-finite values (NaN/Inf)")


# -- the closed-form method -------------------------------------------------------------------------

@dataclass
class SltaResult:
    solutions: dict[str, Solution]
    grams: dict[str, torch.Tensor]
    tasks: np.ndarray
    sample_indices: list[list[int]]
    timings: dict[str, float] = field(default_factory=dict)


class Journal:
    """Progress of a resumable merge (`--resume`), kept in OUT.partial: the groups of tensors that are
    durably written, and for slta the solved modules and the Gram statistics so far. Without a
    folder (a run without --resume) every method is a no-op."""

    FILE, GRAMS = "slta_progress.json", "slta_progress_grams.safetensors"

    def __init__(self, folder: Path | None, fingerprint: str):
        self.folder, self.fingerprint = folder, fingerprint
        self.done: list[str] = []
        self.modules: dict[str, dict] = {}
        if folder is None or not (folder / self.FILE).exists():
            return
        saved = json.loads((folder / self.FILE).read_text())
        if saved.get("fingerprint") != fingerprint:
            log.warning("%s holds a partial merge of a different config; starting over", folder)
            for f in folder.iterdir():
                f.unlink() if f.is_file() else shutil.rmtree(f)
            return
        self.done, self.modules = saved["done"], saved.get("modules", {})
        if self.done:
            log.info("resuming: %d of the tensor groups were already written (%s ... %s)", len(self.done),
                     self.done[0], self.done[-1])

    @property
    def resuming(self) -> bool:
        return bool(self.done)

    def grams(self) -> dict[str, torch.Tensor]:
        if self.folder is None or not (self.folder / self.GRAMS).exists():
            return {}
        from safetensors.torch import load_file

        return load_file(self.folder / self.GRAMS)

    def mark(self, label: str, writer: ShardedWriter, modules: dict[str, dict] | None = None,
             grams: dict[str, torch.Tensor] | None = None) -> None:
        if self.folder is None:
            return
        writer.flush()  # the tensors first, then the record that says they are there
        if grams is not None:
            tmp = self.folder / (self.GRAMS + ".tmp")
            save_file({k: v.cpu().contiguous() for k, v in grams.items()}, str(tmp))
            tmp.replace(self.folder / self.GRAMS)
        self.done.append(label)
        self.modules.update(modules or {})
        tmp = self.folder / (self.FILE + ".tmp")
        tmp.write_text(json.dumps({"fingerprint": self.fingerprint, "done": self.done, "modules": self.modules}))
        tmp.replace(self.folder / self.FILE)

    def close(self) -> None:
        if self.folder is not None:
            for name in (self.FILE, self.GRAMS):
                (self.folder / name).unlink(missing_ok=True)


def calibration(ins: Inputs) -> tuple[list[list[list[int]]], list[list[int]]]:
    from transformers import AutoTokenizer

    cfg = ins.cfg
    vocab_files = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")
    if not any((ins.base.folder / n).exists() for n in vocab_files):
        raise MergeError(f"{ins.base.label}: no tokenizer in {ins.base.folder} (no {' or '.join(vocab_files[:2])}); "
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
    tasks, indices = [], []
    for entry in cfg.models:
        ts = load_task(cfg.path(entry.data), tok, cfg.param("num_samples"), cfg.param("seed"),
                       cfg.param("max_length"), label=f"model {entry.model}")
        for ids in ts.ids:
            bad = [t for t in ids if t >= ins.hf_config.vocab_size]
            if bad:
                raise MergeError(f"model {entry.model}: {entry.data} tokenizes to id {bad[0]} >= vocab_size "
                                 f"{ins.hf_config.vocab_size}: the tokenizer does not match the model")
        ins.warnings.extend(ts.warnings)
        tasks.append(ts.ids)
        indices.append(ts.indices)
    return tasks, indices


def solve_closed_form(ins: Inputs, plan: Plan, writer: ShardedWriter | None, device: torch.device,
                      progress: bool = True, compute_dtype: torch.dtype = torch.float32,
                      journal: Journal | None = None) -> SltaResult:
    """Stream the layers, accumulate Grams, solve α per module and (if a writer is given) write."""
    cfg = ins.cfg
    T = len(ins.tuned)
    balance, rcond = cfg.param("balance"), 1e-9
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    tasks, indices = calibration(ins)
    timings["calibration"] = time.perf_counter() - t0
    from slta.features import GramStore, Runner, layer_features, sub, to_compute

    runner = Runner(plan, device, compute_dtype)
    batches = runner.make_batches(tasks, cfg.param("batch_size"))
    N = sum(len(t) for t in tasks)
    task_of = np.concatenate([np.full(len(t), k, dtype=np.int64) for k, t in enumerate(tasks)])
    store = GramStore([m.name for m in plan.modules], N, T, device)
    sols: dict[str, Solution] = {}
    alphas: dict[str, np.ndarray] = {}
    model_level = plan.granularity == "model"
    tied = plan.tied
    journal = journal or Journal(None, "")
    for name, g in journal.grams().items():  # resuming: the statistics gathered so far
        store.g[name].copy_(g.to(device))
    for name, info in journal.modules.items():
        sols[name] = Solution(np.array(info["alpha"]), info["rule"], info["rank"],
                              float("inf") if info["cond"] is None else info["cond"], np.zeros(0), np.zeros(0),
                              info["skipped_samples"])
        alphas[name] = sols[name].alpha

    def solve(name: str) -> None:
        sols[name] = solve_module(store.g[name].cpu().numpy(), task_of, balance, rcond=rcond)
        alphas[name] = sols[name].alpha

    def mark(label: str, names: list[str]) -> None:
        if writer is not None:
            journal.mark(label, writer, {n: sols[n].to_json() for n in names}, store.g)

    groups = layer_groups(plan)
    # a reader thread loads layer i+1's T+1 versions while layer i computes
    skip = lambda label: label in journal.done or label in ("embed", "head")  # noqa: E731 - read by their own stages
    bar = tqdm(prefetched(ins, groups, skip=skip), total=len(groups), desc="slta: layers", disable=not progress, unit="layer")
    t_feat = time.perf_counter()
    for label, group, loaded in bar:
        bar.set_postfix_str(label)
        if label in journal.done:  # resuming: only the base forward pass is replayed
            if label == "embed":
                embed_stage(ins, plan, runner, batches, None)
            else:
                i = int(label.split()[1])
                replay_base_layer(runner, i, plan, load_group_of(ins.base, group, i, device, compute_dtype), batches)
            continue
        if label == "embed":
            embed_stage(ins, plan, runner, batches, store, model_level)
            if not model_level and not tied:
                solve("embed")
                if writer:
                    write_alpha_tensors(ins, plan, writer, alphas, group)
                mark(label, ["embed"])
            elif not model_level:
                mark(label, [])
        elif label == "head":
            head_stage(ins, plan, runner, batches, store, model_level)
            finals = ["model"] + ([] if tied else ["lm_head"]) if model_level else (["embed_head"] if tied else ["head"])
            for name in finals:
                solve(name)
            if writer and not model_level:
                write_alpha_tensors(ins, plan, writer, alphas, ([plan.tensor_order[0]] if tied else []) + group)
        else:
            i = int(label.split()[1])
            versions = [to_compute(sub(g, layer_prefix(i)), device, compute_dtype) for g in loaded]
            if model_level:
                for batch in batches:
                    batch.hv = [runner.layer_out(i, p, h, batch) for p, h in zip(versions, batch.hv)]
            else:
                layer_features(runner, i, plan.layer_modules(i), versions, batches, store)
                for m in plan.layer_modules(i):
                    solve(m.name)
                if writer:
                    write_alpha_tensors(ins, plan, writer, alphas, group, loaded)
                mark(label, [m.name for m in plan.layer_modules(i)])
            del loaded, versions
    timings["features_and_solve"] = time.perf_counter() - t_feat
    if model_level and writer:  # α is known only now: a second pass writes every tensor
        t_w = time.perf_counter()
        for label, group in tqdm(groups, desc="slta: writing", disable=not progress, unit="layer"):
            if label == "embed" or label == "head":
                write_alpha_tensors(ins, plan, writer, alphas, group)
            else:
                write_alpha_tensors(ins, plan, writer, alphas, group, load_group(ins, group))
        timings["write"] = time.perf_counter() - t_w
    return SltaResult(sols, {k: v.cpu() for k, v in store.g.items()}, task_of, indices, timings)


def load_group_of(ck: Checkpoint, group: list[str], i: int, device: torch.device,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    from slta.features import sub, to_compute

    return to_compute(sub(ck.get_many(group), layer_prefix(i)), device, dtype)


def replay_base_layer(runner: Runner, i: int, plan: Plan, base: dict[str, torch.Tensor], batches: list[Batch]) -> None:
    """Advance the base hidden states through layer i exactly as `layer_features` does (same calls,
    same order), so a resumed run computes bit-identical statistics for the layers after it."""
    for b in batches:
        if plan.granularity == "layer":
            b.h = runner.layer_out(i, base, b.h, b)
        else:
            m = b.h + runner.attn_out(i, base, b.h, b)
            b.h = m + runner.mlp_out(i, base, m)


def embed_stage(ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], store: GramStore | None,
                model_level: bool = False) -> None:
    """Embedding rows, read in row blocks: Δf = E_t[ids] - E_0[ids]; sets each batch's base input.
    Without a store only the base is read (the base forward pass alone, e.g. for RegMean)."""
    name = plan.tensor_order[0]
    vocab, hidden = ins.base.shapes[name]
    dev, dt = runner.device, runner.dtype
    ckpts = ins.all if store is not None else [ins.base]
    T1 = len(ckpts)
    for b in batches:
        b.h = torch.zeros(*b.ids.shape, hidden, device=dev, dtype=dt)
        if model_level:
            b.hv = [torch.zeros_like(b.h) for _ in range(T1)]
    module = "model" if model_level else ("embed_head" if plan.tied else "embed")
    for lo in range(0, vocab, ROW_BLOCK):
        hi = min(vocab, lo + ROW_BLOCK)
        blocks = [ck.get_rows(name, lo, hi).to(dev, dt) for ck in ckpts]
        _check_finite(ins, name, blocks)
        for b in batches:
            sel = (b.ids >= lo) & (b.ids < hi) & b.valid
            if not sel.any():
                continue
            local = (b.ids - lo).clamp(0, hi - lo - 1)
            rows = [blk[local] * sel[..., None] for blk in blocks]
            b.h += rows[0]
            if model_level:
                for v in range(T1):
                    b.hv[v] += rows[v]
            elif store is not None:
                store.add(module, rows, b, valid=sel)
    if model_level:
        for b in batches:
            b.h = b.hv[0]


def head_stage(ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], store: GramStore,
               model_level: bool) -> None:
    """Output head features: logits = lm_head(norm(h)), vocab in row blocks (the Gram is a sum over
    vocabulary blocks, so the full logits never exist). Model level: final hidden states (+ logits when tied)."""
    dev, dt = runner.device, runner.dtype
    norm_mod = runner.model.model.norm
    norms = [ {"weight": ck.get("model.norm.weight").to(dev, dt)} for ck in ins.all]
    _check_finite(ins, "model.norm.weight", [n["weight"] for n in norms])
    from torch.func import functional_call

    weight = "model.embed_tokens.weight" if plan.tied else "lm_head.weight"
    if model_level:
        finals = {id(b): [functional_call(norm_mod, n, (h,)) for n, h in zip(norms, b.hv)] for b in batches}
        for b in batches:
            store.add("model", finals[id(b)], b)
        module = "model" if plan.tied else "lm_head"
        # untied lm_head is its own module, on the base's normalised final hidden states
        xs = {id(b): (finals[id(b)] if plan.tied else [finals[id(b)][0]] * len(ins.all)) for b in batches}
    else:
        module = "embed_head" if plan.tied else "head"
        xs = {id(b): [functional_call(norm_mod, n, (b.h,)) for n in norms] for b in batches}
    vocab = ins.base.shapes[weight][0]
    for lo in range(0, vocab, ROW_BLOCK):
        hi = min(vocab, lo + ROW_BLOCK)
        blocks = [ck.get_rows(weight, lo, hi).to(dev, dt) for ck in ins.all]
        _check_finite(ins, weight, blocks)
        for b in batches:
            store.add(module, [x @ w.T for x, w in zip(xs[id(b)], blocks)], b)


# -- data-free methods ------------------------------------------------------------------------------

def merge_data_free(ins: Inputs, plan: Plan, writer: ShardedWriter, device: torch.device, progress: bool = True,
                    journal: Journal | None = None) -> None:
    """Tensor-by-tensor methods; parameters resolved per tensor with mergekit's rules."""
    from slta.methods.params import layer_index, resolve_tensor_params

    cfg = ins.cfg
    method = cfg.method()
    seed = int(cfg.param("seed"))
    own = [e.parameters for e in cfg.models]
    journal = journal or Journal(None, "")
    groups = layer_groups(plan)
    bar = tqdm(prefetched(ins, groups, skip=lambda label: label in journal.done), total=len(groups),
               desc=f"{method.name}: layers", disable=not progress, unit="layer")
    for label, group, loaded in bar:
        if loaded is None:  # written by an earlier, interrupted run
            continue
        for n in group:
            per_model, shared = resolve_tensor_params(method, own, cfg.parameters, n, layer_index(n), plan.num_layers)
            base = loaded[0][n].to(device, torch.float32)
            tuned = [g[n].to(device, torch.float32) for g in loaded[1:]]
            merged = method.tensor_fn(n, base, tuned, per_model, shared, seed)
            if not all_finite(merged):
                raise MergeError(f"{method.name} produced non-finite values for tensor {n}")
            writer.write(n, merged)
        del loaded
        journal.mark(label, writer)


# -- the whole command ------------------------------------------------------------------------------

def run_merge(config: str | Path | dict | MergeConfig, out: str | Path, overwrite: bool = False,
              device: str = "cpu", shard_size: str | int = "5GB", progress: bool = True,
              save_stats: bool = True, resume: bool = False) -> Path:
    """`slta merge CONFIG -o OUT`: run the merge the config describes and write a Hugging Face folder.

    With `resume`, the run works in OUT.partial, which an interruption leaves behind, and continues
    from the tensor groups already written there (the work per layer is deterministic, so the
    result is byte-identical to an uninterrupted run)."""
    started = time.perf_counter()
    cfg = load_merge_config(config)
    check_output(out, overwrite, input_paths(cfg))  # before any work: OUT must not hold an input
    dev = resolve_device(device)
    ins = open_inputs(cfg)
    method = cfg.method()
    granularity = cfg.param("granularity") if method.name == "slta" else "layer"
    plan = build_plan(ins.hf_config, ins.base.names(), granularity)
    out = Path(out)
    report: dict[str, Any] = {"method": method.name}
    resumable = resume and not (method.name == "regmean" or granularity == "model")
    if resume and not resumable:
        log.warning("%s merges are not resumable (%s); this run starts from the beginning",
                    method.name, "two passes over the model" if granularity == "model" else "no journal")
    needed = output_bytes(ins, plan)
    with atomic_output(out, overwrite, resume=resumable, inputs=input_paths(cfg), needed=needed) as tmp:
        fingerprint = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), dtype_name(ins.out_dtype),
                                                 str(shard_size), slta.__version__], sort_keys=True).encode()).hexdigest()
        journal = Journal(tmp if resumable else None, fingerprint)
        writer = ShardedWriter(tmp, [(n, ins.base.shapes[n]) for n in plan.tensor_order], ins.out_dtype,
                               parse_size(shard_size), resume=journal.resuming)
        for label, group in layer_groups(plan):
            if label in journal.done:
                writer.written.update(group)
        try:
            if method.name == "slta":
                res = solve_closed_form(ins, plan, writer, dev, progress, journal=journal)
                report.update(slta_report(cfg, plan, res))
                if save_stats:
                    write_stats(tmp / "slta_stats.safetensors", cfg, ins, plan, res)
            elif method.name == "regmean":
                from slta.methods.regmean import run_regmean

                report.update(run_regmean(ins, plan, writer, dev, progress))
            elif method.tensor_fn is not None:
                merge_data_free(ins, plan, writer, dev, progress, journal)
            else:
                raise ConfigError(f"merge_method {method.name!r} cannot run through slta merge yet")
            writer.finish()
        except BaseException:
            writer.abort()
            if resumable:
                log.warning("interrupted: the finished layers are kept in %s; run the same command with "
                            "--resume to continue", tmp)
            raise
        journal.close()
        report["timings"] = {**report.get("timings", {}), "total": time.perf_counter() - started}
        finish_folder(tmp, ins, cfg, report)
    return out


def finish_folder(tmp: Path, ins: Inputs, cfg: MergeConfig, report: dict[str, Any]) -> None:
    """config.json (dtype updated), tokenizer and generation files, report and model card."""
    if cfg.tokenizer_source not in (None, "base"):
        raise ConfigError(f"tokenizer_source: only 'base' is supported, got {cfg.tokenizer_source!r}")
    conf = read_config_json(ins.base.folder)
    conf["dtype"] = dtype_name(ins.out_dtype)
    conf.pop("torch_dtype", None)
    (tmp / "config.json").write_text(json.dumps(conf, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        if (ins.base.folder / name).exists():
            shutil.copy2(ins.base.folder / name, tmp / name)
    full = {
        "slta_version": slta.__version__,
        "versions": {"torch": torch.__version__, "transformers": _version("transformers"),
                     "safetensors": _version("safetensors"), "numpy": np.__version__,
                     "python": platform.python_version()},
        "config": cfg.model_dump(mode="json"),
        "base_model": str(ins.base.folder),
        "models": [str(ck.folder) for ck in ins.tuned],
        "inputs": {
            "fingerprint_rule": "sha256 of config.json, file names, sizes and safetensors headers",
            "checkpoints": {str(ck.folder): fingerprint(ck.folder) for ck in ins.all},
            "calibration_sha256": {str(cfg.path(m.data)): file_sha256(cfg.path(m.data)) for m in cfg.models if m.data},
        },
        "dtype": dtype_name(ins.out_dtype),
        **report,
        "warnings": [*ins.warnings, *report.get("warnings", [])],
    }
    (tmp / "slta_report.json").write_text(json.dumps(full, indent=2) + "\n")
    from slta.report import mergekit_config, model_card

    (tmp / "README.md").write_text(model_card(full))
    if full.get("modules") and full.get("method") == "slta":
        mk = mergekit_config(full, ins.hf_config.num_hidden_layers, bool(getattr(ins.hf_config, "tie_word_embeddings", False)))
        if mk is not None:  # the solved α as a mergekit task_arithmetic config, for mergekit pipelines
            import yaml

            (tmp / "mergekit_config.yml").write_text(yaml.safe_dump(mk, sort_keys=False))


def fingerprint(folder: Path) -> str:
    """sha256 of a checkpoint's config.json, file names, sizes and safetensors headers (which hold every
    tensor's name, dtype, shape and byte range). Not of the full content: that would mean reading
    every checkpoint a second time."""
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        if not f.is_file():
            continue
        h.update(f"{f.name}\0{f.stat().st_size}\0".encode())
        if f.suffix == ".safetensors":
            with open(f, "rb") as fh:
                n = struct.unpack("<Q", fh.read(8))[0]
                h.update(fh.read(n))
        elif f.name == "config.json" or f.name.endswith(".index.json"):
            h.update(f.read_bytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _version(pkg: str) -> str:
    from importlib.metadata import version

    return version(pkg)


def slta_report(cfg: MergeConfig, plan: Plan, res: SltaResult) -> dict[str, Any]:
    return {
        "granularity": plan.granularity,
        "balance": cfg.param("balance"),
        "num_samples": cfg.param("num_samples"),
        "seed": cfg.param("seed"),
        "samples_per_task": [len(ix) for ix in res.sample_indices],
        "solver": {"rule": "eigen-decomposition of the symmetric PSD A: exact solve when every eigenvalue "
                           "exceeds rcond * max; else the minimum-norm least-squares solution over the "
                           "eigenvalues above it; A = 0 gives α = 0", "rcond": 1e-9},
        "modules": {name: sol.to_json() for name, sol in res.solutions.items()},
        "timings": res.timings,
    }


# -- saved statistics: measure once, solve many -------------------------------------------------------

def write_stats(path: Path, cfg: MergeConfig, ins: Inputs, plan: Plan, res: SltaResult) -> None:
    tensors = {f"gram/{k}": v.contiguous() for k, v in res.grams.items()}
    tensors["tasks"] = torch.from_numpy(res.tasks)
    meta = {
        "base_model": str(ins.base.folder.resolve()),
        "models": [str(ck.folder.resolve()) for ck in ins.tuned],
        "data": [str(cfg.path(m.data).resolve()) for m in cfg.models],
        "granularity": plan.granularity,
        "num_samples": cfg.param("num_samples"),
        "seed": cfg.param("seed"),
        "max_length": cfg.param("max_length"),
        "sample_indices": res.sample_indices,
        "config": cfg.model_dump(mode="json"),
        "slta_version": slta.__version__,
    }
    save_file(tensors, str(path), metadata={"slta": json.dumps(meta)})


def read_stats(path: str | Path) -> tuple[dict[str, np.ndarray], np.ndarray, dict[str, Any]]:
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():
        path = path / "slta_stats.safetensors"
    if not path.exists():
        raise MergeError(f"statistics file {path} does not exist (written by `slta merge` with merge_method: slta)")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["slta"])
            grams = {k[len("gram/"):]: f.get_tensor(k).numpy() for k in f.keys() if k.startswith("gram/")}
            tasks = f.get_tensor("tasks").numpy()
    except (KeyError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: not an slta statistics file ({e})") from e
    return grams, tasks, meta


def run_solve(stats: str | Path, out: str | Path, models: list[int] | None = None, balance: bool | None = None,
              overwrite: bool = False, shard_size: str | int = "5GB", dtype: str | None = None,
              progress: bool = True) -> Path:
    """`slta solve STATS -o OUT`: re-solve α from saved Grams for any subset of the models, plain or
    balanced, and write the merge. No forward pass: only the T+1 checkpoints are read again."""
    started = time.perf_counter()
    grams, tasks, meta = read_stats(stats)
    stats_inputs = {f"statistics {stats}": stats, f"base_model {meta['base_model']}": meta["base_model"],
                    **{f"model {p}": p for p in meta["models"]}, **{f"data {p}": p for p in meta["data"]}}
    check_output(out, overwrite, stats_inputs)
    T = len(meta["models"])
    models = list(range(T)) if models is None else list(models)
    if not models or any(not 0 <= m < T for m in models) or len(set(models)) != len(models):
        raise MergeError(f"--models must be distinct indices in 0..{T - 1} (the statistics hold {T} models: "
                         + ", ".join(f"{i}={p}" for i, p in enumerate(meta["models"])) + ")")
    raw = dict(meta["config"])
    raw["base_model"] = meta["base_model"]
    raw["models"] = [{**raw["models"][m], "model": meta["models"][m], "data": meta["data"][m]} for m in models]
    raw["parameters"] = dict(raw.get("parameters") or {})
    if balance is not None:
        raw["parameters"]["balance"] = balance
    if dtype is not None:
        raw["dtype"], raw["out_dtype"] = dtype, None
    cfg = load_merge_config(raw)
    ins = open_inputs(cfg)
    plan = build_plan(ins.hf_config, ins.base.names(), meta["granularity"])
    bal = cfg.param("balance")
    sols = {name: solve_module(g, tasks, bal, models=models) for name, g in grams.items()}
    alphas = {k: s.alpha for k, s in sols.items()}
    with atomic_output(out, overwrite, inputs=stats_inputs, needed=output_bytes(ins, plan)) as tmp:
        writer = ShardedWriter(tmp, [(n, ins.base.shapes[n]) for n in plan.tensor_order], ins.out_dtype,
                               parse_size(shard_size))
        try:
            for label, group in tqdm(layer_groups(plan), desc="slta solve: writing", disable=not progress):
                loaded = None if label in ("embed", "head") else load_group(ins, group)
                write_alpha_tensors(ins, plan, writer, alphas, group, loaded)
            writer.finish()
        except BaseException:
            writer.abort()
            raise
        report = {"method": "slta", "granularity": plan.granularity, "balance": bal,
                  "num_samples": meta["num_samples"], "seed": meta["seed"], "solved_from": str(Path(stats)),
                  "models_subset": models,
                  "samples_per_task": [int((tasks == m).sum()) for m in models],
                  "modules": {k: s.to_json() for k, s in sols.items()},
                  "timings": {"total": time.perf_counter() - started}}
        finish_folder(tmp, ins, cfg, report)
    return Path(out)
