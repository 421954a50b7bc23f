"""How well an accuracy estimator ranks architectures: rank correlations with intervals, and
architecture sets that span a space's cost range.

A weight-sharing evaluator is only useful if it orders candidates as training them would (Yu et
al., "Evaluating the search phase of neural architecture search", arXiv:1902.08142). This module
measures that order agreement:

- :func:`kendall_tau` / :func:`spearman_rho`: scipy's tau-b and rho;
- :func:`bootstrap_interval`: paired percentile bootstrap over architectures (Efron &
  Tibshirani 1993, ch. 13): with 20 architectures a tau of 0.6 is not the same claim as a tau
  whose 95 % interval is [0.3, 0.8];
- :func:`ranking_report`: both, with intervals, and whether the estimator's top k holds the
  truly best architecture (what a search actually needs);
- :func:`near_cost_agreement`: the share of similar-cost pairs ordered as the truth orders
  them. On a set spread over a wide cost range "bigger is better" alone earns a high tau, but
  a constrained search compares candidates of about the same cost, where size says little;
- :func:`stratified_by_macs`: architectures spread over the space's MAC range, so the true
  accuracies differ by more than the noise of training them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from scipy import stats

from aanas.cost import count_spec
from aanas.space import SearchSpace
from aanas.spec import ArchSpec

__all__ = [
    "RankingReport",
    "bootstrap_interval",
    "kendall_tau",
    "near_cost_agreement",
    "ranking_report",
    "spearman_rho",
    "stratified_by_macs",
    "top_k_contains_best",
]

Statistic = Callable[[Sequence[float], Sequence[float]], float]


def _paired(x: Sequence[float], y: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"need two equally long 1-d sequences, got {a.shape} and {b.shape}")
    return a, b


def kendall_tau(x: Sequence[float], y: Sequence[float]) -> float:
    """Kendall's tau-b (ties in either list counted as scipy does); NaN if a list is constant."""
    a, b = _paired(x, y)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(stats.kendalltau(a, b).statistic)


def spearman_rho(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if a list is constant."""
    a, b = _paired(x, y)
    if len(a) < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    return float(stats.spearmanr(a, b).statistic)


def bootstrap_interval(
    x: Sequence[float],
    y: Sequence[float],
    statistic: Statistic,
    *,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(x, y)``, resampling the pairs.

    Written out rather than ``scipy.stats.bootstrap``: a resample that repeats one architecture
    ``n`` times has a constant list and a NaN correlation, which scipy propagates into the whole
    interval; here those resamples are dropped (with 20 architectures: a fraction of ~1e-7).

    Returns:
        ``(low, high)``; ``(nan, nan)`` when fewer than 2 pairs or no resample is defined.
    """
    a, b = _paired(x, y)
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level!r}")
    n = len(a)
    if n < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_resamples):
        idx = rng.integers(0, n, n)
        v = statistic(a[idx].tolist(), b[idx].tolist())
        if math.isfinite(v):
            values.append(v)
    if not values:
        return float("nan"), float("nan")
    tail = (1.0 - level) / 2.0 * 100.0
    low, high = np.percentile(values, [tail, 100.0 - tail])
    return float(low), float(high)


def top_k_contains_best(predicted: Sequence[float], truth: Sequence[float], k: int = 5) -> bool:
    """Whether the ``k`` highest ``predicted`` scores include an architecture of highest
    ``truth`` (ties in ``predicted`` at the k-th place count in its favour: the cut is a value).

    Example: predicted ``[0.9, 0.5, 0.7]``, truth ``[0.6, 0.8, 0.7]``, k = 2 -> False.
    """
    p, t = _paired(predicted, truth)
    if len(p) == 0:
        return False
    cut = np.sort(p)[::-1][min(k, len(p)) - 1]
    best = t == t.max()
    return bool(np.any(best & (p >= cut)))


