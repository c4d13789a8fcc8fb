"""The fused surgery kernels against float64 references.

Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors (same kernel code, same
program table); with one they are compiled and run on CUDA tensors, and the dispatch in
craft.surgery is checked against the torch path too.
"""

import os

import numpy as np
import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # conftest.py sets it before Triton is imported
    pytest.skip("no CUDA and Triton's interpreter is off", allow_module_level=True)
fused = pytest.importorskip("craft.fused_surgery")

from craft.surgery import Surgery, combine_into_grads, grad_products  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
# Sizes around the per-program chunk, so that programs straddle tensor ends; one tiny, one empty.
SIZES = [fused.CHUNK + 1, 7, 2 * fused.CHUNK, fused.CHUNK - 3, 0, 3 * fused.CHUNK + 517]


def _tensors(seed, dtypes):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g).to(dtype).to(DEVICE) for n, dtype in zip(SIZES, dtypes)]


def _f64(ts):
    return np.concatenate([t.double().cpu().numpy().ravel() for t in ts])


@pytest.mark.parametrize("a_dtype,r_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
def test_products_match_float64(a_dtype, r_dtype):
    a = _tensors(0, [a_dtype] * len(SIZES))
    r = _tensors(1, [r_dtype] * len(SIZES))
    r[2] = (r[2].float() - 0.5 * a[2].float()).to(r_dtype)  # some correlation, so the dot is not ~0
    x, y = _f64(a), _f64(r)
    dot, aa, rr = fused.products(a, r).tolist()
    assert abs(dot - x @ y) <= 1e-6 * np.linalg.norm(x) * np.linalg.norm(y)
    assert aa == pytest.approx(x @ x, rel=1e-6)
    assert rr == pytest.approx(y @ y, rel=1e-6)


def test_products_mix_dtype_pairs_in_one_call():
    a = _tensors(2, [torch.float32, torch.bfloat16] * 3)
    r = _tensors(3, [torch.float32, torch.bfloat16] * 3)
    x, y = _f64(a), _f64(r)
    dot, aa, rr = fused.products(a, r).tolist()
    assert abs(dot - x @ y) <= 1e-6 * np.linalg.norm(x) * np.linalg.norm(y)
    assert (aa, rr) == (pytest.approx(x @ x, rel=1e-6), pytest.approx(y @ y, rel=1e-6))


@pytest.mark.skipif(not CUDA, reason="the dispatch to the kernels happens for CUDA tensors only")
def test_cuda_and_cpu_surgery_match_float64():
    """On CUDA the products come from the kernel (float32 products of the bf16 values), on CPU from the
    torch path (bf16 products, float32 sums): each is held to its own bound against float64, and each
    combined gradient to bf16's rounding of 0.5 (g_act + coef g_ret) with the coef its products gave."""
    shapes = [(4096, 1000), (4096,), (300, 77), (11,)]
    g = torch.Generator().manual_seed(6)
    act = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    ret = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    act[3], ret[1] = None, None
    x = _f64([a if a is not None else torch.zeros(s) for a, s in zip(act, shapes)])
    y = _f64([r if r is not None else torch.zeros(s) for r, s in zip(ret, shapes)])
    want = np.array([x @ y, x @ x, y @ y])
    scale = np.array([np.linalg.norm(x) * np.linalg.norm(y), x @ x, y @ y])
    for device, bound in (("cpu", 1e-3), ("cuda", 1e-6)):
        params = [torch.zeros(s, dtype=torch.bfloat16, device=device, requires_grad=True) for s in shapes]
        a = [None if t is None else t.to(device, copy=True) for t in act]  # combine works in place
        r = [None if t is None else t.to(device, copy=True) for t in ret]
        got = grad_products(a, r).double().cpu().numpy()
        assert np.all(np.abs(got - want) <= bound * scale), (device, got, want)
        coef = Surgery.decide(*got.tolist(), lam=0.3).ret_coef
        combine_into_grads(params, a, r, coef, scale=0.5)
        for p, ga, gr in zip(params, act, ret):  # float64 terms; two bf16 roundings (u = 2^-8) bound the error
            terms = [t.double() * c for t, c in ((ga, 0.5), (gr, 0.5 * coef)) if t is not None]
            exact = sum(terms)
            err = (p.grad.double().cpu() - exact).abs()
            assert torch.all(err <= 2 ** -7 * sum(t.abs() for t in terms) + 1e-30), (device, err.max())
