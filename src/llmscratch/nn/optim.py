"""Muon for the matrices inside the blocks, AdamW for the rest: one optimizer, written here.

AdamW scales every weight's step by that weight's own gradient history. Muon ("MomentUm
Orthogonalized by Newton-Schulz", Keller Jordan 2024) treats a weight matrix as a matrix:
it keeps SGD momentum M, then steps along the *orthogonalized* momentum, roughly U·Vᵀ where
M = U·S·Vᵀ. Every singular direction of the update then moves by the same amount, so rare
directions, which AdamW's per-element steps leave small, learn as fast as common ones. On the
default CPU run it reaches the same loss in fewer steps than AdamW (docs/default_run.md).

Orthogonalizing by SVD would be slow; a few iterations of an odd polynomial p(X) = aX + bXXᵀX +
c(XXᵀ)²X push every singular value of X towards 1 while keeping U and V. Muon is for hidden
matrices only: embeddings, the output head and the gains and biases stay on AdamW, the same
split as Muon's authors and Moonshot's "Muon is Scalable for LLM Training" (2025). Following
Moonshot, the orthogonal update is scaled by 0.2·√max(rows, cols), which gives it the root mean
square of a typical AdamW step, so one learning rate and one weight decay serve both kinds.
Each parameter is one matrix to Muon, as to ``torch.optim.Muon``: the attention's fused ``qkv``
weight (3C × C) is orthogonalized whole, so Q, K and V share one set of singular directions
(modded-nanogpt orthogonalizes the three apart; not measured here).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

# The quintic's coefficients from Muon's reference code: chosen so that 5 steps bring singular
# values anywhere in (0.001, 1] to roughly [0.7, 1.2]; exact orthogonality is not needed.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Approximately U·Vᵀ for g = U·S·Vᵀ, by a quintic Newton-Schulz iteration, in float32.

    ``g`` is one matrix (m, n) or a stack of same-shaped matrices (k, m, n), done in one batched
    product. Each step is x ← p(A)·x with A = x·xᵀ and p(A) = a·I + b·A + c·A². Written that
    way, every step only needs A, an r × r matrix (r = min(m, n)), and A follows the steps by
    itself: the Gram matrix of p·x is p·A·p (p is a polynomial in A, so symmetric). So the loop
    runs on r × r matrices and multiplies the long side once at the end: for a 128 × 512 MLP
    weight that is 40 % fewer flops than iterating on x, with the same result to float32 rounding.
    """
    a, b, c = NS_COEFFICIENTS
    x = g.float()
    tall = x.size(-2) > x.size(-1)
    if tall:
        x = x.mT  # (..., r, n) with r <= n: the Gram matrix below is the smaller one
    # Frobenius norm >= spectral norm, so this puts every singular value in [0, 1].
    x = x / (x.norm(dim=(-2, -1), keepdim=True) + 1e-7)
    gram = x @ x.mT  # (..., r, r)
    left = None  # the product of the steps' polynomials: x_final = left · x
    for i in range(steps):
        p = c * (gram @ gram) + b * gram  # (..., r, r)
        p.diagonal(dim1=-2, dim2=-1).add_(a)  # + a·I
        left = p if left is None else p @ left
        if i < steps - 1:
            gram = p @ gram @ p  # the Gram matrix of p·x
    x = left @ x  # (..., r, n)
    if tall:
        x = x.mT  # back to (..., m, n)
    return x.to(g.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """Muon on the param groups marked ``algorithm="muon"``, AdamW on the others.

    One optimizer (not two glued together) so the training loop, the checkpoint's
    ``state_dict``, ``--resume`` and the GradScaler see one object, as with plain AdamW.
    Every group takes ``lr`` and ``weight_decay`` (decoupled, as in AdamW: w ← w·(1 − lr·wd));
    Muon groups use ``momentum``, ``nesterov`` and ``ns_steps``, AdamW groups ``betas`` and ``eps``.
    """

    def __init__(self, params: Iterable[dict[str, Any]], lr: float = 3e-3, betas: tuple[float, float] = (0.9, 0.95),
                 eps: float = 1e-8, weight_decay: float = 0.0, momentum: float = 0.95, nesterov: bool = True,
                 ns_steps: int = 5):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                        nesterov=nesterov, ns_steps=ns_steps, algorithm="adamw")
        super().__init__(params, defaults)
        for group in self.param_groups:
            if group["algorithm"] not in ("muon", "adamw"):
                raise ValueError(f"MuonAdamW: algorithm must be 'muon' or 'adamw', got {group['algorithm']!r}")
            if group["algorithm"] == "muon" and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("MuonAdamW: Muon groups take 2-D weight matrices only")

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], torch.Tensor]] = None) -> Optional[torch.Tensor]:
        """One update of every parameter, each group by its own algorithm; the closure's loss, if one is given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["algorithm"] == "muon":
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    def _muon_step(self, group: dict[str, Any]) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        by_shape: dict[tuple[int, ...], list[torch.Tensor]] = defaultdict(list)
        for p in group["params"]:
            if p.grad is not None:
                by_shape[tuple(p.shape)].append(p)
        for shape, params in by_shape.items():  # e.g. the 4 layers' fc_in weights in one batched call
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # buf = mu·buf + (1 - mu)·grad
                updates.append(p.grad.lerp(buf, mu) if group["nesterov"] else buf)  # Nesterov: look one step ahead
            ortho = orthogonalize(torch.stack(updates), group["ns_steps"])  # (k, rows, cols)
            scale = 0.2 * math.sqrt(max(shape))  # the RMS of an AdamW step (Moonshot)
            for p, u in zip(params, ortho):
                p.mul_(1 - lr * wd)
                p.add_(u, alpha=-lr * scale)

    def _adamw_step(self, group: dict[str, Any]) -> None:
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0  # a Python int: bias corrections need no device-to-host read
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            state["exp_avg"].lerp_(p.grad, 1 - beta1)  # m = β₁·m + (1 − β₁)·g
            state["exp_avg_sq"].mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)  # v = β₂·v + (1 − β₂)·g²
            denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(eps)
            p.mul_(1 - lr * wd)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Muon for the weight matrices of the Linear layers inside the model; AdamW for embeddings,
    the output head (tied or not), and the vectors (gains and biases, without weight decay)."""
    embedding_like = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    head = getattr(model, "out_head", None)
    if head is not None:
        embedding_like.add(id(head.weight))
    hidden = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)} - embedding_like
    muon, adamw, vectors = [], [], []
    for p in model.parameters():  # shared (tied) parameters appear once
        if not p.requires_grad:
            continue
        if id(p) in hidden:
            muon.append(p)
        else:
            (adamw if p.dim() >= 2 else vectors).append(p)
    return [
        {"params": muon, "algorithm": "muon", "weight_decay": weight_decay},
        {"params": adamw, "algorithm": "adamw", "weight_decay": weight_decay},
        {"params": vectors, "algorithm": "adamw", "weight_decay": 0.0},
    ]
