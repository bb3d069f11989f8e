"""The streaming engine: one walk over the model's tensor groups, one layer in memory at a time.

The groups come in write order (`layer_groups`): the embedding, each decoder layer, the head (final
norm and lm_head). For each group the engine reads the T+1 versions (base and fine-tunes) in a
reader thread one group ahead (`prefetched`: file reads release the GIL, so reading layer i+1
overlaps the arithmetic of layer i), checks them finite, and hands them to a **client**:

    client.embed(names, loaded)      once, first
    client.layer(i, names, loaded)   for each decoder layer i, in order
    client.head(names, loaded)       once, last

The clients are the closed form (slta.merges.closed_form), RegMean (slta.methods.regmean), the linearity
analysis (slta.analysis.stream) and the data-free methods (slta.merges.data_free). A client says which
groups it does not want read (`reads`) and which are already done (`done`: written by an
interrupted run; the engine then only replays the base forward pass through them).

Hidden states. Clients with calibration data keep a `Stream`: the base forward pass over the
calibration batches, each `Batch.h` holding the input of the layer about to be processed. The
contract is that **when `client.layer(i, ...)` returns, every batch's `h` is the input of layer
i+1**. Today every client puts the *base* layer's output there (inputs: base, paper A.3.3), most
of them as a by-product of computing their features (`features.layer_features`); `Stream.replay`
does it alone. A progressive variant (paper A.5.3; RegMean++) would put the *merged* layer's output
there instead (merge layer i first, then run the merged weights on `h`): a new client, no change
to the engine.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from slta.io.architecture import Plan, layer_prefix
from slta.io.checkpoint import Checkpoint
from slta.io.inputs import Inputs, check_finite, check_group, memory_total, read_group

if TYPE_CHECKING:  # slta.engine.features imports transformers' attention code (~1 s): only data-driven clients need it
    from slta.engine.features import Batch, GramStore, Runner

ROW_BLOCK = 16384  # rows per block when streaming vocab-sized tensors
# Read the next group ahead (overlapping reading with work) only while its T+1 versions and the current
# group's each take at most this fraction of the machine's RAM: a 70B layer (T=3, bfloat16: 6.4 GiB)
# is read after the current one is released instead, and nothing is read while it is worked on. SLTA_PREFETCH_MAX (bytes)
# overrides the limit (0: never read ahead).
PREFETCH_FRACTION = 1 / 8
STAGE = "idle"  # the group being worked on ("embed", "layer i", "head"), then "finish"; read by samplers

Group = tuple[str, list[str]]  # ("embed" | "layer i" | "head", tensor names)

Loaded = list[dict[str, torch.Tensor]]  # one dict of tensors per version: base first, then the T fine-tunes


def layer_groups(plan: Plan) -> list[tuple[str, list[str]]]:
    """Tensor groups in write order: ("embed", [...]), ("layer 0", [...]), ..., ("head", [...])."""
    order = plan.tensor_order
    groups = [("embed", [order[0]])]
    for i in range(plan.num_layers):
        groups.append((f"layer {i}", [n for n in order if n.startswith(layer_prefix(i))]))
    groups.append(("head", [n for n in order[1:] if not n.startswith("model.layers.")]))
    return groups


def group_bytes(ins: Inputs, names: list[str]) -> int:
    """Bytes of one group's T+1 versions as stored (every version has the base's shapes and dtypes)."""
    one = sum(math.prod(ins.base.shapes[n]) * ins.base.dtypes[n].itemsize for n in names)
    return one * len(ins.all)


def prefetch_limit() -> int:
    """Largest group (T+1 versions, bytes) read ahead of the one being worked on (PREFETCH_FRACTION)."""
    env = os.environ.get("SLTA_PREFETCH_MAX")
    return int(env) if env else int(memory_total() * PREFETCH_FRACTION)


def prefetched(ins: Inputs, groups: list[tuple[str, list[str]]], skip: Callable[[str], bool] = lambda label: False,
               check: bool = True) -> Iterator[tuple[str, list[str], list[dict[str, torch.Tensor]] | None]]:
    """Yield (label, names, loaded T+1 tensors) for each group, reading the next group in a background
    thread while the caller works on this one (file reads release the GIL, so the two cores overlap
    reading and arithmetic) when both fit `prefetch_limit()`; otherwise the next group is read after
    the caller has released this one. Groups for which `skip(label)` holds are yielded unread (None).
    Every loaded tensor is checked finite unless `check` is False (see `Client.output_checks_inputs`).
    Memory: two groups at a time when read ahead, else one."""
    todo, limit = groups, prefetch_limit()
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="slta-reader") as pool:
        futures = {}

        def submit(k: int, current: list[str] | None) -> None:
            while k < len(todo) and k not in futures:
                if not skip(todo[k][0]):
                    if current is None or max(group_bytes(ins, current), group_bytes(ins, todo[k][1])) <= limit:
                        futures[k] = pool.submit(read_group, ins, todo[k][1])
                    return
                k += 1

        submit(0, None)
        for k, (label, names) in enumerate(todo):
            if skip(label):
                yield label, names, None
                continue
            future = futures.pop(k, None)
            loaded = future.result() if future is not None else read_group(ins, names)
            submit(k + 1, names)
            yield label, names, check_group(ins, loaded) if check else loaded
            del loaded  # before the next group is read


def load_group_of(ck: Checkpoint, group: list[str], i: int, device: torch.device,
                  dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Layer i's tensors of one checkpoint, named relative to the layer, on the compute device."""
    from slta.engine.features import sub, to_compute

    return to_compute(sub(ck.get_many(group), layer_prefix(i)), device, dtype)


