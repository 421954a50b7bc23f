"""MnasNet (Tan et al., *MnasNet: Platform-Aware Neural Architecture Search for Mobile*,
arXiv:1807.11626) and its attention-augmented variant (Bello et al., arXiv:1904.09925).

Named specs registered here:

- ``mnasnet_b1_{050,075,100,130}``: torchvision's ``mnasnet0_5 .. mnasnet1_3`` (the B1 search
  result), layer for layer, so torchvision checkpoints load (``aanas.models.from_torchvision``).
- ``mnasnet_a1_{050,075,100,140}``: MnasNet-A1 (paper Fig. 7; timm ``_gen_mnasnet_a1``).
- ``aa_mnasnet_a1_{050,075,100,140}``: a light MnasNet-A1 with attention on the 1x1
  projection (``mode="projection"``, ``aanas.block_types``) of its last 7 blocks (14x14 and
  7x7 maps at 224x224 input), kappa = 2 upsilon = 0.1, Nh = 4: +4.7 % parameters and +5.2 %
  MACs at width 1.0. The AA paper reports an attention-augmented MnasNet (Sec. 4.3, Table 3:
  about 3.9M -> 4.1M parameters, "the last 13 blocks") but not which convolution of a block
  is augmented; this placement is **our choice, calibrated to the paper's stated budget**
  (``benchmarks/aa_placement_table.py``: at most +6 % parameters and +8 % MACs at every
  width), not the paper's verified placement.
- ``test_aa_mnasnet``: a tiny 32x32 arch for fast test sweeps (timm's ``test_efficientnet``).
"""

from __future__ import annotations

import dataclasses
import functools

from torch import Tensor, nn

from aanas.models._builder import ClassifierModel, act_layer, build_blocks, build_stem, init_weights
from aanas.models._registry import register_arch
from aanas.ops.blocks import ConvBnAct
from aanas.spec import AASpec, ArchSpec, BlockSpec, StemSpec, resolve

__all__ = ["LIGHT_AA", "LIGHT_AA_TAIL_BLOCKS", "MnasNet", "augment_tail"]

# torchvision/models/mnasnet.py: "Paper suggests 0.9997 momentum, for TensorFlow. Equivalent
# PyTorch momentum is 1.0 - tensorflow." Needed for running-stat parity with torchvision.
_BN_MOMENTUM = 1 - 0.9997

# Widths registered for each MnasNet variant: name suffix -> multiplier. B1 follows torchvision
# (mnasnet0_5/0_75/1_0/1_3), A1 follows timm/the paper (mnasnet_050 .. mnasnet_140).
_B1_WIDTHS = {"050": 0.5, "075": 0.75, "100": 1.0, "130": 1.3}
_A1_WIDTHS = {"050": 0.5, "075": 0.75, "100": 1.0, "140": 1.4}


