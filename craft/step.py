"""One optimizer step, readable top to bottom: CRaFT (spec steps 1-7) and the plain baseline."""

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, ContextManager, Optional, Sequence, Tuple

import torch

from craft.dual import RetentionConstraint
from craft.one_pass import RowGroupSplit
from craft.surgery import Grads, Surgery, clip_scale, combine_into_grads, grad_products, local, squared_norm, take_grads

LossFn = Callable[[], torch.Tensor]  # runs one micro-batch forward and returns its mean loss
Regularizer = Optional[Callable[[], None]]  # adds a penalty's gradient to the action gradient in `.grad` (L2-SP)
# One joint micro-batch: (forward returning (L_act, L_ret), number of action rows, number of rows).
JointLoss = Tuple[Callable[[], Tuple[torch.Tensor, torch.Tensor]], int, int]


class Collective:
    """How this rank's partial results become global ones. The default: a single process."""

    def set_grad_sync(self, enabled: bool) -> None:
        """Whether the next backward reduces gradients across ranks (only the last micro-batch's needs to)."""

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        """[<g_act,g_ret>, |g_act|^2, |g_ret|^2, L_act, L_ret] partial sums and local means -> global values."""
        return stats

    def anchor_grads(self, split: RowGroupSplit, params: Sequence[torch.Tensor]) -> Grads:
        """One-pass CRaFT's g_ret for `params`, reduced as the backward reduces `.grad`."""
        return split.take_ret(params)

    def gathered_until_anchor_backward(self) -> ContextManager:
        """Around two-pass CRaFT's two passes: sharded weights may stay gathered from the action backward on."""
        return nullcontext()

    def anchor_forward(self) -> ContextManager:
        """Around the anchor forward: what it gathers may stay gathered for its backward."""
        return nullcontext()


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


def accumulate(loss_fns: Sequence[LossFn], collective: Collective) -> torch.Tensor:
    """Backward every micro-batch loss scaled by 1/n, so `.grad` holds the gradient of the mean."""
    total = torch.zeros((), dtype=torch.float64)
    for i, fn in enumerate(loss_fns):
        collective.set_grad_sync(i == len(loss_fns) - 1)
        loss = fn()
        (loss / len(loss_fns)).backward()
        total = total + loss.detach().double().cpu()
    return total / len(loss_fns)


def craft_step(
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    constraint: RetentionConstraint,
    action_losses: Sequence[LossFn],
    retention_losses: Sequence[LossFn],
    max_grad_norm: float,
    collective: Collective = Collective(),
    stash_dtype: Optional[torch.dtype] = None,
    project: bool = True,
    next_step: Optional[int] = None,
    regularize: Regularizer = None,
) -> StepResult:
    """`project` false never projects g_act (the "lambda only" ablation); `next_step` is the training step at
    which the constraint is next updated (default: the next one), so its epsilon schedule follows training steps;
    `regularize` adds its penalty's gradient to g_act."""
    optimizer.zero_grad(set_to_none=True)
    with collective.gathered_until_anchor_backward():
        l_act = accumulate(action_losses, collective)  # 1. g_act
        if regularize:
            regularize()
        g_act = take_grads(params, stash_dtype)
        l_ret = accumulate(retention_losses, collective)  # 2. g_ret
    g_ret = take_grads(params)
    return _constrained_update(params, optimizer, constraint, g_act, g_ret, l_act, l_ret, max_grad_norm, collective,
                               project, next_step)


def craft_step_one_pass(
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    constraint: RetentionConstraint,
    joint_losses: Sequence[JointLoss],
    split: RowGroupSplit,
    max_grad_norm: float,
    collective: Collective = Collective(),
    stash_dtype: Optional[torch.dtype] = None,
    project: bool = True,
    next_step: Optional[int] = None,
    regularize: Regularizer = None,
) -> StepResult:
    """Steps 1-2 from one forward/backward per joint micro-batch (see craft.one_pass); then as craft_step."""
    optimizer.zero_grad(set_to_none=True)
    l_act = l_ret = torch.zeros((), dtype=torch.float64)
    for i, (fn, n_action_rows, n_rows) in enumerate(joint_losses):
        collective.set_grad_sync(i == len(joint_losses) - 1)
        with split.rows(n_action_rows, n_rows):
            la, lr = fn()
            ((la + lr) / len(joint_losses)).backward()
        l_act, l_ret = l_act + la.detach().double().cpu(), l_ret + lr.detach().double().cpu()
    if regularize:
        regularize()
    g_act, g_ret = take_grads(params, stash_dtype), collective.anchor_grads(split, params)
    return _constrained_update(params, optimizer, constraint, g_act, g_ret, l_act / len(joint_losses),
                               l_ret / len(joint_losses), max_grad_norm, collective, project, next_step)


def _constrained_update(params, optimizer, constraint: RetentionConstraint, g_act, g_ret, l_act: torch.Tensor,
                        l_ret: torch.Tensor, max_grad_norm: float, collective: Collective,
                        project: bool = True, next_step: Optional[int] = None) -> StepResult:
    """Spec steps 3-7, the same whichever way g_act and g_ret were obtained."""
    local_stats = torch.cat([grad_products(g_act, g_ret).cpu(), torch.stack([l_act, l_ret])])
    dot, act_sq, ret_sq, l_act, l_ret = collective.reduce(local_stats).tolist()  # 3. one all-reduce
    lam, eps = constraint.lam, constraint.epsilon
    if not all(map(math.isfinite, (l_act, l_ret, dot, act_sq, ret_sq))):
        return StepResult(L_act=l_act, L_ret=l_ret, lam=lam, epsilon=eps, skipped=True)
    surgery = Surgery.decide(dot, act_sq, ret_sq, lam, project)  # 4. project g_act if dot < 0 (and `project`)
    scale = clip_scale(surgery.grad_sq, max_grad_norm)
    combine_into_grads(params, g_act, g_ret, surgery.ret_coef, scale)  # 5-6. g = g_act + lam g_ret, clipped
    optimizer.step()
    constraint.update(l_ret, next_step)  # 7. lambda, then the epsilon schedule
    return StepResult(
        L_act=l_act, L_ret=l_ret, lam=lam, epsilon=eps, grad_dot=surgery.grad_dot, grad_cos=surgery.grad_cos,
        projection=surgery.projection, grad_norm=surgery.grad_sq ** 0.5,
    )


def baseline_step(
    params: Sequence[torch.Tensor],
    optimizer: torch.optim.Optimizer,
    action_losses: Sequence[LossFn],
    max_grad_norm: float,
    collective: Collective = Collective(),
    regularize: Regularizer = None,
) -> StepResult:
    """Plain behaviour cloning: exactly what `--craft.enabled false` runs (with `regularize`: plus its penalty)."""
    optimizer.zero_grad(set_to_none=True)
    l_act = accumulate(action_losses, collective)
    if regularize:
        regularize()
    grads = [p.grad for p in params]
    zero = torch.zeros((), dtype=torch.float64)
    _, grad_sq, _, l_act, _ = collective.reduce(torch.stack([zero, squared_norm(grads).cpu(), zero, l_act, zero])).tolist()
    if not (math.isfinite(l_act) and math.isfinite(grad_sq)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult(L_act=l_act, skipped=True)
    scale = clip_scale(grad_sq, max_grad_norm)
    if scale != 1.0:
        torch._foreach_mul_([local(g) for g in grads if g is not None], scale)
    optimizer.step()
    return StepResult(L_act=l_act, grad_norm=grad_sq ** 0.5)
