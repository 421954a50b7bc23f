"""Typed, frozen run recipes and their YAML loader (layer L0: no torch).

A recipe is a frozen dataclass whose fields each carry a typed default and a why-comment
(nanoGPT's configurator principle, without its ``exec``). Values come from, in order: the field
defaults, a YAML file (``yaml.safe_load``, keys mirror the field names exactly) and ``--set
key=value`` overrides from the command line. Every value is type-checked against the field's
annotation; unknown keys and wrong types raise ``RecipeError`` naming the file or flag, the field,
the value and the expected type.

The loader is generic over the dataclass type (:func:`load_dataclass`, :func:`apply_overrides`,
:func:`recipe_from_dict`), so ``SearchRecipe``/``ExportRecipe`` reuse it unchanged.

Training settings follow Bello et al., *Attention Augmented Convolutional Networks*
(arXiv:1904.09925), appendix A; the shipped recipes under ``recipes/`` cite their sources.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from aanas.errors import RecipeError
from aanas.spec import SPEC_LIMITS

__all__ = [
    "COST_METRICS",
    "ENGINES",
    "EVALUATORS",
    "LATENCY_BACKENDS",
    "LATENCY_MODES",
    "PRUNERS",
    "SAMPLERS",
    "SCORES",
    "SearchRecipe",
    "SupernetRecipe",
    "TrainRecipe",
    "load_recipe",
    "load_dataclass",
    "apply_overrides",
    "recipe_from_dict",
    "recipe_to_dict",
    "find_recipe",
    "list_recipes",
    "OPTIMIZERS",
    "SCHEDULES",
]

T = TypeVar("T")

OPTIMIZERS = ("sgd", "rmsprop", "adamw")
SCHEDULES = ("cosine", "step", "exponential", "constant", "onecycle")

_TRUE = ("true", "yes", "on", "1")
_FALSE = ("false", "no", "off", "0")
_NONE = ("none", "null", "~", "")

# Upper bounds a real run never reaches, so a typo (--set batch_size=1280000) fails at load time
# with one line instead of in the allocator. Input sizes share the spec's bound.
_MAX_INPUT_SIZE = int(SPEC_LIMITS["input_size"][0])
_MAX_BATCH = 65_536  # the largest published ImageNet batches (LARS, Ying et al. 2018: 65536)
_MAX_EPOCHS = 100_000  # ImageNet recipes use 90-600 epochs, CIFAR 200
_MAX_WORKERS = 1024  # DataLoader processes


@dataclasses.dataclass(frozen=True)
class TrainRecipe:
    """Everything ``aanas.train.fit`` needs besides the model and the data.

    ``batch_size`` is the *global* batch: under DDP each of N processes loads ``batch_size / N``
    samples, so a recipe means the same optimisation on 1 or 8 GPUs.
    """

    # --- what to train on -----------------------------------------------------------------
    model: str = "mnasnet_a1_100"  # registered model name or spec string (aanas.models)
    data: str = "digits"  # digits | cifar10 | cifar100 | imagefolder:PATH; digits is offline
    data_root: str | None = None  # None -> ~/.cache/aanas/data; never an absolute default
    download: bool = False  # opt-in: the default run never touches the network
    input_size: int = 32  # square side in pixels fed to the model (resize if not native)
    val_fraction: float = 0.1  # held out of the TRAINING set; searches select on it, never test
    augment: bool = True  # random crop (+pad) and, where identity-safe, horizontal flip
    # --- optimisation -----------------------------------------------------------------------
    epochs: int = 10  # full passes over the training split
    batch_size: int = 128  # global batch (split across DDP processes)
    optimizer: str = "sgd"  # sgd | rmsprop (MnasNet uses TF-style RMSProp) | adamw
    lr: float = 0.1  # peak learning rate, reached at the end of warm-up
    momentum: float = 0.9  # SGD and RMSProp momentum (both papers use 0.9); AdamW beta1
    nesterov: bool = False  # WRN (Zagoruyko & Komodakis) trains with Nesterov momentum
    rmsprop_alpha: float = 0.9  # RMSProp squared-gradient decay (TF "decay"; MnasNet 0.9)
    rmsprop_eps: float = 0.0316  # ~sqrt(TF eps 1e-3): torch adds eps outside the sqrt, TF inside
    weight_decay: float = 1e-4  # L2 coefficient, coupled as in SGD (not AdamW-style)
    wd_exclude_bn_bias: bool = False  # drop decay on 1-d params (BN gamma/beta, biases)
    # --- learning-rate schedule (per optimiser step) ---------------------------------------
    schedule: str = "cosine"  # cosine | step | exponential | constant | onecycle
    # linear ramp 0 -> lr (Bello et al.: 5 epochs on ImageNet); onecycle: its rising phase
    # (0 = 30 % of the run, torch OneCycleLR's pct_start)
    warmup_epochs: float = 0.0
    milestones: tuple[int, ...] = ()  # step schedule: multiply by gamma at these epochs
    gamma: float = 0.1  # step schedule factor (ResNet /10, WRN x0.2)
    decay_rate: float = 0.97  # exponential schedule factor (MnasNet: 0.97 ...)
    decay_epochs: float = 2.4  # ... every 2.4 epochs, staircase as in the TF reference
    # --- regularisation and numerics --------------------------------------------------------
    label_smoothing: float = 0.0  # cross-entropy smoothing (0 = off)
    grad_clip: float = 0.0  # max global grad norm (0 = off)
    ema_decay: float = 0.0  # EMA of weights, evaluated when on (0 = off; MnasNet 0.9999)
    amp: bool = False  # fp16 autocast + GradScaler; only effective on CUDA
    # NHWC activations and weights: PyTorch's CPU (oneDNN) depthwise and 1x1 convolutions run
    # ~1.5x faster in a CIFAR MnasNet step (benchmarks/cifar_baseline.py); also the layout
    # CUDA tensor cores want under AMP. Results equal NCHW up to float round-off.
    channels_last: bool = False
    # BatchNorm running-stat momentum for every BN layer (0 = keep the model's). MnasNet keeps
    # torchvision's 0.0003 (TF 0.9997), whose running stats barely move in a short run, so
    # evaluation sits at chance; short runs and search trials set the torch default 0.1.
    bn_momentum: float = 0.0
    # Before each evaluation, reset BN running stats and re-estimate them (cumulative average)
    # from this many training batches (0 = off). Short runs/search trials need it: running
    # averages started at var=1 lag far behind small true variances (as in once-for-all).
    bn_recalibrate_batches: int = 0
    # A fresh run (not a resume) zeroes the scale of the BatchNorm closing every residual
    # branch, so each block starts as the identity (Goyal et al. 2017; torchvision's
    # zero_init_residual). Deep, narrow MnasNets learn much faster in short CPU runs with it.
    zero_init_residual: bool = False
    # Validate every N epochs and always after the last (0 = after the last only). A fixed
    # schedule uses validation only as a monitor; on the CIFAR-10 subset (10k val images) the
    # per-epoch pass costs ~15 % of a CPU epoch. Searches force 1: their pruners read every epoch.
    val_every: int = 1
    # --- bookkeeping ------------------------------------------------------------------------
    seed: int = 0  # seeds init, split, shuffling (per epoch: seed + epoch) and augmentation
    workers: int = 0  # DataLoader worker processes (0 = main process, bit-exact resume)
    pin_memory: bool = False  # page-locked host buffers; only useful with CUDA
    max_train_batches: int = 0  # cap optimiser steps per epoch (0 = all); lets a search cheapen

    def __post_init__(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        _check_choice("schedule", self.schedule, SCHEDULES)
        _check_range("input_size", self.input_size, low=1, high=_MAX_INPUT_SIZE)
        _check_range("epochs", self.epochs, low=1, high=_MAX_EPOCHS)
        _check_range("batch_size", self.batch_size, low=1, high=_MAX_BATCH)
        _check_range("lr", self.lr, low=0.0)
        _check_range("momentum", self.momentum, low=0.0, high=1.0)
        _check_range("rmsprop_alpha", self.rmsprop_alpha, low=0.0, high=1.0)
        _check_range("rmsprop_eps", self.rmsprop_eps, low=0.0)
        _check_range("weight_decay", self.weight_decay, low=0.0)
        _check_range("warmup_epochs", self.warmup_epochs, low=0.0)
        _check_range("gamma", self.gamma, low=0.0)
        _check_range("decay_rate", self.decay_rate, low=0.0)
        _check_range("label_smoothing", self.label_smoothing, low=0.0, high=1.0)
        _check_range("grad_clip", self.grad_clip, low=0.0)
        _check_range("bn_momentum", self.bn_momentum, low=0.0, high=1.0)
        _check_range("ema_decay", self.ema_decay, low=0.0, high=1.0, high_open=True)
        _check_range("val_fraction", self.val_fraction, low=0.0, high=1.0, high_open=True)
        _check_range("workers", self.workers, low=0, high=_MAX_WORKERS)
        _check_range("max_train_batches", self.max_train_batches, low=0)
        _check_range("bn_recalibrate_batches", self.bn_recalibrate_batches, low=0)
        _check_range("val_every", self.val_every, low=0)
        _check_range("decay_epochs", self.decay_epochs, low=0.0)  # also rejects nan/inf
        if self.decay_epochs <= 0:
            raise RecipeError(f"decay_epochs must be > 0, got {self.decay_epochs!r}")
        if self.nesterov and self.optimizer != "sgd":
            raise RecipeError(f"nesterov=true needs optimizer 'sgd', got {self.optimizer!r}")
        if self.nesterov and self.momentum == 0:
            raise RecipeError("nesterov=true needs momentum > 0 (torch.optim.SGD)")
        if list(self.milestones) != sorted(self.milestones):
            raise RecipeError(f"milestones must be increasing, got {list(self.milestones)!r}")
        if self.schedule == "step" and not self.milestones:
            raise RecipeError("schedule 'step' needs milestones, e.g. milestones: [30, 60, 90]")


# --- validation helpers ---------------------------------------------------------------------


def _check_choice(name: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise RecipeError(f"{name} must be one of {list(allowed)}, got {value!r}")


def _check_range(
    name: str,
    value: float,
    *,
    low: float | None = None,
    high: float | None = None,
    high_open: bool = False,
) -> None:
    """Raise ``RecipeError`` unless ``low <= value <= high`` (``< high`` when ``high_open``)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise RecipeError(f"{name} must be finite, got {value!r}")
    bad = (low is not None and value < low) or (
        high is not None and (value >= high if high_open else value > high)
    )
    if bad:
        upper = "" if high is None else f" and {'<' if high_open else '<='} {high}"
        raise RecipeError(f"{name} must be >= {low}{upper}, got {value!r}")


