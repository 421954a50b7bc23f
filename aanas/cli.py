"""Command-line interface: ``aanas <command> ...``. Thin: parses flags, calls the library.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> int`` registered in
``_COMMANDS``. Library errors that come from user input (``ValueError``, ``FileNotFoundError``)
are printed as one line, ``aanas: error: ...``, with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import signal
import sys
import typing
from collections.abc import Callable, Sequence
from typing import Any

from aanas import __version__

__all__ = ["main", "build_parser"]

_AddParser = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# --- help that tells the truth -----------------------------------------------------------------

_TYPE_METAVARS: dict[Any, str] = {int: "INT", float: "FLOAT", str: "STR", bool: "BOOL"}


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, plus every option's type as its metavar and its real default.

    The default shown is the one argparse will use (``action.default``), so it cannot drift from
    the code; options whose default lives in a recipe dataclass say so in their own help text.
    """

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        if action.type in _TYPE_METAVARS:
            return _TYPE_METAVARS[action.type]
        return action.dest.upper()

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        shown = not (
            default is None or default is False or default is argparse.SUPPRESS or default == []
        )
        if shown and action.option_strings and "(default" not in text and action.nargs != 0:
            text += " (default: %(default)s)"
        return text


def _fmt_default(value: Any) -> str:
    """How a dataclass default reads in ``--help``: None -> none, () -> none, 5e-4 -> 0.0005."""
    if value is None or value == ():
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return ",".join(str(v) for v in value)
    return str(value)


