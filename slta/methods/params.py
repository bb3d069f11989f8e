"""Method parameters the way mergekit writes them: validation and per-tensor resolution.

A parameter value in a config is one of (mergekit's rules, so mergekit YAMLs mean the same here):

* a scalar: ``density: 0.5``;
* a gradient, a list of scalars interpolated over the decoder layers: ``weight: [0, 0.5, 1]``. Layer i of
  L sits at t = i / (L - 1) (t = 1 when L = 1); tensors outside the layers (embeddings, final norm,
  lm_head) sit at t = 0. Numbers are interpolated linearly between the two nearest list entries;
  booleans and strings are not interpolated, the entry at int(t * (len - 1)) is taken;
* conditions, a list of ``{filter: ..., value: ...}`` (or one such mapping): the first whose filter is
  absent, ``"*"`` or a substring of the tensor name applies; its value may itself be a gradient. When
  none applies the parameter falls through to the next scope.

Scopes, highest precedence first: the model's own ``parameters`` (per-model parameters only), then the
top-level ``parameters``, then the method's default. Method-level parameters (``lambda``,
``normalize``, ...) are read from the top level only.

Use: :func:`validate_params` once per config (it raises clear errors and returns the settings with
values coerced to their types), then :func:`resolve_tensor_params` per tensor (which coerces the
resolved values again, so it is also safe on raw settings).
"""

from __future__ import annotations

import math
import re
from difflib import get_close_matches
from typing import Any

from slta.methods import REQUIRED, Method

# Keys the top-level `parameters:` may hold for any method; the driver consumes them.
DRIVER_KEYS = {"seed": 0}

_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_index(tensor_name: str) -> int | None:
    """Decoder-layer index of a tensor name (``model.layers.3.mlp.up_proj.weight`` -> 3), None outside layers."""
    m = _LAYER_RE.search(tensor_name)
    return int(m.group(1)) if m else None


def _position(layer: int | None, num_layers: int) -> float:
    # mergekit's t: 0 for tensors before/after the layer stack, i / (L - 1) inside it, 1 for a single layer.
    if layer is None:
        return 0.0
    return layer / (num_layers - 1) if num_layers > 1 else 1.0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def resolve(value: Any, tensor_name: str, layer_index: int | None, num_layers: int) -> Any:
    """The value a parameter setting takes for one tensor; None when no condition applies to it."""
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        return value
    if not value:
        return None
    if all(not isinstance(v, (dict, list)) for v in value):  # a gradient
        t = _position(layer_index, num_layers)
        if not all(_is_number(v) for v in value):
            return value[int(t * (len(value) - 1))]
        scaled = t * (len(value) - 1)
        i0 = int(scaled)
        i1 = min(len(value) - 1, i0 + 1)
        frac = scaled - i0
        return (1 - frac) * value[i0] + frac * value[i1]
    for cond in value:  # conditions: the first that applies wins
        flt = cond.get("filter")
        if flt is None or flt == "*" or (tensor_name and flt in tensor_name):
            return resolve(cond["value"], tensor_name, layer_index, num_layers)
    return None


