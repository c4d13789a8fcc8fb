"""Run by torchrun from test_distributed.py: N CRaFT steps of the tiny model on deterministic micro-batches.

Micro-batch g of step s is the same data whatever the launch: with M micro-batches per step (third
argument, default 2) rank r of W uses g = M s + r M/W + k, k < M/W. The fourth argument is the
sharding strategy (default full-shard). Writes per-step metrics and final weights. With
`one_pass` as second argument the steps are one-pass CRaFT steps, and before them this rank's shards of
g_act and g_ret from one joint pass are compared with those of the two separate passes.
"""

import json
import sys
from dataclasses import replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import prismatic  # noqa: F401  (torchvision guard before timm)
from craft.dual import DualMultiplier, EpsilonSchedule, RetentionConstraint
from craft.retention import pool_hidden, retention_loss
from craft.one_pass import RowGroupSplit
from craft.step import Collective, accumulate, craft_step, craft_step_one_pass
from craft.surgery import grad_products, local, take_grads
from prismatic.models import OpenVLA, preset_config
from prismatic.training.batches import joint_batch
from prismatic.training.distributed import FSDPCollective, dist_env_from_environ, init_process_group, shard_model
from prismatic.training.optim import build_optimizer

STEPS, B, A = 3, 2, 2


def micro_batch(g: int, n: int, labels: bool) -> dict:
    gen = torch.Generator().manual_seed(1000 + g * 2 + int(labels))
    ids = torch.randint(3, 31000, (n, 10), generator=gen)
    ids[:, 0] = 1
    batch = {"pixel_values": torch.randn(n, 6, 224, 224, generator=gen), "input_ids": ids,
             "attention_mask": torch.ones_like(ids, dtype=torch.bool)}
    if labels:
        ids[:, -8:] = torch.randint(31744, 32000, (n, 8), generator=gen)
        lab = ids.clone()
        lab[:, :-8] = -100
        batch["labels"] = lab
    else:
        batch["target_features"] = torch.randn(n, 64, generator=gen)
    return batch


def ret_loss(model, hidden, b):
    features = pool_hidden(hidden, "mean_image_tokens", model.image_token_slice, b["attention_mask"])
    return retention_loss(features, b["target_features"], "mse")


def joint_fn(model, g: int):
    """One forward over [action rows; anchor rows] of micro-batch g: (L_act, L_ret), n, rows."""
    batch = joint_batch(micro_batch(g, B, True), micro_batch(g, A, False), pad_token_id=32000)

    def fn():
        out = model(batch["pixel_values"], batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                    output_hidden_states=True)
        anchors = {"attention_mask": batch["attention_mask"][B:], "target_features": batch["target_features"]}
        return out.loss, ret_loss(model, out.hidden_states[-2][B:], anchors)
    return fn, B, B + A


def compare_one_pass(model, params, split, collective, act_fns, ret_fns, joint) -> dict:
    """This rank's gradient shards both ways, on the same micro-batches, without an update."""
    accumulate(act_fns, collective)
    ref_act = take_grads(params)
    accumulate(ret_fns, collective)
    ref_ret = take_grads(params)
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


def main(out: Path, step_impl: str, micro_per_step: int, strategy: str) -> None:
    env = dist_env_from_environ()
    if strategy == "hybrid-shard":  # as two nodes of one process: shards of one rank, replicated twice
        env = replace(env, local_world_size=1)
    device = torch.device("cpu")
    init_process_group(env, device, timeout_s=300)
    torch.manual_seed(0)
    model = OpenVLA.from_config(preset_config("tiny"))
    model.train()
    collective = Collective()
    split = RowGroupSplit(action_only=[model.language_model.lm_head]) if step_impl == "one_pass" else None
    if env.distributed:
        shard_model(model, env, device, strategy, False)
        collective = FSDPCollective(model, env, device, strategy, split=split)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    constraint = RetentionConstraint(EpsilonSchedule("constant", end=1e-4), DualMultiplier(0.5, lr=100.0))
    accum = micro_per_step // env.world_size

    def act_fn(b):
        return lambda: model(b["pixel_values"], b["input_ids"], b["attention_mask"], labels=b["labels"]).loss

    def ret_fn(b):
        return lambda: ret_loss(model, model.hidden_states(b["pixel_values"], b["input_ids"], b["attention_mask"],
                                                           layer=-2), b)

    def step_micro_batches(s):
        return [micro_per_step * s + env.rank * accum + k for k in range(accum)]

    if split is not None:
        gs = step_micro_batches(0)
        report = compare_one_pass(model, params, split, collective, [act_fn(micro_batch(g, B, True)) for g in gs],
                                  [ret_fn(micro_batch(g, A, False)) for g in gs], [joint_fn(model, g) for g in gs])
        (out / f"compare_rank{env.rank}.json").write_text(json.dumps(report))
    rows = []
    for s in range(STEPS):
        gs = step_micro_batches(s)
        if split is not None:
            r = craft_step_one_pass(params, optimizer, constraint, [joint_fn(model, g) for g in gs], split,
                                    max_grad_norm=1.0, collective=collective)
        else:
            r = craft_step(params, optimizer, constraint, [act_fn(micro_batch(g, B, True)) for g in gs],
                           [ret_fn(micro_batch(g, A, False)) for g in gs], max_grad_norm=1.0, collective=collective)
        rows.append({"L_act": r.L_act, "L_ret": r.L_ret, "grad_dot": r.grad_dot, "grad_cos": r.grad_cos,
                     "projection": r.projection, "grad_norm": r.grad_norm, "lambda": constraint.lam,
                     "lambda_hex": constraint.lam.hex()})
    (out / f"rank{env.rank}.json").write_text(json.dumps(rows))
    weights = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if env.is_main:
        torch.save({k: v.detach().clone() for k, v in weights.items()}, out / "weights.pt")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    out_dir, step_impl, micro, strategy = sys.argv[1:] + ["", "two_pass", "2", "full-shard"][len(sys.argv) - 1:]
    main(Path(out_dir), step_impl, int(micro), strategy)