def _field_metavar(annotation: Any) -> str:
    """Metavar from a dataclass field's annotation: int -> INT, str | None -> STR, tuple -> A,B."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is tuple:
        return f"{_TYPE_METAVARS.get(args[0], 'STR')},..."
    if args:  # X | None
        annotation = args[0]
    return _TYPE_METAVARS.get(annotation, "STR")


def _recipe_fields(cls: type) -> dict[str, tuple[Any, Any]]:
    """``name -> (annotation, default)`` of a recipe dataclass: the one source of defaults."""
    hints = typing.get_type_hints(cls)
    out: dict[str, tuple[Any, Any]] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        out[f.name] = (hints[f.name], default)
    return out


# --- subcommands (one section each; keep them thin) -------------------------------------------


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from aanas.config import TrainRecipe

    fields = _recipe_fields(TrainRecipe)

    def recipe_default(name: str) -> str:
        return f"(default: the recipe's {name}; TrainRecipe's is {_fmt_default(fields[name][1])})"

    p = sub.add_parser(
        "train",
        formatter_class=_HelpFormatter,
        help="train one model with a recipe",
        description="Train a model with a recipe (a YAML path or a shipped recipe name). "
        "Multi-GPU: torchrun --nproc_per_node N -m aanas train ...",
    )
    p.add_argument("--recipe", required=True, help="recipe YAML path or shipped name")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field (type-checked), e.g. --set lr=0.05; repeatable",
    )
    p.add_argument(
        "--model",
        help="model name or spec string (same as --set model=...) " + recipe_default("model"),
    )
    p.add_argument(
        "--data",
        help="digits | cifar10 | cifar100 | imagefolder:PATH " + recipe_default("data"),
    )
    p.add_argument("--epochs", type=int, help="same as --set epochs=N " + recipe_default("epochs"))
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--out", help="output folder for checkpoints and metrics (default: none, nothing saved)"
    )
    p.add_argument("--resume", help="checkpoint (last.pt) to continue from")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_train)


def _run_train(args: argparse.Namespace) -> int:
    import json

    from aanas.config import load_recipe

    overrides = list(args.overrides)
    for key in ("model", "data", "epochs"):
        value = getattr(args, key)
        if value is not None:
            overrides.append(f"{key}={value}")
    recipe = load_recipe(args.recipe, overrides)  # check the recipe before importing torch
    if args.out is not None:
        from aanas._io import check_writable_dir

        check_writable_dir(args.out, "--out")

    from aanas.data import build_recipe_data
    from aanas.models import create_model
    from aanas.train import fit, seed_everything, setup_distributed, teardown_distributed

    ctx = setup_distributed(args.device)
    finished = False
    try:
        seed_everything(recipe.seed)
        data = build_recipe_data(recipe, distributed=ctx.world_size > 1)
        model = create_model(
            recipe.model, num_classes=data.num_classes, input_size=recipe.input_size
        )
        metrics = fit(
            model,
            data,
            recipe,
            device=ctx.device,
            out_dir=args.out,
            resume=args.resume,
            progress=not args.no_progress,
        )
        finished = True
    finally:
        # Ranks meet at a barrier only after a clean run: after an error a peer may be gone.
        teardown_distributed(barrier=finished)
    if ctx.is_main:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _add_profile(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "profile",
        formatter_class=_HelpFormatter,
        help="params, MACs, FLOPs and latency of a model; build latency tables",
        description="Print params, MACs, FLOPs (= 2 x MACs) and a per-block table of a model, "
        "its measured latency (median, IQR) and, with --lut, its predicted latency. "
        "--build-lut SPACE.yaml measures every distinct block of the space's samples instead.",
    )
    p.add_argument("model", nargs="?", help="registered model name or spec string")
    p.add_argument("--input-size", type=int, help="square input side (default: the spec's)")
    p.add_argument(
        "--backend",
        choices=("onnxruntime", "torch"),
        help="runtime (default: onnxruntime on cpu, the latency tables' reference; torch on cuda)",
    )
    p.add_argument("--threads", type=int, default=1, help="intra-op threads")
    p.add_argument("--batch", type=int, default=1, help="batch size")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (torch backend)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first")
    p.add_argument("--lut", help="latency table YAML for a predicted latency")
    p.add_argument("--no-latency", action="store_true", help="counts only, measure nothing")
    p.add_argument("--no-cache", action="store_true", help="ignore the on-disk latency cache")
    p.add_argument("--build-lut", metavar="SPACE.yaml", help="build/refresh a latency table")
    p.add_argument("--out", default="lut.yaml", help="table written by --build-lut")
    p.add_argument("--samples", type=int, default=200, help="--build-lut: space samples")
    p.add_argument("--seed", type=int, default=0, help="--build-lut: sampling seed")
    p.add_argument("--fit-networks", type=int, default=20, help="--build-lut: overhead fit nets")
    p.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    import os

    from aanas._io import check_writable_file
    from aanas.cost import LatencyTable, count, measure

    if args.backend is None:
        args.backend = "onnxruntime" if args.device == "cpu" else "torch"
    if args.build_lut:
        check_writable_file(args.out, "--out")  # before minutes of measuring, not after
        table = None
        if os.path.exists(args.out):
            table = LatencyTable.load(args.out, stale="ignore")  # another version: rebuild
        before = len(table) if table is not None else 0
        table = LatencyTable.build(
            args.build_lut,
            samples=args.samples,
            seed=args.seed,
            fit_networks=args.fit_networks,
            backend=args.backend,
            threads=args.threads,
            batch=args.batch,
            device=args.device,
            input_size=args.input_size,
            repeats=args.repeats,
            warmup=args.warmup,
            table=table,
        )
        table.save(args.out)
        print(
            f"{args.out}: {len(table)} entries ({len(table) - before} new), "
            f"overhead {table.overhead_ms:.3f} ms"
        )
        if not args.model:
            return 0
    if not args.model:
        raise ValueError("profile needs a MODEL_OR_SPEC (or --build-lut SPACE.yaml)")
    from aanas.models import resolve_spec

    spec = resolve_spec(args.model, args.input_size)
    cost = count(spec)
    table = LatencyTable.load(args.lut) if args.lut else None
    parts = dict(table.parts(spec)) if table is not None and not table.missing(spec) else {}
    print(
        f"model   {args.model if ':' not in args.model else spec.digest()}  "
        f"input {spec.input_size}x{spec.input_size}"
    )
    print(f"params  {cost.params:,} ({cost.params / 1e6:.3f} M)")
    print(f"MACs    {cost.macs:,} ({cost.macs / 1e6:.2f} M)")
    print(f"FLOPs   {cost.flops:,} ({cost.flops / 1e9:.3f} G)")
    print()
    header = f"{'part':<20} {'params':>12} {'MACs':>15}"
    print(header + (f" {'LUT ms':>9}" if parts else ""))
    for name, (params, macs) in cost.blocks.items():
        lut_name = "head" if name == "classifier" else name
        line = f"{name:<20} {params:>12,} {macs:>15,}"
        if parts and name != "classifier":
            line += f" {parts.get(lut_name, 0.0):>9.3f}"
        print(line)
    print()
    if not args.no_latency:
        res = measure(
            spec,
            backend=args.backend,
            threads=args.threads,
            batch=args.batch,
            device=args.device,
            repeats=args.repeats,
            warmup=args.warmup,
            cache=not args.no_cache,
        )
        print(
            f"latency {res.median_ms:.3f} ms median, IQR {res.iqr_ms:.3f} ms "
            f"({args.backend}, {args.threads} thread(s), batch {args.batch}, {res.repeats} runs"
            f"{', cached' if res.cached else ''})"
        )
    if args.lut:
        if table is None:
            print(f"predicted: {args.lut} is from another machine; not used")
        elif table.missing(spec):
            print(
                f"predicted: {len(table.missing(spec))} parts missing from {args.lut}; "
                "refresh it with --build-lut"
            )
        else:
            print(
                f"predicted {table.predict(spec):.3f} ms (LUT, overhead {table.overhead_ms:.3f} ms)"
            )
    return 0


# --- search / show ----------------------------------------------------------------------------

# flag -> SearchRecipe field, help. Values go through aanas.config.apply_overrides, so each is
# type-checked against the field and a bad one is a one-line ValueError (exit 2). The help adds
# each field's type and default, read from the dataclass (_recipe_fields), never copied here.
_SEARCH_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--space", "space", "search space: shipped name (tiny, aa_mnasnet, ...) or YAML path"),
    ("--data", "data", "digits (embedded) | cifar10 | cifar100 | imagefolder:PATH"),
    ("--data-root", "data_root", "torchvision data folder; none: ~/.cache/aanas/data"),
    ("--engine", "engine", "optuna | ray"),
    ("--evaluator", "evaluator", "supernet (weight sharing) | train (from scratch)"),
    ("--sampler", "sampler", "auto | tpe | nsga2 | random (Ray: random = Ray's random search)"),
    ("--search-alg", "sampler", "alias of --sampler (Ray Tune wording)"),
    ("--pruner", "pruner", "median | hyperband | none (train evaluator; Ray uses ASHA)"),
    ("--trials", "trials", "finished trials the study should reach (a rerun does the rest)"),
    ("--timeout-min", "timeout_min", "wall-clock budget: no trial starts after it (0: off)"),
    ("--n-jobs", "n_jobs", "Optuna worker threads in this process"),
    ("--seed", "seed", "sampler seed (same seed, same suggested specs)"),
    ("--score", "score", "soft | hard (MnasNet reward) | pareto (NSGA-II) | accuracy"),
    ("--target-macs", "target_macs", "reward target T in MACs, e.g. 5M; 0: mid-space"),
    ("--target-latency-ms", "target_latency_ms", "reward target T in ms (measures latency)"),
    ("--max-macs", "max_macs", "hard budget: reject candidates above, untrained (e.g. 8M); 0: off"),
    ("--max-latency-ms", "max_latency_ms", "hard latency budget in ms; 0: off"),
    ("--latency", "latency", "auto | off | measure | predict"),
    ("--latency-table", "latency_table", "latency LUT YAML for --latency predict"),
    (
        "--latency-backend",
        "latency_backend",
        "onnxruntime (as the latency tables) | torch: runtime that times --latency measure",
    ),
    ("--supernet", "supernet", "load this trained supernet.pt instead of training one"),
    ("--supernet-epochs", "supernet_epochs", "supernet training epochs"),
    (
        "--supernet-budget-share",
        "supernet_budget_share",
        "with --timeout-min: the share of it the supernet's training may take (default 0.4)",
    ),
    ("--recal-batches", "recal_batches", "BN recalibration batches per candidate"),
    ("--train-epochs", "train_epochs", "epochs per candidate (train evaluator)"),
    ("--train-recipe", "train_recipe", "TrainRecipe YAML or shipped name (train evaluator)"),
    ("--max-train-batches", "max_train_batches", "cap optimiser steps per epoch (0: all)"),
    ("--batch-size", "batch_size", "batch size of training and evaluation"),
    ("--device", "device", "auto | cpu | cuda[:i]"),
    (
        "--storage",
        "storage",
        "Optuna storage shared by workers: a journal file (one machine) or an RDB URL "
        "(postgresql://user@host/db, many machines); none: <out>/study.journal",
    ),
    ("--study-name", "study_name", "study name in the storage; none: the run name"),
    ("--baselines", "baselines", "comma-separated registered models evaluated for reference"),
    (
        "--warm-start",
        "warm_start",
        "comma-separated registered models in the space, evaluated first (e.g. "
        "mnasnet_a1_cifar_050); spec strings go in a --config YAML list",
    ),
    ("--top-k", "top_k", "rows of the summary table"),
    ("--address", "address", "Ray cluster address to join; none: start a local Ray"),
    ("--cpus-per-trial", "cpus_per_trial", "Ray: CPUs per trial"),
    ("--gpus-per-trial", "gpus_per_trial", "Ray: GPUs per trial (fractions allowed)"),
    ("--max-concurrent", "max_concurrent", "Ray: concurrent trials (0: as resources allow)"),
    (
        "--ray-storage",
        "ray_storage",
        "Ray: experiment/checkpoint storage all nodes reach (NFS, s3://)",
    ),
)
_COUNT_SUFFIX = {"k": 1e3, "m": 1e6, "g": 1e9}


def _count_text(text: str) -> str:
    """``"5M"`` -> ``"5000000.0"`` for MACs flags; anything else unchanged (checked later)."""
    body, suffix = text[:-1], text[-1:].lower()
    if suffix in _COUNT_SUFFIX:
        try:
            return repr(float(body) * _COUNT_SUFFIX[suffix])
        except ValueError:
            return text
    return text


def _add_search(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from aanas.search import SearchRecipe

    fields = _recipe_fields(SearchRecipe)

    def default(name: str) -> str:
        return _fmt_default(fields[name][1])

    p = sub.add_parser(
        "search",
        formatter_class=_HelpFormatter,
        help="architecture search (Optuna or Ray Tune)",
        description="Search a space of attention-augmented networks. With no arguments: the "
        f"{default('space')} space on the {default('data')} data, {default('evaluator')} "
        f"evaluation, {default('trials')} trials with the {default('engine')} engine (sampler "
        f"{default('sampler')}: TPE for the {default('score')} score), a few minutes on CPU. "
        "Rerunning the same command resumes the search.",
    )
    for flag, field, text in _SEARCH_FLAGS:
        annotation, value = fields[field]
        # argparse's default stays None, so that only flags given override --config's values.
        p.add_argument(
            flag,
            dest=f"search_{field}",
            default=None,
            metavar=_field_metavar(annotation),
            help=f"{text} (default: {_fmt_default(value)})",
        )
    p.add_argument("--out", help="run directory (default: runs/<space>-<engine>-<evaluator>)")
    p.add_argument(
        "--config", help="SearchRecipe YAML, keys = the long flag names with _ (default: none)"
    )
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="any SearchRecipe field, e.g. --set grace_s=60; repeatable",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from aanas.config import apply_overrides, load_dataclass
    from aanas.search import SearchRecipe, run_search

    overrides: list[str] = []
    for _flag, field, _text in _SEARCH_FLAGS:
        value = getattr(args, f"search_{field}")
        if value is not None:
            if field in ("target_macs", "max_macs"):
                value = _count_text(value)
            overrides.append(f"{field}={value}")
    if args.config:
        recipe = load_dataclass(SearchRecipe, args.config, section="search")
    else:
        recipe = SearchRecipe()
    recipe = apply_overrides(recipe, overrides + list(args.overrides), section="search")
    from pathlib import Path

    from aanas._io import check_writable_dir
    from aanas.search import default_run_name

    check_writable_dir(args.out or Path("runs") / default_run_name(recipe), "--out")
    # SIGTERM (kill, a scheduler's stop) ends the search like Ctrl-C: the running trial is
    # marked interrupted and the run directory rewritten from the storage.
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        outcome = run_search(recipe, out=args.out, progress=not args.no_progress)
    finally:
        signal.signal(signal.SIGTERM, previous)
    run_dir = outcome.run_dir.path
    best = outcome.best
    counts: dict[str, int] = {}
    for r in outcome.results:
        counts[r.state] = counts.get(r.state, 0) + 1
    print(
        f"trials: {len(outcome.results)} ("
        + ", ".join(f"{n} {s.lower()}" for s, n in sorted(counts.items()))
        + ")"
    )
    if best is None:
        print(
            f"aanas: error: no trial completed in {run_dir} (see summary.md for each trial's "
            "state and error)",
            file=sys.stderr,
        )
        return 1
    else:
        print(
            f"best: trial {best.number}: val accuracy {100 * (best.accuracy or 0):.2f}%, "
            f"{(best.macs or 0) / 1e6:.3f}M MACs, {(best.n_params or 0) / 1e6:.3f}M params"
            + (f", reward {best.reward:.4f}" if best.reward is not None else "")
        )
        print(f"spec: {best.spec}")
    print(
        f"Pareto front: {len(outcome.front)} points; results in {run_dir}/ "
        f"(summary.md, trials.csv, pareto.png, best/) after {outcome.wall_s:.0f} s"
    )
    storage = outcome.run_dir.read_meta().get("storage")
    if storage:
        print(f"dashboard: optuna-dashboard {storage}")
    return 0


class _Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like Ctrl-C's KeyboardInterrupt."""

    signal_name = "SIGTERM"


