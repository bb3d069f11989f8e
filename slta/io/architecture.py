"""How a `transformers` decoder model splits into submodules (SPEC section 3, paper A.3.3, A.3.5).

A *module* owns parameters: whole tensors, or slices of tensors along one dimension (a head
owns rows of q/k/v_proj and columns of o_proj). Every module gets its own merge weights α, so
a merged tensor is θ_0 + Σ_t α_t τ_t where α may vary along the sliced dimension.

Granularities:
  model     one module for the whole model (output: final hidden states after the norm)
  layer     one module per decoder layer
  attn_mlp  per layer: attention block (input norm + self-attention) and MLP block
            (post-attention norm + MLP)
  head_mlp  per layer: one module per key/value group (a head under MHA) owning its q/k/v rows
            and o_proj columns; the attention block (which then owns only the shared
            parameters: input norm, o_proj bias, q/k norms) and the MLP block
  linear    (beyond the paper, A.5.5) every nn.Linear separately; norms with their block

Outside the cut: the token embedding ("embed"; output: embedding rows) and the output head
("head" = final norm + lm_head; output: logits). Tied embeddings form one module
("embed_head") whose features are both outputs.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from slta.methods import GRANULARITIES  # the levels this module cuts (declared with slta's parameters)

if TYPE_CHECKING:  # transformers takes ~1.8 s to import and configure: data-free merges never need it
    from transformers import PretrainedConfig

SUPPORTED = ("llama", "mistral", "qwen2", "qwen3")

# Config keys that must agree between the base and every fine-tune.
ARCH_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
             "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings", "hidden_act",
             "rms_norm_eps", "attention_bias", "mlp_bias", "sliding_window", "layer_types")


class ArchitectureError(ValueError):
    """The model folder cannot be read, or its architecture is not supported."""


@dataclass(frozen=True)
class Part:
    """A slice [start, stop) of a tensor along `dim` (whole tensor when dim is None)."""

    tensor: str
    dim: int | None = None
    start: int = 0
    stop: int = 0


@dataclass
class Module:
    """A submodule with its own α (paper Eq. 10-14): the tensors, or slices of tensors, it owns."""

    name: str  # e.g. "embed", "layers.3.attn", "layers.3.head.1", "head", "model"
    kind: str  # embed | head | embed_head | model | lm_head | layer | attn | mlp | attn_head | linear
    layer: int | None
    parts: list[Part] = field(default_factory=list)
    group: int | None = None  # kv group index for attn_head
    linear: str | None = None  # for kind == "linear": the submodule path inside the layer


@dataclass
class Plan:
    """The cut of a model into modules at one granularity, and the order the tensors are written in."""

    config: PretrainedConfig
    granularity: str
    modules: list[Module]
    tensor_order: list[str]  # every tensor, in the order they are written

    @property
    def num_layers(self) -> int:
        """Number of decoder layers."""
        return self.config.num_hidden_layers

    @property
    def tied(self) -> bool:
        """Whether lm_head shares the embedding's weights."""
        return bool(getattr(self.config, "tie_word_embeddings", False))

    def layer_modules(self, i: int) -> list[Module]:
        """The modules of decoder layer i."""
        return [m for m in self.modules if m.layer == i]

    def by_name(self) -> dict[str, Module]:
        """Module name -> module."""
        return {m.name: m for m in self.modules}

    def tensor_parts(self) -> dict[str, list[tuple[Part, str]]]:
        """tensor name -> [(part, module name)]: how each tensor's α is assembled."""
        out: dict[str, list[tuple[Part, str]]] = {}
        for m in self.modules:
            for p in m.parts:
                out.setdefault(p.tensor, []).append((p, m.name))
        return out


def load_config(folder: str | Path, label: str | None = None, trust_remote_code: bool = False,
                require_supported: bool = True) -> PretrainedConfig | JsonConfig:
    """A model folder's transformers config, with one-line errors naming `label` for a missing folder,
    a missing or unreadable config.json, or (when `require_supported`) an architecture slta cannot cut
    into modules. Data-free methods need no cut: like mergekit, they merge any architecture, and for
    them a config.json that settles everything they read comes back as a JsonConfig, without
    transformers."""
    folder = Path(folder)
    label = label or str(folder)
    if not folder.is_dir():
        raise ArchitectureError(f"{label}: model folder {folder} does not exist (check the path in the config)")
    if not (folder / "config.json").exists():
        raise ArchitectureError(f"{label}: no config.json in {folder}")
    if not require_supported and not trust_remote_code and (light := JsonConfig.read(folder, label)) is not None:
        return light
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises several error types
        raise ArchitectureError(f"{label}: cannot read {folder / 'config.json'} ({e})") from e
    if require_supported and config.model_type not in SUPPORTED:
        raise ArchitectureError(
            f"{label}: architecture {config.model_type!r} ({', '.join(config.architectures or [])}) is not supported "
            f"yet; slta supports {', '.join(SUPPORTED)}")
    return config