def resolve_tensor_params(
    method: Method,
    model_settings: list[dict[str, Any] | None],
    global_settings: dict[str, Any] | None,
    tensor_name: str,
    layer_index: int | None,
    num_layers: int,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-model and method-level parameters of ``method`` resolved for one tensor (defaults filled in)."""
    global_settings = global_settings or {}

    def pick(key: str, scopes: list[dict[str, Any]], default: Any, where: str) -> Any:
        for scope in scopes:
            if key in scope:
                v = resolve(scope[key], tensor_name, layer_index, num_layers)
                if v is not None:
                    # Coerce (and range-check) here too, so raw settings that skipped validate_params are
                    # safe: "false" must not become True, an interpolated 2.0 must become the integer 2.
                    return _coerce_scalar(key, v, _kind(key, default), f"{where}, tensor {tensor_name}")
        if default is REQUIRED:
            raise ValueError(f"{where}: required parameter {key!r} of merge_method {method.name!r} "
                             f"has no value for tensor {tensor_name!r} (no filter matched)")
        return default

    per_model = []
    for i, own in enumerate(model_settings):
        scopes = [own or {}, global_settings]
        per_model.append({k: pick(k, scopes, d, f"models[{i}]") for k, d in method.model_params.items()})
    shared = {k: pick(k, [global_settings], d, "parameters") for k, d in method.method_params.items()}
    return per_model, shared


# ---------------------------------------------------------------------------------------------
# Validation

def _range(lo: float, hi: float, lo_open: bool = False, hi_open: bool = False):
    def check(v: float) -> str | None:
        if (v < lo or (lo_open and v == lo)) or (v > hi or (hi_open and v == hi)):
            left = "(" if lo_open else "["
            right = ")" if hi_open else "]"
            hi_s = "inf" if math.isinf(hi) else f"{hi:g}"
            return f"must be in {left}{lo:g}, {hi_s}{right}"
        return None
    return check


# name -> (type, range check or None). Parameters not listed take the type of their default.
_SPECS: dict[str, tuple[type, Any]] = {
    "weight": (float, None),
    "lambda": (float, None),
    "density": (float, _range(0, 1, lo_open=True)),
    "gamma": (float, _range(0, 1)),
    "tall_lambda": (float, _range(0, math.inf, hi_open=True)),
    "k": (int, _range(0, math.inf, hi_open=True)),
    "seed": (int, _range(0, math.inf, hi_open=True)),
    "normalize": (bool, None),
    "rescale": (bool, None),
    "int8_mask": (bool, None),
}

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _kind(key: str, default: Any) -> type | None:
    if key in _SPECS:
        return _SPECS[key][0]
    if default is REQUIRED or default is None:
        return None
    return type(default)


def _coerce_scalar(key: str, v: Any, kind: type | None, where: str) -> Any:
    def fail(what: str) -> ValueError:
        return ValueError(f"{where}: parameter {key!r} must be {what}, got {v!r}")

    if kind is bool:
        if isinstance(v, bool):
            return v
        if isinstance(v, int) and v in (0, 1):
            return bool(v)
        if isinstance(v, str) and v.strip().lower() in _TRUE | _FALSE:
            return v.strip().lower() in _TRUE
        raise fail("true or false")
    if kind in (int, float):
        if isinstance(v, str):  # YAML 1.1 reads 1e-3 as a string; mergekit accepts it as a number
            try:
                v = float(v) if kind is float else int(v)
            except ValueError:
                raise fail("an integer" if kind is int else "a number") from None
        if not _is_number(v):
            raise fail("an integer" if kind is int else "a number")
        if kind is int and isinstance(v, float):
            if not v.is_integer():
                raise fail("an integer")
            v = int(v)
        if kind is float:
            v = float(v)
            if not math.isfinite(v):
                raise fail("a finite number")
        check = _SPECS.get(key, (None, None))[1]
        problem = check(v) if check else None
        if problem:
            raise ValueError(f"{where}: parameter {key!r} {problem}, got {v!r}")
        return v
    return v


def _coerce_setting(key: str, setting: Any, kind: type | None, where: str) -> Any:
    """Check one setting (scalar, gradient or conditions) and return it with its scalars coerced."""
    if isinstance(setting, dict):
        unknown = set(setting) - {"filter", "value"}
        if unknown or "value" not in setting:
            bad = sorted(unknown)[0] if unknown else None
            hint = ""
            if bad is not None:
                close = get_close_matches(bad, ["filter", "value"], n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
            what = f"unknown key {bad!r}{hint}" if bad is not None else "no 'value'"
            raise ValueError(f"{where}: condition for parameter {key!r} has {what}; "
                             f"a condition is {{filter: <substring of tensor names>, value: <value>}}")
        flt = setting.get("filter")
        if flt is not None and not isinstance(flt, str):
            raise ValueError(f"{where}: condition filter for parameter {key!r} must be a string, got {flt!r}")
        return {"filter": flt, "value": _coerce_setting(key, setting["value"], kind, where)}
    if isinstance(setting, list):
        if not setting:
            raise ValueError(f"{where}: parameter {key!r} is an empty list")
        if all(isinstance(e, dict) for e in setting):
            return [_coerce_setting(key, e, kind, where) for e in setting]
        if any(isinstance(e, (dict, list)) for e in setting):
            raise ValueError(f"{where}: parameter {key!r} mixes conditions and values in one list; use either "
                             f"a gradient [v0, v1, ...] or a list of {{filter: ..., value: ...}}")
        return [_coerce_scalar(key, e, kind, where) for e in setting]
    if setting is None:
        raise ValueError(f"{where}: parameter {key!r} has no value")
    return _coerce_scalar(key, setting, kind, where)


def _unknown(key: str, known: list[str], where: str, method: Method) -> ValueError:
    close = get_close_matches(key, known, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ValueError(f"{where}: unknown parameter {key!r} for merge_method {method.name!r}{hint}; "
                      f"known: {', '.join(sorted(known))}")


def validate_params(
    method: Method,
    model_params: list[dict[str, Any] | None],
    params: dict[str, Any] | None,
    model_names: list[str] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Check a config's parameters for ``method`` and return them with values coerced to their types.

    ``model_params`` holds each model's ``parameters`` mapping (None when absent), ``params`` the
    top-level one. Errors name the model (index and, when given, its name) and the key, suggest the
    closest known key for a typo, and say where a parameter belongs when it is in the wrong scope.
    """
    params = params or {}
    per_model_keys = list(method.model_params)
    shared_keys = list(method.method_params)

    out_global: dict[str, Any] = {}
    for key, setting in params.items():
        if key in method.model_params:
            default = method.model_params[key]
        elif key in method.method_params:
            default = method.method_params[key]
        elif key in DRIVER_KEYS:
            default = DRIVER_KEYS[key]
        else:
            raise _unknown(key, per_model_keys + shared_keys + list(DRIVER_KEYS), "parameters", method)
        out_global[key] = _coerce_setting(key, setting, _kind(key, default), "parameters")

    out_models: list[dict[str, Any]] = []
    for i, own in enumerate(model_params):
        where = f"models[{i}]" + (f" ({model_names[i]})" if model_names else "")
        if own is not None and not isinstance(own, dict):
            raise ValueError(f"{where}: parameters must be a mapping of name: value, got {own!r}")
        checked: dict[str, Any] = {}
        for key, setting in (own or {}).items():
            if key in method.method_params or key in DRIVER_KEYS:
                raise ValueError(f"{where}: {key!r} is a method-level parameter of {method.name!r}; "
                                 f"put it under the top-level `parameters:`, not under a model")
            if key not in method.model_params:
                raise _unknown(key, per_model_keys, where, method)
            checked[key] = _coerce_setting(key, setting, _kind(key, method.model_params[key]), where)
        for key, default in method.model_params.items():
            if default is REQUIRED and key not in checked and key not in out_global:
                raise ValueError(f"{where}: missing required parameter {key!r} for merge_method {method.name!r}")
        out_models.append(checked)

    for key, default in method.method_params.items():
        if default is REQUIRED and key not in out_global:
            raise ValueError(f"parameters: missing required parameter {key!r} for merge_method {method.name!r}")
    return out_models, out_global
