"""The arms compared, as trainer flags, and how the tuned ones get their numbers from the calibration.

Every number below is fixed from the calibration (drift and gradient scale of plain fine-tuning on B), never
from old-task accuracy:
- epsilon (tuned) = EPSILON_FRACTION x D, D = anchor drift that plain fine-tuning reaches: the budget asks
  CRaFT to keep 90 % of that drift away.
- R = |g_act| / |g_ret| at drift D: the multiplier at which the retention pull matches the action gradient there.
  The MSE gradient grows like sqrt(drift), so holding drift at epsilon needs about R sqrt(D / epsilon): the fixed
  penalty uses that value, gradient ascent gets the step that reaches R in ~10 steps at the plain-level
  violation, nuPI the same integral rate plus a proportional term worth ~R/3 per unit of relative violation.
- relative: plain ascent on the unitless violation (L_ret - eps) / eps at step 1, a value chosen without R,
  to see whether a scale-free violation alone gives a usable multiplier.
"""

import math
from dataclasses import dataclass
from typing import Dict, List

EPSILON_FRACTION = 0.1
GUIDE = {"epsilon": 0.05, "lambda_lr": 1e-4}  # the user's guide's defaults
RELATIVE_STEP = 1.0
PI_EMA = 0.9  # nuPI's nu: the violation averaged over ~10 steps of 4-anchor estimates
LAMBDA_MAX_FACTOR = 30.0  # nuPI's bound, in units of R
INTERVALS = (2, 4)


@dataclass(frozen=True)
class Calibration:
    drift: float  # D: mean anchor drift (MSE) after plain fine-tuning on B, calibration seed
    grad_ratio: float  # R: |g_act| / |g_ret| at that drift

    @property
    def epsilon(self) -> float:
        return EPSILON_FRACTION * self.drift

    @property
    def fixed_lambda(self) -> float:
        return self.grad_ratio * math.sqrt(self.drift / self.epsilon)

    @property
    def ascent_step(self) -> float:
        """Loss units: lambda gains R / 10 per step while L_ret sits at D (violation 0.9 D)."""
        return self.grad_ratio / (10 * (1 - EPSILON_FRACTION) * self.drift)


def arm_flags(cal: Calibration) -> Dict[str, List[str]]:
    """Every arm's `--craft.*` flags; the same epsilon everywhere except the guide's own arm, so that each run's
    eval rows count held-out drift over the same budget (plain fine-tuning ignores it while training)."""
    eps = ["--craft.epsilon", str(cal.epsilon)]
    tuned = eps + ["--craft.lambda_lr", str(cal.ascent_step)]
    pi_ki = cal.ascent_step * cal.epsilon  # the same integral rate, on the relative violation
    arms = {
        "plain": ["--craft.enabled", "false", *eps],
        "craft_guide": ["--craft.epsilon", str(GUIDE["epsilon"]), "--craft.lambda_lr", str(GUIDE["lambda_lr"])],
        "craft_tuned": tuned,
        "no_projection": tuned + ["--craft.conflict_projection", "false"],
        "fixed_penalty": eps + ["--craft.lambda_lr", "0", "--craft.lambda_init", str(cal.fixed_lambda)],
        "pi": eps + ["--craft.dual_update", "pi", "--craft.violation", "relative", "--craft.lambda_lr", str(pi_ki),
                     "--craft.lambda_kp", str(cal.grad_ratio / 3), "--craft.violation_ema", str(PI_EMA),
                     "--craft.lambda_max", str(LAMBDA_MAX_FACTOR * cal.grad_ratio)],
        "relative": eps + ["--craft.violation", "relative", "--craft.lambda_lr", str(RELATIVE_STEP)],
    }
    for k in INTERVALS:
        arms[f"interval_{k}"] = tuned + ["--craft.retention_interval", str(k)]
    return arms


# Where B conflicts with A the subset that shows the constraint's price: none, tuned ascent, fixed, nuPI.
CONFLICT_ARMS = ("plain", "craft_tuned", "fixed_penalty", "pi")
