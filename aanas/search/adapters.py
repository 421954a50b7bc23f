"""Translate a :class:`~aanas.space.SearchSpace` into Optuna and Ray Tune search spaces.

Both engines end in ``space.decode(params)``, so equal parameter values give equal specs
whichever engine proposed them. Optuna is driven define-by-run: a conditional parameter
(``stage3.aa.kappa`` exists only where the stage's attention is on) is suggested only when its
parents' values make it active. Ray Tune's static ``param_space`` cannot express conditions, so
:func:`ray_param_space` samples every parameter and :func:`ray_config_to_spec` drops the
inactive ones before decoding; for conditional sampling in Ray use
``OptunaSearch(space=ray_define_by_run(space))``.

optuna and ray are imported lazily, inside the functions that need them.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from aanas.config import SearchRecipe
from aanas.space import IntRange, SearchSpace
from aanas.spec import ArchSpec

__all__ = [
    "active_params",
    "optuna_sampler",
    "ray_config_to_spec",
    "ray_define_by_run",
    "ray_param_space",
    "suggest",
    "suggest_params",
]


def suggest_params(space: SearchSpace, trial: Any) -> dict[str, Any]:
    """Suggest the active parameters of ``space`` on an ``optuna.Trial``, parents first.

    Args:
        space: the search space.
        trial: an ``optuna.trial.Trial`` (or anything with ``suggest_categorical`` and
            ``suggest_int``).

    Returns:
        The flat parameter dict, as :meth:`SearchSpace.decode` takes it.
    """
    params: dict[str, Any] = {}
    for p in space.parameters:
        if not space.is_active(p, params):
            continue
        if isinstance(p, IntRange):
            params[p.name] = trial.suggest_int(p.name, p.low, p.high, step=p.step)
        else:
            params[p.name] = trial.suggest_categorical(p.name, list(p.choices))
    return params


def suggest(space: SearchSpace, trial: Any) -> ArchSpec:
    """Optuna define-by-run: suggest the parameters and decode them into a spec."""
    return space.decode(suggest_params(space, trial))


def ray_param_space(space: SearchSpace) -> dict[str, Any]:
    """A Ray Tune ``param_space``: one ``tune.choice``/``tune.randint`` per parameter.

    Every parameter is sampled, also where it is inactive; :func:`ray_config_to_spec` ignores
    the inactive ones, so the distribution over active values is the same as
    :meth:`SearchSpace.sample_params`.
    """
    from ray import tune  # lazy: ray is heavy to import

    out: dict[str, Any] = {}
    for p in space.parameters:
        if isinstance(p, IntRange):
            # tune.qrandint's upper bound is inclusive; randint's is exclusive
            out[p.name] = tune.qrandint(p.low, p.high, p.step)
        else:
            out[p.name] = tune.choice(list(p.choices))
    return out


def active_params(space: SearchSpace, config: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of a (Ray) ``config`` that are ``space`` parameters active in it.

    Keys that are not parameters of the space (a learning rate, say) are left out.
    """
    params: dict[str, Any] = {}
    for p in space.parameters:
        if p.name in config and space.is_active(p, params):
            params[p.name] = config[p.name]
    return params


def ray_config_to_spec(space: SearchSpace, config: Mapping[str, Any]) -> ArchSpec:
    """Decode a config sampled from :func:`ray_param_space` (inactive entries ignored)."""
    return space.decode(active_params(space, config))


def ray_define_by_run(space: SearchSpace) -> Callable[[Any], None]:
    """A define-by-run function for ``ray.tune.search.optuna.OptunaSearch(space=...)``.

    Ray then passes only the active parameters in ``config``; decode them with
    :func:`ray_config_to_spec` (or ``space.decode``).
    """

    def define(trial: Any) -> None:
        suggest_params(space, trial)

    return define


def optuna_sampler(
    recipe: SearchRecipe,
    scorer: Any,
    *,
    seed: int | None = None,
    constraints_func: Callable[[Any], Sequence[float]] | None = None,
    workers: int = 1,
) -> Any:
    """The Optuna sampler ``recipe.sampler`` names, for the Optuna engine and Ray's OptunaSearch.

    ``auto`` is TPE, or NSGA-II for a multi-objective ``scorer``; ``seed`` defaults to
    ``recipe.seed``. TPE uses the constant-liar heuristic whenever trials run concurrently
    (``recipe.n_jobs`` threads or more than one ``workers``): running trials then count as bad
    ones, so concurrent workers spread out instead of proposing the same point.
    """
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        # Optuna's default 10 random start-up trials, then grouped multivariate TPE.
        return optuna.samplers.TPESampler(
            seed=seed,
            multivariate=True,
            group=True,
            constant_liar=recipe.n_jobs > 1 or workers > 1,
            constraints_func=constraints_func,
        )
