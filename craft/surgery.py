"""Gradient surgery over all trainable parameters seen as one flat vector.

The action gradient is stashed by moving the `.grad` tensors out of the parameters (no copy); the
retention backward then allocates fresh `.grad` tensors. That stash is the only extra gradient-sized
memory CRaFT needs. A parameter that got no gradient from one loss counts as zero for that loss.
Sharded (DTensor) gradients are handled through their local shards: every sum here is a local
partial sum that the caller all-reduces once. On CUDA the three products come from one fused read of
both gradients (craft.fused_surgery); elsewhere, or without Triton, from torch operations.
"""

import functools
from dataclasses import dataclass
from typing import List, Optional, Sequence

import torch

Grads = List[Optional[torch.Tensor]]


@functools.lru_cache(maxsize=1)
def fused_kernels():
    try:
        from craft import fused_surgery
    except ImportError:  # no Triton: the torch path below does the same arithmetic in more passes
        return None
    return fused_surgery


def _fused_for(tensors: Sequence[torch.Tensor]):
    """The fused kernels, if they apply to these tensors (all on CUDA, supported dtypes)."""
    if not tensors or not all(t.is_cuda for t in tensors):
        return None
    fused = fused_kernels()
    return fused if fused is not None and fused.supports(tensors) else None


def local(t: torch.Tensor) -> torch.Tensor:
    """The shard this rank holds (the tensor itself when unsharded); in-place updates reach the DTensor.
    Read directly: `DTensor.to_local()` goes through an autograd function (~5 us a call, and a sharded step
    makes several calls per gradient tensor), which gradients, outside autograd, do not need."""
    return getattr(t, "_local_tensor", t)


def take_grads(params: Sequence[torch.Tensor], dtype: Optional[torch.dtype] = None) -> Grads:
    """Detach the current `.grad` tensors from `params` and return them (cast one by one to `dtype`)."""
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    if dtype is None:
        return grads
    return [g if g is None or g.dtype == dtype else g.to(dtype) for g in grads]


def squared_norm(grads: Grads) -> torch.Tensor:
    """Local sum of squares: float32 accumulation inside each tensor, whatever its dtype (no float32
    copy of a bf16 gradient), float64 across tensors."""
    tensors = [local(g) for g in grads if g is not None]
    if not tensors:
        return torch.zeros((), dtype=torch.float64)
    norms = torch._foreach_norm(tensors, 2, dtype=torch.float32)
    return torch.stack(norms).double().pow(2).sum()


def _dot(a: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """<a, r> accumulated in float32. A low-precision pair is multiplied in its own dtype (the rounding
    of single products averages out) instead of being copied to float32 first: 2 bytes less per element."""
    if a.dtype == r.dtype == torch.float32:
        return torch.dot(a.reshape(-1), r.reshape(-1))
    return torch.sum(a * r, dtype=torch.float32)


def paired_products(a: List[torch.Tensor], r: List[torch.Tensor]) -> torch.Tensor:
    """float64 [sum <a_i, r_i>, sum |a_i|^2, sum |r_i|^2] over gradient pairs present in both losses."""
    fused = _fused_for(a + r)
    if fused is not None:
        return fused.products(a, r)
    dot = torch.stack([_dot(x, y) for x, y in zip(a, r)]).double().sum()
    return torch.stack([dot, squared_norm(a).to(dot.device), squared_norm(r).to(dot.device)])


def grad_products(g_act: Grads, g_ret: Grads) -> torch.Tensor:
    """Local float64 [<g_act, g_ret>, |g_act|^2, |g_ret|^2]: one vector, so one all-reduce sums all shards."""
    pairs = [(local(a), local(r)) for a, r in zip(g_act, g_ret) if a is not None and r is not None]
    alone_a = [a for a, r in zip(g_act, g_ret) if a is not None and r is None]
    alone_r = [r for a, r in zip(g_act, g_ret) if a is None and r is not None]
    device = next((local(g).device for g in (*g_act, *g_ret) if g is not None), torch.device("cpu"))
    out = torch.stack([torch.zeros((), dtype=torch.float64, device=device),
                       squared_norm(alone_a).to(device), squared_norm(alone_r).to(device)])
    if pairs:
        out = out + paired_products(*map(list, zip(*pairs)))
    return out


def clip_scale(grad_sq: float, max_norm: float) -> float:
    """The factor gradient clipping applies to a gradient of squared norm `grad_sq`."""
    return min(1.0, max_norm / (max(grad_sq, 0.0) ** 0.5 + 1e-6))


@dataclass
class Surgery:
    """What the conflict test decided for one step, from the global scalars."""

    grad_dot: float
    grad_cos: float
    projection: bool
    ret_coef: float  # g = g_act + ret_coef * g_ret, with the projection folded in
    grad_sq: float  # |g|^2 of the combined gradient, before clipping

    @classmethod
    def decide(cls, dot: float, act_sq: float, ret_sq: float, lam: float, project: bool = True) -> "Surgery":
        """g = g_act - [project and dot < 0] dot/|g_ret|^2 g_ret + lam g_ret; |g_ret| = 0 means no projection.
        `project` false is the "lambda only" ablation: g = g_act + lam g_ret whatever the sign of dot."""
        denom = (act_sq * ret_sq) ** 0.5
        cos = dot / denom if denom > 0 else 0.0
        projection = project and ret_sq > 0 and dot < 0
        coef = lam - (dot / ret_sq if projection else 0.0)
        grad_sq = act_sq + 2.0 * coef * dot + coef * coef * ret_sq  # |g_act + coef g_ret|^2, no extra pass
        return cls(grad_dot=dot, grad_cos=cos, projection=projection, ret_coef=coef, grad_sq=max(grad_sq, 0.0))


def combine_into_grads(params: Sequence[torch.Tensor], g_act: Grads, g_ret: Grads, ret_coef: float,
                       scale: float = 1.0) -> None:
    """param.grad <- scale * (g_act + ret_coef * g_ret), in place in the stashed action gradient.

    A stash kept in a lower precision than the parameter (bf16 stash) is added into g_ret instead,
    so that `.grad` keeps the parameter's dtype.
    """
    acts, pairs_a, pairs_r, only_r, into_r, from_a = [], [], [], [], [], []
    for p, a, r in zip(params, g_act, g_ret):
        if a is not None and a.dtype != p.dtype:
            if r is None:
                r = torch.zeros_like(p)
            into_r.append(local(r))
            from_a.append(local(a))
            p.grad = r
            continue
        if a is not None:
            acts.append(local(a))
            if r is not None:
                pairs_a.append(local(a))
                pairs_r.append(local(r))
        elif r is not None:
            only_r.append(local(r))
        p.grad = a if a is not None else r
    if acts and scale != 1.0:
        torch._foreach_mul_(acts, scale)
    if pairs_a and ret_coef != 0.0:
        torch._foreach_add_(pairs_a, pairs_r, alpha=ret_coef * scale)
    if only_r or into_r:
        torch._foreach_mul_(only_r + into_r, ret_coef * scale)
    if into_r:
        torch._foreach_add_(into_r, from_a, alpha=scale)