class MnasNet(ClassifierModel):
    """MnasNet family model: stem, stages of ds/ir blocks, 1x1 head conv, classifier.

    Keys: ``stem.{conv,bn}``, ``blocks.<stage>.<i>.*``, ``head.{conv,bn}``, ``classifier``.
    """

    _version = 1
    _classifier_name = "classifier"

    def __init__(self, spec: ArchSpec) -> None:
        """Builds the model from ``spec`` (family ``"mnasnet"``).

        Raises:
            ValueError: for another family or an invalid spec.
        """
        if spec.family != "mnasnet":
            raise ValueError(f"MnasNet needs family 'mnasnet', got {spec.family!r}")
        resolved = resolve(spec)
        super().__init__(spec, resolved.features)
        norm = functools.partial(nn.BatchNorm2d, momentum=_BN_MOMENTUM)
        self.stem = build_stem(resolved, norm_layer=norm)
        self.blocks = build_blocks(resolved, norm_layer=norm)
        last = resolved.blocks[-1].out_channels
        self.head: nn.Module = nn.Identity()
        if resolved.head_channels > 0:
            # The head conv is not width-scaled (torchvision: 1280 at every alpha) and uses the
            # network's activation, which the spec carries on the stem.
            self.head = ConvBnAct(
                last, resolved.head_channels, 1, norm_layer=norm, act_layer=act_layer(spec.stem.act)
            )
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_features, H/32, W/32)``."""
        return self.head(self.blocks(self.stem(x)))


def _ir(c: int, r: int, k: int, s: int, e: float, se: float = 0.0) -> BlockSpec:
    """An inverted-residual BlockSpec (timm ``ir_r<r>_k<k>_s<s>_e<e>_c<c>[_se<se>]``)."""
    return BlockSpec("ir", c, repeats=r, kernel=k, stride=s, expansion=float(e), se=se)


_DS16 = BlockSpec("ds", 16, kernel=3, stride=1, skip=False)  # ds_r1_k3_s1_c16_noskip

# torchvision/models/mnasnet.py, MNASNet.__init__ with _get_depths(1.0) =
# [32, 16, 24, 40, 80, 96, 192, 320]: stem conv3x3/2 (32), depthwise-separable 32 -> 16 with no
# skip, then _stack(out, kernel, stride, expansion, repeats) x 6, head 1280, dropout 0.2.
# torchvision's _get_depths rounds the stem (depths[0]) and the ds output with the same
# _round_to_multiple_of as all other widths, which is spec.round_channels; the ds block's
# depthwise width is the stem width in both.
MNASNET_B1 = ArchSpec(
    family="mnasnet",
    stem=StemSpec("conv", 32, kernel=3, stride=2),
    stages=(
        (_DS16,),
        (_ir(24, 3, 3, 2, 3),),
        (_ir(40, 3, 5, 2, 3),),
        (_ir(80, 3, 5, 2, 6),),
        (_ir(96, 2, 3, 1, 6),),
        (_ir(192, 4, 5, 2, 6),),
        (_ir(320, 1, 3, 1, 6),),
    ),
    head_channels=1280,
    dropout=0.2,
)

# MnasNet-A1, Tan et al. 2019 Fig. 7(a), as timm's _gen_mnasnet_a1 arch_def: SE ratio 0.25 of
# the block input channels (timm se_from_exp=False; spec.resolve computes it that way).
MNASNET_A1 = ArchSpec(
    family="mnasnet",
    stem=StemSpec("conv", 32, kernel=3, stride=2),
    stages=(
        (_DS16,),
        (_ir(24, 2, 3, 2, 6),),
        (_ir(40, 3, 5, 2, 3, se=0.25),),
        (_ir(80, 4, 3, 2, 6),),
        (_ir(112, 2, 3, 1, 6, se=0.25),),
        (_ir(160, 3, 5, 2, 6, se=0.25),),
        (_ir(320, 1, 3, 1, 6),),
    ),
    head_channels=1280,
    dropout=0.2,
)

# Our default AA placement (see module docstring), chosen by benchmarks/aa_placement_table.py:
# the ratios as we read the paper, "kappa = 2 upsilon = 0.1, Nh = 4" (kappa = dk/Fout = 0.1,
# upsilon = dv/Fout = 0.05), relative logits, on the 1x1 projection (Fout = block output) of
# the longest tail of blocks that keeps every width within +6 % params / +8 % MACs of
# MnasNet-A1: 7 blocks (the last c80 block, c112 x2, c160 x3, c320; 14x14 and 7x7 maps). The
# old placement (depthwise stage of the last 10 blocks) cost +30 % params / +42 % MACs.
LIGHT_AA = AASpec(kappa=0.1, upsilon=0.05, heads=4, relative=True, mode="projection")
LIGHT_AA_TAIL_BLOCKS = 7


def augment_tail(spec: ArchSpec, blocks: int, aa: AASpec) -> ArchSpec:
    """Copy of ``spec`` with ``aa`` on its last ``blocks`` blocks (repeats counted).

    A run that the tail starts inside is split, the augmented part keeping stride 1: MnasNet-A1
    with ``blocks=8`` augments the last 2 of the 3 c160 blocks as ``r1_s2`` + ``r2_s1_aa...``.

    Raises:
        ValueError: if ``blocks`` is not in ``0 .. number of blocks``.
    """
    total = sum(b.repeats for _, b in spec.blocks())
    if not 0 <= blocks <= total:
        raise ValueError(f"blocks must be in 0..{total}, got {blocks}")
    start, index = total - blocks, 0  # index of the first augmented block
    stages = []
    for stage in spec.stages:
        runs: list[BlockSpec] = []
        for b in stage:
            plain = min(max(start - index, 0), b.repeats)
            if plain:
                runs.append(dataclasses.replace(b, repeats=plain))
            if b.repeats - plain:
                stride = b.stride if plain == 0 else 1
                runs.append(dataclasses.replace(b, repeats=b.repeats - plain, stride=stride, aa=aa))
            index += b.repeats
        stages.append(tuple(runs))
    return dataclasses.replace(spec, stages=tuple(stages)).validate()


AA_MNASNET_A1 = augment_tail(MNASNET_A1, LIGHT_AA_TAIL_BLOCKS, LIGHT_AA)

# Tiny test arch (timm's test_efficientnet idea): 3 stages of 16-32 channels at 32x32, with
# attention (2 heads) on the last stage's 4x4 maps, so list_models() sweeps stay fast.
TEST_AA_MNASNET = ArchSpec(
    family="mnasnet",
    stem=StemSpec("conv", 16, kernel=3, stride=2),
    stages=(
        (BlockSpec("ds", 16, kernel=3, stride=1),),
        (_ir(24, 1, 3, 2, 3, se=0.25),),
        (
            BlockSpec(
                "ir",
                32,
                repeats=2,
                kernel=3,
                stride=2,
                expansion=3.0,
                act="swish",
                aa=AASpec(kappa=0.25, upsilon=0.25, heads=2),
            ),
        ),
    ),
    head_channels=64,
    num_classes=10,
    input_size=32,
    dropout=0.0,
)

for _tag, _w in _B1_WIDTHS.items():
    register_arch(f"mnasnet_b1_{_tag}", MNASNET_B1.scale(width=_w))
for _tag, _w in _A1_WIDTHS.items():
    register_arch(f"mnasnet_a1_{_tag}", MNASNET_A1.scale(width=_w))
    register_arch(f"aa_mnasnet_a1_{_tag}", AA_MNASNET_A1.scale(width=_w))
register_arch("test_aa_mnasnet", TEST_AA_MNASNET)