# --- generic dataclass <-> dict / YAML ------------------------------------------------------


def _field_types(cls: type) -> dict[str, Any]:
    """Resolved annotations of a dataclass (``from __future__`` makes them strings)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Check a YAML value against annotation ``tp``; return it in canonical form.

    Allowed widenings: int -> float; list -> tuple; a numeric string for a float field,
    because PyYAML (YAML 1.1) reads ``5e-4`` without a dot as the string ``'5e-4'``.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(name, value, inner[0])
        raise TypeError(f"unsupported annotation for {name}: {tp}")  # internal: no such field
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise RecipeError(f"{name}: expected a list of {_type_name(args[0])}, got {value!r}")
        return tuple(_coerce(f"{name}[{i}]", v, args[0]) for i, v in enumerate(value))
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported annotation for {name}: {tp}")
    raise RecipeError(f"{name}: expected {_type_name(tp)}, got {value!r} ({type(value).__name__})")


def recipe_from_dict(cls: type[T], data: Mapping[str, Any], *, source: str = "<dict>") -> T:
    """Build dataclass ``cls`` from a mapping; unknown keys or wrong types raise ``RecipeError``.

    Args:
        cls: a (frozen) dataclass type, e.g. :class:`TrainRecipe`.
        data: field name -> value, as ``yaml.safe_load`` returns it.
        source: where ``data`` came from, for error messages (file name).
    """
    if not isinstance(data, Mapping):
        raise RecipeError(f"{source}: expected a mapping of {cls.__name__} fields, got {data!r}")
    hints = _field_types(cls)
    unknown = [k for k in data if k not in hints]
    if unknown:
        raise RecipeError(
            f"{source}: unknown key {unknown[0]!r} for {cls.__name__} (allowed: {', '.join(hints)})"
        )
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        try:
            kwargs[key] = _coerce(key, value, hints[key])
        except ValueError as exc:
            raise RecipeError(f"{source}: {exc}") from None
    try:
        return cls(**kwargs)
    except ValueError as exc:  # __post_init__ checks of any recipe class
        raise RecipeError(f"{source}: {' '.join(str(exc).split())}") from None


def recipe_to_dict(recipe: Any) -> dict[str, Any]:
    """Plain, YAML/JSON-serialisable dict of a recipe (tuples become lists)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(recipe):
        value = getattr(recipe, f.name)
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return out


