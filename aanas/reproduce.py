"""``aanas reproduce mobile``: MnasNet-A1 vs AA-MnasNet-A1 under one recipe, one table.

Bello et al., *Attention Augmented Convolutional Networks* (arXiv:1904.09925), Sec. 4.3 and
Table 3, augment MnasNet (Tan et al., arXiv:1807.11626) with attention and compare it with the
plain network on ImageNet. This module repeats that comparison at whatever scale the machine
allows: both models (``mnasnet_a1_100`` and ``aa_mnasnet_a1_100`` at the same width) are trained
by :func:`aanas.train.fit` with the same recipe and the same seeds, and the table reports
parameters, MACs (:mod:`aanas.cost`), measured latency (1 thread, batch 1) and top-1 on the
data set's TEST split (mean and standard deviation over seeds), beside the published numbers.
Nothing is hard-coded except those published reference values, each with its source.

Layer: above ``train``/``cost``/``data``/``models``, below ``cli``.

Scales (the recipe and data decide everything; see ``aanas reproduce mobile --help``):

- default: ``recipes/reproduce_mobile_cpu.yaml`` on the embedded digits data, a few CPU minutes;
- CIFAR-10: ``--recipe cifar10_subset_mnasnet_a1 --data imagefolder:PATH`` (the offline subset)
  or ``--data cifar10 --set download=true`` (the full set, downloaded once);
- ImageNet on GPUs: ``--recipe imagenet_mnasnet_a1 --data imagefolder:/path/to/imagenet
  --device cuda`` (multi-GPU runs train the pair with ``aanas train`` under torchrun instead).
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
from aanas.config import TrainRecipe, load_recipe, recipe_to_dict
from aanas.results import atomic_write_text

__all__ = [
    "DEFAULT_RECIPE",
    "MOBILE_PAIR",
    "PAPER_REFERENCE",
    "ReproduceResult",
    "ReproduceRow",
    "format_table",
    "reproduce_mobile",
]

_LOG = logging.getLogger(__name__)

DEFAULT_RECIPE = "reproduce_mobile_cpu"
# (baseline, attention-augmented): registered names; ``width`` replaces their multiplier.
MOBILE_PAIR: tuple[str, str] = ("mnasnet_a1_100", "aa_mnasnet_a1_100")
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
    spec: str  # canonical spec string of the trained model
    params: int
    macs: int
    latency_ms: float  # median of the timed runs
    latency_iqr_ms: float
    runs: tuple[dict[str, Any], ...]  # fit() metrics per seed (plus "seed")

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

    rows: tuple[ReproduceRow, ReproduceRow]  # (baseline, attention-augmented)
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
        base, aa = self.rows
        deltas = [100 * (a - b) for a, b in zip(aa.top1, base.top1, strict=True)]
        mean, std = _mean_std(deltas)
        return {
            "experiment": "mobile",
            "rows": [r.to_dict() for r in self.rows],
            "delta_top1_pct": {"per_seed": deltas, "mean": mean, "std": std},
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


def _na(value: float | None, fmt: str = "{:.1f}") -> str:
    return "n/a" if value is None else fmt.format(value)


def _label(model: str, width: float) -> str:
    """``("aa_mnasnet_a1_100", 1.0) -> "AA-MnasNet-A1 (w1.0)"``."""
    base = "MnasNet-A1" if "mnasnet_a1" in model else model
    return f"{'AA-' if model.startswith('aa_') else ''}{base} (w{width:g})"


def format_table(result: ReproduceResult) -> str:
    """The Markdown table (ours beside the paper's) and its footnotes."""
    backend = result.latency_backend
    head = (
        "| model | params (M) | MACs (M) | latency (ms) | test top-1 (%) | "
        "paper params (M) | paper MACs (M) | paper ImageNet top-1 (%) |"
    )
    lines = [head, "|" + "---|" * 8]
    for row in result.rows:
        ref = PAPER_REFERENCE.get(row.model, {}) if result.width == 1.0 else {}
        lines.append(
            f"| {row.label} | {row.params / 1e6:.3f} | {row.macs / 1e6:.1f} | "
            f"{row.latency_ms:.2f} ± {row.latency_iqr_ms:.2f} | "
            f"{_pm([100 * t for t in row.top1])} | {_na(ref.get('params_m'))} | "
            f"{_na(ref.get('macs_m'), '{:.0f}')} | {_na(ref.get('top1'))} |"
        )
    base, aa = result.rows
    deltas = [100 * (a - b) for a, b in zip(aa.top1, base.top1, strict=True)]
    r = result.recipe
    notes = [
        "",
        f"Δ top-1 (AA − baseline, paired by seed): {_pm(deltas)} points; paper: n/a "
        "(Bello et al. Table 3 not verified offline).",
        f"Ours: data `{r.data}` at {r.input_size}x{r.input_size}, {result.num_classes} classes, "
        f"TEST split; recipe `{result.recipe_source}` ({r.epochs} epochs"
        + (f", at most {r.max_train_batches} steps/epoch" if r.max_train_batches else "")
        + f", batch {r.batch_size}, {r.optimizer} lr {r.lr:g}); seeds "
        f"{', '.join(map(str, result.seeds))}; device {result.device}; "
        f"{result.time_s / 60:.1f} min.",
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
    seeds: Sequence[int] = (0,),
    width: float = 1.0,
    device: str = "cpu",
    out: str | Path | None = None,
    latency_backend: str = "onnxruntime",
    latency_repeats: int = 50,
    keep_checkpoints: bool = False,
    progress: bool = False,
    pair: tuple[str, str] = MOBILE_PAIR,
    on_run: Callable[[str, int, dict[str, Any]], None] | None = None,
) -> ReproduceResult:
    """Train the MnasNet-A1 / AA-MnasNet-A1 pair over ``seeds`` and tabulate the results.

    For every seed, both models are built with ``create_model(name, num_classes=data classes,
    input_size=recipe.input_size, width=width)``, seeded identically
    (:func:`aanas.train.seed_everything`) and trained by :func:`aanas.train.fit` on the same
    data split; the test split is evaluated once at the end.

    Args:
        recipe: recipe YAML path or shipped name; its ``model`` field is ignored.
        overrides: ``key=value`` recipe overrides (``--set``), applied before ``data``/``epochs``.
        data: replaces ``recipe.data`` (``digits``, ``cifar10``, ``imagefolder:PATH``, ...).
        epochs: replaces ``recipe.epochs``.
        seeds: recipe seeds; each one trains both models.
        width: channel multiplier of both models.
        device: training device (``cpu``, ``cuda``, ``cuda:1``); latency is timed on CPU.
        out: folder for ``reproduce.md`` and ``reproduce.json`` (None: write nothing).
        latency_backend: ``onnxruntime`` or ``torch``.
        latency_repeats: timed forward passes per model.
        keep_checkpoints: keep fit()'s checkpoints under ``out/runs/<model>/seed<k>``.
        progress: tqdm bars while training.
        pair: (baseline, augmented) registered names; the CLI always uses :data:`MOBILE_PAIR`.
        on_run: called as ``on_run(model, seed, metrics)`` after each training run.

    Returns:
        A :class:`ReproduceResult`; ``result.table`` is the printed table.

    Raises:
        ValueError: bad seeds, width, backend or recipe values.
    """
    from aanas.cost import count, measure
    from aanas.data import build_data
    from aanas.models import create_model
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
    out_dir = Path(out) if out is not None else None
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    t0 = time.perf_counter()
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in pair}
    models: dict[str, Any] = {}
    num_classes = 0
    for seed in seeds:
        rec = dataclasses.replace(base_recipe, seed=seed)
        bundle = build_data(
            rec.data,
            root=rec.data_root,
            input_size=rec.input_size,
            batch_size=rec.batch_size,
            val_fraction=rec.val_fraction,
            seed=seed,
            download=rec.download,
            workers=rec.workers,
            pin_memory=rec.pin_memory,
            augment=rec.augment,
        )
        num_classes = bundle.num_classes
        for name in pair:
            seed_everything(seed)  # same init and augmentation stream for both models
            model = create_model(
                name, num_classes=num_classes, input_size=rec.input_size, width=width
            )
            run_dir = None
            if keep_checkpoints and out_dir is not None:
                run_dir = out_dir / "runs" / name / f"seed{seed}"
            _LOG.info("reproduce: training %s (width %g), seed %d", name, width, seed)
            metrics = fit(
                model,
                bundle,
                dataclasses.replace(rec, model=name),
                device=device,
                out_dir=run_dir,
                progress=progress,
            )
            record = {"seed": seed, **metrics}
            runs[name].append(record)
            models[name] = model
            _LOG.info("reproduce: %s seed %d test top-1 %.4f", name, seed, metrics["test_top1"])
            if on_run is not None:
                on_run(name, seed, record)

    rows = []
    for name in pair:
        model = models[name].cpu().eval()
        cost = count(model.spec)
        lat = measure(
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
                label=_label(name, float(width)),
                spec=model.spec.encode(),
                params=cost.params,
                macs=cost.macs,
                latency_ms=lat.median_ms,
                latency_iqr_ms=lat.iqr_ms,
                runs=tuple(runs[name]),
            )
        )
    result = ReproduceResult(
        rows=(rows[0], rows[1]),
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
        text = json.dumps(_finite(result.to_dict()), indent=2, sort_keys=True)
        atomic_write_text(out_dir / "reproduce.json", text + "\n")
    return result


def _finite(obj: Any) -> Any:
    """Replace NaN/inf by None so ``reproduce.json`` is strict JSON."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
