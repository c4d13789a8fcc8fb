"""Process group, device mesh and FSDP2 sharding, composed in a few small functions.

One process per GPU under torchrun. A single process runs unsharded; several processes shard the
model with `fully_shard` (one unit per ViT block and per Llama decoder layer, then the root):
`full-shard` over all ranks, or `hybrid-shard` (shard within a node, replicate across nodes), which
with one GPU per node degenerates to plain replication instead of failing. One-pass CRaFT's anchor
gradient is reduced here too (`ShardedAnchorGrads`), as FSDP reduces `.grad`.
"""

import math
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from craft.one_pass import RowGroupSplit
from craft.step import Collective
from craft.surgery import Grads, local

SHARDING_STRATEGIES = ("full-shard", "hybrid-shard")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def num_nodes(self) -> int:
        return self.world_size // self.local_world_size


def dist_env_from_environ() -> DistEnv:
    """What torchrun told this process (no process group is created here)."""
    env = os.environ
    return DistEnv(rank=int(env.get("RANK", 0)), world_size=int(env.get("WORLD_SIZE", 1)),
                   local_rank=int(env.get("LOCAL_RANK", 0)), local_world_size=int(env.get("LOCAL_WORLD_SIZE", 1)))


def init_process_group(env: DistEnv, device: torch.device, timeout_s: int, world_of_one: bool = False) -> None:
    """NCCL on GPUs, gloo on CPU; a hung collective fails after `timeout_s` instead of waiting forever.
    A single process gets a group only with `world_of_one` (FSDP over one device), over an in-process
    store since torchrun's rendezvous is not there."""
    if dist.is_initialized() or not (env.distributed or world_of_one):
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    alone = {} if env.distributed else {"store": dist.HashStore(), "rank": 0, "world_size": 1}
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if cuda else None, **alone)  # NCCL: no guessing which GPU is whose


def replicate_degree(env: DistEnv, strategy: str) -> int:
    """How many ranks hold each shard: the nodes under hybrid-shard, else 1."""
    return env.num_nodes if strategy == "hybrid-shard" else 1


def shard_model(model, env: DistEnv, device: torch.device, strategy: str, mixed_precision: bool) -> None:
    """Wrap `model` in FSDP2 units, in place."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if strategy == "hybrid-shard":
        mesh = init_device_mesh(device.type, (env.num_nodes, env.local_world_size),
                                mesh_dim_names=("replicate", "shard"))
    else:
        mesh = init_device_mesh(device.type, (env.world_size,))
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision \
        else MixedPrecisionPolicy()
    units = [*model.vision_backbone.featurizer.blocks, *model.vision_backbone.fused_featurizer.blocks,
             *model.language_model.model.layers]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    register_fsdp_forward_method(model, "hidden_states")  # the anchor pass enters through this method




class FSDPCollective(Collective):
    """Sums the gradient scalars over shards (once, not once per replica) and averages the losses; with a
    one-pass `split`, reduces its anchor-row gradients as FSDP reduces `.grad`."""

    def __init__(self, model, env: DistEnv, device: torch.device, strategy: str,
                 split: Optional[RowGroupSplit] = None):
        self.model, self.env, self.device = model, env, device
        self.replicate = replicate_degree(env, strategy)
        self.anchor = ShardedAnchorGrads(model, split) if split is not None else None

    def set_grad_sync(self, enabled: bool) -> None:
        self.model.set_requires_gradient_sync(enabled)
        if self.anchor is not None:
            self.anchor.sync = enabled

    def anchor_grads(self, split: RowGroupSplit, params: Sequence[torch.Tensor]) -> Grads:
        return self.anchor.take(params)

    def reduce(self, stats: torch.Tensor) -> torch.Tensor:
        total = stats.to(self.device, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        total[:3] /= self.replicate  # every replica holds the same shards
        total[3:] /= self.env.world_size
        return total.cpu()


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
