"""Weight-sharing supernet over a :class:`~aanas.space.SearchSpace` (once-for-all style).

One :class:`SuperNet` per space holds, at every block position, the largest version of every
choice the space allows (Cai et al., *Once-for-All*, arXiv:1908.09791; attention from Bello et
al., arXiv:1904.09925). An architecture selects a path through it:

- depth: a stage runs its first ``d`` blocks (trailing blocks are skipped);
- kernel: the centre ``k x k`` of the largest kernel;
- expansion / width: the first channels of every conv and BatchNorm;
- squeeze-excitation: the first ``se`` squeeze channels, or no gate;
- attention: the first ``Nh`` heads and the first ``dk/Nh`` / ``dv/Nh`` dims of each head of a
  shared per-head q/k/v projection, the first ``dv`` outputs of ``W^O``, and the central rows /
  first ``dk/Nh`` columns of the shared relative tables (:class:`~aanas.ops.elastic.
  ElasticAttention`). Layers that read an attention-augmented tensor keep its conv channels and
  its attention channels in separate banks (:func:`~aanas.ops.elastic.split_index`), so an
  attention channel never shares weights or BN statistics with a conv channel.

The spec is always passed explicitly (``supernet(x, spec)``); nothing is "activated".
:meth:`SuperNet.extract` returns the static model ``aanas.create_model(spec)`` builds, loaded
with exactly the sliced tensors the supernet path uses, so both give the same outputs.

Supported block types: ``ir``, ``ds`` (MnasNet), ``bottle``, ``basic`` (ResNet), ``preact``
(Wide-ResNet), each with
every attention mode its record (``aanas.block_types``) allows; the elastic layout of each is
``_LAYOUTS``, keyed like the records.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aanas._io import atomic_open, load_torch_file
from aanas.block_types import BLOCK_TYPES, block_type
from aanas.config import SupernetRecipe
from aanas.errors import CheckpointError
from aanas.ops.blocks import act_fn
from aanas.ops.elastic import (
    ChannelIndex,
    ElasticAttention,
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticLinear,
    split_index,
)
from aanas.space import SearchSpace
from aanas.spec import ArchSpec, ResolvedArch, ResolvedBlock, resolve

__all__ = [
    "PathSampler",
    "SuperNet",
    "param_dimension",
    "progress_file",
    "recalibrate_bn",
    "seeded_supernet",
    "train_supernet",
]

logger = logging.getLogger(__name__)

# The one functional activation table lives with the static one (aanas.ops.blocks).
# Supernet BatchNorm momentum: PyTorch's default. The static MnasNet uses torchvision's 3e-4,
# which would leave the shared running statistics near their initial values for thousands of
# steps; subnets are BN-recalibrated before evaluation anyway (recalibrate_bn).
_BN_MOMENTUM = 0.1


def _first(n: int) -> slice:
    return slice(0, n)


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


@dataclass(frozen=True)
class _Layout:
    """The elastic constructor of one block type: the static block's layer names and shape.

    Every supported block is ``[pre BN -> act] -> [expand 1x1 -> BN -> act] -> spatial kxk ->
    BN -> act -> [SE] -> project [-> BN]`` plus its shortcut; the three convs are the sites of
    ``aanas.block_types`` (``expansion``, ``spatial``, ``projection``), any one of which may be
    augmented.
    """

    expand: tuple[str, str] | None  # (conv, bn) of the 1x1 expansion; None: the block has none
    spatial: tuple[str, str]
    project: tuple[str, str | None]  # bn None: the block ends on the conv (pre-activation)
    depthwise: bool  # the spatial conv is depthwise (MnasNet)
    project_kernel: bool  # the projection is k x k (ResNet basic: conv2), not 1x1
    # projection shortcut (conv, bn or None), read from the pre-activated input if ``pre_bn``;
    # None: identity only, where shapes allow (MnasNet)
    shortcut: tuple[str, str | None] | None
    final_act: bool  # activation after the sum (ResNet)
    pre_bn: str | None = None  # BN-act on the block input (Wide-ResNet)


_RESNET_SHORTCUT = ("downsample.0", "downsample.1")
# The elastic half of each block-type record (keys of aanas.block_types.BLOCK_TYPES).
_LAYOUTS: dict[str, _Layout] = {
    "ir": _Layout(
        ("conv_pw", "bn1"), ("conv_dw", "bn2"), ("conv_pwl", "bn3"), True, False, None, False
    ),
    "ds": _Layout(None, ("conv_dw", "bn1"), ("conv_pw", "bn2"), True, False, None, False),
    "bottle": _Layout(
        ("conv1", "bn1"), ("conv2", "bn2"), ("conv3", "bn3"), False, False, _RESNET_SHORTCUT, True
    ),
    "basic": _Layout(None, ("conv1", "bn1"), ("conv2", "bn2"), False, True, _RESNET_SHORTCUT, True),
    "preact": _Layout(
        None, ("conv1", "bn2"), ("conv2", None), False, True, ("shortcut", None), False, "bn1"
    ),
}
# Block types the supernet cannot share weights for, with the reason shown to the user.
UNSUPPORTED_BLOCK_TYPES: dict[str, str] = {}
assert set(_LAYOUTS) | set(UNSUPPORTED_BLOCK_TYPES) == set(BLOCK_TYPES)


@dataclass
class _AttnBounds:
    """Largest attention one site of one block position needs."""

    heads: int = 0
    dkh: int = 0
    dvh: int = 0
    dv: int = 0


@dataclass
class _Bounds:
    """Largest integers one block position needs over the whole space."""

    type: str
    in_size: int
    out_size: int
    in_max: int = 0
    mid_max: int = 0
    out_max: int = 0
    kernel_max: int = 1
    se_max: int = 0
    attn: dict[str, _AttnBounds] = field(default_factory=dict)  # per AA mode (site)
    projection: bool = False  # ResNet blocks: a downsample conv somewhere in the space

    def update(self, rb: ResolvedBlock) -> None:
        if (rb.type, rb.in_size, rb.out_size) != (self.type, self.in_size, self.out_size):
            raise ValueError(
                f"{rb.name}: block type/size differs between architectures of the space "
                f"({rb.type}@{rb.in_size} vs {self.type}@{self.in_size}); not supported"
            )
        self.in_max = max(self.in_max, rb.in_channels)
        self.mid_max = max(self.mid_max, rb.mid_channels)
        self.out_max = max(self.out_max, rb.out_channels)
        self.kernel_max = max(self.kernel_max, rb.kernel)
        self.se_max = max(self.se_max, rb.se_channels)
        if rb.dv:
            a = self.attn.setdefault(rb.aa_mode, _AttnBounds())
            a.heads = max(a.heads, rb.heads)
            a.dkh = max(a.dkh, rb.dk // rb.heads)
            a.dvh = max(a.dvh, rb.dv // rb.heads)
            a.dv = max(a.dv, rb.dv)
        if block_type(rb.type).projection_shortcut and rb.residual:
            self.projection |= rb.stride != 1 or rb.in_channels != rb.out_channels

    def dv_max(self, mode: str) -> int:
        return self.attn[mode].dv if mode in self.attn else 0


# --- super blocks -------------------------------------------------------------------------------


class _SuperBlock(nn.Module):
    """One block position at its largest, for any type with a :class:`_Layout`.

    Tensors inside the block and their channel banks (``split_index``: conv channels first,
    attention channels from the bank's conv size on, so they never share weights or BN rows):
    ``e`` after the expansion (``[conv | attn]`` in expansion mode), ``s`` after the spatial
    conv (spatial mode; a depthwise conv keeps ``e``'s channels), ``o`` after the projection
    (projection mode).
    """

    def __init__(self, b: _Bounds) -> None:
        super().__init__()
        lay = _LAYOUTS[b.type]
        self.block_type = b.type
        self.layout = lay
        # conv-channel sizes of the banks (the attention rows follow them)
        self.e_max = b.mid_max if lay.expand else b.in_max
        self.s_max = b.mid_max
        self.out_max = b.out_max
        dv_e = b.dv_max("expansion")
        e_bank = self.e_max + dv_e
        s_bank = self.s_max + max(b.dv_max("spatial"), dv_e if lay.depthwise else 0)
        o_bank = b.out_max + b.dv_max("projection")
        sizes = {"expansion": b.in_size, "spatial": b.in_size, "projection": b.out_size}
        reads = {"expansion": b.in_max, "spatial": e_bank, "projection": s_bank}
        self.attn = nn.ModuleDict(
            {
                mode: ElasticAttention(reads[mode], a.heads, a.dkh, a.dvh, a.dv, sizes[mode])
                for mode, a in b.attn.items()
            }
        )
        self.pre_bn: ElasticBatchNorm2d | None = None
        if lay.pre_bn:
            self.pre_bn = ElasticBatchNorm2d(b.in_max, momentum=_BN_MOMENTUM)
        self.expand: ElasticConv2d | None = None
        self.expand_bn: ElasticBatchNorm2d | None = None
        if lay.expand:
            self.expand = ElasticConv2d(b.in_max, b.mid_max, 1)
            self.expand_bn = ElasticBatchNorm2d(e_bank, momentum=_BN_MOMENTUM)
        if lay.depthwise:
            self.spatial = ElasticConv2d(e_bank, e_bank, b.kernel_max, depthwise=True)
        else:
            self.spatial = ElasticConv2d(e_bank, b.mid_max, b.kernel_max)
        self.spatial_bn = ElasticBatchNorm2d(s_bank, momentum=_BN_MOMENTUM)
        self.se_reduce: ElasticConv2d | None = None
        self.se_expand: ElasticConv2d | None = None
        if b.se_max:
            self.se_reduce = ElasticConv2d(s_bank, b.se_max, 1, bias=True)
            self.se_expand = ElasticConv2d(b.se_max, s_bank, 1, bias=True)
        self.project = ElasticConv2d(s_bank, b.out_max, b.kernel_max if lay.project_kernel else 1)
        self.project_bn: ElasticBatchNorm2d | None = None
        if lay.project[1]:
            self.project_bn = ElasticBatchNorm2d(o_bank, momentum=_BN_MOMENTUM)
        self.down: ElasticConv2d | None = None
        self.down_bn: ElasticBatchNorm2d | None = None
        if b.projection and lay.shortcut is not None:
            self.down = ElasticConv2d(b.in_max, b.out_max, 1)
            if lay.shortcut[1]:
                self.down_bn = ElasticBatchNorm2d(b.out_max, momentum=_BN_MOMENTUM)

    def _plan(
        self, rb: ResolvedBlock, device: torch.device
    ) -> tuple[int, ChannelIndex, ChannelIndex, ChannelIndex]:
        """(channels of ``e``, bank index of ``e``, of ``s``, of ``o``) for block ``rb``."""
        mode = rb.aa_mode if rb.dv else ""
        e_c = rb.mid_channels if self.layout.expand else rb.in_channels
        s_c, out = rb.mid_channels, rb.out_channels
        idx_e: ChannelIndex = _first(e_c)
        if mode == "expansion":
            idx_e = split_index(e_c - rb.dv, rb.dv, self.e_max, device)
        idx_s: ChannelIndex = _first(s_c)
        if mode == "spatial":
            idx_s = split_index(s_c - rb.dv, rb.dv, self.s_max, device)
        elif mode == "expansion" and self.layout.depthwise:
            idx_s = idx_e  # the depthwise conv keeps every channel where it is
        idx_o: ChannelIndex = _first(out)
        if mode == "projection":
            idx_o = split_index(out - rb.dv, rb.dv, self.out_max, device)
        return e_c, idx_e, idx_s, idx_o

    def _site_dv(self, rb: ResolvedBlock, site: str) -> int:
        return rb.dv if rb.dv and rb.aa_mode == site else 0

    def _conv_rows(
        self, site: str, rb: ResolvedBlock, inp: ChannelIndex, n_out: int
    ) -> ChannelIndex:
        """Weight rows of the conv branch: the first ``n_out - dv``, or, for a plain depthwise
        conv, the channels it reads (``inp``), which may be a split bank index."""
        dv = self._site_dv(rb, site)
        if site == "spatial" and self.layout.depthwise and not dv:
            return inp
        return _first(n_out - dv)

    def _site(
        self,
        site: str,
        conv: ElasticConv2d,
        h: Tensor,
        inp: ChannelIndex,
        n_out: int,
        rb: ResolvedBlock,
        kernel: int,
        stride: int,
    ) -> Tensor:
        """``[conv part | attention part]`` of the conv at ``site``, as AAConv2d concatenates."""
        dv = self._site_dv(rb, site)
        parts = []
        if n_out - dv > 0:
            rows = self._conv_rows(site, rb, inp, n_out)
            x = h[:, : n_out - dv] if conv.depthwise and dv else h  # dw AA: first out - dv
            parts.append(conv(x, rows, inp, kernel, stride))
        if dv:
            attn = self.attn[site]
            assert isinstance(attn, ElasticAttention)
            parts.append(attn(h, inp, rb.dk, dv, rb.heads, rb.relative, stride))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _site_state(
        self,
        site: str,
        name: str,
        conv: ElasticConv2d,
        inp: ChannelIndex,
        n_out: int,
        rb: ResolvedBlock,
        kernel: int,
    ) -> dict[str, Tensor]:
        """The static conv's (or AAConv2d's) state entries under ``name``."""
        dv = self._site_dv(rb, site)
        state: dict[str, Tensor] = {}
        if n_out - dv > 0:
            key = f"{name}.weight" if dv == 0 else f"{name}.conv_out.weight"
            state[key] = conv.sliced_weight(self._conv_rows(site, rb, inp, n_out), inp, kernel)
        if dv:
            attn = self.attn[site]
            assert isinstance(attn, ElasticAttention)
            ref = block_type(rb.type).site(rb, site)
            attn_state = attn.static_state(inp, rb.dk, dv, rb.heads, rb.relative, ref.in_size)
            state.update(_prefixed(f"{name}.", attn_state))
        return state

    def static_state(self, rb: ResolvedBlock) -> dict[str, Tensor]:
        """The static block's state_dict (keys as in ``aanas.ops.blocks``)."""
        lay = self.layout
        e_c, idx_e, idx_s, idx_o = self._plan(rb, self.spatial.weight.device)
        state: dict[str, Tensor] = {}
        if lay.pre_bn is not None:
            assert self.pre_bn is not None
            pre = self.pre_bn.sliced_state(_first(rb.in_channels))
            state.update(_prefixed(f"{lay.pre_bn}.", pre))
        if lay.expand is not None:
            assert self.expand is not None and self.expand_bn is not None
            conv_name, bn_name = lay.expand
            x_idx = _first(rb.in_channels)
            state.update(self._site_state("expansion", conv_name, self.expand, x_idx, e_c, rb, 1))
            state.update(_prefixed(f"{bn_name}.", self.expand_bn.sliced_state(idx_e)))
        conv_name, bn_name = lay.spatial
        s_c = rb.mid_channels
        state.update(
            self._site_state("spatial", conv_name, self.spatial, idx_e, s_c, rb, rb.kernel)
        )
        state.update(_prefixed(f"{bn_name}.", self.spatial_bn.sliced_state(idx_s)))
        if rb.se_channels:
            assert self.se_reduce is not None and self.se_expand is not None
            se = _first(rb.se_channels)
            state["se.conv_reduce.weight"] = self.se_reduce.sliced_weight(se, idx_s, 1)
            state["se.conv_reduce.bias"] = self.se_reduce.sliced_bias(se)  # type: ignore[assignment]
            state["se.conv_expand.weight"] = self.se_expand.sliced_weight(idx_s, se, 1)
            state["se.conv_expand.bias"] = self.se_expand.sliced_bias(idx_s)  # type: ignore[assignment]
        conv_name, bn_name = lay.project
        kernel = rb.kernel if lay.project_kernel else 1
        out = rb.out_channels
        state.update(
            self._site_state("projection", conv_name, self.project, idx_s, out, rb, kernel)
        )
        if bn_name is not None:
            assert self.project_bn is not None
            state.update(_prefixed(f"{bn_name}.", self.project_bn.sliced_state(idx_o)))
        if lay.shortcut is not None and rb.residual and (rb.stride != 1 or rb.in_channels != out):
            assert self.down is not None
            sc_conv, sc_bn = lay.shortcut
            state[f"{sc_conv}.weight"] = self.down.sliced_weight(
                _first(out), _first(rb.in_channels), 1
            )
            if sc_bn is not None:
                assert self.down_bn is not None
                state.update(_prefixed(f"{sc_bn}.", self.down_bn.sliced_state(_first(out))))
        return state

    def forward(self, x: Tensor, rb: ResolvedBlock) -> Tensor:
        lay = self.layout
        act = act_fn(rb.act)
        e_c, idx_e, idx_s, idx_o = self._plan(rb, x.device)
        out = rb.out_channels
        h = x
        if self.pre_bn is not None:
            h = act(self.pre_bn(x, _first(rb.in_channels)))  # (B, in, H, W), pre-activated
        pre = h
        if self.expand is not None:
            assert self.expand_bn is not None
            h = self._site("expansion", self.expand, h, _first(rb.in_channels), e_c, rb, 1, 1)
            h = act(self.expand_bn(h, idx_e))  # (B, e, H, W)
        h = self._site("spatial", self.spatial, h, idx_e, rb.mid_channels, rb, rb.kernel, rb.stride)
        h = act(self.spatial_bn(h, idx_s))  # (B, s, H', W')
        if rb.se_channels:
            assert self.se_reduce is not None and self.se_expand is not None
            se = _first(rb.se_channels)
            s = h.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
            s = self.se_expand(act(self.se_reduce(s, se, idx_s, 1)), idx_s, se, 1)
            h = h * torch.sigmoid(s)
        kernel = rb.kernel if lay.project_kernel else 1
        h = self._site("projection", self.project, h, idx_s, out, rb, kernel, 1)
        if self.project_bn is not None:
            h = self.project_bn(h, idx_o)  # (B, out, H', W')
        if rb.residual:
            shortcut = x
            if lay.shortcut is not None and (rb.stride != 1 or rb.in_channels != out):
                assert self.down is not None
                src = pre if lay.pre_bn else x  # WRN projects the pre-activated input
                shortcut = self.down(src, _first(out), _first(rb.in_channels), 1, rb.stride)
                if self.down_bn is not None:
                    shortcut = self.down_bn(shortcut, _first(out))
            h = h + shortcut
        return act(h) if lay.final_act else h


# --- the supernet -------------------------------------------------------------------------------


class SuperNet(nn.Module):
    """Weight-sharing supernet of a search space; ``supernet(x, spec)`` runs one path.

    Args:
        space: the search space; every architecture ``space.decode`` can return is a path.

    Raises:
        ValueError: for a block type without an elastic layout (``UNSUPPORTED_BLOCK_TYPES``)
            or a block position whose type or size differs between architectures.
    """

    # 2: per-site attention (``attn.<mode>.*``) and split banks for expansion/projection modes
    _version = 2

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        largest = space.largest()
        self.family = largest.family
        bounds: dict[tuple[int, int], _Bounds] = {}
        stem_max = head_in = features = 0
        for spec in (largest, *space.variant_specs()):
            resolved = resolve(spec)
            stem_max = max(stem_max, resolved.stem_channels)
            head_in = max(head_in, resolved.blocks[-1].out_channels)
            features = max(features, resolved.features)
            for stage, j, rb in resolved.staged():
                if rb.type in UNSUPPORTED_BLOCK_TYPES:
                    raise ValueError(
                        f"{rb.name}: SuperNet does not support {rb.type!r} blocks: "
                        f"{UNSUPPORTED_BLOCK_TYPES[rb.type]}"
                    )
                key = (stage, j)
                bounds.setdefault(key, _Bounds(rb.type, rb.in_size, rb.out_size)).update(rb)
        stem = largest.stem
        self.stem = ElasticConv2d(3, stem_max, stem.kernel)
        self.stem_bn = ElasticBatchNorm2d(stem_max, momentum=_BN_MOMENTUM)
        n_stages = len(largest.stages)
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                _SuperBlock(bounds[(i, j)]) for j in range(sum(1 for (s, _) in bounds if s == i))
            )
            for i in range(n_stages)
        )
        self.head: ElasticConv2d | None = None
        if largest.head_channels:
            self.head = ElasticConv2d(head_in, largest.head_channels, 1)
            self.head_bn = ElasticBatchNorm2d(largest.head_channels, momentum=_BN_MOMENTUM)
        # Wide-ResNet: pre-activation blocks end on a conv; a final BN-act normalises the last one
        self.final_bn: ElasticBatchNorm2d | None = None
        if largest.family == "wrn":
            self.final_bn = ElasticBatchNorm2d(features, momentum=_BN_MOMENTUM)
        self.classifier = ElasticLinear(features, largest.num_classes)

    def _block(self, stage: int, index: int) -> _SuperBlock:
        block = self.blocks[stage][index]  # type: ignore[index]
        assert isinstance(block, _SuperBlock)
        return block

    def _resolve(self, spec: ArchSpec) -> ResolvedArch:
        resolved = resolve(spec)
        if spec.family != self.family:
            raise ValueError(f"spec family {spec.family!r} is not the supernet's {self.family!r}")
        return resolved

    def forward(self, x: Tensor, spec: ArchSpec) -> Tensor:
        """Logits of the architecture ``spec`` (which must be in the space) on images ``x``."""
        resolved = self._resolve(spec)
        stem = spec.stem
        c = _first(resolved.stem_channels)
        h = self.stem(x, c, _first(3), stem.kernel, stem.stride)  # (B, C, H/2, W/2)
        if stem.type != "plain":
            h = act_fn(stem.act)(self.stem_bn(h, c))
        if stem.type == "resnet":
            h = F.max_pool2d(h, 3, 2, 1)
        for stage, j, rb in resolved.staged():
            h = self._block(stage, j)(h, rb)
        if self.final_bn is not None:
            h = act_fn(resolved.blocks[-1].act)(self.final_bn(h, _first(h.shape[1])))
        if self.head is not None:
            hc = _first(resolved.head_channels)
            h = act_fn(stem.act)(self.head_bn(self.head(h, hc, _first(h.shape[1]), 1), hc))
        h = h.mean((2, 3))  # (B, C)
        h = F.dropout(h, spec.dropout, self.training)
        logits: Tensor = self.classifier(h)
        return logits

    @torch.no_grad()
    def static_state(self, spec: ArchSpec) -> dict[str, Tensor]:
        """The state_dict of ``create_model(spec)`` with the weights of this path."""
        resolved = self._resolve(spec)
        stem = spec.stem
        c = _first(resolved.stem_channels)
        state = {"stem.conv.weight": self.stem.sliced_weight(c, _first(3), stem.kernel)}
        if stem.type != "plain":
            state.update(_prefixed("stem.bn.", self.stem_bn.sliced_state(c)))
        for stage, j, rb in resolved.staged():
            block_state = self._block(stage, j).static_state(rb)
            state.update(_prefixed(f"blocks.{stage}.{j}.", block_state))
        if self.final_bn is not None:
            state.update(_prefixed("bn.", self.final_bn.sliced_state(_first(resolved.features))))
        if self.head is not None:
            hc = _first(resolved.head_channels)
            last = _first(resolved.blocks[-1].out_channels)
            state["head.conv.weight"] = self.head.sliced_weight(hc, last, 1)
            state.update(_prefixed("head.bn.", self.head_bn.sliced_state(hc)))
        name = "classifier" if self.family == "mnasnet" else "fc"
        state[f"{name}.weight"] = self.classifier.weight[:, : resolved.features]
        state[f"{name}.bias"] = self.classifier.bias
        return {k: v.detach().clone() for k, v in state.items()}

    def extract(self, spec: ArchSpec) -> nn.Module:
        """The static model ``aanas.create_model(spec)`` with this path's weights copied in."""
        from aanas.models import create_model  # L2; the supernet sits above models

        model = create_model(spec)
        device = self.classifier.weight.device
        model.load_state_dict(self.static_state(spec), strict=True)
        return model.to(device)

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the supernet state (and its space's source) atomically: temp file + replace."""
        payload = {
            "version": self._version,
            "space": self.space.name,
            "state_dict": self.state_dict(),
        }
        with atomic_open(path, "wb") as fh:
            torch.save(payload, fh)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a state written by :meth:`save` (``weights_only=True``; the space must match).

        Raises:
            CheckpointError: the file is missing, empty, truncated or not a supernet state, or
                it was saved from another space or version; the message names the file.
        """
        payload = load_torch_file(path, "supernet checkpoint")
        if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
            raise CheckpointError(
                f"supernet checkpoint {path}: not written by SuperNet.save (no state_dict)"
            )
        if payload.get("version") != self._version or payload.get("space") != self.space.name:
            raise CheckpointError(
                f"supernet checkpoint {path}: supernet of space {payload.get('space')!r} "
                f"v{payload.get('version')}, expected {self.space.name!r} v{self._version}"
            )
        try:
            self.load_state_dict(payload["state_dict"], strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            msg = f"supernet checkpoint {path}: weights do not fit: {first}"
            raise CheckpointError(msg) from None


# --- training -----------------------------------------------------------------------------------


def param_dimension(name: str) -> str:
    """The elastic dimension (``aanas.config.ELASTIC_DIMS``) a space parameter belongs to.

    Examples: ``stage2.block1.kernel`` -> kernel, ``stage3.depth`` -> depth, ``width``,
    ``stage1.expansion`` and ``stage3.se`` -> width, ``stage4.aa.heads`` and
    ``stage4.block0.aa`` -> attention.

    Raises:
        ValueError: a parameter kind this table does not know (a new space key must be added).
    """
    parts = name.split(".")
    if "aa" in parts:
        return "attention"
    last = parts[-1]
    if last in ("kernel", "depth"):
        return last
    if last in ("expansion", "se", "width"):
        return "width"
    raise ValueError(f"parameter {name!r}: no elastic dimension known for {last!r}")


def _extreme(choices: tuple[Any, ...], most: bool) -> Any:
    try:
        return max(choices) if most else min(choices)
    except TypeError:  # strings (placements): the space's own extremes decide where it can
        return choices[-1] if most else choices[0]


class PathSampler:
    """Paths of a space restricted to some elastic dimensions (OFA progressive shrinking).

    Parameters of a fixed dimension take their value in ``space.largest()``; those of an
    elastic one are drawn uniformly (``sample``) or take their value in ``space.smallest()``
    (``smallest``). With every dimension elastic, ``sample`` draws exactly what
    ``space.sample`` draws from the same generator.

    Args:
        space: the search space.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.space = space
        self.largest = space.largest()
        self.smallest_spec = space.smallest()
        self._most = space.encode_params(self.largest)
        self._least = space.encode_params(self.smallest_spec)
        self._dims = {p.name: param_dimension(p.name) for p in space.parameters}

    def _params(self, elastic: frozenset[str], rng: np.random.Generator | None) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.space.parameters:
            if not self.space.is_active(p, out):
                continue
            if self._dims[p.name] in elastic:
                if rng is None:
                    out[p.name] = self._least.get(p.name, _extreme(p.choices, False))
                else:
                    out[p.name] = p.choices[int(rng.integers(len(p.choices)))]
            else:
                out[p.name] = self._most.get(p.name, _extreme(p.choices, True))
        return out

    def sample(self, rng: np.random.Generator, elastic: frozenset[str]) -> ArchSpec:
        """A random path: uniform over the ``elastic`` dimensions, largest elsewhere."""
        return self.space.decode(self._params(elastic, rng))

    def smallest(self, elastic: frozenset[str]) -> ArchSpec:
        """The smallest path whose fixed dimensions are at their largest."""
        if elastic >= {"kernel", "depth", "width", "attention"}:
            return self.smallest_spec
        return self.space.decode(self._params(elastic, None))


def _loader_of(data: Any) -> Iterable[Any]:
    loader: Iterable[Any] = data.train if hasattr(data, "train") else data
    return loader


def _distill_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) on temperature-softened logits, times T^2 (Hinton et al.,
    arXiv:1503.02531); the teacher's logits are already detached. Its gradient equals that of
    the soft cross-entropy BigNAS/OFA use (they differ by the teacher's entropy, a constant)."""
    t = temperature
    log_p = F.log_softmax(student / t, dim=1)
    q = F.softmax(teacher / t, dim=1)
    return F.kl_div(log_p, q, reduction="batchmean") * (t * t)


def train_supernet(
    supernet: SuperNet,
    data: Any,
    recipe: SupernetRecipe | None = None,
    *,
    seed: int = 0,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Train the shared weights (SGD, Nesterov momentum 0.9, cosine LR over all steps).

    Per step, with ``recipe.rule == "sandwich"``: the largest path, the smallest and
    ``n_random`` random paths (duplicates trained once), gradients accumulated (Yu & Huang,
    arXiv:1903.05134; BigNAS, arXiv:2003.11142). The largest learns from the labels; with
    ``distill`` the others learn from its detached soft labels (in-place distillation), else
    from the labels too. With ``shrink``, paths are restricted to the dimensions
    :meth:`~aanas.config.SupernetRecipe.elastic_at` allows at that point of training (OFA
    progressive shrinking, arXiv:1908.09791), so the smallest/random paths of the first phase
    are the largest network itself. With ``time_budget_s`` the LR and the shrinking phases
    follow whichever is further along, the steps or the budget (then the result depends on the
    machine's speed, not only on the seed).

    Args:
        supernet: the supernet (moved to ``device``).
        data: a ``DataBundle`` (its ``train`` loader is used) or any iterable of ``(x, y)``.
        recipe: the settings (default: :class:`~aanas.config.SupernetRecipe` defaults).
        seed: seeds the path sampler (``numpy.random.default_rng``) and torch.
        device: training device.
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch.
        checkpoint: a file that holds the training state after every finished epoch (weights,
            optimiser, sampler and torch RNG, steps, time spent), written atomically. If it
            exists when training starts, training continues after its last epoch, so a killed
            run loses at most one epoch; the time spent before counts against
            ``time_budget_s``. A state of another space, seed or recipe (``time_budget_s``
            aside) is ignored with a warning. Deleted once training ends.
        **overrides: fields of the recipe to replace (``epochs=2, lr=0.1, max_batches=None``).

    Returns:
        ``{"epochs": [...per-epoch metrics...], "seconds": total, "steps": optimiser steps
        taken, "planned_steps": epochs x steps per epoch (more than ``steps`` when
        ``time_budget_s`` ran out first), "recipe": {...}}``.

    Raises:
        ValueError: a bad recipe value (unknown ``rule``, ...), naming the field.
    """
    if overrides.get("max_batches", 0) is None:
        overrides["max_batches"] = 0
    rec = dataclasses.replace(recipe or SupernetRecipe(), **overrides)
    dev = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    sampler = PathSampler(supernet.space)
    supernet.to(dev).train()
    loader = _loader_of(data)
    max_batches = rec.max_batches or None
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = max_batches or 1
    if max_batches is not None:
        steps_per_epoch = min(steps_per_epoch, max_batches)
    total_steps = max(1, rec.epochs * steps_per_epoch)
    opt = torch.optim.SGD(
        supernet.parameters(), lr=rec.lr, momentum=0.9, weight_decay=rec.weight_decay, nesterov=True
    )
    history: list[dict[str, Any]] = []
    global_step, first_epoch, spent_before = 0, 0, 0.0
    resumed = _load_progress(checkpoint, supernet, seed, rec)
    if resumed is not None:
        opt.load_state_dict(resumed["optimizer"])
        rng.bit_generator.state = resumed["sampler_rng"]
        torch.set_rng_state(resumed["torch_rng"])
        history = list(resumed["history"])
        global_step, spent_before = int(resumed["steps"]), float(resumed["seconds"])
        first_epoch = int(resumed["epoch"]) + 1
        logger.info("supernet: resuming after epoch %d from %s", first_epoch - 1, checkpoint)
    start = time.perf_counter() - spent_before
    progress = 0.0  # of the schedule: steps done, or budget spent if that is further

    def _progress() -> float:
        done = global_step / total_steps
        if rec.time_budget_s > 0:
            done = max(done, (time.perf_counter() - start) / rec.time_budget_s)
        return min(done, 1.0)

    for epoch in range(first_epoch, rec.epochs):
        progress = _progress()
        if progress >= 1.0:
            break
        t0 = time.perf_counter()
        loss_sum, n_seen, n_paths, n_steps = 0.0, 0, 0, 0
        elastic = rec.elastic_at(0.0)
        order = getattr(loader, "sampler", None)
        if hasattr(order, "set_epoch"):  # aanas.data: the shuffle is f(seed, epoch), set it
            order.set_epoch(epoch)  # type: ignore[union-attr]
        for step, (x, y) in enumerate(loader):
            progress = _progress()
            if (max_batches is not None and step >= max_batches) or progress >= 1.0:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            elastic = rec.elastic_at(progress)
            for group in opt.param_groups:  # warm-up, then cosine from lr to 0
                group["lr"] = rec.lr * supernet_lr_factor(rec, progress)
            if rec.rule == "sandwich":
                paths = [sampler.largest, sampler.smallest(elastic)]
                paths += [sampler.sample(rng, elastic) for _ in range(rec.n_random)]
                paths = list(dict.fromkeys(paths))  # the same path twice: train it once
            else:
                paths = [sampler.sample(rng, elastic)]
            opt.zero_grad(set_to_none=True)
            teacher: Tensor | None = None
            for i, spec in enumerate(paths):
                logits = supernet(x, spec)
                if teacher is not None:
                    loss = _distill_loss(logits, teacher, rec.distill_temperature)
                else:
                    loss = F.cross_entropy(logits, y)
                # gradients accumulate over the paths of this step
                loss.backward()  # type: ignore[no-untyped-call]
                if i == 0:
                    loss_sum += float(loss.detach()) * len(y)
                    n_seen += len(y)
                    if rec.distill and rec.rule == "sandwich":
                        teacher = logits.detach()
            n_paths += len(paths)
            if rec.grad_clip > 0:
                nn.utils.clip_grad_norm_(supernet.parameters(), rec.grad_clip)
            opt.step()
            global_step += 1
            n_steps += 1
        if n_steps == 0:  # the budget ran out at the epoch's start
            break
        metrics: dict[str, Any] = {
            "epoch": float(epoch),
            "train_loss": loss_sum / max(1, n_seen),  # of the first path (sandwich: largest)
            "paths_per_step": n_paths / n_steps,
            "steps": float(n_steps),
            "elastic": sorted(elastic),
            "seconds": time.perf_counter() - t0,
            "lr": float(opt.param_groups[0]["lr"]),
        }
        history.append(metrics)
        logger.info("supernet epoch %d: %s", epoch, metrics)
        if checkpoint is not None:
            progress_state = {
                "epoch": epoch,
                "steps": global_step,
                "seconds": time.perf_counter() - start,
                "history": history,
            }
            _save_progress(checkpoint, supernet, opt, rng, seed, rec, progress_state)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    if rec.time_budget_s > 0 and global_step < total_steps:
        logger.warning(
            "supernet: time budget of %.0f s spent after %d of %d steps; the schedule was "
            "compressed to fit (lr annealed, every shrinking phase reached)",
            rec.time_budget_s,
            global_step,
            total_steps,
        )
    if checkpoint is not None:
        Path(checkpoint).unlink(missing_ok=True)
    return {
        "epochs": history,
        "seconds": time.perf_counter() - start,
        "steps": global_step,
        "planned_steps": total_steps,
        "recipe": dataclasses.asdict(rec),
    }


def supernet_lr_factor(rec: SupernetRecipe, progress: float) -> float:
    """The LR multiplier at ``progress`` (0..1) of the schedule: linear from 0 over the first
    ``rec.warmup`` of it, times the cosine from 1 to 0 over all of it."""
    ramp = min(1.0, progress / rec.warmup) if rec.warmup > 0 else 1.0
    return ramp * 0.5 * (1 + math.cos(math.pi * progress))


def seeded_supernet(space: SearchSpace, seed: int) -> SuperNet:
    """A new, untrained supernet whose initial weights follow from ``seed`` alone.

    Module constructors draw from torch's process-wide generator, so without the seed the
    weights (and every search or ranking built on them) depend on whatever the process drew
    before: two identical ``aanas search`` runs picked different architectures.
    """
    torch.manual_seed(seed)
    return SuperNet(space)


def progress_file(saved: str | os.PathLike[str]) -> Path:
    """The ``checkpoint`` for :func:`train_supernet` of a supernet to be saved at ``saved``
    (``<stem>.progress.pt`` beside it), one name for every command that trains one."""
    saved = Path(saved)
    return saved.with_name(saved.stem + ".progress.pt")


# Bumped when the progress payload changes; an older file is then ignored (training restarts).
_PROGRESS_VERSION = 1


def _progress_key(supernet: SuperNet, seed: int, rec: SupernetRecipe) -> dict[str, Any]:
    """What a saved training state must match to be continued: the budget may differ (a
    resumed search passes what is left of it), nothing else may."""
    fields = {k: v for k, v in dataclasses.asdict(rec).items() if k != "time_budget_s"}
    return {
        "version": _PROGRESS_VERSION,
        "space": supernet.space.name,
        "supernet_version": supernet._version,
        "seed": seed,
        "recipe": repr(sorted(fields.items())),
    }


def _save_progress(
    path: str | os.PathLike[str],
    supernet: SuperNet,
    opt: torch.optim.Optimizer,
    rng: np.random.Generator,
    seed: int,
    rec: SupernetRecipe,
    progress_state: dict[str, Any],
) -> None:
    """Write the state :func:`_load_progress` continues from (``progress_state``: epoch,
    steps, seconds, history) atomically: a kill while writing leaves the previous one."""
    payload = {
        "key": _progress_key(supernet, seed, rec),
        **progress_state,
        "state_dict": supernet.state_dict(),
        "optimizer": opt.state_dict(),
        "sampler_rng": rng.bit_generator.state,
        "torch_rng": torch.get_rng_state(),
    }
    with atomic_open(path, "wb") as fh:
        torch.save(payload, fh)


def _load_progress(
    path: str | os.PathLike[str] | None, supernet: SuperNet, seed: int, rec: SupernetRecipe
) -> dict[str, Any] | None:
    """The saved state at ``path`` loaded into ``supernet``, or None (no file, or a state this
    run cannot continue: that is logged, and the file is overwritten after the first epoch)."""
    if path is None or not Path(path).is_file():
        return None
    try:
        payload = load_torch_file(path, "supernet training state")
    except CheckpointError as exc:
        logger.warning("supernet: %s; training from the start", exc)
        return None
    key = _progress_key(supernet, seed, rec)
    if not isinstance(payload, dict) or payload.get("key") != key:
        found = payload.get("key") if isinstance(payload, dict) else None
        diff = sorted(k for k in key if not isinstance(found, dict) or found.get(k) != key[k])
        logger.warning(
            "supernet: training state %s is of another run (differs in %s); training from the "
            "start",
            path,
            ", ".join(diff) or "format",
        )
        return None
    own = supernet.state_dict()
    saved = payload.get("state_dict")
    if not isinstance(saved, dict) or {k: tuple(v.shape) for k, v in saved.items()} != {
        k: tuple(v.shape) for k, v in own.items()
    }:
        logger.warning("supernet: training state %s does not fit; training from the start", path)
        return None
    supernet.load_state_dict(saved, strict=True)
    return payload


def _bn_rows(
    module: nn.modules.batchnorm._BatchNorm, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Tensor:
    """Boolean mask of the rows one call of ``module`` normalises (``ElasticBatchNorm2d``:
    ``(x, index)``; a plain BN: the first ``C``)."""
    rows = torch.zeros(module.num_features, dtype=torch.bool)
    index = args[1] if len(args) > 1 else kwargs.get("index")
    if index is None:
        index = slice(0, args[0].shape[1])
    rows[index.cpu() if isinstance(index, Tensor) else index] = True
    return rows


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    batches: int = 20,
    device: str | torch.device = "cpu",
    spec: ArchSpec | None = None,
) -> nn.Module:
    """Re-estimate BatchNorm statistics of an (extracted) subnet on training data.

    Resets the BN running statistics, switches to a cumulative average (``momentum=None``),
    forwards ``batches`` batches in train mode without gradients, then restores momenta and
    puts the model in eval mode. With ``spec`` the model is a :class:`SuperNet` and only that
    path is recalibrated: the rows of the BN banks the path normalises are re-estimated;
    every other row, and every BN of a block the path skips, keeps its statistics (and its
    ``num_batches_tracked``), so one supernet can be recalibrated path after path.

    Returns:
        ``model`` (modified in place), in eval mode.
    """
    dev = torch.device(device)
    model.to(dev)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    saved = [
        {k: v.clone() for k, v in m.named_buffers(recurse=False) if v is not None} for m in norms
    ]
    used: dict[int, Tensor] = {}
    hooks = []
    if spec is not None:

        def record(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            assert isinstance(module, nn.modules.batchnorm._BatchNorm)
            rows = _bn_rows(module, args, kwargs)
            used[id(module)] = used[id(module)] | rows if id(module) in used else rows

        hooks = [m.register_forward_pre_hook(record, with_kwargs=True) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    try:
        for i, (x, _) in enumerate(loader):
            if i >= batches:
                break
            x = x.to(dev, non_blocking=True)
            if spec is not None:
                model(x, spec)
            else:
                model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, mom, old in zip(norms, momenta, saved, strict=True):
            m.momentum = mom
            if spec is None:
                continue
            rows = used.get(id(m))
            if rows is None:  # a BN the path skips: untouched
                for k, v in old.items():
                    getattr(m, k).copy_(v)
                continue
            keep = (~rows).to(old["running_mean"].device)
            for k in ("running_mean", "running_var"):
                getattr(m, k)[keep] = old[k][keep]
    return model.eval()
