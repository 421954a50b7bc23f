"""Search quality at equal budget: TPE (MnasNet reward) and NSGA-II (Pareto) vs random search.

One supernet of the space is trained once (or loaded with ``--supernet PATH``; a trained one is
saved there for reuse). Then, for every seed, three searches of ``--trials`` trials each run
through :func:`aanas.search.run_search` with the SAME shared weight-sharing evaluator:

- ``tpe``: ``--score soft`` (MnasNet reward, arXiv:1807.11626 Eq. 2, target = the space's
  geometric-mean MACs), grouped multivariate TPE;
- ``nsga2``: ``--score pareto``, NSGA-II (population 8);
- ``random``: Optuna's ``RandomSampler`` (``--score pareto``; the sampler ignores the score).

Every run is scored by the hypervolume of its COMPLETE trials' (accuracy max, MACs min) front
(:func:`aanas.results.results_hypervolume`) against ONE reference point shared by all runs:
accuracy 0 and 1.1 x the largest MACs of the space, with MACs divided by that reference so the
hypervolume lies in [0, 1]. (The run directory's own ``pareto.json`` uses a per-run reference,
1.1 x that run's largest MACs, so its hypervolumes are not comparable across runs.)

Evaluations are cached by spec digest across all runs. That is fair because the cached evaluator
always recalibrates BatchNorm with one fixed seed (``--eval-seed``), which makes the accuracy a
function of (supernet, spec) alone; the script checks this before searching (same spec twice,
no cache: identical accuracy) and also prints how far the library's per-trial seeds
(``recipe.seed + trial number``) would move the accuracy of the same spec.

    python benchmarks/search_quality.py --data imagefolder:../shared/data/cifar10 --quick
    AANAS_CIFAR10=/path/to/cifar10 python benchmarks/search_quality.py --supernet sn.pt

``--data`` defaults to ``imagefolder:$AANAS_CIFAR10``, else ``imagefolder:../shared/data/cifar10``
(relative to the repository) when it exists, else the embedded ``digits`` set (with a note).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aanas.cost.flops import count_spec
from aanas.results import pareto, results_hypervolume
from aanas.search import Evaluation, SearchRecipe, run_search
from aanas.search.evaluators import SuperNetEvaluator, build_data_for, load_supernet
from aanas.space import SearchSpace
from aanas.spec import ArchSpec
from aanas.supernet import seeded_supernet, train_supernet

_REPO = Path(__file__).resolve().parents[1]
_SHARED_CIFAR = _REPO.parent / "shared" / "data" / "cifar10"

# method -> (score, sampler): the SearchRecipe fields that define it.
METHODS: dict[str, tuple[str, str]] = {
    "tpe": ("soft", "tpe"),
    "nsga2": ("pareto", "nsga2"),
    "random": ("pareto", "random"),
}


class CachedEvaluator:
    """A :class:`SuperNetEvaluator` cached by spec digest across the benchmark's runs.

    The supernet evaluator recalibrates BN with one fixed seed, so its accuracy depends on the
    spec alone and a cached accuracy is exactly what a fresh evaluation returns (checked by
    ``check_determinism`` before the runs).
    """

    name = "supernet-cached"

    def __init__(self, inner: SuperNetEvaluator, *, eval_seed: int) -> None:
        self.inner = inner
        self.eval_seed = eval_seed
        self.cache: dict[str, Evaluation] = {}
        self.calls = 0
        self.misses = 0
        self.eval_s = 0.0

    def evaluate(self, spec: ArchSpec, *, seed: int, report: Any) -> Evaluation:
        self.calls += 1
        key = spec.digest()
        hit = self.cache.get(key)
        if hit is None:
            self.misses += 1
            t0 = time.perf_counter()
            hit = self.inner.evaluate(spec, seed=self.eval_seed, report=None)
            self.eval_s += time.perf_counter() - t0
            self.cache[key] = hit
        if report is not None:
            report(0, hit.accuracy)
        return hit

    def state_dict_for(self, spec: ArchSpec, *, seed: int) -> Any:
        return self.inner.state_dict_for(spec, seed=self.eval_seed)


def get_supernet(recipe: SearchRecipe, space: SearchSpace, data: Any, path: Path) -> Any:
    """Load ``path``, else train as :func:`aanas.search.evaluators.prepare_supernet` does and
    save to ``path``. A failed save is reported, not fatal: the trained weights are used anyway
    (``prepare_supernet`` would lose them when ``SuperNet.save`` raises after training)."""
    if path.is_file():
        return load_supernet(space, path, "cpu")
    supernet = seeded_supernet(space, recipe.seed)
    train_supernet(
        supernet,
        data,
        epochs=recipe.supernet_epochs,
        lr=recipe.supernet_lr,
        seed=recipe.seed,
        device="cpu",
        max_batches=recipe.max_train_batches or None,
    )
    try:
        supernet.save(path)
    except Exception as exc:  # a library bug must not throw away minutes of training
        print(f"WARNING: supernet NOT saved to {path}: {type(exc).__name__}: {exc}", flush=True)
    return supernet


def default_data() -> tuple[str, str]:
    env = os.environ.get("AANAS_CIFAR10")
    if env:
        return f"imagefolder:{env}", ""
    if _SHARED_CIFAR.is_dir():
        return f"imagefolder:{_SHARED_CIFAR}", ""
    return "digits", (
        f"NOTE: no CIFAR-10 subset (AANAS_CIFAR10 unset, {_SHARED_CIFAR} absent): using the "
        "embedded digits set; hypervolumes are not comparable with CIFAR numbers"
    )


def check_determinism(
    evaluator: SuperNetEvaluator, space: SearchSpace, eval_seed: int, n: int
) -> None:
    """Same spec, same seed, no cache: identical accuracy; also the spread over trial seeds."""
    rng = np.random.default_rng(12345)
    specs = [space.smallest(), space.largest()] + [space.sample(rng) for _ in range(n - 2)]
    worst_seed_delta = 0.0
    for spec in specs:
        a = evaluator.evaluate(spec, seed=eval_seed, report=None).accuracy
        b = evaluator.evaluate(spec, seed=eval_seed, report=None).accuracy
        if a != b:
            raise SystemExit(
                f"evaluation is NOT deterministic: {spec.encode()} gave {a!r} then {b!r}; "
                "the cache would be unfair"
            )
        others = [evaluator.evaluate(spec, seed=eval_seed + 1, report=None).accuracy]
        delta = max(abs(o - a) for o in others)
        worst_seed_delta = max(worst_seed_delta, delta)
        print(
            f"determinism: acc {a:.4f} == {b:.4f} (seed {eval_seed}); seed {eval_seed + 1}: "
            f"{', '.join(f'{o:.4f}' for o in others)}  {spec.encode()}",
            flush=True,
        )
    print(
        f"determinism OK on {len(specs)} specs; the per-trial seed moves one spec's accuracy by "
        f"up to {100 * worst_seed_delta:.2f} points (why the cache fixes the seed)",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default=None, help="default: AANAS_CIFAR10, shared, digits")
    parser.add_argument("--space", default="tiny")
    parser.add_argument("--trials", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--supernet", default=None, help="load it if it exists, else save here")
    parser.add_argument("--supernet-epochs", type=int, default=10)
    parser.add_argument("--max-batches", type=int, default=0, help="supernet steps/epoch cap")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--recal-batches", type=int, default=4)
    parser.add_argument("--eval-seed", type=int, default=0)
    parser.add_argument("--check-specs", type=int, default=4, help="specs in the determinism check")
    parser.add_argument("--val-fraction", type=float, default=0.2, help="of the train split")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (2+ thrash on a shared 2-core box)"
    )
    parser.add_argument("--out", default=None, help="run directories (default: a temp folder)")
    parser.add_argument("--quick", action="store_true", help="reduced budget")
    args = parser.parse_args()
    if args.quick:
        args.supernet_epochs = min(args.supernet_epochs, 3)
        args.max_batches = args.max_batches or 40
        args.trials = min(args.trials, 15)
        args.val_fraction = 0.1
        args.check_specs = min(args.check_specs, 2)
    note = ""
    if args.data is None:
        args.data, note = default_data()
    if note:
        print(note, flush=True)
    torch.set_num_threads(args.threads)
    logging.getLogger("aanas").setLevel(logging.ERROR)

    t_start = time.perf_counter()
    space = SearchSpace.from_yaml(args.space)
    base = SearchRecipe(
        space=args.space,
        data=args.data,
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        supernet_epochs=args.supernet_epochs,
        max_train_batches=args.max_batches,
        recal_batches=args.recal_batches,
        trials=args.trials,
        device="cpu",
    )
    data = build_data_for(base, space.base.input_size)
    if data.num_classes != space.base.num_classes:
        raise SystemExit(f"data has {data.num_classes} classes, space {space.base.num_classes}")
    workdir = Path(args.out) if args.out else Path(tempfile.mkdtemp(prefix="aanas-quality-"))
    sn_path = Path(args.supernet) if args.supernet else workdir / "supernet.pt"
    loaded = sn_path.is_file()
    t0 = time.perf_counter()
    supernet = get_supernet(base, space, data, sn_path)
    t_supernet = time.perf_counter() - t0
    if loaded:
        how = f"loaded from {sn_path}"
    else:
        how = f"trained ({'saved to ' + str(sn_path) if sn_path.is_file() else 'NOT saved'})"
    print(
        f"supernet {how} in {t_supernet:.1f}s ({args.supernet_epochs} epochs, max "
        f"{args.max_batches or 'all'} batches/epoch, data {args.data})",
        flush=True,
    )
    inner = SuperNetEvaluator(
        supernet, data, recal_batches=args.recal_batches, device="cpu", recal_seed=args.eval_seed
    )
    t0 = time.perf_counter()
    check_determinism(inner, space, args.eval_seed, max(2, args.check_specs))
    t_check = time.perf_counter() - t0
    evaluator = CachedEvaluator(inner, eval_seed=args.eval_seed)

    max_macs = int(count_spec(space.largest()).macs)
    ref_cost = 1.1 * max_macs
    print(f"hypervolume reference: accuracy 0, MACs {ref_cost:.0f} (1.1 x space max {max_macs})")

    rows: list[dict[str, Any]] = []
    for seed in args.seeds:
        for method, (score, sampler) in METHODS.items():
            recipe = dataclasses.replace(base, seed=seed, score=score, sampler=sampler)
            misses0, t0 = evaluator.misses, time.perf_counter()
            outcome = run_search(
                recipe, out=workdir / f"{method}-s{seed}", progress=False, evaluator=evaluator
            )
            wall = time.perf_counter() - t0
            done = [r for r in outcome.results if r.state == "COMPLETE"]
            hv = results_hypervolume(
                outcome.results, "macs", ref_cost=ref_cost, ref_accuracy=0.0, cost_scale=ref_cost
            )
            front = pareto(outcome.results, "macs")
            unique = len({r.spec for r in done})
            best_acc = max((r.accuracy or 0.0 for r in done), default=0.0)
            rows.append(
                {
                    "method": method,
                    "seed": seed,
                    "hv": hv,
                    "complete": len(done),
                    "unique": unique,
                    "front": len(front),
                    "best_acc": best_acc,
                    "new_evals": evaluator.misses - misses0,
                    "wall": wall,
                }
            )
            print(
                f"{method:6s} seed {seed}: HV {hv:.4f}, "
                f"{len(done)}/{len(outcome.results)} complete, {unique} distinct specs, "
                f"front {len(front)}, best acc {best_acc:.4f}, "
                f"{evaluator.misses - misses0} new evaluations, {wall:.1f}s",
                flush=True,
            )

    total = time.perf_counter() - t_start
    print_tables(rows, args, t_supernet, t_check, evaluator, total, loaded)


def print_tables(
    rows: list[dict[str, Any]],
    args: argparse.Namespace,
    t_supernet: float,
    t_check: float,
    evaluator: CachedEvaluator,
    total: float,
    loaded: bool,
) -> None:
    seeds = args.seeds
    print()
    print(f"## Search quality: {args.space}, {args.data}, {args.trials} trials/run, seeds {seeds}")
    print()
    print(
        f"supernet: {'loaded' if loaded else 'trained'} ({args.supernet_epochs} epochs, "
        f"max {args.max_batches or 'all'} batches/epoch) {t_supernet:.1f}s; determinism check "
        f"{t_check:.1f}s; {evaluator.misses} distinct specs evaluated "
        f"({evaluator.calls} evaluator calls, {evaluator.eval_s:.1f}s); total {total:.1f}s"
    )
    print()
    print("Hypervolume of the (accuracy, MACs / ref) front, reference (acc 0, 1.1 x max MACs):")
    print()
    header = "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | mean | ratio vs random |"
    print(header)
    print("|" + "---|" * (len(seeds) + 3))
    means: dict[str, float] = {}
    for method in METHODS:
        hvs = [r["hv"] for r in rows if r["method"] == method]
        means[method] = statistics.fmean(hvs)
    for method in METHODS:
        hvs = [r["hv"] for r in rows if r["method"] == method]
        ratio = means[method] / means["random"] if means["random"] > 0 else float("nan")
        print(
            f"| {method} | "
            + " | ".join(f"{h:.4f}" for h in hvs)
            + f" | {means[method]:.4f} | {ratio:.3f} |"
        )
    print()
    print("Per run (complete trials / distinct specs / front size / best accuracy / wall s):")
    print()
    print("| method | seed | HV | complete | distinct | front | best acc | new evals | wall s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['method']} | {r['seed']} | {r['hv']:.4f} | {r['complete']} | {r['unique']} | "
            f"{r['front']} | {r['best_acc']:.4f} | {r['new_evals']} | {r['wall']:.1f} |"
        )
    print()
    tpe = means["tpe"] / means["random"] if means["random"] > 0 else float("nan")
    nsga = means["nsga2"] / means["random"] if means["random"] > 0 else float("nan")
    print(f"TPE/random = {tpe:.3f}; NSGA-II/random = {nsga:.3f} (mean hypervolume ratios)")


if __name__ == "__main__":
    main()
