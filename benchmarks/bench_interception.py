"""How much Python one-pass CRaFT's row split runs per joint micro-batch: `RowGroupSplit.__torch_function__`
calls (the TorchFunctionMode sees every torch call of the model while it is active) and the host CPU time of
one joint forward + backward, for LoRA and full fine-tuning, with and without activation checkpointing.

Builds the tiny model itself through `Objective.build` (no other benchmark module), so a copy of this file placed
in an older checkout's benchmarks/ measures that checkout's split.

    python benchmarks/bench_interception.py --out benchmarks/results/interception_tiny_cpu.json
"""

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import List, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_record, cpu_description, run_cli  # noqa: E402

import prismatic.models  # noqa: E402,F401  (torchvision guard before timm)
from craft.config import CraftConfig  # noqa: E402
from craft.one_pass import RowGroupSplit  # noqa: E402
from prismatic.models import OpenVLA, preset_config  # noqa: E402
from prismatic.models.lora import add_lora, lora_targets  # noqa: E402
from prismatic.training.distributed import DistEnv  # noqa: E402
from prismatic.training.objective import Objective  # noqa: E402


def _batches(batch: int, anchor_batch: int, text_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)

    def rows(n):
        ids = torch.randint(3, 31000, (n, text_len), generator=g)
        ids[:, 0] = 1
        return {"pixel_values": torch.randn(n, 6, 224, 224, generator=g), "input_ids": ids,
                "attention_mask": torch.ones_like(ids, dtype=torch.bool)}

    action, anchors = rows(batch), rows(anchor_batch)
    action["labels"] = action["input_ids"].clone()
    action["labels"][:, :-8] = -100
    anchors["target_features"] = torch.randn(anchor_batch, preset_config("tiny").llama_config().hidden_size,
                                             generator=g)
    return action, anchors


def measure(lora_rank: int, checkpointing: bool, args: argparse.Namespace) -> dict:
    torch.manual_seed(args.seed)
    model = OpenVLA.from_config(preset_config("tiny"))
    if lora_rank:
        model = add_lora(model, lora_rank, min(lora_rank, 16), 0.0, lora_targets(model, "all-linear"))
    if checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    objective = Objective.build(model, CraftConfig(step_impl="one_pass"), env=DistEnv(), device=torch.device("cpu"),
                                sharding_strategy="full-shard", autocast_dtype=None,
                                gradient_checkpointing=checkpointing, max_grad_norm=1.0)
    action, anchors = _batches(args.batch, args.anchor_batch, args.text_len, args.seed)
    split, calls = objective.split, [0]
    intercept = RowGroupSplit.__torch_function__

    def counted(self, *a, **k):
        calls[0] += 1
        return intercept(self, *a, **k)

    def joint_pass():
        joint = objective.joint(action, anchors)
        with split.rows(joint.n_action_rows, joint.rows):
            l_act, l_ret = joint()
            (l_act + l_ret).backward()
        split.take_ret(objective.params)
        for p in objective.params:
            p.grad = None

    RowGroupSplit.__torch_function__ = counted
    try:
        joint_pass()  # warm-up
        calls[0] = 0
        joint_pass()
        n_calls = calls[0]
    finally:
        RowGroupSplit.__torch_function__ = intercept
    times = []
    for _ in range(args.repeats):
        t0 = time.process_time()
        joint_pass()
        times.append(time.process_time() - t0)
    return {"lora_rank": lora_rank, "grad_checkpointing": checkpointing, "torch_function_calls": n_calls,
            "cpu_s_median": statistics.median(times), "cpu_s": times}


def run(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    rows = [measure(rank, ckpt, args) for rank in (args.lora_rank, 0) for ckpt in (False, True)]
    return base_record(device=cpu_description(), threads=args.threads, batch=args.batch,
                       anchor_batch=args.anchor_batch, text_len=args.text_len, repeats=args.repeats,
                       timing="process CPU time of one joint forward + backward (host work, not wall time)",
                       rows=rows)


def summary(r: dict) -> str:
    return "\n".join(f"{'LoRA r=' + str(row['lora_rank']) if row['lora_rank'] else 'full FT'}"
                     f"{', checkpointing' if row['grad_checkpointing'] else ''}: {row['torch_function_calls']} "
                     f"__torch_function__ calls, {row['cpu_s_median'] * 1e3:.1f} ms CPU per joint micro-batch"
                     for row in r["rows"])


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--anchor_batch", type=int, default=4)
    p.add_argument("--text_len", type=int, default=110, help="prompt tokens per row (the step benchmark's ~110)")
    p.add_argument("--lora_rank", type=int, default=32)
    p.add_argument("--repeats", type=int, default=9)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output file")
    args = p.parse_args(argv)
    if min(args.batch, args.anchor_batch, args.text_len, args.lora_rank, args.repeats, args.threads) < 1:
        p.error("--batch, --anchor_batch, --text_len, --lora_rank, --repeats and --threads must be >= 1")
    return args


if __name__ == "__main__":
    run_cli(parse_args, run, summary)
