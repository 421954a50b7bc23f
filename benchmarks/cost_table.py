"""Params and FLOPs of the registered presets next to the numbers their papers report.

Counts come from :func:`aanas.cost.count_spec` (analytical; FLOPs = 2 x MACs, the convention
of Bello et al., arXiv:1904.09925, Table 2: ResNet-50 at 8.2 GFLOPs = 4.1 G MACs). Paper
numbers: AA paper Tables 2 (ResNets) and 3 (MnasNet-A1: 3.9M params, 312M mult-adds, from Tan
et al., arXiv:1807.11626); torchvision's model card for ``mnasnet1_0`` (4,383,312 params,
"0.31 GFLOPS", which torchvision counts as MACs); WRN-28-10 from Zagoruyko & Komodakis
(arXiv:1605.07146) Table 1. The AA paper gives no numbers we could verify for AA-MnasNet or
AA-WRN; AA-MnasNet-A1's "about 4.1M" (Table 3, read but not re-checked) is marked "?". The
AA-MnasNet-A1 placement is calibrated to that budget (``benchmarks/aa_placement_table.py``).

``--check`` also cross-checks every preset with the thop-based and FlopCounterMode counts
(at 64x64, or the preset's own size when smaller; plus mnasnet_b1_100 and aa_resnet50 at
224x224) and prints the largest disagreement.

Usage::

    python benchmarks/cost_table.py            # the README table
    python benchmarks/cost_table.py --check    # plus the three-way cross-check
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch

from aanas.cost import count_module, count_spec, reference_macs
from aanas.models import create_model, get_spec, list_models

# name -> (label, paper params in M, paper GFLOPs (2 x MACs), source)
_PAPER: dict[str, tuple[str, float | None, float | None, str]] = {
    "resnet34": ("ResNet-34", 21.8, 7.4, "AA Tab. 2"),
    "aa_resnet34": ("AA-ResNet-34", 20.7, 7.1, "AA Tab. 2"),
    "resnet50": ("ResNet-50", 25.6, 8.2, "AA Tab. 2"),
    "aa_resnet50": ("AA-ResNet-50", 25.8, 8.3, "AA Tab. 2"),
    "resnet101": ("ResNet-101", 44.5, 15.6, "AA Tab. 2"),
    "aa_resnet101": ("AA-ResNet-101", 45.4, 16.1, "AA Tab. 2"),
    "mnasnet_a1_100": ("MnasNet-A1", 3.9, 2 * 0.312, "AA Tab. 3 / MnasNet"),
    "aa_mnasnet_a1_100": ("AA-MnasNet-A1 (projection, last 7)", 4.1, None, "AA Tab. 3 ?"),
    "mnasnet_a1_050": ("MnasNet-A1 w0.5", None, None, "-"),
    "aa_mnasnet_a1_050": ("AA-MnasNet-A1 w0.5", None, None, "-"),
    "mnasnet_a1_075": ("MnasNet-A1 w0.75", None, None, "-"),
    "aa_mnasnet_a1_075": ("AA-MnasNet-A1 w0.75", None, None, "-"),
    "mnasnet_a1_140": ("MnasNet-A1 w1.4", None, None, "-"),
    "aa_mnasnet_a1_140": ("AA-MnasNet-A1 w1.4", None, None, "-"),
    "mnasnet_b1_100": ("torchvision mnasnet1_0", 4.383312, 2 * 0.31, "torchvision"),
    "wrn28_10": ("WRN-28-10 (32x32)", 36.5, None, "WRN Tab. 1"),
    "aa_wrn28_10": ("AA-WRN-28-10 (32x32)", None, None, "-"),
}


def _pct(ours: float, paper: float | None) -> str:
    return "" if paper is None else f"{(ours - paper) / paper:+.1%}"


def table() -> None:
    """Print the preset-vs-paper table (markdown)."""
    print(
        "| model | params (ours) | paper | diff | GFLOPs (ours) | paper | diff | MMACs (ours) "
        "| source |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, (label, p_params, p_gflops, source) in _PAPER.items():
        cost = count_spec(get_spec(name))
        params_m, gflops = cost.params / 1e6, cost.flops / 1e9
        print(
            f"| {label} (`{name}`) | {params_m:.2f}M | "
            f"{'' if p_params is None else f'{p_params:.2f}M'} | {_pct(params_m, p_params)} | "
            f"{gflops:.3f} | {'' if p_gflops is None else f'{p_gflops:.3f}'} | "
            f"{_pct(gflops, p_gflops)} | {cost.macs / 1e6:.1f} | {source} |"
        )


def check(device: str) -> None:
    """Three-way agreement over every preset; prints the worst relative MAC difference."""
    cases = [(n, min(get_spec(n).input_size, 64)) for n in list_models()]
    cases += [("mnasnet_b1_100", 224), ("aa_resnet50", 224)]
    worst, exact = 0.0, True
    print(f"\n{'preset':<20} {'size':>4} {'params':>11} {'MACs':>14} {'thop':>5} {'FCM diff':>9}")
    for name, size in cases:
        spec = dataclasses.replace(get_spec(name), input_size=size).validate()
        t0 = time.perf_counter()
        with torch.device(device):
            model = create_model(spec)
        a, t = count_spec(spec), count_module(model)
        ref = reference_macs(model, size)
        same = (a.params, a.macs) == (t.params, t.macs)
        exact &= same
        diff = (ref - a.macs) / a.macs
        worst = max(worst, abs(diff))
        print(
            f"{name:<20} {size:>4} {a.params:>11,} {a.macs:>14,} {'==' if same else '!='!s:>5} "
            f"{diff:>+9.4%}  ({time.perf_counter() - t0:.1f} s)"
        )
    print(
        f"analytical == thop (params and MACs) on all: {exact}; "
        f"max |FlopCounterMode - analytical| / analytical = {worst:.4%}"
    )


def main() -> None:
    """Parse flags, print the table (and the cross-check)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="three-way cross-check too")
    parser.add_argument("--device", default="cpu", help="cpu, or meta (shapes only, fast)")
    args = parser.parse_args()
    table()
    if args.check:
        check(args.device)


if __name__ == "__main__":
    main()
