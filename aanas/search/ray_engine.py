"""Ray Tune engine (``--engine ray``): the same objective as a Ray function trainable.

- Search algorithm: ``ray.tune.search.optuna.OptunaSearch`` over the space's define-by-run
  function (the same parameters as the Optuna engine; TPE, or NSGA-II for ``--score pareto``,
  seeded), or Ray's random search (``--search-alg random``) over ``tune.choice`` entries.
- ``train`` evaluation reports once per epoch (``tune.report``) with the candidate's spec, cost
  and real score, and its ``tune.Checkpoint`` (:func:`aanas.train.fit`'s ``last.pt``); the
  last epoch's report is the final record. ``ASHAScheduler`` (``max_t`` = epochs) stops weak
  candidates between epochs: recorded PRUNED with their last accuracy.
- Resources: ``--cpus-per-trial``/``--gpus-per-trial``; each trial puts its model on the GPU
  Ray assigned (``cuda`` when ``gpus_per_trial > 0`` and CUDA is visible, else ``cpu``).
  ``--max-concurrent`` caps parallel trials; ``--address`` joins an existing cluster, otherwise
  a local Ray starts (``ray.init(num_cpus=..., include_dashboard=False)``).
- Nothing a worker needs is read from the driver's disk: the space, the supernet the driver
  trained (its bytes) and a latency table travel through the object store
  (``tune.with_parameters``); trained weights come back through the trial checkpoints.
- Results live under ``<--ray-storage or run dir/ray>/<study name>``; when that experiment
  exists the search is resumed with ``Tuner.restore``: unfinished trials and trials whose
  worker died continue from their last checkpoint (a candidate failing in its own code is a
  FAIL record that ends normally, so it is never re-run), and the restored run config gets
  this driver's run-directory callback back (:func:`_restored_callback`).

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
import shutil
import socket
import tempfile
import threading
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aanas.config import SearchRecipe
from aanas.errors import RecipeError
from aanas.results import TrialResult, atomic_write_bytes
from aanas.search.adapters import optuna_sampler
from aanas.search.engine import OnTrial, SearchContext, SearchEngine, register_engine
from aanas.search.objective import Objective
from aanas.search.scoring import Scorer

__all__ = ["RayEngine"]

_LOG = logging.getLogger(__name__)

_KEY = "aanas_result"  # JSON TrialResult in every reported result


@dataclass(frozen=True, eq=False)
class _TrialContext:
    """Everything a Ray worker needs to rebuild the objective, shipped through Ray's object store
    (``tune.with_parameters``): no path of the driver's machine, which another node cannot read.
    """

    key: str  # identifies the search: workers cache their data and supernet under it
    space: Any  # the aanas.space.SearchSpace itself (not its YAML path)
    recipe: SearchRecipe
    scorer: Scorer
    supernet: bytes | None  # the driver's supernet.pt (supernet evaluator), else None
    latency_table: Any = None  # the loaded aanas.cost.LatencyTable (--latency predict)
    evaluator: Any = None  # a custom picklable evaluator (tests), else built from the recipe


# Per worker process (actors are reused across trials): the expensive parts of an objective.
_WORKER_STATE: dict[str, tuple[Any, Any]] = {}


def _worker_objective(ctx: _TrialContext, device: str, work_dir: Path) -> Objective:
    """The objective the driver would build, with this trial's checkpoint folder.

    The data and the supernet are built once per worker process; the objective itself is per
    trial, because the train evaluator checkpoints into the trial's own ``work_dir``.
    """
    from aanas.search.evaluators import build_data_for, build_objective, load_supernet

    if ctx.evaluator is not None:
        return build_objective(
            ctx.recipe, ctx.space, ctx.scorer, evaluator=ctx.evaluator,
            latency_table=ctx.latency_table,
        )  # fmt: skip
    state = _WORKER_STATE.get(ctx.key)
    if state is None:
        data = build_data_for(ctx.recipe, ctx.space.base.input_size)
        supernet = None
        if ctx.supernet is not None:
            blob = work_dir / "supernet.pt"
            blob.write_bytes(ctx.supernet)
            supernet = load_supernet(ctx.space, blob, device)
            blob.unlink()
        state = _WORKER_STATE[ctx.key] = (data, supernet)
    data, supernet = state
    return build_objective(
        ctx.recipe,
        ctx.space,
        ctx.scorer,
        data=data,
        device=device,
        supernet=supernet,
        checkpoint_dir=work_dir,  # final weights as <digest>.pt: the driver copies them
        work_dir=work_dir,
        latency_table=ctx.latency_table,
    )


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
    """What one ``tune.report`` carries: the record plus the searcher/scheduler metrics.

    Intermediate (RUNNING) records carry the spec and cost too, so the score ASHA and the
    searcher see is the real one for that epoch's accuracy.
    """
    out: dict[str, Any] = {_KEY: json.dumps(result.to_dict())}
    if result.state == "FAIL":
        # the searcher learns to avoid it; the record itself says FAIL
        values: tuple[float, ...] = (0.0, math.inf) if objective.scorer.multi_objective else (0.0,)
    elif result.state in ("COMPLETE", "REJECTED"):
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


def _worker_identity() -> str:
    """``node=<Ray node id> host=<hostname> pid=<pid> gpus=<CUDA_VISIBLE_DEVICES>``."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    gpus = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    return f"node={node} host={socket.gethostname()} pid={os.getpid()} gpus={gpus}"


