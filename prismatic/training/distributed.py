"""Process group, device mesh and FSDP2 sharding, composed in a few small functions.

One process per GPU under torchrun. A single process runs unsharded; several processes shard the
model with `fully_shard` (one unit per ViT block and per Llama decoder layer, then the root):
`full-shard` over all ranks, or `hybrid-shard` (shard within a node, replicate across nodes), which
with one GPU per node degenerates to plain replication instead of failing. One-pass CRaFT's anchor
gradient is reduced as FSDP reduces `.grad` by `ShardedAnchorGrads` (prismatic/training/anchor_grads.py).
"""

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional, Sequence

import torch
import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule

from craft.one_pass import RowGroupSplit
from craft.step import Collective
from craft.surgery import Grads
from prismatic.training.anchor_grads import ShardedAnchorGrads

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
    one-pass `split`, reduces its anchor-row gradients as FSDP reduces `.grad`; with `keep_gathered`, lets the
    two-pass anchor pass run on the weights the action backward gathered (--craft.keep_weights_gathered)."""

    def __init__(self, model, env: DistEnv, device: torch.device, strategy: str,
                 split: Optional[RowGroupSplit] = None, keep_gathered: bool = False):
        self.model, self.env, self.device = model, env, device
        self.replicate = replicate_degree(env, strategy)
        self.anchor = ShardedAnchorGrads(model, split) if split is not None else None
        self.keep_gathered = keep_gathered
        self.units = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.inner_units = [u for u in self.units if u is not model]  # the root never reshards after its forward

    @contextmanager
    def gathered_until_anchor_backward(self):
        """Every unit stays gathered after its action backward; all are resharded after the anchor backward."""
        if not self.keep_gathered:
            yield
            return
        self.model.set_reshard_after_backward(False)
        try:
            yield
        finally:
            self.model.set_reshard_after_backward(True)
            for unit in self.units:
                unit.reshard()

    @contextmanager
    def anchor_forward(self):
        """The units below the root keep their weights for the backward."""
        if not self.keep_gathered:
            yield
            return
        for unit in self.inner_units:
            unit.set_reshard_after_forward(False, recurse=False)
        try:
            yield
        finally:
            for unit in self.inner_units:
                unit.set_reshard_after_forward(True, recurse=False)

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
