"""L2-SP (Li et al., ICML 2018): fine-tuning with every trainable weight pulled toward its pretrained value.

The penalty `weight / 2 * ||w - w0||^2` enters as its gradient, added to the action gradient once per step with
two multi-tensor passes over this rank's shards, so no penalty forward or backward is ever run. The reference
w0 is read from the pretrained checkpoint (also when resuming, where the model holds fine-tuned weights); it is
the one extra weight-sized buffer the method needs.
"""

import math
from typing import List, Sequence

import torch
from torch.distributed.tensor import DTensor

from craft.surgery import local
from prismatic.models.checkpoint import read_weights


class L2SP:
    def __init__(self, params: Sequence[torch.Tensor], reference: List[torch.Tensor], weight: float):
        self.params, self.reference, self.weight = list(params), reference, weight

    @classmethod
    def from_checkpoint(cls, model, checkpoint, weight: float) -> "L2SP":
        """w0 for the trainable parameters of `model` (this rank's shard of each, under FSDP)."""
        trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
        reference = {}
        for name, full in read_weights(checkpoint, set(model.state_dict())):
            p = trainable.get(name)
            if p is not None:
                reference[name] = _shard_like(full, p).to(device=local(p).device, dtype=p.dtype, copy=True)
        return cls(list(trainable.values()), [reference[name] for name in trainable], weight)

    def __call__(self) -> None:
        """`.grad += weight * (w - w0)` for every parameter that has a gradient."""
        have = [i for i, p in enumerate(self.params) if p.grad is not None]
        grads = [local(self.params[i].grad) for i in have]
        torch._foreach_add_(grads, [local(self.params[i]).detach() for i in have], alpha=self.weight)
        torch._foreach_add_(grads, [self.reference[i] for i in have], alpha=-self.weight)


def _shard_like(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The rows of `full` that this rank holds of `p`: FSDP2 cuts dim 0 into chunks of ceil(rows / shards)."""
    if not isinstance(p, DTensor):
        return full
    mesh = p.device_mesh
    rows = math.ceil(full.shape[0] / mesh.size(mesh.ndim - 1))
    start = mesh.get_local_rank(mesh.ndim - 1) * rows
    return full[start : start + rows]
