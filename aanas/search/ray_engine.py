"""Ray Tune engine (``--engine ray``): the same objective as a Ray function trainable.

- Search algorithm: ``ray.tune.search.optuna.OptunaSearch`` over the space's define-by-run
  function (the same parameters as the Optuna engine; TPE, or NSGA-II for ``--score pareto``,
  seeded), or Ray's random search (``--search-alg random``) over ``tune.choice`` entries.
- ``train`` evaluation reports validation accuracy per epoch (``tune.report``) to an
  ``ASHAScheduler``, which stops weak candidates early (recorded as PRUNED).
- Resources: ``--cpus-per-trial``/``--gpus-per-trial``; each trial puts its model on the GPU
  Ray assigned (``cuda`` when ``gpus_per_trial > 0`` and CUDA is visible, else ``cpu``).
  ``--max-concurrent`` caps parallel trials; ``--address`` joins an existing cluster, otherwise
  a local Ray starts (``ray.init(num_cpus=..., include_dashboard=False)``).
- The supernet (supernet evaluator) is trained once by the driver and saved in the run
  directory; every trial loads it from that path.
- Results live under ``<run dir>/ray/<study name>``; when that experiment exists the search is
  resumed with ``Tuner.restore(path, trainable, resume_errored=True)``.

Every trial's last ``tune.report`` carries the full :class:`~aanas.results.TrialResult` (as
JSON under ``aanas_result``), so the driver writes the same run-directory files as the Optuna
engine.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aanas.config import SearchRecipe
from aanas.errors import RecipeError
from aanas.results import TrialResult
from aanas.search.adapters import optuna_sampler
from aanas.search.engine import OnTrial, SearchContext, SearchEngine, register_engine
from aanas.search.objective import Objective, TrialFailedError
from aanas.search.scoring import Scorer

__all__ = ["RayEngine"]

_LOG = logging.getLogger(__name__)

_KEY = "aanas_result"  # JSON TrialResult in every reported result


@dataclass(frozen=True)
class _TrialContext:
    """Everything a Ray worker needs to rebuild the objective (picklable)."""

    space: str  # the space's YAML path
    recipe: SearchRecipe
    scorer: Scorer
    supernet_path: str | None
    models_dir: str
    evaluator: Any = None  # a custom picklable evaluator (tests), else built from the recipe


_WORKER_OBJECTIVES: dict[_TrialContext, Objective] = {}  # per worker process (actor reuse)


def _worker_objective(ctx: _TrialContext, device: str) -> Objective:
    """Build (once per worker process) the objective the driver would build."""
    cached = _WORKER_OBJECTIVES.get(ctx)
    if cached is not None:
        return cached
    from aanas.search.evaluators import build_objective
    from aanas.space import SearchSpace

    objective = build_objective(
        ctx.recipe,
        SearchSpace.from_yaml(ctx.space),
        ctx.scorer,
        evaluator=ctx.evaluator,
        device=device,
        supernet_path=Path(ctx.supernet_path) if ctx.supernet_path else None,
        checkpoint_dir=Path(ctx.models_dir),
    )
    _WORKER_OBJECTIVES[ctx] = objective
    return objective


def _trial_number(trial_id: str, dirname: str = "") -> int:
    """0-based creation index of a Ray trial.

    Ray names trial folders ``<trainable>_<trial id>_<index>_<params>_<date>`` with a 1-based
    index (``_trainable_819fa111_3_stage1...`` -> 2); without a search algorithm the id itself
    ends in a 0-based counter (``63d61_00002`` -> 2).
    """
    if dirname and f"{trial_id}_" in dirname:
        index = dirname.split(f"{trial_id}_", 1)[1].split("_", 1)[0]
        if index.isdigit():
            return int(index) - 1
    match = re.search(r"_(\d+)$", trial_id)
    return int(match.group(1)) if match else 10**6 + int(zlib.crc32(trial_id.encode()) % 10**6)


def _metrics(objective: Objective, result: TrialResult) -> dict[str, Any]:
    """What one ``tune.report`` carries: the record plus the searcher/scheduler metrics."""
    out: dict[str, Any] = {_KEY: json.dumps(result.to_dict())}
    if result.state in ("COMPLETE", "REJECTED"):
        values = objective.values(result)
    else:
        acc = result.accuracy or 0.0
        try:
            values = objective.scorer.values(acc, result.judged_cost(objective.scorer.metric))
        except ValueError:
            # unknown cost: infeasible-looking, never a free 0
            values = (0.0, math.inf) if objective.scorer.multi_objective else (0.0,)
    if objective.scorer.multi_objective:
        out["accuracy"], out["cost"] = float(values[0]), float(values[1])
    else:
        out["score"] = float(values[0])
    return out


def _trainable(config: dict[str, Any], ctx: _TrialContext) -> None:
    """The Ray function trainable: one candidate through the shared objective."""
    import torch
    from ray import tune

    from aanas.search.adapters import active_params

    device = "cuda" if torch.cuda.is_available() and ctx.recipe.gpus_per_trial > 0 else "cpu"
    objective = _worker_objective(ctx, device)
    context = tune.get_context()
    number = _trial_number(context.get_trial_id(), Path(context.get_trial_dir()).name)
    params = active_params(objective.space, config)  # type: ignore[arg-type]
    partial = TrialResult(number=number, state="RUNNING", params=params)

    def report(epoch: int, accuracy: float) -> bool:
        # Intermediate result for ASHA; the scheduler stops the trial between reports.
        tune.report(_metrics(objective, partial.replace(accuracy=accuracy)))
        return False

    reporter: Callable[[int, float], bool] | None = (
        report if ctx.recipe.evaluator == "train" else None
    )
    result = objective(params, number=number, report=reporter)
    tune.report(_metrics(objective, result))
    if result.state == "FAIL":
        raise TrialFailedError(result.error)


def _record(
    trial_id: str, last: Mapping[str, Any] | None, error: str = "", dirname: str = ""
) -> TrialResult:
    """The TrialResult of a Ray trial from its last reported result."""
    number = _trial_number(trial_id, dirname)
    data = (last or {}).get(_KEY)
    if not data:
        return TrialResult(number=number, state="FAIL" if error else "RUNNING", error=error)
    result = TrialResult.from_dict(json.loads(data))  # its number came from the trial name
    if result.state == "RUNNING":  # the last report was intermediate: ASHA stopped it
        result = result.replace(state="PRUNED", note="stopped early by ASHA")
    if error and result.state != "FAIL":
        result = result.replace(state="FAIL", error=error)
    return result


class _DefineByRun:
    """Picklable define-by-run function for OptunaSearch (Ray pickles its searcher state to
    resume; a closure such as ``adapters.ray_define_by_run`` cannot be pickled). Suggests the
    same parameters through :func:`aanas.search.adapters.suggest_params`."""

    def __init__(self, space_source: str) -> None:
        self.space_source = space_source
        self._space: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {"space_source": self.space_source, "_space": None}

    def __call__(self, trial: Any) -> None:
        from aanas.search.adapters import suggest_params
        from aanas.space import SearchSpace

        if self._space is None:
            self._space = SearchSpace.from_yaml(self.space_source)
        suggest_params(self._space, trial)


def _plain_callback() -> Any:
    from ray import tune

    return tune.Callback()


@register_engine
class RayEngine(SearchEngine):
    """Runs the search with ``ray.tune.Tuner`` (see the module docstring)."""

    name = "ray"
    in_process = False  # workers rebuild the objective (evaluators.build_objective)

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        self.space = ctx.space
        self.recipe = ctx.recipe
        self.scorer = ctx.scorer
        self.run_dir = ctx.run_dir
        self.on_trial: OnTrial | None = None
        self.experiment_name = ctx.study_name
        supernet_path = ctx.supernet_path
        self.ctx_worker = _TrialContext(
            space=str(ctx.space.source),
            recipe=ctx.recipe,
            scorer=ctx.scorer,
            supernet_path=str(supernet_path.resolve()) if supernet_path else None,
            models_dir=str(ctx.run_dir.models_dir.resolve()),
            evaluator=ctx.evaluator,
        )

    @property
    def experiment_dir(self) -> Path:
        """``<run dir>/ray/<name>``: Ray's experiment folder (resume point)."""
        return (self.run_dir.path / "ray" / self.experiment_name).resolve()

    def _init_ray(self) -> None:
        import ray

        if ray.is_initialized():
            return
        os.environ.setdefault("RAY_DEDUP_LOGS", "0")
        kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
        if self.recipe.address:
            kwargs["address"] = self.recipe.address
        elif self.recipe.num_cpus:
            kwargs["num_cpus"] = self.recipe.num_cpus
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError) as exc:
            raise RecipeError(f"cannot start/join Ray ({self.recipe.address}): {exc}") from None

    def _search_alg(self) -> tuple[Any, dict[str, Any]]:
        from ray.tune.search import ConcurrencyLimiter

        from aanas.search.adapters import ray_param_space

        multi = self.scorer.multi_objective
        if self.recipe.sampler == "random":
            return None, ray_param_space(self.space)
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna_sampler(self.recipe, self.scorer)
        alg: Any = OptunaSearch(
            space=_DefineByRun(str(self.space.source)),
            metric=["accuracy", "cost"] if multi else "score",
            mode=["max", "min"] if multi else "max",
            sampler=sampler,
        )
        if self.recipe.max_concurrent:
            alg = ConcurrencyLimiter(alg, max_concurrent=self.recipe.max_concurrent)
        return alg, {}

    def _callback(self) -> Any:
        from ray import tune

        engine = self
        lock = threading.Lock()

        class _RunDirCallback(tune.Callback):  # type: ignore[misc]
            """Hands every finished trial to the run directory (in the driver)."""

            def _update(self, trial: Any, error: str = "") -> None:
                with lock:
                    if engine.on_trial is not None:
                        engine.on_trial(_record(trial.trial_id, trial.last_result, error))

            def on_trial_complete(self, iteration: int, trials: Any, trial: Any, **kw: Any) -> None:
                self._update(trial)

            def on_trial_error(self, iteration: int, trials: Any, trial: Any, **kw: Any) -> None:
                self._update(trial, error="trial raised (see the Ray trial log)")

            def __reduce__(self) -> Any:
                # Ray pickles the run config into the experiment folder; the writer holds
                # locks and a progress bar, so a restored experiment gets a no-op instead
                # (the resuming driver passes its own writer).
                return (_plain_callback, ())

        return _RunDirCallback()

    def run(self, objective: Objective | None, on_trial: OnTrial) -> list[TrialResult]:
        """Run or resume the Tuner; return every trial's record (``objective`` is unused: the
        workers build their own)."""
        from ray import tune

        del objective
        self.on_trial = on_trial
        self._init_ray()
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, ctx=self.ctx_worker),
            {"cpu": self.recipe.cpus_per_trial, "gpu": self.recipe.gpus_per_trial},
        )
        exp_dir = self.experiment_dir
        if exp_dir.is_dir() and tune.Tuner.can_restore(str(exp_dir)):
            _LOG.info("resuming Ray experiment %s", exp_dir)
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_errored=True)
        else:
            search_alg, param_space = self._search_alg()
            scheduler = None
            multi = self.scorer.multi_objective
            if self.recipe.evaluator == "train" and not multi and self.recipe.pruner != "none":
                from ray.tune.schedulers import ASHAScheduler

                scheduler = ASHAScheduler(
                    time_attr="training_iteration",
                    max_t=self.recipe.train_epochs,
                    grace_period=1,
                    reduction_factor=2,
                )
            tuner = tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=tune.TuneConfig(
                    metric=None if multi else "score",
                    mode=None if multi else "max",
                    search_alg=search_alg,
                    scheduler=scheduler,
                    num_samples=self.recipe.trials,
                    max_concurrent_trials=self.recipe.max_concurrent or None,
                    reuse_actors=True,
                ),
                run_config=tune.RunConfig(
                    name=self.experiment_name,
                    storage_path=str(exp_dir.parent),
                    callbacks=[self._callback()],
                    failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                    verbose=0,
                ),
            )
        grid = tuner.fit()
        out: list[TrialResult] = []
        for res in grid:
            trial_id = str((res.metrics or {}).get("trial_id", "unknown"))
            dirname = Path(str(res.path)).name if res.path else ""
            error = f"{type(res.error).__name__}: {res.error}" if res.error else ""
            record = _record(trial_id, res.metrics, error, dirname)
            if record.state == "FAIL" and res.metrics and res.metrics.get(_KEY):
                record = record.replace(
                    error=TrialResult.from_dict(json.loads(res.metrics[_KEY])).error or record.error
                )
            out.append(record)
        return sorted(out, key=lambda r: r.number)
