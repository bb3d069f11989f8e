"""PEFT LoRA adapter folders as merge inputs, read as base + delta while streaming.

An adapter folder (`adapter_config.json` + `adapter_model.safetensors` or `.bin`) is presented
with the same read interface as `Checkpoint` (names, shapes, dtypes, file_of, get, get_many,
get_rows), so every merge method, the closed form, RegMean and `slta analyze` use it unchanged.
Each read takes the base's tensors and applies the adapter to just those, the way peft's
`merge_and_unload()` does: W + scaling·B·A (scaling = lora_alpha/r, or lora_alpha/√r with
rsLoRA; rank_pattern/alpha_pattern per module), DoRA's magnitude rescaling on linear layers,
`lora_bias`, `modules_to_save` (the saved tensor replaces the base's) and trainable tokens (rows
replaced). No merged copy is ever written: memory holds one group's tensors, as for a full model.
"""

from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from slta.io.checkpoint import Checkpoint, CheckpointError

log = logging.getLogger("slta")

ADAPTER_CONFIG = "adapter_config.json"
WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin")
PREFIX = "base_model.model."  # peft's key prefix in front of the wrapped model's own module names
# These initialisations rewrite the base weights (residual model); the adapter fits the original
# base only after peft converted it on save (which resets init_lora_weights to true).
MODIFIED_BASE_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")
# LoRA variants whose weights are not W + scaling·B·A on this base's modules: refused, not guessed.
UNSUPPORTED_OPTIONS = ("alora_invocation_tokens", "layer_replication", "target_parameters", "use_qalora",
                       "use_bdlora", "arrow_config", "kasa_config", "velora_config", "monteclora_config")
HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+(@[\w./-]+)?$")


class AdapterError(CheckpointError):
    """An adapter that cannot be applied to the base; the message names the adapter, file and module."""


def is_adapter(folder: str | Path) -> bool:
    """True when `folder` is a PEFT adapter folder (it holds adapter_config.json)."""
    return (Path(folder) / ADAPTER_CONFIG).is_file()


@dataclass
class _Lora:
    """One adapted weight: keys of its factors in the adapter file and how to combine them."""
    a: str
    b: str
    scaling: float
    embedding: bool = False  # peft stores embedding factors transposed: delta = (B @ A).T
    magnitude: str | None = None  # DoRA


