"""The dual update rules against hand-computed sequences; their state across resume and ranks; the no-projection
ablation of the CRaFT step."""

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from craft.config import CraftConfig, CraftConfigError
from craft.dual import DualMultiplier, EpsilonSchedule, NuPIMultiplier, RetentionConstraint
from craft.one_pass import RowGroupSplit
from craft.step import craft_step, craft_step_one_pass
from craft.surgery import Surgery

# epsilon 0.5 throughout; the absolute violations e = L_ret - 0.5 are 0.25, 0.5, -0.5, -0.25, 1.0, 0.0.
L_RET = [0.75, 1.0, 0.0, 0.25, 1.5, 0.5]


def _cfg(**changes) -> CraftConfig:
    return replace(CraftConfig(anchor_cache_dir=Path("cache"), epsilon=0.5), **changes)


def _lambdas(constraint: RetentionConstraint, l_rets) -> list:
    out = []
    for l_ret in l_rets:
        constraint.update(l_ret)
        out.append(constraint.lam)
    return out


# Written out by hand (all values are exact binary fractions).
# gradient ascent, lr 1:              lambda = 0 + e, clipped at 0:    0.25, 0.75, 0.25, 0, 1, 1
# gradient ascent, lr 1, lambda_max 0.6:                                0.25, 0.6, 0.1, 0, 0.6, 0.6
# gradient ascent, relative (e / 0.5):                                  0.5, 1.5, 0.5, 0, 2, 2
# nuPI ki 1, kp 2, nu 0.5, xi_{-1} = 0:
#   xi      = 0.125, 0.3125, -0.09375, -0.171875, 0.4140625, 0.20703125
#   lambda  = 0 + 0.25 + 2 (0.125)                   = 0.5
#             0.5 + 0.5 + 2 (0.1875)                 = 1.375
#             1.375 - 0.5 + 2 (-0.40625)             = 0.0625
#             0.0625 - 0.25 + 2 (-0.078125) = -0.34375 -> 0
#             0 + 1 + 2 (0.5859375)                  = 2.171875
#             2.171875 + 0 + 2 (-0.20703125)         = 1.7578125
# the same with lambda_max 1: 0.5, 1.375 -> 1, 1 - 0.5 - 0.8125 -> 0, 0 -> 0, 2.171875 -> 1, 1 - 0.4140625
@pytest.mark.parametrize("changes,expected", [
    ({"lambda_lr": 1.0}, [0.25, 0.75, 0.25, 0.0, 1.0, 1.0]),
    ({"lambda_lr": 1.0, "lambda_max": 0.6}, [0.25, 0.6, 0.1, 0.0, 0.6, 0.6]),
    ({"lambda_lr": 1.0, "violation": "relative"}, [0.5, 1.5, 0.5, 0.0, 2.0, 2.0]),
    ({"lambda_lr": 1.0, "dual_update": "pi"}, [0.25, 0.75, 0.25, 0.0, 1.0, 1.0]),  # kp 0: gradient ascent
    ({"lambda_lr": 1.0, "dual_update": "pi", "lambda_kp": 2.0, "violation_ema": 0.5},
     [0.5, 1.375, 0.0625, 0.0, 2.171875, 1.7578125]),
    ({"lambda_lr": 1.0, "dual_update": "pi", "lambda_kp": 2.0, "violation_ema": 0.5, "lambda_max": 1.0},
     [0.5, 1.0, 0.0, 0.0, 1.0, 0.5859375]),
])
def test_update_rules_follow_hand_computed_sequences(changes, expected):
    constraint = RetentionConstraint.from_config(_cfg(**changes), total_steps=100)
    assert _lambdas(constraint, L_RET) == pytest.approx(expected, rel=1e-12, abs=1e-15)
    assert constraint.step == len(L_RET)


def test_nupi_without_projection_is_lambda0_plus_integral_plus_proportional():
    """Closed form of the recursion when lambda never reaches 0: lambda_0 + ki sum(e) + kp xi_t (float64)."""
    ki, kp, nu, lam0 = 0.3, 1.7, 0.8, 5.0
    m = NuPIMultiplier(lam0, ki=ki, kp=kp, nu=nu)
    errors = [0.4, -0.1, 0.9, -0.6, 0.2, 0.05]
    xi = 0.0
    for t, e in enumerate(errors):
        xi = nu * xi + (1 - nu) * e
        assert m.update(e) == pytest.approx(lam0 + ki * sum(errors[: t + 1]) + kp * xi, rel=1e-12)