def load_dataclass(
    cls: type[T], path: str | Path, overrides: Sequence[str] = (), *, section: str | None = None
) -> T:
    """Load YAML file ``path`` into dataclass ``cls``, then apply ``key=value`` overrides.

    An empty file gives the defaults. ``section`` is the prefix accepted in overrides
    (``train.lr=0.05``); by default it is derived from the class name (``TrainRecipe`` ->
    ``train``).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe file not found: {path}")
    with path.open(encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh)
        # PyYAML raises ValueError for impossible timestamps (2020-13-45) and RecursionError
        # for very deep nesting; a file that is not UTF-8 gives UnicodeDecodeError (a ValueError).
        except (yaml.YAMLError, ValueError, RecursionError) as exc:
            raise RecipeError(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    obj = recipe_from_dict(cls, {} if data is None else data, source=str(path))
    return apply_overrides(obj, overrides, section=section)


def load_recipe(path: str | Path, overrides: Sequence[str] = ()) -> TrainRecipe:
    """Load a :class:`TrainRecipe` from a YAML path (or a shipped recipe name) plus overrides.

    Example:
        >>> r = load_recipe("digits_tiny", ["train.lr=0.05", "epochs=2"])  # doctest: +SKIP
    """
    return load_dataclass(TrainRecipe, find_recipe(path), overrides)


# --- command-line overrides -----------------------------------------------------------------


def _section_of(cls: type) -> str:
    name = cls.__name__
    return (name[: -len("Recipe")] if name.endswith("Recipe") else name).lower()


def _parse_scalar(name: str, raw: str, tp: Any) -> Any:
    text = raw.strip()
    if tp is bool:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
    elif tp is int:
        try:
            return int(text)
        except ValueError:
            pass
    elif tp is float:
        try:
            return float(text)
        except ValueError:
            pass
    elif tp is str:
        return raw
    else:
        raise TypeError(f"unsupported annotation for {name}: {tp}")
    raise RecipeError(f"override {name}={raw!r}: expected {_type_name(tp)}")


def _parse_override(name: str, raw: str, tp: Any) -> Any:
    """Parse the text of ``--set name=raw`` against annotation ``tp`` (no eval/exec).

    Tuples are comma-separated, optionally bracketed: ``milestones=30,60`` or ``[30, 60]``;
    ``none``/``null`` sets an optional field to None.
    """
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and raw.strip().lower() in _NONE:
            return None
        inner = [a for a in args if a is not type(None)]
        return _parse_override(name, raw, inner[0])
    if origin is tuple:
        body = raw.strip()
        if body[:1] in "[(" and body[-1:] in "])":
            body = body[1:-1]
        items = [s for s in (p.strip() for p in body.split(",")) if s]
        return tuple(_parse_scalar(name, s, args[0]) for s in items)
    return _parse_scalar(name, raw, tp)


def apply_overrides(recipe: T, overrides: Sequence[str], *, section: str | None = None) -> T:
    """Return a copy of ``recipe`` with ``key=value`` (or ``section.key=value``) applied.

    Values are parsed against the field's annotation; a bad value raises ``RecipeError``
    naming the field, the value and the expected type.
    """
    cls = type(recipe)
    hints = _field_types(cls)
    section = section or _section_of(cls)
    changes: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RecipeError(f"override {item!r} must look like key=value")
        if key.startswith(section + "."):
            key = key[len(section) + 1 :]
        if key not in hints:
            raise RecipeError(
                f"override {item!r}: unknown key {key!r} for {cls.__name__} "
                f"(allowed: {', '.join(hints)})"
            )
        changes[key] = _parse_override(key, raw, hints[key])
    if not changes:
        return recipe
    try:
        return dataclasses.replace(recipe, **changes)  # type: ignore[type-var]
    except ValueError as exc:  # __post_init__ checks of any recipe class, e.g. SearchRecipe's
        raise RecipeError(" ".join(str(exc).split())) from None


# --- shipped recipes ------------------------------------------------------------------------


def _recipe_dir() -> Path:
    """Folder of the shipped recipes: the repo's recipes/, installed as ``aanas.recipes``."""
    return Path(str(importlib.resources.files("aanas.recipes")))


