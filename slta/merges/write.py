"""Writing a merge with per-module α: θ = θ_0 + Σ_t α_t^(m) τ_t (paper Eq. 1 with the merge weights
of Eq. 12-14 / 33-34), tensor by tensor, α varying along a tensor's sliced dimension where modules
own slices of it (heads own rows of q/k/v and columns of o_proj). Vocabulary-sized tensors are read
and written in row blocks, so no full copy of them exists.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch

from slta.engine.walk import ROW_BLOCK, Client, Loaded, walk
from slta.io.inputs import Inputs, check_finite

if TYPE_CHECKING:
    from slta.io.architecture import Plan
    from slta.io.checkpoint import ShardedWriter


def combine(name: str, base: torch.Tensor, tuned: list[torch.Tensor], parts: list, alphas: dict[str, np.ndarray],
            rows: tuple[int, int] | None = None) -> torch.Tensor:
    """θ_0 + Σ_t α_t τ_t (Eq. 1) for one tensor (or a block of its rows), α varying along sliced dims."""
    base32 = base.to(torch.float32)
    out = base32.clone()
    for t, tt in enumerate(tuned):
        coef = _coef(name, base.shape, parts, alphas, t, rows)
        out += coef * (tt.to(torch.float32) - base32)
    return out


def _coef(name, shape, parts, alphas, t, rows):
    if len(parts) == 1 and parts[0][0].dim is None:
        return float(alphas[parts[0][1]][t])
    dims = {p.dim for p, _ in parts}
    if len(dims) != 1 or None in dims:
        raise RuntimeError(f"internal error: {name} has mixed whole/sliced ownership")
    dim = dims.pop()
    vec = torch.full((shape[dim],), float("nan"))
    for p, mod in parts:
        vec[p.start:p.stop] = float(alphas[mod][t])
    if torch.isnan(vec).any():
        raise RuntimeError(f"internal error: {name} has slices owned by no module")
    if dim == 0:
        if rows is not None:
            vec = vec[rows[0]:rows[1]]
        return vec.reshape(-1, *([1] * (len(shape) - 1)))
    return vec.reshape(*([1] * dim), -1, *([1] * (len(shape) - dim - 1)))


def write_alpha_tensors(ins: Inputs, plan: Plan, writer: ShardedWriter, alphas: dict[str, np.ndarray],
                        names: list[str], loaded: list[dict[str, torch.Tensor]] | None = None) -> None:
    """Write merged tensors; vocab-sized ones are read and written in row blocks."""
    parts = plan.tensor_parts()
    for n in names:
        if n not in parts:  # e.g. rotary inv_freq buffers in old checkpoints: copied from the base
            writer.write(n, (loaded[0][n] if loaded else ins.base.get(n)))
            continue
        if loaded is not None:
            writer.write(n, combine(n, loaded[0][n], [g[n] for g in loaded[1:]], parts[n], alphas))
            continue
        rows = ins.base.shapes[n][0] if ins.base.shapes[n] else 1
        for lo in range(0, rows, ROW_BLOCK):
            hi = min(rows, lo + ROW_BLOCK)
            blocks = [ck.get_rows(n, lo, hi) for ck in ins.all]
            check_finite(ins, n, blocks)
            writer.write(n, combine(n, blocks[0], blocks[1:], parts[n], alphas, (lo, hi)), row_offset=lo)
            del blocks  # before the next block is read


class AlphaWriter(Client):
    """Writes every tensor group with known α: layers from the engine's prefetched group, the
    embedding and head in row blocks (`write_alpha_tensors`)."""

    def __init__(self, ins: Inputs, plan: Plan, writer: ShardedWriter, alphas: dict[str, np.ndarray], desc: str):
        self.ins, self.plan, self.writer, self.alphas, self.desc = ins, plan, writer, alphas, desc

    def reads(self, label: str) -> bool:
        return label not in ("embed", "head")

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        write_alpha_tensors(self.ins, self.plan, self.writer, self.alphas, names)

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        write_alpha_tensors(self.ins, self.plan, self.writer, self.alphas, names, loaded)

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        write_alpha_tensors(self.ins, self.plan, self.writer, self.alphas, names)


def write_alphas(ins: Inputs, plan: Plan, writer: ShardedWriter, alphas: dict[str, np.ndarray], progress: bool = True,
                 desc: str = "writing") -> None:
    """Write the whole merge θ_0 + Σ_t α_t^(m) τ_t (Eq. 1) for solved α, one group at a time."""
    walk(ins, plan, AlphaWriter(ins, plan, writer, alphas, desc), progress)