def test_relative_violation_is_scale_free():
    """(L_ret, epsilon) x 1000 leaves the relative lambda sequence unchanged, and changes the absolute one."""
    for dual in ({}, {"dual_update": "pi", "lambda_kp": 0.5, "violation_ema": 0.9}):
        runs = {}
        for violation in ("relative", "absolute"):
            for scale in (1.0, 1000.0):
                cfg = _cfg(lambda_lr=0.1, violation=violation, epsilon=0.5 * scale, **dual)
                runs[violation, scale] = _lambdas(RetentionConstraint.from_config(cfg, 100),
                                                  [v * scale for v in L_RET])
        assert runs["relative", 1.0] == pytest.approx(runs["relative", 1000.0], rel=1e-12, abs=1e-15)
        assert runs["absolute", 1000.0] != pytest.approx(runs["absolute", 1.0], rel=1e-3)


RULES = [
    {},  # today's default: gradient ascent on the absolute violation
    {"lambda_lr": 0.7, "lambda_max": 0.9, "violation": "relative"},
    {"dual_update": "pi", "lambda_lr": 0.3, "lambda_kp": 1.5, "violation_ema": 0.6, "lambda_init": 0.2},
    {"dual_update": "pi", "lambda_lr": 0.3, "lambda_kp": 1.5, "violation": "relative", "lambda_max": 2.0,
     "epsilon_schedule": "linear", "epsilon_start": 1.0},
]


@pytest.mark.parametrize("changes", RULES)
def test_resume_in_the_middle_continues_the_uninterrupted_sequence(changes):
    cfg = _cfg(**changes)
    whole = RetentionConstraint.from_config(cfg, total_steps=6)
    expected = _lambdas(whole, L_RET)

    first = RetentionConstraint.from_config(cfg, total_steps=6)
    got = _lambdas(first, L_RET[:3])
    saved = json.loads(json.dumps(first.state_dict()))  # the trainer keeps it in trainer_state.json
    resumed = RetentionConstraint.from_config(cfg, total_steps=6)
    resumed.load_state_dict(saved)
    got += _lambdas(resumed, L_RET[3:])
    assert got == expected  # bit for bit
    assert resumed.state_dict() == whole.state_dict()


def test_old_state_dict_loads_into_every_rule():
    old = {"lambda": 0.75, "step": 5}
    ascent = RetentionConstraint.from_config(_cfg(lambda_lr=1.0), 100)
    ascent.load_state_dict(old)
    assert (ascent.lam, ascent.step) == (0.75, 5)
    pi = RetentionConstraint.from_config(_cfg(dual_update="pi", lambda_lr=1.0, lambda_kp=2.0, violation_ema=0.5), 100)
    pi.load_state_dict(old)
    assert (pi.lam, pi.step, pi.multiplier.xi) == (0.75, 5, 0.0)
    pi.update(0.75)  # e = 0.25, xi = 0.125: 0.75 + 0.25 + 2 * 0.125
    assert pi.lam == 1.25 and pi.state_dict() == {"lambda": 1.25, "step": 6, "xi": 0.125}


def test_next_step_sets_the_schedule_position_after_the_update():
    # epsilon(s) = 1 - s / 10
    c = RetentionConstraint(EpsilonSchedule("linear", end=0.0, start=1.0, steps=10), DualMultiplier(0.0, lr=1.0))
    c.update(1.5, next_step=4)  # against epsilon(0) = 1: lambda 0.5, then the schedule jumps to 4
    assert c.lam == 0.5 and c.step == 4 and c.epsilon == pytest.approx(0.6)
    c.update(1.5, next_step=8)  # against epsilon(4) = 0.6
    assert c.lam == pytest.approx(1.4) and c.step == 8
    c.update(0.0)  # against epsilon(8) = 0.2; without next_step the position advances by one
    assert c.lam == pytest.approx(1.2) and c.step == 9


def _rank_worker(rank: int, world: int, init_file: str, local_l_ret: list, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    constraint = RetentionConstraint.from_config(_cfg(**RULES[3]), total_steps=6)
    states = []
    for values in local_l_ret:
        mean = torch.tensor([values[rank]], dtype=torch.float64)
        dist.all_reduce(mean)  # as the step's collective: sum over ranks, then / world size
        constraint.update(mean.item() / world)
        states.append(constraint.state_dict())
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(states))
    dist.destroy_process_group()


