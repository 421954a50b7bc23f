"""Attention core alone: the fused CPU kernel against the chunked path, forward and backward.

The whole-network figures (``aa_overhead.py``) mix the core with convolutions; this times only
:func:`aanas.ops.attention.relative_attention` on the shapes the AA presets give it at 224x224
(batch 4), with q, k, v split from one qkv tensor as ``AAConv2d`` does. Each path runs in turn in
one loop (fused, chunked, fused, ...) so that drift in machine speed hits both, and the minimum
of ``--iters`` runs is kept (interference only ever slows a run down). Printed per shape:
forward and backward milliseconds of each path and the fused kernel's speed-up.

Usage::

    python benchmarks/aa_core.py                 # one thread
    python benchmarks/aa_core.py --threads 2
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence

import torch

from aanas.ops.attention import relative_attention

# (name, batch, heads, dk per head, dv per head, map size): the presets' attention layers.
SHAPES = (
    ("AA-ResNet-50 28x28", 4, 8, 3, 2, 28),
    ("AA-ResNet-50 14x14", 4, 8, 6, 3, 14),
    ("AA-ResNet-50 7x7", 4, 8, 13, 6, 7),
    ("AA-MnasNet-A1 14x14", 4, 4, 3, 1, 14),
    ("AA-MnasNet-A1 7x7", 4, 4, 4, 2, 7),
)


def time_paths(
    batch: int, heads: int, dkh: int, dvh: int, size: int, iters: int, impls: Sequence[str]
) -> dict[str, tuple[float, float]]:
    """Minimum forward and backward seconds of each path, the paths run in turn."""
    torch.manual_seed(0)
    qkv = torch.randn(batch, heads * (2 * dkh + dvh), size, size, requires_grad=True)
    rel_w, rel_h = (torch.randn(2 * size - 1, dkh, requires_grad=True) for _ in range(2))
    grad = torch.randn(batch, heads * dvh, size, size)
    best = {impl: (float("inf"), float("inf")) for impl in impls}
    for _ in range(iters + 1):  # the first round warms up
        for impl in impls:
            q, k, v = torch.split(qkv, [heads * dkh, heads * dkh, heads * dvh], dim=1)
            start = time.perf_counter()
            out = relative_attention(q, k, v, heads, rel_w, rel_h, impl=impl)
            mid = time.perf_counter()
            out.backward(grad)
            end = time.perf_counter()
            fwd, bwd = best[impl]
            best[impl] = (min(fwd, mid - start), min(bwd, end - mid))
    return best


def main(argv: Sequence[str] | None = None) -> None:
    """Parses arguments and prints one table row per shape."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (torch)")
    parser.add_argument("--iters", type=int, default=15, help="timed runs per path and shape")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.iters < 1:
        parser.error(f"--threads and --iters must be >= 1, got {args.threads}, {args.iters}")
    torch.set_num_threads(args.threads)
    print(f"threads={torch.get_num_threads()} torch={torch.__version__} (min of {args.iters})")
    print(
        "| layer | B x heads, dk/h, dv/h | fused fwd / bwd ms | chunked fwd / bwd ms | speed-up |"
    )
    print("|---|---|---:|---:|---:|")
    for name, batch, heads, dkh, dvh, size in SHAPES:
        t = time_paths(batch, heads, dkh, dvh, size, args.iters, ("fused", "chunked"))
        (ff, fb), (cf, cb) = t["fused"], t["chunked"]
        print(
            f"| {name} | {batch} x {heads}, {dkh}, {dvh} | {ff * 1e3:.2f} / {fb * 1e3:.2f} | "
            f"{cf * 1e3:.2f} / {cb * 1e3:.2f} | {(cf + cb) / (ff + fb):.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
