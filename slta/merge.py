"""`slta merge`: choose the method and wire the pipeline's parts.

    checkpoint -> architecture -> calibration -> features -> statistics -> solve -> write

The inputs are opened and checked (slta.io.inputs), the output folder is guarded and written beside
OUT (slta.io.output), and one streaming walk over the layers (slta.engine.walk) feeds the method's client:
the closed form (slta.merges.closed_form, whose Grams are saved by slta.merges.stats), RegMean
(slta.merges.regmean) or a data-free method (slta.merges.data_free). `--resume` keeps a journal of the
groups written (slta.io.journal). Memory is bounded by one layer, never by the model.

The names this module used to define are re-exported so that `slta.merge.X` keeps working.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import slta
from slta.config import ConfigError, MergeConfig, load_config as load_merge_config
from slta.io.architecture import SUPPORTED, TensorPlan, build_plan, tensor_plan
from slta.io.checkpoint import ShardedWriter, dtype_name, parse_size
from slta.io.inputs import input_paths, open_inputs, output_bytes, resolve_device
from slta.io.journal import Journal
from slta.io.output import atomic_output, check_output, finish_folder, input_fingerprints
from slta.solve import AUTO_SCALE

# Re-exports: where each of the old slta.merge names lives now.
from slta.engine.calibration import calibration  # noqa: E402,F401
from slta.engine.walk import (ROW_BLOCK, embed_stage, layer_groups, load_group_of, prefetched,  # noqa: F401
                              replay_base_layer)
from slta.io.inputs import (MAX_RELATIVE_DISTANCE, Inputs, MergeError, all_finite, check_distances,  # noqa: F401
                            check_finite, check_group, check_tokenizers, load_group, read_group)
from slta.io.output import TOKENIZER_FILES, file_sha256, fingerprint  # noqa: F401
from slta.merges.closed_form import SltaResult, head_stage, slta_report, solve_closed_form  # noqa: F401
from slta.merges.data_free import merge_data_free  # noqa: F401
from slta.merges.stats import read_stats, run_solve, write_stats  # noqa: F401
from slta.merges.write import combine, write_alpha_tensors  # noqa: F401

log = logging.getLogger("slta")


def groups_of(plan: Any) -> list[tuple[str, list[str]]]:
    """The tensor groups in write order, for a module cut (Plan) or a tensor-level plan (TensorPlan)."""
    return plan.groups if isinstance(plan, TensorPlan) else layer_groups(plan)


def run_merge(config: str | Path | dict | MergeConfig, out: str | Path, overwrite: bool = False,
              device: str = "cpu", shard_size: str | int = "5GB", progress: bool = True,
              save_stats: bool = True, resume: bool = False) -> Path:
    """`slta merge CONFIG -o OUT`: run the merge the config describes and write a Hugging Face folder.

    With `resume`, the run works in OUT.partial, which an interruption leaves behind, and continues
    from the tensor groups already written there (the work per layer is deterministic, so the
    result is byte-identical to an uninterrupted run)."""
    started = time.perf_counter()
    cfg = load_merge_config(config)
    inputs = input_paths(cfg)
    check_output(out, overwrite, inputs)  # before any work: OUT must not hold an input
    dev = resolve_device(device)
    ins = open_inputs(cfg)
    method = cfg.method()
    granularity = cfg.param("granularity") if method.name == "slta" else "layer"
    if ins.hf_config.model_type in SUPPORTED or method.tensor_fn is None:
        plan = build_plan(ins.hf_config, ins.base.names(), granularity)
    else:  # an architecture slta has no module cut for: data-free methods merge it tensor by tensor
        plan = tensor_plan(ins.base.names())
    out = Path(out)
    report: dict[str, Any] = {"method": method.name}
    variant = method.name == "slta" and (cfg.param("inputs") == "merged" or cfg.param("refine")
                                         or cfg.param("scale") in AUTO_SCALE)
    resumable = resume and not (method.name in ("regmean", "regmean_plusplus") or granularity == "model" or variant)
    if resume and not resumable:
        why = ("two passes over the model" if granularity == "model" else
               "inputs: merged / refine / scale: auto* keep no journal" if variant else "no journal")
        log.warning("%s merges are not resumable (%s); this run starts from the beginning", method.name, why)
    needed = output_bytes(ins, plan)
    with atomic_output(out, overwrite, resume=resumable, inputs=inputs, needed=needed) as tmp:
        fingerprint = hashlib.sha256(json.dumps([cfg.model_dump(mode="json"), dtype_name(ins.out_dtype),
                                                 str(shard_size), slta.__version__], sort_keys=True).encode()).hexdigest()
        prints = input_fingerprints(inputs.values()) if resumable else None
        journal = Journal(tmp if resumable else None, fingerprint, prints)
        writer = ShardedWriter(tmp, [(n, ins.base.shapes[n]) for n in plan.tensor_order], ins.out_dtype,
                               parse_size(shard_size), resume=journal.resuming)
        for label, group in groups_of(plan):
            if label in journal.done:
                writer.written.update(group)
        try:
            if method.name == "slta":
                res = solve_closed_form(ins, plan, writer, dev, progress, journal=journal)
                report.update(slta_report(cfg, plan, res))
                if save_stats:
                    write_stats(tmp / "slta_stats.safetensors", cfg, ins, plan, res)
            elif method.name in ("regmean", "regmean_plusplus"):
                from slta.merges.regmean import run_regmean

                report.update(run_regmean(ins, plan, writer, dev, progress,
                                          progressive=method.name == "regmean_plusplus"))
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




slta._as_command(__name__)  # `slta.merge(...)` runs run_merge (see slta/__init__.py)
