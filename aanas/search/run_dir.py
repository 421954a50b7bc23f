"""The run directory a search writes (stable format, read back by ``aanas show``).

::

    runs/<name>/
      run.json          settings of the search (SearchRecipe), space, score, engine versions
      trials.jsonl      one TrialResult per line, every trial in every state
      trials.csv        the same table as CSV (params/metrics as JSON cells)
      baselines.jsonl   reference models (--baselines) evaluated by the same evaluator
      pareto.json       the (accuracy max, cost min) front, its hypervolume and reference point
      pareto.png        accuracy vs cost: all trials grey, the front highlighted, baselines
      summary.md        score, best architecture and the top-k table
      best/spec.txt     canonical spec string of the best trial
      best/model.pt     {"spec": str, "state_dict": ...} trained or supernet-inherited weights
      best/metrics.json the best TrialResult
      supernet.pt       trained supernet (supernet evaluator), reused when the search resumes
      time.json         wall-clock interval of every `aanas search` session on this directory
                        (the --timeout-min budget counts their union: resumed runs add up,
                        concurrent workers do not)
      study.journal     Optuna journal storage (optuna engine, default --storage; runs made
                        before it keep their study.db)
      ray/              Ray Tune experiment folder (ray engine)

Every file but ``trials.*`` is replaced atomically (temporary file + :func:`os.replace`): a
search killed at any moment leaves the previous complete version behind. ``trials.jsonl`` and
``trials.csv`` are appended one record per finished trial (every worker sharing the directory
appends its own; a kill can cut only the last line, which readers skip) and rewritten
atomically from the study's storage when a search ends or is interrupted, so that they then
agree with the storage. A trial appears once per state it reached; readers keep the last.
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aanas.errors import CheckpointError
from aanas.results import (
    TrialResult,
    append_csv,
    append_jsonl,
    atomic_write_bytes,
    atomic_write_text,
    dominates,
    pareto,
    read_jsonl,
    results_hypervolume,
    write_csv,
    write_jsonl,
)
from aanas.search._locks import FileLock

if TYPE_CHECKING:
    from aanas.train import Checkpoint

__all__ = ["RunDirectory", "TrialLog", "best_result", "format_table", "is_lost", "rank"]

_LOG = logging.getLogger(__name__)

_COST_LABEL = {
    "macs": "MACs (M)",
    "latency_ms": "latency (ms)",
    "latency_pred_ms": "predicted latency (ms)",
    "n_params": "params (M)",
}
_COST_DIV = {"macs": 1e6, "n_params": 1e6, "latency_ms": 1.0, "latency_pred_ms": 1.0}


def rank(results: Sequence[TrialResult], *, multi_objective: bool) -> list[TrialResult]:
    """COMPLETE records, best first: by reward, or (Pareto mode) by accuracy, then lower MACs."""
    done = [r for r in results if r.state == "COMPLETE" and r.accuracy is not None]
    if multi_objective or any(r.reward is None for r in done):
        return sorted(done, key=lambda r: (-(r.accuracy or 0.0), r.macs or 0, r.number))
    return sorted(done, key=lambda r: (-(r.reward or 0.0), r.number))


def best_result(results: Sequence[TrialResult], *, multi_objective: bool) -> TrialResult | None:
    """The best COMPLETE record (:func:`rank`), or None when nothing completed.

    In Pareto mode "best" is the most accurate point of the front (ties: fewer MACs).
    """
    ranked = rank(results, multi_objective=multi_objective)
    return ranked[0] if ranked else None


def is_lost(r: TrialResult) -> bool:
    """A trial whose worker died or was interrupted (no result; not counted toward --trials:
    the search runs another in its place)."""
    return r.state == "FAIL" and r.error.startswith(("lost", "interrupted"))


def _fmt(value: float | None, scale: float = 1.0, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value / scale:.{digits}f}"


def format_table(results: Sequence[TrialResult], *, title: str = "", spec_width: int = 0) -> str:
    """Markdown table of ``results`` in the given order (``spec_width`` > 0 truncates specs)."""
    lines = []
    if title:
        lines += [f"### {title}", ""]
    lines.append("| # | state | accuracy | reward | MACs (M) | params (M) | latency (ms) | spec |")
    lines.append("|---:|---|---:|---:|---:|---:|---:|---|")
    for r in results:
        spec = r.spec
        if spec_width and len(spec) > spec_width:
            spec = spec[: spec_width - 3] + "..."
        label = r.name or str(r.number)
        latency = r.latency_ms if r.latency_ms is not None else r.latency_pred_ms
        lines.append(
            f"| {label} | {r.state} | {_fmt(r.accuracy, 0.01, 2)}% | {_fmt(r.reward, 1, 4)} | "
            f"{_fmt(r.macs, 1e6, 2)} | {_fmt(r.n_params, 1e6, 3)} | {_fmt(latency, 1, 2)} | "
            f"`{spec}` |"
        )
    return "\n".join(lines) + "\n"


class RunDirectory:
    """Reads and writes one search's run directory (see the module docstring)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    # -- paths -------------------------------------------------------------------------------

    @property
    def run_json(self) -> Path:
        return self.path / "run.json"

    @property
    def trials_jsonl(self) -> Path:
        return self.path / "trials.jsonl"

    @property
    def trials_csv(self) -> Path:
        return self.path / "trials.csv"

    @property
    def baselines_jsonl(self) -> Path:
        return self.path / "baselines.jsonl"

    @property
    def pareto_json(self) -> Path:
        return self.path / "pareto.json"

    @property
    def pareto_png(self) -> Path:
        return self.path / "pareto.png"

    @property
    def summary_md(self) -> Path:
        return self.path / "summary.md"

    @property
    def best_dir(self) -> Path:
        return self.path / "best"

    @property
    def supernet_pt(self) -> Path:
        return self.path / "supernet.pt"

    @property
    def study_db(self) -> Path:
        """SQLite storage of run directories made before the journal default."""
        return self.path / "study.db"

    @property
    def study_journal(self) -> Path:
        """Optuna journal file storage (the default ``--storage``)."""
        return self.path / "study.journal"

    @property
    def time_json(self) -> Path:
        """``{session id: [start, end]}`` in Unix seconds (:meth:`record_session`)."""
        return self.path / "time.json"

    @property
    def models_dir(self) -> Path:
        """Per-spec weights of trained candidates (train evaluator), keyed by spec digest."""
        return self.path / "models"

    def create(self) -> RunDirectory:
        """Make the folder (and parents)."""
        self.path.mkdir(parents=True, exist_ok=True)
        return self

    # -- metadata ----------------------------------------------------------------------------

    def write_meta(self, meta: Mapping[str, Any]) -> None:
        """``run.json``: the search settings and anything needed to read the results."""
        atomic_write_text(self.run_json, json.dumps(dict(meta), indent=2, sort_keys=True) + "\n")

    def read_meta(self) -> dict[str, Any]:
        """``run.json`` as a dict ({} when absent)."""
        if not self.run_json.is_file():
            return {}
        data: dict[str, Any] = json.loads(self.run_json.read_text(encoding="utf-8"))
        return data

    # -- wall-clock budget ---------------------------------------------------------------------

    def _read_sessions(self) -> dict[str, list[float]]:
        if not self.time_json.is_file():
            return {}
        data: dict[str, list[float]] = json.loads(self.time_json.read_text(encoding="utf-8"))
        return data

    def record_session(self, session: str, start: float, end: float) -> None:
        """Set session ``session``'s interval to [start, end] (Unix seconds) in ``time.json``.

        Read-modify-write under a file lock, so workers sharing the directory keep each
        other's sessions; the write itself is atomic.
        """
        with FileLock(self.path / ".time.lock"):
            sessions = self._read_sessions()
            sessions[session] = [float(start), float(end)]
            atomic_write_text(self.time_json, json.dumps(sessions, indent=1, sort_keys=True) + "\n")

    def spent_s(self, *, exclude: str | None = None) -> float:
        """Wall-clock seconds the sessions in ``time.json`` cover (their union), optionally
        without session ``exclude``.

        Union, not sum: two workers running at once spend the same minutes. Example: sessions
        [0, 10], [5, 20] and [30, 35] cover 20 + 5 = 25 s.
        """
        spans = sorted(tuple(v) for k, v in self._read_sessions().items() if k != exclude)
        total = 0.0
        cur_start: float | None = None
        cur_end = 0.0
        for start, end in spans:
            if cur_start is None or start > cur_end:
                if cur_start is not None:
                    total += cur_end - cur_start
                cur_start, cur_end = start, end
            else:
                cur_end = max(cur_end, end)
        if cur_start is not None:
            total += cur_end - cur_start
        return total

    # -- trials ------------------------------------------------------------------------------

    def write_trials(self, results: Sequence[TrialResult]) -> None:
        """Rewrite ``trials.jsonl`` and ``trials.csv`` atomically, sorted by trial number."""
        ordered = sorted(results, key=lambda r: r.number)
        write_jsonl(self.trials_jsonl, ordered)
        write_csv(self.trials_csv, ordered)

    def append_trial(self, result: TrialResult) -> None:
        """Append one finished record to ``trials.jsonl`` and ``trials.csv`` (O(1) per trial)."""
        append_jsonl(self.trials_jsonl, [result])
        append_csv(self.trials_csv, [result])

    def read_trials(self) -> list[TrialResult]:
        """``trials.jsonl`` ([] when absent): the last record of each trial, by number."""
        if not self.trials_jsonl.is_file():
            return []
        latest = {r.number: r for r in read_jsonl(self.trials_jsonl, tolerate_partial_tail=True)}
        return [latest[n] for n in sorted(latest)]

    def write_baselines(self, results: Sequence[TrialResult]) -> None:
        """``baselines.jsonl``."""
        write_jsonl(self.baselines_jsonl, results)

    def read_baselines(self) -> list[TrialResult]:
        """``baselines.jsonl`` ([] when absent)."""
        return read_jsonl(self.baselines_jsonl) if self.baselines_jsonl.is_file() else []

    # -- Pareto front --------------------------------------------------------------------------

    def write_pareto(
        self,
        results: Sequence[TrialResult],
        baselines: Sequence[TrialResult] = (),
        *,
        cost: str = "macs",
        plot: bool = True,
        max_cost: float | None = None,
    ) -> list[TrialResult]:
        """``pareto.json`` (and ``pareto.png`` when ``plot``); returns the front.

        The hypervolume's reference point is (1.1 x the largest cost of a COMPLETE trial,
        accuracy 0), recorded in the file; compare hypervolumes only at equal reference points.
        ``max_cost`` gives that largest cost when ``results`` holds only the front
        (:class:`TrialLog`).
        """
        front = pareto(results, cost)
        costs = [r.judged_cost(cost) for r in results if r.state == "COMPLETE"]
        finite = [c for c in costs if c is not None]
        if max_cost is not None:
            finite.append(max_cost)
        ref_cost = 1.1 * max(finite) if finite else 0.0
        hv = (
            results_hypervolume(results, cost, ref_cost=ref_cost, cost_scale=_COST_DIV[cost])
            if finite
            else 0.0
        )
        data = {
            "cost": cost,
            "objectives": {"accuracy": "maximize", cost: "minimize"},
            "reference": {"accuracy": 0.0, cost: ref_cost},
            "hypervolume": hv,
            "hypervolume_unit": f"accuracy x {_COST_LABEL[cost]}",
            "front": [r.to_dict() for r in front],
            "baselines": [r.to_dict() for r in baselines],
        }
        atomic_write_text(self.pareto_json, json.dumps(data, indent=2, sort_keys=True) + "\n")
        if plot:
            try:
                self._plot(results, front, baselines, cost)
            except Exception as exc:  # a plot must never cost the results
                _LOG.warning("could not draw %s: %s", self.pareto_png, exc)
        return front

    def _plot(
        self,
        results: Sequence[TrialResult],
        front: Sequence[TrialResult],
        baselines: Sequence[TrialResult],
        cost: str,
    ) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        div = _COST_DIV[cost]

        def xy(rs: Sequence[TrialResult]) -> tuple[list[float], list[float]]:
            pts = [
                ((r.judged_cost(cost) or 0.0) / div, 100.0 * (r.accuracy or 0.0))
                for r in rs
                if r.judged_cost(cost) is not None and r.accuracy is not None
            ]
            return [p[0] for p in pts], [p[1] for p in pts]

        fig, ax = plt.subplots(figsize=(6.4, 4.8), dpi=100)
        done = [r for r in results if r.state == "COMPLETE"]
        x, y = xy(done)
        ax.scatter(x, y, c="0.65", s=18, label=f"trials ({len(done)})", zorder=1)
        x, y = xy(front)
        ax.step(x, y, where="post", c="tab:red", lw=1.2, zorder=2)
        ax.scatter(x, y, c="tab:red", s=30, label=f"Pareto front ({len(front)})", zorder=3)
        for r, marker in zip(baselines, "*Dsv^<>ph", strict=False):
            bx, by = xy([r])
            if bx:
                ax.scatter(bx, by, marker=marker, s=110, zorder=4, label=r.name or "baseline")
        ax.set_xlabel(_COST_LABEL[cost])
        ax.set_ylabel("validation accuracy (%)")
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
        plt.close(fig)
        atomic_write_bytes(self.pareto_png, buf.getvalue())

    # -- best model and summary ----------------------------------------------------------------

    def write_best(self, result: TrialResult, state_dict: Mapping[str, Any] | None) -> None:
        """``best/spec.txt``, ``best/metrics.json`` and, with weights, ``best/model.pt``."""
        atomic_write_text(self.best_dir / "spec.txt", result.spec + "\n")
        atomic_write_text(
            self.best_dir / "metrics.json",
            json.dumps(result.to_dict(), indent=2, sort_keys=True) + "\n",
        )
        if state_dict is not None:
            import torch

            buf = io.BytesIO()
            torch.save({"spec": result.spec, "state_dict": dict(state_dict)}, buf)
            atomic_write_bytes(self.best_dir / "model.pt", buf.getvalue())

    def read_best_spec(self) -> str:
        """The spec string in ``best/spec.txt`` (what :meth:`write_best` wrote).

        Raises:
            FileNotFoundError: not a run directory, or no trial finished yet.
        """
        if not self.path.is_dir():
            raise FileNotFoundError(f"run directory not found: {self.path}")
        spec_txt = self.best_dir / "spec.txt"
        if not spec_txt.is_file():
            raise FileNotFoundError(f"{spec_txt} not found: no finished trial in {self.path} yet?")
        return spec_txt.read_text(encoding="utf-8").strip()

    def read_best_weights(self) -> Checkpoint:
        """``best/model.pt`` as an :class:`aanas.train.Checkpoint` (``format`` spec+state_dict).

        Raises:
            FileNotFoundError: the search stored no weights.
            CheckpointError: the file is unreadable, or its spec is not ``best/spec.txt``'s.
        """
        from aanas.train import load_checkpoint  # L4, below this module; torch only when asked

        weights = self.best_dir / "model.pt"
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: the search stored no weights")
        ckpt = load_checkpoint(weights)
        spec = self.read_best_spec()
        if ckpt.format != "spec+state_dict" or ckpt.spec.strip() != spec:
            raise CheckpointError(
                f"{weights}: expected the weights of {spec!r} from best/spec.txt, found "
                f"{ckpt.description} of {ckpt.spec or 'no spec'!r}"
            )
        return ckpt

    def training_data(self) -> tuple[str | None, str | None]:
        """``(data, data_root)`` the search trained on, from ``run.json`` (Nones if unknown)."""
        try:
            recipe = self.read_meta().get("recipe") or {}
            return recipe.get("data"), recipe.get("data_root")
        except (ValueError, AttributeError, OSError):
            _LOG.warning("%s is unreadable; the training data set is unknown", self.run_json)
            return None, None

    def write_summary(
        self,
        results: Sequence[TrialResult],
        baselines: Sequence[TrialResult] = (),
        *,
        title: str,
        score: str,
        multi_objective: bool,
        top_k: int = 10,
        cost: str = "macs",
    ) -> str:
        """``summary.md``; returns its text."""
        text = summary_text(
            results,
            baselines,
            title=title,
            score=score,
            multi_objective=multi_objective,
            top_k=top_k,
            cost=cost,
        )
        atomic_write_text(self.summary_md, text)
        return text