def list_recipes() -> list[str]:
    """Names of the shipped recipes (file stems), sorted."""
    folder = _recipe_dir()
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def find_recipe(name_or_path: str | Path) -> Path:
    """Resolve a recipe path, or the bare name of a shipped recipe (``digits_tiny``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = str(name_or_path)
    if "/" not in name and "\\" not in name:
        stem = name[:-5] if name.endswith(".yaml") else name
        candidate = _recipe_dir() / f"{stem}.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"recipe {name!r} is neither a file nor a shipped recipe "
        f"(shipped: {', '.join(list_recipes()) or 'none'})"
    )


# --- search recipe --------------------------------------------------------------------------
# Choices of ``aanas search``; the engines, scorers and evaluators that implement them live in
# aanas.search (this module is L0 and imports none of them).

# soft / hard: MnasNet reward (arXiv:1807.11626, Eq. 2); pareto: (accuracy, cost) objectives;
# accuracy: accuracy alone (a budget, if any, still rejects candidates).
SCORES: tuple[str, ...] = ("soft", "hard", "pareto", "accuracy")
# Cost the reward/objectives use: analytical MACs or latency (measured, else predicted).
COST_METRICS: tuple[str, ...] = ("macs", "latency_ms")
ENGINES: tuple[str, ...] = ("optuna", "ray")
EVALUATORS: tuple[str, ...] = ("supernet", "train")
# auto: TPE for a scalar score, NSGA-II for pareto. Ray: "random" uses Ray's own random search,
# anything else runs the Optuna sampler inside ray.tune.search.optuna.OptunaSearch.
SAMPLERS: tuple[str, ...] = ("auto", "tpe", "nsga2", "random")
# Early stopping of `train` candidates: Optuna MedianPruner / HyperbandPruner; Ray uses ASHA for
# both (none: never stop early).
PRUNERS: tuple[str, ...] = ("median", "hyperband", "none")
# off: no latency; measure: time every candidate (latency_backend, 1 thread, batch 1, disk
# cache); predict: a latency table; auto: measure when a latency target or budget is set, else off.
LATENCY_MODES: tuple[str, ...] = ("auto", "off", "measure", "predict")
# Runtime that times candidates for latency=measure. onnxruntime is also the reference backend of
# the latency tables (aanas profile --build-lut), so measured and predicted latencies of one
# search mean the same thing; torch times the eager PyTorch model instead.
LATENCY_BACKENDS: tuple[str, ...] = ("onnxruntime", "torch")


@dataclasses.dataclass(frozen=True)
class SearchRecipe:
    """Every setting of ``aanas search``; the CLI flags map 1:1 onto these fields.

    Defaults are the offline CPU run: the tiny space on the embedded digits data, weight-sharing
    evaluation, 40 TPE trials, a few minutes on 2 cores.
    """

    # --- what to search ------------------------------------------------------------------------
    space: str = "tiny"  # shipped space name or YAML path (aanas.space.SearchSpace.from_yaml)
    data: str = "digits"  # digits | cifar10 | cifar100 | imagefolder:PATH
    data_root: str | None = None  # torchvision cache folder (None: ~/.cache/aanas/data)
    batch_size: int = 64  # digits has 1437 training images: 64 gives 18 steps per epoch
    val_fraction: float = 0.2  # searches select on this held-out part of the TRAINING split
    # --- engine ----------------------------------------------------------------------------------
    engine: str = "optuna"  # one of ENGINES
    evaluator: str = "supernet"  # one of EVALUATORS
    sampler: str = "auto"  # one of SAMPLERS
    pruner: str = "median"  # one of PRUNERS (train evaluator only)
    trials: int = 40  # finished trials (COMPLETE + PRUNED + FAIL) the study should reach
    # wall-clock budget in minutes (0: off), as Optuna's study.optimize(timeout=): no trial starts
    # after it, running ones finish; counted from the start of `aanas search` (data, supernet
    # training included) and summed over resumed runs (the run directory's time.json)
    timeout_min: float = 0.0
    n_jobs: int = 1  # Optuna threads in this process (more processes may share --storage)
    seed: int = 0  # sampler seed; trial k trains/recalibrates with seed + k
    # --- score and budget ------------------------------------------------------------------------
    score: str = "soft"  # one of SCORES
    target_macs: float = 0.0  # T of the reward in MACs (0: geometric mean of the space's range)
    target_latency_ms: float = 0.0  # T in ms; setting it makes latency the reward's metric
    max_macs: float = 0.0  # hard budget: candidates above are rejected untrained (0: off)
    max_latency_ms: float = 0.0  # hard budget in ms (0: off)
    latency: str = "auto"  # one of LATENCY_MODES
    latency_table: str | None = None  # YAML LUT for latency=predict (aanas.cost.LatencyTable)
    latency_threads: int = 1  # intra-op threads while timing (mobile-style single core)
    latency_backend: str = "onnxruntime"  # one of LATENCY_BACKENDS (latency=measure)
    # --- supernet evaluator ----------------------------------------------------------------------
    supernet: str | None = None  # load this trained supernet instead of training one
    # sandwich-rule epochs on the training split: 10 on digits take ~75 s on 2 CPU cores and
    # lift the best inherited accuracy from ~75 % (2 epochs) to the 90s
    supernet_epochs: int = 10
    supernet_lr: float = 0.05
    # with --timeout-min: the share of it the supernet's training may take (its schedule is
    # compressed to fit, SupernetRecipe.time_budget_s), the rest is for evaluating candidates
    supernet_budget_share: float = 0.4
    recal_batches: int = 4  # training batches to re-estimate BN statistics per candidate
    # --- train evaluator -------------------------------------------------------------------------
    train_recipe: str | None = None  # TrainRecipe YAML/shipped name (default: digits_tiny-like)
    train_epochs: int = 3  # epochs per candidate (pruners see each one)
    train_lr: float = 0.05
    max_train_batches: int = 0  # cap optimiser steps per epoch (0: all)
    # --- bookkeeping -----------------------------------------------------------------------------
    device: str = "auto"  # auto: cuda when available, else cpu
    # Optuna storage: a journal file path or an RDB URL (None: <out>/study.journal; Optuna's
    # journal file storage is its multi-process storage for one machine, SQLite is not)
    storage: str | None = None
    study_name: str | None = None  # None: the run name
    heartbeat_s: int = 10  # RDB storages: heartbeat of running trials ...
    grace_s: int = 30  # ... a trial silent this long is marked lost (FAIL, not counted)
    baselines: tuple[str, ...] = ()  # registered model names evaluated as reference points
    # architectures (registered names, or spec strings in a YAML list) the search evaluates
    # first, before its sampler proposes anything: a known good design (the hand-made MnasNet)
    # is then certainly considered and TPE models the space from it (Optuna's enqueue_trial,
    # Ray's points_to_evaluate). Each must be a point of the space. Read when a study is created.
    warm_start: tuple[str, ...] = ()
    top_k: int = 10  # rows of the summary table
    # --- Ray Tune --------------------------------------------------------------------------------
    address: str | None = None  # join this Ray cluster (None: start a local one)
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_concurrent: int = 0  # 0: as many as the resources allow
    num_cpus: int = 0  # local Ray only: CPUs to give ray.init (0: all)
    # where Ray keeps the experiment and trial checkpoints (None: <out>/ray). Across machines it
    # must be a path every node can write (NFS) or a URI (s3://, gs://): Ray refuses a worker
    # that cannot reach it
    ray_storage: str | None = None

    def __post_init__(self) -> None:
        _check_choice("engine", self.engine, ENGINES)
        _check_choice("evaluator", self.evaluator, EVALUATORS)
        _check_choice("sampler", self.sampler, SAMPLERS)
        _check_choice("pruner", self.pruner, PRUNERS)
        _check_choice("score", self.score, SCORES)
        _check_choice("latency", self.latency, LATENCY_MODES)
        _check_choice("latency_backend", self.latency_backend, LATENCY_BACKENDS)
        for name in (
            "target_macs",
            "target_latency_ms",
            "max_macs",
            "max_latency_ms",
            "cpus_per_trial",
            "gpus_per_trial",
            "supernet_lr",
            "train_lr",
            "timeout_min",
        ):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        for name, low in (
            ("trials", 1),
            ("n_jobs", 1),
            ("batch_size", 1),
            ("supernet_epochs", 0),
            ("recal_batches", 0),
            ("train_epochs", 1),
            ("max_train_batches", 0),
            ("heartbeat_s", 1),
            ("grace_s", 1),
            ("top_k", 1),
            ("max_concurrent", 0),
            ("num_cpus", 0),
            ("latency_threads", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(
                f"val_fraction must be in (0, 1): searches select on validation accuracy, "
                f"got {self.val_fraction!r}"
            )
        if not 0.0 < self.supernet_budget_share < 1.0:
            raise ValueError(
                f"supernet_budget_share must be in (0, 1): the supernet and the candidates share "
                f"--timeout-min, got {self.supernet_budget_share!r}"
            )
        if self.sampler == "nsga2" and self.score != "pareto":
            raise ValueError("sampler 'nsga2' is multi-objective: use it with --score pareto")
        if self.target_latency_ms > 0 and self.target_macs > 0:
            raise ValueError("give one reward target: --target-macs or --target-latency-ms")
        if self.latency == "off" and (self.target_latency_ms > 0 or self.max_latency_ms > 0):
            raise ValueError("a latency target or budget needs --latency measure or predict")
        if self.latency == "predict" and not self.latency_table:
            raise ValueError("--latency predict needs --latency-table PATH")
        if self.grace_s <= self.heartbeat_s:
            raise ValueError(
                f"grace_s ({self.grace_s}) must exceed heartbeat_s ({self.heartbeat_s})"
            )

    @property
    def cost_metric(self) -> str:
        """``latency_ms`` when a latency target is set, else ``macs``."""
        return "latency_ms" if self.target_latency_ms > 0 else "macs"

    @property
    def latency_mode(self) -> str:
        """The effective latency mode (``auto`` resolved)."""
        if self.latency != "auto":
            return self.latency
        if self.target_latency_ms > 0 or self.max_latency_ms > 0:
            return "predict" if self.latency_table else "measure"
        return "off"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready settings (written to the run directory's ``run.json``)."""
        out = dataclasses.asdict(self)
        out["baselines"] = list(self.baselines)
        out["warm_start"] = list(self.warm_start)
        return out


