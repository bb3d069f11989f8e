"""`scale: auto`: one global factor on every α, chosen by the merged model's next-token loss on the
calibration responses (beyond the paper; issue #16's shrinkage, answered without a validation split).

Why. The closed form minimises the feature error of Eq. 10-11. On the demo testbed its α come out short of
what accuracy wants: Σ_t α_t ≈ 1.2 per module against task arithmetic's validated 3λ ≈ 1.9
(docs/diagnostics.md), and multiplying every α by 1.2-1.6 gains 10-20 points on the chat kind's triple
when the factor is chosen on validation. A feature-space least squares counts a fine-tune's changes on
another task's inputs (interference) as heavily as its own task's signal; whether a token is still
predicted right is what it does not see. So the factor is chosen on the quantity the fine-tunes were
trained on, the next-token loss of their responses, with the calibration samples the merge already has:

    s* = argmin_{s in S} (1/T) Σ_a mean_{response tokens y of H_a} -log p(y | prefix; θ_0 + s Σ_t α_t τ_t)

over the response positions of each sample (slta.engine.tokens' `response` reading: the `response` of a
prompt/response sample, the assistant turns of a `messages` sample, every token of a `text` sample),
averaged per task and then over tasks (each task counts alike, as in Eq. 33-34). s = 1 (the paper's
α) is always a candidate. No labels beyond the calibration data, no generation, no validation split.

How. A second walk over the model after the solve (`ScaleSearch`, an engine client): the merged model's
forward pass for every candidate s at once, one layer in memory (each candidate's hidden states are kept,
|S| copies of the calibration activations), then the final norm and lm_head in vocabulary row blocks
with a running log-sum-exp, so the full logits never exist. A third walk writes the merge with s* α.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.func import functional_call

from slta.engine.walk import ROW_BLOCK, Client, Loaded, Stream
from slta.io.architecture import Plan, layer_prefix
from slta.io.inputs import Inputs
from slta.merges.write import combine

if TYPE_CHECKING:
    from slta.engine.features import Batch

AUTO_SCALES = (1.0, 1.2, 1.4, 1.6, 1.8)


class ScaleSearch(Client):
    """The merged model's response loss for every candidate scale (module docstring)."""

    desc = "slta: scale search"

    def __init__(self, ins: Inputs, plan: Plan, stream: Stream, alphas: dict[str, np.ndarray],
                 scales: tuple[float, ...] = AUTO_SCALES):
        self.ins, self.plan, self.stream, self.scales = ins, plan, stream, scales
        self.alphas = [{k: np.asarray(a) * s for k, a in alphas.items()} for s in scales]
        self.hs: dict[int, list[torch.Tensor]] = {}  # id(batch) -> hidden state per scale
        T = len(ins.tuned)
        self.loss = np.zeros((len(scales), T))  # summed -log p per scale and task
        self.count = np.zeros(T)  # response tokens per task

    def reads(self, label: str) -> bool:
        return label not in ("embed", "head")  # read in row blocks below

    def embed(self, names: list[str], loaded: Loaded | None) -> None:
        from slta.merges.progressive import merged_embedding_input

        name = self.plan.tensor_order[0]
        module = self.plan.tensor_parts()[name][0][1]
        hidden = self.ins.base.shapes[name][1]
        runner = self.stream.runner
        for b in self.stream.batches:
            b.h = torch.zeros(*b.ids.shape, hidden, device=runner.device, dtype=runner.dtype)
        per_scale = []
        for al in self.alphas:  # the merged embedding's rows, E_0[ids] + Σ_t s α_t (E_t - E_0)[ids] (Eq. 1)
            merged_embedding_input(self, al[module])
            per_scale.append([b.h for b in self.stream.batches])
        for k, b in enumerate(self.stream.batches):
            self.hs[id(b)] = [hs[k] for hs in per_scale]

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        from slta.engine.features import sub, to_compute
        from slta.merges.progressive import merged_layer

        runner = self.stream.runner
        versions = [sub(g, layer_prefix(i)) for g in loaded]
        for j, al in enumerate(self.alphas):
            merged = to_compute(merged_layer(self.plan, i, versions, al, runner.dtype), runner.device, runner.dtype)
            for b in self.stream.batches:
                self.hs[id(b)][j] = runner.layer_out(i, merged, self.hs[id(b)][j], b)
        for b in self.stream.batches:
            b.h = self.hs[id(b)][0]  # the engine's contract; nothing reads it after this pass

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        ins, plan, runner = self.ins, self.plan, self.stream.runner
        dev, dt = runner.device, runner.dtype
        parts = plan.tensor_parts()
        weight = "model.embed_tokens.weight" if plan.tied else "lm_head.weight"
        norm_versions = [ck.get("model.norm.weight") for ck in ins.all]
        norm_mod = runner.model.model.norm
        vocab = ins.base.shapes[weight][0]
        batches = self.stream.batches
        xs = []  # [scale][batch]: the final norm (merged with that scale's α) of the hidden state
        for j, al in enumerate(self.alphas):
            norm = combine("model.norm.weight", norm_versions[0], norm_versions[1:], parts["model.norm.weight"], al)
            xs.append([functional_call(norm_mod, {"weight": norm.to(dev, dt)}, (self.hs[id(b)][j],)) for b in batches])
        nxt = []  # position p predicts token p+1
        for b in batches:
            n = torch.zeros_like(b.ids)
            n[:, :-1] = b.ids[:, 1:]
            nxt.append(n)
        lse = [[torch.full(b.ids.shape, -torch.inf, device=dev, dtype=torch.float64) for b in batches] for _ in xs]
        picked = [[torch.zeros(b.ids.shape, device=dev, dtype=torch.float64) for b in batches] for _ in xs]
        for lo in range(0, vocab, ROW_BLOCK):  # each block read once, merged once per scale
            hi = min(vocab, lo + ROW_BLOCK)
            blocks = [ck.get_rows(weight, lo, hi) for ck in ins.all]
            for j, al in enumerate(self.alphas):
                w = combine(weight, blocks[0], blocks[1:], parts[weight], al, (lo, hi)).to(dev, dt)
                for k, x in enumerate(xs[j]):
                    # logits stay in the compute dtype (one block: tokens x ROW_BLOCK); the running sums are float64
                    logits = x @ w.T  # (b, s, rows)
                    lse[j][k] = torch.logaddexp(lse[j][k], logits.logsumexp(-1).double())
                    inside = (nxt[k] >= lo) & (nxt[k] < hi)
                    got = logits.gather(-1, (nxt[k] - lo).clamp(0, hi - lo - 1)[..., None])[..., 0]
                    picked[j][k] += torch.where(inside, got.double(), 0.0)
            del blocks  # before the next block is read
        for j in range(len(self.alphas)):
            for k, b in enumerate(batches):
                self._add(j, b, lse[j][k] - picked[j][k])

    def _add(self, j: int, b: Batch, nll: torch.Tensor) -> None:
        """Sum -log p over the positions whose *next* token is a response token."""
        target = torch.zeros_like(b.valid)
        target[:, :-1] = b.counted[:, 1:] & b.valid[:, 1:]
        self.loss[j, b.task] += float(nll[target].sum())
        if j == 0:
            self.count[b.task] += int(target.sum())

    def result(self) -> dict[str, Any]:
        """{"scales", "loss" (per scale: the per-task mean loss), "objective" (mean over tasks), "chosen"}."""
        per_task = self.loss / np.maximum(self.count, 1)[None, :]
        objective = per_task.mean(axis=1)
        best = int(np.argmin(objective))
        return {"scales": list(self.scales), "loss": per_task.round(6).tolist(),
                "objective": objective.round(6).tolist(), "chosen": self.scales[best],
                "response_tokens": self.count.astype(int).tolist()}


def search_scale(ins: Inputs, plan: Plan, alphas: dict[str, np.ndarray], device: torch.device,
                 dtype: torch.dtype, progress: bool) -> dict[str, Any]:
    """Run the scale search (module docstring) on the calibration samples' response positions."""
    from slta.engine.calibration import calibration_masks
    from slta.engine.walk import walk

    cfg = ins.cfg
    tasks, _, masks = calibration_masks(ins, "response")
    stream = Stream.open(ins, plan, tasks, device, dtype, cfg.param("batch_size"), masks, cfg.param("batch_tokens"))
    client = ScaleSearch(ins, plan, stream, alphas)
    walk(ins, plan, client, progress)
    return client.result()
