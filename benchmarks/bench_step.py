"""Time one training step, baseline vs CRaFT, on one model and the same synthetic batches.

    python benchmarks/bench_step.py --preset tiny --device cpu --batch 8 --anchor_batch 4 \
        --out benchmarks/results/step_tiny_cpu_b8_a4.json
    python benchmarks/bench_step.py --preset openvla-7b --device cuda --dtype bfloat16 --batch 32 \
        --anchor_batch 8 --grad_checkpointing true --out benchmarks/results/step_openvla-7b_h100_b32_a8_gc.json
    python -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/bench_step.py --preset tiny \
        --device cpu --batch 8 --anchor_batch 4 --out benchmarks/results/step_tiny_cpu_b8_a4_fsdp2.json

No dataset, no TensorFlow, no download: random uint8 images go through `ImageProcessor`, token ids are built
by `training_example` with the offline tiny tokenizer (its ids are OpenVLA's ids), and the weights are
random (built on the meta device, materialised with `to_empty` on the target device, then filled).

What is timed (median of `--repeats` after `--warmup`, device-synchronised; the kinds are interleaved
within each repeat so slow drifts of the machine hit all of them alike). Every step is the trainer's own
`prismatic.training.objective.Objective.step` (same losses, autocast, anchor-pass checkpointing, one-pass
split and collective as training; the action metrics it logs included):
  t_base_s      without a constraint (craft.step.baseline_step) on the action batch of B: forward +
                backward L_act, clipping.
  t_base_bpa_s  the same on an action batch of B + A samples (the first B are the batch above).
  t_craft_s     with a constraint (craft.step.craft_step): L_act on B, L_ret on A anchors (CraftConfig's
                defaults: hidden layer -2, mean_image_tokens, mse, against random targets), take_grads,
                grad_products, Surgery.decide, combine_into_grads, clipping. With --step_impl one_pass,
                craft.step.craft_step_one_pass on the joint batch [B action rows; A anchor rows].
  t_anchor_s    the anchor forward + backward alone.
  t_surgery_s   grad_products + Surgery.decide + clip_scale + combine_into_grads alone, on random tensors
                shaped like the real gradients: g_act where the action loss gives a gradient, g_ret where
                the anchor loss does (None elsewhere, as in the real step).
The optimizer update is left out of both steps (an optimizer stub whose step() does nothing, so the real
craft_step / baseline_step code runs): it is the same work for both and AdamW's state for 7B does not fit
one GPU. `--with_optimizer` times torch.optim.AdamW too (small presets).

lambda is held at 1 (lambda_lr 0) so combine_into_grads always does its add: with lambda 0 and no conflict it
would skip the add, and the step would be timed without it.

surgery_bytes: bytes read + written by grad_products and combine_into_grads, counted tensor by tensor from
their sizes and dtypes as craft/surgery.py implements them (fused products on CUDA, torch multi-tensor
operations otherwise; see surgery_traffic(): scalars are not counted); surgery_bandwidth_gbps =
surgery_bytes / t_surgery_s / 1e9. surgery_bytes_floor is the least traffic the same result needs (one
read of both gradients for the three products, one read-both/write-g_act pass for the clipped combination);
surgery_floor_equiv_gbps = surgery_bytes_floor / t_surgery_s / 1e9. grad_buffer_bytes is one action
gradient at the parameters' dtype (what the stash holds, unless --grad_stash_dtype casts it: stash_bytes).

Sharded (FSDP2): under torchrun with several ranks, or with `--fsdp true` on one process (a world of 1:
what FSDP itself costs on one GPU), the model is sharded as the trainer shards it (no mixed-precision policy:
it is already in --dtype) and the same step
functions run with its FSDPCollective, so the times include the all-gathers and reduce-scatters each step
needs and the one all-reduce CRaFT adds. Each rank draws its own batches (seed + rank), as data parallelism
does. A sharded step is done when its slowest rank is: ranks start each call together (barrier) and a call
counts its slowest rank's time and its largest rank's peak memory. The surgery alone runs on this rank's
gradient shards, with the all-reduce; byte counts are rank 0's (FSDP gives the first ranks the largest shards).

Peak memory: on cuda torch.cuda.max_memory_allocated (absolute, weights included), reset before each
measured call; on cpu the RSS high-water mark of the call minus the RSS before it (see common.PeakRSS;
garbage is collected and the heap trimmed before each call, so every call starts with cold CPU caches).
"""

