"""``aanas search``: load the space, validate every input, prepare the evaluator, run the engine,
keep the run directory up to date, and write the summary, Pareto front and best model.

Scores follow MnasNet (arXiv:1807.11626, Eq. 2); the searched networks are attention-augmented
(arXiv:1904.09925). The engine is looked up by name in :mod:`aanas.search.engine`'s registry,
so this module has no per-engine branches.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# The engine modules register themselves (neither imports optuna or ray at import time).
import aanas.search.optuna_engine  # noqa: F401
import aanas.search.ray_engine  # noqa: F401
from aanas.config import SearchRecipe
from aanas.errors import RecipeError
from aanas.results import TrialResult
from aanas.search.engine import SearchContext, get_engine
from aanas.search.objective import Evaluator, Objective
from aanas.search.run_dir import RunDirectory, TrialLog, best_result, is_lost, summary_text
from aanas.search.scoring import Scorer

__all__ = ["SearchOutcome", "default_run_name", "run_search", "show_run"]

_LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchOutcome:
    """What :func:`run_search` returns (everything is also in the run directory)."""

    run_dir: RunDirectory
    results: list[TrialResult]
    best: TrialResult | None
    front: list[TrialResult]
    baselines: list[TrialResult]
    summary: str
    wall_s: float


def default_run_name(recipe: SearchRecipe) -> str:
    """``<space>-<engine>-<evaluator>``, e.g. ``tiny-optuna-supernet``."""
    return f"{Path(recipe.space).stem}-{recipe.engine}-{recipe.evaluator}"


def _default_target_macs(space: Any, count: Callable[[Any], tuple[int, int]]) -> float:
    """Geometric mean of the space's smallest and largest MACs: a target inside the range."""
    small = count(space.smallest())[1]
    large = count(space.largest())[1]
    return float(math.sqrt(max(small, 1) * max(large, 1)))


def _count(spec: Any) -> tuple[int, int]:
    from aanas.cost.flops import count_spec

    cost = count_spec(spec)
    return int(cost.params), int(cost.macs)


def _baselines(
    names: Sequence[str], space: Any, objective: Objective, evaluator_name: str
) -> list[TrialResult]:
    """Evaluate registered models through the search's own evaluator, where they fit."""
    from aanas.models import get_spec

    out: list[TrialResult] = []
    for i, name in enumerate(names, 1):
        spec = get_spec(name)  # known: checked at start-up (_validate_baselines)
        base = space.base
        spec = dataclasses.replace(spec, input_size=base.input_size, num_classes=base.num_classes)
        if evaluator_name == "supernet":
            try:
                space.encode_params(spec)
            except ValueError:
                _LOG.warning("baseline %s skipped: not a path of the %s supernet", name, space.name)
                continue
        try:
            spec = spec.validate()
        except ValueError as exc:
            _LOG.warning("baseline %s skipped: %s", name, exc)
            continue
        out.append(objective.evaluate_spec(spec, number=-i, name=name))
    return out


