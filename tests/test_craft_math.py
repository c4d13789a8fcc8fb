"""CRaFT's arithmetic against independent float64 references."""

import math

import numpy as np
import pytest
import torch

from craft.dual import DualMultiplier, EpsilonSchedule, RetentionConstraint
from craft.retention import pool_hidden, retention_loss
from craft.step import baseline_step, craft_step
from craft.surgery import Surgery, combine_into_grads, grad_products

SHAPES = [(3, 4), (5,), (2, 2, 3), (7,)]


def _grads(seed, missing=()):
    g = torch.Generator().manual_seed(seed)
    return [None if i in missing else torch.randn(s, generator=g) for i, s in enumerate(SHAPES)]


def _flat(grads):
    return np.concatenate([np.zeros(int(np.prod(s))) if t is None else t.double().numpy().ravel()
                           for t, s in zip(grads, SHAPES)])


def _reference(a, r, lam):
    """The spec's formulas on flat float64 vectors."""
    dot = a @ r
    if r @ r > 0 and dot < 0:
        a = a - dot / (r @ r) * r
    return a + lam * r


def _apply(g_act, g_ret, lam):
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    dot, act_sq, ret_sq = grad_products(g_act, g_ret).tolist()
    surgery = Surgery.decide(dot, act_sq, ret_sq, lam)
    combine_into_grads(params, [None if x is None else x.clone() for x in g_act],
                       [None if x is None else x.clone() for x in g_ret], surgery.ret_coef)
    return surgery, [p.grad for p in params]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_combination_matches_float64_reference(seed, lam):
    g_act, g_ret = _grads(seed, missing={1}), _grads(100 + seed, missing={3})
    a, r = _flat(g_act), _flat(g_ret)
    surgery, out = _apply(g_act, g_ret, lam)
    assert surgery.grad_dot == pytest.approx(a @ r, rel=1e-5, abs=1e-6)
    assert surgery.grad_cos == pytest.approx((a @ r) / np.linalg.norm(a) / np.linalg.norm(r), rel=1e-5)
    assert surgery.projection == bool(a @ r < 0)
    np.testing.assert_allclose(_flat(out), _reference(a, r, lam), rtol=1e-5, atol=1e-6)


def test_projection_makes_action_gradient_orthogonal_exactly_when_conflicting():
    seen = set()
    for seed in range(20):
        g_act, g_ret = _grads(seed), _grads(50 + seed)
        a, r = _flat(g_act), _flat(g_ret)
        surgery, out = _apply(g_act, g_ret, lam=0.0)
        g = _flat(out)
        if a @ r < 0:
            assert abs(g @ r) < 1e-5 * np.linalg.norm(a) * np.linalg.norm(r)
        else:
            np.testing.assert_allclose(g, a, rtol=1e-6)  # untouched when there is no conflict
        seen.add(surgery.projection)
    assert seen == {True, False}


def test_zero_retention_gradient_means_no_projection_and_zero_cos():
    g_act = _grads(1)
    g_ret = [torch.zeros(s) for s in SHAPES]
    surgery, out = _apply(g_act, g_ret, lam=0.3)
    assert (surgery.projection, surgery.grad_cos, surgery.grad_dot) == (False, 0.0, 0.0)
    np.testing.assert_allclose(_flat(out), _flat(g_act), rtol=1e-6)


def test_products_accumulate_bf16_gradients_in_float32():
    a = [torch.full((4096,), 1.0 + 2**-7, dtype=torch.bfloat16)]
    r = [torch.full((4096,), 1.0, dtype=torch.bfloat16)]
    dot, act_sq, ret_sq = grad_products(a, r).tolist()
    assert dot == pytest.approx(4096 * (1 + 2**-7), rel=1e-6)
    assert act_sq == pytest.approx(4096 * (1 + 2**-7) ** 2, rel=1e-5)
    assert ret_sq == 4096.0


def test_lambda_stays_zero_under_budget_and_grows_at_its_rate_over_it():
    c = RetentionConstraint(EpsilonSchedule("constant", end=0.05), DualMultiplier(0.0, lr=0.1))
    for _ in range(5):
        c.update(0.01)
    assert c.lam == 0.0
    for k in range(1, 4):
        c.update(0.25)
        assert c.lam == pytest.approx(k * 0.1 * 0.20)
    c.update(0.05 - 10.0)  # far under budget: projected back to 0, never negative
    assert c.lam == 0.0
    assert c.step == 9