from __future__ import annotations

import argparse
import math
import platform
import sys
import time
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import PeakRSS, base_record, cpu_description, median, release_host_memory, run_cli  # noqa: E402
from flops import pass_flops, peak_flops  # noqa: E402

import prismatic.models  # noqa: E402,F401  (before timm: installs the torchvision import guard)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import transformers  # noqa: E402
from torch.distributed.tensor import DTensor  # noqa: E402

from craft.config import CraftConfig  # noqa: E402
from craft.dual import DualMultiplier, EpsilonSchedule, RetentionConstraint  # noqa: E402
from craft.surgery import Surgery, clip_scale, combine_into_grads, fused_kernels, grad_products, local  # noqa: E402
from prismatic.models import ImageProcessor, OpenVLA, PRESETS, build_tiny_tokenizer, preset_config  # noqa: E402
from prismatic.models.lora import add_lora, lora_targets  # noqa: E402
from prismatic.training.distributed import (  # noqa: E402
    SHARDING_STRATEGIES, DistEnv, dist_env_from_environ, init_process_group, shard_model)
from prismatic.training.objective import Objective  # noqa: E402
from prismatic.models.action_tokenizer import ActionTokenizer  # noqa: E402
from prismatic.models.batching import PaddedCollator, prompt_ids, training_example  # noqa: E402
from prismatic.vla.libero_tasks import INSTRUCTIONS  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
MAX_GRAD_NORM = 1.0
DIST_TIMEOUT_S = 600  # a rank that fails mid-step leaves the others waiting in a collective this long at most

REQUIRED_KEYS = (
    "device", "preset", "batch", "anchor_batch", "dtype", "date", "torch_version", "transformers_version",
    "params", "trainable_params", "t_base_s", "t_base_bpa_s", "t_craft_s", "t_anchor_s", "t_surgery_s",
    "surgery_bytes", "surgery_bandwidth_gbps", "peak_mem_base_bytes", "peak_mem_craft_bytes", "mem_method",
    "floor_ratio", "ratio", "world_size", "sharded", "sharding_strategy",
)


