"""Torch building blocks; they take plain ints, never a spec."""

from __future__ import annotations

from aanas.ops.attention import (
    AAConv2d,
    aa_channels,
    attention_input,
    central_rel_rows,
    rel_embedding_matrix,
    relative_attention,
)

__all__ = [
    "AAConv2d",
    "aa_channels",
    "attention_input",
    "central_rel_rows",
    "rel_embedding_matrix",
    "relative_attention",
]

from aanas.ops.blocks import (  # noqa: E402
    BasicBlock,
    Bottleneck,
    ConvBnAct,
    DepthwiseSeparable,
    InvertedResidual,
    PreActBasicBlock,
    SqueezeExcite,
)

__all__ += [
    "BasicBlock",
    "Bottleneck",
    "ConvBnAct",
    "DepthwiseSeparable",
    "InvertedResidual",
    "PreActBasicBlock",
    "SqueezeExcite",
]
