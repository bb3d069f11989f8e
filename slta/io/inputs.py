"""Opening and validating a merge's inputs, before any heavy work (SPEC section 1).

`open_inputs` opens the base and every fine-tune, and checks that they share the architecture, the
tensor names and shapes, the tokenizer, and that each fine-tune is close to the base (a fine-tune,
not an unrelated model). The readers of tensor groups (`read_group`, `check_group`, `load_group`)
check that every tensor read is finite and name the model, file and tensor when one is not.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from slta.config import ConfigError, MergeConfig
from slta.io.adapter import AdapterCheckpoint, is_adapter
from slta.io.architecture import config_differences, load_config, tensor_plan
from slta.io.checkpoint import Checkpoint, parse_dtype

if TYPE_CHECKING:
    from slta.io.architecture import Plan

log = logging.getLogger("slta")


class MergeError(ValueError):
    """Bad input found while merging; the message names the model, file and tensor."""


@dataclass
class Inputs:
    """Everything a merge reads: the config, the opened checkpoints, the architecture config and the
    output dtype. `all` is [base, fine-tune 1, .., fine-tune T] (version 0 is the base)."""

    cfg: MergeConfig
    base: Checkpoint
    tuned: list[Checkpoint]
    hf_config: Any
    out_dtype: torch.dtype
    warnings: list[str] = field(default_factory=list)  # logged when found; the report's "warnings"

    @property
    def all(self) -> list[Checkpoint]:
        """The T+1 checkpoints: base first."""
        return [self.base, *self.tuned]


def resolve_device(device: str) -> torch.device:
    """`--device` -> torch.device ("auto": CUDA when torch sees one, else the CPU)."""
    from slta.config import check_device

    device = check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {device} asked for, but torch sees no CUDA device")
    return torch.device(device)


def memory_total(device: torch.device | None = None) -> int:
    """Bytes of RAM of this machine (or of the GPU's memory for a CUDA device)."""
    if device is not None and device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


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


def open_inputs(cfg: MergeConfig, check_weights: bool = True) -> Inputs:
    """Open and cross-check every checkpoint before any heavy work (`check_weights=False`: headers
    only, no weight read: the fine-tunes' distances from the base are not checked)."""
    if not cfg.base_model:  # an adapter is a delta: it needs the model it applies to
        for i, e in enumerate(cfg.models):
            if is_adapter(cfg.path(e.model)):
                raise ConfigError(f"models[{i}] ({e.model}) is a PEFT adapter: set base_model to the model it was "
                                  f"trained on")
    base_path = cfg.model_path(cfg.base_model) if cfg.base_model else cfg.model_path(cfg.models[0].model)
    base_label = f"base_model {cfg.base_model}" if cfg.base_model else f"model {cfg.models[0].model}"
    if cfg.trust_remote_code:
        log.warning("trust_remote_code is on: Python code shipped inside the model folders will run")
    cut = cfg.method().tensor_fn is None  # slta and RegMean cut the model into modules; data-free methods don't
    hf = load_config(base_path, base_label, trust_remote_code=cfg.trust_remote_code, require_supported=cut)
    base = Checkpoint(base_path, base_label)
    tuned = []
    for entry in cfg.models:
        label = f"model {entry.model}"
        if is_adapter(cfg.model_path(entry.model)):  # a PEFT LoRA folder: read as base + its delta, base's config
            tuned.append(AdapterCheckpoint(cfg.model_path(entry.model), label, base, base_label, cfg.base_model))
            continue
        c = load_config(cfg.model_path(entry.model), label, trust_remote_code=cfg.trust_remote_code,
                        require_supported=cut)
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
    warnings: list[str] = []
    if check_weights:
        check_distances(base, tuned, base_label, hf.num_hidden_layers, warnings)
    check_tokenizers(base, tuned, base_label)
    if not any((base.folder / n).exists() for n in VOCAB_FILES):
        warnings.append(f"{base_label}: no tokenizer files in {base.folder}: the merged folder will have none "
                        f"either; copy the tokenizer into it before loading it with transformers")
        log.warning("%s", warnings[-1])
    out = cfg.out_dtype or cfg.dtype
    if out is None:
        out = getattr(hf, "dtype", None) or getattr(hf, "torch_dtype", None)
    if out is None or str(out) == "None":
        out = base.dtypes[next(iter(base.names()))]
    try:
        out_dtype = parse_dtype(out)
    except ValueError as e:
        raise ConfigError(f"dtype: {e}") from e
    return Inputs(cfg, base, tuned, hf, out_dtype, warnings)


# A tokenizer's vocabulary is in one of these; without any, a folder has no tokenizer.
VOCAB_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")

# A fine-tune moves its weights by a few percent at most; independently initialised weights of the
# same shape are ~1.4 apart (relative). Above this the model is not a fine-tune of the base.
MAX_RELATIVE_DISTANCE = 0.5


CHECK_ELEMENTS = 1 << 24  # entries per matrix read by check_distances


def check_distances(base: Checkpoint, tuned: list[Checkpoint], base_label: str, num_layers: int,
                    warnings: list[str] | None = None) -> list[float]:
    """Relative distance ||τ_t|| / ||θ_0|| of each fine-tune over layer 0's weight matrices, before any
    heavy work. Norm weights and other vectors are left out: they sit near 1 and would dominate the
    distance (a random "fine-tune" at hidden size 64 measured 0.474 with them). Also warns (into
    `warnings`) when a fine-tune's layer 0 equals the base's (a zero task vector there) or another's.
    Each matrix is read up to CHECK_ELEMENTS entries (its first rows): a 70B layer is not read whole
    (measured: the full check took 99 s and 5.5 GiB on a 70B-shaped layer 0)."""
    groups = tensor_plan(base.names()).groups  # layer 0's tensors, whatever the architecture's names
    names = groups[1][1] if len(groups) > 2 else base.names()[:1]
    names = [n for n in names if len(base.shapes[n]) >= 2 and "norm" not in n] or names

    def rows(ck: Checkpoint, n: str) -> torch.Tensor:
        shape = base.shapes[n]
        if len(shape) < 2 or math.prod(shape) <= CHECK_ELEMENTS:
            return ck.get(n)
        return ck.get_rows(n, 0, max(1, CHECK_ELEMENTS // math.prod(shape[1:])))

    b = {n: rows(base, n).float() for n in names}
    # float32 sums (torch's are cascaded: relative error ~1e-7 at 16M entries) are ample for a limit of
    # 0.5 and a warning, and 25x faster than float64 accumulation (0.5 s of a 250M model's merge)
    sq0 = {n: float(v.square().sum()) for n, v in b.items()}
    norm0 = math.sqrt(sum(sq0.values()))
    dists, signatures = [], []  # signature: Σ τ and Σ τ² per tensor; equal only for equal weights, in practice
    for ck in tuned:
        sq, worst, sig = 0.0, (0.0, names[0]), []
        for n in names:
            tau = rows(ck, n).float().sub_(b[n])
            d2 = float(tau.square().sum())
            sig += [d2, float(tau.sum())]
            sq += d2
            rel = math.sqrt(d2 / max(sq0[n], 1e-60))
            worst = max(worst, (rel, n))
        d = math.sqrt(sq) / max(norm0, 1e-30)
        if d > MAX_RELATIVE_DISTANCE:
            raise MergeError(f"{ck.label}: not a fine-tune of {base_label}: its layer-0 weight matrices are at "
                             f"relative distance {d:.3f} from the base's (tensor {worst[1]}: {worst[0]:.3f}; "
                             f"fine-tunes are typically below 0.1; limit {MAX_RELATIVE_DISTANCE}). Check base_model "
                             f"and the model paths.")
        dists.append(d)
        signatures.append(sig)
    notes = [f"{ck.label}: its layer-0 weights equal {base_label}'s: a zero task vector there (not fine-tuned?)"
             for ck, d in zip(tuned, dists) if d == 0.0]
    for j in range(len(tuned)):
        for k in range(j):
            if dists[j] > 0 and signatures[j] == signatures[k]:
                notes.append(f"{tuned[j].label} and {tuned[k].label} have identical layer-0 weights: duplicate "
                             f"fine-tunes? (the closed form then splits their α by the minimum-norm rule)")
    med = float(np.median(dists))
    for ck, d in zip(tuned, dists):
        if len(dists) > 2 and med > 0 and d > 10 * med:
            notes.append(f"{ck.label}: relative distance from the base {d:.4f} is over 10x the others' median {med:.4f}")
    for note in notes:
        log.warning("%s", note)
    if warnings is not None:
        warnings.extend(notes)
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


def check_finite(ins: Inputs, name: str, tensors: list[torch.Tensor]) -> None:
    """Raise a MergeError naming the model and file if tensor `name` (one version per checkpoint) is not finite."""
    for ck, t in zip(ins.all, tensors):
        if not all_finite(t):
            raise MergeError(f"{ck.label}: tensor {name} in {ck.file_of[name]} has non-finite values (NaN/Inf)")


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


