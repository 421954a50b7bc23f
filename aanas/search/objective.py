"""The engine-agnostic search objective: params -> spec -> cost filter -> evaluate -> record.

Both engines (:mod:`aanas.search.optuna_engine`, :mod:`aanas.search.ray_engine`) call the same
:class:`Objective`; they differ only in how they suggest params and report progress. One call:

1. ``space.decode(params)`` gives the candidate's :class:`~aanas.spec.ArchSpec`;
2. its cost: analytical params/MACs (:func:`aanas.cost.count_spec`, microseconds) and, when the
   search uses latency, a measured (:func:`aanas.cost.latency.measure`, disk-cached) and/or
   predicted latency;
3. the hard :class:`~aanas.search.scoring.Budget`: a candidate over it is recorded as
   ``REJECTED`` with the reason and is **never** evaluated;
4. the evaluator's validation accuracy (weight sharing or a short training run, see
   :mod:`aanas.search.evaluators`), which may report per-epoch accuracy to a pruner;
5. the score (MnasNet reward, arXiv:1807.11626 Eq. 2, or Pareto objectives).

Errors never escape: a candidate that raises (NaN loss, out of memory, a bad spec) comes back as
a ``FAIL`` record carrying ``"ExceptionType: message"``, and the search goes on.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aanas.results import TrialResult
from aanas.search.scoring import COST_METRICS, Budget, Scorer
from aanas.spec import ArchSpec

__all__ = [
    "CandidateCost",
    "Evaluation",
    "Evaluator",
    "Objective",
    "Reporter",
    "TrialFailedError",
    "TrialPrunedError",
]

_LOG = logging.getLogger(__name__)

# --- evaluator protocol -----------------------------------------------------------------------


class TrialPrunedError(Exception):
    """Raised by a :data:`Reporter` to stop a candidate early; engines translate it."""


class TrialFailedError(RuntimeError):
    """What an evaluator may raise to fail a candidate with a message (any exception does the
    same: :meth:`Objective.evaluate_spec` turns it into a FAIL record and the search goes on).

    No engine raises it: the Optuna engine tells a FAIL record to Optuna as a FAIL state, and
    the Ray trainable reports it as its normal final result (the trial ends TERMINATED), so
    Ray's ERROR state is kept for trials whose worker died, which a restored search resumes.
    """


# (epoch, validation accuracy so far) -> True to stop the candidate (the objective raises
# TrialPrunedError on its behalf). Optuna: trial.report + should_prune; Ray: tune.report.
Reporter = Callable[[int, float], bool]


@dataclass(frozen=True)
class Evaluation:
    """What an evaluator measured for one candidate."""

    accuracy: float  # validation top-1 in [0, 1]
    metrics: Mapping[str, float] = field(default_factory=dict)  # val_loss, epochs, ...


class Evaluator(Protocol):
    """Validation accuracy of a spec: weight sharing (supernet) or a short training run."""

    name: str

    def evaluate(self, spec: ArchSpec, *, seed: int, report: Reporter | None) -> Evaluation:
        """Accuracy of ``spec``; call ``report`` once per epoch if the evaluator has epochs."""
        ...


# --- the objective ----------------------------------------------------------------------------


class _Space(Protocol):
    def decode(self, params: dict[str, Any]) -> ArchSpec: ...


@dataclass(frozen=True)
class CandidateCost:
    """Everything the cost filter knows about a spec before any evaluation."""

    n_params: int
    macs: int
    latency_ms: float | None = None
    latency_pred_ms: float | None = None

    def metric(self, name: str) -> float | None:
        """``macs`` or ``latency_ms`` (measured, else predicted)."""
        if name not in COST_METRICS:
            raise ValueError(f"unknown cost metric {name!r}; expected one of {COST_METRICS}")
        if name == "macs":
            return float(self.macs)
        return self.latency_ms if self.latency_ms is not None else self.latency_pred_ms


def _count(spec: ArchSpec) -> tuple[int, int]:
    from aanas.cost.flops import count_spec

    cost = count_spec(spec)
    return int(cost.params), int(cost.macs)


class Objective:
    """params -> :class:`~aanas.results.TrialResult`; see the module docstring for the steps.

    Args:
        space: anything with ``decode(params) -> ArchSpec`` (an :class:`aanas.space.SearchSpace`).
        evaluator: see :class:`Evaluator`.
        scorer: reward or Pareto objectives.
        budget: hard limits checked before evaluation.
        seed: trial ``k`` evaluates with seed ``seed + k``.
        measure_latency: ``spec -> ms`` (measured), or None.
        predict_latency: ``spec -> ms`` (latency table), or None.
        count: ``spec -> (params, MACs)``; default :func:`aanas.cost.count_spec`.
    """

    def __init__(
        self,
        space: _Space,
        evaluator: Evaluator,
        *,
        scorer: Scorer,
        budget: Budget | None = None,
        seed: int = 0,
        measure_latency: Callable[[ArchSpec], float] | None = None,
        predict_latency: Callable[[ArchSpec], float] | None = None,
        count: Callable[[ArchSpec], tuple[int, int]] | None = None,
    ) -> None:
        self.space = space
        self.evaluator = evaluator
        self.scorer = scorer
        self.budget = budget or Budget()
        self.seed = seed
        self.measure_latency = measure_latency
        self.predict_latency = predict_latency
        self.count = count or _count

    def cost(self, spec: ArchSpec) -> CandidateCost:
        """Analytical params/MACs plus the configured latency estimates of ``spec``."""
        n_params, macs = self.count(spec)
        measured = self.measure_latency(spec) if self.measure_latency is not None else None
        predicted = self.predict_latency(spec) if self.predict_latency is not None else None
        return CandidateCost(n_params, macs, measured, predicted)

    def __call__(
        self,
        params: Mapping[str, Any],
        *,
        number: int,
        report: Reporter | None = None,
    ) -> TrialResult:
        """Decode, cost-filter, evaluate and score one candidate (never raises, except
        ``KeyboardInterrupt``/``SystemExit``)."""
        start = time.perf_counter()
        params = dict(params)
        try:
            spec = self.space.decode(params)
        except Exception as exc:  # a space/engine mismatch: record it, keep searching
            return TrialResult(
                number=number,
                state="FAIL",
                params=params,
                seed=self.seed + number,
                error=_describe(exc),
                wall_s=time.perf_counter() - start,
            )
        return self.evaluate_spec(spec, number=number, params=params, report=report, start=start)

    def evaluate_spec(
        self,
        spec: ArchSpec,
        *,
        number: int,
        params: Mapping[str, Any] | None = None,
        report: Reporter | None = None,
        name: str = "",
        start: float | None = None,
    ) -> TrialResult:
        """Steps 2-5 for an already decoded spec (also used for baselines)."""
        start = time.perf_counter() if start is None else start
        seed = self.seed + max(number, 0)
        base = TrialResult(
            number=number,
            state="RUNNING",
            spec=spec.encode(),
            params=dict(params or {}),
            seed=seed,
            name=name,
        )
        try:
            cost = self.cost(spec)
        except Exception as exc:
            return base.replace(state="FAIL", error=_describe(exc), wall_s=_since(start))
        base = base.replace(
            n_params=cost.n_params,
            macs=cost.macs,
            latency_ms=cost.latency_ms,
            latency_pred_ms=cost.latency_pred_ms,
        )
        reason = self.budget.violation(cost.macs, cost.metric("latency_ms"))
        if reason:
            _LOG.debug("trial %d rejected: %s", number, reason)
            return base.replace(state="REJECTED", note=reason, wall_s=_since(start))

        last: list[float] = []

        def _report(epoch: int, accuracy: float) -> bool:
            last.append(accuracy)
            if report is not None and report(epoch, accuracy):
                raise TrialPrunedError(f"pruned after epoch {epoch} (accuracy {accuracy:.4f})")
            return False  # a Reporter's answer: go on (stopping is the exception above)

        try:
            evaluation = self.evaluator.evaluate(spec, seed=seed, report=_report)
        except TrialPrunedError as exc:
            return base.replace(
                state="PRUNED",
                accuracy=last[-1] if last else None,
                note=str(exc),
                metrics={"epochs": float(len(last))},
                wall_s=_since(start),
            )
        except Exception as exc:  # NaN loss, OOM, ...: the search goes on
            _LOG.warning("trial %d failed: %s", number, _describe(exc))
            return base.replace(state="FAIL", error=_describe(exc), wall_s=_since(start))
        accuracy = float(evaluation.accuracy)
        if not math.isfinite(accuracy):
            return base.replace(
                state="FAIL", error=f"non-finite accuracy {accuracy}", wall_s=_since(start)
            )
        try:
            reward = self.scorer.reward(accuracy, cost.metric(self.scorer.metric))
        except ValueError as exc:
            return base.replace(
                state="FAIL", accuracy=accuracy, error=_describe(exc), wall_s=_since(start)
            )
        return base.replace(
            state="COMPLETE",
            accuracy=accuracy,
            reward=reward,
            metrics=dict(evaluation.metrics),
            wall_s=_since(start),
        )

    def values(self, result: TrialResult) -> tuple[float, ...]:
        """The engine-facing objective values of a COMPLETE or REJECTED record.

        A REJECTED candidate scores accuracy 0 (reward 0), so samplers learn to avoid it.
        """
        return self.scorer.values(result.accuracy or 0.0, result.judged_cost(self.scorer.metric))


def _since(start: float) -> float:
    return time.perf_counter() - start


def _describe(exc: BaseException) -> str:
    """``"TypeName: message"`` on one line (long messages cut at 500 characters)."""
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
