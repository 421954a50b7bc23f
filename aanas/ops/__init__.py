"""Torch building blocks; they take plain ints and layer types, never a spec."""

from __future__ import annotations

from aanas.ops.attention import (
    AAConv2d,
    aa_channels,
    attention_input,
    central_rel_rows,
    rel_embedding_matrix,
    relative_attention,
)
from aanas.ops.blocks import (
    BasicBlock,
    Bottleneck,
    ConvBnAct,
    DepthwiseSeparable,
    InvertedResidual,
    PreActBasicBlock,
    SqueezeExcite,
)

__all__ = [
    "AAConv2d",
    "BasicBlock",
    "Bottleneck",
    "ConvBnAct",
    "DepthwiseSeparable",
    "InvertedResidual",
    "PreActBasicBlock",
    "SqueezeExcite",
    "aa_channels",
    "attention_input",
    "central_rel_rows",
    "rel_embedding_matrix",
    "relative_attention",
]
