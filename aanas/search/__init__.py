"""Architecture search: one objective, engines behind one interface, one run-directory format.

- :mod:`aanas.search.runner`: :func:`run_search` (what ``aanas search`` calls) and :func:`show_run`;
- :mod:`aanas.search.engine`: the :class:`SearchEngine` interface and the engine registry;
- :mod:`aanas.search.optuna_engine`, :mod:`aanas.search.ray_engine`: the two engines;
- :mod:`aanas.search.objective`: the engine-agnostic objective (params -> spec -> cost -> score);
- :mod:`aanas.search.evaluators`: weight-sharing and training evaluators, :func:`build_objective`;
- :mod:`aanas.search.scoring`: MnasNet reward (arXiv:1807.11626, Eq. 2), budgets, Pareto mode;
- :mod:`aanas.search.run_dir`: the run directory's files.

This module only re-exports. Importing it imports neither optuna nor ray.
"""

from __future__ import annotations

from aanas.config import ENGINES, EVALUATORS, SearchRecipe
from aanas.search.engine import SearchContext, SearchEngine, engine_names, get_engine
from aanas.search.objective import (
    Evaluation,
    Evaluator,
    Objective,
    TrialFailedError,
    TrialPrunedError,
)
from aanas.search.run_dir import RunDirectory
from aanas.search.runner import SearchOutcome, default_run_name, run_search, show_run
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
    "SearchContext",
    "SearchEngine",
    "SearchOutcome",
    "SearchRecipe",
    "TrialFailedError",
    "TrialPrunedError",
    "default_run_name",
    "engine_names",
    "get_engine",
    "mnasnet_reward",
    "run_search",
    "show_run",
]
