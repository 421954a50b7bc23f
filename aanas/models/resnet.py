"""ResNet (He et al., arXiv:1512.03385; torchvision v1.5 layout) and AA-ResNet (Bello et al.,
*Attention Augmented Convolutional Networks*, arXiv:1904.09925).

Named specs registered here:

- ``resnet{18,34,50,101,152}``: torchvision's layouts, parameter counts equal to torchvision's
  exactly, so ``aanas.models.from_torchvision`` converts their checkpoints.
- ``aa_resnet{18,34,50,101,152}``: the paper's ImageNet setup (Sec. 4.2): the 3x3 convolution
  of every residual block in the last three stages augmented with kappa = 2 upsilon = 0.2
  and Nh = 8 relative heads (in basic blocks, the first 3x3 convolution).
- ``test_resnet``: a tiny 32x32 arch for fast test sweeps.
"""

from __future__ import annotations

import dataclasses

from torch import Tensor

from aanas.models._builder import ClassifierModel, build_blocks, build_stem, init_weights
from aanas.models._registry import register_arch
from aanas.spec import AASpec, ArchSpec, BlockSpec, StemSpec, resolve

__all__ = ["ResNet"]


class ResNet(ClassifierModel):
    """ResNet family model: 7x7/2 stem + max-pool, stages of basic/bottleneck blocks, fc.

    Keys: ``stem.{conv,bn}`` (torchvision ``conv1``/``bn1``), ``blocks.<stage>.<i>.*``
    (torchvision ``layer<stage+1>.<i>.*``, same block-internal names) and ``fc``.
    """

    _version = 1
    _classifier_name = "fc"

    def __init__(self, spec: ArchSpec) -> None:
        """Builds the model from ``spec`` (family ``"resnet"``; PyTorch-default BatchNorm).

        Raises:
            ValueError: for another family or an invalid spec.
        """
        if spec.family != "resnet":
            raise ValueError(f"ResNet needs family 'resnet', got {spec.family!r}")
        resolved = resolve(spec)
        super().__init__(spec, resolved.features)
        if resolved.head_channels:
            raise ValueError(f"ResNet has no head conv; got head_channels={spec.head_channels}")
        self.stem = build_stem(resolved)
        self.blocks = build_blocks(resolved)
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_features, H/32, W/32)``."""
        return self.blocks(self.stem(x))


def _stage(block: str, out: int, repeats: int, stride: int) -> tuple[BlockSpec, ...]:
    """One torchvision ``layerN``: basic (e1) or bottleneck (e0.25 = torchvision's 4x)."""
    expansion = 0.25 if block == "bottle" else 1.0
    return (BlockSpec(block, out, repeats=repeats, kernel=3, stride=stride, expansion=expansion),)


def _resnet(block: str, repeats: tuple[int, int, int, int]) -> ArchSpec:
    """torchvision's ``_resnet(block, layers)``: widths 64..512 (x4 for bottlenecks)."""
    widths = (64, 128, 256, 512) if block == "basic" else (256, 512, 1024, 2048)
    strides = (1, 2, 2, 2)
    return ArchSpec(
        family="resnet",
        stem=StemSpec("resnet", 64, kernel=7, stride=2),
        stages=tuple(
            _stage(block, w, r, s) for w, r, s in zip(widths, repeats, strides, strict=True)
        ),
        head_channels=0,
        dropout=0.0,
    )


# torchvision/models/resnet.py: resnet18 = _resnet(BasicBlock, [2, 2, 2, 2]), resnet34
# [3, 4, 6, 3]; resnet50/101/152 = _resnet(Bottleneck, [3, 4, 6, 3] / [3, 4, 23, 3] /
# [3, 8, 36, 3]).
_LAYOUTS: dict[int, tuple[str, tuple[int, int, int, int]]] = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottle", (3, 4, 6, 3)),
    101: ("bottle", (3, 4, 23, 3)),
    152: ("bottle", (3, 8, 36, 3)),
}

# Bello et al. 2019, Sec. 4.2: "kappa = 2 upsilon = 0.2", Nh = 8, relative position logits,
# in the last three stages (the first stage's 56x56 maps are left convolutional).
_RESNET_AA = AASpec(kappa=0.2, upsilon=0.1, heads=8, relative=True)


def _augment(spec: ArchSpec, first_stage: int, aa: AASpec) -> ArchSpec:
    """Copy of ``spec`` with ``aa`` on every block of stages ``first_stage`` onwards."""
    stages = tuple(
        tuple(dataclasses.replace(b, aa=aa) for b in stage) if i >= first_stage else stage
        for i, stage in enumerate(spec.stages)
    )
    return dataclasses.replace(spec, stages=stages)


# Tiny test arch: 3 stages (basic 16, basic 24/2, bottleneck 32/2 with attention on 2x2 maps).
TEST_RESNET = ArchSpec(
    family="resnet",
    stem=StemSpec("resnet", 16, kernel=3, stride=1),
    stages=(
        (BlockSpec("basic", 16, kernel=3, stride=1),),
        (BlockSpec("basic", 24, kernel=3, stride=2),),
        (
            BlockSpec(
                "bottle",
                32,
                repeats=2,
                kernel=3,
                stride=2,
                expansion=0.5,
                aa=AASpec(kappa=0.25, upsilon=0.25, heads=2),
            ),
        ),
    ),
    num_classes=10,
    input_size=32,
)

for _depth, (_block, _repeats) in _LAYOUTS.items():
    _spec = register_arch(f"resnet{_depth}", _resnet(_block, _repeats))
    register_arch(f"aa_resnet{_depth}", _augment(_spec, 1, _RESNET_AA))
register_arch("test_resnet", TEST_RESNET)