def _running_record(
    objective: Objective, params: dict[str, Any], number: int, worker: str
) -> TrialResult:
    """The record an intermediate report carries: spec, cost and seed, no final state yet.

    The cost is recomputed here (the objective computed it before evaluating): analytical MACs
    take microseconds, measured latency comes from its disk cache, predicted from the table.
    """
    spec = objective.space.decode(params)
    cost = objective.cost(spec)
    return TrialResult(
        number=number,
        state="RUNNING",
        spec=spec.encode(),
        params=params,
        seed=objective.seed + number,
        n_params=cost.n_params,
        macs=cost.macs,
        latency_ms=cost.latency_ms,
        latency_pred_ms=cost.latency_pred_ms,
        worker=worker,
    )


def _checkpoint(work_dir: Path) -> Any:
    """This trial's folder as a ``tune.Checkpoint`` (None while it is empty)."""
    from ray import tune

    return tune.Checkpoint.from_directory(str(work_dir)) if any(work_dir.iterdir()) else None


def _trainable(config: dict[str, Any], ctx: _TrialContext) -> None:
    """The Ray function trainable: one candidate through the shared objective.

    Reports once per epoch (train evaluator) with the trial's checkpoint folder; the last
    epoch's report is the final record, so ASHA (``max_t`` = epochs) never stops a trial
    between its last epoch and its result. A FAIL record (NaN loss, out of memory) is a
    normal final report, not an exception: Ray's ERROR state is kept for trials whose worker
    died, which are the only ones a restored search re-runs (from their last checkpoint).
    """
    import torch
    from ray import tune

    from aanas.search.adapters import active_params

    device = "cuda" if torch.cuda.is_available() and ctx.recipe.gpus_per_trial > 0 else "cpu"
    context = tune.get_context()
    number = _trial_number(context.get_trial_id(), Path(context.get_trial_dir()).name)
    work_dir = Path(tempfile.mkdtemp(prefix=f"aanas-trial{number}-"))
    try:
        restored = tune.get_checkpoint()
        if restored is not None:
            restored.to_directory(str(work_dir))
        objective = _worker_objective(ctx, device, work_dir)
        params = active_params(objective.space, config)  # type: ignore[arg-type]
        worker = _worker_identity()
        last_epoch = ctx.recipe.train_epochs - 1
        running: list[TrialResult] = []

        def report(epoch: int, accuracy: float) -> bool:
            if epoch >= last_epoch:
                return False  # the final report below is this epoch's
            if not running:
                running.append(_running_record(objective, params, number, worker))
            record = running[0].replace(accuracy=accuracy, metrics={"epochs": float(epoch + 1)})
            # ASHA decides on this report; a stopped trial's record is this one (PRUNED)
            tune.report(_metrics(objective, record), checkpoint=_checkpoint(work_dir))
            return False

        train = ctx.recipe.evaluator == "train" and ctx.evaluator is None
        result = objective(params, number=number, report=report if train else None)
        result = result.replace(worker=worker)
        tune.report(_metrics(objective, result), checkpoint=_checkpoint(work_dir))
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)