def near_cost_agreement(
    predicted: Sequence[float],
    truth: Sequence[float],
    costs: Sequence[float],
    max_ratio: float = 1.5,
) -> tuple[float, int]:
    """(share of pairs ordered as ``truth`` orders them, number of pairs) over the pairs whose
    costs are within ``max_ratio`` of each other; pairs tied in either list are left out.

    0.5 is a coin flip. NaN share when no pair qualifies.

    Raises:
        ValueError: unequal lengths, a cost <= 0 or ``max_ratio`` < 1.
    """
    p, t = _paired(predicted, truth)
    _, c = _paired(predicted, costs)
    if max_ratio < 1 or np.any(c <= 0):
        raise ValueError(f"need costs > 0 and max_ratio >= 1, got {max_ratio!r}")
    i, j = np.triu_indices(len(p), k=1)
    near = np.maximum(c[i], c[j]) <= max_ratio * np.minimum(c[i], c[j])
    sign = np.sign(p[i] - p[j]) * np.sign(t[i] - t[j])
    counted = near & (sign != 0)
    n = int(counted.sum())
    return (float((sign[counted] > 0).mean()) if n else float("nan")), n


@dataclass(frozen=True)
class RankingReport:
    """Agreement of an estimator with the ground truth over ``n`` architectures."""

    n: int
    kendall_tau: float
    kendall_tau_ci: tuple[float, float]
    spearman_rho: float
    spearman_rho_ci: tuple[float, float]
    top_k: int
    top_k_contains_best: bool
    level: float = 0.95

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready fields (intervals as lists)."""
        out = asdict(self)
        out["kendall_tau_ci"] = list(self.kendall_tau_ci)
        out["spearman_rho_ci"] = list(self.spearman_rho_ci)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RankingReport:
        """Inverse of :meth:`to_dict` (a report read back from JSON)."""
        return cls(
            **{
                **data,
                "kendall_tau_ci": tuple(data["kendall_tau_ci"]),
                "spearman_rho_ci": tuple(data["spearman_rho_ci"]),
            }
        )


def ranking_report(
    predicted: Sequence[float],
    truth: Sequence[float],
    *,
    k: int = 5,
    n_resamples: int = 2000,
    level: float = 0.95,
    seed: int = 0,
) -> RankingReport:
    """Kendall tau and Spearman rho with bootstrap intervals, and the top-``k`` check."""
    kw: dict[str, Any] = {"n_resamples": n_resamples, "level": level, "seed": seed}
    return RankingReport(
        n=len(predicted),
        kendall_tau=kendall_tau(predicted, truth),
        kendall_tau_ci=bootstrap_interval(predicted, truth, kendall_tau, **kw),
        spearman_rho=spearman_rho(predicted, truth),
        spearman_rho_ci=bootstrap_interval(predicted, truth, spearman_rho, **kw),
        top_k=k,
        top_k_contains_best=top_k_contains_best(predicted, truth, k),
        level=level,
    )


def stratified_by_macs(
    space: SearchSpace, n: int, rng: np.random.Generator, *, pool: int = 0
) -> list[ArchSpec]:
    """``n`` distinct architectures spread over the space's MAC range, cheapest first.

    Draws a pool of distinct random architectures (``pool``, default ``30 * n``, plus the
    space's smallest and largest), splits ``[log min MACs, log max MACs]`` of the pool into
    ``n`` equally wide strata and takes one random member of every non-empty stratum; slots of
    empty strata go to random members of the rest. Uniform sampling alone would crowd the
    middle of the range, where true accuracies differ by less than training noise.

    Raises:
        ValueError: ``n`` < 1 or the space has fewer than ``n`` architectures.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n!r}")
    if space.size() < n:
        raise ValueError(f"space {space.name!r} has {space.size()} architectures, fewer than {n}")
    target = max(pool or 30 * n, n)
    candidates: dict[ArchSpec, None] = {space.smallest(): None, space.largest(): None}
    attempts = 0
    while len(candidates) < min(target, space.size()) and attempts < 50 * target:
        candidates[space.sample(rng)] = None
        attempts += 1
    specs = list(candidates)
    log_macs = np.log(np.array([count_spec(s).macs for s in specs], dtype=float))
    lo, hi = float(log_macs.min()), float(log_macs.max())
    width = (hi - lo) / n or 1.0
    strata = np.minimum(((log_macs - lo) / width).astype(int), n - 1)
    chosen: list[int] = []
    for s in range(n):
        members = np.flatnonzero(strata == s)
        if len(members):
            chosen.append(int(rng.choice(members)))
    rest = [i for i in range(len(specs)) if i not in set(chosen)]
    if len(chosen) < n:
        extra = rng.choice(len(rest), size=n - len(chosen), replace=False)
        chosen += [rest[int(j)] for j in extra]
    chosen.sort(key=lambda i: (log_macs[i], specs[i].encode()))
    return [specs[i] for i in chosen]
