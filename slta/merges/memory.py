"""`slta merge --dry-run`: the module plan and the estimated peak memory, from the checkpoints' headers
and the calibration data alone (no weight is read, nothing is written).

The estimate adds up what the streaming engine holds at once in each stage (slta.engine.walk):

- the process itself (Python, torch, transformers, the tokenizer): BASE_RSS;
- the group being worked on, T+1 versions as stored, plus the next group when it is read ahead
  (`engine.prefetch_limit`);
- the method's float32 working set on the group's largest tensor F (data-free methods: base, T
  fine-tunes, the sum and one task vector, plus masks and a top-k temporary for the sparsifying
  methods; `WORK` gives the multiples of F; task arithmetic on the CPU works in blocks and holds only
  its output and a converted base, `_blocked_work`), or for the closed form the larger of its feature pass
  (one version's largest submodule upcast, or the whole layer's T+1 versions when it is upcast up
  front: `features.upcast_whole_layer`) and its write pass (`write.combine`: four float32 copies);
- the calibration activations of the closed form: every batch's hidden state, and one batch's
  working set (T+1 block outputs, the MLP's intermediate activations, the attention scores, the
  float64 feature differences of the Gram); at the head, every version's normalised hidden states
  and one block of ROW_BLOCK vocabulary rows per version; the embedding and head stages also
  write their tensors in such row blocks (every version's block as stored, four float32 copies);
- with `scale: auto`, a second walk (slta.merges.autoscale): one hidden state per candidate scale and batch,
  the merged layer and one batch's working set.

`calibration batch_size` and `batch_tokens` (method parameters) bound the per-batch part.
benchmarks/bench_70b_layers.py prints the estimate beside the measured peak (issue #18).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slta.config import MergeConfig, load_config
from slta.engine.walk import ROW_BLOCK, group_bytes, layer_groups, prefetch_limit
from slta.io.architecture import Plan, build_plan
from slta.io.checkpoint import parse_dtype
from slta.io.inputs import Inputs, memory_total, open_inputs, resolve_device
from slta.merges.data_free import work_dtype
from slta.solve import AUTO_SCALE

GIB = 2**30
BASE_RSS = int(0.45 * GIB)  # the process after imports, tokenizer and checks (measured: 0.33-0.5 GiB)
CUDA_CONTEXT = int(0.5 * GIB)  # CUDA's own context on the GPU
# float32 copies of the largest tensor a data-free method holds at once, beyond the T fine-tunes
# (which only methods without `tuned_as_stored` convert to float32):
# base, sum, one task vector (+ magnitudes, a top-k int32 temporary and boolean masks when sparsifying,
# + the divisor and sign masks under sign election)
# (task arithmetic on the CPU: `_blocked_work`; on a GPU whole tensors, 3)
WORK = {"task_arithmetic": 3, "linear": 3, "ties": 6, "dare_ties": 6, "breadcrumbs_ties": 6,
        "dare_linear": 5, "breadcrumbs": 5, "consensus_ta": 5}


@dataclass
class Estimate:
    """Peak bytes per stage, on the host (RAM) and on the GPU (VRAM, 0 on the CPU)."""

    ram: dict[str, int] = field(default_factory=dict)
    vram: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def peak_ram(self) -> int:
        return max(self.ram.values())

    @property
    def peak_vram(self) -> int:
        return max(self.vram.values(), default=0)


def _f32(ins: Inputs, names: list[str]) -> tuple[int, int]:
    """(bytes of the largest tensor in float32, bytes of one version of the group in float32)."""
    sizes = [math.prod(ins.base.shapes[n]) * 4 for n in names]
    return max(sizes), sum(sizes)


def estimate(ins: Inputs, plan: Plan, device: torch.device, tokens: list[list[int]] | None = None) -> Estimate:
    """Peak memory per stage of `slta merge` (see the module docstring). `tokens`: the calibration
    samples' lengths per task (closed form)."""
    est = Estimate()
    cfg, T1 = ins.cfg, len(ins.all)
    gpu = device.type == "cuda"
    groups = layer_groups(plan)
    limit = prefetch_limit()
    out_item = ins.out_dtype.itemsize
    method = cfg.method().name
    reads_ahead = [k + 1 < len(groups) and max(group_bytes(ins, groups[k][1]), group_bytes(ins, groups[k + 1][1])) <= limit
                   and not (method == "slta" and groups[k + 1][0] in ("embed", "head")) for k in range(len(groups))]
    est.notes.append(f"read ahead: {'every group' if all(reads_ahead[:-1]) else 'groups up to ' + _gib(limit) + ' GiB'}"
                     f" (T+1 versions; layer group {_gib(group_bytes(ins, groups[1][1]))} GiB)")
    if method != "slta":
        k = WORK.get(method, 6) + (0 if cfg.method().tuned_as_stored else T1 - 1)  # float32 fine-tunes
        for j, (label, names) in enumerate(groups):
            F, _ = _f32(ins, names)
            ahead = group_bytes(ins, groups[j + 1][1]) if reads_ahead[j] else 0
            work = k * F if method != "task_arithmetic" or gpu else _blocked_work(ins, names)
            ram = BASE_RSS + group_bytes(ins, names) + ahead + F * out_item // 4
            stage = label if not label.startswith("layer") else "layers"
            est.ram[stage] = max(est.ram.get(stage, 0), ram + (0 if gpu else work + F // 2))
            if gpu:
                est.vram[stage] = max(est.vram.get(stage, 0), CUDA_CONTEXT + work)
        return est
    # the closed form
    bs, bt = int(cfg.param("batch_size")), int(cfg.param("batch_tokens"))
    c = plan.config
    H, I = c.hidden_size, getattr(c, "intermediate_size", 4 * c.hidden_size)
    heads = c.num_attention_heads
    lengths = sorted((len(s) for task in (tokens or [[cfg.param("max_length")] * cfg.param("num_samples")] * (T1 - 1))
                      for s in task), reverse=True)
    s = lengths[0]
    b = max(1, min(bs, bt // s))
    all_tokens = _padded_tokens(tokens, bs, bt) if tokens else len(lengths) * s
    hidden_all = all_tokens * H * 4  # every batch's hidden state
    batch = b * s * (4 * ((2 * T1 + 6) * H + 3 * I) + heads * s * 4 + (T1 - 1) * H * 8)
    vocab = ins.base.shapes[plan.tensor_order[0]][0]
    blocks = T1 * min(ROW_BLOCK, vocab) * H * 4
    embed = hidden_all + blocks + T1 * b * s * H * 4 + (T1 - 1) * b * s * H * 8
    head = hidden_all + T1 * all_tokens * H * 4 + blocks + b * s * min(ROW_BLOCK, vocab) * (T1 * 4 + (T1 - 1) * 8)
    # writing the embedding and the head (slta.merges.write.write_alpha_tensors): one row block of every version as
    # stored, `combine`'s four float32 copies of it, its cast to the output dtype and the one in flight
    stored = ins.base.dtypes[plan.tensor_order[0]].itemsize
    write_rows = min(ROW_BLOCK, vocab) * H * (T1 * stored + 4 * 4 + 2 * out_item)
    layer_names = groups[1][1]
    F, one = _f32(ins, layer_names)
    whole = _upcast_whole(one * T1, device)
    largest_sub = max(_sub_bytes(layer_names, ins, "mlp."), _sub_bytes(layer_names, ins, "self_attn."))
    feats = (one * T1 if whole else largest_sub) + batch + hidden_all
    write = 4 * F + F * out_item // 4
    G = group_bytes(ins, layer_names)
    ahead = G if reads_ahead[1] and len(groups) > 3 else 0
    est.notes.append(f"layer weights upcast to float32 {'whole, up front' if whole else 'one submodule at a time'}"
                     f" ({_gib(one * T1)} GiB for T+1 versions)")
    est.notes.append(f"calibration: {len(lengths)} samples, longest {s} tokens, {b} per batch, "
                     f"{all_tokens} padded tokens")
    if gpu:
        # the embedding and head are written from row blocks on the CPU, whatever the device
        est.ram = {"embed": BASE_RSS + G + write_rows, "layers": BASE_RSS + G + ahead + write,
                   "head": BASE_RSS + max(write, write_rows)}
        est.vram = {"embed": CUDA_CONTEXT + embed, "layers": CUDA_CONTEXT + feats, "head": CUDA_CONTEXT + head}
    else:
        # the engine reads layer 0 while the embedding stage (row blocks, its own reads) runs
        est.ram = {"embed": BASE_RSS + max(embed, write_rows) + G,
                   "layers": BASE_RSS + G + ahead + max(feats, write + hidden_all), "head": BASE_RSS + max(head, write_rows)}
    if cfg.param("scale") in AUTO_SCALE:  # the second walk (slta.merges.autoscale): candidates' hidden states
        from slta.merges.autoscale import AUTO_SCALES, TASK_FACTORS

        # auto_task (and auto_joint's walks, never more): 1 + |factors| candidates per task, each on its own task's samples
        copies = len(AUTO_SCALES) if cfg.param("scale") == "auto" else len(TASK_FACTORS) + 1
        search = copies * hidden_all + (one * T1 if whole else one) + batch
        est.notes.append(f"scale: {cfg.param('scale')}: a second pass holds {copies} copies of the calibration "
                         f"activations ({_gib(copies * hidden_all)} GiB)")
        if gpu:
            est.ram["scale search"] = BASE_RSS + G + ahead
            est.vram["scale search"] = CUDA_CONTEXT + search
        else:
            est.ram["scale search"] = BASE_RSS + G + ahead + search
    return est


def _blocked_work(ins: Inputs, names: list[str]) -> int:
    """Task arithmetic on the CPU (slta.methods.common.plain_in_blocks) holds, beyond the inputs, the
    output in the work dtype (slta.merges.data_free.work_dtype) and the base converted to it (when stored in
    another dtype)."""
    method, merge_dtype = ins.cfg.method(), parse_dtype(ins.cfg.dtype) if ins.cfg.dtype else None
    most = 0
    for n in names:
        stored = [ck.dtypes[n] for ck in ins.all]
        work = work_dtype(method, merge_dtype, stored)
        copies = 1 + (stored[0] != work)
        most = max(most, math.prod(ins.base.shapes[n]) * work.itemsize * copies)
    return most


def _upcast_whole(nbytes: int, device: torch.device) -> bool:
    from slta.engine.features import upcast_whole_layer

    return upcast_whole_layer(nbytes, device)


def _sub_bytes(names: list[str], ins: Inputs, part: str) -> int:
    return sum(math.prod(ins.base.shapes[n]) * 4 for n in names if f".{part}" in n)


def _padded_tokens(tokens: list[list[list[int]]], bs: int, bt: int) -> int:
    """Padded tokens over all batches, batched as `Runner.make_batches` does (never mixing tasks)."""
    from slta.engine.features import batch_plan

    return sum(len(chunk) * s for task in tokens for chunk, s in batch_plan([len(x) for x in task], bs, bt))


def _gib(n: int) -> str:
    return f"{n / GIB:.2f}"


def dry_run(config: str | Path | dict | MergeConfig, device: str = "cpu") -> Estimate:
    """`slta merge CONFIG --dry-run`: print the module plan and the estimated peak memory; read only the
    checkpoints' headers (and the calibration data), write nothing."""
    from slta.io.architecture import SUPPORTED, tensor_plan

    cfg = load_config(config)
    dev = resolve_device(device)
    ins = open_inputs(cfg, check_weights=False)
    method = cfg.method()
    granularity = cfg.param("granularity") if method.name == "slta" else "layer"
    if ins.hf_config.model_type not in SUPPORTED and method.tensor_fn is not None:
        plan = tensor_plan(ins.base.names())
        print(f"plan: {method.name}, tensor by tensor ({len(plan.tensor_order)} tensors; no module cut for "
              f"{ins.hf_config.model_type}); no estimate")
        return Estimate({"all": 0})
    plan = build_plan(ins.hf_config, ins.base.names(), granularity)
    tokens = None
    if method.needs_data:
        from slta.engine.calibration import calibration

        tokens = calibration(ins)[0]
    kinds: dict[str, int] = {}
    for m in plan.modules:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    groups = layer_groups(plan)
    print(f"plan: {method.name}" + (f", granularity {granularity}" if method.name == "slta" else "")
          + f", T={len(ins.tuned)} fine-tunes, {ins.base.dtypes[plan.tensor_order[0]]} -> "
            f"{ins.out_dtype}, device {dev}")
    if method.name == "slta":
        print("modules: " + ", ".join(f"{n} {k}" for k, n in kinds.items()))
    for label, names in [groups[0], groups[1], groups[-1]]:
        shown = f"{plan.num_layers} x layer" if label.startswith("layer") else label
        print(f"  {shown}: {len(names)} tensors, {_gib(group_bytes(ins, names))} GiB for T+1 versions")
    est = estimate(ins, plan, dev, tokens)
    for note in est.notes:
        print(note)
    for stage, n in est.ram.items():
        print(f"  {stage}: RAM {_gib(n)} GiB" + (f", VRAM {_gib(est.vram[stage])} GiB" if est.vram else ""))
    print(f"estimated peak RAM: {_gib(est.peak_ram)} GiB ({est.peak_ram} bytes) of {_gib(memory_total())} GiB")
    if est.vram:
        print(f"estimated peak VRAM: {_gib(est.peak_vram)} GiB ({est.peak_vram} bytes) of "
              f"{_gib(memory_total(dev))} GiB")
    print("dry run: nothing was read beyond headers and calibration data, nothing written")
    return est