def _record(trial: Any, status: str = "") -> TrialResult:
    """The TrialResult of a Ray ``Trial`` from its status (``status``, else ``trial.status``:
    callbacks run before Ray updates it) and its last reported result.

    TERMINATED after an epoch's (RUNNING) report: the scheduler stopped it there (PRUNED, with
    that epoch's accuracy). ERROR: its worker died or the trainable raised (FAIL, unless its
    final record was already in). Anything else was interrupted (RUNNING: a rerun resumes it).
    """
    number = _trial_number(trial.trial_id, Path(str(trial.path)).name if trial.path else "")
    status = status or trial.status
    error = ""
    if status == "ERROR":
        error = f"Ray trial error (worker lost or trainable raised), see {trial.error_file}"
    data = (trial.last_result or {}).get(_KEY)
    if not data:
        return TrialResult(number=number, state="FAIL" if error else "RUNNING", error=error)
    result = TrialResult.from_dict(json.loads(data))  # its number came from the trial name
    if result.state == "RUNNING" and status == "TERMINATED":
        epochs = int(result.metrics.get("epochs", 0))
        result = result.replace(
            state="PRUNED",
            note=f"stopped early by ASHA after epoch {epochs} (accuracy {result.accuracy:.4f})",
        )
    if error and result.state == "RUNNING":
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


# The driver's live run-directory callbacks, by experiment folder. Ray pickles the run config
# (callbacks included) into the experiment and Tuner.restore takes no callbacks: the pickled
# callback carries only this key and, when the resuming driver unpickles it, becomes the
# callback that driver registered, so a resumed run updates the run directory trial by trial.
_LIVE_CALLBACKS: dict[str, Any] = {}


