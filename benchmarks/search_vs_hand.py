"""Does ``aanas search`` beat hand design on the CIFAR-10 subset at no more MACs, and which
evaluator should a CPU user choose? (issue 13 item 3, issue 14 item 4)

Phases, each resumable (kill it and rerun the same command: finished work is read back):

1. **Hand baselines' cost.** The plain CNN of ``cifar_baseline.py`` and the models named by the
   recipes ``cifar10_subset_mnasnet_a1`` and ``cifar10_subset_aa_mnasnet_a1`` (read at run time:
   their models and MACs change with the recipes). The search's hard MACs budget is the
   smallest of their MACs, so "at no more than its MACs" holds against every baseline.
2. **Searches**, each ``aanas search`` (:func:`aanas.search.run_search`) in its own run directory
   ``<out>/search-<name>`` under the same wall-clock budget (``--budget-min``, the engine's
   ``timeout_min``: no trial starts after it; a resumed search counts the time already spent):
   ``train`` (short training with the recipe, median pruner, TPE), ``supernet`` (weight sharing:
   the supernet's training counts against the budget) and ``random`` (random sampler, the
   ``train`` evaluator). Selection is on the subset's own val/ split; test/ is not looked at.
3. **Final training.** The best architecture of each search (highest validation accuracy among
   COMPLETE trials within the MACs budget) and the hand baselines, each over ``--seeds`` with
   ``--recipe`` (its ``model`` replaced; the CNN with its own recipe), test top-1 on test/.
   Every finished run is a record ``<out>/runs/<model>/seed<k>.json`` keyed by recipe + spec
   (:mod:`aanas.run_record`), so a rerun trains only what is missing, and ``--reuse-runs DIR``
   reads runs another command already made with the same recipe (``aanas reproduce mobile
   --out DIR`` trains both MnasNet baselines with it).
4. **Report**: ``report.md`` (table, goal, evaluator comparison), ``summary.json`` and
   ``pareto.png`` (accuracy vs MACs).

    python benchmarks/search_vs_hand.py --threads 2                   # the real run (~4 h)
    python benchmarks/search_vs_hand.py --tiny                        # minutes: smoke run
    python benchmarks/search_vs_hand.py --searches train --searches-only   # one phase at a time
    python benchmarks/search_vs_hand.py --reuse-runs benchmarks/results/reproduce_mobile_cifar

The real run is 3 x ``--budget-min`` of search plus 3 seeds x (3 baselines + 3 found models)
trainings with the CPU recipe: 135 min + about 3 x 32 min on a quiet 2-core AMD EPYC family 26
(there one MnasNet training run takes 6-7 min), about 1.7x that on the slower host seen
earlier. Timings are wall-clock on whatever else the machine is doing; each search records the
host it ran on, since equal budgets are equal work only on the same kind of host. The TPE
search and the random search share the seed, so TPE's random start-up trials are the random
search's first trials (common random numbers: they differ only after it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aanas._io import atomic_open
from aanas.config import SearchRecipe, TrainRecipe, apply_overrides, load_recipe, recipe_to_dict
from aanas.cost import count_module, count_spec
from aanas.cost.latency import measure
from aanas.data import build_recipe_data
from aanas.models import create_model
from aanas.results import TrialResult, pareto
from aanas.run_record import recall_or_train, run_identity
from aanas.search import RunDirectory, run_search
from aanas.space import SearchSpace
from aanas.spec import ArchSpec, decode
from aanas.train import fit, seed_everything

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark modules
from _bench_cache import ResultCache, digest  # noqa: E402
from cifar_baseline import PlainCNN, baseline_recipe  # noqa: E402

CNN = "plain_cnn"  # the hand-designed CNN's row name (no ArchSpec: keyed by this name)
HAND_RECIPES = ("cifar10_subset_mnasnet_a1", "cifar10_subset_aa_mnasnet_a1")
SEARCHES = ("train", "supernet", "random")  # search name -> evaluator, sampler: _search_recipe

# --tiny: every phase runs, on budgets of seconds (a smoke run, not a measurement).
# On the CIFAR subset it takes ~5 min on 1 thread (measured Dec 2 at load ~3.5): each trial
# evaluates the 10k val/ images, and 2 sandwich steps of the supernet take ~30 s.
_TINY: dict[str, Any] = {
    "budget_min": 1.0,
    "seeds": "0",
    "train_epochs": 1,
    "search_batches": 2,
    "supernet_epochs": 1,
    "recal_batches": 2,
    "final_set": ["epochs=1", "max_train_batches=4"],
    "latency_repeats": 5,
}


# --- phase 1: the hand baselines -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A model of the final table: a hand baseline or a search's best architecture."""

    name: str  # row name: plain_cnn, the recipe's model name, or found:<search>
    spec: ArchSpec | None  # None: the CNN
    kind: str  # "hand" or "found"
    search: str = ""  # found: which search

    @property
    def ident(self) -> str:
        """Cache identity: the spec digest, or the CNN's name."""
        return self.spec.digest() if self.spec is not None else CNN

    @property
    def ident_spec(self) -> str:
        """What a run record's identity hashes as the architecture: the spec string, or the
        CNN's name (identities drop the recipe's ``model`` field; the class is fixed)."""
        return self.spec.encode() if self.spec is not None else CNN

    def build(self, num_classes: int) -> nn.Module:
        """A fresh, untrained model."""
        if self.spec is None:
            return PlainCNN(num_classes)
        return create_model(dataclasses.replace(self.spec, num_classes=num_classes))

    def cost(self) -> tuple[int, int]:
        """(MACs, params) at 32x32: analytical for specs, hook-counted for the CNN."""
        if self.spec is None:
            c = count_module(PlainCNN(10), 32)
        else:
            c = count_spec(self.spec)
        return int(c.macs), int(c.params)


