"""How a search scores a candidate: MnasNet's reward, hard budgets, and Pareto objectives.

MnasNet (Tan et al., *MnasNet: Platform-Aware Neural Architecture Search for Mobile*, CVPR 2019,
arXiv:1807.11626, Eq. 2) scores a model m by::

    ACC(m) * [LAT(m) / T] ** w,   w = alpha if LAT(m) <= T else beta

- soft constraint (the paper's choice, Sec. 3): alpha = beta = -0.07, so a model twice as slow as
  the target needs about 5 % more accuracy (2 ** 0.07 = 1.05) to score the same;
- hard constraint (Eq. 2 with alpha = 0, beta = -1): no bonus under the target, and the reward
  falls as T / LAT(m) above it.

LAT may be measured latency or, as a device-independent proxy, MACs; T is the target in the same
unit. The ``pareto`` mode instead returns two objectives (maximise accuracy, minimise the cost)
for a multi-objective sampler (NSGA-II), and the search reports the Pareto front.

A :class:`Budget` is separate from the reward: it is a hard limit checked *before* a candidate
is trained, and a candidate over it is rejected without evaluation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from aanas.config import COST_METRICS, SCORES, SearchRecipe

__all__ = [
    "COST_METRICS",
    "HARD_EXPONENTS",
    "SCORES",
    "SOFT_EXPONENTS",
    "Budget",
    "Scorer",
    "mnasnet_reward",
]

# (alpha, beta) of MnasNet Eq. 2 (arXiv:1807.11626, Sec. 3).
SOFT_EXPONENTS: tuple[float, float] = (-0.07, -0.07)
HARD_EXPONENTS: tuple[float, float] = (0.0, -1.0)


def mnasnet_reward(
    accuracy: float, cost: float, target: float, *, alpha: float, beta: float
) -> float:
    """MnasNet's ``ACC * (cost / target) ** w`` with ``w = alpha`` if ``cost <= target``.

    Example: accuracy 0.75, 400M MACs, target 300M, soft (alpha = beta = -0.07):
    0.75 * (4 / 3) ** -0.07 = 0.75 * 0.98006 = 0.73505.

    Raises:
        ValueError: a non-positive cost or target, or a non-finite accuracy.
    """
    if not (math.isfinite(accuracy)):
        raise ValueError(f"accuracy must be finite, got {accuracy!r}")
    if not (cost > 0 and math.isfinite(cost)):
        raise ValueError(f"cost must be a finite number > 0, got {cost!r}")
    if not (target > 0 and math.isfinite(target)):
        raise ValueError(f"target must be a finite number > 0, got {target!r}")
    w = alpha if cost <= target else beta
    return float(accuracy * (cost / target) ** w)


@dataclass(frozen=True)
class Scorer:
    """What the engine optimises, built from ``--score`` and ``--target-*``."""

    mode: str = "soft"  # one of SCORES
    metric: str = "macs"  # one of COST_METRICS: the LAT of the reward / the cost objective
    target: float = 0.0  # T of the reward, in the metric's unit (MACs or ms); soft/hard only

    def __post_init__(self) -> None:
        if self.mode not in SCORES:
            raise ValueError(f"score must be one of {SCORES}, got {self.mode!r}")
        if self.metric not in COST_METRICS:
            raise ValueError(f"cost metric must be one of {COST_METRICS}, got {self.metric!r}")
        if self.mode in ("soft", "hard") and not (math.isfinite(self.target) and self.target > 0):
            raise ValueError(
                f"score {self.mode!r} needs a target > 0 ({self.metric}), got {self.target!r}"
            )

    @property
    def multi_objective(self) -> bool:
        """True for ``pareto``: two objectives (accuracy up, cost down)."""
        return self.mode == "pareto"

    @property
    def directions(self) -> tuple[str, ...]:
        """Optuna study directions of :meth:`values`."""
        return ("maximize", "minimize") if self.multi_objective else ("maximize",)

    @property
    def exponents(self) -> tuple[float, float]:
        """MnasNet (alpha, beta) of this mode (accuracy: (0, 0), i.e. no cost term)."""
        if self.mode == "soft":
            return SOFT_EXPONENTS
        if self.mode == "hard":
            return HARD_EXPONENTS
        return (0.0, 0.0)

    def reward(self, accuracy: float, cost: float | None) -> float | None:
        """Scalar reward, or None in ``pareto`` mode (there is no single score)."""
        if self.mode == "pareto":
            return None
        if self.mode == "accuracy":
            return float(accuracy)
        if cost is None:
            raise ValueError(f"score {self.mode!r} needs the {self.metric} of every candidate")
        alpha, beta = self.exponents
        return mnasnet_reward(accuracy, cost, self.target, alpha=alpha, beta=beta)

    def values(self, accuracy: float, cost: float | None) -> tuple[float, ...]:
        """The objective values an engine receives, matching :attr:`directions`."""
        if self.multi_objective:
            if cost is None:
                raise ValueError(f"score 'pareto' needs the {self.metric} of every candidate")
            return (float(accuracy), float(cost))
        reward = self.reward(accuracy, cost)
        assert reward is not None
        return (reward,)

    @classmethod
    def from_recipe(cls, recipe: SearchRecipe, *, default_target_macs: float = 0.0) -> Scorer:
        """The scorer ``recipe`` asks for; ``default_target_macs`` fills a missing MACs target.

        The reward's metric is latency when a latency target is set, else MACs.
        """
        metric = recipe.cost_metric
        target = recipe.target_latency_ms if metric == "latency_ms" else recipe.target_macs
        if target == 0 and metric == "macs":
            target = default_target_macs
        return cls(mode=recipe.score, metric=metric, target=target)

    def describe(self) -> str:
        """One line for logs and summary.md."""
        if self.mode == "pareto":
            return f"Pareto front of (accuracy max, {self.metric} min)"
        if self.mode == "accuracy":
            return "validation accuracy"
        alpha, beta = self.exponents
        return (
            f"MnasNet {self.mode} reward ACC x ({self.metric}/T)^w, T={self.target:g}, "
            f"alpha={alpha:g}, beta={beta:g}"
        )


@dataclass(frozen=True)
class Budget:
    """Hard limits checked before evaluation; 0 disables a limit."""

    max_macs: float = 0.0
    max_latency_ms: float = 0.0

    def __post_init__(self) -> None:
        for name in ("max_macs", "max_latency_ms"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0 (0 = off), got {value!r}")

    @classmethod
    def from_recipe(cls, recipe: SearchRecipe) -> Budget:
        """The hard limits ``recipe`` sets (``max_macs``, ``max_latency_ms``)."""
        return cls(max_macs=recipe.max_macs, max_latency_ms=recipe.max_latency_ms)

    @property
    def active(self) -> bool:
        """True when any limit is set."""
        return self.max_macs > 0 or self.max_latency_ms > 0

    def violation(self, macs: float | None, latency_ms: float | None) -> str:
        """Why a candidate is over budget, or "" when it fits (unknown costs are not judged)."""
        if self.max_macs > 0 and macs is not None and macs > self.max_macs:
            return f"over budget: {macs / 1e6:.3f}M MACs > max {self.max_macs / 1e6:.3f}M"
        if self.max_latency_ms > 0 and latency_ms is not None and latency_ms > self.max_latency_ms:
            return f"over budget: {latency_ms:.3f} ms > max {self.max_latency_ms:.3f} ms"
        return ""

    def constraints(self, macs: float | None, latency_ms: float | None) -> tuple[float, ...]:
        """Optuna constraint values: <= 0 means feasible (one per active limit).

        ``latency_ms`` is the judged latency (measured, else predicted:
        :meth:`aanas.results.TrialResult.judged_cost`). An unknown cost is +inf, infeasible:
        a candidate is never feasible by default.
        """
        out: list[float] = []
        if self.max_macs > 0:
            out.append(math.inf if macs is None else float(macs) - self.max_macs)
        if self.max_latency_ms > 0:
            out.append(math.inf if latency_ms is None else float(latency_ms) - self.max_latency_ms)
        return tuple(out)
