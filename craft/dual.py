"""The drift budget as an explicit constrained-optimisation object: schedule, violation, multiplier, update rule.

Two multiplier rules, chosen by `--craft.dual_update`:
- `gradient_ascent` (DualMultiplier): the guide's `lambda <- max(0, lambda + lambda_lr * e)`;
- `pi` (NuPIMultiplier): the nuPI controller, proportional + integral, which damps the overshoot and
  oscillation that plain ascent on a multiplier is known for.
The violation `e` is `L_ret - epsilon` (absolute) or `(L_ret - epsilon) / epsilon` (relative): the relative
one has no units, so one step size fits every model, layer and retention loss type.
"""

import math
from dataclasses import dataclass
from typing import Optional, Union


@dataclass
class EpsilonSchedule:
    """The budget epsilon(step): constant, or moving from `start` to `end` over `steps` steps."""

    kind: str
    end: float
    start: Optional[float] = None
    steps: Optional[int] = None

    def __call__(self, step: int) -> float:
        if self.kind == "constant" or self.start is None or not self.steps:
            return self.end
        t = min(max(step, 0), self.steps) / self.steps
        if self.kind == "linear":
            w = t
        elif self.kind == "cosine":
            w = 0.5 * (1.0 - math.cos(math.pi * t))
        else:
            raise ValueError(f"epsilon_schedule must be constant, linear or cosine; found {self.kind!r}")
        return self.start + (self.end - self.start) * w


def _project(value: float, max_value: Optional[float]) -> float:
    """Onto the feasible multipliers [0, max_value] (no upper bound when max_value is None)."""
    value = max(0.0, value)
    return value if max_value is None else min(value, max_value)


@dataclass
class DualMultiplier:
    """lambda >= 0, moved by projected gradient ascent on the violation: lambda <- [lambda + lr e]_0^max."""

    value: float
    lr: float
    max_value: Optional[float] = None

    def update(self, violation: float) -> float:
        self.value = _project(self.value + self.lr * violation, self.max_value)
        return self.value

    def state_dict(self) -> dict:
        return {}  # lambda itself is all this rule keeps

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class NuPIMultiplier:
    """The nuPI update of Sohrabi et al. 2024, "On PI Controllers for Updating Lagrange Multipliers in
    Constrained Optimization" (ICML), Algorithm 1, in its recursive form with xi_{-1} = 0, each step
    projected onto [0, max_value]:

        xi_t        = nu xi_{t-1} + (1 - nu) e_t
        lambda_{t+1} = [lambda_t + ki e_t + kp (xi_t - xi_{t-1})]_0^max

    Without the projection this is lambda_{t+1} = lambda_0 + ki sum_{s<=t} e_s + kp xi_t: an integral term
    (the guide's ascent, step ki) plus a proportional term on the smoothed violation, which pulls lambda
    back as soon as the violation shrinks instead of waiting for it to change sign (Stooke et al. 2020).
    The recursive form keeps the integral inside lambda, so the projection also stops it winding up while
    the constraint holds. kp = 0 is exactly projected gradient ascent with step ki.
    """

    value: float
    ki: float
    kp: float = 0.0
    nu: float = 0.0
    max_value: Optional[float] = None
    xi: float = 0.0  # the EMA of the violation after the last update (xi_{t-1})

    def update(self, violation: float) -> float:
        xi = self.nu * self.xi + (1.0 - self.nu) * violation
        self.value = _project(self.value + self.ki * violation + self.kp * (xi - self.xi), self.max_value)
        self.xi = xi
        return self.value

    def state_dict(self) -> dict:
        return {"xi": self.xi}

    def load_state_dict(self, state: dict) -> None:
        self.xi = float(state.get("xi", 0.0))  # a checkpoint from before nuPI: no update seen yet


Multiplier = Union[DualMultiplier, NuPIMultiplier]


@dataclass
class RetentionConstraint:
    """L_ret <= epsilon(step), enforced by `multiplier`; `step` is the epsilon schedule's position."""

    schedule: EpsilonSchedule
    multiplier: Multiplier
    step: int = 0
    relative: bool = False  # violation (L_ret - epsilon) / epsilon instead of L_ret - epsilon

    @property
    def epsilon(self) -> float:
        return self.schedule(self.step)

    @property
    def lam(self) -> float:
        return self.multiplier.value

    def violation(self, l_ret: float) -> float:
        gap = l_ret - self.epsilon
        return gap / self.epsilon if self.relative else gap

    def update(self, l_ret: float, next_step: Optional[int] = None) -> None:
        """Spec order: lambda moves with this step's epsilon, then the schedule advances, to `next_step`
        when given (the training step, when lambda is not updated at every step) or by one."""
        self.multiplier.update(self.violation(l_ret))
        self.step = self.step + 1 if next_step is None else int(next_step)

    def state_dict(self) -> dict:
        """Plain floats and ints (JSON round-trips them exactly); the same on every rank, as L_ret is."""
        return {"lambda": self.multiplier.value, "step": self.step, **self.multiplier.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier.value = float(state["lambda"])
        self.step = int(state["step"])
        self.multiplier.load_state_dict(state)

    @classmethod
    def from_config(cls, cfg, total_steps: Optional[int]) -> "RetentionConstraint":
        schedule = EpsilonSchedule(
            kind=cfg.epsilon_schedule,
            end=cfg.epsilon,
            start=cfg.epsilon_start,
            steps=cfg.epsilon_schedule_steps or total_steps,
        )
        if cfg.dual_update == "pi":
            multiplier = NuPIMultiplier(cfg.lambda_init, ki=cfg.lambda_lr, kp=cfg.lambda_kp, nu=cfg.violation_ema,
                                        max_value=cfg.lambda_max)
        else:
            multiplier = DualMultiplier(cfg.lambda_init, cfg.lambda_lr, cfg.lambda_max)
        return cls(schedule=schedule, multiplier=multiplier, relative=cfg.violation == "relative")
