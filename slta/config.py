"""The merge config (SPEC section 2): YAML close to mergekit's, validated with pydantic.

mergekit's keys keep mergekit's names and meaning (merge_method, base_model, models[].model,
models[].parameters, parameters, dtype, out_dtype, tokenizer_source); slta's own keys
(models[].data, parameters.granularity, ...) are additions. Unknown keys are errors with a
did-you-mean suggestion.
"""

from __future__ import annotations

from difflib import get_close_matches
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from slta import methods

TOP_KEYS = ("merge_method", "base_model", "models", "parameters", "dtype", "out_dtype", "tokenizer_source",
            "trust_remote_code", "name")
MODEL_KEYS = ("model", "data", "parameters")
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
    _unknown(list(raw), TOP_KEYS, where)
    for i, m in enumerate(raw.get("models") or []):
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


def _drop_base_from_models(cfg: MergeConfig) -> None:
    """mergekit configs often list the base model among `models` with no parameters; mergekit
    drops that entry, and so do we (otherwise `linear` would average the base in)."""
    if not cfg.base_model:
        return
    base = cfg.model_path(cfg.base_model).resolve()
    cfg.models = [e for e in cfg.models
                  if not (cfg.model_path(e.model).resolve() == base and not e.parameters and not e.data)]


def _validate_method(cfg: MergeConfig, where: str) -> None:
    _drop_base_from_models(cfg)
    try:
        m = cfg.method()
    except KeyError as e:
        raise ConfigError(f"{where}: {e.args[0]}") from e
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
    if m.name == "slta":
        from slta.architecture import GRANULARITIES
        g = cfg.param("granularity")
        if g not in GRANULARITIES:
            raise ConfigError(f"{where}: parameters.granularity: {g!r} is not one of {', '.join(GRANULARITIES)}")
        for key in ("num_samples", "max_length", "batch_size"):
            v = cfg.param(key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{where}: parameters.{key}: expected a positive integer, got {v!r}")
        if not isinstance(cfg.param("balance"), bool):
            raise ConfigError(f"{where}: parameters.balance: expected true or false, got {cfg.param('balance')!r}")
        if cfg.param("inputs") != "base":
            raise ConfigError(f"{where}: parameters.inputs: only 'base' is implemented (paper A.3.3)")
    seed = cfg.param("seed")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ConfigError(f"{where}: parameters.seed: expected an integer, got {seed!r}")

