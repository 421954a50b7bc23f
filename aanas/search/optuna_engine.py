"""Optuna engine (the default): TPE / NSGA-II / random over the shared objective.

- Scalar scores (MnasNet reward, accuracy): ``TPESampler(seed=..., multivariate=True,
  group=True)``; ``--score pareto``: ``NSGAIISampler`` with the hard budget as constraints,
  directions (maximize accuracy, minimize cost). See :func:`aanas.search.adapters.optuna_sampler`.
- ``train`` evaluation reports validation accuracy per epoch (``trial.report``) to a
  ``MedianPruner`` or ``HyperbandPruner``.
- Storage: by default Optuna's journal file storage ``<run dir>/study.journal``
  (``JournalStorage(JournalFileBackend(...))``), which Optuna documents for many processes on
  one machine (SQLite is not: its writers race, e.g. on schema creation); ``--storage`` takes a
  journal file path or an RDB URL (``postgresql://...`` for many machines). A run directory made
  before the journal default keeps its ``study.db``.

Many workers (processes, machines) may run the same command on one storage. They coordinate
through a *claim lock* (a file lock for file storages, a PostgreSQL advisory lock for
``postgresql://``) held while a worker counts the study's trials, asks for a new one and reserves
its architecture:

- exactly ``--trials`` *counted* trials (COMPLETE, PRUNED, FAIL with a result) end up in the
  study: a worker asks only while counted + running < ``--trials``;
- each worker joins with its own ordinal (study user attribute) and seeds its sampler from the
  recipe seed and that ordinal (worker 0 uses the recipe seed itself); TPE runs with
  ``constant_liar`` whenever several workers or threads share the study;
- an architecture is evaluated once: a trial whose spec another trial already holds reuses that
  trial's stored result (waiting for it if it is still running) and says so in its ``note``;
- a trial whose worker died (kill -9, lost machine) is marked FAIL with a "lost" reason and is not
  counted, so the search runs another in its place: on file storages as soon as anyone looks (the
  dead worker's file lock is gone), on an RDB after the heartbeat grace period. A worker with
  nothing left to ask for stays until the other workers' running trials have finished (polling
  the storage), so a trial lost at the very end is still replaced and the study ends exact;
- Ctrl-C / SIGTERM marks the running trial FAIL ("interrupted", not counted) before exiting.

Trial records live in user attributes (visible in optuna-dashboard): ``result`` (the full
:class:`~aanas.results.TrialResult`), ``spec``, ``worker``, ``error``, ``lost``,
``duplicate_of``.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from aanas.errors import RecipeError
from aanas.results import TrialResult
from aanas.search._locks import AdvisoryLock, FileLock, NullLock, lock_is_held
from aanas.search.adapters import optuna_sampler, suggest_params
from aanas.search.engine import OnTrial, SearchContext, SearchEngine, register_engine
from aanas.search.objective import Objective

__all__ = [
    "OptunaEngine",
    "counted",
    "open_storage",
    "resolve_storage",
    "study_results",
    "worker_seed",
]

_LOG = logging.getLogger(__name__)

# User-attribute keys on each Optuna trial (visible in optuna-dashboard).
_ATTR_RESULT = "result"  # the full TrialResult dict, set just before the trial is told
_ATTR_SPEC = "spec"  # canonical spec string, set under the claim lock (the reservation)
_ATTR_WORKER = "worker"  # which worker runs it (liveness of file-storage workers)
_ATTR_ERROR = "error"
_ATTR_LOST = "lost"  # why the trial ended without a result; such trials are not counted
_ATTR_CONSTRAINTS = "constraints"  # budget constraint values (<= 0 feasible), NSGA-II
_ATTR_DUPLICATE = "duplicate_of"  # a repeated spec: the trial whose result was reused
_STUDY_KEY = "aanas"  # study user attr: what the study was created for
_STUDY_WORKERS = "aanas_workers"  # study user attr: how many workers have joined

_POLL_S = 0.2  # waiting for another worker's trial of the same spec
_IDLE_POLL_S = 0.5  # nothing to ask for: waiting for the other workers' running trials


class _Wait:
    """Internal: the study has all its trials asked for, but some are still running."""


def resolve_storage(storage: str | None, run_dir: Any) -> str:
    """The storage of a run: ``storage`` if given, else ``<run dir>/study.journal`` (or the
    ``study.db`` of a run directory made before the journal default)."""
    if storage:
        return storage
    if run_dir.study_db.is_file():
        return f"sqlite:///{run_dir.study_db.resolve()}"
    return str(run_dir.study_journal.resolve())


def _is_url(storage: str) -> bool:
    return "://" in storage


def _sqlite_path(url: str) -> Path | None:
    prefix = "sqlite:///"
    return Path(url[len(prefix) :]) if url.startswith(prefix) else None


def open_storage(storage: str, *, heartbeat_s: int, grace_s: int) -> Any:
    """An Optuna storage: ``RDBStorage`` with heartbeats for a URL, else ``JournalStorage`` on
    the journal file ``storage``. Raises :class:`~aanas.errors.RecipeError` (one line) when it
    cannot be opened."""
    import optuna

    if not _is_url(storage):
        path = Path(storage)
        if path.is_dir():
            raise RecipeError(f"storage {storage!r} is a directory, not a journal file")
        if not path.parent.is_dir():
            raise RecipeError(f"storage {storage!r}: folder {str(path.parent)!r} does not exist")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(str(path)))
        except Exception as exc:
            detail = " ".join(str(exc).split())[:300]
            raise RecipeError(f"cannot open storage {storage!r}: {detail}") from None
    try:
        with _quiet():
            return optuna.storages.RDBStorage(
                storage, heartbeat_interval=heartbeat_s, grace_period=grace_s
            )
    except Exception as exc:  # sqlalchemy errors: bad URL, missing driver, unreachable server
        detail = " ".join(str(exc).split())[:300]
        raise RecipeError(
            f"cannot open storage {storage!r}: {type(exc).__name__}: {detail}"
        ) from None


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Optuna's experimental/deprecation warnings (heartbeats are experimental)."""
    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.simplefilter("ignore", FutureWarning)
        # ask()/tell() with an RDB heartbeat: this engine records the heartbeats itself
        warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed")
        yield