def test_two_ranks_hold_the_state_of_one_process_on_the_averaged_l_ret(tmp_path):
    per_rank = [[v + 0.3, v - 0.1] for v in L_RET]  # each rank its own local L_ret
    mp.spawn(_rank_worker, args=(2, str(tmp_path / "rendezvous"), per_rank, str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    single = RetentionConstraint.from_config(_cfg(**RULES[3]), total_steps=6)
    expected = []
    for a, b in per_rank:
        single.update((a + b) / 2)
        expected.append(single.state_dict())
    assert ranks[0] == ranks[1] == expected
    assert {s["xi"] for s in expected} != {0.0}  # the nuPI state really moved


@pytest.mark.parametrize("changes,fragments", [
    ({"dual_update": "adam"}, ["--craft.dual_update", "'gradient_ascent', 'pi'", "'adam'"]),
    ({"violation": "ratio"}, ["--craft.violation", "'absolute', 'relative'", "'ratio'"]),
    ({"dual_update": "pi", "lambda_kp": -1.0}, ["--craft.lambda_kp must be >= 0", "-1.0"]),
    ({"dual_update": "pi", "violation_ema": 1.0}, ["--craft.violation_ema must be in [0, 1)", "1.0"]),
    ({"dual_update": "pi", "violation_ema": -0.1}, ["--craft.violation_ema", "-0.1"]),
    ({"lambda_kp": 0.5}, ["--craft.lambda_kp applies only with --craft.dual_update pi",
                          "--craft.lambda_kp 0.5 with --craft.dual_update gradient_ascent"]),
    ({"violation_ema": 0.9}, ["--craft.violation_ema applies only with --craft.dual_update pi", "0.9"]),
    ({"lambda_max": 0.0}, ["--craft.lambda_max must be > 0", "0.0"]),
    ({"lambda_init": 2.0, "lambda_max": 1.0}, ["--craft.lambda_init must be <= --craft.lambda_max", "2.0 > 1.0"]),
    ({"retention_interval": 0}, ["--craft.retention_interval must be >= 1", "0"]),
    ({"step_impl": "one_pass", "keep_weights_gathered": True},
     ["--craft.keep_weights_gathered applies only with --craft.step_impl two_pass", "one_pass"]),
])
def test_config_rejects_bad_dual_flags(changes, fragments):
    with pytest.raises(CraftConfigError) as err:
        _cfg(**changes).validate()
    assert all(f in str(err.value) for f in fragments), str(err.value)


def test_config_defaults_keep_todays_rule_and_accept_the_new_ones():
    cfg = _cfg()
    defaults = (cfg.dual_update, cfg.violation, cfg.lambda_lr, cfg.lambda_max)
    assert defaults == ("gradient_ascent", "absolute", 1e-4, None)
    assert cfg.retention_interval == 1 and cfg.conflict_projection
    cfg.validate()
    _cfg(dual_update="pi", violation="relative", lambda_kp=3.0, violation_ema=0.99, lambda_max=10.0,
         retention_interval=4, conflict_projection=False).validate()
    c = RetentionConstraint.from_config(cfg, 100)
    assert isinstance(c.multiplier, DualMultiplier) and c.multiplier.lr == 1e-4 and not c.relative


# g_act = a = (1, -2), g_ret = r = (0, 1): <a, r> = -2 < 0, |a|^2 = 5, |r|^2 = 1, lambda = 0.5.
# projected:   g = a - (-2 / 1) r + 0.5 r = (1, 0.5)
# not:         g = a + 0.5 r               = (1, -1.5)
W0 = [0.25, 0.75]
EXPECTED = {True: ([1.0, 0.5], True), False: ([1.0, -1.5], False)}


def test_surgery_decides_the_lambda_only_combination():
    for project, (g, projected) in EXPECTED.items():
        s = Surgery.decide(-2.0, 5.0, 1.0, 0.5, project=project)
        assert s.projection is projected and s.grad_dot == -2.0 and s.grad_cos == pytest.approx(-2 / math.sqrt(5))
        assert s.ret_coef == g[1] + 2.0  # g = a + coef r, with a_2 = -2
        assert s.grad_sq == pytest.approx(g[0] ** 2 + g[1] ** 2)


def _setup():
    w = torch.nn.Parameter(torch.tensor([W0]))  # float32: every value below is exact in it
    constraint = RetentionConstraint(EpsilonSchedule("constant", end=0.5), DualMultiplier(0.5, lr=0.0))
    return w, torch.optim.SGD([w], lr=1.0), constraint


@pytest.mark.parametrize("project", [True, False])
def test_craft_step_two_pass_and_one_pass_honour_project(project):
    g, projected = EXPECTED[project]
    a, r = torch.tensor([1.0, -2.0]), torch.tensor([0.0, 1.0])

    w, opt, c = _setup()
    res = craft_step([w], opt, c, [lambda: (w[0] * a).sum()], [lambda: (w[0] * r).sum()], max_grad_norm=1e9,
                     project=project)
    assert w.detach()[0].tolist() == [W0[0] - g[0], W0[1] - g[1]]
    assert res.projection is projected and res.grad_dot == -2.0 and res.grad_cos == pytest.approx(-2 / math.sqrt(5))

    w, opt, c = _setup()
    x = torch.stack([a, r])  # row 0 the action row, row 1 the anchor row: y = x w^T gives g_act = a, g_ret = r

    def joint():
        y = F.linear(x, w)
        return y[0].sum(), y[1].sum()

    res = craft_step_one_pass([w], opt, c, [(joint, 1, 2)], RowGroupSplit(), max_grad_norm=1e9, project=project)
    assert w.detach()[0].tolist() == [W0[0] - g[0], W0[1] - g[1]]
    assert res.projection is projected and res.grad_dot == -2.0 and res.L_ret == W0[1]
