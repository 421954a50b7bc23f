"""Shared fixtures: a ``tiny`` spec (timm's test-arch idea: 3 stages, 16-32 channels, 32x32)."""

from __future__ import annotations

import pytest

from aanas.spec import AASpec, ArchSpec, BlockSpec, StemSpec


@pytest.fixture
def tiny() -> ArchSpec:
    """MnasNet-family spec with attention (2 heads) on the last stage's 4x4 maps."""
    return ArchSpec(
        family="mnasnet",
        stem=StemSpec("conv", 16, kernel=3, stride=2),
        stages=(
            (BlockSpec("ds", 16, kernel=3, stride=1),),
            (BlockSpec("ir", 24, kernel=3, stride=2, expansion=3.0, se=0.25),),
            (
                BlockSpec(
                    "ir",
                    32,
                    repeats=2,
                    kernel=3,
                    stride=2,
                    expansion=3.0,
                    aa=AASpec(kappa=0.25, upsilon=0.25, heads=2),
                ),
            ),
        ),
        head_channels=64,
        num_classes=10,
        input_size=32,
    ).validate()
