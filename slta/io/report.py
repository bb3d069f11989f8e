"""Human-readable outputs: the model card written beside every merge, and report figures."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np

CITATION = """@inproceedings{dai2025leveraging,
  title     = {Leveraging Submodule Linearity Enhances Task Arithmetic Performance in {LLM}s},
  author    = {Dai, Rui and Hu, Sile and Shen, Xu and Zhang, Yonggang and Tian, Xinmei and Ye, Jieping},
  booktitle = {International Conference on Learning Representations (ICLR)},
  year      = {2025}
}"""


def alpha_summary(modules: dict[str, dict[str, Any]]) -> list[tuple[str, int, list[float], list[float], list[float]]]:
    """Per module kind (embed, attn, mlp, head, ...): count, mean/min/max α per model."""
    by_kind: dict[str, list[list[float]]] = defaultdict(list)
    for name, info in modules.items():
        parts = name.split(".")
        kind = parts[2] if parts[0] == "layers" and len(parts) > 2 else ("layer" if parts[0] == "layers" else parts[0])
        by_kind[kind].append(info["alpha"])
    rows = []
    for kind, alphas in by_kind.items():
        a = np.array(alphas)
        rows.append((kind, len(alphas), a.mean(0).tolist(), a.min(0).tolist(), a.max(0).tolist()))
    return rows


def _show(v: Any) -> str:
    return json.dumps(v, separators=(", ", ": ")) if isinstance(v, (list, dict)) else str(v)


def parameter_lines(report: dict[str, Any]) -> list[str]:
    """The merge's parameters as the driver resolves them: the method's (given at the top level, else its
    default) and each model's (its own, else the top-level value, else the default, as mergekit does)."""
    from slta import methods

    config = report.get("config") or {}
    given = config.get("parameters") or {}
    try:
        method = methods.get(report.get("method", ""))
    except KeyError:
        return []
    shown = {k: v for k, v in {**method.method_params, **given}.items()
             if k not in method.model_params and v is not methods.REQUIRED}
    lines = ["## Parameters", ""]
    if shown:
        lines.append("- " + ", ".join(f"{k}: `{_show(v)}`" for k, v in shown.items()))
    for i, entry in enumerate(config.get("models") or []):
        own = entry.get("parameters") or {}
        resolved = {k: own.get(k, given.get(k, d)) for k, d in method.model_params.items()}
        cells = [f"{k}: `{_show(v)}`" for k, v in resolved.items() if v is not methods.REQUIRED]
        if cells:
            lines.append(f"- model {i + 1}: " + ", ".join(cells))
    if method.reference:
        lines += ["", f"Method: {method.reference}."]
    return lines + [""] if len(lines) > 2 else []


def variant_sentence(report: dict[str, Any]) -> str:
    """How the closed form was run: the paper's way, or with slta's options beyond it (docs/methods.md)."""
    inputs = ("with inputs from the model merged so far (progressive, paper A.5.3)" if report.get("inputs") == "merged"
              else "with inputs from the base model")
    extra = []
    if report.get("tokens", "all") != "all":
        extra.append(f"counting only the response positions (`tokens: {report['tokens']}`)")
    if report.get("targets", "module") != "module":
        extra.append("fitting each module to the fine-tunes' own hidden states (`targets: trajectory`)")
    if report.get("scale") == "auto" and report.get("scale_search"):
        extra.append(f"with every α multiplied by {report['scale_search']['chosen']}, the scale with the lowest "
                     f"next-token loss on the calibration responses (`scale: auto`)")
    elif report.get("scale") == "auto_task" and report.get("scale_search"):
        extra.append(f"with each task's α multiplied by its own factor, {report['scale_search']['chosen']} in the "
                     f"models' order: the smallest bringing that task's calibration-response loss within "
                     f"{report['scale_search']['margin']} of its fine-tune's (`scale: auto_task`)")
    elif isinstance(report.get("scale"), list):
        extra.append(f"with each task's α multiplied by its own factor, {report['scale']} in the models' order (`scale`)")
    elif report.get("scale", 1) != 1:
        extra.append(f"with every α multiplied by {report['scale']} (`scale`)")
    if report.get("refine"):
        extra.append(f"then refined by {report['refine']} Gauss-Newton step(s) on the exact objective (Eq. 10)")
    return inputs + "".join(f", {e}" for e in extra) + "."


