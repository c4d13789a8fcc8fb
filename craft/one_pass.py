"""Both CRaFT gradients from ONE forward/backward over the joint batch [action rows; anchor rows].

Samples never interact except through the weights, so in the joint backward the output gradients of
the action rows come only from L_act and those of the anchor rows only from L_ret. Every weight
gradient is a sum over rows; splitting that sum at row `n` yields g_act and g_ret exactly:
- linear layers (nearly all the weights): one forward GEMM and one input-gradient GEMM over all rows,
  and the weight gradient as two row-group GEMMs (same FLOPs as one);
- any other op on a weight (norms, embeddings, LayerScale, position embeddings, patch convolution):
  evaluated once per row group, the anchor group reading a twin leaf of the weight that shares its
  storage, so autograd delivers the anchor part to the twin.
The action part lands in `param.grad`, the anchor part in this object's buffers. The interception is
a TorchFunctionMode active around the forward and the backward; activation checkpointing recomputes
the forward inside the backward, where autograd does not carry the mode, so the checkpoint
re-enters it through `recompute_context`. The mode costs a Python call for every torch call of the
model, frozen parts included; when every trainable weight is a Linear layer's (LoRA adapters), the
split is taken at those layers instead, by a forward installed on them once that routes their calls
through the same row-split linear while a joint batch is in flight (recomputations included), and the
mode is never entered. A trainable weight used in an op without a batch-aligned input is refused, so
a silent misattribution cannot happen. Weights are read when used, never kept from beforehand, so
that the unsharded weights FSDP swaps in for the forward are split too; under FSDP the anchor part
is then reduced like `.grad` by the caller (prismatic.training.anchor_grads.ShardedAnchorGrads).
"""

import functools
import types
from contextlib import contextmanager, nullcontext
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from craft.surgery import Grads


class _RowSplitLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, n, split):
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        xc, wc = x.to(dtype), weight.to(dtype)
        with torch.autocast(device, enabled=False):
            y = F.linear(xc, wc, None if bias is None else bias.to(dtype))
        ctx.save_for_backward(xc, wc)
        ctx.n, ctx.split, ctx.weight, ctx.bias, ctx.x_dtype = n, split, weight, bias, x.dtype
        return y

    @staticmethod
    def backward(ctx, gy):
        xc, wc = ctx.saved_tensors
        gy = gy.to(wc.dtype)
        n, out_f, in_f = ctx.n, wc.shape[0], wc.shape[1]
        gx = (gy @ wc).to(ctx.x_dtype)
        g_act = gy[:n].reshape(-1, out_f).T @ xc[:n].reshape(-1, in_f)
        ctx.split.add_ret(ctx.weight, gy[n:].reshape(-1, out_f).T @ xc[n:].reshape(-1, in_f))
        gb_act = None
        if ctx.bias is not None:
            gb_act = gy[:n].reshape(-1, out_f).sum(0).to(ctx.bias.dtype)
            ctx.split.add_ret(ctx.bias, gy[n:].reshape(-1, out_f).sum(0))
        return gx, g_act.to(ctx.weight.dtype), gb_act, None, None


def _unattributable(func) -> RuntimeError:
    return RuntimeError(f"one-pass CRaFT cannot attribute the gradient of a weight used by {func} without a "
                        "batch-aligned input; use --craft.step_impl two_pass")


