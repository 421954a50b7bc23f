"""``aanas reproduce mobile``: MnasNet-A1 vs AA-MnasNet-A1 under one recipe, one table.

Bello et al., *Attention Augmented Convolutional Networks* (arXiv:1904.09925), Sec. 4.3 and
Table 3, augment MnasNet (Tan et al., arXiv:1807.11626) with attention and compare it with the
plain network on ImageNet. This module repeats that comparison at whatever scale the machine
allows, with three rows trained by :func:`aanas.train.fit` under the same recipe and seeds:

1. MnasNet-A1 at ``width``;
2. AA-MnasNet-A1 at the same width (light projection placement, ``aanas.models.mnasnet``);
3. MnasNet-A1 widened until its MACs match row 2's (:func:`macs_matched_width`), so a gain of
   row 2 over row 3 is not explained by its extra multiply-adds.

For inputs up to 64 px the CIFAR-sized pair (``aanas.models.mnasnet_cifar``: last maps 4x4,
attention only on 8x8 and 4x4 maps) is used; the ImageNet pair's 32x downsampling would leave
attention 1x1 maps, where its softmax is identically 1. The table reports parameters, MACs
(:mod:`aanas.cost`), measured latency (1 thread, batch 1) and top-1 on the data set's TEST split
(mean and standard deviation over seeds), and a paired t-test over seeds
(``scipy.stats.ttest_rel``) of row 2 against rows 1 and 3. Nothing is hard-coded except the
published reference values, each with its source.

Layer: above ``train``/``cost``/``data``/``models``, below ``cli``.

Scales (the recipe and data decide everything; see ``aanas reproduce mobile --help``):

- default: ``recipes/reproduce_mobile_cpu.yaml`` on the embedded digits data (no download,
  nothing outside the package), width 0.5, 3 seeds: 9 short runs, a few CPU minutes;
- CIFAR-10: ``--recipe cifar10_subset_mnasnet_a1 --data imagefolder:PATH`` (the offline subset)
  or ``--data cifar10 --set download=true`` (the full set, downloaded once);
- ImageNet on GPUs: ``--recipe imagenet_mnasnet_a1 --data imagefolder:/path/to/imagenet
  --device cuda --width 1.0`` (multi-GPU runs train the models with ``aanas train`` under
  torchrun instead).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from aanas import __version__
from aanas._io import atomic_write_text, json_safe
from aanas.config import TrainRecipe, load_recipe, recipe_to_dict
from aanas.run_record import partial_run, read_run_record, run_identity, write_run_record

__all__ = [
    "DEFAULT_RECIPE",
    "DEFAULT_SEEDS",
    "DEFAULT_WIDTH",
    "MOBILE_PAIR",
    "MOBILE_PAIR_CIFAR",
    "PAPER_REFERENCE",
    "ReproduceResult",
    "ReproduceRow",
    "format_table",
    "macs_matched_width",
    "paired_t_test",
    "reproduce_mobile",
]

_LOG = logging.getLogger(__name__)

DEFAULT_RECIPE = "reproduce_mobile_cpu"
# (baseline, attention-augmented): registered names; ``width`` replaces their multiplier.
MOBILE_PAIR: tuple[str, str] = ("mnasnet_a1_100", "aa_mnasnet_a1_100")
# The same pair sized for 32x32 inputs (used when the recipe's input_size <= _CIFAR_MAX_INPUT).
MOBILE_PAIR_CIFAR: tuple[str, str] = ("mnasnet_a1_cifar_100", "aa_mnasnet_a1_cifar_100")
_CIFAR_MAX_INPUT = 64
DEFAULT_WIDTH = 0.5  # the CIFAR recipes' width: 0.81M params / 30.0M MACs at 32x32
DEFAULT_SEEDS = (0, 1, 2)
# Widths tried for the MACs-matched baseline: steps of 1/400 from the pair's width up to 2x.
_WIDTH_STEP = 0.0025
LATENCY_BACKENDS = ("onnxruntime", "torch")

# Published ImageNet numbers for the pair at width 1.0. Only values we could verify are filled
# in; None prints as "n/a". Bello et al. Table 3 (params / top-1 of MnasNet and AA-MnasNet) could
# not be checked against the paper offline, so none of its values are used here. The MnasNet-A1
# values are from the MnasNet paper itself (Tan et al., arXiv:1807.11626, Table 1 / abstract:
# 3.9M params, 312M multiply-adds, 75.2% top-1 on ImageNet); our mnasnet_a1_100 at 224x224 and
# 1000 classes counts 3.887M params and 311.6M MACs, which matches it.
PAPER_REFERENCE: dict[str, dict[str, Any]] = {
    "mnasnet_a1_100": {
        "params_m": 3.9,
        "macs_m": 312.0,
        "top1": 75.2,
        "source": "Tan et al. 2019 (arXiv:1807.11626), Table 1: MnasNet-A1, ImageNet",
    },
    "aa_mnasnet_a1_100": {
        "params_m": None,
        "macs_m": None,
        "top1": None,
        "source": "Bello et al. 2019 (arXiv:1904.09925), Table 3: not verified offline (n/a)",
    },
}


@dataclasses.dataclass(frozen=True)
class ReproduceRow:
    """One model of the pair: its costs and its per-seed test results."""

    model: str  # registered name (before the width override)
    label: str  # table label, e.g. "AA-MnasNet-A1 (w1.0)"
    width: float  # channel multiplier it was trained at
    spec: str  # canonical spec string of the trained model
    params: int
    macs: int
    latency_ms: float  # median of the timed runs
    latency_iqr_ms: float
    runs: tuple[dict[str, Any], ...]  # fit() metrics per seed (plus "seed")

    @property
    def train_minutes(self) -> tuple[float, ...]:
        """fit()'s wall-clock training time per seed, in minutes (as recorded by the run)."""
        return tuple(float(r.get("time_s", math.nan)) / 60 for r in self.runs)

    @property
    def top1(self) -> tuple[float, ...]:
        """Test top-1 (fraction) per seed, in seed order."""
        return tuple(float(r["test_top1"]) for r in self.runs)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (adds the top-1 mean and standard deviation, in percent)."""
        mean, std = _mean_std([100 * t for t in self.top1])
        return {
            **dataclasses.asdict(self),
            "runs": list(self.runs),
            "top1": list(self.top1),
            "top1_mean_pct": mean,
            "top1_std_pct": std,
        }


@dataclasses.dataclass(frozen=True)
class ReproduceResult:
    """Everything ``reproduce mobile`` measured, plus how (recipe, data, seeds, device)."""

    rows: tuple[ReproduceRow, ...]  # (baseline, attention-augmented, MACs-matched baseline)
    recipe: TrainRecipe
    recipe_source: str
    seeds: tuple[int, ...]
    width: float
    device: str
    latency_backend: str
    num_classes: int
    time_s: float
    table: str  # the Markdown table as printed

    def to_dict(self) -> dict[str, Any]:
        """JSON form written to ``reproduce.json``."""
        return {
            "experiment": "mobile",
            "rows": [r.to_dict() for r in self.rows],
            "comparisons": [_compare(self.rows[1], r) for r in (self.rows[0], *self.rows[2:])],
            "paper": PAPER_REFERENCE,
            "recipe": recipe_to_dict(self.recipe),
            "recipe_source": self.recipe_source,
            "seeds": list(self.seeds),
            "width": self.width,
            "device": self.device,
            "latency_backend": self.latency_backend,
            "num_classes": self.num_classes,
            "time_s": self.time_s,
            "aanas_version": __version__,
            "python": platform.python_version(),
            "table": self.table,
        }


def paired_t_test(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """Two-sided paired t-test of ``a`` vs ``b`` (same seeds): ``(t, p)``, or None for n < 2.

    ``t = mean(d) / (sd(d) / sqrt(n))`` with ``d = a - b`` and ``n - 1`` degrees of freedom,
    computed by ``scipy.stats.ttest_rel``. All-equal differences give ``t = nan``, ``p = nan``.

    Raises:
        ValueError: if the lengths differ.
    """
    if len(a) != len(b):
        raise ValueError(f"paired test needs equal lengths, got {len(a)} and {len(b)}")
    if len(a) < 2:
        return None
    from scipy import stats

    res = stats.ttest_rel(list(a), list(b))
    return float(res.statistic), float(res.pvalue)


def _compare(aa: ReproduceRow, base: ReproduceRow) -> dict[str, Any]:
    """AA row vs a baseline row: per-seed top-1 differences (points), mean, std, t-test."""
    deltas = [100 * (x - y) for x, y in zip(aa.top1, base.top1, strict=True)]
    mean, std = _mean_std(deltas)
    test = paired_t_test(aa.top1, base.top1)
    return {
        "model": aa.label,
        "versus": base.label,
        "delta_top1_pct": deltas,
        "mean": mean,
        "std": std,
        "t": test[0] if test else None,
        "p": test[1] if test else None,
    }


def macs_matched_width(
    name: str, target_macs: int, *, width: float, num_classes: int, input_size: int
) -> tuple[float, int]:
    """The width of ``name`` whose MACs come closest to ``target_macs``, and those MACs.

    Widths from ``width`` to ``2 * width`` in steps of 0.0025 are costed analytically
    (:func:`aanas.cost.count_spec`, no model is built); channel rounding to multiples of 8
    makes MACs a step function of the width, so the closest step wins (ties: the narrower).
    Example: MnasNet-A1-CIFAR at width 0.5 has 30.0M MACs; AA-MnasNet-A1-CIFAR 31.1M; the
    matched plain width is 0.525 (31.08M).
    """
    from aanas.cost import count_spec
    from aanas.models import get_spec

    base = dataclasses.replace(get_spec(name), num_classes=num_classes, input_size=input_size)
    best: tuple[float, int] | None = None
    for i in range(int(round(width / _WIDTH_STEP)) + 1):
        w = round(width + i * _WIDTH_STEP, 4)
        macs = count_spec(dataclasses.replace(base, width=w)).macs
        if best is None or abs(macs - target_macs) < abs(best[1] - target_macs):
            best = (w, macs)
        if macs > target_macs:  # MACs grow with width: nothing wider can be closer
            break
    assert best is not None
    return best


def _mean_std(values: Sequence[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1); std is None below two values."""
    if not values:
        return None, None
    mean = statistics.fmean(values)
    return mean, (statistics.stdev(values) if len(values) > 1 else None)


