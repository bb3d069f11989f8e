"""Data-free methods (task_arithmetic, linear, ties, dare_*, breadcrumbs*, consensus_ta) as a client of
the engine: each tensor of each group is merged by the method's `tensor_fn` from the base tensor and
the T fine-tuned ones, with parameters resolved per tensor by mergekit's rules (slta.methods.params).
No calibration data and no forward pass.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from slta.engine.walk import Client, Loaded, walk
from slta.io.architecture import Plan, TensorPlan
from slta.io.checkpoint import OutputValueError, ShardedWriter, dtype_name, parse_dtype
from slta.io.inputs import Inputs, MergeError, all_finite, check_group
from slta.io.journal import Journal

if TYPE_CHECKING:
    from slta.methods import Method


def work_dtype(method: Method, merge_dtype: torch.dtype | None, stored: list[torch.dtype]) -> torch.dtype:
    """The dtype a tensor's arithmetic runs in. mergekit computes in the merge's `dtype` (default: the
    inputs' promoted dtype); the combine family does too in bfloat16/float16 (same bits as mergekit),
    the rest in float32."""
    dt = merge_dtype or functools.reduce(torch.promote_types, stored)
    return dt if method.tuned_as_stored and dt in (torch.bfloat16, torch.float16) else torch.float32


class DataFree(Client):
    """Merges every tensor of a group with the method's tensor function and writes it."""

    def __init__(self, ins: Inputs, plan: Plan, writer: ShardedWriter, device: torch.device, journal: Journal):
        self.ins, self.plan, self.writer, self.device, self.journal = ins, plan, writer, device, journal
        cfg = ins.cfg
        self.method = cfg.method()
        self.seed = int(cfg.param("seed"))
        self.own = [e.parameters for e in cfg.models]
        self.dtype = parse_dtype(cfg.dtype) if cfg.dtype else None  # mergekit's `dtype`: the merge's arithmetic
        self.output_checks_inputs = self.method.propagates_nonfinite  # the engine then skips its input pass
        self.desc = f"{self.method.name}: layers"

    def done(self, label: str) -> bool:
        return label in self.journal.done  # written by an earlier, interrupted run

    def merge_group(self, label: str, group: list[str], loaded: Loaded) -> None:
        """Merge, check and write every tensor of one group, then record it in the journal."""
        from slta.methods.params import layer_index, resolve_tensor_params

        cfg, method, device, writer, plan = self.ins.cfg, self.method, self.device, self.writer, self.plan
        for n in group:
            per_model, shared = resolve_tensor_params(method, self.own, cfg.parameters, n, layer_index(n), plan.num_layers)
            work = work_dtype(method, self.dtype, [g[n].dtype for g in loaded])
            base = loaded[0][n].to(device, work)
            tuned = [g[n].to(device, None if method.tuned_as_stored and work == torch.float32 else work)
                     for g in loaded[1:]]
            merged = method.tensor_fn(n, base, tuned, per_model, shared, self.seed)
            try:  # the writer checks finiteness after the cast to the output dtype (the only pass over it)
                writer.write(n, merged)
            except OutputValueError:
                if self.output_checks_inputs:  # the inputs were not checked: name a non-finite one first
                    check_group(self.ins, [{n: g[n]} for g in loaded])
                if work == torch.float32 or all_finite(merged):
                    raise
                # in a reduced dtype the overflow happened inside the arithmetic: say where it comes from
                raise MergeError(f"{method.name}: tensor {n} is not finite when computed in {dtype_name(work)}, the "
                                 f"merge's `dtype` (mergekit computes there too): set `dtype: float32` to compute "
                                 f"in float32 and `out_dtype: {dtype_name(work)}` for the written dtype") from None
        del loaded
        self.journal.mark(label, writer)

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        self.merge_group("embed", names, loaded)

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        self.merge_group(f"layer {i}", names, loaded)

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        self.merge_group("head", names, loaded)


def merge_data_free(ins: Inputs, plan: Plan | TensorPlan, writer: ShardedWriter, device: torch.device, progress: bool = True,
                    journal: Journal | None = None) -> None:
    """Tensor-by-tensor methods; parameters resolved per tensor with mergekit's rules."""
    groups = plan.groups if isinstance(plan, TensorPlan) else None
    walk(ins, plan, DataFree(ins, plan, writer, device, journal or Journal(None, "")), progress, groups)