def _raise_terminated(signum: int, frame: object) -> None:
    raise _Terminated()


def _add_show(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "show",
        formatter_class=_HelpFormatter,
        help="print a search's results again",
        description="Print the top-k table and Pareto front of a search run directory.",
    )
    p.add_argument("run_dir", help="run directory, e.g. runs/tiny-optuna-supernet")
    p.add_argument(
        "--top-k", type=int, default=None, help="rows of the top-k table (default: the run's)"
    )
    p.set_defaults(run=_run_show)


def _run_show(args: argparse.Namespace) -> int:
    from aanas.search import show_run

    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    print(show_run(args.run_dir, top_k=args.top_k), end="")
    return 0


# --- export / reproduce -----------------------------------------------------------------------


def _add_export(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        formatter_class=_HelpFormatter,
        help="export a model to ONNX and verify it against PyTorch",
        description="Export a search's best model (RUN_DIR with best/spec.txt and best/model.pt) "
        "or --model [--checkpoint] to ONNX (opset >= 17, dynamic batch, spec/input size/"
        "normalization/MACs in metadata), then check onnxruntime against PyTorch on random and "
        "real images. Tolerance, per input: the max abs logit difference must be <= max(--atol, "
        "8 x PyTorch's own float32 round-off on that input (its max distance from the same model "
        "run in float64), --rtol x the largest |logit|), so deep nets with large logits are held "
        "to their own precision, not to a fixed number. Exit code 1 when it is exceeded (nothing "
        "is written), 2 on bad input.",
    )
    p.add_argument("run_dir", nargs="?", help="search run directory (runs/<name>)")
    p.add_argument("--model", help="registered model name or spec string")
    p.add_argument(
        "--checkpoint",
        help="aanas train checkpoint, bare state_dict or {'spec','state_dict'} file "
        "(without it: random init, with a warning)",
    )
    p.add_argument("--out", help="ONNX file (default: RUN_DIR/best/model.onnx or ./MODEL.onnx)")
    p.add_argument("--input-size", type=int, help="square input side (default: the spec's)")
    p.add_argument("--num-classes", type=int, help="classifier outputs (random init/bare dict)")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default: 17)")
    p.add_argument(
        "--data", help="real images for the check (default: the training data, else digits)"
    )
    p.add_argument(
        "--atol", type=float, help="absolute floor of the parity tolerance (default: 1e-5)"
    )
    p.add_argument(
        "--rtol", type=float, help="parity tolerance per unit of the largest |logit| (1e-5)"
    )
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument(
        "--check-latency", action="store_true", help="time onnxruntime beside PyTorch (1 thread)"
    )
    p.set_defaults(run=_run_export)