def _pm(values: Sequence[float]) -> str:
    """``[87.5, 88.1, 86.9] -> '87.50 ± 0.60 (n=3)'``; one value: ``'87.50 (n=1)'``."""
    mean, std = _mean_std(values)
    if mean is None:
        return "n/a"
    spread = f" ± {std:.2f}" if std is not None else ""
    return f"{mean:.2f}{spread} (n={len(values)})"


def _minutes(values: Sequence[float]) -> str:
    """``[6.1, 6.4, 6.2] -> '6.2 (max 6.4)'``: the mean, and the slowest run against a budget."""
    finite = [v for v in values if math.isfinite(v)]
    if not finite:
        return "n/a"
    return f"{statistics.fmean(finite):.1f} (max {max(finite):.1f})"


def _na(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _label(model: str, width: float, note: str = "") -> str:
    """``("aa_mnasnet_a1_cifar_100", 0.5) -> "AA-MnasNet-A1-CIFAR (w0.5)"``."""
    base = "MnasNet-A1" if "mnasnet_a1" in model else model
    if "_cifar" in model:
        base += "-CIFAR"
    extra = f", {note}" if note else ""
    return f"{'AA-' if model.startswith('aa_') else ''}{base} (w{width:g}{extra})"


def format_table(result: ReproduceResult) -> str:
    """The Markdown table (ours beside the paper's) and its footnotes."""
    backend = result.latency_backend
    head = (
        "| model | params (M) | MACs (M) | latency (ms) | test top-1 (%) | train (min/run) | "
        "paper params (M) | paper MACs (M) | paper ImageNet top-1 (%) |"
    )
    lines = [head, "|" + "---|" * 9]
    for row in result.rows:
        ref = PAPER_REFERENCE.get(row.model, {}) if row.width == 1.0 else {}
        lines.append(
            f"| {row.label} | {row.params / 1e6:.3f} | {row.macs / 1e6:.1f} | "
            f"{row.latency_ms:.2f} ± {row.latency_iqr_ms:.2f} | "
            f"{_pm([100 * t for t in row.top1])} | {_minutes(row.train_minutes)} | "
            f"{_na(ref.get('params_m'))} | "
            f"{_na(ref.get('macs_m'), '{:.0f}')} | {_na(ref.get('top1'))} |"
        )
    r = result.recipe
    notes = [""]
    for cmp in (_compare(result.rows[1], b) for b in (result.rows[0], *result.rows[2:])):
        test = (
            f"paired t-test t = {cmp['t']:.2f}, p = {cmp['p']:.3f}"
            if cmp["t"] is not None and math.isfinite(cmp["t"])
            else "paired t-test n/a (needs >= 2 seeds with differing deltas)"
        )
        notes.append(
            f"Δ top-1 {cmp['model']} − {cmp['versus']} (paired by seed): "
            f"{_pm(cmp['delta_top1_pct'])} points; {test}."
        )
    notes += [
        "Paper Δ: n/a (Bello et al. Table 3 not verified offline).",
        f"Ours: data `{r.data}` at {r.input_size}x{r.input_size}, {result.num_classes} classes, "
        f"TEST split; recipe `{result.recipe_source}` ({r.epochs} epochs"
        + (f", at most {r.max_train_batches} steps/epoch" if r.max_train_batches else "")
        + f", batch {r.batch_size}, {r.optimizer} lr {r.lr:g}); seeds "
        f"{', '.join(map(str, result.seeds))}; device {result.device}; "
        f"{sum(sum(row.train_minutes) for row in result.rows):.1f} min of training "
        f"(fit() wall time per run, as recorded), {result.time_s / 60:.1f} min this invocation.",
        f"Params/MACs: aanas.cost at {r.input_size}x{r.input_size}, {result.num_classes} classes "
        f"(MACs = multiply-adds). Latency: median ± IQR, {backend}, 1 thread, batch 1, "
        "this machine (shared: indicative only).",
        "Paper columns: ImageNet at 224x224, 1000 classes, width 1.0 only. MnasNet-A1: "
        f"{PAPER_REFERENCE['mnasnet_a1_100']['source']}. AA-MnasNet-A1: "
        f"{PAPER_REFERENCE['aa_mnasnet_a1_100']['source']}.",
    ]
    return "\n".join(lines + notes)


def _check_seeds(seeds: Sequence[int]) -> tuple[int, ...]:
    if not seeds:
        raise ValueError("seeds: need at least one seed, e.g. --seeds 0,1,2")
    out = tuple(seeds)
    if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in out):
        raise ValueError(f"seeds: must be integers >= 0, got {list(out)}")
    if len(set(out)) != len(out):
        raise ValueError(f"seeds: duplicates in {list(out)}")
    return out