def _has_set_constraint() -> bool:
    """Optuna >= 5 takes constraints per trial (``Trial.set_constraint``)."""
    import optuna

    return hasattr(optuna.trial.Trial, "set_constraint")


def worker_seed(seed: int, ordinal: int) -> int:
    """Sampler seed of worker ``ordinal``: ``seed`` itself for the first worker (one worker
    reproduces a single-process run), else a hash of both, so workers draw distinct streams."""
    if ordinal == 0:
        return seed
    digest = hashlib.sha256(f"aanas-worker:{seed}:{ordinal}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _is_lost(ft: Any) -> bool:
    """A FAIL without a result: its worker died or was interrupted mid-trial."""
    from optuna.trial import TrialState

    return ft.state == TrialState.FAIL and (
        _ATTR_LOST in ft.user_attrs or _ATTR_RESULT not in ft.user_attrs
    )


def counted(ft: Any) -> bool:
    """Does this trial count toward ``--trials``? Finished with a result (lost ones do not)."""
    from optuna.trial import TrialState

    done = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
    return ft.state in done and not _is_lost(ft)


def _trial_to_result(ft: Any, seed: int) -> TrialResult:
    """A FrozenTrial as a TrialResult (lost trials have no result attr)."""
    from optuna.trial import TrialState

    data = ft.user_attrs.get(_ATTR_RESULT)
    if data:
        result = TrialResult.from_dict(data).replace(number=ft.number)
        if ft.state == TrialState.FAIL and result.state != "FAIL":
            result = result.replace(state="FAIL", error=result.error or "failed")
        return result
    state = {
        TrialState.COMPLETE: "COMPLETE",
        TrialState.PRUNED: "PRUNED",
        TrialState.FAIL: "FAIL",
        TrialState.RUNNING: "RUNNING",
        TrialState.WAITING: "RUNNING",
    }[ft.state]
    error = str(ft.user_attrs.get(_ATTR_LOST) or ft.user_attrs.get(_ATTR_ERROR) or "")
    if ft.state == TrialState.FAIL and not error:
        error = (
            "lost: its worker sent no heartbeat for the grace period (killed or crashed); "
            "not counted, another trial ran in its place"
        )
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


class _Claim:
    """A trial this worker asked for, with its decoded spec and any earlier trial of that spec."""

    def __init__(self, trial: Any, params: dict[str, Any], spec: Any, twin: int | None) -> None:
        self.trial = trial
        self.params = params
        self.spec = spec  # ArchSpec, or None when the params did not decode
        self.twin = twin  # number of an earlier (not lost) trial with the same spec


class _Interrupted(Exception):
    """Internal: the study reached its count while this worker waited for a twin trial."""


@register_engine
class OptunaEngine(SearchEngine):
    """Runs the search on an Optuna study (see the module docstring)."""

    name = "optuna"
    in_process = True

    def __init__(self, ctx: SearchContext) -> None:
        super().__init__(ctx)
        self.space = ctx.space
        self.recipe = ctx.recipe
        self.storage_url = resolve_storage(ctx.recipe.storage, ctx.run_dir)
        self.study_name = ctx.study_name
        self.objective: Objective | None = None
        self.on_trial: OnTrial | None = None
        self.study: Any = None
        self.worker = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns() // 1_000_000}"
        self.ordinal = 0
        self._claim_lock: Any = self._make_claim_lock()
        self._local_files = not _is_url(self.storage_url) or (
            _sqlite_path(self.storage_url) is not None
        )
        self._worker_lock: FileLock | None = None
        self._active: dict[int, Any] = {}  # trial number -> optuna Trial, running here
        self._active_lock = threading.Lock()
        self._stop = threading.Event()
        self._told_waiting = threading.Event()  # the "waiting for running trials" line, once
        self._told_timeout = threading.Event()  # the "budget spent" line, once

    # -- storage, locks, liveness ---------------------------------------------------------------

    def _storage_file(self) -> Path | None:
        if not _is_url(self.storage_url):
            return Path(self.storage_url)
        return _sqlite_path(self.storage_url)

    def _make_claim_lock(self) -> Any:
        path = self._storage_file()
        if path is not None:
            return FileLock(path.with_name(path.name + ".aanas.lock"))
        if self.storage_url.startswith(("postgresql", "postgres")):
            return AdvisoryLock(self.storage_url, f"aanas:{self.study_name}")
        _LOG.warning(
            "no cross-process lock for %s: workers sharing it may overshoot --trials",
            self.storage_url.split("://", 1)[0],
        )
        return NullLock()

    def _workers_dir(self) -> Path | None:
        path = self._storage_file()
        return None if path is None else path.with_name(path.name + ".workers")

    def _worker_lock_path(self, worker: str) -> Path | None:
        folder = self._workers_dir()
        return None if folder is None else folder / f"{worker}.lock"

    def _alive(self, worker: str) -> bool:
        if worker == self.worker:
            return True
        path = self._worker_lock_path(worker)
        return path is not None and lock_is_held(path)

    def check(self) -> None:
        """Open the storage (under the claim lock: concurrent schema creation races otherwise)."""
        with self._claim_lock:
            open_storage(
                self.storage_url, heartbeat_s=self.recipe.heartbeat_s, grace_s=self.recipe.grace_s
            )

    def storage_description(self) -> str | None:
        return self.storage_url

    def stored_results(self) -> list[TrialResult]:
        return [] if self.study is None else study_results(self.study, self.recipe.seed)

    # -- sampler / pruner / study ---------------------------------------------------------------

    def _constraints(self, ft: Any) -> Sequence[float]:
        return tuple(ft.user_attrs.get(_ATTR_CONSTRAINTS, ()))

    def make_sampler(self, seed: int) -> Any:
        """The sampler for this recipe, seeded with ``seed`` (budget as constraints)."""
        constraints = None
        if (self.recipe.max_macs > 0 or self.recipe.max_latency_ms > 0) and not (
            _has_set_constraint()
        ):
            constraints = self._constraints  # Optuna < 5: constraints_func
        # Several workers may share this study at any time: constant liar always costs little.
        return optuna_sampler(
            self.recipe, self.ctx.scorer, seed=seed, constraints_func=constraints, workers=2
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
        """Create or load the study and join it as a new worker (ordinal, sampler seed)."""
        import optuna

        if self.study is not None:
            return self.study
        optuna.logging.set_verbosity(optuna.logging.ERROR)
        directions = list(self.ctx.scorer.directions)
        with self._claim_lock:
            storage = open_storage(
                self.storage_url, heartbeat_s=self.recipe.heartbeat_s, grace_s=self.recipe.grace_s
            )
            try:
                with _quiet():
                    study = optuna.create_study(
                        storage=storage,
                        sampler=self.make_sampler(self.recipe.seed),
                        pruner=self.make_pruner(),
                        study_name=self.study_name,
                        directions=directions,  # type: ignore[arg-type]
                        load_if_exists=True,
                    )
            except Exception as exc:
                raise RecipeError(f"cannot open study {self.study_name!r}: {exc}") from None
            stored_dirs = [d.name.lower() for d in study.directions]
            if stored_dirs != directions:
                raise RecipeError(
                    f"study {self.study_name!r} in {self.storage_url} optimises {stored_dirs}, "
                    f"not {directions}: use another --study-name or --out"
                )
            key = {"space": getattr(self.space, "name", ""), "score": self.recipe.score}
            attrs = study.user_attrs
            stored = attrs.get(_STUDY_KEY)
            if stored is None:  # a new study: its first trials are the warm-start ones
                study.set_user_attr(_STUDY_KEY, key)
                for params in self.ctx.warm_start:
                    study.enqueue_trial(params, skip_if_exists=True)
            elif stored != key:
                raise RecipeError(
                    f"study {self.study_name!r} was created for {stored}, not {key}: use "
                    "another --study-name or --out"
                )
            self.ordinal = int(attrs.get(_STUDY_WORKERS, 0))
            study.set_user_attr(_STUDY_WORKERS, self.ordinal + 1)
        study.sampler = self.make_sampler(worker_seed(self.recipe.seed, self.ordinal))
        self.study = study
        return study

    # -- the claim: count, ask, reserve the architecture ----------------------------------------

    def _fail_lost(self, study: Any, trials: Sequence[Any]) -> bool:
        """Mark RUNNING trials of dead workers FAIL (not counted); True if any was marked."""
        from optuna.trial import TrialState

        storage = study._storage
        changed = False
        if not self._local_files:
            import optuna

            with _quiet():
                optuna.storages.fail_stale_trials(study)
            running = {t.number for t in trials if t.state == TrialState.RUNNING}
            now = study.get_trials(deepcopy=False)
            # Optuna marks them FAIL itself (no attribute can be set on a finished trial): the
            # record says why (_trial_to_result: no heartbeat for the grace period)
            stale = [t for t in now if t.number in running and t.state == TrialState.FAIL]
            for t in stale:
                _LOG.warning(
                    "trial %d lost: its worker sent no heartbeat for %d s; not counted",
                    t.number,
                    self.recipe.grace_s,
                )
                if self.on_trial is not None:
                    self.on_trial(_trial_to_result(t, self.recipe.seed))
            changed = bool(stale)
        for t in trials:
            if t.state != TrialState.RUNNING:
                continue
            worker = t.user_attrs.get(_ATTR_WORKER)
            if worker is None:
                # Asked and given its worker under the claim lock, which we hold now: a RUNNING
                # trial without a worker belongs to a process killed between the two.
                reason = "lost: its worker was killed while claiming it; not counted"
            elif self._local_files and not self._alive(str(worker)):
                reason = (
                    f"lost: worker {worker} ended while it ran (killed or crashed); not "
                    "counted, another trial runs in its place"
                )
            else:
                continue
            try:
                storage.set_trial_user_attr(t._trial_id, _ATTR_LOST, reason)
                storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
            except Exception as exc:  # another worker got there first
                _LOG.debug("trial %d already finished: %s", t.number, exc)
                continue
            _LOG.warning("trial %d %s", t.number, reason)
            changed = True
            if self.on_trial is not None:
                self.on_trial(_trial_to_result(storage.get_trial(t._trial_id), self.recipe.seed))
        return changed

    def _claim(self, study: Any) -> _Claim | _Wait | None:
        """Under the claim lock: None when the study has its trials, :class:`_Wait` when the
        rest are running (one may yet be lost and need a replacement), else a new trial."""
        from optuna.trial import TrialState

        with self._claim_lock:
            trials = study.get_trials(deepcopy=False)
            if self._fail_lost(study, trials):
                trials = study.get_trials(deepcopy=False)
            done = sum(1 for t in trials if counted(t))
            if done >= self.recipe.trials:
                return None
            if self.ctx.out_of_time():  # --timeout-min: running trials finish, none starts
                if not self._told_timeout.is_set():
                    self._told_timeout.set()
                    _LOG.info("wall-clock budget spent: no new trial starts (%d done)", done)
                return None
            running = sum(1 for t in trials if t.state == TrialState.RUNNING)
            if done + running >= self.recipe.trials:
                return _Wait()
            with _quiet():
                trial = study.ask()
            with self._active_lock:  # from here on, an interrupt marks it
                self._active[trial.number] = trial
            trial.set_user_attr(_ATTR_WORKER, self.worker)
            if not self._local_files:
                study._storage.record_heartbeat(trial._trial_id)
            params = suggest_params(self.space, trial)
            try:
                spec = self.space.decode(params)
            except Exception:
                return _Claim(trial, params, None, None)
            text = spec.encode()
            twin = None
            for t in trials:  # trials read before ask(): this one is not among them
                if t.user_attrs.get(_ATTR_SPEC) == text and not _is_lost(t):
                    twin = t.number
                    break
            trial.set_user_attr(_ATTR_SPEC, text)
            return _Claim(trial, params, spec, twin)

    # -- running one trial ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _heartbeat(self, trial: Any) -> Iterator[None]:
        """Record heartbeats of ``trial`` on an RDB (file storages use worker locks instead)."""
        if self._local_files:
            yield
            return
        storage = self.study._storage
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self.recipe.heartbeat_s):
                with contextlib.suppress(Exception):
                    storage.record_heartbeat(trial._trial_id)

        thread = threading.Thread(target=beat, daemon=True, name=f"heartbeat-{trial.number}")
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join(timeout=1.0)

    def _wait_for(self, study: Any, number: int) -> Any:
        """The FrozenTrial ``number`` once finished (another worker's run of the same spec)."""
        from optuna.trial import TrialState

        while True:
            ft = study.get_trials(deepcopy=False)[number]
            if ft.state != TrialState.RUNNING:
                return ft
            with self._claim_lock:
                self._fail_lost(study, [ft])
            if self._stop.is_set():
                raise _Interrupted
            time.sleep(_POLL_S)

    def _evaluate(self, claim: _Claim) -> TrialResult:
        assert self.objective is not None
        trial = claim.trial
        if claim.spec is None:
            return self.objective(claim.params, number=trial.number)  # records the decode error
        if claim.twin is not None:
            ft = self._wait_for(self.study, claim.twin)
            if not _is_lost(ft) and ft.user_attrs.get(_ATTR_RESULT):
                twin = TrialResult.from_dict(ft.user_attrs[_ATTR_RESULT])
                return twin.replace(
                    number=trial.number,
                    params=claim.params,
                    seed=self.recipe.seed + trial.number,
                    wall_s=0.0,
                    note=f"same spec as trial {ft.number}: its result reused, not re-evaluated",
                    metrics={**dict(twin.metrics), "duplicate_of": float(ft.number)},
                )
        report = None
        if not self.ctx.scorer.multi_objective:

            def report(epoch: int, accuracy: float) -> bool:
                trial.report(accuracy, epoch)
                return bool(trial.should_prune())

        return self.objective.evaluate_spec(
            claim.spec, number=trial.number, params=claim.params, report=report
        )

    def _tell(self, trial: Any, result: TrialResult) -> None:
        """Record ``result`` on the trial and finish it in the storage."""
        from optuna.trial import TrialState

        assert self.objective is not None
        trial.set_user_attr(_ATTR_RESULT, result.to_dict())
        if "duplicate_of" in result.metrics:  # visible in optuna-dashboard
            trial.set_user_attr(_ATTR_DUPLICATE, int(result.metrics["duplicate_of"]))
        budget = self.objective.budget
        constraints = budget.constraints(result.macs, result.judged_cost("latency_ms"))
        if constraints:
            trial.set_user_attr(_ATTR_CONSTRAINTS, list(constraints))
            if _has_set_constraint():
                names = [n for n in ("max_macs", "max_latency_ms") if getattr(budget, n)]
                for key, value in zip(names, constraints, strict=True):
                    trial.set_constraint(key, float(value))
        with _quiet():
            if result.state == "COMPLETE" or (
                result.state == "REJECTED" and self.ctx.scorer.multi_objective
            ):
                try:
                    values = self.objective.values(result)
                except ValueError as exc:  # no cost to score on: a failure, never a 0 cost
                    trial.set_user_attr(_ATTR_ERROR, str(exc))
                    self.study.tell(trial, state=TrialState.FAIL)
                    return
                self.study.tell(trial, list(values))
            elif result.state in ("REJECTED", "PRUNED"):
                self.study.tell(trial, state=TrialState.PRUNED)
            else:
                trial.set_user_attr(_ATTR_ERROR, result.error)
                self.study.tell(trial, state=TrialState.FAIL)

    def _run_one(self, claim: _Claim) -> None:
        trial = claim.trial
        # On an exception (Ctrl-C, SIGTERM) the trial stays in _active for interrupt().
        with self._heartbeat(trial):  # also while waiting for a twin trial
            result = self._evaluate(claim)
        try:
            self._tell(trial, result)
        except Exception as exc:
            import optuna

            if not isinstance(exc, optuna.exceptions.UpdateFinishedTrialError):
                raise
            # Another worker saw no heartbeat for grace_s (an overloaded machine) and marked
            # the trial lost: it stays lost and uncounted, so the study still ends exact.
            _LOG.warning(
                "trial %d was marked lost by another worker (no heartbeat for %d s); its "
                "result is dropped (raise --set grace_s=... on a loaded machine)",
                trial.number,
                self.recipe.grace_s,
            )
            with self._active_lock:
                self._active.pop(trial.number, None)
            return
        with self._active_lock:
            self._active.pop(trial.number, None)
        if self.on_trial is not None:
            self.on_trial(result)

    def _loop(self) -> None:
        while not self._stop.is_set():
            claim = self._claim(self.study)
            if claim is None:
                return
            if isinstance(claim, _Wait):
                # Exiting now would leave a trial lost after this point (its worker killed)
                # unreplaced: the study would end short. Polling is cheap next to a trial.
                if not self._told_waiting.is_set():
                    self._told_waiting.set()
                    _LOG.info(
                        "all trials asked for; waiting for the running ones (a trial whose "
                        "worker died is replaced%s)",
                        "" if self._local_files else f" after {self.recipe.grace_s} s silence",
                    )
                self._stop.wait(_IDLE_POLL_S)
                continue
            try:
                self._run_one(claim)
            except _Interrupted:
                return

    def interrupt(self, reason: str) -> list[int]:
        """Mark the trials this process is running FAIL with ``reason`` (not counted)."""
        from optuna.trial import TrialState

        self._stop.set()
        with self._active_lock:
            active = dict(self._active)
            self._active.clear()
        marked = []
        for number, trial in active.items():
            try:
                trial.set_user_attr(_ATTR_LOST, reason)
                with _quiet():
                    self.study.tell(trial, state=TrialState.FAIL)
            except Exception as exc:  # already finished
                _LOG.debug("trial %d not marked: %s", number, exc)
                continue
            marked.append(number)
            if self.on_trial is not None:
                ft = self.study._storage.get_trial(trial._trial_id)
                self.on_trial(_trial_to_result(ft, self.recipe.seed))
        return marked

    def run(self, objective: Objective | None, on_trial: OnTrial) -> list[TrialResult]:
        """Work on the study until it has ``recipe.trials`` counted trials, or until the
        wall-clock budget is spent (no trial starts after it); return all records."""
        assert objective is not None, "the Optuna engine runs trials in this process"
        self.objective = objective
        self.on_trial = on_trial
        study = self.open_study()
        folder = self._workers_dir()
        if folder is not None:
            self._worker_lock = FileLock(folder / f"{self.worker}.lock")
            self._worker_lock.acquire()
        try:
            threads = [
                threading.Thread(target=self._loop, daemon=True, name=f"aanas-job-{i}")
                for i in range(1, self.recipe.n_jobs)
            ]
            for t in threads:
                t.start()
            try:
                self._loop()
                for t in threads:
                    while t.is_alive():
                        t.join(timeout=0.5)
            except BaseException as exc:
                name = getattr(exc, "signal_name", "") or (
                    "SIGINT (Ctrl-C)" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
                )
                marked = self.interrupt(f"interrupted by {name}: not counted, rerun to resume")
                with contextlib.suppress(Exception), self._claim_lock:
                    # a trial asked for just as the signal came, before it had a worker
                    self._fail_lost(study, study.get_trials(deepcopy=False))
                if marked:
                    _LOG.warning(
                        "%s: trial(s) %s marked FAIL (interrupted, not counted)",
                        name,
                        ", ".join(map(str, marked)),
                    )
                raise
            with self._claim_lock:
                trials = study.get_trials(deepcopy=False)
                self._fail_lost(study, trials)
        finally:
            if self._worker_lock is not None:
                self._worker_lock.release()
                with contextlib.suppress(OSError):
                    self._worker_lock.path.unlink()
        return study_results(study, self.recipe.seed)

    def final_write_lock(self) -> Any:
        """The claim lock: hold it while rewriting the run directory from the storage."""
        return self._claim_lock
