"""Training-step cost of attention augmentation: AA model vs. its plain twin.

Bello et al. (*Attention Augmented Convolutional Networks*, arXiv:1904.09925, Tables 2-3)
report parameters and FLOPs but no step times. This measures forward+backward throughput of
AA-MnasNet-A1 vs MnasNet-A1 (width 1.0) and AA-ResNet-50 vs ResNet-50 in one process: the two
models of a pair are timed alternately (plain, AA, plain, AA, ...) so that drift in machine
speed hits both, and the ratio of the medians is printed beside the ratio of analytical MACs.

``--clock cpu`` times with the process's CPU time instead of the wall clock: on a shared,
loaded machine the wall clock also counts the time other processes hold the cores, while the
CPU time of a one-thread run does not (with more threads it also counts OpenMP spin-waits).
``--profile`` prints a ``torch.profiler`` table (self CPU time by op) of one AA step.
``--attention-impl fused,chunked`` times the AA model once per path (same weights), all
interleaved with the plain model in one loop, so the paths are compared under the same load.
``--block N`` times each model N steps in a row per turn instead of alternating step by step.

Usage::

    python benchmarks/aa_overhead.py --threads 2 --batch 8 --input-size 224
    python benchmarks/aa_overhead.py --threads 1 --clock cpu --profile
    python benchmarks/aa_overhead.py --threads 1 --clock cpu --attention-impl fused,chunked
    python benchmarks/aa_overhead.py --threads 2 --batch 4 --iters 8 --block 4
    python benchmarks/aa_overhead.py --device cuda --batch 64 --amp
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import time
from collections.abc import Callable, Sequence

import torch
from torch import nn

from aanas.cost import count
from aanas.models import create_model
from aanas.ops.attention import ATTENTION_IMPLS, AAConv2d

PAIRS = (("mnasnet_a1_100", "aa_mnasnet_a1_100"), ("resnet50", "aa_resnet50"))


def _step(model: nn.Module, x: torch.Tensor, amp: bool) -> None:
    """One forward+backward pass (gradients zeroed first; no optimizer)."""
    model.zero_grad(set_to_none=True)
    ctx = torch.autocast(x.device.type) if amp else contextlib.nullcontext()
    with ctx:
        loss = model(x).float().mean()
    loss.backward()


def _time(model: nn.Module, x: torch.Tensor, amp: bool, clock: Callable[[], float]) -> float:
    """Seconds of one synchronised step on ``clock``."""
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    start = clock()
    _step(model, x, amp)
    if x.device.type == "cuda":
        torch.cuda.synchronize(x.device)
    return clock() - start


def _models(
    names: Sequence[str], size: int, device: torch.device, impls: Sequence[str]
) -> list[nn.Module]:
    """The plain model, then one AA model per path in ``impls`` (equal weights), train mode."""
    torch.manual_seed(0)
    plain = create_model(names[0], input_size=size).to(device).train()
    torch.manual_seed(0)
    aa = create_model(names[1], input_size=size).to(device).train()
    models: list[nn.Module] = [plain]
    for impl in impls:
        model = copy.deepcopy(aa)
        for layer in model.modules():
            if isinstance(layer, AAConv2d):
                layer.attention_impl = impl
        models.append(model)
    return models


def bench_pair(
    models: Sequence[nn.Module],
    x: torch.Tensor,
    warmup: int,
    iters: int,
    amp: bool,
    clock: Callable[[], float],
    block: int = 1,
) -> list[float]:
    """Median step seconds of each model, measured in turns of ``block`` steps.

    ``block == 1`` alternates step by step (drift in machine speed hits every model alike, but
    each step starts with the caches full of another model's data); with ``block > 1`` each
    turn is one untimed step and ``block`` timed ones in a row, as in training one model.
    """
    for _ in range(warmup):
        for m in models:
            _step(m, x, amp)
    times: list[list[float]] = [[] for _ in models]
    for _ in range(-(-iters // block)):
        for m, t in zip(models, times, strict=True):
            if block > 1:
                _step(m, x, amp)
            t.extend(_time(m, x, amp, clock) for _ in range(block))
    return [statistics.median(t) for t in times]


def profile_step(model: nn.Module, x: torch.Tensor, amp: bool, rows: int) -> str:
    """``torch.profiler`` table of one step, sorted by self CPU time."""
    _step(model, x, amp)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        _step(model, x, amp)
    table: str = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=40
    )
    return table


def main(argv: Sequence[str] | None = None) -> None:
    """Parses arguments and prints one line per pair."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=5, help="timed steps per model")
    parser.add_argument(
        "--block",
        type=int,
        default=1,
        help="consecutive timed steps per model and turn (1: alternate step by step)",
    )
    parser.add_argument("--amp", action="store_true", help="autocast (float16 on CUDA)")
    parser.add_argument("--clock", choices=("wall", "cpu"), default="wall")
    parser.add_argument(
        "--attention-impl",
        default="auto",
        help=f"AAConv2d path, or several joined by commas (of {', '.join(ATTENTION_IMPLS)})",
    )
    parser.add_argument(
        "--pairs", default="all", choices=("all", "mnasnet", "resnet"), help="which pairs"
    )
    parser.add_argument("--profile", action="store_true", help="profile one AA step per pair")
    args = parser.parse_args(argv)
    if args.block < 1:
        parser.error(f"--block: must be at least 1, got {args.block}")
    impls = args.attention_impl.split(",")
    for impl in impls:
        if impl not in ATTENTION_IMPLS:
            parser.error(f"--attention-impl: {impl!r} is not one of {ATTENTION_IMPLS}")
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    pairs = [p for p in PAIRS if args.pairs == "all" or args.pairs in p[0]]
    print(
        f"device={device} threads={torch.get_num_threads()} batch={args.batch} "
        f"input={args.input_size} amp={args.amp} clock={args.clock} "
        f"impl={','.join(impls)} torch={torch.__version__} "
        f"(median of {args.iters}, "
        + ("alternated)" if args.block == 1 else f"in turns of {args.block} steps)")
    )
    print("| plain | AA (path) | plain img/s | AA img/s | AA / plain step time | AA / plain MACs |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    x = torch.randn(args.batch, 3, args.input_size, args.input_size, device=device)
    profiles = []
    for names in pairs:
        models = _models(names, args.input_size, device, impls)
        macs = [count(n, args.input_size).macs for n in names]
        t_plain, *t_aas = bench_pair(
            models, x, args.warmup, args.iters, args.amp, clock, args.block
        )
        for impl, t_aa in zip(impls, t_aas, strict=True):
            print(
                f"| {names[0]} | {names[1]} ({impl}) | {args.batch / t_plain:.1f} | "
                f"{args.batch / t_aa:.1f} | {t_aa / t_plain:.3f}x | {macs[1] / macs[0]:.3f}x |",
                flush=True,
            )
        if args.profile:
            profiles.append((names[1], profile_step(models[1], x, args.amp, 20)))
    for name, table in profiles:
        print(f"\nprofile of one {name} step:\n{table}")


if __name__ == "__main__":
    main()
