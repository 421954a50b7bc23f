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

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from aanas.results import TrialResult
from aanas.search.scoring import COST_METRICS, SCORES, Budget, Scorer
from aanas.spec import ArchSpec

__all__ = [
    "ENGINES",
    "EVALUATORS",
    "LATENCY_MODES",
    "Evaluation",
    "Evaluator",
    "Objective",
    "PRUNERS",
    "SAMPLERS",
    "Reporter",
    "SearchRecipe",
    "TrialPrunedError",
]

_LOG = logging.getLogger(__name__)

ENGINES: tuple[str, ...] = ("optuna", "ray")
EVALUATORS: tuple[str, ...] = ("supernet", "train")
# auto: TPE for a scalar score, NSGA-II for pareto. Ray: "random" uses Ray's own random search,
# anything else runs the Optuna sampler inside ray.tune.search.optuna.OptunaSearch.
SAMPLERS: tuple[str, ...] = ("auto", "tpe", "nsga2", "random")
# Early stopping of `train` candidates: Optuna MedianPruner / HyperbandPruner; Ray uses ASHA for
# both (none: never stop early).
PRUNERS: tuple[str, ...] = ("median", "hyperband", "none")
# off: no latency; measure: time every candidate (torch, 1 thread, batch 1, disk cache);
# predict: a latency table; auto: measure when a latency target or budget is set, else off.
LATENCY_MODES: tuple[str, ...] = ("auto", "off", "measure", "predict")