def str2bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "y"):
        return True
    if s.lower() in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {s!r}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (several torchrun ranks: cuda:LOCAL_RANK)")
    p.add_argument("--batch", type=int, default=8, help="action batch B")
    p.add_argument("--anchor_batch", type=int, default=4, help="anchor batch A")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="parameter (and gradient) dtype; default: the preset's torch_dtype")
    p.add_argument("--autocast", choices=("none", "bfloat16"), default="none",
                   help="bfloat16: run forward passes under torch.autocast (the trainer's mixed precision)")
    p.add_argument("--grad_checkpointing", type=str2bool, default=False)
    p.add_argument("--anchor_checkpointing", type=str2bool, default=False,
                   help="with --grad_checkpointing: recompute the anchor pass too (craft's --craft.anchor_checkpointing)")
    p.add_argument("--with_optimizer", action="store_true", help="include an AdamW update in both steps")
    p.add_argument("--step_impl", choices=("two_pass", "one_pass"), default="two_pass",
                   help="the CRaFT step timed: craft_step (two_pass) or craft_step_one_pass")
    p.add_argument("--grad_stash_dtype", choices=("none", "float32", "bfloat16"), default="none",
                   help="dtype the action gradient is stashed in (craft's --craft.grad_stash_dtype)")
    p.add_argument("--lora_rank", type=int, default=0,
                   help="> 0: LoRA adapters (fp32) on every linear layer but lm_head, base frozen in --dtype "
                        "(the trainer's --vla.use_lora); the surgery then covers adapter gradients only")
    p.add_argument("--fsdp", type=str2bool, default=False,
                   help="true: shard with FSDP2 over a world of 1 (FSDP's own cost on one device); several "
                        "torchrun ranks always shard")
    p.add_argument("--keep_weights_gathered", type=str2bool, default=False,
                   help="when sharded, two_pass: the anchor pass reuses the action backward's gathered weights "
                        "(craft's --craft.keep_weights_gathered)")
    p.add_argument("--sharding_strategy", choices=SHARDING_STRATEGIES, default="full-shard",
                   help="when sharded (the trainer's --sharding_strategy)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for MFU (default: the dense bf16 peak of a known GPU, see "
                        "benchmarks/flops.py; none for other devices, and then no MFU)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="JSON output file")
    args = p.parse_args(argv)
    if args.batch < 1 or args.anchor_batch < 1 or args.repeats < 1 or args.warmup < 0 or args.lora_rank < 0:
        p.error("--batch, --anchor_batch and --repeats must be >= 1, --warmup and --lora_rank >= 0")
    if args.keep_weights_gathered and args.step_impl != "two_pass":
        p.error(f"--keep_weights_gathered applies only with --step_impl two_pass; found {args.step_impl}")
    if args.peak_tflops is not None and not (math.isfinite(args.peak_tflops) and args.peak_tflops > 0):
        p.error(f"--peak_tflops must be a positive number of TFLOP/s, got {args.peak_tflops}")
    return args


# ---------------------------------------------------------------------------------------------------- model


@torch.no_grad()
def init_random_(model: torch.nn.Module, seed: int, device: torch.device) -> None:
    """Weights N(0, 0.02), biases 0, norm weights 1, LayerScale 0.1: finite losses, nothing loaded."""
    gen = torch.Generator(device=device).manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            p.normal_(0.0, 0.02, generator=gen)
        elif name.endswith("bias"):
            p.zero_()
        elif name.endswith("gamma"):
            p.fill_(0.1)
        else:
            p.fill_(1.0)


def build_model(preset: str, device: torch.device, dtype: torch.dtype, seed: int) -> OpenVLA:
    config = preset_config(preset)
    with torch.device("meta"):
        model = OpenVLA.from_config(config)
    model.to(dtype)  # still on meta: no memory
    model.to_empty(device=device)
    init_random_(model, seed, device)
    llm = model.language_model.model  # RoPE frequencies are a computed buffer: rebuild it, in float32
    with torch.device(device):
        llm.rotary_emb = type(llm.rotary_emb)(config=llm.config)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise RuntimeError(f"tensors left on the meta device: {left}")
    return model


# ---------------------------------------------------------------------------------------------------- data


def synthetic_batches(config, batch: int, anchor_batch: int, seed: int):
    """Action batches of B and B+A samples (the first B shared) and an anchor batch of A prompts."""
    rng = np.random.default_rng(seed)
    tokenizer = build_tiny_tokenizer()
    processor = ImageProcessor(config)
    action_tokenizer = ActionTokenizer(n_bins=config.n_action_bins)
    collator = PaddedCollator(tokenizer.pad_token_id, config.llm_max_length)
    size = config.image_sizes[0]

    def samples(n):
        images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
        instructions = [INSTRUCTIONS[i] for i in rng.integers(0, len(INSTRUCTIONS), size=n)]
        actions = rng.uniform(-1.0, 1.0, size=(n, 7)).astype(np.float32)
        return images, instructions, actions

    def action_batch(images, instructions, actions):
        examples = [training_example(tokenizer, action_tokenizer, s, a) for s, a in zip(instructions, actions)]
        out = collator([ids for ids, _ in examples], [labels for _, labels in examples])
        out["pixel_values"] = processor(images)
        return out

    images, instructions, actions = samples(batch + anchor_batch)
    act = action_batch(images[:batch], instructions[:batch], actions[:batch])
    act_bpa = action_batch(images, instructions, actions)

    a_images, a_instructions, _ = samples(anchor_batch)
    anchors = collator([prompt_ids(tokenizer, s) for s in a_instructions])
    anchors["pixel_values"] = processor(a_images)
    anchors["target_features"] = torch.from_numpy(
        rng.standard_normal((anchor_batch, config.hidden_size)).astype(np.float32))
    return act, act_bpa, anchors


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------- timing


class NoOpOptimizer:
    """What craft_step / baseline_step need of an optimizer, with an update that does nothing."""

    def __init__(self, params):
        self.params = list(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        pass


class Meter:
    """Device-synchronised wall time and peak memory of one call. With a process group, every rank starts
    together and the call counts as long as its slowest rank and as large as its largest one: a sharded
    step is only done when every rank is."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.distributed = dist.is_initialized()
        self.rss = None if self.cuda else PeakRSS()
        if self.cuda:
            self.method = ("cuda: torch.cuda.max_memory_allocated, peak stats reset before each measured step "
                           "(absolute: includes weights)")
        else:
            self.method = self.rss.method + " (a delta: excludes the weights and everything alive before the step)"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            self.rss.start()
        self.sync()
        if self.distributed:
            dist.barrier()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        dt = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(self.device) if self.cuda else self.rss.stop()
        if self.distributed:
            worst = torch.tensor([dt, peak], dtype=torch.float64, device=self.device)
            dist.all_reduce(worst, op=dist.ReduceOp.MAX)
            dt, peak = worst.tolist()
        return dt, int(peak), out


def anchor_only(loss_fn) -> float:
    """What craft_step does for one anchor micro-batch: forward, backward, read the loss."""
    loss = loss_fn()
    loss.backward()
    return loss.item()


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def surgery_traffic(params, g_act, g_ret, ret_coef: float, scale: float, fused: bool) -> int:
    """Bytes read + written by grad_products and combine_into_grads as craft/surgery.py implements them.

    Products: fused (craft.fused_surgery, CUDA), a pair's three sums read both tensors once; torch path,
    a float32 pair's dot reads both operands and any other pair is multiplied elementwise (reads both,
    writes the product at the promoted dtype) and the product summed (read again), and each squared
    norm (`_foreach_norm`, float32 accumulation) reads its tensor once. A gradient only one loss
    produced has its norm read once either way. Combination (torch multi-tensor ops): the clip factor
    (when != 1) reads and writes g_act, then g_act += c g_ret reads both and writes g_act; a gradient
    only the anchor loss produced is scaled in place (read + write). For a stash in another dtype than
    the parameter (bf16 stash of fp32 gradients) the sum goes into g_ret: g_ret *= c (read + write),
    g_ret += scale g_act (read both, write g_ret). Scalars and per-program partial sums are not counted.
    """
    def nb(t):
        return t.numel() * t.element_size()

    total = 0
    for p, a, r in zip(params, g_act, g_ret):
        paired = a is not None and r is not None
        total += sum(nb(g) for g in (a, r) if g is not None)  # products (fused) or squared norms (torch)
        if paired and not fused:
            total += nb(a) + nb(r)  # the dot's own read
            if not (a.dtype == r.dtype == torch.float32):
                total += 2 * a.numel() * torch.promote_types(a.dtype, r.dtype).itemsize  # product out + in
        if a is not None and a.dtype != p.dtype:  # sum formed in g_ret (a zero g_ret is allocated if missing)
            out = r if r is not None else p
            total += 2 * nb(out) + (2 * nb(out) + nb(a))
            continue
        if a is not None and scale != 1.0:
            total += 2 * nb(a)
        if paired and ret_coef != 0.0:
            total += 2 * nb(a) + nb(r)
        elif a is None and r is not None:
            total += 2 * nb(r)
    return total


def surgery_traffic_floor(g_act, g_ret) -> int:
    """The least traffic the same result needs: one pass reading both gradients for all three products,
    one pass reading both and writing g_act for the (clipped) combination, at the storage dtype."""
    read_both = _nbytes(g_act) + _nbytes(g_ret)
    return 2 * read_both + _nbytes(g_act)


def prepare_model(args: argparse.Namespace, env: DistEnv, device: torch.device, dtype: torch.dtype,
                  lora_alpha: int, sharded: bool) -> Objective:
    """The random model in the trainer's order (adapters, checkpointing, train mode, shards), and the
    trainer's objective on it."""
    model = build_model(args.preset, device, dtype, args.seed)  # same seed on every rank: one model
    if args.lora_rank:
        model = add_lora(model, args.lora_rank, lora_alpha, 0.0, lora_targets(model, "all-linear"))
    if args.grad_checkpointing:
        model.gradient_checkpointing_enable()
    model.train()
    if sharded:  # the model is already in --dtype: no mixed-precision policy
        shard_model(model, env, device, args.sharding_strategy, mixed_precision=False)
    craft = CraftConfig(step_impl=args.step_impl, anchor_checkpointing=args.anchor_checkpointing,
                        keep_weights_gathered=args.keep_weights_gathered,
                        grad_stash_dtype=None if args.grad_stash_dtype == "none" else args.grad_stash_dtype)
    return Objective.build(model, craft, env=env, device=device, sharding_strategy=args.sharding_strategy,
                           autocast_dtype=torch.bfloat16 if args.autocast == "bfloat16" else None,
                           gradient_checkpointing=args.grad_checkpointing, max_grad_norm=MAX_GRAD_NORM)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_description()}, torch threads {torch.get_num_threads()}"


