"""Training-step cost of attention augmentation: AA model vs. its plain twin.

Bello et al. (*Attention Augmented Convolutional Networks*, arXiv:1904.09925, Tables 2-3)
report parameters and FLOPs but no step times. This measures forward+backward throughput of
AA-MnasNet-A1 vs MnasNet-A1 (width 1.0) and AA-ResNet-50 vs ResNet-50 in one process: the two
models of a pair are timed alternately (plain, AA, plain, AA, ...) so that drift in machine
speed hits both, and the ratio of the medians is printed.

Usage::

    python benchmarks/aa_overhead.py --threads 2 --batch 8 --input-size 224
    python benchmarks/aa_overhead.py --device cuda --batch 64
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence

import torch
from torch import nn

from aanas.models import create_model

PAIRS = (("mnasnet_a1_100", "aa_mnasnet_a1_100"), ("resnet50", "aa_resnet50"))


def _step(model: nn.Module, x: torch.Tensor) -> None:
    """One forward+backward pass (gradients zeroed first; no optimizer)."""
    model.zero_grad(set_to_none=True)
    model(x).float().mean().backward()


def _time(model: nn.Module, x: torch.Tensor, device: torch.device) -> float:
    """Wall seconds of one synchronised step."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    _step(model, x)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def bench_pair(
    names: Sequence[str], batch: int, size: int, device: torch.device, warmup: int, iters: int
) -> list[float]:
    """Median step seconds of each model, measured alternately."""
    torch.manual_seed(0)
    models = [create_model(n, input_size=size).to(device).train() for n in names]
    x = torch.randn(batch, 3, size, size, device=device)
    for _ in range(warmup):
        for m in models:
            _step(m, x)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(iters):
        for m, t in zip(models, times, strict=True):
            t.append(_time(m, x, device))
    return [statistics.median(t) for t in times]


def main(argv: Sequence[str] | None = None) -> None:
    """Parses arguments and prints one line per pair."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per model")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
        f"input={args.input_size} torch={torch.__version__} (median of {args.iters}, alternated)"
    )
    print("| plain | AA | plain img/s | AA img/s | AA / plain step time |")
    print("| --- | --- | ---: | ---: | ---: |")
    for plain, aa in PAIRS:
        t_plain, t_aa = bench_pair(
            (plain, aa), args.batch, args.input_size, device, args.warmup, args.iters
        )
        print(
            f"| {plain} | {aa} | {args.batch / t_plain:.1f} | {args.batch / t_aa:.1f} | "
            f"{t_aa / t_plain:.2f}x |",
            flush=True,
        )


if __name__ == "__main__":
    main()
