"""Accuracy of the per-block latency table (:class:`aanas.cost.LatencyTable`) on held-out nets.

The MnasNet/FBNet/Once-for-All recipe: measure every distinct block of a search space once, in
isolation at its input resolution, and predict a network as stem + sum(blocks) + head + a
constant overhead fitted on a few whole networks. nn-Meter (Zhang et al., MobiSys 2021) reports
~99 % of predictions within +-10 % on its CPUs with kernel-level predictors.

Procedure (one run):

1. Sample ``--build`` architectures from the space (seed 0), measure every distinct part of
   them, fit the overhead on the first ``--fit`` of them.
2. Sample ``--test`` other architectures (seed 1; any that equals a build sample is redrawn).
   Their parts not yet in the table are measured in isolation and added (coverage before this
   step is reported): no test network's whole-network time is ever used by the table.
3. Measure each test network whole (median of ``--repeats`` runs), compare with the
   prediction: MAPE and the share within +-10 %.
4. Re-measure the fit networks: their mean error shows how far the machine drifted since the
   table was built (on a shared machine this, not the additive model, dominates the error).

Usage::

    python benchmarks/latency_predictor.py                       # aa_mnasnet at 128x128
    python benchmarks/latency_predictor.py --input-size 224 --test 50
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from aanas.cost import LatencyTable, count_spec, machine_fingerprint, measure
from aanas.space import SearchSpace
from aanas.spec import ArchSpec, resolve

_SPACE = Path(__file__).resolve().parents[1] / "search_spaces" / "aa_mnasnet.yaml"


def main() -> None:
    """Build the table, predict held-out networks, print the error table."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(_SPACE))
    parser.add_argument("--input-size", type=int, default=128)
    parser.add_argument("--build", type=int, default=100, help="samples that build the table")
    parser.add_argument("--fit", type=int, default=5, help="whole nets that fit the overhead")
    parser.add_argument("--test", type=int, default=30, help="held-out test networks")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30, help="timed runs per measurement")
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--lut", help="also save the table here")
    parser.add_argument(
        "--fit-scale", action="store_true", help="fit measured = a * sum + c, not sum + c"
    )
    args = parser.parse_args()

    space = SearchSpace.from_yaml(args.space)

    def sized(spec: ArchSpec) -> ArchSpec:
        return dataclasses.replace(spec, input_size=args.input_size).validate()

    rng = np.random.default_rng(0)
    build = [sized(space.sample(rng)) for _ in range(args.build)]
    seen = {s.digest() for s in build}
    rng = np.random.default_rng(1)
    test: list[ArchSpec] = []
    while len(test) < args.test:
        spec = sized(space.sample(rng))
        if spec.digest() not in seen:
            seen.add(spec.digest())
            test.append(spec)

    print(
        f"machine: {machine_fingerprint()} ({platform.machine()}, {torch.get_num_threads()} "
        f"torch threads by default; measuring with {args.threads})"
    )
    print(
        f"space {Path(args.space).name} at {args.input_size}x{args.input_size}, build "
        f"{args.build} samples, fit overhead on {args.fit}, test {args.test} held-out"
    )
    t0 = time.perf_counter()
    table = LatencyTable.build(
        build,
        fit_networks=args.fit,
        fit_scale=args.fit_scale,
        threads=args.threads,
        repeats=args.repeats,
        warmup=args.warmup,
    )
    print(
        f"table: {len(table)} parts measured, scale {table.scale:.3f}, overhead "
        f"{table.overhead_ms:+.3f} ms, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    missing = sum(len(table.missing(s)) for s in test)
    all_parts = sum(2 + len(resolve(s).blocks) for s in test)
    added = table.update(test, repeats=args.repeats, warmup=args.warmup)
    print(
        f"held-out coverage: {1 - missing / all_parts:.1%} of test-net parts were in the "
        f"table; {added} distinct missing parts measured in isolation and added"
    )
    if args.lut:
        table.save(args.lut)

    rows = []
    for i, spec in enumerate(test):
        measured = measure(
            spec, threads=args.threads, repeats=args.repeats, warmup=args.warmup, cache=False
        )
        predicted = table.predict(spec)
        err = (predicted - measured.median_ms) / measured.median_ms
        rows.append((i, count_spec(spec).macs, measured.median_ms, measured.iqr_ms, predicted, err))

    print()
    print(
        f"{'#':>3} {'MMACs':>8} {'measured ms':>12} {'IQR ms':>8} {'predicted ms':>13} {'error':>8}"
    )
    for i, macs, med, iqr, pred, err in rows:
        print(f"{i:>3} {macs / 1e6:>8.1f} {med:>12.3f} {iqr:>8.3f} {pred:>13.3f} {err:>+8.1%}")
    errors = np.array([abs(r[5]) for r in rows])
    rel_iqr = statistics.median(r[3] / r[2] for r in rows)
    print()
    print(
        f"MAPE {errors.mean():.1%}, median APE {np.median(errors):.1%}, max {errors.max():.1%}, "
        f"within +-10%: {np.mean(errors <= 0.10):.0%} ({int(np.sum(errors <= 0.10))}/"
        f"{len(rows)}), within +-5%: {np.mean(errors <= 0.05):.0%}"
    )
    print(f"median relative IQR of the whole-net measurements: {rel_iqr:.1%} (noise floor)")
    signed = np.array([r[5] for r in rows])
    print(f"mean signed error {signed.mean():+.1%} (bias left after the constant overhead)")
    # Drift check: the overhead made the fit networks' mean residual zero when the table was
    # built; re-measured now, their mean error is how much the machine's speed moved since.
    drift = [
        table.predict(s)
        / measure(
            s, threads=args.threads, repeats=args.repeats, warmup=args.warmup, cache=False
        ).median_ms
        - 1
        for s in build[: args.fit]
    ]
    print(
        f"drift: the {args.fit} fit networks (residual 0 on average when the table was built) "
        f"re-measured after the test: mean error {np.mean(drift):+.1%}"
    )
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
