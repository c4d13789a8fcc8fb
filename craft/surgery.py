"""Gradient surgery over all trainable parameters seen as one flat vector.

The action gradient is stashed by moving the `.grad` tensors out of the parameters (no copy); the
retention backward then allocates fresh `.grad` tensors. That stash is the only extra gradient-sized
memory CRaFT needs. A parameter that got no gradient from one loss counts as zero for that loss.
"""

from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

Grads = List[Optional[torch.Tensor]]


def take_grads(params: Sequence[torch.Tensor]) -> Grads:
    """Detach the current `.grad` tensors from `params` and return them."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return grads


def grad_products(g_act: Grads, g_ret: Grads) -> torch.Tensor:
    """float64 tensor [<g_act, g_ret>, |g_act|^2, |g_ret|^2]: one vector, so one all-reduce sums shards."""
    pairs = [(a, r) for a, r in zip(g_act, g_ret) if a is not None and r is not None]
    acts = [a for a in g_act if a is not None]
    rets = [r for r in g_ret if r is not None]
    device = (acts or rets)[0].device if (acts or rets) else torch.device("cpu")
    out = torch.zeros(3, dtype=torch.float64, device=device)
    if pairs:
        dots = [torch.dot(a.reshape(-1).float(), r.reshape(-1).float()) for a, r in pairs]
        out[0] = torch.stack(dots).double().sum()
    for i, grads in ((1, acts), (2, rets)):
        if grads:
            norms = torch._foreach_norm([g.float() if g.dtype != torch.float32 else g for g in grads])
            out[i] = torch.stack(norms).double().pow(2).sum()
    return out


@dataclass
class Surgery:
    """What the conflict test decided for one step."""

    grad_dot: float
    grad_cos: float
    projection: bool
    ret_coef: float  # g = g_act + ret_coef * g_ret, with the projection folded in

    @classmethod
    def decide(cls, dot: float, act_sq: float, ret_sq: float, lam: float) -> "Surgery":
        """g = g_act - [dot < 0] dot/|g_ret|^2 g_ret + lam g_ret; |g_ret| = 0 means no projection."""
        denom = (act_sq * ret_sq) ** 0.5
        cos = dot / denom if denom > 0 else 0.0
        projection = ret_sq > 0 and dot < 0
        coef = lam - (dot / ret_sq if projection else 0.0)
        return cls(grad_dot=dot, grad_cos=cos, projection=projection, ret_coef=coef)


def combine_into_grads(params: Sequence[torch.Tensor], g_act: Grads, g_ret: Grads, ret_coef: float) -> None:
    """param.grad <- g_act + ret_coef * g_ret, updating the stashed action gradient in place."""
    both_a, both_r, only_r = [], [], []
    for p, a, r in zip(params, g_act, g_ret):
        if a is not None and r is not None:
            both_a.append(a)
            both_r.append(r)
        elif r is not None:
            only_r.append(r)
        p.grad = a if a is not None else r
    if both_a and ret_coef != 0.0:
        torch._foreach_add_(both_a, both_r, alpha=ret_coef)
    if only_r:
        torch._foreach_mul_(only_r, ret_coef)