def config_differences(a: PretrainedConfig | JsonConfig, b: PretrainedConfig | JsonConfig) -> list[str]:
    """The architecture keys (ARCH_KEYS) on which two configs differ, as "key: a vs b"."""
    if isinstance(a, JsonConfig) and isinstance(b, JsonConfig) and a.same_architecture(b):
        return []
    # the files differ somewhere (or one needed transformers): transformers' defaults decide what that means
    a, b = (c.full() if isinstance(c, JsonConfig) else c for c in (a, b))
    da, db = a.to_dict(), b.to_dict()
    return [f"{k}: {da.get(k)!r} vs {db.get(k)!r}" for k in ARCH_KEYS if da.get(k) != db.get(k)]


def head_dim(config: PretrainedConfig) -> int:
    """Attention head size (explicit `head_dim`, else hidden_size / num_attention_heads)."""
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def skeleton(config: PretrainedConfig, attn_implementation: str = "sdpa") -> torch.nn.Module:
    """The model on the meta device: module classes and shapes, no memory. Layers are run
    with `torch.func.functional_call`, supplying one version's weights at a time."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation)
    return model.eval()


def layer_prefix(i: int) -> str:
    """Tensor-name prefix of decoder layer i: "model.layers.{i}."."""
    return f"model.layers.{i}."


def build_plan(config: PretrainedConfig, tensor_names: list[str], granularity: str) -> Plan:
    """Assign every tensor (or slice of one) to a module of the chosen cut."""
    if granularity not in GRANULARITIES:
        raise ArchitectureError(f"unknown granularity {granularity!r}; use one of {', '.join(GRANULARITIES)}")
    names = set(tensor_names)
    embed, norm, lm_head = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for required in (embed, norm) + (() if tied else (lm_head,)):
        if required not in names:
            raise ArchitectureError(f"tensor {required} is missing (expected in a {config.model_type} checkpoint)")
    if tied and lm_head in names:
        names.discard(lm_head)  # a saved copy of the tied weight; transformers re-ties it on load

    L = config.num_hidden_layers
    per_layer: list[list[str]] = [sorted(n for n in names if n.startswith(layer_prefix(i))) for i in range(L)]
    covered = {embed, norm, lm_head} | {n for layer in per_layer for n in layer}
    stray = sorted(n for n in names - covered if not n.endswith("rotary_emb.inv_freq"))
    if stray:
        raise ArchitectureError(f"tensor {stray[0]} is not part of a {config.model_type} model"
                                f"{f' (and {len(stray) - 1} more)' if len(stray) > 1 else ''}")

    modules: list[Module] = []
    if granularity == "model":
        # one α vector for every parameter, lm_head included (paper Table 13)
        whole = [embed, norm] + [n for layer in per_layer for n in layer] + ([] if tied else [lm_head])
        modules.append(Module("model", "model", None, [Part(n) for n in whole]))
    else:
        if tied:
            modules.append(Module("embed_head", "embed_head", None, [Part(embed), Part(norm)]))
        else:
            modules.append(Module("embed", "embed", None, [Part(embed)]))
        for i in range(L):
            modules.extend(_layer_modules(config, i, per_layer[i], granularity))
        if not tied:
            modules.append(Module("head", "head", None, [Part(norm), Part(lm_head)]))

    order = [embed] + [n for layer in per_layer for n in layer] + [norm] + ([] if tied else [lm_head])
    return Plan(config, granularity, modules, order)


def _layer_modules(config: PretrainedConfig, i: int, tensors: list[str], granularity: str) -> list[Module]:
    pre = layer_prefix(i)
    rel = {n[len(pre):]: n for n in tensors}
    if granularity == "layer":
        return [Module(f"layers.{i}", "layer", i, [Part(n) for n in tensors])]

    attn_keys = [k for k in rel if k.startswith("self_attn.") or k.startswith("input_layernorm.")]
    mlp_keys = [k for k in rel if k.startswith("mlp.") or k.startswith("post_attention_layernorm.")]
    other = set(rel) - set(attn_keys) - set(mlp_keys)
    if other:
        raise ArchitectureError(f"tensor {pre}{sorted(other)[0]} is neither attention nor MLP")

    if granularity == "attn_mlp":
        return [Module(f"layers.{i}.attn", "attn", i, [Part(rel[k]) for k in attn_keys]),
                Module(f"layers.{i}.mlp", "mlp", i, [Part(rel[k]) for k in mlp_keys])]

    if granularity == "linear":
        out = []
        for block, keys in (("attn", attn_keys), ("mlp", mlp_keys)):
            linears = sorted({k.rsplit(".", 1)[0] for k in keys if k.endswith("proj.weight") or k.endswith("proj.bias")})
            rest = [k for k in keys if k.rsplit(".", 1)[0] not in linears]
            for lin in linears:
                out.append(Module(f"layers.{i}.{lin}", "linear", i,
                                  [Part(rel[k]) for k in keys if k.rsplit(".", 1)[0] == lin], linear=lin))
            # norms (and q/k norms) are solved with their whole block
            out.append(Module(f"layers.{i}.{block}", block, i, [Part(rel[k]) for k in rest]))
        return out

    # head_mlp: one module per key/value group (A.3.5). Under MHA a group is one head.
    hd = head_dim(config)
    n_heads, n_kv = config.num_attention_heads, config.num_key_value_heads
    per_group = n_heads // n_kv
    heads: list[Module] = []
    for g in range(n_kv):
        q_rows = (g * per_group * hd, (g + 1) * per_group * hd)
        kv_rows = (g * hd, (g + 1) * hd)
        parts = []
        for proj, rows in (("q_proj", q_rows), ("k_proj", kv_rows), ("v_proj", kv_rows)):
            for kind in ("weight", "bias"):
                key = f"self_attn.{proj}.{kind}"
                if key in rel:
                    parts.append(Part(rel[key], 0, *rows))
        parts.append(Part(rel["self_attn.o_proj.weight"], 1, *q_rows))
        heads.append(Module(f"layers.{i}.head.{g}", "attn_head", i, parts, group=g))
    sliced = {"self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
              "self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias", "self_attn.o_proj.weight"}
    shared = [Part(rel[k]) for k in attn_keys if k not in sliced]
    return ([Module(f"layers.{i}.attn", "attn", i, shared)] + heads
            + [Module(f"layers.{i}.mlp", "mlp", i, [Part(rel[k]) for k in mlp_keys])])


def read_config_json(folder: str | Path) -> dict:
    """A model folder's config.json as a dict (as written, not through transformers)."""
    return json.loads((Path(folder) / "config.json").read_text())


