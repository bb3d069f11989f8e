"""RegMean (Jin et al., "Dataless Knowledge Fusion by Merging Weights of Language Models", ICLR 2023).

Every nn.Linear is merged in closed form so that its outputs on each task's inputs stay close to
that task's fine-tune: W = argmin Σ_t ||X_t Wᵀ - X_t W_tᵀ||², i.e. Wᵀ = (Σ_t G_t)⁻¹ Σ_t G_t W_tᵀ with
G_t = X_tᵀ X_t the Gram matrix of the layer's inputs on task t (summed over tokens, as in the paper).
The off-diagonal entries of each G_t are scaled by `alpha` (default 0.9, the paper's α; FusionBench
calls it reduce_non_diagonal_ratio), which regularises towards plain averaging.

As in slta, the inputs X_t come from the *base* model run on the same calibration samples, streamed
layer by layer. The lm_head is a linear layer too (input: the base's normalised final hidden states).
Parameters of no linear layer (embeddings, norms) and linear biases are averaged. The streaming
merge (a client of slta.engine.walk) is slta.merges.regmean.run_regmean.
Linear systems are solved by Cholesky; when Σ G_t is singular (alpha = 1 with fewer tokens than
input features) the minimum-norm least-squares solution is used, and reported.

RegMean++ (`regmean_plusplus`; Nguyen et al. 2025, arXiv:2508.03121) is the same closed form with the
inputs taken from the merge: task t's input of layer l is the *merged* layer l-1's output on task t's
stream (cross-layer dependence), and inside layer l the inputs of its linears are those of candidate
t's own layer l on that stream (intra-layer dependence), X_t^(l,j) from f_t^(l)(X_t^(l)). See
slta.merges.regmean.
"""

from __future__ import annotations

import torch

from slta.methods import Method, register

# RegMean and RegMean++ take the same knobs (RegMean++ only changes the inputs the Grams are taken on).
PARAMS = {"alpha": 0.9, "num_samples": 30, "max_length": 2048, "batch_size": 8}

register(
    Method(
        name="regmean",
        tensor_fn=None,
        needs_data=True,
        method_params=dict(PARAMS),
        reference="Jin et al., Dataless Knowledge Fusion by Merging Weights of Language Models, ICLR 2023",
    )
)


register(
    Method(
        name="regmean_plusplus",
        tensor_fn=None,
        needs_data=True,
        method_params=dict(PARAMS),
        reference="Nguyen et al., RegMean++: Enhancing Effectiveness and Generalization of Regression Mean for "
                  "Model Merging, arXiv:2508.03121 (2025)",
    )
)


def scaled_gram(g: torch.Tensor, alpha: float) -> torch.Tensor:
    """α G + (1 - α) diag(G): off-diagonals scaled by α."""
    return alpha * g + (1 - alpha) * torch.diag_embed(torch.diagonal(g))


def regmean_weight(grams: list[torch.Tensor], weights: list[torch.Tensor], alpha: float) -> tuple[torch.Tensor, str]:
    """Wᵀ = (Σ_t G̃_t)⁻¹ Σ_t G̃_t W_tᵀ in float64. Returns (W, rule)."""
    lhs = rhs = None
    for g, w in zip(grams, weights):  # one task at a time: a few in x in matrices, not 2T of them
        gs = scaled_gram(g.double(), alpha)
        term = gs @ w.double().T
        lhs = gs if lhs is None else lhs.add_(gs)
        rhs = term if rhs is None else rhs.add_(term)
        del gs, term
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        return torch.cholesky_solve(rhs, chol).T, "cholesky"
    evals, evecs = torch.linalg.eigh(lhs)
    keep = evals > 1e-12 * evals[-1].clamp_min(0)
    inv = torch.where(keep, 1 / torch.where(keep, evals, torch.ones_like(evals)), torch.zeros_like(evals))
    return (evecs @ (inv[:, None] * (evecs.T @ rhs))).T, "min-norm"
