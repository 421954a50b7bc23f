"""MnasNet-A1/B1 (Tan et al., arXiv:1807.11626) and attention-augmented variants (Bello et al.,
arXiv:1904.09925) sized for 32x32 inputs, as CIFAR practice does.

At 32x32 the ImageNet networks downsample 32x to 1x1 maps: attention there has one position
(its softmax is identically 1) and the comparison measures capacity, not attention. The CIFAR
variants keep every block, channel, kernel, expansion and SE ratio of the ImageNet spec and,
like the common MobileNetV2-on-CIFAR adaptation (stride 1 in the first conv and in the c24
stage), take the stride out of the stem and of the c24 stage, so the total stride is 8 and the
last maps are 4x4:

=========  ==================================  ===========================================
maps       A1                                  B1
=========  ==================================  ===========================================
32x32      stem c32, ds c16, c24 x2            stem c32, ds c16, c24 x3
16x16      c40 x3                              c40 x3
8x8        c80 x4, c112 x2                     c80 x3, c96 x2
4x4        c160 x3, c320                       c192 x4, c320
=========  ==================================  ===========================================

Why the stem loses its stride (a first version kept it and unstrided c24 and c40 instead: maps
16x16 / 8x8 / 4x4, 24.6M MACs at width 0.5): on the CIFAR-10 subset with the same recipe that
version reached 46.75 % test top-1 in 8 epochs, this one 60.1 % (one seed each, December 2).
At 16x16 the first layers see a quarter of the pixels and the 8-channel ds output of the
width-0.5 net is a bottleneck. It costs 30.0M MACs at width 0.5 (the plain CNN baseline of
``benchmarks/cifar_baseline.py``: 31.6M) and a 1.3x slower CPU step. Dropout is 0: runs on
2 CPU cores are short and underfit (train top-1 below validation top-1 at the end), where
dropout only slows learning.

Named specs registered here (``num_classes=10``, ``input_size=32``):

- ``mnasnet_a1_cifar_{050,075,100}`` and ``mnasnet_b1_cifar_{050,075,100}``.
- ``aa_mnasnet_a1_cifar_*`` / ``aa_mnasnet_b1_cifar_*``: the light placement of the ImageNet
  preset (``aanas.models.mnasnet``): attention on the 1x1 projection (``mode="projection"``)
  of the last 7 blocks, kappa = 2 upsilon = 0.1, Nh = 4, relative logits. At 32x32 those blocks
  see 8x8 and 4x4 maps, never smaller (A1: 3 blocks on 8x8, 4 on 4x4; B1: 2 and 5). The cost
  over the plain net of the same width is checked by ``tests/test_models.py`` and listed in
  README ("CIFAR-sized models").
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
# Stage index of MnasNet's first inverted-residual stage (c24), after ds c16.
_UNSTRIDED_STAGE = 1


def cifar_sized(spec: ArchSpec) -> ArchSpec:
    """``spec`` (an ImageNet MnasNet) with stride 1 in its stem and c24 stage, for 32x32.

    Example: MnasNet-A1 strides 2 (stem), 2 (c24), 2, 2, 2 (total 32; 32x32 -> 1x1) become 1,
    1, 2, 2, 2 (total 8; 32x32 -> 4x4). Input size 32, 10 classes, no dropout; everything else
    is kept.
    """
    stages = list(spec.stages)
    first = stages[_UNSTRIDED_STAGE]
    stages[_UNSTRIDED_STAGE] = (dataclasses.replace(first[0], stride=1), *first[1:])
    return dataclasses.replace(
        spec,
        stem=dataclasses.replace(spec.stem, stride=1),
        stages=tuple(stages),
        input_size=_CIFAR_INPUT,
        num_classes=_CIFAR_CLASSES,
        dropout=0.0,
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