def test_lambda_update_uses_this_steps_epsilon_then_advances_schedule():
    c = RetentionConstraint(EpsilonSchedule("linear", end=0.0, start=1.0, steps=4), DualMultiplier(0.0, 1.0))
    c.update(2.0)  # eps(0) = 1.0
    assert c.lam == pytest.approx(1.0)
    assert c.epsilon == pytest.approx(0.75)
    c.update(2.0)  # eps(1) = 0.75
    assert c.lam == pytest.approx(2.25)


@pytest.mark.parametrize("kind,mid", [("constant", 0.1), ("linear", 0.55), ("cosine", 0.55)])
def test_epsilon_schedules(kind, mid):
    s = EpsilonSchedule(kind, end=0.1, start=1.0, steps=100)
    assert s(50) == pytest.approx(mid)
    assert s(100) == pytest.approx(0.1) and s(10_000) == pytest.approx(0.1)
    if kind != "constant":
        assert s(0) == pytest.approx(1.0)
    if kind == "cosine":
        assert s(25) == pytest.approx(0.1 + 0.9 * (0.5 + 0.5 * math.cos(math.pi * 0.25)))


def _linear_problem():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2))
    b = torch.nn.Parameter(torch.randn(2))
    x_act, y_act = torch.randn(8, 3), torch.randn(8, 2)
    x_ret, y_ret = torch.randn(4, 3), torch.randn(4, 2)
    return [w, b], (x_act, y_act), (x_ret, y_ret)


def _mse(params, x, y):
    return ((x @ params[0] + params[1] - y) ** 2).mean()


def test_craft_step_end_to_end_against_float64_autograd():
    params, (xa, ya), (xr, yr) = _linear_problem()
    p64 = [p.detach().double().requires_grad_() for p in params]
    ga = torch.autograd.grad(_mse(p64, xa.double(), ya.double()), p64)
    gr = torch.autograd.grad(_mse(p64, xr.double(), yr.double()), p64)
    a = torch.cat([g.reshape(-1) for g in ga]).numpy()
    r = torch.cat([g.reshape(-1) for g in gr]).numpy()
    lam, lr = 0.5, 0.1
    expected = torch.cat([p.reshape(-1) for p in p64]).detach().numpy() - lr * _reference(a, r, lam)

    opt = torch.optim.SGD(params, lr=lr)
    c = RetentionConstraint(EpsilonSchedule("constant", end=0.01), DualMultiplier(lam, lr=2.0))
    # two action micro-batches of 4 must give the gradient of the mean over all 8
    act = [lambda: _mse(params, xa[:4], ya[:4]), lambda: _mse(params, xa[4:], ya[4:])]
    res = craft_step(params, opt, c, act, [lambda: _mse(params, xr, yr)], max_grad_norm=1e9)
    got = torch.cat([p.detach().reshape(-1) for p in params]).double().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert res.grad_dot == pytest.approx(a @ r, rel=1e-5)
    assert res.projection == bool(a @ r < 0)
    assert res.lam == lam and res.epsilon == 0.01
    assert c.lam == pytest.approx(lam + 2.0 * (res.L_ret - 0.01))


def test_non_finite_loss_skips_the_step_and_touches_nothing():
    params, (xa, ya), (xr, yr) = _linear_problem()
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=0.1)
    c = RetentionConstraint(EpsilonSchedule("constant", end=0.01), DualMultiplier(0.2, lr=1.0))
    res = craft_step(params, opt, c, [lambda: _mse(params, xa, ya) * float("nan")],
                     [lambda: _mse(params, xr, yr)], max_grad_norm=1.0)
    assert res.skipped and c.lam == 0.2 and c.step == 0
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert not opt.state and all(p.grad is None for p in params)
    res = baseline_step(params, opt, [lambda: _mse(params, xa, ya) + float("inf")], 1.0)
    assert res.skipped and all(torch.equal(p, q) for p, q in zip(params, before))


