"""Run by torchrun from test_distributed.py: N CRaFT steps of the tiny model on deterministic micro-batches.

Micro-batch g of step s is the same data whatever the launch: a 1-rank run with accumulation 2
uses g = 2s + k, a 2-rank run uses g = 2s + rank. Writes per-step metrics and final weights.
"""

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

import prismatic  # noqa: F401  (torchvision guard before timm)
from craft.dual import DualMultiplier, EpsilonSchedule, RetentionConstraint
from craft.retention import pool_hidden, retention_loss
from craft.step import Collective, craft_step
from prismatic.models import OpenVLA, preset_config
from prismatic.training.distributed import FSDPCollective, dist_env_from_environ, init_process_group, shard_model
from prismatic.training.optim import build_optimizer

STEPS, MICRO_PER_STEP, B, A = 3, 2, 2, 2


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


def main(out: Path) -> None:
    env = dist_env_from_environ()
    device = torch.device("cpu")
    init_process_group(env, device, timeout_s=300)
    torch.manual_seed(0)
    model = OpenVLA.from_config(preset_config("tiny"))
    model.train()
    collective = Collective()
    if env.distributed:
        shard_model(model, env, device, "full-shard", False)
        collective = FSDPCollective(model, env, device, "full-shard")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.01)
    constraint = RetentionConstraint(EpsilonSchedule("constant", end=1e-4), DualMultiplier(0.5, lr=100.0))
    accum = MICRO_PER_STEP // env.world_size

    def act_fn(b):
        return lambda: model(b["pixel_values"], b["input_ids"], b["attention_mask"], labels=b["labels"]).loss

    def ret_fn(b):
        def fn():
            h = model.hidden_states(b["pixel_values"], b["input_ids"], b["attention_mask"], layer=-2)
            return retention_loss(pool_hidden(h, "mean_image_tokens", model.image_token_slice, b["attention_mask"]),
                                  b["target_features"], "mse")
        return fn

    rows = []
    for s in range(STEPS):
        gs = [MICRO_PER_STEP * s + env.rank * accum + k for k in range(accum)]
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
    main(Path(sys.argv[1]))