class AdapterCheckpoint:
    """A PEFT LoRA adapter folder applied lazily to a base `Checkpoint`, tensor group by group."""

    def __init__(self, folder: str | Path, label: str, base: Checkpoint, base_label: str,
                 base_ref: str | None = None):
        self.folder, self.label, self.base = Path(folder), label, base
        self.format = "adapter"
        self.config = self._read_config()
        self.weights = next((self.folder / f for f in WEIGHT_FILES if (self.folder / f).exists()), None)
        if self.weights is None:
            raise AdapterError(f"{label}: adapter folder {self.folder} has {ADAPTER_CONFIG} but no "
                               f"{' or '.join(WEIGHT_FILES)}")
        self._check_config()
        self._check_base_name(base_label, base_ref)
        # merged tensors keep the base's names, shapes and dtypes (as merge_and_unload does)
        self.shapes, self.dtypes = base.shapes, base.dtypes
        self.file_of: dict[str, Path] = dict(base.file_of)
        self.lora: dict[str, _Lora] = {}
        self.bias: dict[str, tuple[str, float]] = {}  # base bias -> (lora_B.bias key, scaling)
        self.replaced: dict[str, str] = {}  # base tensor -> adapter key (modules_to_save)
        self.tokens: dict[str, tuple[str, list[int]]] = {}  # base embedding -> (delta key, row indices)
        self._bin: dict[str, torch.Tensor] | None = None
        self._index(base_label)

    # -- config -------------------------------------------------------------------------------
    def _read_config(self) -> dict[str, Any]:
        path = self.folder / ADAPTER_CONFIG
        try:
            cfg = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
            raise AdapterError(f"{self.label}: unreadable {path} ({e})") from e
        if not isinstance(cfg, dict):
            raise AdapterError(f"{self.label}: {path} is not a JSON object")
        return cfg

    def _check_config(self) -> None:
        c, where = self.config, f"{self.label} ({self.folder / ADAPTER_CONFIG})"
        kind = str(c.get("peft_type", "")).upper()
        if kind != "LORA":
            raise AdapterError(f"{where}: peft_type {c.get('peft_type')!r} is not supported: slta merges LoRA "
                               f"adapters; merge_and_unload it first")
        init = c.get("init_lora_weights")
        if isinstance(init, str) and init.lower().startswith(MODIFIED_BASE_INITS):
            raise AdapterError(f"{where}: init_lora_weights {init!r} trains against a modified base; save the adapter "
                               f"with path_initial_model_for_weight_conversion, or merge_and_unload it first")
        used = [k for k in UNSUPPORTED_OPTIONS if c.get(k)]
        if used:
            raise AdapterError(f"{where}: LoRA option {used[0]}={c[used[0]]!r} is not supported: slta merges plain "
                               f"LoRA/rsLoRA/DoRA adapters; merge_and_unload it first")

    def _check_base_name(self, base_label: str, base_ref: str | None) -> None:
        """The rule: a local folder named by base_model_name_or_path that exists here must have the
        base's architecture (a copy elsewhere is fine); hub ids are compared when the base's hub id is
        known (base_model given as a hub id, or a Hugging Face cache folder). Anything else (a path from
        another machine) cannot be judged, and the shape checks still apply."""
        name = self.config.get("base_model_name_or_path")
        if not name or not isinstance(name, str):
            return
        where = f"{self.label} ({self.folder / ADAPTER_CONFIG})"
        path = Path(name).expanduser()
        if path.is_dir():
            if path.resolve() == self.base.folder.resolve():
                return
            mine, theirs = _arch(path), _arch(self.base.folder)
            diff = [k for k in mine if k in theirs and mine[k] != theirs[k]]
            if diff:
                raise AdapterError(f"{where}: base_model_name_or_path {name} has {diff[0]}={mine[diff[0]]!r}, "
                                   f"{base_label} has {theirs[diff[0]]!r}: the adapter was trained on another model")
            log.info("%s: trained on %s, applied to %s (same architecture)", self.label, name, self.base.folder)
            return
        theirs_id = _hub_id(base_ref, self.base.folder)
        if HUB_ID.match(name) and theirs_id and name.split("@")[0].lower() != theirs_id.lower():
            raise AdapterError(f"{where}: base_model_name_or_path {name!r} is not {base_label} ({theirs_id}); the "
                               f"adapter was trained on another model (edit {ADAPTER_CONFIG} if this is intended)")

    def _scaling(self, module: str, rank: int, where: str) -> float:
        c = self.config
        r = _pattern(c.get("rank_pattern") or {}, module, c.get("r", rank))
        alpha = _pattern(c.get("alpha_pattern") or {}, module, c.get("lora_alpha", r))
        if r != rank:
            raise AdapterError(f"{where}: lora_A has rank {rank}, the config says r={r}")
        return alpha / math.sqrt(r) if c.get("use_rslora") else alpha / r

    # -- index --------------------------------------------------------------------------------
    def _index(self, base_label: str) -> None:
        shapes = self._adapter_shapes()
        fname, base = self.weights.name, self.base
        pending: dict[str, dict[str, str]] = {}
        for key, shape in shapes.items():
            if not key.startswith(PREFIX):
                raise AdapterError(f"{self.label} ({fname}): tensor {key} does not start with {PREFIX!r}: not a "
                                   f"peft LoRA state dict")
            rest = key[len(PREFIX):]
            for part in (".lora_A.weight", ".lora_B.weight", ".lora_B.bias", ".lora_magnitude_vector",
                         ".lora_embedding_A", ".lora_embedding_B", ".base_layer.weight",
                         ".token_adapter.trainable_tokens_delta"):
                if rest.endswith(part):
                    pending.setdefault(rest[: -len(part)], {})[part] = key
                    break
            else:  # modules_to_save: the module's own tensors, saved whole
                self._need(rest, rest.rsplit(".", 1)[0], base_label)
                if tuple(shape) != base.shapes[rest]:
                    raise AdapterError(f"{self.label} ({fname}): module {rest.rsplit('.', 1)[0]}: saved {rest} has "
                                       f"shape {list(shape)}, {base_label} has {list(base.shapes[rest])}")
                self.replaced[rest] = key
                self.file_of[rest] = self.weights
        for module, parts in pending.items():
            self._add_module(module, parts, shapes, base_label)

    def _need(self, tensor: str, module: str, base_label: str) -> None:
        if tensor not in self.base:
            raise AdapterError(f"{self.label} ({self.weights.name}): module {module} has no tensor {tensor} in "
                               f"{base_label}: the adapter does not fit this base")

    def _add_module(self, module: str, parts: dict[str, str], shapes: dict[str, tuple[int, ...]],
                    base_label: str) -> None:
        where = f"{self.label} ({self.weights.name}): module {module}"
        weight = f"{module}.weight"
        self._need(weight, module, base_label)
        ws = self.base.shapes[weight]

        def bad(what: str) -> AdapterError:
            return AdapterError(f"{where}: {what} does not fit {base_label}'s {weight} of shape {list(ws)}")

        if ".base_layer.weight" in parts and tuple(shapes[parts[".base_layer.weight"]]) != ws:
            raise bad(f"its saved base layer of shape {list(shapes[parts['.base_layer.weight']])}")
        if ".token_adapter.trainable_tokens_delta" in parts:
            key = parts[".token_adapter.trainable_tokens_delta"]
            rows = self._token_indices(module, where)
            if len(ws) != 2 or tuple(shapes[key]) != (len(rows), ws[1]) or any(not 0 <= i < ws[0] for i in rows):
                raise bad(f"trainable tokens {rows} with deltas of shape {list(shapes[key])}")
            self.tokens[weight] = (key, rows)
            self.file_of[weight] = self.weights
        emb = ".lora_embedding_A" in parts or ".lora_embedding_B" in parts
        a, b = (".lora_embedding_A", ".lora_embedding_B") if emb else (".lora_A.weight", ".lora_B.weight")
        if (a in parts) != (b in parts):
            raise AdapterError(f"{where}: has {a if a in parts else b} without {b if a in parts else a}")
        if a not in parts:
            if ".lora_magnitude_vector" in parts or ".lora_B.bias" in parts:
                raise AdapterError(f"{where}: DoRA magnitude or LoRA bias without lora_A/lora_B")
            return
        sa, sb = shapes[parts[a]], shapes[parts[b]]
        fifo = bool(self.config.get("fan_in_fan_out")) and not emb
        # delta = B @ A has shape (out, in); the base stores (out, in), or (in, out) under fan_in_fan_out,
        # and an embedding (rows, dim) with A (r, rows) and B (dim, r)
        want = (ws[1], ws[0]) if emb or fifo else tuple(ws)
        if len(ws) != 2 or len(sa) != 2 or len(sb) != 2 or sa[0] != sb[1] or (sb[0], sa[1]) != want:
            raise bad(f"lora A {list(sa)} and B {list(sb)}")
        lora = _Lora(parts[a], parts[b], self._scaling(module, sa[0], where), embedding=emb)
        if ".lora_magnitude_vector" in parts:
            if emb or fifo:
                raise AdapterError(f"{where}: DoRA is supported on linear layers only (this module is "
                                   f"{'an embedding' if emb else 'fan_in_fan_out'}); merge_and_unload it first")
            if tuple(shapes[parts[".lora_magnitude_vector"]]) != (ws[0],):
                raise bad(f"DoRA magnitude of shape {list(shapes[parts['.lora_magnitude_vector']])}")
            lora.magnitude = parts[".lora_magnitude_vector"]
        self.lora[weight] = lora
        self.file_of[weight] = self.weights
        if ".lora_B.bias" in parts:
            bias = f"{module}.bias"
            if bias not in self.base:
                raise AdapterError(f"{where}: lora_bias needs {bias}, which {base_label} does not have")
            self.bias[bias] = (parts[".lora_B.bias"], lora.scaling)
            self.file_of[bias] = self.weights

    def _token_indices(self, module: str, where: str) -> list[int]:
        spec = self.config.get("trainable_token_indices")
        if isinstance(spec, dict):
            spec = next((v for k, v in spec.items() if re.match(rf"(.*\.)?({k})$", module)), None)
        if not isinstance(spec, list):
            raise AdapterError(f"{where}: trainable token deltas saved but trainable_token_indices names no "
                               f"indices for this module")
        return [int(i) for i in spec]

    # -- adapter file -------------------------------------------------------------------------
    def _adapter_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.weights.suffix == ".bin":
            return {k: tuple(v.shape) for k, v in self._load_bin().items()}
        from safetensors import safe_open

        try:
            with safe_open(str(self.weights), framework="pt") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise AdapterError(f"{self.label}: {self.weights} is not a readable safetensors file ({e})") from e

    def _load_bin(self) -> dict[str, torch.Tensor]:
        if self._bin is None:  # pickles are only read with weights_only=True (no code execution)
            try:
                self._bin = torch.load(self.weights, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # noqa: BLE001
                raise AdapterError(f"{self.label}: cannot read {self.weights} with weights_only=True ({e})") from e
        return self._bin

    def _read(self, keys: set[str], index: dict[str, tuple[slice, ...]] | None = None) -> dict[str, torch.Tensor]:
        """Adapter tensors by key, float32 (peft merges in float32 on the CPU); `index` slices some keys."""
        index = index or {}
        if self.weights.suffix == ".bin":
            sd = self._load_bin()
            return {k: (sd[k][index[k]] if k in index else sd[k]).float() for k in keys}
        from safetensors import safe_open

        try:
            with safe_open(str(self.weights), framework="pt") as f:
                return {k: (f.get_slice(k)[index[k]] if k in index else f.get_tensor(k)).float()
                        for k in keys}
        except Exception as e:  # noqa: BLE001
            raise AdapterError(f"{self.label}: cannot read {sorted(keys)[0]} from {self.weights} ({e})") from e

    # -- the Checkpoint read interface -----------------------------------------------------------
    def names(self) -> list[str]:
        return self.base.names()

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def nbytes(self) -> int:
        return self.base.nbytes()

    def get(self, name: str) -> torch.Tensor:
        return self.get_many([name])[name]

    def get_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = self.base.get_many(names)
        keys = self._keys_for(names)
        if keys:
            ad = self._read(keys)
            for n in names:
                out[n] = self._apply(n, out[n], ad, 0, out[n].shape[0] if out[n].dim() else 0)
        return out

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        t = self.base.get_rows(name, start, stop)
        keys = self._keys_for([name])
        if not keys:
            return t
        start = max(0, min(start, self.shapes[name][0]))
        stop = start + t.shape[0]
        rows, cols = (slice(start, stop),), (slice(None), slice(start, stop))
        index: dict[str, tuple[slice, ...]] = {}
        if name in self.replaced:
            index[self.replaced[name]] = rows
        if name in self.lora:  # only the factor indexed by the stored weight's rows is sliced
            lo = self.lora[name]
            if lo.embedding or self.config.get("fan_in_fan_out"):  # stored (B @ A).T: rows are A's columns
                index[lo.a] = cols
            else:
                index[lo.b] = rows
                if lo.magnitude:
                    index[lo.magnitude] = rows
        return self._apply(name, t, self._read(keys, index), start, stop)

    def _keys_for(self, names: list[str]) -> set[str]:
        keys: set[str] = set()
        for n in names:
            if n in self.replaced:
                keys.add(self.replaced[n])
                continue
            if n in self.lora:
                lo = self.lora[n]
                keys |= {lo.a, lo.b} | ({lo.magnitude} if lo.magnitude else set())
            if n in self.bias:
                keys.add(self.bias[n][0])
            if n in self.tokens:
                keys.add(self.tokens[n][0])
        return keys

    def _apply(self, name: str, w: torch.Tensor, ad: dict[str, torch.Tensor], start: int, stop: int) -> torch.Tensor:
        """The merged rows [start, stop) of `name`, given the base's rows `w` and the adapter's tensors
        `ad` (the factors indexed by the weight's rows already sliced to them)."""
        if name in self.replaced:
            return ad[self.replaced[name]].to(w.dtype)
        out = w
        if name in self.lora:
            lo = self.lora[name]
            a, b = ad[lo.a], ad[lo.b]
            if lo.embedding:
                delta = (b @ a).T * lo.scaling  # peft: transpose(B @ A, True) * scaling
            else:
                delta = b @ a * lo.scaling
                delta = delta.T if self.config.get("fan_in_fan_out") else delta
            merged = w.float() + delta
            if lo.magnitude:  # DoRA (peft's merge): m / ||W + ΔW||_row · (W + ΔW), the norm on the unmerged base
                merged = (ad[lo.magnitude] / torch.linalg.norm(merged, dim=1)).view(-1, 1) * merged
            out = merged.to(w.dtype)
        if name in self.bias:
            key, scaling = self.bias[name]
            out = (w.float() + ad[key] * scaling).to(w.dtype)
        if name in self.tokens:
            key, rows = self.tokens[name]
            keep = [(j, i - start) for j, i in enumerate(rows) if start <= i < stop]
            if keep:
                out = out.clone() if out is w else out
                src, dst = torch.tensor([j for j, _ in keep]), torch.tensor([i for _, i in keep])
                out.index_copy_(0, dst, ad[key][src].to(out.dtype))
        return out


def _pattern(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern/alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _arch(folder: Path) -> dict[str, Any]:
    from slta.io.architecture import ARCH_KEYS

    try:
        raw = json.loads((folder / "config.json").read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return {k: raw.get(k) for k in ARCH_KEYS if k in raw}


def _hub_id(base_ref: str | None, folder: Path) -> str | None:
    """The base's hub id when known: base_model written as org/name, or a hub cache folder."""
    if base_ref and HUB_ID.match(base_ref) and not Path(base_ref).expanduser().exists():
        return base_ref.split("@")[0]
    for part in folder.absolute().parts:  # not resolved: snapshot folders may be links into the blobs
        if part.startswith("models--") and part.count("--") >= 2:
            return "/".join(part[len("models--"):].split("--", 1))
    return None