def reproduce_mobile(
    *,
    recipe: str | Path = DEFAULT_RECIPE,
    overrides: Sequence[str] = (),
    data: str | None = None,
    epochs: int | None = None,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    width: float = DEFAULT_WIDTH,
    device: str = "cpu",
    out: str | Path | None = None,
    latency_backend: str = "onnxruntime",
    latency_repeats: int = 50,
    keep_checkpoints: bool = False,
    progress: bool = False,
    pair: tuple[str, str] | None = None,
    matched: bool = True,
    on_run: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> ReproduceResult:
    """Train MnasNet-A1, AA-MnasNet-A1 and a MACs-matched MnasNet-A1 over ``seeds``; tabulate.

    For every seed, each model is built with ``create_model(name, num_classes=data classes,
    input_size=recipe.input_size, width=...)``, seeded identically
    (:func:`aanas.train.seed_everything`) and trained by :func:`aanas.train.fit` on the same
    data split; the test split is evaluated once at the end of each run.

    Args:
        recipe: recipe YAML path or shipped name; its ``model`` field is ignored.
        overrides: ``key=value`` recipe overrides (``--set``), applied before ``data``/``epochs``.
        data: replaces ``recipe.data`` (``digits``, ``cifar10``, ``imagefolder:PATH``, ...).
        epochs: replaces ``recipe.epochs``.
        seeds: recipe seeds; each one trains every model (3 or more for a paired test).
        width: channel multiplier of the pair (the matched baseline is wider).
        device: training device (``cpu``, ``cuda``, ``cuda:1``); latency is timed on CPU.
        out: folder for ``reproduce.md``, ``reproduce.json`` and one record per finished run
            (``runs/<model>_w<width>/seed<k>.json``, written atomically); a rerun with the same
            recipe reads those back and trains only what is missing, so a killed run resumes
            and seeds can be trained by separate processes (None: write nothing).
        latency_backend: ``onnxruntime`` or ``torch``.
        latency_repeats: timed forward passes per model.
        keep_checkpoints: keep fit()'s checkpoints under ``out/runs/<model>_w<width>/seed<k>/``.
        progress: tqdm bars while training.
        pair: (baseline, augmented) registered names; None: :data:`MOBILE_PAIR_CIFAR` for
            inputs up to 64 px, else :data:`MOBILE_PAIR`.
        matched: also train the baseline at the AA model's MACs (third row).
        on_run: called as ``on_run(label, seed, metrics)`` after each training run.

    Returns:
        A :class:`ReproduceResult`; ``result.table`` is the printed table.

    Raises:
        ValueError: bad seeds, width, backend or recipe values.
    """
    from aanas.cost import count, count_spec
    from aanas.cost import measure as measure_latency
    from aanas.data import build_recipe_data
    from aanas.models import create_model, get_spec
    from aanas.train import fit, seed_everything

    seeds = _check_seeds(seeds)
    if isinstance(width, bool) or not isinstance(width, int | float) or not width > 0:
        raise ValueError(f"width: must be a number > 0, got {width!r}")
    if latency_backend not in LATENCY_BACKENDS:
        raise ValueError(
            f"latency_backend must be one of {LATENCY_BACKENDS}, got {latency_backend!r}"
        )
    extra = list(overrides)
    if data is not None:
        extra.append(f"data={data}")
    if epochs is not None:
        extra.append(f"epochs={epochs}")
    base_recipe = load_recipe(recipe, extra)
    if pair is None:
        pair = MOBILE_PAIR_CIFAR if base_recipe.input_size <= _CIFAR_MAX_INPUT else MOBILE_PAIR
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    # (key, registered name, width, label); the matched width needs the data's class count.
    plan: list[tuple[str, str, float, str]] = [
        ("base", pair[0], float(width), _label(pair[0], float(width))),
        ("aa", pair[1], float(width), _label(pair[1], float(width))),
    ]
    runs: dict[str, list[dict[str, Any]]] = {}
    models: dict[str, Any] = {}
    num_classes = 0
    for seed in seeds:
        rec = dataclasses.replace(base_recipe, seed=seed)
        bundle = build_recipe_data(rec)
        num_classes = bundle.num_classes
        if matched and len(plan) == 2:
            aa_spec = dataclasses.replace(
                get_spec(pair[1]), num_classes=num_classes, input_size=rec.input_size, width=width
            )
            w, _ = macs_matched_width(
                pair[0],
                count_spec(aa_spec).macs,
                width=float(width),
                num_classes=num_classes,
                input_size=rec.input_size,
            )
            plan.append(("matched", pair[0], w, _label(pair[0], w, "MACs-matched")))
        for key, name, w, label in plan:
            seed_everything(seed)  # same init and augmentation stream for every model
            model = create_model(name, num_classes=num_classes, input_size=rec.input_size, width=w)
            run_recipe = dataclasses.replace(rec, model=name)
            ident = run_identity(run_recipe, model.spec.encode())
            runs_dir = out_dir / "runs" / f"{name}_w{w:g}" if out_dir is not None else None
            record = read_run_record(runs_dir / f"seed{seed}.json", ident) if runs_dir else None
            if record is not None:
                _LOG.info("reproduce: %s seed %d read back from %s", label, seed, runs_dir)
            else:
                _LOG.info("reproduce: training %s, seed %d", label, seed)
                work, resume = None, None
                if runs_dir is not None and keep_checkpoints:
                    work = runs_dir / f"seed{seed}"
                elif runs_dir is not None:  # checkpoints until recorded: a kill loses an epoch
                    work, resume = partial_run(runs_dir / f"seed{seed}.json", ident)
                metrics = fit(
                    model,
                    bundle,
                    run_recipe,
                    device=device,
                    out_dir=work,
                    resume=resume,
                    progress=progress,
                )
                record = json_safe({"seed": seed, **metrics})  # as stored: reruns compare equal
                if runs_dir is not None:  # written at once: a killed run resumes after it
                    record = write_run_record(runs_dir / f"seed{seed}.json", ident, record)
            runs.setdefault(key, []).append(record)
            models[key] = model
            _LOG.info("reproduce: %s seed %d test top-1 %.4f", label, seed, record["test_top1"])
            if on_run is not None:
                on_run(label, seed, record)

    rows = []
    for key, name, w, label in plan:
        model = models[key].cpu().eval()
        cost = count(model.spec)
        lat = measure_latency(
            model,
            backend=latency_backend,
            threads=1,
            batch=1,
            repeats=latency_repeats,
            warmup=max(1, latency_repeats // 5),
            cache=False,  # time this build on this machine now, not a cached record
        )
        rows.append(
            ReproduceRow(
                model=name,
                label=label,
                width=w,
                spec=model.spec.encode(),
                params=cost.params,
                macs=cost.macs,
                latency_ms=lat.median_ms,
                latency_iqr_ms=lat.iqr_ms,
                runs=tuple(runs[key]),
            )
        )
    result = ReproduceResult(
        rows=tuple(rows),
        recipe=base_recipe,
        recipe_source=str(recipe),
        seeds=seeds,
        width=float(width),
        device=device,
        latency_backend=latency_backend,
        num_classes=num_classes,
        time_s=time.perf_counter() - t0,
        table="",
    )
    result = dataclasses.replace(result, table=format_table(result))
    if out_dir is not None:
        atomic_write_text(out_dir / "reproduce.md", result.table + "\n")
        text = json.dumps(json_safe(result.to_dict()), indent=2, sort_keys=True)
        atomic_write_text(out_dir / "reproduce.json", text + "\n")
    return result
