"""Ways to compute CRaFT's three scalars <g_act, g_ret>, |g_act|^2, |g_ret|^2 over bf16 gradients.

Random bf16 gradients shaped like a preset's parameters (every parameter covered by both losses);
each way is timed (median after warm-up, device-synchronised) and compared with a float64 reference.

    python benchmarks/bench_grad_products.py --preset openvla-7b --device cuda \
        --out benchmarks/results/grad_products_openvla-7b_h200.json

Ways:
  implemented     craft.surgery.grad_products: on CUDA the fused kernel (craft.fused_surgery), one read of
                  both gradients for all three sums, float32 accumulation
  torch_path      the same function without the fused kernel: bf16 elementwise product summed with float32
                  accumulation, norms from `_foreach_norm(..., dtype=float32)`
  float32_copies  the first implementation: dot and norms of `.float()` copies of every tensor
  mm_out_float32  dot as a (1 x n) @ (n x 1) product with float32 output (`torch.mm(..., out_dtype=)`,
                  CUDA only): one read of each operand, products and sum in float32
  dot_bf16        torch.dot in bf16: float32 accumulation inside, each tensor's result rounded to bf16
(mm_out_float32 and dot_bf16 take the norms from `_foreach_norm(..., dtype=float32)`.)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from unittest import mock

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import base_record, median, write_json  # noqa: E402

import prismatic.models  # noqa: E402,F401  (torchvision guard before timm)
import torch  # noqa: E402

from craft import surgery  # noqa: E402
from craft.surgery import fused_kernels, grad_products  # noqa: E402
from prismatic.models import OpenVLA, PRESETS, preset_config  # noqa: E402


def _norms(g):
    return torch.stack(torch._foreach_norm(g, 2, dtype=torch.float32)).double().pow(2).sum()


def torch_path(a, r):
    with mock.patch.object(surgery, "_fused_for", lambda tensors: None):
        return grad_products(a, r)


def float32_copies(a, r):
    dot = torch.stack([torch.dot(x.reshape(-1).float(), y.reshape(-1).float()) for x, y in zip(a, r)])
    norms = [torch.stack(torch._foreach_norm([t.float() for t in g])).double().pow(2).sum() for g in (a, r)]
    return torch.stack([dot.double().sum(), *norms])


def mm_out_float32(a, r):
    dot = torch.stack([torch.mm(x.reshape(1, -1), y.reshape(-1, 1), out_dtype=torch.float32)[0, 0]
                       for x, y in zip(a, r)])
    return torch.stack([dot.double().sum(), _norms(a), _norms(r)])


def dot_bf16(a, r):
    dot = torch.stack([torch.dot(x.reshape(-1), y.reshape(-1)) for x, y in zip(a, r)])
    return torch.stack([dot.double().sum(), _norms(a), _norms(r)])


WAYS = {"implemented": grad_products, "torch_path": torch_path, "float32_copies": float32_copies,
        "mm_out_float32": mm_out_float32, "dot_bf16": dot_bf16}
# Bytes read + written per element pair (bf16 operands). The fused kernel reads both once (4 bytes); the
# others read both for the norms (4) plus: torch_path the product (read 4, write 2, read 2),
# float32_copies a copy per tensor for the dot and again for the norms (read 2 + write 4 + read 4, each),
# mm_out_float32 and dot_bf16 one more read of both (4).
BYTES_PER_ELEMENT = {"torch_path": 4 + 8, "float32_copies": 2 * 2 * (2 + 4 + 4), "mm_out_float32": 4 + 4,
                     "dot_bf16": 4 + 4}


def reference(a, r):
    out = torch.zeros(3, dtype=torch.float64)
    for x, y in zip(a, r):
        x, y = x.double(), y.double()
        out += torch.stack([(x * y).sum(), (x * x).sum(), (y * y).sum()]).cpu()
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--device", default="cpu")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = torch.device(args.device)
    fused = device.type == "cuda" and fused_kernels() is not None
    bytes_per_element = {**BYTES_PER_ELEMENT, "implemented": 4 if fused else BYTES_PER_ELEMENT["torch_path"]}
    with torch.device("meta"):
        shapes = [q.shape for q in OpenVLA.from_config(preset_config(args.preset)).parameters()]
    gen = torch.Generator(device=device).manual_seed(0)
    a = [torch.randn(s, device=device, generator=gen, dtype=torch.bfloat16) for s in shapes]
    r = [(0.1 * x + torch.randn(s, device=device, generator=gen, dtype=torch.bfloat16)) for x, s in zip(a, shapes)]
    numel = sum(x.numel() for x in a)
    ref = reference(a, r)
    cos_ref = (ref[0] / (ref[1] * ref[2]).sqrt()).item()
    ways = {}
    for name, fn in WAYS.items():
        try:
            times, out = [], None
            for i in range(args.warmup + args.repeats):
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                out = fn(a, r).cpu()  # .cpu() synchronises: the step needs the scalars on the host
                if i >= args.warmup:
                    times.append(time.perf_counter() - t0)
        except (RuntimeError, NotImplementedError) as err:
            ways[name] = {"error": str(err).splitlines()[0][:200]}
            print(f"{name:15s} not available here: {ways[name]['error']}", flush=True)
            continue
        t = median(times)
        rel = ((out - ref).abs() / ref.abs()).tolist()
        cos = (out[0] / (out[1] * out[2]).sqrt()).item()
        ways[name] = {"t_s": t, "times_s": times, "bytes": bytes_per_element[name] * numel,
                      "gbps": bytes_per_element[name] * numel / t / 1e9, "rel_err_dot": rel[0],
                      "rel_err_act_sq": rel[1], "rel_err_ret_sq": rel[2], "abs_err_cos": abs(cos - cos_ref)}
        print(f"{name:15s} {t * 1e3:8.2f} ms  {ways[name]['gbps']:7.1f} GB/s  dot rel err {rel[0]:.2e}  "
              f"norm rel err {max(rel[1:]):.2e}  cos abs err {abs(cos - cos_ref):.2e}", flush=True)
    record = base_record(device=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                         preset=args.preset, implemented_is_fused=fused, tensors=len(shapes), numel=numel, torch_version=torch.__version__,
                         reference=ref.tolist(), grad_cos_reference=cos_ref, ways=ways)
    write_json(args.out, record)
    return record


if __name__ == "__main__":
    main()
