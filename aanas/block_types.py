"""One record per block type: validation rules, channel resolution and analytical cost.

Every kind of block a spec can name (``ir``, ``ds``, ``bottle``, ``basic``, ``preact``) is
described once, here, by a :class:`BlockType`: which families may stack it, which spec fields
it accepts, how its channel counts follow from ``in``/``out``/``expansion``, which of its
convolutions attention may augment (:data:`AA_MODES`) and, convolution by convolution, its
parameters and multiply-accumulates. The torch parts are registered against the same key one
layer up: the static constructor in ``aanas.models._builder`` (``STATIC_BUILDERS``) and the
elastic (weight-sharing) constructor in ``aanas.supernet``; ``tests/test_block_types.py``
holds every type to validate == build == count == supernet == export.

Attention placement (Bello et al., arXiv:1904.09925, augment "a convolution"; which one in an
inverted bottleneck the paper's text leaves open). An :class:`~aanas.spec.AASpec`'s ``mode``
names the convolution that becomes an :class:`~aanas.ops.attention.AAConv2d`; ``Fout`` (the
base of kappa and upsilon) is that convolution's output channels:

- ``spatial`` (default; ``depthwise`` in the issue's words for ``ir``/``ds``): the k x k conv.
  In ``ir``/``ds`` the depthwise conv produces ``C_exp - dv`` channels and attention, reading
  the whole expanded tensor (pooled for stride 2), the other ``dv``. In ``bottle`` the 3x3
  conv, in ``basic``/``preact`` the first 3x3 conv, as in the paper's ResNet/WRN experiments.
- ``expansion`` (``ir``, ``bottle``): the 1x1 expansion conv. Attention reads the narrow block
  input at its own resolution; its ``dv`` maps join the expanded tensor (``Fout = C_exp``).
- ``projection`` (``ir``, ``ds``, ``bottle``): the 1x1 projection. Attention reads the
  expanded tensor after the spatial conv; its ``dv`` maps join the block output
  (``Fout = out``).

This module is layer L0: no torch. The cost convention is ``aanas.cost.flops``'s (one MAC is
one multiply-add; biases, BN, activations, pooling, softmax are not counted).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING

from aanas.errors import SpecError

if TYPE_CHECKING:  # spec imports this module; the types are only needed for annotations
    from aanas.spec import BlockSpec, ResolvedBlock

__all__ = [
    "AA_MODES",
    "BLOCK_TYPES",
    "BlockType",
    "ConvSite",
    "aa_conv_cost",
    "bn_cost",
    "block_type",
    "conv_cost",
]

AA_MODES: tuple[str, ...] = ("spatial", "expansion", "projection")

Cost = tuple[int, int]  # (params, MACs)


# --- per-layer formulas ---------------------------------------------------------------------


def conv_cost(
    c_in: int, c_out: int, k: int, out_size: int, *, groups: int = 1, bias: bool = False
) -> Cost:
    """(params, MACs) of a square-kernel conv with a square ``out_size`` output.

    Example: 3x3 conv 32 -> 64 on a 56x56 output: params 32*64*9 = 18432,
    MACs 56*56 * 64 * 32 * 9 = 57802752.
    """
    weights = c_out * (c_in // groups) * k * k
    return weights + (c_out if bias else 0), weights * out_size * out_size


def bn_cost(channels: int) -> Cost:
    """BatchNorm: weight + bias parameters, no MACs."""
    return 2 * channels, 0


def aa_conv_cost(
    in_channels: int,
    out_channels: int,
    kernel: int,
    out_size: int,
    *,
    dk: int,
    dv: int,
    num_heads: int,
    relative: bool,
    max_size: int,
    depthwise: bool = False,
    bias: bool = False,
) -> Cost:
    """(params, MACs) of one :class:`~aanas.ops.attention.AAConv2d` (``aanas.cost.flops`` terms).

    ``out_size`` is the square output side, which is also the side the attention runs on (the
    stride-2 layer attends over its pooled input). ``max_size`` sizes the relative tables
    (``2 * max_size - 1`` rows each of ``dk / Nh``). ``bias`` is the conv branch's bias only;
    ``qkv_conv`` and ``attn_out`` always have one::

        conv branch       out^2 * (out_channels - dv) * in / groups * k^2
        qkv_conv (1x1)    HW * in * (2 dk + dv)
        q k^T, weights v  HW^2 * (dk + dv)
        relative logits   HW * (H + W) * dk
        attn_out (1x1)    HW * dv * dv
    """
    conv_c = out_channels - dv
    params = macs = 0
    if conv_c > 0:
        if depthwise:
            p, m = conv_cost(conv_c, conv_c, kernel, out_size, groups=conv_c, bias=bias)
        else:
            p, m = conv_cost(in_channels, conv_c, kernel, out_size, bias=bias)
        params, macs = params + p, macs + m
    if dv > 0:
        hw = out_size * out_size
        p, m = conv_cost(in_channels, 2 * dk + dv, 1, out_size, bias=True)  # qkv_conv
        params, macs = params + p, macs + m
        p, m = conv_cost(dv, dv, 1, out_size, bias=True)  # attn_out
        params, macs = params + p, macs + m
        macs += hw * hw * dk + hw * hw * dv  # q k^T and weights v, summed over heads
        if relative:
            macs += hw * (out_size + out_size) * dk  # height + width relative logits
            params += 2 * (2 * max_size - 1) * (dk // num_heads)  # key_rel_h, key_rel_w
    return params, macs


def _add(*parts: Cost) -> Cost:
    """Element-wise sum of (params, MACs) pairs."""
    return sum(p for p, _ in parts), sum(m for _, m in parts)


def _se(channels: int, se_channels: int) -> Cost:
    """SqueezeExcite: two biased 1x1 convs on the pooled 1x1 map."""
    if se_channels == 0:
        return 0, 0
    return _add(
        conv_cost(channels, se_channels, 1, 1, bias=True),
        conv_cost(se_channels, channels, 1, 1, bias=True),
    )


# --- the record -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConvSite:
    """Geometry of one convolution of a block that attention may augment.

    ``in_size`` is the side of the conv's input (it sizes the relative tables, ``2 * in_size -
    1`` rows); ``out_size`` the side of its output, which is where attention runs (a stride-2
    layer attends over its 3x3/2-pooled input).
    """

    in_channels: int
    out_channels: int  # Fout: kappa and upsilon are fractions of it
    kernel: int
    stride: int
    in_size: int
    out_size: int
    depthwise: bool


class BlockType:
    """What aanas knows about one kind of block, apart from torch.

    Subclasses fill in the class attributes and :meth:`mid_channels`, :meth:`sites` and
    :meth:`cost`; :data:`BLOCK_TYPES` holds one instance of each.

    Attributes:
        name: the spec token (``"ir"``).
        families: families whose builder stacks it.
        fixed_expansion: the block has no expansion; the spec must say ``e1``.
        se: squeeze-excitation supported.
        projection_shortcut: ResNet style: a 1x1 conv shortcut when shapes change (else the
            identity is added only where shapes allow it, as in MnasNet).
        aa_modes: convolutions attention may augment (a subset of :data:`AA_MODES`).
    """

    name: str = ""
    families: tuple[str, ...] = ()
    fixed_expansion: bool = False
    se: bool = False
    projection_shortcut: bool = False
    aa_modes: tuple[str, ...] = ("spatial",)

    def check(self, where: str, block: BlockSpec, family: str) -> None:
        """Type-specific validation of one BlockSpec (generic ranges are ``aanas.spec``'s).

        Raises:
            SpecError: naming ``where`` (``stage2.block0``), the field and the value.
        """
        if family not in self.families:
            allowed = tuple(n for n, t in BLOCK_TYPES.items() if family in t.families)
            raise SpecError(
                f"{where}.type: block {self.name!r} is not allowed in family {family!r}; "
                f"expected one of {allowed}"
            )
        if self.fixed_expansion and block.expansion != 1:
            raise SpecError(
                f"{where}.expansion: {self.name!r} blocks take e1, got {block.expansion!r}"
            )
        if block.se > 0 and not self.se:
            supported = tuple(n for n, t in BLOCK_TYPES.items() if t.se)
            raise SpecError(
                f"{where}.se: squeeze-excitation is supported in {'/'.join(supported)} blocks "
                f"only, got se={block.se!r} on {self.name!r}"
            )
        if block.aa is not None and block.aa.mode not in self.aa_modes:
            raise SpecError(
                f"{where}.aa.mode: {self.name!r} blocks can augment {self.aa_modes}, "
                f"got {block.aa.mode!r}"
            )

    def mid_channels(self, in_c: int, out_c: int, expansion: float) -> int:
        """Channels between the block's convolutions (expanded / bottleneck width)."""
        raise NotImplementedError

    def residual(self, skip: bool, stride: int, in_c: int, out_c: int) -> bool:
        """Whether a shortcut is added: identity where shapes allow, or a projection."""
        return skip and ((stride == 1 and in_c == out_c) or self.projection_shortcut)

    def sites(
        self, in_c: int, mid: int, out_c: int, kernel: int, stride: int, in_size: int, out_size: int
    ) -> Mapping[str, ConvSite]:
        """The convolution each mode of :attr:`aa_modes` augments."""
        raise NotImplementedError

    def site(self, rb: ResolvedBlock, mode: str) -> ConvSite:
        """:meth:`sites` of a resolved block, for one mode."""
        return self.sites(
            rb.in_channels,
            rb.mid_channels,
            rb.out_channels,
            rb.kernel,
            rb.stride,
            rb.in_size,
            rb.out_size,
        )[mode]

    def cost(self, rb: ResolvedBlock) -> Cost:
        """(params, MACs) of the block, layer by layer as ``aanas.ops.blocks`` builds it."""
        raise NotImplementedError

    def _conv(self, rb: ResolvedBlock, mode: str) -> Cost:
        """Cost of the convolution at site ``mode``: an AAConv2d if ``rb`` augments it."""
        s = self.site(rb, mode)
        if rb.dv and rb.aa_mode == mode:
            return aa_conv_cost(
                s.in_channels,
                s.out_channels,
                s.kernel,
                s.out_size,
                dk=rb.dk,
                dv=rb.dv,
                num_heads=rb.heads,
                relative=rb.relative,
                max_size=s.in_size,
                depthwise=s.depthwise,
            )
        groups = s.in_channels if s.depthwise else 1
        return conv_cost(s.in_channels, s.out_channels, s.kernel, s.out_size, groups=groups)

    def _shortcut(self, rb: ResolvedBlock, bn: bool = True) -> Cost:
        """The 1x1 projection shortcut (+ BN), when the block adds one."""
        if not (rb.residual and (rb.stride != 1 or rb.in_channels != rb.out_channels)):
            return 0, 0
        conv = conv_cost(rb.in_channels, rb.out_channels, 1, rb.out_size)
        return _add(conv, bn_cost(rb.out_channels)) if bn else conv

    def __repr__(self) -> str:
        return f"BlockType({self.name!r})"


def _round_half_up(x: float) -> int:
    """0.5 -> 1, 2.5 -> 3 (Python's round() would give 0 and 2)."""
    return int(math.floor(x + 0.5))


class _InvertedResidual(BlockType):
    """MnasNet ``ir``: pw expand -> dw kxk/s -> [SE] -> pw linear (arXiv:1807.11626)."""

    name = "ir"
    families = ("mnasnet",)
    se = True
    aa_modes = AA_MODES

    def mid_channels(self, in_c: int, out_c: int, expansion: float) -> int:
        """``round_half_up(in * e)``: 16 * 3 = 48, 40 * 6 = 240."""
        return _round_half_up(in_c * expansion)

    def sites(
        self, in_c: int, mid: int, out_c: int, kernel: int, stride: int, in_size: int, out_size: int
    ) -> Mapping[str, ConvSite]:
        """conv_pw (expansion), conv_dw (spatial), conv_pwl (projection)."""
        return {
            "expansion": ConvSite(in_c, mid, 1, 1, in_size, in_size, False),
            "spatial": ConvSite(mid, mid, kernel, stride, in_size, out_size, True),
            "projection": ConvSite(mid, out_c, 1, 1, out_size, out_size, False),
        }

    def cost(self, rb: ResolvedBlock) -> Cost:
        """Example: MnasNet-B1 ``stage1.block0.0`` (ir 16 -> 48 -> 24, k3 s2, 112 -> 56): pw
        16*48 * 112^2 + dw 48*9 * 56^2 + pwl 48*24 * 56^2 = 9633792 + 1354752 + 3612672 MACs."""
        mid = rb.mid_channels
        return _add(
            self._conv(rb, "expansion"),
            bn_cost(mid),
            self._conv(rb, "spatial"),
            bn_cost(mid),
            _se(mid, rb.se_channels),
            self._conv(rb, "projection"),
            bn_cost(rb.out_channels),
        )


class _DepthwiseSeparable(BlockType):
    """MnasNet ``ds``: dw kxk/s -> [SE] -> pw (no expansion)."""

    name = "ds"
    families = ("mnasnet",)
    fixed_expansion = True
    se = True
    aa_modes = ("spatial", "projection")

    def mid_channels(self, in_c: int, out_c: int, expansion: float) -> int:
        """The depthwise width: the block input's."""
        return in_c

    def sites(
        self, in_c: int, mid: int, out_c: int, kernel: int, stride: int, in_size: int, out_size: int
    ) -> Mapping[str, ConvSite]:
        """conv_dw (spatial), conv_pw (projection)."""
        return {
            "spatial": ConvSite(in_c, in_c, kernel, stride, in_size, out_size, True),
            "projection": ConvSite(in_c, out_c, 1, 1, out_size, out_size, False),
        }

    def cost(self, rb: ResolvedBlock) -> Cost:
        """dw + BN + SE + pw + BN."""
        return _add(
            self._conv(rb, "spatial"),
            bn_cost(rb.in_channels),
            _se(rb.in_channels, rb.se_channels),
            self._conv(rb, "projection"),
            bn_cost(rb.out_channels),
        )


class _Bottleneck(BlockType):
    """ResNet v1.5 ``bottle``: 1x1 -> kxk/s -> 1x1, projection shortcut (arXiv:1512.03385)."""

    name = "bottle"
    families = ("resnet",)
    projection_shortcut = True
    aa_modes = AA_MODES

    def mid_channels(self, in_c: int, out_c: int, expansion: float) -> int:
        """``round_half_up(out * e)``: ResNet-50's 256 * 0.25 = 64."""
        return _round_half_up(out_c * expansion)

    def sites(
        self, in_c: int, mid: int, out_c: int, kernel: int, stride: int, in_size: int, out_size: int
    ) -> Mapping[str, ConvSite]:
        """conv1 (expansion), conv2 (spatial), conv3 (projection)."""
        return {
            "expansion": ConvSite(in_c, mid, 1, 1, in_size, in_size, False),
            "spatial": ConvSite(mid, mid, kernel, stride, in_size, out_size, False),
            "projection": ConvSite(mid, out_c, 1, 1, out_size, out_size, False),
        }

    def cost(self, rb: ResolvedBlock) -> Cost:
        """conv1 + BN + conv2 + BN + conv3 + BN (+ 1x1 shortcut + BN)."""
        mid = rb.mid_channels
        return _add(
            self._conv(rb, "expansion"),
            bn_cost(mid),
            self._conv(rb, "spatial"),
            bn_cost(mid),
            self._conv(rb, "projection"),
            bn_cost(rb.out_channels),
            self._shortcut(rb),
        )


class _Basic(BlockType):
    """ResNet ``basic``: kxk/s [AA] -> kxk, projection shortcut."""

    name = "basic"
    families = ("resnet",)
    fixed_expansion = True
    projection_shortcut = True

    def mid_channels(self, in_c: int, out_c: int, expansion: float) -> int:
        """The first conv maps in -> out."""
        return out_c

    def sites(
        self, in_c: int, mid: int, out_c: int, kernel: int, stride: int, in_size: int, out_size: int
    ) -> Mapping[str, ConvSite]:
        """conv1 (spatial)."""
        return {"spatial": ConvSite(in_c, out_c, kernel, stride, in_size, out_size, False)}

    def cost(self, rb: ResolvedBlock) -> Cost:
        """conv1 + BN + conv2 + BN (+ 1x1 shortcut + BN)."""
        out = rb.out_channels
        return _add(
            self._conv(rb, "spatial"),
            bn_cost(out),
            conv_cost(out, out, rb.kernel, rb.out_size),
            bn_cost(out),
            self._shortcut(rb),
        )


class _PreAct(_Basic):
    """Wide-ResNet ``preact``: BN-act -> kxk/s [AA] -> BN-act -> kxk (arXiv:1605.07146)."""

    name = "preact"
    families = ("wrn",)

    def cost(self, rb: ResolvedBlock) -> Cost:
        """BN + conv1 + BN + conv2 (+ bias-free 1x1 shortcut, no BN)."""
        out = rb.out_channels
        return _add(
            bn_cost(rb.in_channels),
            self._conv(rb, "spatial"),
            bn_cost(out),
            conv_cost(out, out, rb.kernel, rb.out_size),
            self._shortcut(rb, bn=False),
        )


BLOCK_TYPES: Mapping[str, BlockType] = MappingProxyType(
    {
        t.name: t
        for t in (_DepthwiseSeparable(), _InvertedResidual(), _Basic(), _Bottleneck(), _PreAct())
    }
)


def block_type(name: str) -> BlockType:
    """The record of block type ``name``.

    Raises:
        SpecError: for an unknown name, listing the known ones.
    """
    try:
        return BLOCK_TYPES[name]
    except KeyError:
        raise SpecError(
            f"type: unknown block type {name!r}; expected one of {tuple(BLOCK_TYPES)}"
        ) from None