def replay_base_layer(runner: Runner, i: int, plan: Plan, base: dict[str, torch.Tensor], batches: list[Batch]) -> None:
    """Advance the base hidden states through layer i exactly as `layer_features` does (same calls,
    same order), so a resumed run computes bit-identical statistics for the layers after it."""
    for b in batches:
        if plan.granularity == "layer":
            b.h = runner.layer_out(i, base, b.h, b)
        else:
            m = b.h + runner.attn_out(i, base, b.h, b)
            b.h = m + runner.mlp_out(i, base, m)


def embed_stage(ins: Inputs, plan: Plan, runner: Runner, batches: list[Batch], store: GramStore | None,
                model_level: bool = False) -> None:
    """Embedding rows, read in row blocks: Δf = E_t[ids] - E_0[ids]; sets each batch's base input.
    Without a store only the base is read (the base forward pass alone, e.g. for RegMean)."""
    name = plan.tensor_order[0]
    vocab, hidden = ins.base.shapes[name]
    dev, dt = runner.device, runner.dtype
    ckpts = ins.all if store is not None else [ins.base]
    T1 = len(ckpts)
    for b in batches:
        b.h = torch.zeros(*b.ids.shape, hidden, device=dev, dtype=dt)
        if model_level:
            b.hv = [torch.zeros_like(b.h) for _ in range(T1)]
    module = "model" if model_level else ("embed_head" if plan.tied else "embed")
    for lo in range(0, vocab, ROW_BLOCK):
        hi = min(vocab, lo + ROW_BLOCK)
        blocks = [ck.get_rows(name, lo, hi).to(dev, dt) for ck in ckpts]
        check_finite(ins, name, blocks)
        for b in batches:
            sel = (b.ids >= lo) & (b.ids < hi) & b.valid
            if not sel.any():
                continue
            local = (b.ids - lo).clamp(0, hi - lo - 1)
            rows = [blk[local] * sel[..., None] for blk in blocks]
            b.h += rows[0]
            if model_level:
                for v in range(T1):
                    b.hv[v] += rows[v]
            elif store is not None:
                store.add(module, rows, b, valid=sel)
        # before the next block is read: `blocks = [...]` would hold both (2 x T+1 blocks, 4 GiB at 70B)
        del blocks
    if model_level:
        for b in batches:
            b.h = b.hv[0]