def hand_baselines(space: SearchSpace) -> list[Candidate]:
    """The CNN and the models the hand recipes name today, at the space's input size."""
    out = [Candidate(CNN, None, "hand")]
    for recipe_name in HAND_RECIPES:
        model = load_recipe(recipe_name).model
        spec = create_model(
            model, num_classes=space.base.num_classes, input_size=space.base.input_size
        ).spec
        assert isinstance(spec, ArchSpec)
        out.append(Candidate(model, spec, "hand"))
    return out


# --- phase 2: searches -----------------------------------------------------------------------


def _search_recipe(name: str, args: argparse.Namespace, budget_macs: int) -> SearchRecipe:
    """The SearchRecipe of search ``name`` (see the module docstring)."""
    final = _final_recipe(args)
    common = dict(
        space=args.space,
        data=args.data,
        batch_size=final.batch_size,
        val_fraction=final.val_fraction,  # > 0: the ImageFolder subset's own val/ split
        engine="optuna",
        trials=1_000_000,  # the wall-clock budget ends the search
        timeout_min=args.budget_min,
        seed=args.seed,
        score="accuracy",  # pick on validation accuracy ...
        max_macs=float(budget_macs),  # ... among architectures within the MACs budget
        latency="off",
        device=args.device,
        max_train_batches=args.search_batches,
    )
    if name == "supernet":
        return SearchRecipe(
            **common,
            evaluator="supernet",
            supernet_epochs=args.supernet_epochs,
            supernet_budget_share=args.supernet_share,
            recal_batches=args.recal_batches,
        )
    return SearchRecipe(
        **common,
        evaluator="train",
        sampler="random" if name == "random" else "auto",
        pruner="median",
        train_recipe=args.recipe,
        train_epochs=args.train_epochs,
        warm_start=() if name == "random" else tuple(args.warm_start),
    )


def best_found(results: Sequence[TrialResult], budget_macs: int) -> TrialResult | None:
    """Highest validation accuracy among COMPLETE trials within the budget (ties: fewer MACs)."""
    ok = [
        r
        for r in results
        if r.state == "COMPLETE"
        and r.accuracy is not None
        and r.macs is not None
        and r.macs <= budget_macs
    ]
    return min(ok, key=lambda r: (-(r.accuracy or 0.0), r.macs or 0, r.number)) if ok else None