def _export_images(
    data: str | None, trained_on: str | None, data_root: str | None, size: int
) -> tuple[Any, Any, Any, str]:
    """CLI policy for the check images and the normalization metadata of ``aanas export``.

    Images: ``--data``, else the data set the model was trained on (when it is available on this
    machine), else the embedded digits. Normalization: the training data's mean/std when known,
    else that of the images used. Returns ``(images, mean, std, where the mean/std came from)``.
    """
    from aanas.export import real_images

    log = logging.getLogger("aanas.cli")
    names = [data] if data else [n for n in (trained_on, "digits") if n]
    real = mean = std = None
    used = ""
    for name in names:
        try:
            root = data_root if name == trained_on else None
            real, mean, std = real_images(name, size, root=root)
            used = name
            break
        except (FileNotFoundError, ValueError) as exc:
            if name == data:
                raise
            log.warning("cannot load data %r (%s); trying the next", name, exc)
    source = f"{used} (training data)" if used and used == trained_on else f"{used} (default)"
    if trained_on and used != trained_on:
        try:
            _, mean, std = real_images(trained_on, size, 1, root=data_root)
            source = f"{trained_on} (training data)"
        except (FileNotFoundError, ValueError) as exc:
            log.warning(
                "training data %r unavailable (%s): normalization metadata from %r",
                trained_on,
                exc,
                used,
            )
    return real, mean, std, source