class _Progress:
    """tqdm bar over finished trials (those counted toward ``--trials``: a lost or interrupted
    trial is replaced by another, so it is not progress) with the best score so far."""

    def __init__(self, total: int, *, enabled: bool, multi: bool) -> None:
        self.multi = multi
        self.seen: set[int] = set()
        self.best: TrialResult | None = None
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="search", unit="trial", file=sys.stderr)

    def update(self, records: Sequence[TrialResult]) -> None:
        """Fold newly finished ``records`` in: O(len(records)), not O(all trials)."""
        if self.bar is None:
            return
        for r in records:
            if r.state != "RUNNING" and not is_lost(r):
                self.seen.add(r.number)
            if self.best is None or best_result([self.best, r], multi_objective=self.multi) is r:
                if r.state == "COMPLETE" and r.accuracy is not None:
                    self.best = r
        self.bar.n = min(len(self.seen), self.bar.total)
        best = self.best
        if best is not None:
            score = f"acc={100 * (best.accuracy or 0):.1f}% macs={(best.macs or 0) / 1e6:.2f}M"
            if best.reward is not None:
                score = f"reward={best.reward:.4f} " + score
            self.bar.set_postfix_str(f"best #{best.number} {score}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class _SessionClock:
    """This session's wall-clock interval in the run directory's ``time.json`` and the deadline
    of ``--timeout-min`` (time spent by earlier sessions on the directory counts).

    The interval is rewritten after the supernet is ready, after every trial and at the end, so
    a killed session loses at most the unfinished trial's time from the ledger.
    """

    def __init__(self, run_dir: RunDirectory, timeout_min: float, start: float) -> None:
        self.run_dir = run_dir
        self.start = start
        self.session = f"{socket.gethostname()}-{os.getpid()}-{time.time_ns()}"
        spent = run_dir.spent_s()
        self.deadline = start + 60.0 * timeout_min - spent if timeout_min > 0 else None
        if self.deadline is not None and spent > 0:
            _LOG.info("resumed run: %.1f of %.1f min already spent", spent / 60.0, timeout_min)

    def touch(self) -> None:
        """Record [start, now] for this session."""
        self.run_dir.record_session(self.session, self.start, time.time())


def _validate_baselines(names: Sequence[str]) -> None:
    """Unknown ``--baselines`` names fail at start-up, before the supernet or any trial."""
    from aanas.models import get_spec

    for name in names:
        try:
            get_spec(name)
        except (KeyError, ValueError) as exc:
            msg = " ".join(str(exc).strip("'\"").split())
            raise RecipeError(f"baselines: unknown model {name!r} ({msg})") from None


def warm_start_params(names: Sequence[str], space: Any) -> tuple[dict[str, Any], ...]:
    """The space parameters of each ``recipe.warm_start`` entry (a registered name or a spec
    string), at the space's input size and classes.

    Raises:
        RecipeError: an unknown name, a bad spec string, or an architecture the space cannot
            express (it names the entry and the space).
    """
    from aanas.models import resolve_spec

    out = []
    for name in names:
        try:
            spec = dataclasses.replace(
                resolve_spec(name),
                input_size=space.base.input_size,
                num_classes=space.base.num_classes,
            )
            out.append(space.encode_params(spec))
        except (KeyError, ValueError) as exc:
            msg = " ".join(str(exc).strip("'\"").split()).removeprefix(f"{space.name}: ")[:300]
            raise RecipeError(f"warm_start: {name!r} cannot start {space.name}: {msg}") from None
    return tuple(out)


def _check_resume(run_dir: RunDirectory, recipe: SearchRecipe) -> None:
    """Settings that would make a resumed run incomparable must match the first run's."""
    meta = run_dir.read_meta()
    for key in ("space", "engine", "evaluator", "score", "data"):
        old = meta.get("recipe", {}).get(key)
        if old is not None and old != getattr(recipe, key):
            raise RecipeError(
                f"{run_dir.path} holds a search with {key}={old!r}, not "
                f"{getattr(recipe, key)!r}: use another --out"
            )


def _prepare_supernet(
    recipe: SearchRecipe,
    space: Any,
    data: Any,
    run_dir: RunDirectory,
    device: str,
    deadline: float | None,
) -> Any:
    """Train the supernet once per run directory: workers started together queue on a file lock,
    the first trains and saves ``supernet.pt`` (atomically), the others then load it.

    Under ``--timeout-min`` (``deadline``, Unix time) the training gets
    ``supernet_budget_share`` of the budget, and never more than is left: its schedule is
    compressed to fit, so candidates are evaluated in the rest.
    """
    from aanas.search._locks import FileLock
    from aanas.search.evaluators import prepare_supernet

    budget = 0.0
    if deadline is not None:
        share = recipe.supernet_budget_share * recipe.timeout_min * 60.0
        budget = max(1.0, min(share, deadline - time.time()))

    def prepare() -> Any:
        return prepare_supernet(
            recipe, space, data, path=run_dir.supernet_pt, device=device, time_budget_s=budget
        )

    if recipe.supernet:
        return prepare()
    with FileLock(run_dir.path / ".supernet.lock"):
        return prepare()


def _best_state(objective: Objective, best: TrialResult) -> Any:
    """The best trial's weights from the evaluator (None, with a warning, when it has none)."""
    state = None
    state_fn = getattr(objective.evaluator, "state_dict_for", None)
    if state_fn is not None:
        try:
            from aanas.spec import decode

            state = state_fn(decode(best.spec), seed=best.seed)
        except Exception as exc:
            _LOG.warning("best/model.pt not written: %s", exc)
    if state is None:
        _LOG.warning("no weights for the best trial %d: best/model.pt not written", best.number)
    return state


def run_search(
    recipe: SearchRecipe,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    evaluator: Evaluator | None = None,
) -> SearchOutcome:
    """Run (or resume, or join) a search and write its run directory.

    Every input is checked before anything expensive runs (space, baselines, storage, latency
    table, data); several processes may run the same call on one run directory or storage
    (see :mod:`aanas.search.optuna_engine`).

    Args:
        recipe: the settings.
        out: run directory (default ``runs/<space>-<engine>-<evaluator>``).
        progress: show a tqdm bar on stderr.
        evaluator: use this evaluator instead of the one ``recipe.evaluator`` names (tests,
            custom accuracy predictors); it must be picklable for the Ray engine.

    Raises:
        AanasError: bad settings, an unknown space or baseline, a storage that cannot be
            opened, or a resumed study created with different settings.
        KeyboardInterrupt: Ctrl-C or SIGTERM; the running trial is marked FAIL (interrupted,
            not counted) and ``trials.*`` are rewritten from the storage before it propagates.
    """
    from aanas.search.evaluators import build_objective, latency_fns
    from aanas.space import SearchSpace

    start = time.perf_counter()
    start_unix = time.time()
    space = SearchSpace.from_yaml(recipe.space)
    _validate_baselines(recipe.baselines)
    warm_start = warm_start_params(recipe.warm_start, space)
    latency_fns(recipe)  # a bad latency table fails here, not in every trial
    run_dir = RunDirectory(out or Path("runs") / default_run_name(recipe)).create()
    _check_resume(run_dir, recipe)
    clock = _SessionClock(run_dir, recipe.timeout_min, start_unix)
    scorer = Scorer.from_recipe(recipe, default_target_macs=_default_target_macs(space, _count))
    multi = scorer.multi_objective
    ctx = SearchContext(
        space=space,
        recipe=recipe,
        scorer=scorer,
        run_dir=run_dir,
        study_name=recipe.study_name or run_dir.path.resolve().name,
        evaluator=evaluator,
        deadline=clock.deadline,
        warm_start=warm_start,
    )
    engine = get_engine(recipe.engine)(ctx)
    engine.check()  # fail fast on a bad --storage / cluster, before any training

    device = "cpu"
    data = None
    supernet = None
    if evaluator is None:
        from aanas.search.evaluators import build_data_for, resolve_device

        device = resolve_device(recipe.device)
        data = build_data_for(recipe, space.base.input_size)
        if data.num_classes != space.base.num_classes:
            raise RecipeError(
                f"space {space.name!r} has {space.base.num_classes} classes but data "
                f"{recipe.data!r} has {data.num_classes}"
            )
    run_dir.write_meta(
        {
            "recipe": recipe.to_dict(),
            "space": {"name": space.name, "source": str(space.source), "size": space.size()},
            "score": scorer.describe(),
            "cost_metric": scorer.metric,
            "target": scorer.target,
            "multi_objective": multi,
            "storage": engine.storage_description(),
            "study_name": ctx.study_name,
        }
    )
    if evaluator is None and recipe.evaluator == "supernet":
        supernet = _prepare_supernet(recipe, space, data, run_dir, device, clock.deadline)
        clock.touch()  # its training time is spent even if this session is killed later

    def in_process_objective() -> Objective:
        return build_objective(
            recipe,
            space,
            scorer,
            evaluator=evaluator,
            data=data,
            device=device,
            supernet=supernet,
            checkpoint_dir=run_dir.models_dir,
        )

    # Engines that run trials here get the objective now; the others build it in workers.
    objective = in_process_objective() if engine.in_process else None

    log = TrialLog(run_dir, cost=scorer.metric)
    log.load(run_dir.read_trials())
    bar = _Progress(recipe.trials, enabled=progress, multi=multi)
    bar.update(log.results())

    def on_trial(record: TrialResult) -> None:
        log.add(record)
        bar.update([record])
        clock.touch()

    try:
        results = engine.run(objective, on_trial)
    except KeyboardInterrupt:
        stored = engine.stored_results()
        if stored:
            with engine.final_write_lock():
                run_dir.write_trials(engine.stored_results())
        raise
    finally:
        bar.close()
        clock.touch()

    # Baselines and best weights need an in-process evaluator (Ray: rebuilt here once).
    if objective is None:
        objective = in_process_objective()
    baselines = run_dir.read_baselines()
    done = {b.name for b in baselines}
    todo = [n for n in recipe.baselines if n not in done]
    if todo:
        baselines += _baselines(todo, space, objective, recipe.evaluator)
        run_dir.write_baselines(baselines)

    # Workers sharing the run directory take turns here, each re-reading the storage under the
    # lock, so the last one to finish writes what the storage finally holds.
    with engine.final_write_lock():
        results = engine.stored_results() or results
        run_dir.write_trials(results)
        front = run_dir.write_pareto(results, baselines, cost=scorer.metric, plot=True)
        best = best_result(results, multi_objective=multi)
        if best is not None:
            run_dir.write_best(best, _best_state(objective, best))
        title = f"Search {run_dir.path.name}: {space.name}, {recipe.engine}, {recipe.evaluator}"
        summary = run_dir.write_summary(
            results,
            baselines,
            title=title,
            score=scorer.describe(),
            multi_objective=multi,
            top_k=recipe.top_k,
            cost=scorer.metric,
        )
    return SearchOutcome(
        run_dir=run_dir,
        results=results,
        best=best,
        front=front,
        baselines=baselines,
        summary=summary,
        wall_s=time.perf_counter() - start,
    )


def show_run(path: str | Path, *, top_k: int | None = None) -> str:
    """The summary of an existing run directory (``aanas show``), rebuilt from its files."""
    run_dir = RunDirectory(path)
    if not run_dir.path.is_dir():
        raise FileNotFoundError(f"run directory not found: {run_dir.path}")
    if not run_dir.trials_jsonl.is_file():
        raise ValueError(f"{run_dir.path} is not a search run directory (no trials.jsonl)")
    meta = run_dir.read_meta()
    recipe = meta.get("recipe", {})
    results = run_dir.read_trials()
    return summary_text(
        results,
        run_dir.read_baselines(),
        title=f"Search {run_dir.path.name}: {recipe.get('space', '?')}, "
        f"{recipe.get('engine', '?')}, {recipe.get('evaluator', '?')}",
        score=str(meta.get("score", "?")),
        multi_objective=bool(meta.get("multi_objective", False)),
        top_k=top_k or int(recipe.get("top_k", 10)),
        cost=str(meta.get("cost_metric", "macs")),
    )
