"""Optuna engine (the default): TPE / NSGA-II / random over the shared objective.

- Scalar scores (MnasNet reward, accuracy): ``TPESampler(seed=..., multivariate=True,
  group=True)`` (grouped multivariate TPE handles the space's conditional parameters);
  ``--score pareto``: ``NSGAIISampler(seed=..., constraints_func=...)`` with the hard budget as
  constraints, directions (maximize accuracy, minimize cost).
- ``train`` evaluation reports validation accuracy per epoch (``trial.report``) to a
  ``MedianPruner`` or ``HyperbandPruner``; pruned candidates raise ``optuna.TrialPruned``.
- Storage is an RDB URL (default ``sqlite:///<run dir>/study.db``) with heartbeats: a trial
  whose worker died (kill -9, lost machine) is marked FAIL after ``grace_s`` and retried once
  with the same parameters (``RetryFailedTrialCallback``). Running the same command again
  resumes the study (``load_if_exists=True``) up to ``--trials`` finished trials; many processes
  or machines may share one storage and stop together at the same total.
- A candidate that raises is recorded as FAIL with its error (user attribute ``error``) and the
  search continues; over-budget candidates are never evaluated (PRUNED in Optuna, REJECTED in
  our records; in Pareto mode they complete with accuracy 0 and violated constraints so
  NSGA-II's constrained domination steers away from them).

The study is readable by optuna-dashboard: ``optuna-dashboard sqlite:///runs/<name>/study.db``.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from aanas.results import TrialResult
from aanas.search.objective import Objective, SearchRecipe

__all__ = ["OptunaEngine", "TrialFailedError", "open_storage", "study_results"]

_LOG = logging.getLogger(__name__)

# User-attribute keys on each Optuna trial (visible in optuna-dashboard).
_ATTR_RESULT = "result"  # the full TrialResult dict, set when the trial ends
_ATTR_SPEC = "spec"  # canonical spec string, set before evaluation (survives a kill)
_ATTR_ERROR = "error"
_ATTR_CONSTRAINTS = "constraints"  # budget constraint values (<= 0 feasible), NSGA-II


class TrialFailedError(RuntimeError):
    """Raised inside the Optuna objective for a FAIL record; Optuna catches it (``catch=``)."""


def open_storage(url: str, *, heartbeat_s: int, grace_s: int) -> Any:
    """An ``optuna.storages.RDBStorage`` with heartbeats; ``ValueError`` if it cannot be opened.

    A lost trial (no heartbeat for ``grace_s``) is marked FAIL and re-enqueued once with the
    same parameters.
    """
    import optuna

    if "://" not in url:
        raise ValueError(f"storage {url!r} is not a database URL (e.g. sqlite:///runs/x/study.db)")
    try:
        with _quiet():
            return optuna.storages.RDBStorage(
                url,
                heartbeat_interval=heartbeat_s,
                grace_period=grace_s,
                heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=1
                ),
            )
    except Exception as exc:  # sqlalchemy errors: bad URL, missing driver, unreachable server
        detail = " ".join(str(exc).split())[:300]
        raise ValueError(f"cannot open storage {url!r}: {type(exc).__name__}: {detail}") from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Optuna's experimental/deprecation warnings (heartbeats are experimental)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        yield


def _fail_stale(study: Any) -> None:
    import optuna

    with _quiet():
        optuna.storages.fail_stale_trials(study)


def _HAS_SET_CONSTRAINT() -> bool:  # noqa: N802 (reads like the constant it is)
    """Optuna >= 5 takes constraints per trial (``Trial.set_constraint``)."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def _trial_to_result(ft: Any, seed: int) -> TrialResult:
    """A FrozenTrial as a TrialResult (trials lost by a killed worker have no result attr)."""
    from optuna.trial import TrialState

    data = ft.user_attrs.get(_ATTR_RESULT)
    state_map = {
        TrialState.COMPLETE: "COMPLETE",
        TrialState.PRUNED: "PRUNED",
        TrialState.FAIL: "FAIL",
        TrialState.RUNNING: "RUNNING",
        TrialState.WAITING: "RUNNING",
    }
    if data:
        result = TrialResult.from_dict(data).replace(number=ft.number)
        if ft.state == TrialState.FAIL and result.state != "FAIL":
            result = result.replace(state="FAIL", error=result.error or "failed")
        return result
    state = state_map[ft.state]
    error = str(ft.user_attrs.get(_ATTR_ERROR, ""))
    if ft.state == TrialState.FAIL and not error:
        error = "worker lost: no heartbeat (killed or crashed); retried with the same params"
    wall = 0.0
    if ft.datetime_start is not None and ft.datetime_complete is not None:
        wall = (ft.datetime_complete - ft.datetime_start).total_seconds()
    return TrialResult(
        number=ft.number,
        state=state,
        spec=str(ft.user_attrs.get(_ATTR_SPEC, "")),
        params=dict(ft.params),
        seed=seed + ft.number,
        error=error,
        wall_s=wall,
    )