def model_card(report: dict[str, Any]) -> str:
    method = report.get("method", "?")
    tags = list(dict.fromkeys(["merge", method, "slta"]))  # method "slta" must not repeat the tag
    lines = ["---", "library_name: transformers", "tags:", *(f"- {t}" for t in tags), "---", "",
             f"# Merged model ({method})", "",
             f"Merged with [slta](https://pypi.org/project/slta/) {report.get('slta_version', '')} "
             f"using `{method}`.", "", f"- base model: `{report.get('base_model')}`"]
    for i, m in enumerate(report.get("models", [])):
        lines.append(f"- model {i + 1}: `{m}`")
    lines.append(f"- dtype: `{report.get('dtype')}`")
    if method == "slta":
        lines += [f"- granularity: `{report.get('granularity')}`, balanced: `{report.get('balance')}`, "
                  f"calibration samples per task: {report.get('samples_per_task')}", "",
                  "Each submodule's merge weights α were solved in closed form (Eq. 12-14, balanced Eq. 33-34 of "
                  "the paper) from the calibration samples, " + variant_sentence(report), "",
                  "## Merge weights α (per module kind: mean [min, max] per model)", "",
                  "| kind | modules | " + " | ".join(f"model {i + 1}" for i in range(len(report.get('models', [])))) + " |",
                  "|---|---|" + "---|" * len(report.get("models", []))]
        for kind, n, mean, lo, hi in alpha_summary(report.get("modules", {})):
            cells = " | ".join(f"{m:.3f} [{a:.3f}, {b:.3f}]" for m, a, b in zip(mean, lo, hi))
            lines.append(f"| {kind} | {n} | {cells} |")
        rules = [v["rule"] for v in report.get("modules", {}).values()]
        if any(r != "exact" for r in rules):
            lines += ["", f"{sum(r != 'exact' for r in rules)} module(s) had a singular or ill-conditioned system "
                      "and were solved by the minimum-norm rule; see `slta_report.json`."]
    lines += [""] + parameter_lines(report)
    lines += ["Full details (every module's α, solver diagnostics, timings, versions): `slta_report.json`.", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(lines)


def mergekit_config(report: dict[str, Any], num_layers: int, tied: bool) -> dict[str, Any] | None:
    """The solved α as a mergekit `task_arithmetic` config that reproduces this merge (SPEC section 2).

    Per-layer α become gradients (a list of num_layers values: mergekit places layer i at
    t = i / (L - 1), so value i is taken exactly) under tensor-name filters. Only cuts whose modules
    own whole tensors can be expressed: model, layer and attn_mlp (not head_mlp or linear)."""
    g = report.get("granularity")
    mods = report["modules"]
    if g not in ("model", "layer", "attn_mlp"):
        return None

    def a(name: str, t: int) -> float:
        return float(mods[name]["alpha"][t])

    models = []
    for t, path in enumerate(report["models"]):
        if g == "model":  # one α for every tensor, lm_head included
            conds = [{"value": a("model", t)}]
        else:
            outer_in = "embed_head" if tied else "embed"
            outer_out = "embed_head" if tied else "head"
            conds = [{"filter": "embed_tokens", "value": a(outer_in, t)},
                     {"filter": "lm_head", "value": a(outer_out, t)},
                     {"filter": "model.norm.", "value": a(outer_out, t)}]
            if g == "layer":
                conds.append({"filter": "layers.", "value": [a(f"layers.{i}", t) for i in range(num_layers)]})
            else:
                attn = [a(f"layers.{i}.attn", t) for i in range(num_layers)]
                mlp = [a(f"layers.{i}.mlp", t) for i in range(num_layers)]
                conds += [{"filter": "self_attn", "value": attn}, {"filter": "input_layernorm", "value": attn},
                          {"filter": "mlp", "value": mlp}, {"filter": "post_attention_layernorm", "value": mlp}]
        models.append({"model": path, "parameters": {"weight": conds}})
    # mergekit's `dtype` is its compute dtype: compute in float32 as slta did, then write the output dtype
    out = {"merge_method": "task_arithmetic", "base_model": report["base_model"], "models": models,
           "parameters": {"normalize": False, "lambda": 1.0}, "dtype": "float32"}
    if report["dtype"] != "float32":
        out["out_dtype"] = report["dtype"]
    return out