def _run_export(args: argparse.Namespace) -> int:
    from pathlib import Path

    from aanas._io import check_writable_dir, check_writable_file

    # Where the file will go, checked before loading or tracing anything.
    if args.out is not None:
        check_writable_file(args.out, "--out")
    elif args.run_dir is not None:
        check_writable_dir(Path(args.run_dir) / "best", "RUN_DIR")
    else:
        check_writable_dir(Path.cwd(), "--out (default: the current folder)")
    from aanas.cost import measure, measure_onnx
    from aanas.export import ExportMismatchError, load_model, to_onnx

    loaded = load_model(
        args.run_dir,
        model=args.model,
        checkpoint=args.checkpoint,
        num_classes=args.num_classes,
        input_size=args.input_size,
    )
    spec = loaded.spec
    size = args.input_size or spec.input_size
    check = not args.no_check
    real, mean, std, normalization = _export_images(args.data, loaded.data, loaded.data_root, size)
    if args.out is not None:
        dest = Path(args.out)
    elif args.run_dir is not None:
        dest = Path(args.run_dir) / "best" / "model.onnx"
    else:  # a registered name, or the digest of a spec string (not a file name)
        dest = Path(f"{args.model if ':' not in args.model else spec.digest()}.onnx")
    tolerance = {k: getattr(args, k) for k in ("atol", "rtol") if getattr(args, k) is not None}
    try:
        report = to_onnx(
            loaded.model,
            dest,
            input_size=size,
            opset=args.opset,
            check=check,
            real_inputs=real if check else None,
            mean=mean,
            std=std,
            normalization=normalization,
            metadata={"source": loaded.source, "trained": str(loaded.trained).lower()},
            **tolerance,
        )
    except ExportMismatchError as exc:
        print(f"aanas: export FAILED: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    if args.check_latency:
        for backend, res in (
            ("torch", measure(loaded.model, size, backend="torch", cache=False)),
            ("onnxruntime", measure_onnx(dest, size)),
        ):
            print(
                f"latency {backend:<12} {res.median_ms:.3f} ms median, IQR {res.iqr_ms:.3f} ms "
                f"(1 thread, batch 1, {res.repeats} runs)"
            )
    return 0


def _add_reproduce(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "reproduce",
        formatter_class=_HelpFormatter,
        help="reproduce a paper comparison (mobile: MnasNet-A1 vs AA-MnasNet-A1)",
        description="mobile: train MnasNet-A1 and AA-MnasNet-A1 at the same width, and "
        "MnasNet-A1 widened to AA-MnasNet-A1's MACs (same recipe and seeds; CIFAR-sized models "
        "for inputs <= 64 px), and print params, MACs, latency, test top-1 (mean ± std over "
        "seeds) and paired t-tests beside the published ImageNet numbers; writes "
        "OUT/reproduce.md and OUT/reproduce.json. "
        "Default: a few CPU minutes on the embedded digits data. CIFAR-10: --recipe "
        "cifar10_subset_mnasnet_a1 --data imagefolder:PATH (or --data cifar10 --set "
        "download=true). ImageNet on GPUs: --recipe imagenet_mnasnet_a1 --data "
        "imagefolder:/path/to/imagenet --device cuda.",
    )
    p.add_argument("experiment", choices=("mobile",), help="which comparison")
    p.add_argument("--recipe", default="reproduce_mobile_cpu", help="recipe YAML or shipped name")
    p.add_argument(
        "--data", help="digits | cifar10 | cifar100 | imagefolder:PATH (default: the recipe's)"
    )
    p.add_argument(
        "--epochs", type=int, help="replaces the recipe's epochs (default: the recipe's)"
    )
    p.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 for a test)")
    p.add_argument("--width", type=float, default=0.5, help="channel multiplier of the pair")
    p.add_argument("--device", default="cpu", help="training device (default: cpu)")
    p.add_argument("--out", default="runs/reproduce_mobile", help="output folder")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a recipe field, e.g. --set max_train_batches=20; repeatable",
    )
    p.add_argument(
        "--latency-backend",
        default="onnxruntime",
        choices=("onnxruntime", "torch"),
        help="runtime that times both models",
    )
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT/runs/*/seed*/*.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected integers like 0,1,2, got {args.seeds!r}") from None
    from aanas._io import check_writable_dir
    from aanas.reproduce import reproduce_mobile

    check_writable_dir(args.out, "--out")
    result = reproduce_mobile(
        recipe=args.recipe,
        overrides=args.overrides,
        data=args.data,
        epochs=args.epochs,
        seeds=seeds,
        width=args.width,
        device=args.device,
        out=args.out,
        latency_backend=args.latency_backend,
        keep_checkpoints=args.keep_checkpoints,
        progress=not args.no_progress,
    )
    print(result.table)
    print(f"\nwritten: {args.out}/reproduce.md, {args.out}/reproduce.json")
    return 0


