"""One optimizer step, readable top to bottom: CRaFT (spec steps 1-7) and the plain baseline."""

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from craft.dual import RetentionConstraint
from craft.surgery import Surgery, combine_into_grads, grad_products, take_grads

LossFn = Callable[[], torch.Tensor]  # runs one micro-batch forward and returns its mean loss


@dataclass
class StepResult:
    L_act: float
    L_ret: Optional[float] = None
    lam: Optional[float] = None  # the lambda that weighted g_ret in this step
    epsilon: Optional[float] = None  # the budget lambda was updated against
    grad_dot: Optional[float] = None
    grad_cos: Optional[float] = None
    projection: Optional[bool] = None
    grad_norm: Optional[float] = None  # of the combined gradient, before clipping
    skipped: bool = False  # a non-finite loss or gradient: nothing was updated


def accumulate(loss_fns: Sequence[LossFn]) -> torch.Tensor:
    """Backward every micro-batch loss scaled by 1/n, so `.grad` holds the gradient of the mean."""
    total = 0.0
    for fn in loss_fns:
        loss = fn()
        (loss / len(loss_fns)).backward()
        total = total + loss.detach().double()
    return total / len(loss_fns)


def craft_step(
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    constraint: RetentionConstraint,
    action_losses: Sequence[LossFn],
    retention_losses: Sequence[LossFn],
    max_grad_norm: float,
) -> StepResult:
    optimizer.zero_grad(set_to_none=True)
    l_act = accumulate(action_losses)  # 1. g_act
    g_act = take_grads(params)
    l_ret = accumulate(retention_losses)  # 2. g_ret
    g_ret = take_grads(params)
    dot, act_sq, ret_sq = grad_products(g_act, g_ret).tolist()  # 3. one pass, fp32/fp64 sums
    l_act, l_ret = l_act.item(), l_ret.item()
    lam, eps = constraint.lam, constraint.epsilon
    if not all(map(math.isfinite, (l_act, l_ret, dot, act_sq, ret_sq))):
        return StepResult(L_act=l_act, L_ret=l_ret, lam=lam, epsilon=eps, skipped=True)
    surgery = Surgery.decide(dot, act_sq, ret_sq, lam)  # 4. project g_act if dot < 0
    combine_into_grads(params, g_act, g_ret, surgery.ret_coef)  # 5-6. g = g_act + lam g_ret
    grad_norm = _clip_and_step(params, optimizer, max_grad_norm)
    if grad_norm is None:
        return StepResult(L_act=l_act, L_ret=l_ret, lam=lam, epsilon=eps, skipped=True)
    constraint.update(l_ret)  # 7. lambda, then the epsilon schedule
    return StepResult(
        L_act=l_act, L_ret=l_ret, lam=lam, epsilon=eps, grad_dot=surgery.grad_dot,
        grad_cos=surgery.grad_cos, projection=surgery.projection, grad_norm=grad_norm,
    )


def baseline_step(
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    action_losses: Sequence[LossFn],
    max_grad_norm: float,
) -> StepResult:
    """Plain behaviour cloning: exactly what `--craft.enabled false` runs."""
    optimizer.zero_grad(set_to_none=True)
    l_act = accumulate(action_losses).item()
    if not math.isfinite(l_act):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(L_act=l_act, skipped=True)
    grad_norm = _clip_and_step(params, optimizer, max_grad_norm)
    return StepResult(L_act=l_act, grad_norm=grad_norm, skipped=grad_norm is None)


def _clip_and_step(
    params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer, max_grad_norm: float
) -> Optional[float]:
    """Clip, then step unless the gradient norm is non-finite (then the grads are dropped)."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, max_grad_norm, foreach=True))
    if not math.isfinite(norm):
        optimizer.zero_grad(set_to_none=True)
        return None
    optimizer.step()
    return norm