def _restored_callback(key: str) -> Any:
    from ray import tune

    live = _LIVE_CALLBACKS.get(key)
    if live is None:  # unpickled outside a resuming driver (inspection): inert
        return tune.Callback()
    return live


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

    def check(self) -> None:
        """Start or join Ray now: an unreachable ``--address`` fails before any training."""
        if self.recipe.timeout_min > 0:
            # Tune's time_budget_s stops the RUNNING trials at the deadline, unlike Optuna's
            # timeout (they finish): refused rather than given other semantics silently.
            raise RecipeError(
                f"timeout_min={self.recipe.timeout_min!r}: the ray engine has no wall-clock "
                "budget yet; use --engine optuna"
            )
        self._init_ray()

    def _worker_context(self) -> _TrialContext:
        """What the workers get through the object store (built when the supernet exists)."""
        supernet_path = self.ctx.supernet_path
        blob = supernet_path.read_bytes() if supernet_path is not None else None
        table = None
        if self.recipe.latency_mode == "predict":
            from aanas.cost.latency import LatencyTable

            assert self.recipe.latency_table is not None  # SearchRecipe checks it
            table = LatencyTable.load(self.recipe.latency_table)
        return _TrialContext(
            # a cache key only (no path travels): experiment folder and supernet checksums
            key=f"{zlib.crc32(self.experiment_dir.encode())}:{zlib.crc32(blob or b'')}",
            space=self.space,
            recipe=self.recipe,
            scorer=self.scorer,
            supernet=blob,
            latency_table=table,
            evaluator=self.ctx.evaluator,
        )

    @property
    def storage_root(self) -> str:
        """Where Ray keeps experiments: ``--ray-storage`` (a shared path or a URI such as
        ``s3://bucket/aanas``), else ``<run dir>/ray`` (enough for one machine)."""
        root = self.recipe.ray_storage or str(self.run_dir.path / "ray")
        return root if "://" in root else str(Path(root).resolve())

    @property
    def experiment_dir(self) -> str:
        """``<storage root>/<name>``: Ray's experiment folder (resume point), path or URI."""
        return f"{self.storage_root.rstrip('/')}/{self.experiment_name}"

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
        first = [dict(p) for p in self.ctx.warm_start] or None  # evaluated before sampling
        if self.recipe.sampler == "random":
            if first is None:
                return None, ray_param_space(self.space)
            from ray.tune.search import BasicVariantGenerator

            return BasicVariantGenerator(points_to_evaluate=first), ray_param_space(self.space)
        from ray.tune.search.optuna import OptunaSearch

        sampler = optuna_sampler(self.recipe, self.scorer)
        alg: Any = OptunaSearch(
            space=_DefineByRun(str(self.space.source)),
            metric=["accuracy", "cost"] if multi else "score",
            mode=["max", "min"] if multi else "max",
            sampler=sampler,
            points_to_evaluate=first,
        )
        if self.recipe.max_concurrent:
            alg = ConcurrencyLimiter(alg, max_concurrent=self.recipe.max_concurrent)
        return alg, {}

    def _callback(self) -> Any:
        from ray import tune

        engine = self
        lock = threading.Lock()
        key = self.experiment_dir

        class _RunDirCallback(tune.Callback):  # type: ignore[misc]
            """Hands every finished trial to the run directory (in the driver)."""

            def _update(self, trial: Any, status: str) -> None:
                record = _record(trial, status)
                with lock:
                    engine._keep_weights(record, trial.checkpoint)
                    if engine.on_trial is not None:
                        engine.on_trial(record)

            def on_trial_complete(self, iteration: int, trials: Any, trial: Any, **kw: Any) -> None:
                self._update(trial, "TERMINATED")

            def on_trial_error(self, iteration: int, trials: Any, trial: Any, **kw: Any) -> None:
                self._update(trial, "ERROR")

            def __reduce__(self) -> Any:
                return (_restored_callback, (key,))

        callback = _RunDirCallback()
        _LIVE_CALLBACKS[key] = callback
        return callback

    def _keep_weights(self, record: TrialResult, checkpoint: Any) -> None:
        """Copy a finished trial's trained weights (``<digest>.pt`` in its last checkpoint,
        wherever the trial ran) into the run directory's ``models/``."""
        if checkpoint is None or record.state != "COMPLETE" or not record.spec:
            return
        from aanas.spec import decode

        name = f"{decode(record.spec).digest()}.pt"
        try:
            with checkpoint.as_directory() as folder:
                source = Path(folder) / name
                if source.is_file():
                    self.run_dir.models_dir.mkdir(parents=True, exist_ok=True)
                    atomic_write_bytes(self.run_dir.models_dir / name, source.read_bytes())
        except OSError as exc:  # the weights are a convenience: the record is what counts
            _LOG.warning("trial %d: weights not copied from its checkpoint: %s", record.number, exc)

    def run(self, objective: Objective | None, on_trial: OnTrial) -> list[TrialResult]:
        """Run or resume the Tuner; return every trial's record (``objective`` is unused: the
        workers build their own)."""
        from ray import tune

        del objective
        self.on_trial = on_trial
        self._init_ray()
        trainable = tune.with_resources(
            tune.with_parameters(_trainable, ctx=self._worker_context()),
            {"cpu": self.recipe.cpus_per_trial, "gpu": self.recipe.gpus_per_trial},
        )
        callback = self._callback()  # registered before a restore unpickles its stand-in
        try:
            return self._fit(trainable, callback)
        finally:
            _LIVE_CALLBACKS.pop(self.experiment_dir, None)

    def _fit(self, trainable: Any, callback: Any) -> list[TrialResult]:
        from ray import tune

        exp_dir = self.experiment_dir
        if tune.Tuner.can_restore(exp_dir):
            _LOG.info("resuming Ray experiment %s", exp_dir)
            # Unfinished trials continue from their last checkpoint; ERROR trials are those
            # whose worker died (a failing candidate ends TERMINATED with a FAIL record), so
            # they are resumed too. The callback comes back through _restored_callback.
            tuner = tune.Tuner.restore(
                exp_dir, trainable, resume_unfinished=True, resume_errored=True
            )
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
                    storage_path=self.storage_root,
                    callbacks=[callback],
                    # a trial whose worker or node dies is retried from its last checkpoint
                    # (candidates that fail in user code never raise: see _trainable)
                    failure_config=tune.FailureConfig(max_failures=2, fail_fast=False),
                    verbose=0,
                ),
            )
        tuner.fit()
        # Every trial with its Ray status (ResultGrid has no status: an interrupted trial and
        # one ASHA stopped look alike there), read back from the experiment folder.
        from ray.tune import ExperimentAnalysis

        out = [_record(trial) for trial in ExperimentAnalysis(self.experiment_dir).trials]
        return sorted(out, key=lambda r: r.number)
