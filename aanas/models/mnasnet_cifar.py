"""MnasNet-A1/B1 (Tan et al., arXiv:1807.11626) and attention-augmented variants (Bello et al.,
arXiv:1904.09925) sized for 32x32 inputs, as CIFAR practice does.

At 32x32 the ImageNet networks downsample 32x to 1x1 maps: attention there has one position
(its softmax is identically 1) and the comparison measures capacity, not attention. The CIFAR
variants keep every block, channel, kernel, expansion and SE ratio of the ImageNet spec and take
the stride out of the first two inverted-residual stages (c24, c40), so the total stride is 8
and the last maps are 4x4:

=========  ==================================  ===========================================
maps       A1                                  B1
=========  ==================================  ===========================================
16x16      stem c32 (stride 2), ds c16,        stem c32 (stride 2), ds c16, c24 x3, c40 x3
           c24 x2, c40 x3
8x8        c80 x4, c112 x2                     c80 x3, c96 x2
4x4        c160 x3, c320                       c192 x4, c320
=========  ==================================  ===========================================

Why the stem keeps its stride (the kuangliu-style MobileNetV2-on-CIFAR alternative removes it
and one later stride instead): same parameters, but the expanded 32x32 tensors of the early
stages made a training step 1.35x slower on a shared 2-core CPU (width 0.5, batch 64, one
thread, 2342 vs 1745 ms/step, interleaved in one run under load ~12), and the CPU recipes have a
10-minute budget. The plain CNN of
``benchmarks/cifar_baseline.py`` likewise leaves 32x32 after two convolutions.

Named specs registered here (``num_classes=10``, ``input_size=32``):

- ``mnasnet_a1_cifar_{050,075,100}`` and ``mnasnet_b1_cifar_{050,075,100}``.
- ``aa_mnasnet_a1_cifar_*`` / ``aa_mnasnet_b1_cifar_*``: the light placement of the ImageNet
  preset (``aanas.models.mnasnet``): attention on the 1x1 projection (``mode="projection"``)
  of the last 7 blocks, kappa = 2 upsilon = 0.1, Nh = 4, relative logits. At 32x32 those blocks
  see 8x8 and 4x4 maps, never smaller (A1: 3 blocks on 8x8, 4 on 4x4; B1: 2 and 5). Cost over
  the plain net of the same width (``aanas.cost.count_spec``; ``tests/test_models.py`` checks
  the bounds): A1 +5.3 / +6.3 / +6.9 % parameters and +4.6 / +5.5 / +6.1 % MACs at widths
  0.5 / 0.75 / 1.0 (0.81M / 1.64M / 2.62M parameters and 24.6M / 51.9M / 79.2M MACs plain);
  B1 +5.8 / +8.0 / +8.1 % parameters and +4.5 / +6.0 / +6.0 % MACs. The parameter share is
  above the ImageNet preset's (+4.7 %) because the 10-class classifier is 100x smaller than
  ImageNet's, and dk, dv are rounded up to multiples of Nh, which weighs more at narrow widths.
"""

from __future__ import annotations

import dataclasses

from aanas.models._registry import register_arch
from aanas.models.mnasnet import (
    LIGHT_AA,
    LIGHT_AA_TAIL_BLOCKS,
    MNASNET_A1,
    MNASNET_B1,
    augment_tail,
)
from aanas.spec import ArchSpec

__all__ = ["CIFAR_WIDTHS", "cifar_sized"]

# Name suffix -> width multiplier of the registered CIFAR variants.
CIFAR_WIDTHS = {"050": 0.5, "075": 0.75, "100": 1.0}
_CIFAR_INPUT = 32
_CIFAR_CLASSES = 10
# Stage indices of MnasNet's first two inverted-residual stages (c24, c40): after ds c16.
_UNSTRIDED_STAGES = (1, 2)


def cifar_sized(spec: ArchSpec) -> ArchSpec:
    """``spec`` (an ImageNet MnasNet) with stride 1 in its c24 and c40 stages, for 32x32.

    Example: MnasNet-A1 strides 2 (stem), 2, 2, 2, 2 (total 32; 32x32 -> 1x1) become 2, 1, 1,
    2, 2 (total 8; 32x32 -> 4x4). Input size 32 and 10 classes; everything else is kept.
    """
    stages = list(spec.stages)
    for i in _UNSTRIDED_STAGES:
        stages[i] = (dataclasses.replace(stages[i][0], stride=1), *stages[i][1:])
    return dataclasses.replace(
        spec, stages=tuple(stages), input_size=_CIFAR_INPUT, num_classes=_CIFAR_CLASSES
    ).validate()


MNASNET_A1_CIFAR = cifar_sized(MNASNET_A1)
MNASNET_B1_CIFAR = cifar_sized(MNASNET_B1)
AA_MNASNET_A1_CIFAR = augment_tail(MNASNET_A1_CIFAR, LIGHT_AA_TAIL_BLOCKS, LIGHT_AA)
AA_MNASNET_B1_CIFAR = augment_tail(MNASNET_B1_CIFAR, LIGHT_AA_TAIL_BLOCKS, LIGHT_AA)

for _tag, _w in CIFAR_WIDTHS.items():
    register_arch(f"mnasnet_a1_cifar_{_tag}", MNASNET_A1_CIFAR.scale(width=_w))
    register_arch(f"aa_mnasnet_a1_cifar_{_tag}", AA_MNASNET_A1_CIFAR.scale(width=_w))
    register_arch(f"mnasnet_b1_cifar_{_tag}", MNASNET_B1_CIFAR.scale(width=_w))
    register_arch(f"aa_mnasnet_b1_cifar_{_tag}", AA_MNASNET_B1_CIFAR.scale(width=_w))