# --- supernet training ---------------------------------------------------------------------------

# sandwich: largest + smallest + n_random sampled paths per step (Yu et al., BigNAS,
# arXiv:2003.11142); uniform: one sampled path per step (Guo et al., SPOS, arXiv:1904.00420).
SUPERNET_RULES: tuple[str, ...] = ("sandwich", "uniform")
# Elastic dimensions of a space's parameters (aanas.supernet.param_dimension): kernel size,
# stage depth, width (expansion ratio, SE ratio, width multiplier) and attention (every aa.* key).
ELASTIC_DIMS: tuple[str, ...] = ("kernel", "depth", "width", "attention")


@dataclasses.dataclass(frozen=True)
class SupernetRecipe:
    """How :func:`aanas.supernet.train_supernet` trains the shared weights.

    The defaults are the anchors' method (every change has a switch, for ablations): the
    sandwich rule with in-place distillation (BigNAS, arXiv:2003.11142) and OFA's progressive
    shrinking (Cai et al., arXiv:1908.09791): the largest network alone first, then elastic
    kernel, depth and width; attention last, because its on/off choice changes a block's
    function most (a conv channel replaced by attention), so it is shrunk once the conv paths
    it shares weights with are trained.
    """

    epochs: int = 10  # passes over the training loader
    lr: float = 0.05  # peak SGD (Nesterov 0.9) learning rate, cosine-annealed to 0
    weight_decay: float = 5e-5
    max_batches: int = 0  # cap optimiser steps per epoch (0: the whole loader)
    rule: str = "sandwich"  # one of SUPERNET_RULES
    n_random: int = 2  # random paths per sandwich step (BigNAS: 2)
    # the largest path learns from the labels, the others from its detached soft labels (KL)
    distill: bool = True
    distill_temperature: float = 1.0  # BigNAS / OFA use T = 1
    # progressive shrinking: dimension shrink_order[i] becomes elastic once a fraction
    # shrink_at[i] of all steps is done; dimensions not listed are elastic from the start.
    # False: every dimension elastic from the first step.
    shrink: bool = True
    shrink_order: tuple[str, ...] = ("kernel", "depth", "width", "attention")
    shrink_at: tuple[float, ...] = (0.2, 0.4, 0.6, 0.8)
    # wall-clock budget in seconds (0: none). With one, the schedule (cosine LR, shrinking
    # phases) advances by max(fraction of steps, fraction of the budget), so training ends
    # annealed and through every phase when the first of the two runs out: a search's
    # --timeout-min cannot be spent on the supernet alone
    time_budget_s: float = 0.0
    # linear LR warm-up over this fraction of the schedule, then the cosine. A sandwich step
    # sums the gradients of ~4 paths: at the full LR from the first step, with every dimension
    # elastic, the CIFAR supernet's weights died in its first epoch (loss stuck at ln 10)
    warmup: float = 0.05
    grad_clip: float = 5.0  # max global gradient norm per step (0: no clipping)

    def __post_init__(self) -> None:
        _check_choice("rule", self.rule, SUPERNET_RULES)
        if not (isinstance(self.warmup, int | float) and 0.0 <= self.warmup < 1.0):
            raise ValueError(f"warmup must be a fraction in [0, 1), got {self.warmup!r}")
        for name, low in (("epochs", 0), ("max_batches", 0), ("n_random", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name in ("lr", "weight_decay", "distill_temperature", "time_budget_s", "grad_clip"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.distill and self.distill_temperature <= 0:
            raise ValueError(f"distill_temperature must be > 0, got {self.distill_temperature!r}")
        if self.distill and self.rule != "sandwich":
            raise ValueError(
                f"distill needs rule 'sandwich' (the largest path teaches), got rule {self.rule!r}"
            )
        bad = [d for d in self.shrink_order if d not in ELASTIC_DIMS]
        if bad or len(set(self.shrink_order)) != len(self.shrink_order):
            raise ValueError(
                f"shrink_order must list distinct names of {list(ELASTIC_DIMS)}, "
                f"got {list(self.shrink_order)}"
            )
        at = list(self.shrink_at)
        if (
            len(at) != len(self.shrink_order)
            or any(not 0.0 <= f < 1.0 for f in at)
            or at != sorted(at)
        ):
            raise ValueError(
                f"shrink_at must be {len(self.shrink_order)} non-decreasing fractions in [0, 1) "
                f"(one per shrink_order entry), got {at}"
            )

    def elastic_at(self, fraction: float) -> frozenset[str]:
        """The elastic dimensions once ``fraction`` (0..1) of all steps is done.

        Example: the defaults at 0.1 -> {} (largest only), at 0.5 -> {kernel, depth}.
        """
        if not self.shrink:
            return frozenset(ELASTIC_DIMS)
        fixed = {
            d for d, at in zip(self.shrink_order, self.shrink_at, strict=True) if fraction < at
        }
        return frozenset(d for d in ELASTIC_DIMS if d not in fixed)
