"""The merge config (SPEC section 2): YAML close to mergekit's, validated with pydantic.

mergekit's keys keep mergekit's names and meaning (merge_method, base_model, models[].model,
models[].parameters, parameters, dtype, out_dtype, tokenizer_source); slta's own keys
(models[].data, parameters.granularity, ...) are additions. Unknown keys are errors with a
did-you-mean suggestion.
"""

from __future__ import annotations

import logging
import re
from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from slta import methods
from slta.solve import AUTO_SCALE

log = logging.getLogger("slta")

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "tokenizer", "chat_template", "trust_remote_code", "name")
MODEL_KEYS = ("model", "data", "parameters")

# mergekit keys and methods slta does not run: each gets one "not supported" line saying what slta offers,
# never an "unknown key" guess or a silently different merge.
_WHOLE_MODELS = "slta merges whole models of one architecture: list them under 'models:' with a base_model"
_MOE = ("mixture-of-experts configs (mergekit-moe) are not implemented; slta merges fine-tunes of one base "
        "into one dense model: use 'merge_method' with 'base_model' and 'models:'")
UNSUPPORTED_KEYS = {  # key -> why, and what slta offers
    "slices": f"layer ranges (frankenmerges) are not implemented; {_WHOLE_MODELS}",
    "modules": f"per-module slices are not implemented; {_WHOLE_MODELS}",
    "experts": _MOE, "gate_mode": _MOE, "experts_per_token": _MOE, "shared_experts": _MOE,
}
UNSUPPORTED_MODEL_KEYS = {"layer_range": f"layer ranges are not implemented; {_WHOLE_MODELS}"}
_OFFERS = ("task_arithmetic, linear, ties, dare_linear, dare_ties, breadcrumbs, breadcrumbs_ties, consensus_ta, "
           "regmean, regmean_plusplus, slta")
UNSUPPORTED_METHODS = {
    "slerp": "spherical interpolation is not implemented; for two models use linear (weight average), "
             "task_arithmetic or slta",
    "nuslerp": "spherical interpolation is not implemented; use linear, task_arithmetic or slta",
    "multislerp": "spherical interpolation is not implemented; use linear, task_arithmetic or slta",
    "karcher": "the Karcher mean is not implemented; use linear (weight average)",
    "della": "DELLA's magnitude-based drop is not implemented; use ties or dare_ties",
    "della_linear": "DELLA's magnitude-based drop is not implemented; use dare_linear or breadcrumbs",
    "model_stock": "Model Stock is not implemented; use task_arithmetic or slta (per-module closed-form weights)",
    "passthrough": "slta does not copy or stack layers (frankenmerges); it merges fine-tunes of one base",
    "sce": "SCE is not implemented; use ties or slta",
    "ram": "RAM is not implemented; use task_arithmetic or slta",
    "ramplus_tl": "RAM+ is not implemented; use task_arithmetic or slta",
    "nearswap": "nearswap is not implemented; use linear or task_arithmetic",
    "arcee_fusion": "Arcee Fusion is not implemented; use ties or slta",
}
# Parameters every method accepts.
COMMON_PARAMS = {"seed": 0}


class ConfigError(ValueError):
    pass