def test_baseline_step_is_plain_clipped_sgd():
    params, (xa, ya), _ = _linear_problem()
    p0 = [p.detach().clone() for p in params]
    g = torch.autograd.grad(_mse(params, xa, ya), params)
    norm = torch.cat([x.reshape(-1) for x in g]).norm()
    res = baseline_step(params, torch.optim.SGD(params, lr=1.0), [lambda: _mse(params, xa, ya)], 0.5)
    assert res.grad_norm == pytest.approx(norm.item(), rel=1e-6)
    for p, q, gi in zip(params, p0, g):
        torch.testing.assert_close(p.detach(), q - gi * (0.5 / norm.item()), rtol=1e-5, atol=1e-6)


def test_pooling_and_losses_by_hand():
    hidden = torch.arange(2 * 6 * 2, dtype=torch.float32).reshape(2, 6, 2)
    text_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])  # image tokens inserted at positions 1..2
    image = slice(1, 3)
    torch.testing.assert_close(pool_hidden(hidden, "mean_image_tokens", image, text_mask),
                               hidden[:, 1:3].mean(1))
    # row 0 is valid at 0,1,2,3,4; row 1 at 0,1,2,3
    torch.testing.assert_close(pool_hidden(hidden, "mean_all_tokens", image, text_mask),
                               torch.stack([hidden[0, :5].mean(0), hidden[1, :4].mean(0)]))
    torch.testing.assert_close(pool_hidden(hidden, "last_token", image, text_mask),
                               torch.stack([hidden[0, 4], hidden[1, 3]]))
    f = torch.tensor([[1.0, 0.0], [3.0, 4.0]])
    t = torch.tensor([[0.0, 1.0], [3.0, 4.0]])
    assert retention_loss(f, t, "mse").item() == pytest.approx((1 + 1 + 0 + 0) / 4)
    assert retention_loss(f, t, "cosine").item() == pytest.approx((1.0 + 0.0) / 2)


def test_bfloat16_stash_gives_the_combination_to_bfloat16_accuracy_in_float32_grads():
    g_act, g_ret = _grads(7), _grads(8, missing={2})
    lam = 0.4
    a = _flat([None if x is None else x.bfloat16().float() for x in g_act])  # what the stash keeps
    r = _flat(g_ret)
    params = [torch.zeros(s, requires_grad=True) for s in SHAPES]
    stash = [None if x is None else x.bfloat16() for x in g_act]
    dot, act_sq, ret_sq = grad_products(stash, g_ret).tolist()
    assert dot == pytest.approx(a @ r, rel=1e-5)
    surgery = Surgery.decide(dot, act_sq, ret_sq, lam)
    combine_into_grads(params, stash, [None if x is None else x.clone() for x in g_ret], surgery.ret_coef, scale=0.5)
    assert all(p.grad.dtype == torch.float32 for p in params)
    np.testing.assert_allclose(_flat([p.grad for p in params]), 0.5 * _reference(a, r, lam), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", range(3))
def test_products_of_bfloat16_gradients_accumulate_in_float32(seed):
    """Large bf16 tensors: a bf16 accumulator would be off by percents; float32 accumulation of products
    rounded to bf16 is off by far less than one bf16 rounding (4e-3) of the result."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(300, 1000), (1000,), (4, 50_000)]
    g_act = [torch.randn(s, generator=g).bfloat16() for s in shapes]
    g_ret = [(0.3 * a.float() + torch.randn(a.shape, generator=g)).bfloat16() for a in g_act]
    g_act[1] = None
    a = np.concatenate([np.zeros(1000) if t is None else t.double().numpy().ravel() for t in g_act])
    r = np.concatenate([t.double().numpy().ravel() for t in g_ret])
    dot, act_sq, ret_sq = grad_products(g_act, g_ret).tolist()
    scale = np.linalg.norm(a) * np.linalg.norm(r)
    assert abs(dot - a @ r) <= 1e-4 * scale
    assert act_sq == pytest.approx(a @ a, rel=1e-4)  # torch's own float32 norm of 3e5 elements: ~1e-5
    assert ret_sq == pytest.approx(r @ r, rel=1e-4)
