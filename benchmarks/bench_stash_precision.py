"""Accuracy cost of a bfloat16 stash of the action gradient (`--craft.grad_stash_dtype bfloat16`).

Real gradients of L_act and L_ret of the tiny model on synthetic batches (several seeds): grad_dot,
grad_cos and the combined gradient computed from a float32 stash and from a bfloat16 stash.

    python benchmarks/bench_stash_precision.py --seeds 5 --out benchmarks/results/stash_precision_tiny_cpu.json
"""

import argparse
import json
import platform
import time

import torch

import prismatic.models  # noqa: F401  (torchvision guard before timm)
from craft.retention import pool_hidden, retention_loss
from craft.surgery import Surgery, combine_into_grads, grad_products, take_grads
from prismatic.models import OpenVLA, preset_config


def gradients(seed: int, batch: int = 4, anchors: int = 4):
    torch.manual_seed(seed)
    model = OpenVLA.from_config(preset_config("tiny")).train()
    params = [p for p in model.parameters() if p.requires_grad]
    ids = torch.randint(3, 3000, (batch + anchors, 12))
    ids[:, 0] = 1
    mask = torch.ones_like(ids, dtype=torch.bool)
    labels = ids[:batch].clone()
    labels[:, :4] = -100
    pv = torch.randn(batch + anchors, 6, 224, 224)
    model(pv[:batch], ids[:batch], mask[:batch], labels=labels).loss.backward()
    g_act = take_grads(params)
    hidden = model.hidden_states(pv[batch:], ids[batch:], mask[batch:], layers=(-2,))[0]
    target = torch.randn(anchors, hidden.shape[-1])
    retention_loss(pool_hidden(hidden, "mean_image_tokens", model.image_token_slice, mask[batch:]), target,
                   "mse").backward()
    return params, g_act, take_grads(params)


def combined(params, g_act, g_ret, lam):
    dot, act_sq, ret_sq = grad_products(g_act, g_ret).tolist()
    surgery = Surgery.decide(dot, act_sq, ret_sq, lam)
    combine_into_grads(params, g_act, [None if r is None else r.clone() for r in g_ret], surgery.ret_coef)
    flat = torch.cat([p.grad.reshape(-1).double() for p in params if p.grad is not None])
    for p in params:
        p.grad = None
    return surgery, flat


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--lam", type=float, default=0.5)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = []
    for seed in range(args.seeds):
        params, g_act, g_ret = gradients(seed)
        ref, g_ref = combined(params, [None if a is None else a.clone() for a in g_act], g_ret, args.lam)
        low, g_low = combined(params, [None if a is None else a.bfloat16() for a in g_act], g_ret, args.lam)
        rows.append({
            "seed": seed,
            "grad_dot_fp32": ref.grad_dot,
            "grad_dot_rel_err": abs(low.grad_dot - ref.grad_dot) / max(abs(ref.grad_dot), 1e-30),
            "grad_cos_abs_err": abs(low.grad_cos - ref.grad_cos),
            "projection_agrees": low.projection == ref.projection,
            "combined_rel_err": ((g_low - g_ref).norm() / g_ref.norm()).item(),
        })
    result = {
        "benchmark": "stash_precision", "preset": "tiny", "device": f"cpu ({platform.processor() or platform.machine()})",
        "date": time.strftime("%Y-%m-%d"), "lam": args.lam, "rows": rows,
        "max_grad_dot_rel_err": max(r["grad_dot_rel_err"] for r in rows),
        "max_grad_cos_abs_err": max(r["grad_cos_abs_err"] for r in rows),
        "max_combined_rel_err": max(r["combined_rel_err"] for r in rows),
        "projection_agreement": sum(r["projection_agrees"] for r in rows) / len(rows),
    }
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