class ModelEntry(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str
    data: str | None = None
    parameters: dict[str, Any] = {}

    @field_validator("model")
    @classmethod
    def _nonempty(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("model path is empty")
        return v


class MergeConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    merge_method: str
    base_model: str | None = None
    models: list[ModelEntry]
    parameters: dict[str, Any] = {}
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: dict[str, Any] | None = None  # mergekit's; only {source: base} (checked at load)
    chat_template: str | None = None  # mergekit's; only null (checked at load)
    trust_remote_code: bool = False
    name: str | None = None

    def method(self) -> methods.Method:
        return methods.get(self.merge_method)

    def param(self, key: str) -> Any:
        """A method-level parameter with the method's default."""
        m = self.method()
        defaults = {**COMMON_PARAMS, **m.method_params}
        return self.parameters.get(key, defaults.get(key))

    def path(self, p: str) -> Path:
        """Relative paths are relative to the working directory, as in mergekit."""
        if "\x00" in str(p):  # the OS rejects it later with a bare ValueError (found by hypothesis)
            raise ConfigError(f"path {p!r}: contains a NUL character")
        try:
            return Path(p).expanduser()
        except RuntimeError as e:  # "~user" for a user this machine does not have
            raise ConfigError(f"path {p!r}: {e}") from None

    def model_path(self, p: str) -> Path:
        """A model folder: a local path, or a hub id org/name[@revision] fetched into the HF cache."""
        from slta.hub import HubError, resolve_model_path

        self.path(p)  # the same errors for a bad local path
        try:
            return resolve_model_path(p)
        except HubError as e:
            raise ConfigError(str(e)) from None


def _unknown(keys: list[str], allowed: tuple[str, ...] | list[str], where: str) -> None:
    for k in keys:
        if k not in allowed:
            close = get_close_matches(str(k), list(allowed), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: unknown key {k!r}{hint}; allowed: {', '.join(allowed)}")


def load_config(source: str | Path | dict | MergeConfig) -> MergeConfig:
    """Parse and validate a config from a YAML path, a YAML string's dict, or a MergeConfig."""
    if isinstance(source, MergeConfig):
        return source
    where = "config"
    if isinstance(source, (str, Path)):
        path = Path(source)
        where = str(path)
        if not path.exists():
            raise ConfigError(f"config file {path} does not exist")
        if not path.is_file():  # e.g. "" is "." here: a folder
            raise ConfigError(f"config {str(source)!r} is a folder, not a YAML file")
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot be read ({e})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from e
    else:
        raw = source
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: the config must be a mapping of keys (merge_method, base_model, models, ...)")
    _reject_unsupported(raw, where)
    _unknown(list(raw), TOP_KEYS, where)
    models = raw.get("models")
    for i, m in enumerate(models if isinstance(models, list) else []):  # other types: pydantic's error below
        if isinstance(m, dict):
            _unknown(list(m), MODEL_KEYS, f"{where}: models[{i}]")
    try:
        cfg = MergeConfig.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise ConfigError(f"{where}: {loc}: {err['msg']}") from e
    _validate_method(cfg, where)
    return cfg


def _reject_unsupported(raw: dict, where: str) -> None:
    """mergekit configs slta cannot run: one clear line before any other check."""
    method = raw.get("merge_method")
    if isinstance(method, str) and method in UNSUPPORTED_METHODS:
        raise ConfigError(f"{where}: merge_method {method!r} (a mergekit method) is not supported: "
                          f"{UNSUPPORTED_METHODS[method]} (slta offers: {_OFFERS})")
    for key, why in UNSUPPORTED_KEYS.items():
        if key in raw:
            raise ConfigError(f"{where}: '{key}' is not supported: {why}")
    for i, m in enumerate(raw["models"] if isinstance(raw.get("models"), list) else []):
        for key, why in UNSUPPORTED_MODEL_KEYS.items():
            if isinstance(m, dict) and key in m:
                raise ConfigError(f"{where}: models[{i}]: '{key}' is not supported: {why}")
    base_only = "slta writes the base model's tokenizer"
    src = raw.get("tokenizer_source")
    if src not in (None, "base"):
        raise ConfigError(f"{where}: tokenizer_source: {src!r} is not supported; {base_only} "
                          f"(tokenizer_source: base, or leave it out)")
    tok = raw.get("tokenizer")
    if tok is not None:
        if not isinstance(tok, dict):
            raise ConfigError(f"{where}: tokenizer: {tok!r} is not supported; {base_only} (tokenizer: {{source: base}})")
        if tok.get("source", "base") != "base":
            raise ConfigError(f"{where}: tokenizer.source: {tok['source']!r} is not supported; {base_only} "
                              f"(tokenizer: {{source: base}}, or leave it out)")
        for k, v in tok.items():  # mergekit's tokens / pad_to_multiple_of edit the vocabulary: slta does not
            if k != "source" and v not in (None, {}, []):
                raise ConfigError(f"{where}: tokenizer.{k} is not supported; {base_only} unchanged "
                                  f"(tokenizer: {{source: base}})")
    if raw.get("chat_template") is not None:
        raise ConfigError(f"{where}: chat_template: {raw['chat_template']!r} is not supported; slta copies the base "
                          f"model's tokenizer files, chat template included (chat_template: null, or leave it out)")


def _drop_base_from_models(cfg: MergeConfig) -> None:
    """mergekit configs often list the base model among `models`. mergekit never counts it as a task
    vector: the task-arithmetic family (ties, dare, breadcrumbs) ignores its weight and density, so we
    drop it (a zero task vector would still count in `normalize`'s divisor). `linear` averages the base
    in, as mergekit does, when it has a weight: its own, or the top-level one; otherwise (mergekit's
    "missing weight" error) it is left out. slta/regmean keep a base entry that has calibration data."""
    if not cfg.base_model:
        return
    base = cfg.model_path(cfg.base_model).resolve()
    m = cfg.method()
    if m.tensor_fn is not None and not m.needs_base:  # linear / weight_average
        if "weight" in cfg.parameters:
            if not any(cfg.model_path(e.model).resolve() == base for e in cfg.models):
                log.warning("%s: base_model %s is averaged in with the top-level weight, as mergekit does; "
                            "remove base_model to average only the fine-tunes", m.name, cfg.base_model)
                cfg.models = [*cfg.models, ModelEntry(model=cfg.base_model)]
            return
        drop = lambda e: not e.parameters  # noqa: E731 - mergekit: "missing required parameter weight"
    elif m.tensor_fn is not None:
        drop = lambda e: True  # noqa: E731
    else:
        drop = lambda e: not e.parameters and not e.data  # noqa: E731
    cfg.models = [e for e in cfg.models if not (cfg.model_path(e.model).resolve() == base and drop(e))]


def _validate_method(cfg: MergeConfig, where: str) -> None:
    try:
        m = cfg.method()
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from e
    _drop_base_from_models(cfg)
    if not cfg.models:
        raise ConfigError(f"{where}: 'models' is empty; list at least one fine-tuned model")
    if m.needs_base and not cfg.base_model:
        raise ConfigError(f"{where}: merge_method {m.name!r} needs base_model")
    if m.tensor_fn is not None:  # data-free: mergekit's parameter rules (scalars, gradients, filters)
        from slta.methods.params import validate_params

        try:
            validate_params(m, [e.parameters for e in cfg.models], cfg.parameters, [e.model for e in cfg.models])
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from e
        return
    allowed = {**COMMON_PARAMS, **m.method_params}
    _unknown(list(cfg.parameters), tuple(allowed), f"{where}: parameters")
    for i, entry in enumerate(cfg.models):
        if entry.parameters:
            raise ConfigError(f"{where}: models[{i}] ({entry.model}): merge_method {m.name!r} takes no per-model "
                              f"parameters (got {', '.join(entry.parameters)})")
        if m.needs_data and not entry.data:
            raise ConfigError(f"{where}: models[{i}] ({entry.model}): merge_method {m.name!r} needs calibration "
                              f"data: add 'data: path/to/task.jsonl'")
        if m.needs_data and cfg.path(entry.data).is_dir():
            raise ConfigError(f"{where}: models[{i}] ({entry.model}): data: {entry.data} is a folder; "
                              f"it must name a JSONL file (one sample per line)")
    if m.name == "slta":
        g = cfg.param("granularity")
        if g not in methods.GRANULARITIES:
            raise ConfigError(f"{where}: parameters.granularity: {g!r} is not one of {', '.join(methods.GRANULARITIES)}")
        for key in ("num_samples", "max_length", "batch_size", "batch_tokens"):
            v = cfg.param(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}: parameters.{key}: expected a positive integer, got {v!r}")
        if not isinstance(cfg.param("balance"), bool):
            raise ConfigError(f"{where}: parameters.balance: expected true or false, got {cfg.param('balance')!r}")
        _validate_variants(cfg, where, g)
    seed = cfg.param("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: parameters.seed: expected an integer, got {seed!r}")



def _validate_variants(cfg: MergeConfig, where: str, granularity: str) -> None:
    """slta's options beyond the paper (docs/methods.md): tokens, inputs, refine, targets, scale."""
    tokens, inputs, refine = cfg.param("tokens"), cfg.param("inputs"), cfg.param("refine")
    targets, scale = cfg.param("targets"), cfg.param("scale")
    choices = {"tokens": ("all", "response", "response_shifted"), "inputs": ("base", "merged"),
               "targets": ("module", "trajectory")}
    for key, value in (("tokens", tokens), ("inputs", inputs), ("targets", targets)):
        if value not in choices[key]:
            raise ConfigError(f"{where}: parameters.{key}: {value!r} is not one of {', '.join(choices[key])}")
    if not isinstance(refine, int) or isinstance(refine, bool) or refine < 0:
        raise ConfigError(f"{where}: parameters.refine: expected a non-negative integer, got {refine!r}")
    if inputs == "merged" and granularity not in ("layer", "attn_mlp", "head_mlp"):
        raise ConfigError(f"{where}: parameters.inputs: merged is offered at granularity layer, attn_mlp or "
                          f"head_mlp, not {granularity!r}")
    if refine and granularity not in ("layer", "attn_mlp"):
        raise ConfigError(f"{where}: parameters.refine: offered at granularity layer or attn_mlp, not {granularity!r}")
    if targets == "trajectory" and (inputs != "merged" or granularity not in ("layer", "attn_mlp") or refine):
        raise ConfigError(f"{where}: parameters.targets: trajectory needs inputs: merged and refine: 0, at "
                          f"granularity layer or attn_mlp (got inputs: {inputs}, refine: {refine}, {granularity})")
    if scale in AUTO_SCALE:
        if inputs != "base" or refine or targets != "module":
            raise ConfigError(f"{where}: parameters.scale: {scale} needs inputs: base, refine: 0 and targets: module "
                              f"(the search scales α after the solve)")
    elif isinstance(scale, list):  # one factor per model, in the models' order (issue #28)
        if len(scale) != len(cfg.models) or not all(_positive(s) for s in scale):
            raise ConfigError(f"{where}: parameters.scale: a list needs one positive number per model "
                              f"({len(cfg.models)}), got {scale!r}")
        if refine and any(s != 1 for s in scale):
            raise ConfigError(f"{where}: parameters.scale: not with refine (the Gauss-Newton steps would undo it)")
    elif not _positive(scale):
        raise ConfigError(f"{where}: parameters.scale: expected a positive number, one per model, auto, "
                          f"auto_task or auto_joint, got {scale!r}")
    elif scale != 1 and refine:
        raise ConfigError(f"{where}: parameters.scale: not with refine (the Gauss-Newton steps would undo it)")
    margin = cfg.param("scale_margin")
    if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 0 <= margin < float("inf"):
        raise ConfigError(f"{where}: parameters.scale_margin: expected a non-negative number, got {margin!r}")


def _positive(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and 0 < x < float("inf")


_DEVICE_RE = re.compile(r"cpu|cuda|cuda:\d+|auto|mps")


def check_device(device: str) -> str:
    """Validate a --device value up front (torch's own error comes late and lists a dozen backends)."""
    if not isinstance(device, str) or not _DEVICE_RE.fullmatch(device.strip()):
        raise ConfigError(f"device {device!r} is not supported; use cpu, cuda, cuda:N (e.g. cuda:0), auto or mps")
    return device.strip()