def study_results(study: Any, seed: int = 0) -> list[TrialResult]:
    """Every trial of ``study`` as a TrialResult, by trial number."""
    return [_trial_to_result(ft, seed) for ft in study.get_trials(deepcopy=False)]


def _finished_count(study: Any) -> int:
    """Finished trials, not counting lost trials that were re-enqueued (their retry counts)."""
    from optuna.trial import TrialState

    trials = study.get_trials(deepcopy=False)
    retried = {t.system_attrs.get("failed_trial") for t in trials} - {None}
    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return sum(1 for t in trials if t.state in done and t.number not in retried)


class OptunaEngine:
    """Runs the search on an Optuna study.

    Args:
        space: the :class:`aanas.space.SearchSpace`.
        objective: the shared :class:`Objective`.
        recipe: search settings (trials, seed, sampler, pruner, n_jobs, heartbeats).
        storage: RDB URL.
        study_name: name of the study in the storage.
        on_trial: called with all records after every finished trial (writes the run dir).
    """

    def __init__(
        self,
        space: Any,
        objective: Objective,
        recipe: SearchRecipe,
        *,
        storage: str,
        study_name: str,
        on_trial: Callable[[list[TrialResult]], None] | None = None,
    ) -> None:
        self.space = space
        self.objective = objective
        self.recipe = recipe
        self.storage_url = storage
        self.study_name = study_name
        self.on_trial = on_trial
        self._lock = threading.Lock()
        self.study: Any = None

    # -- construction of sampler / pruner / study ---------------------------------------------

    def _constraints(self, ft: Any) -> Sequence[float]:
        return tuple(ft.user_attrs.get(_ATTR_CONSTRAINTS, ()))

    @staticmethod
    def sampler_for(
        recipe: SearchRecipe,
        scorer: Any,
        *,
        seed: int | None = None,
        constraints_func: Callable[[Any], Sequence[float]] | None = None,
    ) -> Any:
        """The Optuna sampler ``recipe.sampler`` names (``auto``: TPE, or NSGA-II for
        ``pareto``), seeded with ``seed`` (default ``recipe.seed``); also used by Ray's
        OptunaSearch."""
        import optuna

        seed = recipe.seed if seed is None else seed
        name = recipe.sampler
        if name == "auto":
            name = "nsga2" if scorer.multi_objective else "tpe"
        if name == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if name == "nsga2":
            # population 8: a CPU search runs tens of trials, so generations must be short.
            return optuna.samplers.NSGAIISampler(
                seed=seed, population_size=8, constraints_func=constraints_func
            )
        with _quiet():
            # Optuna's default 10 random start-up trials, then grouped multivariate TPE.
            return optuna.samplers.TPESampler(
                seed=seed,
                multivariate=True,
                group=True,
                constant_liar=recipe.n_jobs > 1,
                constraints_func=constraints_func,
            )

    def make_sampler(self, seed: int) -> Any:
        """The sampler for this recipe, seeded with ``seed`` (budget as constraints)."""
        constraints = None
        if self.objective.budget.active and not _HAS_SET_CONSTRAINT():
            constraints = self._constraints  # Optuna < 5: constraints_func
        return self.sampler_for(
            self.recipe, self.objective.scorer, seed=seed, constraints_func=constraints
        )

    def make_pruner(self) -> Any:
        """MedianPruner / HyperbandPruner for the ``train`` evaluator, else NopPruner."""
        import optuna

        if self.recipe.evaluator != "train" or self.recipe.pruner == "none":
            return optuna.pruners.NopPruner()
        if self.recipe.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(
                min_resource=1, max_resource=self.recipe.train_epochs
            )
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)

    def open_study(self) -> Any:
        """Create or load (resume) the study; fail stale trials; reseed the sampler on resume."""
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        storage = open_storage(
            self.storage_url, heartbeat_s=self.recipe.heartbeat_s, grace_s=self.recipe.grace_s
        )
        directions = list(self.objective.scorer.directions)
        try:
            study = optuna.create_study(
                storage=storage,
                sampler=self.make_sampler(self.recipe.seed),
                pruner=self.make_pruner(),
                study_name=self.study_name,
                directions=directions,
                load_if_exists=True,
            )
        except Exception as exc:
            raise ValueError(f"cannot open study {self.study_name!r}: {exc}") from None
        if [d.name.lower() for d in study.directions] != directions:
            raise ValueError(
                f"study {self.study_name!r} in {self.storage_url} optimises "
                f"{[d.name.lower() for d in study.directions]}, not {directions}: use another "
                "--study-name or --out"
            )
        key = {"space": getattr(self.space, "name", ""), "score": self.recipe.score}
        stored = study.user_attrs.get("aanas")
        if stored is None:
            study.set_user_attr("aanas", key)
        elif stored != key:
            raise ValueError(
                f"study {self.study_name!r} was created for {stored}, not {key}: use another "
                "--study-name or --out"
            )
        _fail_stale(study)
        existing = len(study.get_trials(deepcopy=False))
        if existing:
            # A resumed study must not replay the first run's random start-up suggestions:
            # reseed deterministically from the number of trials already in the study.
            study.sampler = self.make_sampler(self.recipe.seed + existing)
        self.study = study
        return study

    # -- the objective -------------------------------------------------------------------------

    def _cached(self, study: Any, spec: str) -> TrialResult | None:
        """A finished record of the same spec (different params can decode to one spec)."""
        from optuna.trial import TrialState

        for ft in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            data = ft.user_attrs.get(_ATTR_RESULT)
            if data and data.get("spec") == spec and data.get("state") in ("COMPLETE", "REJECTED"):
                return TrialResult.from_dict(data).replace(number=ft.number)
        return None

    def _objective(self, trial: Any) -> Any:
        import optuna

        from aanas.search.adapters import suggest_params

        params = suggest_params(self.space, trial)
        try:
            spec = self.space.decode(params)
        except Exception:
            result = self.objective(params, number=trial.number)  # records the decode error
        else:
            trial.set_user_attr(_ATTR_SPEC, spec.encode())
            cached = self._cached(trial.study, spec.encode())
            if cached is not None:
                result = cached.replace(
                    number=trial.number,
                    params=params,
                    wall_s=0.0,
                    note=f"same spec as trial {cached.number}; not re-evaluated",
                )
            else:
                report = None
                if not self.objective.scorer.multi_objective:

                    def report(epoch: int, accuracy: float) -> bool:
                        trial.report(accuracy, epoch)
                        return bool(trial.should_prune())

                result = self.objective.evaluate_spec(
                    spec, number=trial.number, params=params, report=report
                )
        trial.set_user_attr(_ATTR_RESULT, result.to_dict())
        constraints = self.objective.budget.constraints(result.macs, result.latency_ms)
        trial.set_user_attr(_ATTR_CONSTRAINTS, list(constraints))
        if constraints and _HAS_SET_CONSTRAINT():  # Optuna >= 5: per-trial constraints
            names = [n for n in ("max_macs", "max_latency_ms") if getattr(self.objective.budget, n)]
            for key, value in zip(names, constraints, strict=True):
                trial.set_constraint(key, float(value))
        if result.state == "COMPLETE":
            values = self.objective.values(result)
            return values if len(values) > 1 else values[0]
        if result.state == "REJECTED":
            if self.objective.scorer.multi_objective:
                return self.objective.values(result)  # infeasible by constraints_func
            raise optuna.TrialPruned(result.note)
        if result.state == "PRUNED":
            raise optuna.TrialPruned(result.note)
        trial.set_user_attr(_ATTR_ERROR, result.error)
        raise TrialFailedError(result.error)

    def _after_trial(self, study: Any, _trial: Any) -> None:
        if _finished_count(study) >= self.recipe.trials:
            study.stop()
        if self.on_trial is not None:
            with self._lock:
                self.on_trial(study_results(study, self.recipe.seed))

    def run(self) -> list[TrialResult]:
        """Optimise until the study has ``recipe.trials`` finished trials; return all records."""
        study = self.study if self.study is not None else self.open_study()
        remaining = self.recipe.trials - _finished_count(study)
        if remaining > 0:
            with _quiet():
                study.optimize(
                    self._objective,
                    n_trials=remaining,
                    n_jobs=self.recipe.n_jobs,
                    catch=(TrialFailedError,),
                    callbacks=[self._after_trial],
                )
        else:
            _LOG.info(
                "study %r already has %d finished trials", self.study_name, self.recipe.trials
            )
        _fail_stale(study)
        return study_results(study, self.recipe.seed)
