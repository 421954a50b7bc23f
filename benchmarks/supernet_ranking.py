"""Supernet ranking quality: does weight sharing order architectures as training them does?

For >= 20 architectures stratified by MACs over the space's cost range
(:func:`aanas.search.ranking.stratified_by_macs`):

1. ground truth: each trained from scratch with a CPU ``TrainRecipe`` (``--recipe``, plus
   ``--set key=value``), top-1 on the test split (the CIFAR-10 subset's 2000 images). Each
   finished run is an atomic record ``<out>/runs/<spec digest>/seed<k>.json`` keyed by recipe
   + spec (:mod:`aanas.run_record`), so a rerun (or a run resumed after a kill) trains only what
   is missing or changed, and ``--reuse-runs DIR`` reads runs other benchmarks already made;
2. the supernet (:func:`aanas.supernet.train_supernet`, ``SupernetRecipe`` from
   ``--supernet-set key=value``) and each architecture's inherited weights, BN-recalibrated on
   training batches and evaluated on the same test split;
3. Kendall tau and Spearman rho with paired-bootstrap 95 % intervals, and whether the
   supernet's top 5 holds the truly best architecture (:func:`aanas.search.ranking.ranking_report`).

``--ablation`` trains one supernet per training variant at the same epochs (uniform single path;
sandwich; + in-place distillation; + progressive shrinking = the default recipe) and prints tau
for each. Trained supernets are kept next to the cache and reused, so ``--variant NAME
--supernets-only`` can train variants side by side (one process each) or over several sittings
before the run that ranks them all. The MAC count itself is ranked too, as the zero-cost
baseline every evaluator has to beat: on a set stratified by MACs, "bigger is better" already
orders much of it.

    python benchmarks/supernet_ranking.py --tiny                       # minutes: smoke run
    python benchmarks/supernet_ranking.py --ablation                   # the real run

``--data`` defaults to ``imagefolder:$AANAS_CIFAR10``. Timings are wall-clock on whatever else
the machine is doing; compare them only within one run. On a loaded machine pass ``--threads 1``:
with a load average of ~12 on 2 cores, a batch of 64 through the tiny space's largest net took
3.6 s with torch's 2 threads and 0.8 s with 1 (one noisy measurement, December 2).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aanas._io import atomic_open
from aanas.config import SupernetRecipe, TrainRecipe, apply_overrides, load_recipe, recipe_to_dict
from aanas.cost import count_spec
from aanas.data import DataBundle, build_recipe_data
from aanas.models import create_model
from aanas.run_record import recall_or_train, run_identity
from aanas.search.ranking import (
    RankingReport,
    near_cost_agreement,
    ranking_report,
    stratified_by_macs,
)
from aanas.space import SearchSpace
from aanas.spec import ArchSpec
from aanas.supernet import (
    SuperNet,
    progress_file,
    recalibrate_bn,
    seeded_supernet,
    train_supernet,
)
from aanas.train import evaluate, fit, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling _bench_cache module
from _bench_cache import digest  # noqa: E402

# Ablation variants, in the order each adds one change (field overrides of the supernet recipe).
VARIANTS: dict[str, dict[str, Any]] = {
    "uniform": {"rule": "uniform", "distill": False, "shrink": False},
    "sandwich": {"rule": "sandwich", "distill": False, "shrink": False},
    "+distill": {"rule": "sandwich", "distill": True, "shrink": False},
    "+shrink": {"rule": "sandwich", "distill": True, "shrink": True},
}

# near-cost pairs: architectures within this MACs ratio of each other (a constrained search's
# candidates), where "bigger is better" decides little
_NEAR_RATIO = 1.5

# --proxy: the train evaluator of search_vs_hand.py's train search (2 epochs of <= 156 steps).
_PROXY = ("epochs=2", "max_train_batches=156")

# --tiny: a minutes-long smoke run on the tiny space (every step runs, tiny budgets).
_TINY = {
    "space": "tiny",
    "archs": 6,
    "recipe_set": ["epochs=1", "max_train_batches=8", "batch_size=64", "workers=0"],
    "supernet_set": ["epochs=2", "max_batches=8"],
    "recal_batches": 2,
    "bootstrap": 200,
    "k": 2,
}


def standalone_results(
    specs: list[ArchSpec],
    data: DataBundle,
    recipe: TrainRecipe,
    runs_dir: Path,
    device: str,
    reuse: Sequence[Path] = (),
) -> list[dict[str, Any]]:
    """Test top-1 of every spec trained from scratch; only missing runs train.

    Each run is a record ``runs_dir/<spec digest>/seed<k>.json`` (:mod:`aanas.run_record`,
    keyed by recipe + spec). A run recorded under ``reuse`` (e.g. ``search_vs_hand.py``'s
    final trainings, same CPU recipe) is copied here instead of trained.
    """
    out = []
    for i, spec in enumerate(specs):
        ident = run_identity(recipe, spec.encode())
        path = runs_dir / spec.digest() / f"seed{recipe.seed}.json"

        def train(work: Path, resume: Path | None, spec: ArchSpec = spec) -> dict[str, Any]:
            seed_everything(recipe.seed)
            model = create_model(spec)
            metrics = fit(
                model,
                data,
                recipe,
                device=device,
                progress=False,
                evaluate_test=True,
                out_dir=work,
                resume=resume,
            )
            return {"spec": spec.encode(), **metrics}

        record, state = recall_or_train(path, ident, train, reuse)
        row = {
            "spec": spec.encode(),
            "test_top1": float(record["test_top1"]),
            "val_top1": float(record.get("val_top1") or 0.0),
            "macs": count_spec(spec).macs,
            "seconds": float(record.get("time_s") or 0.0),
        }
        print(
            f"standalone {i + 1}/{len(specs)} ({state}): test {row['test_top1']:.4f} "
            f"{row['macs'] / 1e6:.2f} MMACs {row['seconds']:.0f} s  {spec.encode()}",
            flush=True,
        )
        out.append(row)
    return out


def trained_supernet(
    name: str,
    space: SearchSpace,
    data: DataBundle,
    recipe: SupernetRecipe,
    path: Path,
    seed: int,
    device: str,
) -> tuple[SuperNet, float]:
    """Load the supernet at ``path`` or train it and save it there; (supernet, train seconds).
    A training killed midway continues from its last finished epoch (``<path stem>.progress.pt``).
    ``name`` (the ablation variant) only labels the progress lines.

    The initial weights come from ``seed`` too (:func:`aanas.supernet.seeded_supernet`), so
    every ablation variant starts from the same supernet.
    """
    print(f"supernet {name}: {json.dumps(recipe_to_dict(recipe))}", flush=True)
    supernet = seeded_supernet(space, seed)
    if path.is_file():
        supernet.load(path)
        meta = json.loads(path.with_suffix(".json").read_text(encoding="utf-8"))
        return supernet.to(device), float(meta["seconds"])
    log = train_supernet(
        supernet,
        data,
        recipe,
        seed=seed,
        device=device,
        checkpoint=progress_file(path),
        on_epoch=lambda e, m: print(
            f"  epoch {e}: loss {m['train_loss']:.3f} paths/step {m['paths_per_step']:.2f} "
            f"elastic {','.join(m['elastic']) or '-'} {m['seconds']:.0f} s",
            flush=True,
        ),
    )
    supernet.save(path)
    with atomic_open(path.with_suffix(".json"), "w", encoding="utf-8") as fh:
        json.dump({"seconds": log["seconds"], "recipe": log["recipe"]}, fh, indent=1)
    return supernet, float(log["seconds"])


def inherited_accuracies(
    supernet: SuperNet,
    specs: list[ArchSpec],
    data: DataBundle,
    *,
    recal_batches: int,
    seed: int,
    device: str,
) -> list[float]:
    """Test top-1 of each spec's inherited weights after BN recalibration (fixed seed, as the
    supernet evaluator: the recalibration batches depend on nothing but the spec)."""
    out = []
    for spec in specs:
        model = supernet.extract(spec).to(device)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            recalibrate_bn(model, data.train, batches=recal_batches, device=device)
        out.append(float(evaluate(model, data.test, device)["top1"]))
    return out


def supernet_plan(
    args: argparse.Namespace, space: SearchSpace, base: SupernetRecipe
) -> dict[str, tuple[SupernetRecipe, Path]]:
    """Variant name -> (its supernet recipe, the file its trained supernet is kept in).

    The file name is a digest of everything that shapes the weights, so a process training one
    variant and a later process ranking all of them agree on it.
    """
    if args.ablation:
        chosen = {n: VARIANTS[n] for n in args.variant} if args.variant else VARIANTS
    else:
        chosen = {"recipe": {}}
    plan = {}
    for name, changes in chosen.items():
        srecipe = dataclasses.replace(base, **changes)
        sdigest = digest(
            {
                "space": space.name,
                "recipe": recipe_to_dict(srecipe),
                "seed": args.seed,
                "data": args.data,
                "init": "seeded",  # supernets saved before the init was seeded are not reused
            }
        )
        plan[name] = (srecipe, Path(args.out) / f"supernet-{sdigest}.pt")
    return plan


def _fmt_near(near: list[float]) -> str:
    share, pairs = near
    return f"near-cost pairs {share:.2f} of {int(pairs)}"


def _fmt(r: RankingReport) -> str:
    t_lo, t_hi = r.kendall_tau_ci
    s_lo, s_hi = r.spearman_rho_ci
    return (
        f"tau {r.kendall_tau:+.3f} [{t_lo:+.3f}, {t_hi:+.3f}]  "
        f"rho {r.spearman_rho:+.3f} [{s_lo:+.3f}, {s_hi:+.3f}]  "
        f"top{r.top_k} has best: {'yes' if r.top_k_contains_best else 'no'}"
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    env = os.environ.get("AANAS_CIFAR10")
    parser.add_argument("--data", default=f"imagefolder:{env}" if env else None)
    parser.add_argument("--space", default="cifar_aa_mnasnet", help="space name or YAML path")
    parser.add_argument(
        "--recipe", default="cifar10_subset_mnasnet_a1", help="TrainRecipe of the ground truth"
    )
    parser.add_argument("--set", dest="recipe_set", action="append", default=[], metavar="K=V")
    parser.add_argument(
        "--supernet-set", action="append", default=[], metavar="K=V", help="SupernetRecipe field"
    )
    parser.add_argument(
        "--reuse-runs", action="append", default=[], type=Path, metavar="DIR",
        help="also read finished standalone runs (same recipe, spec, seed) from DIR, e.g. "
        "search_vs_hand.py's --out; repeatable",
    )  # fmt: skip
    parser.add_argument("--archs", type=int, default=20)
    parser.add_argument("--k", type=int, default=5, help="top-k check")
    parser.add_argument("--recal-batches", type=int, default=20)
    parser.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--ablation", action="store_true", help="one supernet per variant")
    parser.add_argument(
        "--variant", action="append", default=None, choices=list(VARIANTS),
        help="only this ablation variant (repeatable; implies --ablation)",
    )  # fmt: skip
    parser.add_argument(
        "--supernets-only", action="store_true",
        help="train (or read) the supernets of the selected variants and stop: needs no ground "
        "truth, so variants can train in parallel processes or sittings",
    )  # fmt: skip
    parser.add_argument(
        "--proxy", action="store_true",
        help="also rank by the train evaluator's short training (validation top-1, as a "
        "search sees it), for comparison with the supernet at a known cost",
    )  # fmt: skip
    parser.add_argument(
        "--proxy-set", action="append", default=None, metavar="K=V",
        help="recipe overrides of the short training (default: search_vs_hand.py's train "
        "search, epochs=2 max_train_batches=156)",
    )  # fmt: skip
    parser.add_argument(
        "--shard", default=None, metavar="K/N",
        help="train only the ground-truth runs (and with --proxy the short trainings) with "
        "index %% N == K, then stop (implies --standalone-only): N processes, machines or GPUs "
        "share the ground truth through "
        "--out (or copy their runs/ folders together); a last run without --shard reads "
        "them all",
    )  # fmt: skip
    parser.add_argument(
        "--standalone-only", action="store_true",
        help="train (or read) the ground truth and stop: it takes hours on 2 cores, so it can be "
        "spread over several sittings before the supernets are trained",
    )  # fmt: skip
    parser.add_argument("--out", default="runs/supernet_ranking", help="cache/results folder")
    parser.add_argument(
        "--summary", default="summary.json",
        help="file name of the results under --out (another name keeps a second budget's "
        "results beside the first, sharing its ground truth)",
    )  # fmt: skip
    parser.add_argument("--tiny", action="store_true", help="minutes-long smoke run")
    args = parser.parse_args(argv)
    if args.tiny:
        if args.space == parser.get_default("space"):
            args.space = _TINY["space"]
        if args.archs == parser.get_default("archs"):
            args.archs = _TINY["archs"]
        args.recipe_set = [*_TINY["recipe_set"], *args.recipe_set]
        args.supernet_set = [*_TINY["supernet_set"], *args.supernet_set]
        args.recal_batches = min(args.recal_batches, int(_TINY["recal_batches"]))
        args.bootstrap = min(args.bootstrap, int(_TINY["bootstrap"]))
        args.k = min(args.k, int(_TINY["k"]))
        if args.out == parser.get_default("out"):
            args.out = "runs/supernet_ranking_tiny"
    if args.data is None:
        parser.error("--data is required (or set AANAS_CIFAR10)")
    if args.shard is not None:
        k, sep, n = args.shard.partition("/")
        if not (sep and k.isdigit() and n.isdigit() and int(k) < int(n)):
            parser.error(f"--shard must look like K/N with 0 <= K < N, got {args.shard!r}")
        args.shard = (int(k), int(n))
        args.standalone_only = True
    if args.supernets_only and args.standalone_only:
        parser.error("--supernets-only and --standalone-only/--shard exclude each other")
    if args.variant:
        args.ablation = True
    if args.proxy_set is None:
        args.proxy_set = ["epochs=1", "max_train_batches=2"] if args.tiny else list(_PROXY)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark; print the tables and write ``<out>/<summary>`` (JSON)."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    space = SearchSpace.from_yaml(args.space)
    recipe = load_recipe(args.recipe, args.recipe_set)
    recipe = dataclasses.replace(recipe, data=args.data, input_size=space.base.input_size)
    base = apply_overrides(SupernetRecipe(), args.supernet_set)
    t0 = time.perf_counter()
    data = build_recipe_data(recipe)  # the recipe now carries --data and the space's size
    if data.num_classes != space.base.num_classes:
        raise SystemExit(f"data has {data.num_classes} classes, space {space.base.num_classes}")
    plan = supernet_plan(args, space, base)
    if args.supernets_only:  # needs neither the architectures nor the ground truth
        for name, (srecipe, path) in plan.items():
            _, seconds = trained_supernet(name, space, data, srecipe, path, args.seed, args.device)
            print(f"  {name}: trained in {seconds:.0f} s, {path}", flush=True)
        return 0
    specs = stratified_by_macs(space, args.archs, np.random.default_rng(args.seed))
    print(
        f"{len(specs)} architectures of {space.name}, "
        f"{count_spec(specs[0]).macs / 1e6:.2f}-{count_spec(specs[-1]).macs / 1e6:.2f} MMACs; "
        f"ground truth: {args.recipe} {' '.join(args.recipe_set)}",
        flush=True,
    )
    if args.shard is not None:
        k, n = args.shard
        specs = specs[k::n]
        print(f"shard {k}/{n}: {len(specs)} of the architectures", flush=True)
    truth_rows = standalone_results(
        specs, data, recipe, out / "runs", args.device, reuse=args.reuse_runs
    )
    truth = [r["test_top1"] for r in truth_rows]
    t_standalone = sum(r["seconds"] for r in truth_rows)
    proxy_rows = None
    if args.proxy:  # the short trainings are recorded runs too: shards share them the same way
        proxy_recipe = apply_overrides(recipe, args.proxy_set)
        print(f"short training: {args.recipe} {' '.join(args.proxy_set)}", flush=True)
        proxy_rows = standalone_results(specs, data, proxy_recipe, out / "proxy_runs", args.device)
    if args.standalone_only:
        print(
            f"ground truth complete: {len(truth_rows)} runs, "
            f"{t_standalone / 60:.0f} min of training"
        )
        return 0

    macs = [r["macs"] for r in truth_rows]

    def near(predicted: list[float]) -> list[float]:
        """[share, pairs] of the architecture pairs within _NEAR_RATIO x MACs ordered as the
        truth orders them."""
        share, pairs = near_cost_agreement(predicted, truth, macs, _NEAR_RATIO)
        return [share, pairs]

    proxy: dict[str, Any] | None = None
    if proxy_rows is not None:
        proxy_val = [r["val_top1"] for r in proxy_rows]
        report = ranking_report(
            proxy_val, truth, k=args.k, n_resamples=args.bootstrap, seed=args.seed
        )
        proxy = {
            "report": report.to_dict(),
            "val_top1": proxy_val,
            "seconds": sum(r["seconds"] for r in proxy_rows),
            "overrides": args.proxy_set,
            "near_cost": near(proxy_val),
        }
        print(f"  short training: {_fmt(report)}", flush=True)
    by_macs = ranking_report(macs, truth, k=args.k, n_resamples=args.bootstrap, seed=args.seed)
    macs_near = near(macs)
    print(f"  MACs alone (zero cost): {_fmt(by_macs)}", flush=True)

    results: dict[str, Any] = {}
    for name, (srecipe, path) in plan.items():
        supernet, seconds = trained_supernet(
            name, space, data, srecipe, path, args.seed, args.device
        )
        t1 = time.perf_counter()
        inherited = inherited_accuracies(
            supernet,
            specs,
            data,
            recal_batches=args.recal_batches,
            seed=args.seed,
            device=args.device,
        )
        report = ranking_report(
            inherited, truth, k=args.k, n_resamples=args.bootstrap, seed=args.seed
        )
        results[name] = {
            "report": report.to_dict(),
            "inherited": inherited,
            "supernet_seconds": seconds,
            "eval_seconds": time.perf_counter() - t1,
            "supernet_recipe": recipe_to_dict(srecipe),
            "near_cost": near(inherited),
        }
        print(f"  {name}: {_fmt(report)}", flush=True)

    print("\narch  MMACs  standalone  " + "  ".join(f"{n:>9}" for n in results))
    for i in range(len(specs)):
        row = "  ".join(f"{results[n]['inherited'][i]:9.4f}" for n in results)
        print(f"{i:4d} {truth_rows[i]['macs'] / 1e6:6.2f}  {truth[i]:10.4f}  {row}")
    print(
        f"\nranking on {len(specs)} archs, test split ({len(data.test.dataset)} images), "  # type: ignore[arg-type]
        f"{args.bootstrap} bootstrap resamples, 95 % intervals:"
    )
    for name, res in results.items():
        rep = RankingReport.from_dict(res["report"])
        print(
            f"  {name:>9}: {_fmt(rep)}  {_fmt_near(res['near_cost'])}  "
            f"supernet {res['supernet_seconds']:.0f} s"
        )
    if proxy is not None:
        rep = RankingReport.from_dict(proxy["report"])
        print(
            f"  {'short':>9}: {_fmt(rep)}  {_fmt_near(proxy['near_cost'])}  "
            f"training {proxy['seconds']:.0f} s in all"
        )
    print(f"  {'MACs':>9}: {_fmt(by_macs)}  {_fmt_near(macs_near)}  (zero cost: bigger is better)")
    summary = {
        "space": space.name,
        "data": args.data,
        "recipe": args.recipe,
        "recipe_overrides": args.recipe_set,
        "archs": [s.encode() for s in specs],
        "standalone": truth_rows,
        "standalone_seconds": t_standalone,
        "variants": results,
        "short_training": proxy,
        "macs_baseline": by_macs.to_dict(),
        "macs_near_cost": macs_near,
        "total_seconds": time.perf_counter() - t0,
    }
    with atomic_open(out / args.summary, "w", encoding="utf-8") as fh:
        json.dump(summary, fh, indent=1)
    print(f"wrote {out / args.summary} ({summary['total_seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
