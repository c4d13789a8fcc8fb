"""Run by torchrun from test_distributed.py: N CRaFT steps of the tiny model on deterministic micro-batches.

Micro-batch g of step s is the same data whatever the launch: with M micro-batches per step (third
argument, default 2) rank r of W uses g = M s + r M/W + k, k < M/W. The fourth argument is the
sharding strategy (default full-shard). Writes per-step metrics and final weights. With
`one_pass` as second argument the steps are one-pass CRaFT steps, and before them this rank's shards of
g_act and g_ret from one joint pass are compared with those of the two separate passes; `two_pass_gathered` runs
two-pass steps with --craft.keep_weights_gathered; `action_l2sp` runs two-pass steps with the action retention signal
(teacher-forced anchors, KL to cached log-probabilities) and L2-SP toward the initial weights, read back from a
checkpoint that rank 0 writes before sharding. Every step records how many all-gathers FSDP issued in all and
from the first anchor forward on.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp._fully_shard._fsdp_collectives import DefaultAllGather

import prismatic.models  # noqa: F401  (torchvision guard before timm)
from craft.config import CraftConfig
from craft.dual import DualMultiplier, EpsilonSchedule, RetentionConstraint
from craft.step import accumulate
from craft.surgery import grad_products, local, take_grads
from prismatic.models import OpenVLA, preset_config, save_pretrained
from prismatic.training.distributed import dist_env_from_environ, init_process_group, shard_model
from prismatic.training.l2_sp import L2SP
from prismatic.training.objective import Objective
from prismatic.training.optim import build_optimizer

STEPS, B, A = 3, 2, 2


def micro_batch(g: int, n: int, labels: bool, action_anchors: bool = False) -> dict:
    gen = torch.Generator().manual_seed(1000 + g * 2 + int(labels))
    ids = torch.randint(3, 31000, (n, 10), generator=gen)
    ids[:, 0] = 1
    batch = {"pixel_values": torch.randn(n, 6, 224, 224, generator=gen), "input_ids": ids,
             "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    if labels or action_anchors:  # 7 action tokens, and EOS for training frames
        ids[:, -8:] = torch.randint(31744, 32000, (n, 8), generator=gen)
        lab = ids.clone()
        lab[:, :-8 if labels else -7] = -100
        batch["labels"] = lab
    if action_anchors:
        batch["target_logprobs"] = torch.log_softmax(torch.randn(n, 7, 256, generator=gen) * 3, dim=-1)
    elif not labels:
        batch["target_features"] = torch.randn(n, 64, generator=gen)
    return batch


def compare_one_pass(objective: Objective, gs: list) -> dict:
    """This rank's gradient shards both ways, on the same micro-batches, without an update."""
    params, split, collective = objective.params, objective.split, objective.collective
    accumulate([objective.action(micro_batch(g, B, True)) for g in gs], collective)
    ref_act = take_grads(params)
    accumulate([objective.retention(micro_batch(g, A, False)) for g in gs], collective)
    ref_ret = take_grads(params)
    joint = [objective.joint(micro_batch(g, B, True), micro_batch(g, A, False)).as_joint() for g in gs]
    for i, (fn, n, rows) in enumerate(joint):
        collective.set_grad_sync(i == len(joint) - 1)
        with split.rows(n, rows):
            la, lr = fn()
            ((la + lr) / len(joint)).backward()
    got_act, got_ret = take_grads(params), collective.anchor_grads(split, params)
    errors, compared = [], 0
    for refs, gots in ((ref_act, got_act), (ref_ret, got_ret)):
        for ref, got in zip(refs, gots):
            if ref is None:
                assert got is None or not local(got).any()
                continue
            assert got is not None and type(got) is type(ref)
            assert local(got).shape == local(ref).shape
            scale = local(ref).abs().max().item() if local(ref).numel() else 0.0
            if scale > 0:
                errors.append((local(got) - local(ref)).abs().max().item() / scale)
                compared += 1
    ref_products = collective.reduce(torch.cat([grad_products(ref_act, ref_ret), torch.zeros(2, dtype=torch.float64)]))
    got_products = collective.reduce(torch.cat([grad_products(got_act, got_ret), torch.zeros(2, dtype=torch.float64)]))
    return {"max_rel_err": max(errors), "compared": compared, "num_params": len(params),
            "ref_products": ref_products[:3].tolist(), "got_products": got_products[:3].tolist()}