@dataclass(frozen=True)
class SearchRecipe:
    """Every setting of ``aanas search``; the CLI flags map 1:1 onto these fields.

    Defaults are the offline CPU run: the tiny space on the embedded digits data, weight-sharing
    evaluation, 20 TPE trials, a few minutes on 2 cores.
    """

    # --- what to search ------------------------------------------------------------------------
    space: str = "tiny"  # shipped space name or YAML path (aanas.space.SearchSpace.from_yaml)
    data: str = "digits"  # digits | cifar10 | cifar100 | imagefolder:PATH
    data_root: str | None = None  # torchvision cache folder (None: ~/.cache/aanas/data)
    batch_size: int = 64  # digits has 1437 training images: 64 gives 18 steps per epoch
    val_fraction: float = 0.2  # searches select on this held-out part of the TRAINING split
    # --- engine ----------------------------------------------------------------------------------
    engine: str = "optuna"  # one of ENGINES
    evaluator: str = "supernet"  # one of EVALUATORS
    sampler: str = "auto"  # one of SAMPLERS
    pruner: str = "median"  # one of PRUNERS (train evaluator only)
    trials: int = 40  # finished trials (COMPLETE + PRUNED + FAIL) the study should reach
    n_jobs: int = 1  # Optuna threads in this process (more processes may share --storage)
    seed: int = 0  # sampler seed; trial k trains/recalibrates with seed + k
    # --- score and budget ------------------------------------------------------------------------
    score: str = "soft"  # one of SCORES
    target_macs: float = 0.0  # T of the reward in MACs (0: geometric mean of the space's range)
    target_latency_ms: float = 0.0  # T in ms; setting it makes latency the reward's metric
    max_macs: float = 0.0  # hard budget: candidates above are rejected untrained (0: off)
    max_latency_ms: float = 0.0  # hard budget in ms (0: off)
    latency: str = "auto"  # one of LATENCY_MODES
    latency_table: str | None = None  # YAML LUT for latency=predict (aanas.cost.LatencyTable)
    latency_threads: int = 1  # intra-op threads while timing (mobile-style single core)
    # --- supernet evaluator ----------------------------------------------------------------------
    supernet: str | None = None  # load this trained supernet instead of training one
    # sandwich-rule epochs on the training split: 10 on digits take ~75 s on 2 CPU cores and
    # lift the best inherited accuracy from ~75 % (2 epochs) to the 90s
    supernet_epochs: int = 10
    supernet_lr: float = 0.05
    recal_batches: int = 4  # training batches to re-estimate BN statistics per candidate
    # --- train evaluator -------------------------------------------------------------------------
    train_recipe: str | None = None  # TrainRecipe YAML/shipped name (default: digits_tiny-like)
    train_epochs: int = 3  # epochs per candidate (pruners see each one)
    train_lr: float = 0.05
    max_train_batches: int = 0  # cap optimiser steps per epoch (0: all)
    # --- bookkeeping -----------------------------------------------------------------------------
    device: str = "auto"  # auto: cuda when available, else cpu
    storage: str | None = None  # Optuna RDB URL (None: sqlite:///<out>/study.db)
    study_name: str | None = None  # None: the run name
    heartbeat_s: int = 10  # Optuna heartbeat of running trials ...
    grace_s: int = 30  # ... a trial silent this long is marked FAIL and retried once
    baselines: tuple[str, ...] = ()  # registered model names evaluated as reference points
    top_k: int = 10  # rows of the summary table
    # --- Ray Tune --------------------------------------------------------------------------------
    address: str | None = None  # join this Ray cluster (None: start a local one)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: as many as the resources allow
    num_cpus: int = 0  # local Ray only: CPUs to give ray.init (0: all)

    def __post_init__(self) -> None:
        _choice("engine", self.engine, ENGINES)
        _choice("evaluator", self.evaluator, EVALUATORS)
        _choice("sampler", self.sampler, SAMPLERS)
        _choice("pruner", self.pruner, PRUNERS)
        _choice("score", self.score, SCORES)
        _choice("latency", self.latency, LATENCY_MODES)
        for name in (
            "target_macs",
            "target_latency_ms",
            "max_macs",
            "max_latency_ms",
            "cpus_per_trial",
            "gpus_per_trial",
            "supernet_lr",
            "train_lr",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, low in (
            ("trials", 1),
            ("n_jobs", 1),
            ("batch_size", 1),
            ("supernet_epochs", 0),
            ("recal_batches", 0),
            ("train_epochs", 1),
            ("max_train_batches", 0),
            ("heartbeat_s", 1),
            ("grace_s", 1),
            ("top_k", 1),
            ("max_concurrent", 0),
            ("num_cpus", 0),
            ("latency_threads", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in (0, 1): searches select on validation accuracy, "
                f"got {self.val_fraction!r}"
            )
        if self.sampler == "nsga2" and self.score != "pareto":
            raise ValueError("sampler 'nsga2' is multi-objective: use it with --score pareto")
        if self.target_latency_ms > 0 and self.target_macs > 0:
            raise ValueError("give one reward target: --target-macs or --target-latency-ms")
        if self.latency == "off" and (self.target_latency_ms > 0 or self.max_latency_ms > 0):
            raise ValueError("a latency target or budget needs --latency measure or predict")
        if self.latency == "predict" and not self.latency_table:
            raise ValueError("--latency predict needs --latency-table PATH")
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(
                f"grace_s ({self.grace_s}) must exceed heartbeat_s ({self.heartbeat_s})"
            )

    @property
    def cost_metric(self) -> str:
        """``latency_ms`` when a latency target is set, else ``macs``."""
        return "latency_ms" if self.target_latency_ms > 0 else "macs"

    @property
    def latency_mode(self) -> str:
        """The effective latency mode (``auto`` resolved)."""
        if self.latency != "auto":
            return self.latency
        if self.target_latency_ms > 0 or self.max_latency_ms > 0:
            return "predict" if self.latency_table else "measure"
        return "off"

    @property
    def budget(self) -> Budget:
        """The hard cost limits."""
        return Budget(max_macs=self.max_macs, max_latency_ms=self.max_latency_ms)

    def scorer(self, default_target_macs: float = 0.0) -> Scorer:
        """The :class:`Scorer`; ``default_target_macs`` fills a missing MACs target."""
        metric = self.cost_metric
        target = self.target_latency_ms if metric == "latency_ms" else self.target_macs
        if target == 0 and metric == "macs":
            target = default_target_macs
        return Scorer(mode=self.score, metric=metric, target=target)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (written to the run directory's ``run.json``)."""
        out = dataclasses.asdict(self)
        out["baselines"] = list(self.baselines)
        return out


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {list(allowed)}, got {value!r}")


# --- evaluator protocol -----------------------------------------------------------------------


class TrialPrunedError(Exception):
    """Raised by a :data:`Reporter` to stop a candidate early; engines translate it."""


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

        def _report(epoch: int, accuracy: float) -> None:
            last.append(accuracy)
            if report is not None and report(epoch, accuracy):
                raise TrialPrunedError(f"pruned after epoch {epoch} (accuracy {accuracy:.4f})")

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
        cost = (
            result.cost(self.scorer.metric)
            if self.scorer.metric == "macs"
            else (result.latency_ms if result.latency_ms is not None else result.latency_pred_ms)
        )
        return self.scorer.values(result.accuracy or 0.0, cost)


def _since(start: float) -> float:
    return time.perf_counter() - start


def _describe(exc: BaseException) -> str:
    """``"TypeName: message"`` on one line (long messages cut at 500 characters)."""
    text = " ".join(str(exc).split())
    if len(text) > 500:
        text = text[:497] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