class TrialLog:
    """The trials of a running search, kept as they finish (the engine hands each one over).

    Each record is appended to ``trials.*`` (no rewrite), indexed by trial number, and folded
    into an incremental 2-D Pareto front (a new point drops the points it dominates, or is
    dropped: O(front) per trial); ``pareto.json`` is rewritten only when the front or the
    largest cost (the hypervolume's reference point) changes.
    """

    def __init__(self, run_dir: RunDirectory, *, cost: str, write: bool = True) -> None:
        self.run_dir = run_dir
        self.cost = cost
        self.write = write
        self.records: dict[int, TrialResult] = {}
        self.front: list[TrialResult] = []
        self.max_cost: float | None = None

    def _point(self, r: TrialResult) -> tuple[float, float] | None:
        c = r.judged_cost(self.cost)
        if r.state != "COMPLETE" or c is None or r.accuracy is None:
            return None
        if not math.isfinite(r.accuracy) or not math.isfinite(c):
            return None
        return (c, -float(r.accuracy))

    def _fold(self, r: TrialResult) -> bool:
        """Fold ``r`` into the front; True when the front or its reference point changed."""
        p = self._point(r)
        if p is None:
            return False
        grew = self.max_cost is None or p[0] > self.max_cost  # moves the reference point
        self.max_cost = p[0] if self.max_cost is None else max(self.max_cost, p[0])
        kept = []
        for f in self.front:
            q = self._point(f)
            assert q is not None
            if dominates(q, p) or q == p:  # equal points: the first trial keeps its place
                return grew
            if not dominates(p, q):
                kept.append(f)
        self.front = kept + [r]
        return True

    def load(self, records: Sequence[TrialResult]) -> None:
        """Index records already on disk (a resumed search) without writing them again."""
        for r in records:
            self.records[r.number] = r
            self._fold(r)

    def add(self, record: TrialResult) -> None:
        """A trial finished (or was marked lost): append, index, update the front."""
        self.records[record.number] = record
        changed = self._fold(record)
        if not self.write:
            return
        self.run_dir.append_trial(record)
        if changed:
            self.run_dir.write_pareto(
                self.front, cost=self.cost, plot=False, max_cost=self.max_cost
            )

    def results(self) -> list[TrialResult]:
        """Every known record, by trial number."""
        return [self.records[n] for n in sorted(self.records)]


