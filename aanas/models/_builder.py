"""The one translation from a resolved spec (``aanas.spec.resolve``) to torch modules.

Family files (``mnasnet.py``, ``resnet.py``, ``wrn.py``) only arrange stem, stages and head;
all per-block channel, stride, SE and attention integers come from :class:`ResolvedArch`, so
the builder, the cost model and the supernet cannot disagree about the network.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from torch import Tensor, nn

from aanas.block_types import BLOCK_TYPES, block_type
from aanas.ops.attention import AAConv2d
from aanas.ops.blocks import (
    ACTIVATION_LAYERS,
    BasicBlock,
    Bottleneck,
    ConvBnAct,
    DepthwiseSeparable,
    InvertedResidual,
    PreActBasicBlock,
)
from aanas.spec import ACTIVATIONS, ArchSpec, ResolvedArch, ResolvedBlock

__all__ = [
    "STATIC_BUILDERS",
    "ClassifierModel",
    "act_layer",
    "build_block",
    "build_blocks",
    "build_stem",
    "init_weights",
    "zero_init_residual",
]

NormFn = Callable[[int], nn.Module]
StaticBuilder = Callable[[ResolvedBlock, NormFn], nn.Module]

assert set(ACTIVATION_LAYERS) == set(ACTIVATIONS)


def act_layer(name: str) -> Callable[[], nn.Module]:
    """Activation factory for a spec activation name (``"relu"``, ``"swish"``, ...), in place.

    Raises:
        ValueError: for an unknown name.
    """
    if name not in ACTIVATION_LAYERS:
        raise ValueError(f"unknown activation {name!r}; expected one of {ACTIVATIONS}")
    return functools.partial(ACTIVATION_LAYERS[name][0], inplace=True)


def build_stem(resolved: ResolvedArch, *, norm_layer: NormFn = nn.BatchNorm2d) -> ConvBnAct:
    """The stem as a ``ConvBnAct`` (keys ``stem.conv``, ``stem.bn``).

    ``conv``: conv-BN-act (MnasNet); ``resnet``: conv-BN-act + 3x3/2 max-pool (torchvision
    ResNet); ``plain``: the conv alone (Wide-ResNet, whose first block pre-activates it).
    """
    stem = resolved.spec.stem
    plain = stem.type == "plain"
    module = ConvBnAct(
        3,
        resolved.stem_channels,
        stem.kernel,
        stem.stride,
        norm_layer=None if plain else norm_layer,
        act_layer=None if plain else act_layer(stem.act),
    )
    if stem.type == "resnet":
        module.add_module("pool", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))
    return module


def _aa_kwargs(rb: ResolvedBlock, norm_layer: NormFn) -> dict[str, Any]:
    """The keyword arguments every block constructor shares, from the block's record.

    ``max_size`` is the input side of the augmented conv (``ConvSite.in_size``), the largest
    input ``AAConv2d.forward`` accepts; with stride 2 the attention runs on the pooled
    ``out_size`` map, so the tables of a strided layer carry ``2 * (in_size - out_size)`` rows
    per axis that an ``input_size`` forward never reads.
    """
    kwargs: dict[str, Any] = {
        "dk": rb.dk,
        "dv": rb.dv,
        "num_heads": max(rb.heads, 1),
        "relative": rb.relative,
        "norm_layer": norm_layer,
        "act_layer": act_layer(rb.act),
        "residual": rb.residual,
    }
    if rb.dv:
        site = block_type(rb.type).site(rb, rb.aa_mode)
        kwargs["max_size"] = (site.in_size, site.in_size)
        kwargs["attention_at"] = rb.aa_mode
    return kwargs


def _build_ir(rb: ResolvedBlock, norm_layer: NormFn) -> nn.Module:
    return InvertedResidual(
        rb.in_channels,
        rb.out_channels,
        rb.mid_channels,
        rb.kernel,
        rb.stride,
        se_channels=rb.se_channels,
        **_aa_kwargs(rb, norm_layer),
    )


def _build_ds(rb: ResolvedBlock, norm_layer: NormFn) -> nn.Module:
    return DepthwiseSeparable(
        rb.in_channels,
        rb.out_channels,
        rb.kernel,
        rb.stride,
        se_channels=rb.se_channels,
        **_aa_kwargs(rb, norm_layer),
    )


def _build_bottle(rb: ResolvedBlock, norm_layer: NormFn) -> nn.Module:
    return Bottleneck(
        rb.in_channels,
        rb.out_channels,
        rb.mid_channels,
        rb.stride,
        rb.kernel,
        **_aa_kwargs(rb, norm_layer),
    )


def _build_basic(rb: ResolvedBlock, norm_layer: NormFn) -> nn.Module:
    return BasicBlock(
        rb.in_channels, rb.out_channels, rb.stride, rb.kernel, **_aa_kwargs(rb, norm_layer)
    )


def _build_preact(rb: ResolvedBlock, norm_layer: NormFn) -> nn.Module:
    return PreActBasicBlock(
        rb.in_channels, rb.out_channels, rb.stride, rb.kernel, **_aa_kwargs(rb, norm_layer)
    )


# The static constructor of every block type, keyed like aanas.block_types.BLOCK_TYPES (the
# torch half of each record; tests/test_block_types.py sweeps both).
STATIC_BUILDERS: Mapping[str, StaticBuilder] = MappingProxyType(
    {
        "ds": _build_ds,
        "ir": _build_ir,
        "basic": _build_basic,
        "bottle": _build_bottle,
        "preact": _build_preact,
    }
)
assert set(STATIC_BUILDERS) == set(BLOCK_TYPES)


def build_block(rb: ResolvedBlock, norm_layer: NormFn) -> nn.Module:
    """One ResolvedBlock -> its module (see ``aanas.ops.blocks``)."""
    return STATIC_BUILDERS[rb.type](rb, norm_layer)


def build_blocks(resolved: ResolvedArch, *, norm_layer: NormFn = nn.BatchNorm2d) -> nn.Sequential:
    """All blocks, nested as ``blocks[stage][index within stage]`` (keys ``blocks.2.1.conv1``).

    A stage's index runs over all repeats of all its BlockSpecs in order, as in timm.

    Args:
        resolved: ``aanas.spec.resolve(spec)``.
        norm_layer: normalisation factory (MnasNet passes torchvision's BN momentum).

    Returns:
        ``nn.Sequential`` of per-stage ``nn.Sequential``.
    """
    stages: list[list[nn.Module]] = [[] for _ in resolved.spec.stages]
    for stage, _, rb in resolved.staged():
        stages[stage].append(build_block(rb, norm_layer))
    return nn.Sequential(*(nn.Sequential(*blocks) for blocks in stages))


def init_weights(model: nn.Module) -> None:
    """torchvision's initialisation: Kaiming-normal (fan_out) convs, BN 1/0, zero biases.

    AAConv2d's relative tables keep their own N(0, dkh^-0.5) initialisation.
    """
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)
        elif isinstance(m, AAConv2d):
            m.reset_rel_parameters()


# The BatchNorm that closes each residual branch (PreActBasicBlock's branch ends in a conv).
_LAST_BN: dict[type[nn.Module], str] = {
    InvertedResidual: "bn3",
    DepthwiseSeparable: "bn2",
    BasicBlock: "bn2",
    Bottleneck: "bn3",
}


def zero_init_residual(model: nn.Module) -> int:
    """Zero the scale of the BatchNorm closing every residual branch; returns how many.

    Each residual block then starts as the identity, so a deep network begins shallow and its
    first SGD steps are not spent taming the sum of many random branches (Goyal et al. 2017,
    "Accurate, Large Minibatch SGD", section 5.1; torchvision's ``zero_init_residual``). Blocks
    without a skip connection keep their initialisation: zeroing them would cut the signal.
    """
    count = 0
    for module in model.modules():
        name = _LAST_BN.get(type(module))
        if name is not None and module.residual:
            nn.init.zeros_(getattr(module, name).weight)
            count += 1
    return count


class ClassifierModel(nn.Module):
    """Shared timm-style classifier contract of the family models.

    Subclasses build ``stem``/``blocks``/head layers and implement ``forward_features``; this
    base owns global pooling, dropout and the linear classifier, stored under
    ``_classifier_name`` (``fc`` for ResNets as in torchvision, ``classifier`` for MnasNet).

    Attributes:
        spec: the ArchSpec the model was built from (``num_classes`` follows
            :meth:`reset_classifier`).
        num_classes: classifier outputs; 0 after ``reset_classifier(0)``.
        num_features: channels entering the classifier.
    """

    _classifier_name = "classifier"

    def __init__(self, spec: ArchSpec, num_features: int) -> None:
        """Stores the spec and builds dropout + classifier; call before building the body."""
        super().__init__()
        self.spec = spec
        self.num_classes = spec.num_classes
        self.num_features = num_features
        self.drop = nn.Dropout(spec.dropout)
        setattr(self, self._classifier_name, nn.Linear(num_features, spec.num_classes))

    def get_classifier(self) -> nn.Module:
        """The final linear layer (Identity after ``reset_classifier(0)``)."""
        module: nn.Module = getattr(self, self._classifier_name)
        return module

    def reset_classifier(self, num_classes: int) -> None:
        """Replaces the classifier with a fresh one of ``num_classes`` outputs (0: Identity).

        ``spec.num_classes`` is updated too, except for 0, which no spec can describe.

        Raises:
            ValueError: if ``num_classes`` is negative.
        """
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be an integer >= 0, got {num_classes!r}")
        self.num_classes = num_classes
        head: nn.Module = nn.Identity()
        if num_classes > 0:
            head = nn.Linear(self.num_features, num_classes)
            nn.init.normal_(head.weight, 0.0, 0.01)
            nn.init.zeros_(head.bias)
            self.spec = dataclasses.replace(self.spec, num_classes=num_classes)
        setattr(self, self._classifier_name, head)

    def forward_features(self, x: Tensor) -> Tensor:
        """``(B, 3, H, W)`` images -> ``(B, num_features, h, w)`` unpooled features."""
        raise NotImplementedError

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Global average pool, dropout and classifier; ``pre_logits`` stops before the latter.

        Returns:
            ``(B, num_features)`` with ``pre_logits``, else ``(B, num_classes)``.
        """
        x = x.mean((2, 3))  # (B, C), as torchvision MNASNet (same value as ResNet's avgpool)
        x = self.drop(x)
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: Tensor) -> Tensor:
        """Images -> logits."""
        return self.forward_head(self.forward_features(x))
