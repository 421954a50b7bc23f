"""Search results as plain records: :class:`TrialResult`, JSONL/CSV IO, Pareto fronts.

Layer L0 (no torch, no optuna, no ray): both search engines, the run-directory writer, ``aanas
show`` and the export step read and write the same records, so a run directory written by one
engine reads the same as one written by the other.

Every record stores the canonical spec string (:func:`aanas.spec.encode`) of its candidate, so a
result can be rebuilt into a model without the search space that produced it.

Files are written atomically (temporary file in the same folder, then :func:`os.replace`): a
search killed while rewriting ``trials.jsonl`` leaves the previous complete file behind, never a
truncated one.

Multi-objective helpers follow the usual definitions (e.g. Deb et al., NSGA-II, 2002): a point
dominates another when it is no worse in every objective and better in at least one; the Pareto
front is the set of non-dominated points; the 2-D hypervolume is the area dominated by the front
and bounded by a reference point.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aanas._io import atomic_write_bytes, atomic_write_text, json_safe

__all__ = [
    "append_csv",
    "append_jsonl",
    "CSV_COLUMNS",
    "STATES",
    "TrialResult",
    "atomic_write_bytes",
    "atomic_write_text",
    "dominates",
    "hypervolume_2d",
    "pareto",
    "pareto_indices",
    "read_csv",
    "read_jsonl",
    "results_hypervolume",
    "to_csv",
    "write_csv",
    "write_jsonl",
]

# COMPLETE: evaluated and scored. PRUNED: stopped early by a pruner/scheduler (partial metrics).
# REJECTED: over the hard cost budget, never trained or evaluated. FAIL: raised (the error is
# kept). RUNNING: still in flight, or lost by a killed worker that nobody marked failed yet.
STATES: tuple[str, ...] = ("COMPLETE", "PRUNED", "REJECTED", "FAIL", "RUNNING")

# Cost keys a Pareto front can be drawn over, minimised; accuracy is maximised.
_COST_KEYS: tuple[str, ...] = ("macs", "n_params", "latency_ms", "latency_pred_ms")

CSV_COLUMNS: tuple[str, ...] = (
    "number",
    "state",
    "accuracy",
    "reward",
    "macs",
    "n_params",
    "latency_ms",
    "latency_pred_ms",
    "wall_s",
    "seed",
    "name",
    "spec",
    "error",
    "note",
    "params",
    "metrics",
)


@dataclass(frozen=True)
class TrialResult:
    """One evaluated (or rejected, pruned, failed) candidate of a search.

    ``accuracy`` is validation top-1 as a fraction in [0, 1] (searches never look at the test
    split). Costs are of the candidate at the search's input size: ``macs`` and ``n_params``
    analytical (:func:`aanas.cost.count_spec`), ``latency_ms`` measured median,
    ``latency_pred_ms`` from a latency table.
    """

    number: int  # trial number within the study (baselines: -1, -2, ...)
    state: str  # one of STATES
    spec: str = ""  # canonical spec string; "" when the params did not decode
    params: Mapping[str, Any] = field(default_factory=dict)  # engine parameters of the trial
    accuracy: float | None = None
    reward: float | None = None  # scalar score the engine optimised (None in Pareto mode)
    macs: int | None = None
    n_params: int | None = None
    latency_ms: float | None = None
    latency_pred_ms: float | None = None
    wall_s: float = 0.0  # seconds spent on this trial, cost filter to final score
    seed: int = 0
    name: str = ""  # baselines: the registered model name; trials: ""
    error: str = ""  # FAIL: "ExceptionType: message"
    note: str = ""  # REJECTED: the budget that was exceeded; duplicates: "same spec as #k"
    metrics: Mapping[str, float] = field(default_factory=dict)  # extras: val_loss, epochs, ...
    # where it ran (Ray: "node=<node id> host=<hostname> pid=<pid> gpus=<CUDA_VISIBLE_DEVICES>");
    # kept in trials.jsonl only, so trials.csv keeps its columns across versions
    worker: str = ""

    def __post_init__(self) -> None:
        if self.state not in STATES:
            raise ValueError(f"state must be one of {STATES}, got {self.state!r}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (inverse of :meth:`from_dict`); NaN/inf become None."""
        out = dataclasses.asdict(self)
        out["params"] = dict(self.params)
        out["metrics"] = dict(self.metrics)
        cleaned: dict[str, Any] = json_safe(out)
        return cleaned

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrialResult:
        """Build from :meth:`to_dict` output; unknown keys raise ``ValueError``."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"TrialResult: unknown key {unknown[0]!r}; expected {sorted(names)}")
        return cls(**dict(data))

    def replace(self, **changes: Any) -> TrialResult:
        """Copy with ``changes`` applied (``dataclasses.replace``)."""
        return dataclasses.replace(self, **changes)

    def cost(self, key: str) -> float | None:
        """The cost ``key`` (``macs``, ``n_params``, ``latency_ms``, ``latency_pred_ms``)."""
        if key not in _COST_KEYS:
            raise ValueError(f"unknown cost key {key!r}; expected one of {_COST_KEYS}")
        value = getattr(self, key)
        return None if value is None else float(value)

    def judged_cost(self, metric: str) -> float | None:
        """The cost this trial is judged on for ``metric``: the one rule for the score, the
        budget constraints, the pruner and the Pareto front, in every engine.

        ``latency_ms``: the measured latency, else the latency table's prediction (a search run
        with ``--latency predict`` has only the latter); any other key: that field. None when
        the cost is unknown, which callers treat as infeasible/unscorable, never as 0.
        """
        if metric == "latency_ms":
            measured = self.cost("latency_ms")
            return measured if measured is not None else self.cost("latency_pred_ms")
        return self.cost(metric)


def _json_default(obj: object) -> Any:
    """Numpy scalars and tuples from engines: plain JSON values."""
    for attr in ("item", "tolist"):
        if hasattr(obj, attr):
            return getattr(obj, attr)()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _json_line(r: TrialResult) -> str:
    return json.dumps(json_safe(r.to_dict()), sort_keys=True, default=_json_default) + "\n"


def write_jsonl(path: str | os.PathLike[str], results: Iterable[TrialResult]) -> None:
    """Atomically (re)write ``path`` with one JSON object per result."""
    atomic_write_text(path, "".join(_json_line(r) for r in results))


def append_jsonl(path: str | os.PathLike[str], results: Iterable[TrialResult]) -> None:
    """Append records to ``path`` with one ``write`` on an ``O_APPEND`` descriptor.

    Appends from several processes do not interleave within a record (each is one write of a
    line well under the page size); a process killed mid-write can leave a partial last line,
    which :func:`read_jsonl` skips with ``tolerate_partial_tail``. No fsync: the search rewrites
    the file atomically from its storage when it ends.
    """
    data = "".join(_json_line(r) for r in results).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def read_jsonl(
    path: str | os.PathLike[str], *, tolerate_partial_tail: bool = False
) -> list[TrialResult]:
    """Read records written by :func:`write_jsonl` (blank lines are skipped).

    Args:
        path: the file.
        tolerate_partial_tail: skip a malformed LAST line without a newline (an append cut by a
            kill) instead of raising.

    Raises:
        ValueError: naming the file and line of a malformed record.
    """
    out: list[TrialResult] = []
    with open(path, encoding="utf-8") as fh:
        lines = fh.readlines()
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            out.append(TrialResult.from_dict(json.loads(line)))
        except (ValueError, TypeError) as exc:
            if tolerate_partial_tail and lineno == len(lines) and not line.endswith("\n"):
                break
            raise ValueError(f"{path}:{lineno}: bad trial record: {exc}") from None
    return out


def _csv_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, Mapping):
        return json.dumps(json_safe(value), sort_keys=True, default=_json_default)
    if isinstance(value, float):
        return "" if not math.isfinite(value) else repr(value)
    return str(value)


def to_csv(results: Iterable[TrialResult]) -> str:
    """CSV text with :data:`CSV_COLUMNS` (params/metrics as JSON cells, None as empty)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for r in results:
        writer.writerow([_csv_cell(getattr(r, c)) for c in CSV_COLUMNS])
    return buf.getvalue()


