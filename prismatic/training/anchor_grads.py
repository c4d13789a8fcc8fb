"""One-pass CRaFT's anchor gradient under FSDP2, reduced across ranks as FSDP reduces `.grad`."""

import math
import warnings
from typing import Dict, List, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from craft.one_pass import RowGroupSplit
from craft.surgery import Grads, local

# torch 2.13 renamed reduce_scatter_tensor (now a deprecated alias); older versions lack the new name.
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class ShardedAnchorGrads:
    """One-pass CRaFT under FSDP2: the anchor-row gradients that `RowGroupSplit` collects on the unsharded
    weights become this rank's shard of the global g_ret, reduced exactly as FSDP reduces `.grad` (averaged
    over ranks, in `param.grad`'s shard layout and dtype): one reduce-scatter per FSDP unit, issued as soon
    as the unit's backward is done, so the full-size anchor gradient of only one unit is held at a time.
    Units whose inputs need no gradient (the root) are reduced after the backward, in a fixed order."""

    def __init__(self, model, split: RowGroupSplit):
        self.split, self.sync = split, True
        # The joint forward returns hidden_states[0], the first decoder layer's input, which FSDP itself
        # wraps in a view to hook its backward; nothing changes it in place, so its warning is noise here.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDPOpenVLA\) returned a view tensor")
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        # Each unit's own weights, by name: FSDP swaps the unsharded tensor in under the same name.
        self.names = {u: self._own_trainable(u) for u in self.units}
        self.shards = {u: [u.get_parameter(n) for n in self.names[u]] for u in self.units}
        self.unsharded: Dict[FSDPModule, List[torch.Tensor]] = {}
        self.done: Dict[int, torch.Tensor] = {}
        for u in self.units:
            u.register_forward_pre_hook(self._pre_forward(u))

    @staticmethod
    def _own_trainable(unit) -> List[str]:
        nested = {id(p) for sub in unit.modules() if sub is not unit and isinstance(sub, FSDPModule)
                  for p in sub.parameters()}
        return [n for n, p in unit.named_parameters() if p.requires_grad and id(p) not in nested]

    def _pre_forward(self, unit):
        def hook(module, args):
            if self.split.total == 0 or not self.sync or unit in self.unsharded:
                return None  # not a joint forward whose gradients are synced, or a recomputation
            self.unsharded[unit] = [module.get_parameter(n) for n in self.names[unit]]
            x = next((a for a in args if isinstance(a, torch.Tensor) and a.requires_grad), None)
            if x is not None:  # its gradient is complete once every op of the unit that consumed it is done
                x.register_hook(lambda grad: self._reduce(unit))
        return hook

    def _reduce(self, unit) -> None:
        weights, shards = self.unsharded.pop(unit, None), self.shards[unit]
        if weights is None:
            return
        grads = [self.split.pop_ret(w) for w in weights]
        present = [(g, p) for g, p in zip(grads, shards) if g is not None]
        if not present:
            return
        mesh = present[0][1].device_mesh
        shard_group = mesh.get_group(mesh.ndim - 1)
        world = dist.get_world_size(shard_group)
        # FSDP's layout: dim 0 cut into `world` chunks of ceil(rows / world) rows, the last ones padded.
        sizes = [math.ceil(p.shape[0] / world) * math.prod(p.shape[1:]) for _, p in present]
        send = torch.empty(world, sum(sizes), dtype=present[0][1].dtype, device=present[0][0].device)
        offset = 0
        for (g, _), size in zip(present, sizes):
            send[:, offset:offset + size] = F.pad(g.reshape(-1), (0, world * size - g.numel())).view(world, size)
            offset += size
        recv = send.new_empty(send.shape[1])
        _reduce_scatter(recv, send.view(-1), group=shard_group)
        if mesh.ndim == 2:  # hybrid shard: the replicas of a shard sum theirs
            dist.all_reduce(recv, group=mesh.get_group(0))
        recv.div_(mesh.size())
        offset = 0
        for (_, p), size in zip(present, sizes):
            shape = local(p).shape
            shard = recv[offset:offset + shape.numel()].view(shape)
            self.done[id(p)] = DTensor.from_local(shard, mesh, p.placements, run_check=False, shape=p.shape,
                                                  stride=p.stride())
            offset += size

    def take(self, params: Sequence[torch.Tensor]) -> Grads:
        """This rank's shards of g_ret for the sharded `params`; reduces what is still pending first."""
        for unit in self.units:
            self._reduce(unit)
        out = [self.done.pop(id(p), None) for p in params]
        self.split.take_ret(())
        self.unsharded, self.done = {}, {}
        return out
