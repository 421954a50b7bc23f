"""The one interface every search engine implements, and the registry the runner looks it up in.

Optuna shapes its samplers and storages this way (``optuna/samplers/_base.py``: a small abstract
base, one implementation per file): :func:`aanas.search.runner.run_search` builds a
:class:`SearchContext`, asks the registry for the engine ``recipe.engine`` names and calls
:meth:`SearchEngine.check` (before any training) and :meth:`SearchEngine.run`. It has no
``if engine == ...`` branch; a new engine is a subclass plus :func:`register_engine`.
"""

from __future__ import annotations

import abc
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from aanas.config import SearchRecipe
from aanas.errors import RecipeError
from aanas.results import TrialResult
from aanas.search.objective import Evaluator, Objective
from aanas.search.run_dir import RunDirectory
from aanas.search.scoring import Scorer

__all__ = [
    "OnTrial",
    "SearchContext",
    "SearchEngine",
    "engine_names",
    "get_engine",
    "register_engine",
]

# Called by an engine with each trial record as it finishes (in the driver process).
OnTrial = Callable[[TrialResult], None]


@dataclass(frozen=True)
class SearchContext:
    """What every engine gets: the settings and where the results go.

    Attributes:
        space: the :class:`aanas.space.SearchSpace`.
        recipe: all settings.
        scorer: reward or Pareto objectives (its target already resolved).
        run_dir: the run directory.
        study_name: name of the study/experiment (many workers share it).
        evaluator: a custom evaluator replacing the one the recipe names (tests, predictors).
        deadline: Unix time after which no new trial may start (``--timeout-min``; None: no
            limit). Running trials finish, as with Optuna's ``study.optimize(timeout=...)``.
        warm_start: parameter dicts (``space.encode_params``) of the architectures a new study
            evaluates first (``recipe.warm_start``, checked and encoded at start-up).
    """

    space: Any
    recipe: SearchRecipe
    scorer: Scorer
    run_dir: RunDirectory
    study_name: str
    evaluator: Evaluator | None = None
    deadline: float | None = None
    warm_start: tuple[dict[str, Any], ...] = ()

    def out_of_time(self) -> bool:
        """True once the wall-clock budget is spent: start no new trial."""
        return self.deadline is not None and time.time() >= self.deadline

    @property
    def supernet_path(self) -> Path | None:
        """Where the supernet of this run lives (supernet evaluator), else None."""
        if self.recipe.evaluator != "supernet":
            return None
        return Path(self.recipe.supernet) if self.recipe.supernet else self.run_dir.supernet_pt


class SearchEngine(abc.ABC):
    """A search engine: proposes parameters, runs the shared objective, reports each trial.

    Subclasses set :attr:`name` and :attr:`in_process` and implement :meth:`run`.
    """

    name: ClassVar[str] = ""
    # True: trials run in this process through the objective the runner passes to run();
    # False: the engine rebuilds the objective in its workers (evaluators.build_objective).
    in_process: ClassVar[bool] = True

    def __init__(self, ctx: SearchContext) -> None:
        self.ctx = ctx

    def check(self) -> None:
        """Raise an :class:`~aanas.errors.AanasError` for settings this engine cannot run
        (bad storage, unreachable cluster) before anything expensive starts."""
        return None

    def storage_description(self) -> str | None:
        """The storage written to ``run.json`` (None when the engine has none)."""
        return None

    def stored_results(self) -> list[TrialResult]:
        """Every record the engine's storage holds now ([] when it keeps none): the run
        directory is rewritten from it when the search ends or is interrupted."""
        return []

    def final_write_lock(self) -> Any:
        """A context manager held while the run directory is rewritten from the storage, so
        workers sharing it do not write stale versions over each other (default: none)."""
        return contextlib.nullcontext()

    @abc.abstractmethod
    def run(self, objective: Objective | None, on_trial: OnTrial) -> list[TrialResult]:
        """Run (or resume) the search until the recipe's trial count; return every record.

        Args:
            objective: the in-process objective (None when :attr:`in_process` is False).
            on_trial: called with each finished record, in the driver.
        """


_REGISTRY: dict[str, type[SearchEngine]] = {}


def register_engine(cls: type[SearchEngine]) -> type[SearchEngine]:
    """Class decorator: make ``cls`` available as ``--engine <cls.name>``."""
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no engine name")
    if cls.name in _REGISTRY and _REGISTRY[cls.name] is not cls:
        raise ValueError(f"engine {cls.name!r} is already registered")
    _REGISTRY[cls.name] = cls
    return cls


def engine_names() -> list[str]:
    """Registered engine names, sorted."""
    return sorted(_REGISTRY)


def get_engine(name: str) -> type[SearchEngine]:
    """The engine class registered as ``name``."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise RecipeError(f"engine must be one of {engine_names()}, got {name!r}") from None