# --- registry ---------------------------------------------------------------------------------

_COMMANDS: list[_AddParser] = [
    _add_train,
    _add_profile,
    _add_search,
    _add_show,
    _add_export,
    _add_reproduce,
]


def build_parser() -> argparse.ArgumentParser:
    """The full ``aanas`` argument parser (also used by the docs and tests)."""
    parser = argparse.ArgumentParser(
        prog="aanas",
        formatter_class=_HelpFormatter,
        description="Attention-augmented neural architecture search and mobile models "
        "(Bello et al., arXiv:1904.09925).",
    )
    parser.add_argument("--version", action="version", version=f"aanas {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add in _COMMANDS:
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``aanas`` console script; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    run: Callable[[argparse.Namespace], int] | None = getattr(args, "run", None)
    if run is None:  # bare `aanas`: a usage error, as argparse reports a missing argument
        parser.print_help(sys.stderr)
        print("aanas: error: a COMMAND is required", file=sys.stderr)
        return 2
    try:
        return run(args)
    except (ValueError, FileNotFoundError, NotADirectoryError) as exc:
        print(f"aanas: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        name = getattr(exc, "signal_name", "SIGINT")
        print(
            f"aanas: interrupted by {name}: finished work is kept; run the same command to resume",
            file=sys.stderr,
        )
        return 143 if name == "SIGTERM" else 130