def summary_text(
    results: Sequence[TrialResult],
    baselines: Sequence[TrialResult] = (),
    *,
    title: str,
    score: str,
    multi_objective: bool,
    top_k: int = 10,
    cost: str = "macs",
) -> str:
    """The ``summary.md`` text (also what ``aanas show`` prints)."""
    counts: dict[str, int] = {}
    for r in results:
        counts[r.state] = counts.get(r.state, 0) + 1
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items())) or "none"
    best = best_result(results, multi_objective=multi_objective)
    lines = [f"# {title}", "", f"- score: {score}", f"- trials: {len(results)} ({states})"]
    evaluated = {r.spec for r in results if r.spec and r.state != "RUNNING" and not is_lost(r)}
    reused = sum(1 for r in results if "duplicate_of" in r.metrics)
    lines.append(
        f"- distinct architectures evaluated: {len(evaluated)}"
        + (f" ({reused} repeated suggestions reused a stored result)" if reused else "")
    )
    lost = [r for r in results if is_lost(r)]
    if lost:
        lines.append(
            f"- lost or interrupted trials (not counted, replaced by new ones): {len(lost)}"
        )
    if best is not None:
        lines += [
            f"- best: trial {best.number}, accuracy {100 * (best.accuracy or 0):.2f}%, "
            f"{_fmt(best.macs, 1e6, 2)}M MACs, {_fmt(best.n_params, 1e6, 3)}M params"
            + (f", reward {best.reward:.4f}" if best.reward is not None else ""),
            f"- best spec: `{best.spec}`",
        ]
    lines.append("")
    top = rank(results, multi_objective=multi_objective)[:top_k]
    lines.append(format_table(top, title=f"Top {len(top)}"))
    front = pareto(results, cost)
    lines.append(format_table(front, title=f"Pareto front (accuracy vs {cost})"))
    if baselines:
        lines.append(format_table(list(baselines), title="Baselines (same evaluator)"))
    failed = [r for r in results if r.state == "FAIL"]
    if failed:
        lines += ["### Failed trials", ""]
        lines += [f"- {r.number}: {r.error or 'unknown error'}" for r in failed]
        lines.append("")
    return "\n".join(lines)
