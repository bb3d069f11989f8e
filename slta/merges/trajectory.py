"""`targets: trajectory`: each module is fitted to the fine-tuned model's own hidden states (beyond the
paper; a treatment of the depth-wise compounding of issue #16).

The paper's target for a sample x of task a is f(x; θ_a), fine-tune a's module on the module's own input
(Eq. 10). With `inputs: merged` (A.5.3, slta.merges.progressive) x comes from the model merged so far, so the
module is asked what fine-tune a would do *from the merged model's state*, never to bring that state back
to where fine-tune a's own forward pass has it. Every α below 1 leaves part of task a's change out, and no
later module is asked to restore it: the shortfall compounds through the depth. The diagnostics show the
shrinkage (Σ_t α_t ≈ 1.2 per module on the chat kind, where task arithmetic's validated 3λ ≈ 1.9).

Here the target is r_a(x), fine-tune a's own residual stream right after the module (its forward pass
from its own embedding). The merged residual stream after the module, linearised in α as in Eq. 11,

    r(α; x) = x + f(x; θ_0) + Σ_t α_t Δf_t(x),           Δf_t(x) = f(x; θ_t) - f(x; θ_0)

is fitted to it, so each module also makes up, along its own Δf directions, what the modules before it
left out. The least squares keep the paper's form (Eq. 12-13; balanced Eq. 33-34): A is unchanged and

    b[j] = Σ_a mean_{x in H_a} <Δf_j(x), e_a(x)> / d(x),   e_a(x) = r_a(x) - x - f(x; θ_0)

(the paper's b is the same with e_a = Δf_a, i.e. r_a replaced by x + f(x; θ_a)); d(x) is Eq. 33's
denominator, unchanged. The per-sample products <Δf_j, e_a> are kept beside the Grams (`Targets`).

Offered with `inputs: merged` at `layer` and `attn_mlp`: the module's output is then a point on the
residual stream (after the layer; after the attention block; after the MLP block) that fine-tune a's own
forward pass also has. The embedding's target is already fine-tune a's own embedding (nothing upstream),
and the head (final norm + lm_head) keeps the paper's target on the merged model's final hidden states.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from slta.engine.walk import ROW_BLOCK

if TYPE_CHECKING:
    from slta.engine.features import Batch

TARGETS = ("module", "trajectory")


class Targets:
    """Per-module, per-sample products c_x[j] = <Δf_j(x), e_a(x)> (N, T), float64: the b of Eq. 13
    toward fine-tune a's own hidden states (module docstring)."""

    def __init__(self, num_samples: int, T: int):
        self.N, self.T = num_samples, T
        self.c: dict[str, torch.Tensor] = {}

    def add(self, module: str, feats: list[torch.Tensor], target: torch.Tensor, batch: Batch) -> None:
        """Accumulate <f_j - f_0, target - f_0> over the counted positions, for T+1 feature tensors
        (version 0 = base) and the target in the same coordinates, each (b, s, ...)."""
        c = self.c.setdefault(module, torch.zeros(self.N, self.T, dtype=torch.float64, device=target.device))
        mask = batch.counted[:, :, None].double()
        b, s = mask.shape[0], mask.shape[1]
        f0 = feats[0].reshape(b, s, -1).double()
        e = ((target.reshape(b, s, -1).double() - f0) * mask).reshape(b, -1)
        for j, f in enumerate(feats[1:]):
            d = (f.reshape(b, s, -1).double() - f0).reshape(b, -1)
            c[batch.samples, j] += (d * e).sum(1)

    def get(self, module: str) -> Any:
        """The module's products as a numpy array, or None (the paper's target)."""
        return self.c[module].cpu().numpy() if module in self.c else None


def own_embedding(client: Any) -> None:
    """Set every batch's `own` to its task's fine-tune's embedding rows, E_a[ids]: the start of fine-tune
    a's own forward pass (read in row blocks like `slta.engine.walk.embed_stage`)."""
    ins, plan, runner, batches = client.ins, client.plan, client.stream.runner, client.stream.batches
    name = plan.tensor_order[0]
    vocab = ins.base.shapes[name][0]
    for b in batches:
        b.own = torch.zeros_like(b.h)
    for lo in range(0, vocab, ROW_BLOCK):
        hi = min(vocab, lo + ROW_BLOCK)
        blocks = {}
        for b in batches:
            sel = (b.ids >= lo) & (b.ids < hi) & b.valid
            if not sel.any():
                continue
            if b.task not in blocks:
                blocks[b.task] = ins.tuned[b.task].get_rows(name, lo, hi).to(runner.device, runner.dtype)
            b.own += blocks[b.task][(b.ids - lo).clamp(0, hi - lo - 1)] * sel[..., None]