def write_csv(path: str | os.PathLike[str], results: Iterable[TrialResult]) -> None:
    """Atomically (re)write ``path`` with :func:`to_csv`."""
    atomic_write_text(path, to_csv(results))


def append_csv(path: str | os.PathLike[str], results: Iterable[TrialResult]) -> None:
    """Append rows to ``path`` (the header first when the file is new or empty); see
    :func:`append_jsonl` for the guarantees."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    for r in results:
        writer.writerow([_csv_cell(getattr(r, c)) for c in CSV_COLUMNS])
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        body = buf.getvalue()
        if os.fstat(fd).st_size == 0:
            body = to_csv([]) + body
        os.write(fd, body.encode("utf-8"))
    finally:
        os.close(fd)


_INT_COLUMNS = ("number", "macs", "n_params", "seed")
_FLOAT_COLUMNS = ("accuracy", "reward", "latency_ms", "latency_pred_ms", "wall_s")


def read_csv(path: str | os.PathLike[str]) -> list[TrialResult]:
    """Read a file written by :func:`write_csv` back into records."""
    out: list[TrialResult] = []
    with open(path, encoding="utf-8", newline="") as fh:
        for row in csv.DictReader(fh):
            data: dict[str, Any] = {}
            for key, text in row.items():
                if key in _INT_COLUMNS:
                    data[key] = int(text) if text else (0 if key in ("number", "seed") else None)
                elif key in _FLOAT_COLUMNS:
                    data[key] = float(text) if text else (0.0 if key == "wall_s" else None)
                elif key in ("params", "metrics"):
                    data[key] = json.loads(text) if text else {}
                else:
                    data[key] = text
            out.append(TrialResult.from_dict(data))
    return out


# --- Pareto fronts and hypervolume ------------------------------------------------------------


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """True when ``a`` is no worse than ``b`` everywhere and better somewhere (minimisation)."""
    if len(a) != len(b):
        raise ValueError(f"points of different dimension: {len(a)} and {len(b)}")
    return all(x <= y for x, y in zip(a, b, strict=True)) and any(
        x < y for x, y in zip(a, b, strict=True)
    )


def pareto_indices(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the non-dominated points (all objectives minimised), in input order.

    Duplicated points are all kept (none dominates the other). Two objectives (every search
    front): O(n log n) by a sweep over increasing first objective; more: O(n^2).
    """
    if points and all(len(p) == 2 for p in points):
        return _pareto_indices_2d(points)
    return [
        i
        for i, p in enumerate(points)
        if not any(dominates(q, p) for j, q in enumerate(points) if j != i)
    ]