# Keys of config.json that feed no ARCH_KEY in any SUPPORTED config class: two files that differ only
# in these have the same architecture without asking transformers.
NOT_ARCHITECTURE = ("_name_or_path", "architectures", "transformers_version", "dtype", "torch_dtype", "use_cache",
                    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
DTYPE_NAMES = ("float32", "float16", "bfloat16", "float64")


class JsonConfig:
    """config.json as written, for the data-free methods, which read only `model_type`,
    `num_hidden_layers`, `tie_word_embeddings` and `dtype` (and compare architectures). `read` returns
    one only where the file settles each of these without transformers' per-class defaults (a
    SUPPORTED model_type, no remote code, the keys written out); otherwise the caller asks transformers,
    as `config_differences` does (`full`) for two files that differ in more than NOT_ARCHITECTURE keys."""

    def __init__(self, folder: Path, raw: dict[str, Any], label: str):
        self.folder, self.raw, self.label = folder, raw, label
        self.model_type: str = raw["model_type"]
        self.num_hidden_layers: int = raw["num_hidden_layers"]
        self.tie_word_embeddings: bool = raw["tie_word_embeddings"]
        self.dtype: str | None = raw.get("dtype", raw.get("torch_dtype"))

    @classmethod
    def read(cls, folder: Path, label: str) -> JsonConfig | None:
        """The folder's config as a JsonConfig, or None where only transformers can read it exactly."""
        try:
            raw = read_config_json(folder)
        except (OSError, ValueError):
            return None  # transformers gives the error
        if not isinstance(raw, dict) or raw.get("model_type") not in SUPPORTED or "auto_map" in raw:
            return None
        if not isinstance(raw.get("num_hidden_layers"), int) or not isinstance(raw.get("tie_word_embeddings"), bool):
            return None
        dtypes = [raw[k] for k in ("dtype", "torch_dtype") if k in raw]
        if not all(d is None or d in DTYPE_NAMES for d in dtypes) or len(set(dtypes)) > 1:
            return None
        return cls(folder, raw, label)

    def same_architecture(self, other: JsonConfig) -> bool:
        """True when the two files differ only in NOT_ARCHITECTURE keys (then no ARCH_KEY can differ)."""
        keys = (set(self.raw) | set(other.raw)) - set(NOT_ARCHITECTURE)
        return all(self.raw.get(k, ()) == other.raw.get(k, ()) for k in keys)

    def full(self) -> PretrainedConfig:
        """The same file through transformers (its errors named as `load_config` names them)."""
        return load_config(self.folder, self.label)


@dataclass
class TensorPlan:
    """The write order and groups of an architecture slta has no module cut for, for the data-free
    methods, which merge tensor by tensor: tensors grouped by the layer index in their name (the
    engine reads one group at a time), the others before or after the layer stack."""

    tensor_order: list[str]
    groups: list[tuple[str, list[str]]]
    num_layers: int


def tensor_plan(names: list[str]) -> TensorPlan:
    """A TensorPlan from the base's tensor names (in file order), grouped by mergekit's layer-index rule."""
    from slta.methods.params import layer_index

    layers: dict[int, list[str]] = {}
    before, after = [], []
    for n in names:
        i = layer_index(n)
        if i is not None:
            layers.setdefault(i, []).append(n)
        else:
            (after if layers else before).append(n)
    groups = [("embed", before)] + [(f"layer {i}", layers[i]) for i in sorted(layers)] + [("head", after)]
    return TensorPlan([n for _, g in groups for n in g], groups, len(layers))