def host_description() -> str:
    """CPU model, family/model numbers and cores, e.g. ``AMD EPYC (family 26, model 2), 2 cores``.

    Recorded with every search: a 45-minute budget buys about 1.7x more trials on one 2-core
    host than on another seen here, so searches compared at equal wall time must share a host.
    """
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    name = fields.get("model name") or platform.processor() or platform.machine()
    family, model = fields.get("cpu family"), fields.get("model")
    ident = f" (family {family}, model {model})" if family and model else ""
    return f"{name}{ident}, {os.cpu_count()} cores"


def run_searches(
    args: argparse.Namespace, out: Path, budget_macs: int, state: dict[str, Any]
) -> int:
    """Run every search not yet finished (``state["searches"]``); return how many ran."""
    ran = 0
    done: dict[str, Any] = state.setdefault("searches", {})
    for name in args.searches:
        if name in done:
            print(f"search {name}: finished earlier, skipped", flush=True)
            continue
        recipe = _search_recipe(name, args, budget_macs)
        run_path = out / f"search-{name}"
        print(f"search {name}: {args.budget_min} min budget, run directory {run_path}", flush=True)
        outcome = run_search(recipe, out=run_path, progress=False)
        ran += 1
        best = best_found(outcome.results, budget_macs)
        counts: dict[str, int] = {}
        for r in outcome.results:
            counts[r.state] = counts.get(r.state, 0) + 1
        done[name] = {
            "run_dir": str(run_path),
            "evaluator": recipe.evaluator,
            "sampler": recipe.sampler,
            "wall_s": RunDirectory(run_path).spent_s(),
            "host": host_description(),  # equal budgets mean equal work only on one host kind
            "states": counts,
            # trials that trained or were evaluated: REJECTED ones are over budget, untrained;
            # a repeated architecture reuses its stored result (metrics["duplicate_of"])
            "evaluated": sum(
                r.state in ("COMPLETE", "PRUNED") and "duplicate_of" not in r.metrics
                for r in outcome.results
            ),
            "best": best.to_dict() if best is not None else None,
        }
        _write_json(out / "state.json", state)
        print(
            f"search {name}: {done[name]['evaluated']} trials evaluated "
            f"({', '.join(f'{n} {s.lower()}' for s, n in sorted(counts.items()))}) in "
            f"{done[name]['wall_s'] / 60:.1f} min; best "
            + (f"val {best.accuracy:.4f} {best.spec}" if best else "none"),
            flush=True,
        )
    return ran


# --- phase 3: final training -----------------------------------------------------------------


def _final_recipe(args: argparse.Namespace) -> TrainRecipe:
    """``--recipe`` with ``--set`` overrides and the benchmark's data."""
    recipe = load_recipe(args.recipe, args.final_set)
    return dataclasses.replace(recipe, data=args.data, input_size=32)


def recipe_for(cand: Candidate, args: argparse.Namespace, seed: int) -> TrainRecipe:
    """The CPU recipe of ``cand`` (the CNN: its own, with the same ``--set`` overrides)."""
    if cand.spec is None:
        base = baseline_recipe(args.data, seed=seed)
        return apply_overrides(base, args.final_set)
    return dataclasses.replace(_final_recipe(args), model=cand.spec.encode(), seed=seed)


def train_all(
    cands: Sequence[Candidate],
    args: argparse.Namespace,
    runs_dir: Path,
    seeds: Sequence[int],
) -> tuple[dict[str, list[dict[str, Any]]], int]:
    """Every candidate x seed; ({name: [record per seed]}, number trained now).

    Each finished run is a record ``runs_dir/<name>/seed<k>.json`` (:mod:`aanas.run_record`:
    keyed by recipe + spec, written atomically). A run already recorded under ``runs_dir`` or
    under a ``--reuse-runs`` folder (e.g. ``aanas reproduce mobile --out``'s, which trains the
    two MnasNet baselines with the same recipe) is read back and copied here, not trained.
    """
    rows: dict[str, list[dict[str, Any]]] = {}
    trained = 0
    data_cache: dict[str, Any] = {}
    for cand in cands:
        rows[cand.name] = []
        for seed in seeds:
            recipe = recipe_for(cand, args, seed)
            ident = run_identity(recipe, cand.ident_spec)
            path = runs_dir / cand.name.replace(":", "_") / f"seed{seed}.json"

            def train(
                work: Path,
                resume: Path | None,
                cand: Candidate = cand,
                recipe: TrainRecipe = recipe,
                seed: int = seed,
            ) -> dict[str, Any]:
                # the loaders' shuffling follows recipe.seed: one bundle per (data fields, seed)
                data_key = digest(recipe_to_dict(dataclasses.replace(recipe, model="")))
                if data_key not in data_cache:
                    data_cache.clear()  # keep one in memory
                    data_cache[data_key] = build_recipe_data(recipe)
                data = data_cache[data_key]
                seed_everything(seed)
                model = cand.build(data.num_classes)
                metrics = fit(
                    model,
                    data,
                    recipe,
                    device=args.device,
                    progress=False,
                    out_dir=work,
                    resume=resume,
                )
                return {"model": cand.name, "seed": seed, **metrics, "load": os.getloadavg()[0]}

            record, how = recall_or_train(path, ident, train, args.reuse_runs)
            trained += how == "trained"
            print(
                f"final {cand.name} seed {seed} ({how}): test {record['test_top1']:.4f} "
                f"val {record.get('val_top1') or float('nan'):.4f} {record['time_s']:.0f} s",
                flush=True,
            )
            rows[cand.name].append(record)
    return rows, trained