def run(args: argparse.Namespace) -> Optional[dict]:
    """The record on rank 0; None on the other ranks of a sharded run."""
    env = dist_env_from_environ()
    sharded = args.fsdp or env.distributed
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but torch.cuda.is_available() is False")
    if device.type == "cuda" and (env.distributed or device.index is None):
        device = torch.device("cuda", env.local_rank)  # a GPU per rank; an index, as torch.cuda.set_device needs
    if sharded:
        init_process_group(env, device, DIST_TIMEOUT_S, world_of_one=True)
    try:
        record = measure(args, env, device, sharded)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return record if env.is_main else None


def measure(args: argparse.Namespace, env: DistEnv, device: torch.device, sharded: bool) -> dict:
    """This rank's run; the Meter's collectives make its times and peaks those of the slowest, largest rank."""
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    config = preset_config(args.preset)
    dtype = DTYPES[args.dtype or config.torch_dtype]

    lora_alpha = min(args.lora_rank, 16)  # the trainer's default --vla.lora_alpha
    objective = prepare_model(args, env, device, dtype, lora_alpha, sharded)
    model, params, collective = objective.model, objective.params, objective.collective
    total_params = sum(p.numel() for p in model.parameters())

    act_cpu, bpa_cpu, anchors_cpu = synthetic_batches(config, args.batch, args.anchor_batch, args.seed + env.rank)
    act, bpa, anchors = (to_device(b, device) for b in (act_cpu, bpa_cpu, anchors_cpu))
    del act_cpu, bpa_cpu, anchors_cpu
    stash_dtype = objective.stash_dtype
    optimizer = torch.optim.AdamW(params, lr=1e-6) if args.with_optimizer else NoOpOptimizer(params)
    # lambda fixed at 1 so combine_into_grads always runs its add (see the module docstring).
    constraint = RetentionConstraint(EpsilonSchedule("constant", 0.05), DualMultiplier(1.0, 0.0))
    clear = NoOpOptimizer(params).zero_grad
    meter = Meter(device)
    last = {}

    def checked(result, kind):
        if result.skipped:
            raise RuntimeError(f"the {kind} step was skipped (non-finite loss or gradient): timing would be wrong")
        last[kind] = result
        return result

    def step(kind, constraint, batch, anchor_batches):
        return lambda: checked(objective.step(optimizer, constraint, [batch], anchor_batches)[0], kind)

    kinds = {
        "base": step("base", None, act, []),
        "base_bpa": step("base_bpa", None, bpa, []),
        "craft": step("craft", constraint, act, [anchors]),
        "anchor": lambda: anchor_only(objective.retention(anchors)),
    }
    times = {k: [] for k in kinds}
    peaks = {k: [] for k in kinds}
    for i in range(args.warmup + args.repeats):
        for kind, fn in kinds.items():
            clear()  # every step starts without gradients, as after the previous step's zero_grad
            dt, peak, _ = meter(fn)
            clear()
            if i >= args.warmup:
                times[kind].append(dt)
                peaks[kind].append(peak)

    # Model FLOPs, once, untimed (see flops.py). The CRaFT step's are the two passes' (one pass does the
    # same useful work); the surgery is memory-bound and not counted.
    flops_base = pass_flops(objective, objective.action, act, clear, args.grad_checkpointing)
    flops_anchor = pass_flops(objective, objective.retention, anchors, clear, args.grad_checkpointing)
    flops_craft = flops_base + flops_anchor
    peak = peak_flops(device_name(device), args.peak_tflops)

    # The surgery on its own, on random tensors covering exactly the parameters the two losses give
    # gradients to (the anchor loss never reaches lm_head, the last decoder layer or the final norm).
    covered = {}
    for kind, fn in (("act", objective.action(act)), ("ret", objective.retention(anchors))):
        fn().backward()
        covered[kind] = [p.grad is not None for p in params]
        clear()
    surgery_params = [p for p, a, r in zip(params, covered["act"], covered["ret"]) if a or r]
    release_host_memory()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    gen = torch.Generator(device=device).manual_seed(args.seed + 1)

    def random_like(p, has, dtype=None):
        """A random gradient laid out as `p.grad` is: sharded, this rank's shard wrapped as FSDP wraps it."""
        if not has:
            return None
        t = torch.randn(local(p).shape, dtype=dtype or p.dtype, device=device, generator=gen)
        if isinstance(p, DTensor):
            return DTensor.from_local(t, p.device_mesh, p.placements, run_check=False, shape=p.shape,
                                      stride=p.stride())
        return t

    g_act = [random_like(p, a, stash_dtype) for p, a, r in zip(params, covered["act"], covered["ret"]) if a or r]
    g_ret = [random_like(p, r) for p, a, r in zip(params, covered["act"], covered["ret"]) if a or r]
    decisions = []

    def surgery():  # craft_step's steps 3-6, minus the losses: products, all-reduce, decision, clip, combine
        stats = torch.cat([grad_products(g_act, g_ret).cpu(), torch.zeros(2, dtype=torch.float64)])
        dot, act_sq, ret_sq, _, _ = collective.reduce(stats).tolist()
        decided = Surgery.decide(dot, act_sq, ret_sq, constraint.lam)
        scale = clip_scale(decided.grad_sq, MAX_GRAD_NORM)
        combine_into_grads(surgery_params, g_act, g_ret, decided.ret_coef, scale)
        decisions.append((decided.ret_coef, scale))

    surgery_times = []
    for i in range(args.warmup + args.repeats):  # g_act changes every call but stays finite
        dt, _, _ = meter(surgery)
        clear()
        if i >= args.warmup:
            surgery_times.append(dt)
    ret_coef, scale = decisions[-1]
    # Bytes are this rank's: its shards when sharded. One gradient buffer: the action gradient at the
    # parameters' dtype; the stash is that, or its cast.
    grad_buffer_bytes = _nbytes(local(p) for p, has in zip(params, covered["act"]) if has)
    g_act, g_ret = ([None if g is None else local(g) for g in grads] for grads in (g_act, g_ret))
    stash_bytes = _nbytes(g_act)
    fused = device.type == "cuda" and fused_kernels() is not None
    surgery_bytes = surgery_traffic([local(p) for p in surgery_params], g_act, g_ret, ret_coef, scale, fused)
    surgery_bytes_floor = surgery_traffic_floor(g_act, g_ret)
    del g_act, g_ret

    t_base, t_bpa, t_craft = median(times["base"]), median(times["base_bpa"]), median(times["craft"])
    t_anchor, t_surgery = median(times["anchor"]), median(surgery_times)
    peak_base, peak_craft = max(peaks["base"]), max(peaks["craft"])
    craft_result = last["craft"]
    record = base_record(
        device=device_name(device),
        device_type=device.type,
        preset=args.preset,
        batch=args.batch,
        anchor_batch=args.anchor_batch,
        dtype=str(dtype).removeprefix("torch."),
        autocast=args.autocast,
        grad_checkpointing=args.grad_checkpointing,
        anchor_checkpointing=args.anchor_checkpointing,
        keep_weights_gathered=args.keep_weights_gathered,
        with_optimizer=args.with_optimizer,
        step_impl=args.step_impl,
        lora_rank=args.lora_rank,
        lora_alpha=lora_alpha if args.lora_rank else None,
        grad_stash_dtype=args.grad_stash_dtype,
        attn_implementation=getattr(model.language_model.config, "_attn_implementation", None),
        torch_version=torch.__version__,
        transformers_version=transformers.__version__,
        platform=platform.platform(),
        world_size=env.world_size,
        sharded=sharded,
        sharding_strategy=args.sharding_strategy if sharded else None,
        params=total_params,
        trainable_params=sum(p.numel() for p in params),
        grad_params=sum(p.numel() for p, has in zip(params, covered["act"]) if has),
        anchor_grad_params=sum(p.numel() for p, has in zip(params, covered["ret"]) if has),
        seq_len_action=int(act["input_ids"].shape[1]) + model.num_image_tokens,
        seq_len_anchor=int(anchors["input_ids"].shape[1]) + model.num_image_tokens,
        # What the two-pass anchor pass runs: BOS and the image only when pooling over image tokens
        # (craft.retention.anchor_features); one_pass keeps the anchor rows at the joint batch's length.
        anchor_pass_positions=model.image_token_slice.stop
        if args.step_impl == "two_pass" and objective.craft.pooling == "mean_image_tokens"
        else int(anchors["input_ids"].shape[1]) + model.num_image_tokens,
        warmup=args.warmup,
        repeats=args.repeats,
        t_base_s=t_base,
        t_base_bpa_s=t_bpa,
        t_craft_s=t_craft,
        t_anchor_s=t_anchor,
        t_surgery_s=t_surgery,
        ratio=t_craft / t_base,
        floor_ratio=t_bpa / t_base + t_surgery / t_base,
        grad_buffer_bytes=grad_buffer_bytes,
        stash_bytes=stash_bytes,
        surgery_bytes=surgery_bytes,
        surgery_fused=fused,
        surgery_bytes_counting="as craft/surgery.py implements it, see surgery_traffic() in bench_step.py"
                               + (", on rank 0's gradient shards" if sharded else ""),
        surgery_bandwidth_gbps=surgery_bytes / t_surgery / 1e9,
        surgery_bytes_floor=surgery_bytes_floor,
        surgery_floor_equiv_gbps=surgery_bytes_floor / t_surgery / 1e9,
        surgery_clip_applied=scale != 1.0,
        peak_mem_base_bytes=peak_base,
        peak_mem_base_bpa_bytes=max(peaks["base_bpa"]),
        peak_mem_craft_bytes=peak_craft,
        peak_mem_anchor_bytes=max(peaks["anchor"]),
        peak_mem_extra_bytes=peak_craft - peak_base,
        peak_mem_extra_over_grad_buffer=(peak_craft - peak_base) / grad_buffer_bytes,
        mem_method=meter.method,
        flops_base=flops_base,
        flops_anchor=flops_anchor,
        flops_craft=flops_craft,
        flops_counting="matrix products of one forward + backward, no recomputation (benchmarks/flops.py)"
                       + (", of this rank's batch" if sharded else ""),
        peak_flops=peak,
        mfu_base=flops_base / t_base / peak if peak else None,
        mfu_craft=flops_craft / t_craft / peak if peak else None,
        times_s={**{k: v for k, v in times.items()}, "surgery": surgery_times},
        last_craft_step={"L_act": craft_result.L_act, "L_ret": craft_result.L_ret, "lambda": craft_result.lam,
                         "grad_cos": craft_result.grad_cos, "projection": craft_result.projection,
                         "grad_norm": craft_result.grad_norm},
        lambda_note="lambda held at 1 (lambda_lr 0) so combine_into_grads always runs",
    )
    for key in ("t_base_s", "t_craft_s", "ratio", "floor_ratio"):
        if not (math.isfinite(record[key]) and record[key] > 0):
            raise RuntimeError(f"{key} = {record[key]}: not a usable measurement")
    return record


def summary(r: dict) -> str:
    mb = 1e6
    return (f"{r['preset']} on {r['device_type']} ({r['dtype']}) B={r['batch']} A={r['anchor_batch']}: "
            f"base {r['t_base_s']:.4f}s  craft {r['t_craft_s']:.4f}s  ratio {r['ratio']:.3f}  "
            f"floor {r['floor_ratio']:.3f}  (base B+A {r['t_base_bpa_s']:.4f}s, anchor {r['t_anchor_s']:.4f}s, "
            f"surgery {r['t_surgery_s'] * 1e3:.2f}ms = {r['surgery_bandwidth_gbps']:.1f} GB/s)  "
            f"peak mem base {r['peak_mem_base_bytes'] / mb:.0f} MB craft {r['peak_mem_craft_bytes'] / mb:.0f} MB"
            + (f"  MFU base {r['mfu_base']:.1%} craft {r['mfu_craft']:.1%}" if r["mfu_base"] is not None else ""))


def main(argv=None) -> Optional[dict]:
    return run_cli(parse_args, run, summary, argv)


if __name__ == "__main__":
    main()