class RowGroupSplit(TorchFunctionMode):
    """Attribute weight gradients of rows [:n] to `.grad` and of rows [n:] to `pop_ret()`."""

    def __init__(self, action_only: Sequence[nn.Module] = (), model: Optional[nn.Module] = None):
        """`action_only`: modules whose weights only the action rows reach (the output head, applied to the
        supervised positions): their whole gradient is g_act and they are not intercepted. `model`: when
        given and its other trainable weights (as they are now) all belong to plain Linear layers, the split
        is taken at those layers and the TorchFunctionMode is not used."""
        super().__init__()
        self.action_only = list(action_only)
        self.twins: Dict[int, torch.Tensor] = {}
        self.ret: Dict[int, torch.Tensor] = {}
        self.n = self.total = 0
        self.linears = [] if model is None else _trainable_linears(model, self.action_only)
        for linear in self.linears:
            linear.forward = types.MethodType(functools.partial(_split_linear_forward, self), linear)

    @property
    def uses_mode(self) -> bool:
        return not self.linears

    def _tracked(self, a) -> bool:
        return isinstance(a, nn.Parameter) and a.requires_grad and not any(
            a is p for m in self.action_only for p in m._parameters.values())

    @contextmanager
    def rows(self, n: int, total: int):
        """Active around the joint forward and its backward; rows [:n] are the action rows."""
        self.n, self.total = n, total
        try:
            with self if self.uses_mode else nullcontext():
                yield
        finally:
            self.n = self.total = 0

    def recompute_context(self):
        """torch.utils.checkpoint's `context_fn`: no change for the forward; the recomputation in the
        backward runs under this split again while a joint batch is in flight."""
        return nullcontext(), self._reentered()

    @contextmanager
    def _reentered(self):
        if self.uses_mode and self.total > 0 and self not in torch.overrides._get_current_function_mode_stack():
            with self:
                yield
        else:
            yield

    def add_ret(self, param: torch.Tensor, grad: torch.Tensor) -> None:
        key = id(param)
        grad = grad.to(param.dtype)
        self.ret[key] = grad if key not in self.ret else self.ret[key].add_(grad)

    def pop_ret(self, param: torch.Tensor) -> Optional[torch.Tensor]:
        """The anchor-row gradient accumulated for the weight `param` (None if it got none), handed over."""
        g, twin = self.ret.pop(id(param), None), self.twins.pop(id(param), None)
        if twin is not None and twin.grad is not None:
            g = twin.grad if g is None else g.add_(twin.grad)
        return g

    def take_ret(self, params: Sequence[torch.Tensor]) -> Grads:
        """The anchor-row gradients of `params` (one process: the weights the forward used); resets."""
        out = [self.pop_ret(p) for p in params]
        self.ret, self.twins = {}, {}
        return out

    def _twin(self, p: torch.Tensor) -> torch.Tensor:
        if id(p) not in self.twins:
            self.twins[id(p)] = p.detach().requires_grad_(True)
        return self.twins[id(p)]

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if not torch.is_grad_enabled() or not self._any_tracked(args, kwargs):
            return func(*args, **kwargs)  # no weight gradient to attribute
        if func is F.linear and args[0].shape[0] == self.total:
            x, weight = args[0], args[1]
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            return _RowSplitLinear.apply(x, weight, bias, self.n, self)
        if getattr(func, "__name__", "") == "expand":
            return self._split_expand(args)
        if not any(isinstance(a, torch.Tensor) and not self._tracked(a) and a.dim() > 0
                   and a.shape[0] == self.total for a in (*args, *kwargs.values())):
            result = func(*args, **kwargs)
            if isinstance(result, torch.Tensor):
                raise _unattributable(func)
            return result  # metadata (dtype, shape, ...): nothing to attribute
        return torch.cat([self._call_rows(func, args, kwargs, slice(0, self.n), twin=False),
                          self._call_rows(func, args, kwargs, slice(self.n, self.total), twin=True)])

    def _any_tracked(self, args, kwargs) -> bool:
        """Most calls have no weight among their arguments: a plain loop, as this runs for every torch call."""
        for a in args:
            if isinstance(a, nn.Parameter) and self._tracked(a):
                return True
        for a in kwargs.values():
            if isinstance(a, nn.Parameter) and self._tracked(a):
                return True
        return False

    def _call_rows(self, func, args, kwargs, rows: slice, twin: bool):
        def pick(a):
            if not isinstance(a, torch.Tensor):
                return a
            if self._tracked(a):
                return self._twin(a) if twin else a
            return a[rows] if a.dim() > 0 and a.shape[0] == self.total else a
        return func(*tree_map(pick, args), **tree_map(pick, kwargs))

    def _split_expand(self, args):
        """`token.expand(B, ...)` (class and register tokens): the B copies are rows of the batch."""
        p, sizes = args[0], args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
            sizes = tuple(sizes[0])
        if sizes[0] != self.total:
            raise RuntimeError("one-pass CRaFT: a weight is expanded over a dimension that is not the batch")
        head = p.expand(self.n, *sizes[1:])
        tail = self._twin(p).expand(self.total - self.n, *sizes[1:])
        return torch.cat([head, tail])


def _trainable_linears(model: nn.Module, action_only: Sequence[nn.Module]) -> list:
    """The Linear layers holding the trainable weights outside `action_only`; [] if any such weight is held by
    another kind of module (or a Linear subclass with its own forward), or if there is none."""
    skip = {id(m) for m in action_only}
    linears = []
    for module in model.modules():
        if id(module) in skip or not any(p is not None and p.requires_grad for p in module._parameters.values()):
            continue
        if not isinstance(module, nn.Linear) or type(module).forward is not nn.Linear.forward:
            return []
        linears.append(module)
    return linears


def _split_linear_forward(split: RowGroupSplit, linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """A Linear layer's forward while `split` holds no TorchFunctionMode. The weight is read at each call: FSDP
    swaps the unsharded one in under the same name."""
    weight, bias = linear.weight, linear.bias
    if split.total == 0 or not torch.is_grad_enabled() or not (
            weight.requires_grad or (bias is not None and bias.requires_grad)):
        return F.linear(x, weight, bias)
    if x.shape[0] != split.total:
        raise _unattributable(F.linear)
    return _RowSplitLinear.apply(x, weight, bias, split.n, split)
