"""The drift budget as an explicit constrained-optimisation object: schedule, multiplier, update rule."""

import math
from dataclasses import dataclass
from typing import Optional


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


@dataclass
class DualMultiplier:
    """lambda >= 0, moved by projected gradient ascent on the violation L_ret - epsilon."""

    value: float
    lr: float

    def update(self, violation: float) -> float:
        self.value = max(0.0, self.value + self.lr * violation)
        return self.value


@dataclass
class RetentionConstraint:
    """L_ret <= epsilon(step), enforced by `multiplier`; `step` counts completed updates."""

    schedule: EpsilonSchedule
    multiplier: DualMultiplier
    step: int = 0

    @property
    def epsilon(self) -> float:
        return self.schedule(self.step)

    @property
    def lam(self) -> float:
        return self.multiplier.value

    def update(self, l_ret: float) -> None:
        """Spec order: lambda moves with this step's epsilon, then the schedule advances."""
        self.multiplier.update(l_ret - self.epsilon)
        self.step += 1

    def state_dict(self) -> dict:
        return {"lambda": self.multiplier.value, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.multiplier.value = float(state["lambda"])
        self.step = int(state["step"])

    @classmethod
    def from_config(cls, cfg, total_steps: Optional[int]) -> "RetentionConstraint":
        schedule = EpsilonSchedule(
            kind=cfg.epsilon_schedule,
            end=cfg.epsilon,
            start=cfg.epsilon_start,
            steps=cfg.epsilon_schedule_steps or total_steps,
        )
        return cls(schedule=schedule, multiplier=DualMultiplier(cfg.lambda_init, cfg.lambda_lr))
