"""Parameters and MACs of every registered preset next to the papers' reported numbers.

MACs come from ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2) on a meta-device
forward at the preset's own input size (batch 1): convolutions, linear layers and the attention
matmuls are counted; BatchNorm, activations, pooling, softmax and SE multiplies are not.
"Paper GFLOPs" are Bello et al.'s (arXiv:1904.09925) ImageNet columns, which equal 2 x MACs
(ResNet-50: 8.2 = 2 x 4.1 G).

Usage::

    python benchmarks/param_table.py
"""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode

from aanas.models import create_model, list_models

# name -> (params in M, GFLOPs, source). "?" marks numbers we could not re-check against the
# paper text while writing this table; treat them as uncertain.
PAPER: dict[str, tuple[float | None, float | None, str]] = {
    "resnet34": (21.8, 7.4, "AA Table 2"),
    "aa_resnet34": (20.7, 7.1, "AA Table 2"),
    "resnet50": (25.6, 8.2, "AA Table 2"),
    "aa_resnet50": (25.8, 8.3, "AA Table 2"),
    "resnet101": (44.5, 15.6, "AA Table 2"),
    "aa_resnet101": (45.4, 16.1, "AA Table 2"),
    "resnet152": (60.2, 23.0, "AA Table 2 ?"),
    "aa_resnet152": (61.6, 23.8, "AA Table 2 ?"),
    "mnasnet_a1_100": (3.9, None, "MnasNet Table 1 (timm 3.89M)"),
    "aa_mnasnet_a1_100": (4.1, None, "AA Table 3 ? (placement calibrated to it)"),
    "mnasnet_b1_100": (4.38, None, "torchvision mnasnet1_0"),
    "wrn28_10": (36.5, None, "WRN Table 1 / AA Table 1"),
    "aa_wrn28_10": (36.2, None, "AA Table 1 ?"),
}


def count(name: str) -> tuple[int, int, int]:
    """``(params, MACs, input size)`` of a registered preset, without real compute."""
    with torch.device("meta"):
        model = create_model(name).eval()
        size = model.spec.input_size
        x = torch.empty(1, 3, size, size)
    params = sum(p.numel() for p in model.parameters())
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return params, counter.get_total_flops() // 2, size


def main() -> None:
    """Prints the markdown table."""
    print(
        "| model | input | params (M) | MACs (G) | 2xMACs (G) | paper params (M) "
        "| paper GFLOPs | params vs paper | source |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for name in list_models(exclude="test_*"):
        params, macs, size = count(name)
        p_params, p_flops, source = PAPER.get(name, (None, None, ""))
        diff = f"{100 * (params / 1e6 - p_params) / p_params:+.1f} %" if p_params else ""
        print(
            f"| {name} | {size} | {params / 1e6:.2f} | {macs / 1e9:.3f} | {2 * macs / 1e9:.2f} | "
            f"{p_params if p_params else ''} | {p_flops if p_flops else ''} | {diff} | {source} |"
        )


if __name__ == "__main__":
    main()