# -- the base forward pass over the calibration batches -----------------------------------------------

@dataclass
class Stream:
    """The calibration batches and the runner that pushes them through the layers. Each batch's `h`
    is the input of the layer about to be processed (see the module docstring's contract)."""

    ins: Inputs
    plan: Plan
    runner: Runner
    batches: list[Batch]

    @classmethod
    def open(cls, ins: Inputs, plan: Plan, tasks: list[list[list[int]]], device: torch.device,
             dtype: torch.dtype = torch.float32, batch_size: int = 8,
             masks: list[list[list[bool]]] | None = None, batch_tokens: int = 1 << 62) -> Stream:
        """A runner for `plan` on `device` and the right-padded batches of every task's token ids
        (`masks`: the positions the objective counts, `tokens:`; None: every real token)."""
        from slta.engine.features import Runner

        runner = Runner(plan, device, dtype)
        return cls(ins, plan, runner, runner.make_batches(tasks, batch_size, masks, batch_tokens))

    def embed(self, store: GramStore | None = None, model_level: bool = False) -> None:
        """Set every batch's input of layer 0 (see `embed_stage`)."""
        embed_stage(self.ins, self.plan, self.runner, self.batches, store, model_level)

    def replay(self, i: int, names: list[str]) -> None:
        """Advance every batch through the base's layer i alone (see `replay_base_layer`)."""
        base = load_group_of(self.ins.base, names, i, self.runner.device, self.runner.dtype)
        replay_base_layer(self.runner, i, self.plan, base, self.batches)


# -- clients and the walk ---------------------------------------------------------------------------

class Client:
    """A consumer of the walk. Override `embed`, `layer` and `head`; `loaded` is the group's T+1
    versions (base first), or None for a group `reads` declined. On return from `layer(i, ...)`,
    every batch of `stream` must hold layer i+1's input in `h` (the base output today; a merged
    output for progressive inputs)."""

    desc: str = "layers"  # progress bar label
    stream: Stream | None = None  # the base forward pass, for clients with calibration data
    # True when any non-finite input entry makes an output entry non-finite, so the writer's check of
    # the output stands in for the engine's pass over the T+1 inputs (the client then names the input)
    output_checks_inputs: bool = False

    def reads(self, label: str) -> bool:
        """Whether the engine should read this group's T+1 versions (False: the client reads what it needs)."""
        return True

    def done(self, label: str) -> bool:
        """Whether the group was finished by an earlier, interrupted run (resume): the engine then
        only replays the base forward pass through it (`Stream.embed` / `Stream.replay`)."""
        return False

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        """The embedding group (first)."""

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        """Decoder layer i's group; must leave layer i+1's input in every batch's `h`."""

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        """The head group (final norm, untied lm_head; last)."""


def walk(ins: Inputs, plan: Plan, client: Client, progress: bool = True, groups: list[Group] | None = None,
         show_label: bool = False) -> None:
    """Walk the groups once (default: `layer_groups(plan)`), reading one group ahead in a reader
    thread, and hand each to the client (see the module docstring)."""
    groups = layer_groups(plan) if groups is None else groups
    skip: Callable[[str], bool] = lambda label: client.done(label) or not client.reads(label)  # noqa: E731
    bar = tqdm(prefetched(ins, groups, skip=skip, check=not client.output_checks_inputs), total=len(groups), desc=client.desc, disable=not progress,
               unit="layer")
    global STAGE
    for label, names, loaded in bar:
        STAGE = label
        if show_label:
            bar.set_postfix_str(label)
        if client.done(label):  # resuming: only the base forward pass is replayed
            if client.stream is not None:
                if label == "embed":
                    client.stream.embed()
                elif label != "head":
                    client.stream.replay(int(label.split()[1]), names)
            continue
        if label == "embed":
            client.embed(names, loaded)
        elif label == "head":
            client.head(names, loaded)
        else:
            client.layer(int(label.split()[1]), names, loaded)
        del loaded
    STAGE = "finish"
