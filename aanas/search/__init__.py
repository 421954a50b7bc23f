"""Architecture search: one objective, two engines (Optuna, Ray Tune), one run-directory format.

:func:`run_search` is what ``aanas search`` calls: it loads the space, builds the data and the
evaluator (training or loading the supernet once), wires the shared
:class:`~aanas.search.objective.Objective` into the chosen engine, and keeps the run directory
(:mod:`aanas.search.run_dir`) up to date after every trial. Scores follow MnasNet
(arXiv:1807.11626, Eq. 2); the searched networks are attention-augmented (arXiv:1904.09925).

Engines load lazily: importing this package imports neither optuna nor ray.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aanas.results import TrialResult
from aanas.search.objective import (
    ENGINES,
    EVALUATORS,
    Evaluation,
    Evaluator,
    Objective,
    SearchRecipe,
    TrialPrunedError,
)
from aanas.search.run_dir import RunDirectory, best_result, summary_text
from aanas.search.scoring import Budget, Scorer, mnasnet_reward

__all__ = [
    "ENGINES",
    "EVALUATORS",
    "Budget",
    "Evaluation",
    "Evaluator",
    "Objective",
    "RunDirectory",
    "Scorer",
    "SearchOutcome",
    "SearchRecipe",
    "TrialPrunedError",
    "default_run_name",
    "mnasnet_reward",
    "run_search",
    "show_run",
]

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


def _latency_fns(
    recipe: SearchRecipe,
) -> tuple[Callable[[Any], float] | None, Callable[[Any], float] | None]:
    mode = recipe.latency_mode
    if mode == "measure":
        from aanas.cost.latency import measure

        def measured(spec: Any) -> float:
            result = measure(spec, backend="torch", threads=recipe.latency_threads, batch=1)
            return float(result.median_ms)

        return measured, None
    if mode == "predict":
        from aanas.cost.latency import LatencyTable

        assert recipe.latency_table is not None
        table = LatencyTable.load(recipe.latency_table)
        return None, lambda spec: float(table.predict(spec))
    return None, None


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
        spec = get_spec(name)  # ValueError for unknown names, before any work
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
    """tqdm bar over finished trials with the best score so far."""

    def __init__(self, total: int, *, enabled: bool, multi: bool) -> None:
        self.multi = multi
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc="search", unit="trial", file=sys.stderr)

    def update(self, results: Sequence[TrialResult]) -> None:
        if self.bar is None:
            return
        finished = sum(1 for r in results if r.state != "RUNNING")
        self.bar.n = min(finished, self.bar.total)
        best = best_result(results, multi_objective=self.multi)
        if best is not None:
            score = f"acc={100 * (best.accuracy or 0):.1f}% macs={(best.macs or 0) / 1e6:.2f}M"
            if best.reward is not None:
                score = f"reward={best.reward:.4f} " + score
            self.bar.set_postfix_str(f"best #{best.number} {score}", refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_search(
    recipe: SearchRecipe,
    *,
    out: str | Path | None = None,
    progress: bool = True,
    evaluator: Evaluator | None = None,
) -> SearchOutcome:
    """Run (or resume) a search and write its run directory.

    Args:
        recipe: the settings.
        out: run directory (default ``runs/<space>-<engine>-<evaluator>``).
        progress: show a tqdm bar on stderr.
        evaluator: use this evaluator instead of the one ``recipe.evaluator`` names (tests,
            custom accuracy predictors); it must be picklable for the Ray engine.

    Raises:
        ValueError: bad settings, an unknown space, a storage that cannot be opened, or a
            resumed study created with different settings.
    """
    from aanas.space import SearchSpace

    start = time.perf_counter()
    space = SearchSpace.from_yaml(recipe.space)
    run_dir = RunDirectory(out or Path("runs") / default_run_name(recipe)).create()
    storage = recipe.storage or f"sqlite:///{run_dir.study_db.resolve()}"
    study_name = recipe.study_name or run_dir.path.resolve().name
    scorer = recipe.scorer(default_target_macs=_default_target_macs(space, _count))
    multi = scorer.multi_objective
    if recipe.engine == "optuna":  # fail fast on a bad --storage, before any training
        from aanas.search.optuna_engine import open_storage

        open_storage(storage, heartbeat_s=recipe.heartbeat_s, grace_s=recipe.grace_s)
    measure_fn, predict_fn = _latency_fns(recipe)
    # Settings that would make a resumed run incomparable must match the first run's.
    meta = run_dir.read_meta()
    if meta:
        for key in ("space", "engine", "evaluator", "score", "data"):
            old = meta.get("recipe", {}).get(key)
            if old is not None and old != getattr(recipe, key):
                raise ValueError(
                    f"{run_dir.path} holds a search with {key}={old!r}, not "
                    f"{getattr(recipe, key)!r}: use another --out"
                )
    run_dir.write_meta(
        {
            "recipe": recipe.to_dict(),
            "space": {"name": space.name, "source": str(space.source), "size": space.size()},
            "score": scorer.describe(),
            "cost_metric": scorer.metric,
            "target": scorer.target,
            "multi_objective": multi,
            "storage": storage if recipe.engine == "optuna" else None,
            "study_name": study_name,
        }
    )

    device = "cpu"
    supernet = None
    data = None
    if evaluator is None:
        from aanas.search.evaluators import build_data_for, prepare_supernet, resolve_device

        device = resolve_device(recipe.device)
        data = build_data_for(recipe, space.base.input_size)
        if data.num_classes != space.base.num_classes:
            raise ValueError(
                f"space {space.name!r} has {space.base.num_classes} classes but data "
                f"{recipe.data!r} has {data.num_classes}"
            )
        if recipe.evaluator == "supernet":
            supernet = prepare_supernet(
                recipe, space, data, path=run_dir.supernet_pt, device=device
            )

    def in_process_objective(given: Evaluator | None) -> Objective:
        """The objective over ``given``, or over the evaluator the recipe names, built here."""
        if given is None:
            from aanas.search.evaluators import build_evaluator

            assert data is not None
            given = build_evaluator(
                recipe,
                space,
                data,
                device=device,
                supernet=supernet,
                checkpoint_dir=run_dir.models_dir,
            )
        return Objective(
            space,
            given,
            scorer=scorer,
            budget=recipe.budget,
            seed=recipe.seed,
            measure_latency=measure_fn,
            predict_latency=predict_fn,
        )

    # Ray builds its evaluators in the workers; in-process engines need one now.
    objective: Objective | None = None
    if evaluator is not None or recipe.engine == "optuna":
        objective = in_process_objective(evaluator)

    bar = _Progress(recipe.trials, enabled=progress, multi=multi)

    def on_trial(results: list[TrialResult]) -> None:
        run_dir.write_trials(results)
        run_dir.write_pareto(results, cost=scorer.metric, plot=False)
        bar.update(results)

    try:
        if recipe.engine == "optuna":
            from aanas.search.optuna_engine import OptunaEngine, study_results

            assert objective is not None
            engine = OptunaEngine(
                space,
                objective,
                recipe,
                storage=storage,
                study_name=study_name,
                on_trial=on_trial,
            )
            bar.update(study_results(engine.open_study(), recipe.seed))
            results = engine.run()
        else:
            from aanas.search.ray_engine import RayEngine

            ray_engine = RayEngine(
                space,
                recipe,
                scorer=scorer,
                run_dir=run_dir,
                supernet_path=run_dir.supernet_pt if recipe.evaluator == "supernet" else None,
                evaluator=evaluator,
                on_trial=on_trial,
            )
            results = ray_engine.run()
    finally:
        bar.close()

    # Baselines and best weights need an in-process evaluator (Ray: rebuilt here once).
    if objective is None:
        objective = in_process_objective(None)
    baselines = run_dir.read_baselines()
    done = {b.name for b in baselines}
    todo = [n for n in recipe.baselines if n not in done]
    if todo:
        baselines += _baselines(todo, space, objective, recipe.evaluator)
        run_dir.write_baselines(baselines)

    run_dir.write_trials(results)
    front = run_dir.write_pareto(results, baselines, cost=scorer.metric, plot=True)
    best = best_result(results, multi_objective=multi)
    if best is not None:
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
        run_dir.write_best(best, state)
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