class AllGatherCount:
    """FSDP's all-gathers, in all and since the anchor pass began (the pinned torch issues them all through
    DefaultAllGather)."""

    def __init__(self, objective: Objective):
        self.total = self.anchor = 0
        self.in_anchor_pass = False
        gather, retention, count = DefaultAllGather.__call__, objective.retention, self

        def counted_gather(self, *args, **kwargs):
            count.total += 1
            count.anchor += count.in_anchor_pass
            return gather(self, *args, **kwargs)

        def marked_retention(batch):
            loss = retention(batch)

            def call():
                count.in_anchor_pass = True
                return loss()
            return call

        DefaultAllGather.__call__ = counted_gather
        objective.retention = marked_retention

    def take(self) -> dict:
        out = {"all_gathers": self.total, "anchor_all_gathers": self.anchor}
        self.total = self.anchor = 0
        self.in_anchor_pass = False
        return out


def main(out: Path, step_impl: str, micro_per_step: int, strategy: str) -> None:
    env = dist_env_from_environ()
    if strategy == "hybrid-shard":  # as two nodes of one process: shards of one rank, replicated twice
        env = replace(env, local_world_size=1)
    device = torch.device("cpu")
    init_process_group(env, device, timeout_s=300)
    torch.manual_seed(0)
    model = OpenVLA.from_config(preset_config("tiny"))
    model.train()
    action = step_impl == "action_l2sp"
    if action and env.is_main:
        save_pretrained(model, out / "pretrained")
    if action and env.distributed:
        dist.barrier()
    if env.distributed:
        shard_model(model, env, device, strategy, False)
    craft = {"two_pass_gathered": CraftConfig(step_impl="two_pass", keep_weights_gathered=True),
             "action_l2sp": CraftConfig(retention_mode="action")}.get(step_impl) or CraftConfig(step_impl=step_impl)
    objective = Objective.build(model, craft, env=env, device=device, sharding_strategy=strategy,
                                autocast_dtype=None, gradient_checkpointing=False, max_grad_norm=1.0,
                                regularize=L2SP.from_checkpoint(model, out / "pretrained", 0.5) if action else None)
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    constraint = RetentionConstraint(EpsilonSchedule("constant", end=1e-4), DualMultiplier(0.5, lr=100.0))
    accum = micro_per_step // env.world_size

    def step_micro_batches(s):
        return [micro_per_step * s + env.rank * accum + k for k in range(accum)]

    if objective.split is not None:
        report = compare_one_pass(objective, step_micro_batches(0))
        (out / f"compare_rank{env.rank}.json").write_text(json.dumps(report))
    rows, gathers = [], AllGatherCount(objective) if env.distributed else None
    for s in range(STEPS):
        gs = step_micro_batches(s)
        r, _ = objective.step(optimizer, constraint, [micro_batch(g, B, True) for g in gs],
                              [micro_batch(g, A, False, action) for g in gs])
        rows.append({"L_act": r.L_act, "L_ret": r.L_ret, "grad_dot": r.grad_dot, "grad_cos": r.grad_cos,
                     "projection": r.projection, "grad_norm": r.grad_norm, "lambda": constraint.lam,
                     "lambda_hex": constraint.lam.hex(), **(gathers.take() if gathers else {})})
    (out / f"rank{env.rank}.json").write_text(json.dumps(rows))
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        torch.save({k: v.detach().clone() for k, v in weights.items()}, out / "weights.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, step_impl, micro, strategy = sys.argv[1:] + ["", "two_pass", "2", "full-shard"][len(sys.argv) - 1:]
    main(Path(out_dir), step_impl, int(micro), strategy)
