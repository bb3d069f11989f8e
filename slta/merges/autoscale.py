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
|S| copies of the calibration activations), then the final norm and lm_head at the scored positions only,
in vocabulary row blocks with a running log-sum-exp, so the full logits never exist. A third walk writes
the merge with s* α.

`scale: auto_task` (issue #28): one factor per task instead, each the smallest that brings the merge's loss
on that task's calibration responses within `scale_margin` of the fine-tune's own loss there (tasks need
different strengths: on SmolLM2 a language the base never saw needs its whole task vector while math
degrades as λ grows). Candidates vary one task's α at a time and run on that task's samples only
(`search_task_scales`). A list `scale: [c_1, ..., c_T]` sets the factors by hand (or a validation search).

`scale: auto_joint` (issue #28): auto_task's factors, then checked together. auto_task measures each task's
loss with the other tasks' α as solved, so its choices need not combine (on SmolLM2, code's and
translate's factors take math's answers away in the merge that has all three). auto_joint measures every
task's loss under the chosen factors together; a task now above its margin gets the smallest larger factor
that brings it back, the others as they now are, and the check repeats (`joint_factors`). Factors only
rise, so it ends; a task that no larger factor brings back keeps its factor. Of the factor lists checked,
the one with the least total excess over the margins is kept: a raise can push another task far out
(on SmolLM2's math & code, code's raise took math's loss from 0.016 to 0.75 nats), and then the earlier
list is the better merge. Same margin, no new tuning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

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
TASK_FACTORS = (0.8, 1.0, 1.2, 1.4, 1.6, 1.8, 2.0)  # auto_task: one task's α times f, the others' as solved
JOINT_ROUNDS = 3  # auto_joint: raises after auto_task's choice at most (each: one check walk, one raise walk)
JOINT_RULE = 2  # auto_joint's rule, in the demo's cache keys: 1 kept the last list checked, 2 the least excess


class ScaleSearch(Client):
    """The merged model's response loss for every candidate α (module docstring). ``only[j]``: the task
    whose samples candidate j runs on (None: every task's)."""

    desc = "slta: scale search"

    def __init__(self, ins: Inputs, plan: Plan, stream: Stream, candidates: list[dict[str, np.ndarray]],
                 only: list[int | None] | None = None):
        self.ins, self.plan, self.stream = ins, plan, stream
        self.alphas = candidates
        self.only = only or [None] * len(candidates)
        self.hs: dict[int, dict[int, torch.Tensor]] = {}  # id(batch) -> {candidate: hidden state}
        T = len(ins.tuned)
        self.loss = np.zeros((len(candidates), T))  # summed -log p per candidate and task
        self.count = np.zeros(T)  # response tokens per task
        self.counted: set[int] = set()

    def runs(self, j: int, b: Batch) -> bool:
        return self.only[j] is None or self.only[j] == b.task

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
        self.hs = {id(b): {} for b in self.stream.batches}
        for j, al in enumerate(self.alphas):  # the merged embedding's rows, E_0[ids] + Σ_t α_t (E_t - E_0)[ids] (Eq. 1)
            merged_embedding_input(self, al[module])
            for b in self.stream.batches:
                if self.runs(j, b):
                    self.hs[id(b)][j] = b.h

    def layer(self, i: int, names: list[str], loaded: Loaded | None) -> None:
        from slta.engine.features import sub, to_compute
        from slta.merges.progressive import merged_layer

        runner = self.stream.runner
        versions = [sub(g, layer_prefix(i)) for g in loaded]
        for j, al in enumerate(self.alphas):
            merged = to_compute(merged_layer(self.plan, i, versions, al, runner.dtype), runner.device, runner.dtype)
            for b in self.stream.batches:
                if self.runs(j, b):
                    self.hs[id(b)][j] = runner.layer_out(i, merged, self.hs[id(b)][j], b)
        for b in self.stream.batches:  # the engine's contract; nothing reads it after this pass
            if self.hs[id(b)]:  # (auto_joint's raise walk runs no candidate on some tasks' batches)
                b.h = next(iter(self.hs[id(b)].values()))

    def head(self, names: list[str], loaded: Loaded | None) -> None:
        ins, plan, runner = self.ins, self.plan, self.stream.runner
        dev, dt = runner.device, runner.dtype
        parts = plan.tensor_parts()
        weight = "model.embed_tokens.weight" if plan.tied else "lm_head.weight"
        norm_versions = [ck.get("model.norm.weight") for ck in ins.all]
        norm_mod = runner.model.model.norm
        vocab = ins.base.shapes[weight][0]
        batches = self.stream.batches
        # only the positions whose next token is a response token are scored: the norm and the 49152-row head
        # run there alone (on SmolLM2's chat samples about a quarter of the tokens; the prompt and system turn
        # are context, read by the layers above, never predicted)
        targets = [self._targets(b) for b in batches]
        nxt = [torch.cat([b.ids[:, 1:], torch.zeros_like(b.ids[:, :1])], 1)[m] for b, m in zip(batches, targets)]
        xs = []  # [candidate][batch]: the final norm (merged with that candidate's α) at the scored positions
        for j, al in enumerate(self.alphas):
            norm = combine("model.norm.weight", norm_versions[0], norm_versions[1:], parts["model.norm.weight"], al)
            xs.append([functional_call(norm_mod, {"weight": norm.to(dev, dt)}, (self.hs[id(b)][j][m],))
                       if self.runs(j, b) else None for b, m in zip(batches, targets)])
        lse = [[torch.full(n.shape, -torch.inf, device=dev, dtype=torch.float64) for n in nxt] for _ in xs]
        picked = [[torch.zeros(n.shape, device=dev, dtype=torch.float64) for n in nxt] for _ in xs]
        for lo in range(0, vocab, ROW_BLOCK):  # each block read once, merged once per scale
            hi = min(vocab, lo + ROW_BLOCK)
            blocks = [ck.get_rows(weight, lo, hi) for ck in ins.all]
            for j, al in enumerate(self.alphas):
                w = combine(weight, blocks[0], blocks[1:], parts[weight], al, (lo, hi)).to(dev, dt)
                for k, x in enumerate(xs[j]):
                    if x is None:  # a candidate that does not run on this batch's task
                        continue
                    # logits stay in the compute dtype (one block: positions x ROW_BLOCK); the running sums are float64
                    logits = x @ w.T  # (positions, rows)
                    lse[j][k] = torch.logaddexp(lse[j][k], logits.logsumexp(-1).double())
                    inside = (nxt[k] >= lo) & (nxt[k] < hi)
                    got = logits.gather(-1, (nxt[k] - lo).clamp(0, hi - lo - 1)[:, None])[:, 0]
                    picked[j][k] += torch.where(inside, got.double(), 0.0)
            del blocks  # before the next block is read
        for j in range(len(self.alphas)):
            for k, b in enumerate(batches):
                if xs[j][k] is not None:
                    self._add(j, b, lse[j][k] - picked[j][k])

    @staticmethod
    def _targets(b: Batch) -> torch.Tensor:
        """(b, s) bool: the positions whose *next* token is a response token (position p predicts p+1)."""
        target = torch.zeros_like(b.valid)
        target[:, :-1] = b.counted[:, 1:] & b.valid[:, 1:]
        return target

    def _add(self, j: int, b: Batch, nll: torch.Tensor) -> None:
        """Sum -log p over the scored positions (`_targets`)."""
        self.loss[j, b.task] += float(nll.sum())
        if id(b) not in self.counted:
            self.counted.add(id(b))
            self.count[b.task] += int(nll.numel())

    def per_task(self) -> np.ndarray:
        """(candidates, T): the mean -log p per response token (0 where a candidate did not run)."""
        return self.loss / np.maximum(self.count, 1)[None, :]

    def result(self, scales: tuple[float, ...]) -> dict[str, Any]:
        """`scale: auto`: {"loss" (per scale: the per-task mean loss), "objective" (mean over tasks), "chosen"}."""
        per_task = self.per_task()
        objective = per_task.mean(axis=1)
        best = int(np.argmin(objective))
        return {"loss": per_task.round(6).tolist(), "objective": objective.round(6).tolist(),
                "chosen": scales[best], "response_tokens": self.count.astype(int).tolist()}


def search_scale(ins: Inputs, plan: Plan, alphas: dict[str, np.ndarray], device: torch.device,
                 dtype: torch.dtype, progress: bool) -> dict[str, Any]:
    """Run the scale search (module docstring) on the calibration samples' response positions."""
    from slta.engine.calibration import calibration_masks
    from slta.engine.walk import walk

    cfg = ins.cfg
    tasks, _, masks = calibration_masks(ins, "response")
    stream = Stream.open(ins, plan, tasks, device, dtype, cfg.param("batch_size"), masks, cfg.param("batch_tokens"))
    client = ScaleSearch(ins, plan, stream, [{k: np.asarray(a) * s for k, a in alphas.items()} for s in AUTO_SCALES])
    walk(ins, plan, client, progress)
    return {"scales": list(AUTO_SCALES), **client.result(AUTO_SCALES)}


def task_factor(own: float, loss: list[float], factors: tuple[float, ...], margin: float) -> float:
    """auto_task's rule for one task: the smallest factor whose loss is within `margin` of the fine-tune's
    own (`own`), else 1 (the closed form's α as solved). The fallback was first the factor of the lowest
    loss; on the synthetic kinds' validation splits that pushed every task of the chat kind to 1.8-2.0 and
    the triple from 14 to 4 % (each task's loss is measured with the others at 1, so per-task minima do
    not combine), while keeping α lost nothing on the hard kind (studies/auto_task_margin.py)."""
    within = [f for f, v in zip(factors, loss) if v <= own + margin]
    return min(within) if within else 1.0


def _walk_losses(ins: Inputs, plan: Plan, device: torch.device, dtype: torch.dtype, progress: bool,
                 candidates: list[dict[str, np.ndarray]], only: list[int]) -> tuple[list[float], np.ndarray]:
    """One walk: candidate j's mean response loss on task only[j]'s calibration samples; and the response
    tokens per task."""
    from slta.engine.calibration import calibration_masks
    from slta.engine.walk import walk

    cfg = ins.cfg
    tasks, _, masks = calibration_masks(ins, "response")
    stream = Stream.open(ins, plan, tasks, device, dtype, cfg.param("batch_size"), masks, cfg.param("batch_tokens"))
    client = ScaleSearch(ins, plan, stream, candidates, list(only))
    walk(ins, plan, client, progress)
    per = client.per_task()
    return [float(per[j, t]) for j, t in enumerate(only)], client.count


def total_excess(loss: list[float], own: list[float], margin: float) -> float:
    """Σ_t max(0, loss_t − own_t − margin): how far a factor list leaves the tasks outside their margins."""
    return sum(max(0.0, v - o - margin) for v, o in zip(loss, own))


def joint_factors(losses: Callable[[list[list[float]], list[int]], list[float]], own: list[float],
                  start: list[float], factors: tuple[float, ...], margin: float,
                  rounds: int = JOINT_ROUNDS) -> dict[str, Any]:
    """auto_joint's rule (module docstring). ``losses(candidates, only)``: each candidate factor list's loss
    on task only[j]'s samples. Check: every task's loss under the current factors together. Raise: each task
    above own + margin (and not given up on) gets the smallest larger factor within the margin with the
    others as they are, all such tasks at once; a task no larger factor brings back is given up on
    (it keeps its factor, as auto_task keeps α where nothing comes within the margin). At most ``rounds``
    raises. Chosen: the checked list with the least Σ_t max(0, loss_t - own_t - margin), the earliest of
    equals ("kept": its index among "checks")."""
    T = len(own)
    current, given_up, checks = list(start), set(), []
    for r in range(rounds + 1):
        loss = losses([current] * T, list(range(T)))
        over = [t for t in range(T) if loss[t] > own[t] + margin]
        checks.append({"factors": list(current), "loss": [round(v, 6) for v in loss], "over": over})
        todo = [t for t in over if t not in given_up]
        if not todo or r == rounds:
            break
        cands, only = [], []
        for t in todo:
            for f in factors:
                if f > current[t]:
                    cands.append([f if u == t else c for u, c in enumerate(current)])
                    only.append(t)
        got = losses(cands, only) if cands else []
        raised = list(current)
        for t in todo:
            within = [c[t] for c, u, v in zip(cands, only, got) if u == t and v <= own[t] + margin]
            if within:
                raised[t] = min(within)
            else:
                given_up.add(t)
        if raised == current:
            break
        current = raised
    excess = [total_excess(c["loss"], own, margin) for c in checks]
    for c, e in zip(checks, excess):
        c["excess"] = round(e, 6)
    kept = int(np.argmin(excess))  # the first of equals
    return {"chosen": checks[kept]["factors"], "kept": kept, "checks": checks, "given_up": sorted(given_up),
            "rounds": rounds}


def search_task_scales(ins: Inputs, plan: Plan, alphas: dict[str, np.ndarray], device: torch.device,
                       dtype: torch.dtype, progress: bool, margin: float,
                       factors: tuple[float, ...] = TASK_FACTORS, joint: bool = False) -> dict[str, Any]:
    """`scale: auto_task` (issue #28): one factor per task, from the calibration responses alone.

    For task t: the fine-tune's own loss on t's calibration responses (the merge with α = e_t in every
    module is θ_t), and the merge's loss there with t's α times f for every f in ``factors``, the other
    tasks' α as solved. c_t is the smallest f whose loss is within ``margin`` (nats per response token) of
    the fine-tune's own, or 1 if none is: as much of the task as its own answers need, and no more (more
    only adds interference on the others). Each candidate runs on its task's samples only; the T factors
    are chosen one task at a time, not jointly, and need not combine (on SmolLM2, code's factor that
    suits code alone costs math most of its accuracy: docs/methods.md). ``joint`` (`scale: auto_joint`):
    then checked together and raised (`joint_factors`)."""
    T = len(ins.tuned)
    candidates, only = [], []
    for t in range(T):
        onehot = np.eye(T)[t]
        candidates.append({k: onehot.copy() for k in alphas})  # θ_0 + (θ_t - θ_0) in every module: the fine-tune
        only.append(t)
        for f in factors:
            scaled = np.ones(T)
            scaled[t] = f
            candidates.append({k: np.asarray(a) * scaled for k, a in alphas.items()})
            only.append(t)
    got, count = _walk_losses(ins, plan, device, dtype, progress, candidates, only)
    n = len(factors) + 1
    own = [got[t * n] for t in range(T)]
    loss = [[got[t * n + 1 + i] for i in range(len(factors))] for t in range(T)]
    chosen = [task_factor(own[t], loss[t], factors, margin) for t in range(T)]
    out = {"factors": list(factors), "margin": margin, "fine_tune_loss": [round(v, 6) for v in own],
           "loss": [[round(v, 6) for v in row] for row in loss], "chosen": chosen,
           "response_tokens": count.astype(int).tolist()}
    if joint:
        def losses(cands: list[list[float]], on: list[int]) -> list[float]:
            scaled = [{k: np.asarray(a) * np.asarray(c) for k, a in alphas.items()} for c in cands]
            return _walk_losses(ins, plan, device, dtype, progress, scaled, on)[0]

        out["one_at_a_time"] = chosen
        out["joint"] = joint_factors(losses, own, chosen, factors, margin)
        out["chosen"] = out["joint"]["chosen"]
    return out