def latency_ms(cand: Candidate, cache: ResultCache, repeats: int) -> float:
    """onnxruntime latency, 1 thread, batch 1, median (cached per model and repeats)."""
    key = cache.key(cand.ident, "ort-1thread", repeats)
    hit = cache.get(key)
    if hit is None:
        model = cand.build(10)
        result = measure(model, 32, backend="onnxruntime", threads=1, repeats=repeats, cache=False)
        hit = {"median_ms": float(result.median_ms), "iqr_ms": float(result.iqr_ms)}
        cache.put(key, hit)
    return float(hit["median_ms"])


# --- phase 4: report -------------------------------------------------------------------------


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def build_table(
    cands: Sequence[Candidate],
    finals: dict[str, list[dict[str, Any]]],
    searches: dict[str, Any],
    latency: dict[str, float],
) -> list[dict[str, Any]]:
    """One row per candidate (the report's table, as data)."""
    table = []
    for cand in cands:
        macs, params = cand.cost()
        tests = [100 * r["test_top1"] for r in finals[cand.name]]
        vals = [100 * r["val_top1"] for r in finals[cand.name] if r.get("val_top1") is not None]
        mean, std = _mean_std(tests)
        info = searches.get(cand.search, {})
        table.append(
            {
                "model": cand.name,
                "kind": cand.kind,
                "search": cand.search,
                "spec": cand.spec.encode() if cand.spec is not None else "",
                "macs": macs,
                "params": params,
                "latency_ms": latency[cand.name],
                "test_top1_mean": mean,
                "test_top1_std": std,
                "test_top1": tests,
                "val_top1_mean": statistics.mean(vals) if vals else None,
                "search_val_top1": (
                    100 * info["best"]["accuracy"] if cand.kind == "found" else None
                ),
                "search_wall_min": info["wall_s"] / 60 if cand.kind == "found" else None,
                "trials_evaluated": info.get("evaluated") if cand.kind == "found" else None,
                "seeds": len(tests),
            }
        )
    return table


