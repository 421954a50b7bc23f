"""MnasNet (Tan et al., *MnasNet: Platform-Aware Neural Architecture Search for Mobile*,
arXiv:1807.11626) and its attention-augmented variant (Bello et al., arXiv:1904.09925).

Named specs registered here:

- ``mnasnet_b1_{050,075,100,130}``: torchvision's ``mnasnet0_5 .. mnasnet1_3`` (the B1 search
  result), layer for layer, so torchvision checkpoints load (``aanas.models.from_torchvision``).
- ``mnasnet_a1_{050,075,100,140}``: MnasNet-A1 (paper Fig. 7; timm ``_gen_mnasnet_a1``).
- ``aa_mnasnet_a1_{050,075,100,140}``: MnasNet-A1 with attention on the depthwise stage of
  every block whose output map is 14x14 or smaller at 224x224 input. The AA paper reports an
  attention-augmented MnasNet (Sec. 4.3, Table 3) but does not say where its blocks are
  augmented; this placement is **our documented default**, not the paper's.
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

__all__ = ["MnasNet"]

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

# Our default AA placement (see module docstring): "kappa = 2 upsilon = 0.1, Nh = 4", i.e.
# kappa = dk/Fout = 0.1, upsilon = dv/Fout = 0.05, 4 heads, relative logits, on the depthwise
# stage of stages c80, c112, c160, c320 (output maps 14x14 and 7x7 at 224x224 input).
_MNASNET_AA = AASpec(kappa=0.1, upsilon=0.05, heads=4, relative=True)
_AA_STAGES = (3, 4, 5, 6)


def _with_aa(spec: ArchSpec, stages: tuple[int, ...], aa: AASpec) -> ArchSpec:
    """Copy of ``spec`` with ``aa`` on every block of the given stage indices."""
    return dataclasses.replace(
        spec,
        stages=tuple(
            tuple(dataclasses.replace(b, aa=aa) for b in stage) if i in stages else stage
            for i, stage in enumerate(spec.stages)
        ),
    )


AA_MNASNET_A1 = _with_aa(MNASNET_A1, _AA_STAGES, _MNASNET_AA)

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