def _pareto_indices_2d(points: Sequence[Sequence[float]]) -> list[int]:
    """Sweep by increasing x. A point is dominated iff a point with smaller x has y <= its y,
    or a point with the same x has a smaller y. Example: (1, 3), (1, 3), (2, 1), (2, 2), (3, 1)
    -> indices 0, 1 (duplicates both kept), 2; (2, 2) loses to (2, 1), (3, 1) to (2, 1)."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    keep: list[int] = []
    best_prev = math.inf  # smallest y over points with a strictly smaller x
    k = 0
    while k < len(order):
        x = points[order[k]][0]
        group_end = k
        while group_end < len(order) and points[order[group_end]][0] == x:
            group_end += 1
        group_min = points[order[k]][1]  # sorted by y within equal x
        if group_min < best_prev:
            keep += [i for i in order[k:group_end] if points[i][1] == group_min]
            best_prev = group_min
        k = group_end
    return sorted(keep)


def _objectives(r: TrialResult, cost: str) -> tuple[float, float] | None:
    c = r.judged_cost(cost)
    if c is None or r.accuracy is None or not math.isfinite(r.accuracy):
        return None
    return (c, -float(r.accuracy))


def pareto(
    results: Iterable[TrialResult], cost: str = "macs", *, states: Sequence[str] = ("COMPLETE",)
) -> list[TrialResult]:
    """Records on the (maximise accuracy, minimise ``cost``) front, sorted by increasing cost.

    Only records in ``states`` with both an accuracy and the cost take part; of records with
    identical (cost, accuracy) the lowest trial number is kept, so a front lists each point once.
    """
    pool = [r for r in results if r.state in states and _objectives(r, cost) is not None]
    pool.sort(key=lambda r: r.number)
    seen: set[tuple[float, float]] = set()
    unique: list[TrialResult] = []
    for r in pool:
        obj = _objectives(r, cost)
        assert obj is not None
        if obj not in seen:
            seen.add(obj)
            unique.append(r)
    points = [_objectives(r, cost) for r in unique]
    front = [unique[i] for i in pareto_indices([p for p in points if p is not None])]
    return sorted(front, key=lambda r: (r.judged_cost(cost), -(r.accuracy or 0.0)))


def hypervolume_2d(points: Iterable[Sequence[float]], reference: Sequence[float]) -> float:
    """Area dominated by ``points`` and bounded by ``reference`` (both objectives minimised).

    Points not strictly better than the reference in both objectives add nothing. Example:
    points (1, 3) and (2, 1) with reference (4, 4) cover the rectangles [1,4]x[3,4] (area 3)
    and [2,4]x[1,4] (area 6), which overlap in [2,4]x[3,4] (area 2): 3 + 6 - 2 = 7.
    """
    rx, ry = float(reference[0]), float(reference[1])
    pts = sorted(
        (float(p[0]), float(p[1])) for p in points if float(p[0]) < rx and float(p[1]) < ry
    )
    area = 0.0
    best_y = ry
    for x, y in pts:  # sweep by increasing x; each new lower y adds a slab up to the reference
        if y < best_y:
            area += (rx - x) * (best_y - y)
            best_y = y
    return area


def results_hypervolume(
    results: Iterable[TrialResult],
    cost: str = "macs",
    *,
    ref_cost: float,
    ref_accuracy: float = 0.0,
    cost_scale: float = 1.0,
) -> float:
    """Hypervolume of the COMPLETE records' (accuracy, ``cost``) front.

    The reference point is (``ref_cost``, ``ref_accuracy``): a worse cost and a worse accuracy
    than anything worth keeping (e.g. the space's largest MACs and 0 accuracy). Costs are
    divided by ``cost_scale`` (e.g. ``ref_cost`` to normalise the area to [0, 1]).
    """
    pts = []
    for r in results:
        if r.state != "COMPLETE":
            continue
        obj = _objectives(r, cost)
        if obj is not None:
            pts.append((obj[0] / cost_scale, obj[1]))
    return hypervolume_2d(pts, (ref_cost / cost_scale, -ref_accuracy))
