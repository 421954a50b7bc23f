"""Command-line interface: ``aanas <command> ...``. Thin: parses flags, calls the library.

Each subcommand is a pair ``_add_<name>(subparsers)`` / ``_run_<name>(args) -> int`` registered in
``_COMMANDS``. Library errors that come from user input (``ValueError``, ``FileNotFoundError``)
are printed as one line, ``aanas: error: ...``, with exit code 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from collections.abc import Callable, Sequence

from aanas import __version__

__all__ = ["main", "build_parser"]

_AddParser = Callable[["argparse._SubParsersAction[argparse.ArgumentParser]"], None]


# --- subcommands (one section each; keep them thin) -------------------------------------------


def _add_train(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "train",
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
    p.add_argument("--model", help="model name or spec string (same as --set model=...)")
    p.add_argument("--data", help="digits | cifar10 | cifar100 | imagefolder:PATH")
    p.add_argument("--epochs", type=int, help="same as --set epochs=N")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--out", help="output folder for checkpoints and metrics")
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

    from aanas.data import build_data
    from aanas.models import create_model
    from aanas.train import fit, seed_everything, setup_distributed, teardown_distributed

    ctx = setup_distributed(args.device)
    try:
        seed_everything(recipe.seed)
        data = build_data(
            recipe.data,
            root=recipe.data_root,
            input_size=recipe.input_size,
            batch_size=recipe.batch_size,
            val_fraction=recipe.val_fraction,
            seed=recipe.seed,
            download=recipe.download,
            workers=recipe.workers,
            pin_memory=recipe.pin_memory,
            augment=recipe.augment,
            distributed=ctx.world_size > 1,
        )
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
    finally:
        teardown_distributed()
    if ctx.is_main:
        print(json.dumps(metrics, indent=2, sort_keys=True))
    return 0


def _add_profile(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "profile",
        help="params, MACs, FLOPs and latency of a model; build latency tables",
        description="Print params, MACs, FLOPs (= 2 x MACs) and a per-block table of a model, "
        "its measured latency (median, IQR) and, with --lut, its predicted latency. "
        "--build-lut SPACE.yaml measures every distinct block of the space's samples instead.",
    )
    p.add_argument("model", nargs="?", help="registered model name or spec string")
    p.add_argument("--input-size", type=int, help="square input side (default: the spec's)")
    p.add_argument("--backend", default="torch", choices=("torch", "onnxruntime"))
    p.add_argument("--threads", type=int, default=1, help="intra-op threads (default: 1)")
    p.add_argument("--batch", type=int, default=1, help="batch size (default: 1)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:i] (torch backend)")
    p.add_argument("--repeats", type=int, default=50, help="timed runs (default: 50)")
    p.add_argument("--warmup", type=int, default=10, help="untimed runs first (default: 10)")
    p.add_argument("--lut", help="latency table YAML for a predicted latency")
    p.add_argument("--no-latency", action="store_true", help="counts only, measure nothing")
    p.add_argument("--no-cache", action="store_true", help="ignore the on-disk latency cache")
    p.add_argument("--build-lut", metavar="SPACE.yaml", help="build/refresh a latency table")
    p.add_argument("--out", default="lut.yaml", help="table written by --build-lut")
    p.add_argument("--samples", type=int, default=200, help="--build-lut: space samples")
    p.add_argument("--seed", type=int, default=0, help="--build-lut: sampling seed")
    p.add_argument("--fit-networks", type=int, default=5, help="--build-lut: overhead fit nets")
    p.set_defaults(run=_run_profile)


def _run_profile(args: argparse.Namespace) -> int:
    import os

    from aanas.cost import LatencyTable, count, measure

    if args.build_lut:
        table = None
        if os.path.exists(args.out):
            table = LatencyTable.load(args.out)
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
    from aanas.cost.flops import _as_spec

    spec = _as_spec(args.model, args.input_size)
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
# type-checked against the field and a bad one is a one-line ValueError (exit 2).
_SEARCH_FLAGS: tuple[tuple[str, str, str], ...] = (
    ("--space", "space", "search space: shipped name (tiny, aa_mnasnet, ...) or YAML path"),
    ("--data", "data", "digits (embedded, default) | cifar10 | cifar100 | imagefolder:PATH"),
    ("--data-root", "data_root", "torchvision data folder (default ~/.cache/aanas/data)"),
    ("--engine", "engine", "optuna (default) | ray"),
    ("--evaluator", "evaluator", "supernet (weight sharing, default) | train (from scratch)"),
    ("--sampler", "sampler", "auto | tpe | nsga2 | random (Ray: random = Ray's random search)"),
    ("--search-alg", "sampler", "alias of --sampler (Ray Tune wording)"),
    ("--pruner", "pruner", "median | hyperband | none (train evaluator; Ray uses ASHA)"),
    ("--trials", "trials", "finished trials the study should reach (a rerun does the rest)"),
    ("--n-jobs", "n_jobs", "Optuna worker threads in this process"),
    ("--seed", "seed", "sampler seed (same seed, same suggested specs)"),
    ("--score", "score", "soft | hard (MnasNet reward) | pareto (NSGA-II) | accuracy"),
    ("--target-macs", "target_macs", "reward target T in MACs, e.g. 5M (default: mid-space)"),
    ("--target-latency-ms", "target_latency_ms", "reward target T in ms (measures latency)"),
    ("--max-macs", "max_macs", "hard budget: reject candidates above, untrained (e.g. 8M)"),
    ("--max-latency-ms", "max_latency_ms", "hard latency budget in ms"),
    ("--latency", "latency", "auto | off | measure | predict"),
    ("--latency-table", "latency_table", "latency LUT YAML for --latency predict"),
    ("--supernet", "supernet", "load this trained supernet.pt instead of training one"),
    ("--supernet-epochs", "supernet_epochs", "supernet training epochs"),
    ("--recal-batches", "recal_batches", "BN recalibration batches per candidate"),
    ("--train-epochs", "train_epochs", "epochs per candidate (train evaluator)"),
    ("--train-recipe", "train_recipe", "TrainRecipe YAML or shipped name (train evaluator)"),
    ("--max-train-batches", "max_train_batches", "cap optimiser steps per epoch (0: all)"),
    ("--batch-size", "batch_size", "batch size of training and evaluation"),
    ("--device", "device", "auto | cpu | cuda[:i]"),
    (
        "--storage",
        "storage",
        "Optuna storage shared by workers: a journal file (default <out>/study.journal, one "
        "machine) or an RDB URL (postgresql://user@host/db, many machines)",
    ),
    ("--study-name", "study_name", "study name in the storage (default: run name)"),
    ("--baselines", "baselines", "comma-separated registered models evaluated for reference"),
    ("--top-k", "top_k", "rows of the summary table"),
    ("--address", "address", "Ray cluster address to join (default: start a local Ray)"),
    ("--cpus-per-trial", "cpus_per_trial", "Ray: CPUs per trial"),
    ("--gpus-per-trial", "gpus_per_trial", "Ray: GPUs per trial (fractions allowed)"),
    ("--max-concurrent", "max_concurrent", "Ray: concurrent trials (0: as resources allow)"),
    ("--ray-storage", "ray_storage", "Ray: experiment/checkpoint storage all nodes reach (NFS, s3://)"),
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
    p = sub.add_parser(
        "search",
        help="architecture search (Optuna or Ray Tune)",
        description="Search a space of attention-augmented networks. With no arguments: the "
        "tiny space on the embedded digits data, weight-sharing (supernet) evaluation, 20 TPE "
        "trials, a few minutes on CPU. Rerunning the same command resumes the search.",
    )
    for flag, field, text in _SEARCH_FLAGS:
        p.add_argument(flag, dest=f"search_{field}", default=None, metavar="V", help=text)
    p.add_argument("--out", help="run directory (default runs/<space>-<engine>-<evaluator>)")
    p.add_argument("--config", help="SearchRecipe YAML (keys = the long flag names with _)")
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
        help="print a search's results again",
        description="Print the top-k table and Pareto front of a search run directory.",
    )
    p.add_argument("run_dir", help="run directory, e.g. runs/tiny-optuna-supernet")
    p.add_argument("--top-k", type=int, default=None, help="rows of the top-k table")
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
        help="export a model to ONNX and verify it against PyTorch",
        description="Export a search's best model (RUN_DIR with best/spec.txt and best/model.pt) "
        "or --model [--checkpoint] to ONNX (opset >= 17, dynamic batch, spec/input size/"
        "normalization/MACs in metadata), then check onnxruntime against PyTorch on random and "
        "real images (max abs diff <= --atol; exit code 1 when it is exceeded).",
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
    p.add_argument("--atol", type=float, default=1e-4, help="max abs diff allowed (1e-4)")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.add_argument(
        "--check-latency", action="store_true", help="time onnxruntime beside PyTorch (1 thread)"
    )
    p.set_defaults(run=_run_export)


def _run_export(args: argparse.Namespace) -> int:
    from aanas.export import ExportMismatchError, export_cli

    try:
        report, latency = export_cli(
            run_dir=args.run_dir,
            model=args.model,
            checkpoint=args.checkpoint,
            out=args.out,
            input_size=args.input_size,
            num_classes=args.num_classes,
            opset=args.opset,
            data=args.data,
            atol=args.atol,
            check=not args.no_check,
            check_latency=args.check_latency,
        )
    except ExportMismatchError as exc:
        print(f"aanas: export FAILED: {exc}", file=sys.stderr)
        return 1
    print(report.summary())
    for backend, res in latency.items():
        print(
            f"latency {backend:<12} {res['median_ms']:.3f} ms median, IQR {res['iqr_ms']:.3f} ms "
            f"(1 thread, batch 1, {res['repeats']} runs)"
        )
    return 0


def _add_reproduce(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "reproduce",
        help="reproduce a paper comparison (mobile: MnasNet-A1 vs AA-MnasNet-A1)",
        description="mobile: train mnasnet_a1_100 and aa_mnasnet_a1_100 (same width, recipe and "
        "seeds) and print params, MACs, latency and test top-1 (mean ± std over seeds) beside "
        "the published ImageNet numbers; writes OUT/reproduce.md and OUT/reproduce.json. "
        "Default: a few CPU minutes on the embedded digits data. CIFAR-10: --recipe "
        "cifar10_subset_mnasnet_a1 --data imagefolder:PATH (or --data cifar10 --set "
        "download=true). ImageNet on GPUs: --recipe imagenet_mnasnet_a1 --data "
        "imagefolder:/path/to/imagenet --device cuda.",
    )
    p.add_argument("experiment", choices=("mobile",), help="which comparison")
    p.add_argument("--recipe", default="reproduce_mobile_cpu", help="recipe YAML or shipped name")
    p.add_argument("--data", help="digits | cifar10 | cifar100 | imagefolder:PATH")
    p.add_argument("--epochs", type=int, help="replaces the recipe's epochs")
    p.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default: 0)")
    p.add_argument("--width", type=float, default=1.0, help="channel multiplier of both models")
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
    p.add_argument("--latency-backend", default="onnxruntime", choices=("onnxruntime", "torch"))
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT/runs/*/seed*/*.pt")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(run=_run_reproduce)


def _run_reproduce(args: argparse.Namespace) -> int:
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise ValueError(f"--seeds: expected integers like 0,1,2, got {args.seeds!r}") from None
    from aanas.reproduce import reproduce_mobile

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
    if run is None:
        parser.print_help()
        return 0
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