def goal_verdicts(table: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """For each found model: mean test top-1 >= every baseline's mean, at <= its MACs?"""
    hands = [r for r in table if r["kind"] == "hand"]
    out = {}
    for row in (r for r in table if r["kind"] == "found"):
        fails = [
            h["model"]
            for h in hands
            if row["test_top1_mean"] < h["test_top1_mean"] or row["macs"] > h["macs"]
        ]
        out[row["search"]] = {"holds": not fails, "not_beaten": fails}
    return out


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def report_markdown(
    table: Sequence[dict[str, Any]],
    verdicts: dict[str, dict[str, Any]],
    meta: dict[str, Any],
) -> str:
    """``report.md``."""
    lines = [
        "# Search vs hand design",
        "",
        f"Data `{meta['data']}`; space `{meta['space']}`; MACs budget "
        f"{meta['budget_macs'] / 1e6:.2f}M (the smallest hand baseline); search budget "
        f"{meta['budget_min']} min each; final recipe `{meta['recipe']}` "
        f"{' '.join(meta['final_set'])} (CNN: its own), seeds {meta['seeds']}. "
        f"Wall-clock figures are on a shared machine (load average {meta['load']:.1f} at the "
        "end): compare them within this run only."
        + (
            " **--tiny smoke run: budgets of seconds, the accuracies mean nothing.**"
            if meta["tiny"]
            else ""
        ),
        "",
        "| model | MACs (M) | params (M) | ORT 1-thread latency (ms) | test top-1 (%) "
        "| val top-1 (%) | search val top-1 (%) | search wall (min) | trials evaluated |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in table:
        lines.append(
            f"| {r['model']} | {r['macs'] / 1e6:.2f} | {r['params'] / 1e6:.3f} | "
            f"{r['latency_ms']:.2f} | {r['test_top1_mean']:.2f} +- {r['test_top1_std']:.2f} | "
            f"{_fmt(r['val_top1_mean'])} | {_fmt(r['search_val_top1'])} | "
            f"{_fmt(r['search_wall_min'], 1)} | {r['trials_evaluated'] or '-'} |"
        )
    lines += ["", "## Goal: found model >= every baseline's mean test top-1 at <= its MACs", ""]
    for search, v in verdicts.items():
        lines.append(
            f"- `{search}` search: "
            + ("**holds**" if v["holds"] else f"**not met** (against {', '.join(v['not_beaten'])})")
        )
    lines += [
        "",
        "## Evaluator comparison at equal wall time (issue 14 item 4)",
        "",
        "| search | evaluator | sampler | trials evaluated | found MACs (M) | "
        "search val top-1 (%) | test top-1 (%) | host | spec |",
        "|---|---|---|---:|---:|---:|---:|---|---|",
    ]
    for r in (r for r in table if r["kind"] == "found"):
        s = meta["searches"][r["search"]]
        lines.append(
            f"| {r['search']} | {s['evaluator']} | {s['sampler']} | {r['trials_evaluated']} | "
            f"{r['macs'] / 1e6:.2f} | {_fmt(r['search_val_top1'])} | "
            f"{r['test_top1_mean']:.2f} +- {r['test_top1_std']:.2f} | {s.get('host', '?')} | "
            f"`{r['spec']}` |"
        )
    empty = [n for n, s in meta["searches"].items() if s["best"] is None]
    if empty:
        lines.append(f"\nNo COMPLETE trial within the budget in: {', '.join(empty)}.")
    lines += ["", "![accuracy vs MACs](pareto.png)", ""]
    return "\n".join(lines)


def plot_pareto(
    path: Path,
    trials: dict[str, list[TrialResult]],
    table: Sequence[dict[str, Any]],
    budget: int,
) -> None:
    """Left: every search trial's validation accuracy (grey) and their front; right: final
    3-seed test top-1 of the baselines and found models. Both against MACs, the budget marked.
    The front is over all searches' trials together (each search's own is in its run dir).

    Two panels because the search-time accuracies (short training, inherited weights) and the
    final ones are on different scales; one axis would make them look comparable.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), sharex=True)
    done: list[TrialResult] = []
    for (name, results), marker in zip(trials.items(), "o^sDv", strict=False):
        mine = [r for r in results if r.state == "COMPLETE" and r.macs and r.accuracy is not None]
        done += mine
        left.scatter(
            [(r.macs or 0) / 1e6 for r in mine],
            [100 * (r.accuracy or 0) for r in mine],
            s=14,
            c="0.6",
            marker=marker,
            label=f"trials: {name} search (val)",
        )
    front = pareto(done, "macs")
    left.plot(
        [(r.macs or 0) / 1e6 for r in front],
        [100 * (r.accuracy or 0) for r in front],
        "k-o",
        ms=4,
        label="Pareto front",
    )
    for row in (r for r in table if r["kind"] == "found"):
        left.scatter(
            [row["macs"] / 1e6], [row["search_val_top1"]], marker="*", s=160, zorder=3,
            label=f"found ({row['search']})",
        )  # fmt: skip
    left.set_title("search trials: validation top-1 at search time")
    left.set_ylabel("top-1 (%)")
    for row in table:
        right.errorbar(
            [row["macs"] / 1e6],
            [row["test_top1_mean"]],
            yerr=[row["test_top1_std"]],
            fmt="s" if row["kind"] == "hand" else "*",
            ms=8 if row["kind"] == "hand" else 12,
            capsize=3,
            label=row["model"],
        )
    right.set_title(f"final training: test top-1, mean +- std over {table[0]['seeds']} seed(s)")
    for ax in (left, right):
        ax.axvline(budget / 1e6, color="r", ls="--", lw=1, label="MACs budget")
        ax.set_xlabel("MACs (M)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def _write_json(path: Path, obj: Any) -> None:
    with atomic_open(path, "w", encoding="utf-8") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)


# --- driver ----------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line settings (``--tiny`` fills in the smoke-run budgets)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    env = os.environ.get("AANAS_CIFAR10")
    ap.add_argument("--data", default=f"imagefolder:{env}" if env else None)
    ap.add_argument("--space", default="cifar_aa_mnasnet", help="space name or YAML path")
    ap.add_argument(
        "--recipe", default="cifar10_subset_mnasnet_a1",
        help="the CPU recipe every MnasNet-family model trains with (its model replaced)",
    )  # fmt: skip
    ap.add_argument(
        "--set", dest="final_set", action="append", default=[], metavar="K=V",
        help="override a field of the final recipes (CNN's too), e.g. epochs=4",
    )  # fmt: skip
    ap.add_argument("--budget-min", type=float, default=None, help="wall clock per search")
    ap.add_argument(
        "--searches", default=",".join(SEARCHES), help="subset of " + ",".join(SEARCHES)
    )
    ap.add_argument(
        "--train-epochs", type=int, default=None, help="epochs per train-evaluator trial"
    )
    ap.add_argument(
        "--search-batches", type=int, default=None,
        help="cap steps per epoch of trials and of the supernet (0: all)",
    )  # fmt: skip
    ap.add_argument("--supernet-epochs", type=int, default=None)
    ap.add_argument(
        "--supernet-share", type=float, default=0.5,
        help="share of --budget-min the supernet's training may take (its schedule is "
        "compressed to fit; the rest evaluates candidates)",
    )  # fmt: skip
    ap.add_argument("--recal-batches", type=int, default=None)
    ap.add_argument("--seeds", default=None, help="final-training seeds, e.g. 0,1,2")
    ap.add_argument("--seed", type=int, default=0, help="search sampler seed")
    ap.add_argument(
        "--warm-start", default="", metavar="NAMES",
        help="comma-separated registered models the train search evaluates first (e.g. "
        "mnasnet_a1_cifar_050: TPE then starts from the hand design; the random search never "
        "does); use another --out than a search without it",
    )  # fmt: skip
    ap.add_argument(
        "--reuse-runs", action="append", default=[], type=Path, metavar="DIR",
        help="also read finished final-training runs (same recipe, spec and seed) from DIR, "
        "e.g. an `aanas reproduce mobile --out` folder; repeatable",
    )  # fmt: skip
    ap.add_argument("--latency-repeats", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    ap.add_argument("--out", default=None, help="results folder (default runs/search_vs_hand)")
    ap.add_argument("--tiny", action="store_true", help="every phase on tiny budgets")
    ap.add_argument(
        "--searches-only", action="store_true",
        help="run (or resume) the searches, then stop; a later run trains and reports",
    )  # fmt: skip
    args = ap.parse_args(argv)
    # Defaults of the real run: 45 min per search, batch 32 (the final recipe's). Short
    # training = 2 epochs of <= 156 steps (half of the subset's 312 steps per epoch: one epoch
    # in all, half of it before the median pruner first looks), ~35 s per unpruned trial with
    # the 10k val/ images on a quiet 2-core Zen 5 (1 optimiser step ~95 ms), so ~80+ trials.
    # Supernet: 12 epochs of 156 sandwich steps planned, but a step costs ~2 s there (the
    # largest path alone, 100M MACs at batch 32, ~0.8 s; then + smallest + 2 random; measured
    # Dec 7: the 12 epochs would take ~55 min), so the schedule is compressed into
    # --supernet-share (0.5) of the budget, ~700 steps, and the other ~22 min evaluate
    # candidates (~6 s each: BN recalibration + the 10k val/ images), ~2x the train search's.
    full = {
        "budget_min": 45.0,
        "seeds": "0,1,2",
        "train_epochs": 2,
        "search_batches": 156,
        "supernet_epochs": 12,
        "recal_batches": 10,
        "latency_repeats": 50,
    }
    for key, value in full.items():
        if getattr(args, key) is None:
            setattr(args, key, _TINY[key] if args.tiny else value)
    if args.tiny:
        args.final_set = [*_TINY["final_set"], *args.final_set]
    args.out = args.out or ("runs/search_vs_hand_tiny" if args.tiny else "runs/search_vs_hand")
    if args.data is None:
        ap.error("--data is required (or set AANAS_CIFAR10)")
    args.searches = [s for s in args.searches.split(",") if s]
    args.warm_start = [s.strip() for s in args.warm_start.split(",") if s.strip()]
    bad = [s for s in args.searches if s not in SEARCHES]
    if bad:
        ap.error(f"--searches: unknown {bad[0]!r}; choose from {','.join(SEARCHES)}")
    try:
        args.seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        ap.error(f"--seeds must be comma-separated integers, got {args.seeds!r}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run (or resume) the benchmark; return the summary (also ``<out>/summary.json``)."""
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    space = SearchSpace.from_yaml(args.space)
    _final_recipe(args)  # a bad --recipe / --set fails here, before any search

    hands = hand_baselines(space)
    budget_macs = min(c.cost()[0] for c in hands)
    print(
        "hand baselines: "
        + ", ".join(f"{c.name} {c.cost()[0] / 1e6:.2f}M MACs" for c in hands)
        + f"; search budget {budget_macs / 1e6:.2f}M MACs",
        flush=True,
    )
    state_path = out / "state.json"
    state: dict[str, Any] = (
        json.loads(state_path.read_text(encoding="utf-8")) if state_path.is_file() else {}
    )
    searches_ran = run_searches(args, out, budget_macs, state)
    searches = state["searches"]
    if args.searches_only:
        print(f"{searches_ran} search(es) run now; --searches-only: stopping before training")
        return {"searches": {n: searches[n] for n in args.searches}, "searches_ran": searches_ran}

    found = [  # in --searches order (state.json is written with sorted keys)
        Candidate(f"found:{name}", decode(searches[name]["best"]["spec"]), "found", name)
        for name in args.searches
        if searches[name]["best"] is not None
    ]
    for cand in found:  # the budget is checked on the spec itself, not on the search's record
        if cand.cost()[0] > budget_macs:
            raise SystemExit(f"{cand.name}: {cand.cost()[0]} MACs exceed the budget {budget_macs}")
    cands = [*hands, *found]
    cache = ResultCache(out / "results_cache.json")  # latency
    finals, trained = train_all(cands, args, out / "runs", args.seeds)
    latency = {c.name: latency_ms(c, cache, args.latency_repeats) for c in cands}

    table = build_table(cands, finals, searches, latency)
    verdicts = goal_verdicts(table)
    trials = {n: RunDirectory(searches[n]["run_dir"]).read_trials() for n in args.searches}
    meta = {
        "data": args.data,
        "space": space.name,
        "recipe": args.recipe,
        "final_set": args.final_set,
        "seeds": args.seeds,
        "budget_macs": budget_macs,
        "budget_min": args.budget_min,
        "searches": {n: searches[n] for n in args.searches},
        "load": os.getloadavg()[0],
        "tiny": args.tiny,
    }
    _write_json(out / "summary.json", {**meta, "table": table, "goal": verdicts})
    with atomic_open(out / "report.md", "w", encoding="utf-8") as fh:
        fh.write(report_markdown(table, verdicts, meta))
    plot_pareto(out / "pareto.png", trials, table, budget_macs)
    print("\n" + report_markdown(table, verdicts, meta), flush=True)
    print(
        f"wrote {out}/report.md, summary.json, pareto.png; {searches_ran} search(es) and "
        f"{trained} training(s) run now, {time.perf_counter() - t0:.0f} s",
        flush=True,
    )
    return {
        **meta,
        "table": table,
        "goal": verdicts,
        "searches_ran": searches_ran,
        "trained": trained,
    }


if __name__ == "__main__":
    main()
