"""CIFAR Wide-ResNet (Zagoruyko & Komodakis, *Wide Residual Networks*, arXiv:1605.07146) and
the attention-augmented WRN of Bello et al. (arXiv:1904.09925, Sec. 4.1, CIFAR-100).

Named specs registered here:

- ``wrn28_10``: depth 28 = 6 * 4 + 4, widen factor 10: a plain 3x3 conv (16 channels), three
  groups of four pre-activation blocks (160, 320, 640 channels; strides 1, 2, 2), final
  BN-ReLU, 100 classes at 32x32. 36.5M parameters (WRN paper Table 1 / AA paper Table 1).
- ``aa_wrn28_10``: attention on the first 3x3 conv of every residual block, Nh = 8, kappa =
  2 upsilon = 0.2, at least 20 key dimensions per head (the paper's CIFAR-100 setup).
"""

from __future__ import annotations

import dataclasses

from torch import Tensor, nn

from aanas.models._builder import (
    ClassifierModel,
    act_layer,
    build_blocks,
    build_stem,
    init_weights,
)
from aanas.models._registry import register_arch
from aanas.spec import AASpec, ArchSpec, BlockSpec, StemSpec, resolve

__all__ = ["WideResNet"]


class WideResNet(ClassifierModel):
    """Pre-activation Wide-ResNet: plain conv stem, preact stages, final BN-act, fc.

    Keys: ``stem.conv``, ``blocks.<stage>.<i>.*``, ``bn``, ``fc``.
    """

    _version = 1
    _classifier_name = "fc"

    def __init__(self, spec: ArchSpec) -> None:
        """Builds the model from ``spec`` (family ``"wrn"``; PyTorch-default BatchNorm).

        Raises:
            ValueError: for another family or an invalid spec.
        """
        if spec.family != "wrn":
            raise ValueError(f"WideResNet needs family 'wrn', got {spec.family!r}")
        resolved = resolve(spec)
        super().__init__(spec, resolved.features)
        if resolved.head_channels:
            raise ValueError(f"WideResNet has no head conv; got head_channels={spec.head_channels}")
        self.stem = build_stem(resolved)
        self.blocks = build_blocks(resolved)
        # Pre-activation blocks end on a conv: the final BN-act normalises the last block.
        self.bn = nn.BatchNorm2d(resolved.features)
        self.act = act_layer(resolved.blocks[-1].act)()
        init_weights(self)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` -> ``(B, num_features, H/4, W/4)``."""
        return self.act(self.bn(self.blocks(self.stem(x))))


def _wrn(depth: int, widen: int) -> ArchSpec:
    """WRN-depth-widen for CIFAR-100: ``(depth - 4) / 6`` blocks per group."""
    n = (depth - 4) // 6
    return ArchSpec(
        family="wrn",
        stem=StemSpec("plain", 16, kernel=3, stride=1),
        stages=tuple(
            (BlockSpec("preact", 16 * widen * 2**i, repeats=n, kernel=3, stride=s),)
            for i, s in enumerate((1, 2, 2))
        ),
        num_classes=100,
        input_size=32,
    )


# Bello et al. 2019, Sec. 4.1 (CIFAR-100): Nh = 8, kappa = 2 upsilon = 0.2, "a minimum of 20
# dimensions per head for the keys".
_WRN_AA = AASpec(kappa=0.2, upsilon=0.1, heads=8, relative=True, min_key_depth=20)

WRN28_10 = _wrn(28, 10)
AA_WRN28_10 = dataclasses.replace(
    WRN28_10,
    stages=tuple(tuple(dataclasses.replace(b, aa=_WRN_AA) for b in st) for st in WRN28_10.stages),
)

register_arch("wrn28_10", WRN28_10)
register_arch("aa_wrn28_10", AA_WRN28_10)
