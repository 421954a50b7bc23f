"""Frozen architecture specs: the one language every part of aanas speaks.

An :class:`ArchSpec` describes a whole network (MnasNet, ResNet or CIFAR Wide-ResNet) as data:
stem, stages of :class:`BlockSpec`, head, and per block an optional :class:`AASpec` that
attention-augments the block's spatial convolution (Bello et al., *Attention Augmented
Convolutional Networks*, ICCV 2019, arXiv:1904.09925). Specs are hashable (cost caches and
latency tables key on them), round-trip exactly through a compact string codec in the spirit of
timm's block strings, and through a plain-dict codec for JSON/YAML.

This module is layer L0: it never imports torch, so a search can decode, validate and cost a
candidate in microseconds, before any model exists.

String grammar (``encode``/``decode``)::

    <family>:<globals>:<stem>:<stage>/<stage>/...:<head>
    globals  i<input size>_n<num classes>_w<width multiplier>_d<dropout>
    stem     <conv|resnet|plain>_c<channels>_k<kernel>_s<stride>[_<act>]
    stage    <block>,<block>,...
    block    <ds|ir|basic|bottle|preact>_r<repeats>_k<kernel>_s<stride>_e<expansion>_c<out>
             [_se<ratio>][_<act>][_noskip][_aa<kappa>-<upsilon>-<heads>[-abs][-d<min dk/head>]
             [-exp|-proj]]
    head     c<channels>   (c0: no head convolution)

Example (MnasNet-B1, torchvision's ``mnasnet1_0``)::

    mnasnet:i224_n1000_w1_d0.2:conv_c32_k3_s2:ds_r1_k3_s1_e1_c16_noskip/ir_r3_k3_s2_e3_c24/
    ir_r3_k5_s2_e3_c40/ir_r3_k5_s2_e6_c80/ir_r2_k3_s1_e6_c96/ir_r4_k5_s2_e6_c192/
    ir_r1_k3_s1_e6_c320:c1280

Which convolution attention augments (``BlockSpec.aa``) is the AASpec's ``mode``: ``spatial``
(default, no token: the depthwise / 3x3 conv), ``expansion`` (``-exp``: the 1x1 expansion conv)
or ``projection`` (``-proj``: the 1x1 projection); which modes each block type allows, and what
each means, is documented once in ``aanas.block_types``. kappa = dk / Fout and upsilon =
dv / Fout, where Fout is the augmented conv's output channels; :func:`aa_channels` turns them
into integers divisible by the number of heads.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Iterator, Mapping, Sized
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from aanas import block_types as _bt
from aanas.errors import SpecError

__all__ = [
    "ACTIVATIONS",
    "BLOCK_TYPES",
    "FAMILIES",
    "MAX_AA_RESOLUTION",
    "SPEC_LIMITS",
    "STEM_TYPES",
    "AA_MODES",
    "AASpec",
    "ArchSpec",
    "BlockSpec",
    "ResolvedArch",
    "ResolvedBlock",
    "StemSpec",
    "aa_channels",
    "decode",
    "encode",
    "from_dict",
    "resolve",
    "round_channels",
    "to_dict",
]

FAMILIES: tuple[str, ...] = ("mnasnet", "resnet", "wrn")
BLOCK_TYPES: tuple[str, ...] = tuple(_bt.BLOCK_TYPES)  # one record each: aanas.block_types
AA_MODES: tuple[str, ...] = _bt.AA_MODES
STEM_TYPES: tuple[str, ...] = ("conv", "resnet", "plain")
ACTIVATIONS: tuple[str, ...] = ("relu", "relu6", "swish", "hswish")
# Families whose models end in the last block (ResNet: pool + fc; WRN: BN-act + pool + fc).
_NO_HEAD_FAMILIES: tuple[str, ...] = ("resnet", "wrn")
# Attention over an (H*W) x (H*W) logit matrix grows as (HW)^2: at 64x64 one head of one image
# already holds 16.8M logits. The paper augments maps of 32x32 (CIFAR) down to 7x7 (ImageNet).
MAX_AA_RESOLUTION = 64

# Upper bounds on every numeric spec field, in ONE table: (limit, why). They sit far above any
# published network, so no real user meets them, and low enough that decoding, resolving, costing
# and building a spec stay bounded in time and memory: an unbounded repeat count once made
# ``decode`` expand 10^9 blocks (2.5 GB in 30 s) and a c999999999 block reached the allocator.
# ``_check_limits`` enforces them before repeats are expanded or any channel count is derived.
# Lower bounds (>= 1, odd kernels) are validity rules checked with the fields themselves; so are
# the closed ranges of strides, dropout and ratios (_RANGE_FIELDS), listed here for completeness
# and enforced by those checks, whose messages name the exact allowed set.
SPEC_LIMITS: Mapping[str, tuple[float, str]] = MappingProxyType(
    {
        "input_size": (4096, "4K-pixel square inputs; ImageNet models use 224-600"),
        "num_classes": (100_000, "ImageNet-21k has 21,841 classes"),
        "width": (8.0, "width multiplier; EfficientNet-B7 uses 2.0"),
        "dropout": (1.0, "a probability"),
        "head_channels": (16384, "MnasNet's head has 1280"),
        "stem.channels": (16384, "ResNet's stem has 64"),
        "stem.kernel": (31, "RepLKNet's 31x31 is the largest published kernel"),
        "stem.stride": (2, "downsampling by 2"),
        "stages": (16, "number of stages; MnasNet has 7, ResNet 4"),
        "blocks": (64, "block entries per stage (runs of repeats)"),
        "repeats": (64, "ResNet-152's longest run is 36 blocks"),
        "total_blocks": (1024, "blocks after expanding repeats; ResNet-1001 has 333"),
        "out_channels": (16384, "ResNet-50's widest block has 2048"),
        "kernel": (31, "RepLKNet's 31x31 is the largest published kernel"),
        "stride": (2, "downsampling by 2"),
        "expansion": (32.0, "MnasNet expands by at most 6, ResNet bottlenecks by 0.25"),
        "se": (1.0, "a fraction of the block's input channels"),
        "aa.kappa": (1.0, "dk / Fout, a fraction (Bello et al. Sec. 3)"),
        "aa.upsilon": (1.0, "dv / Fout, a fraction (Bello et al. Sec. 3)"),
        "aa.heads": (128, "the AA paper uses 8 heads"),
        "aa.min_key_depth": (1024, "key depth per head; the AA paper's CIFAR WRN uses 20"),
        # every channel count after width scaling and expansion (stem, in, mid, out, head)
        "resolved_channels": (16384, "a 16384x16384 1x1 conv alone holds 268M weights"),
        # the whole network: fields inside their limits can still multiply past any memory
        "total_params": (2_000_000_000, "8 GB of float32 weights; BiT-L ResNet-152x4 has 0.93G"),
    }
)
_RANGE_FIELDS = frozenset({"dropout", "stem.stride", "stride", "se", "aa.kappa", "aa.upsilon"})


# --- value objects --------------------------------------------------------------------------


@dataclass(frozen=True)
class AASpec:
    """Attention augmentation of one block's spatial convolution (Bello et al., Sec. 3)."""

    kappa: float  # dk / Fout: key/query depth as a fraction of the conv's output channels
    upsilon: float  # dv / Fout: share of output channels produced by attention
    heads: int  # Nh; dk and dv are rounded to multiples of it
    relative: bool = True  # 2-D relative position logits (the paper's default)
    min_key_depth: int = 0  # lower bound on dk / Nh (the paper's CIFAR WRN uses 20)
    # Which conv is augmented (aanas.block_types.AA_MODES): the paper leaves it open for MnasNet
    mode: str = "spatial"


@dataclass(frozen=True)
class BlockSpec:
    """A run of ``repeats`` identical blocks; only the first one uses ``stride``."""

    type: str  # one of BLOCK_TYPES
    out_channels: int  # before the width multiplier
    repeats: int = 1
    kernel: int = 3  # spatial kernel of the depthwise / 3x3 conv
    stride: int = 1
    # ir: expanded = in * e; bottle: width = out * e (0.25 in ResNet); ds/basic/preact: 1
    expansion: float = 1.0
    se: float = 0.0  # squeeze-excitation ratio of the block input channels; 0 = off
    act: str = "relu"
    skip: bool = True  # residual connection where shapes allow it
    aa: AASpec | None = None


@dataclass(frozen=True)
class StemSpec:
    """First layer(s) of the network."""

    # conv: conv-BN-act; resnet: 7x7/2 conv-BN-ReLU + 3x3/2 max-pool; plain: conv only (WRN)
    type: str = "conv"
    channels: int = 32
    kernel: int = 3
    stride: int = 2
    act: str = "relu"


@dataclass(frozen=True)
class ArchSpec:
    """A whole network as data. Build it with ``aanas.create_model(spec)``."""

    family: str  # one of FAMILIES: picks the builder (stem/head layout, block kinds)
    stem: StemSpec
    stages: tuple[tuple[BlockSpec, ...], ...]
    head_channels: int = 0  # 1x1 conv before pooling (MnasNet: 1280); 0 = none
    num_classes: int = 1000
    input_size: int = 224  # square input; sets the AA relative tables' maximum size
    width: float = 1.0  # channel multiplier (MnasNet rule: multiples of 8, see round_channels)
    dropout: float = 0.0  # before the classifier

    def encode(self) -> str:
        """Canonical string form (see module docstring); ``decode(s.encode()) == s``."""
        return encode(self)

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form for JSON/YAML."""
        return to_dict(self)

    def digest(self) -> str:
        """Stable 16-hex-digit hash of the canonical string: a cache key across runs."""
        return hashlib.sha256(encode(self).encode()).hexdigest()[:16]

    def validate(self) -> ArchSpec:
        """Raise ``SpecError`` naming the block and field of the first invalid value."""
        resolve(self)
        return self

    def blocks(self) -> Iterator[tuple[str, BlockSpec]]:
        """``("stage<i>.block<j>", block)`` pairs in network order (0-based)."""
        for i, stage in enumerate(self.stages):
            for j, block in enumerate(stage):
                yield f"stage{i}.block{j}", block

    def scale(self, width: float | None = None, depth: float | None = None) -> ArchSpec:
        """Scaled copy: ``width`` replaces the channel multiplier, ``depth`` multiplies repeats.

        Repeats are rounded up, as in EfficientNet's depth scaling (``ceil(r * depth)``).
        """
        spec = self
        if width is not None:
            spec = dataclasses.replace(spec, width=float(width))
        if depth is not None:
            if not (_is_number(depth) and 0 < depth <= SPEC_LIMITS["repeats"][0]):
                raise SpecError(
                    f"depth multiplier must be in (0, {SPEC_LIMITS['repeats'][0]}], got {depth!r}"
                )
            stages = tuple(
                tuple(dataclasses.replace(b, repeats=math.ceil(b.repeats * depth)) for b in st)
                for st in spec.stages
            )
            spec = dataclasses.replace(spec, stages=stages)
        return spec.validate()

    def __str__(self) -> str:
        return encode(self)


# --- channel arithmetic ---------------------------------------------------------------------


def round_channels(channels: float, divisor: int = 8, round_up_bias: float = 0.9) -> int:
    """Round a scaled channel count to a multiple of ``divisor`` (torchvision MnasNet rule).

    Rounds to the nearest multiple, but never more than 10 % down: 83 -> 80, 84 -> 88, and
    24 * 0.75 = 18 -> 16 is 11 % down (16 < 0.9 * 18 = 16.2), so 18 -> 24.
    """
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded if rounded >= round_up_bias * channels else rounded + divisor


def aa_channels(
    out_channels: int,
    kappa: float,
    upsilon: float,
    num_heads: int,
    min_key_depth_per_head: int = 0,
) -> tuple[int, int]:
    """Converts the paper's attention ratios to integer key and value depths.

    The paper parametrises a layer by ``kappa = dk / Fout`` and ``upsilon = dv / Fout``; the
    layer needs integers divisible by ``num_heads``. The rule (round half up to a multiple of
    ``Nh``, at least one channel per head)::

        dk = max(Nh, round(kappa * Fout / Nh) * Nh)
        dv = max(Nh, round(upsilon * Fout / Nh) * Nh)
        dk = max(dk, min_key_depth_per_head * Nh)
        dv = min(dv, (Fout // Nh) * Nh)

    Worked examples:

    * ResNet-50 stage 4, ``aa_channels(512, 0.2, 0.1, 8)``: 102.4 / 8 = 12.8 -> 13 -> dk = 104;
      51.2 / 8 = 6.4 -> 6 -> dv = 48.
    * MnasNet expanded tensor, ``aa_channels(480, 0.1, 0.05, 4)``: dk = 48, dv = 24.
    * CIFAR Wide-ResNet (at least 20 key dims per head),
      ``aa_channels(160, 0.2, 0.1, 8, min_key_depth_per_head=20)``: dk = max(32, 160) = 160,
      dv = 16. dk may exceed ``Fout``; only ``dv <= Fout`` is required.

    Args:
        out_channels: ``Fout``, the layer's output channels.
        kappa: key depth ratio in (0, 1].
        upsilon: value depth ratio in (0, 1].
        num_heads: ``Nh``.
        min_key_depth_per_head: lower bound on ``dk / Nh``.

    Returns:
        ``(dk, dv)``.

    Raises:
        SpecError: if a ratio is outside (0, 1] or a count is not positive, or
            ``out_channels < num_heads`` (no multiple of ``Nh`` fits).
    """
    if out_channels < 1:
        raise SpecError(f"out_channels must be >= 1, got {out_channels}")
    if num_heads < 1:
        raise SpecError(f"num_heads must be >= 1, got {num_heads}")
    if out_channels < num_heads:
        raise SpecError(
            f"out_channels={out_channels} must be >= num_heads={num_heads} so that dv fits"
        )
    if min_key_depth_per_head < 0:
        raise SpecError(f"min_key_depth_per_head must be >= 0, got {min_key_depth_per_head}")
    for name, ratio in (("kappa", kappa), ("upsilon", upsilon)):
        if not 0.0 < ratio <= 1.0:
            raise SpecError(f"{name} must be in (0, 1], got {ratio}")

    def round_heads(ratio: float) -> int:
        # Half up, with a small epsilon so that 0.3 * 10 / 2 = 1.4999999999999998 rounds to 2.
        return max(num_heads, math.floor(ratio * out_channels / num_heads + 0.5 + 1e-9) * num_heads)

    dk = max(round_heads(kappa), min_key_depth_per_head * num_heads)
    dv = min(round_heads(upsilon), (out_channels // num_heads) * num_heads)
    return dk, dv


# --- resolution into concrete layers ----------------------------------------------------------


@dataclass(frozen=True)
class ResolvedBlock:
    """One concrete block after width scaling and repeat expansion: all integers."""

    name: str  # "stage<i>.block<j>.<k>" (k-th repeat)
    type: str
    in_channels: int
    mid_channels: int  # ir: expanded; bottle: bottleneck width; others: out_channels
    out_channels: int
    kernel: int
    stride: int
    in_size: int  # spatial side of the block input
    out_size: int
    se_channels: int  # squeeze width; 0 = no SE
    act: str
    residual: bool  # identity/projection shortcut actually added
    dk: int  # 0 when not augmented
    dv: int
    heads: int
    relative: bool
    aa_mode: str = ""  # AASpec.mode of an augmented block ("" when dv == 0)


@dataclass(frozen=True)
class ResolvedArch:
    """The concrete layer plan the builder, cost model and supernet all share."""

    spec: ArchSpec
    stem_channels: int
    stem_out_size: int
    blocks: tuple[ResolvedBlock, ...]
    head_channels: int
    features: int  # channels entering the classifier
    # (stage, index within the stage) of every block: its module path ``blocks.<s>.<i>``
    positions: tuple[tuple[int, int], ...] = ()

    def staged(self) -> Iterator[tuple[int, int, ResolvedBlock]]:
        """``(stage, index within stage, block)`` in network order (repeats counted)."""
        for (stage, index), rb in zip(self.positions, self.blocks, strict=True):
            yield stage, index, rb


def _conv_out(size: int, stride: int) -> int:
    """Output side of a 'same'-padded conv: ceil(size / stride) (padding = k // 2, odd k)."""
    return -(-size // stride)


def resolve(spec: ArchSpec) -> ResolvedArch:
    """Validate ``spec`` and expand it into concrete per-block channels and sizes.

    Raises:
        SpecError: naming the block (``stage2.block0``) and field of the first invalid value.
    """
    _check_limits(spec)
    _check_globals(spec)
    width = spec.width
    stem_c = round_channels(spec.stem.channels * width) if width != 1.0 else spec.stem.channels
    size = _conv_out(spec.input_size, spec.stem.stride)
    if spec.stem.type == "resnet":
        size = _conv_out(size, 2)  # 3x3/2 max-pool
    stem_size = size
    in_c = stem_c
    out: list[ResolvedBlock] = []
    _check_resolved_channels("stem.channels", stem_c)
    positions: list[tuple[int, int]] = []
    for i, stage in enumerate(spec.stages):
        index = 0
        for j, block in enumerate(stage):
            name = f"stage{i}.block{j}"
            _check_block(spec, name, block)
            out_c = (
                round_channels(block.out_channels * width) if width != 1.0 else block.out_channels
            )
            for k in range(block.repeats):
                stride = block.stride if k == 0 else 1
                out_size = _conv_out(size, stride)
                resolved = _resolve_one(f"{name}.{k}", block, in_c, out_c, stride, size, out_size)
                for key in ("mid_channels", "out_channels"):
                    _check_resolved_channels(f"{name}.{key}", getattr(resolved, key))
                out.append(resolved)
                positions.append((i, index))
                index += 1
                in_c, size = out_c, out_size
    head_c = spec.head_channels
    _check_total_params(spec, out, in_c)
    return ResolvedArch(
        spec=spec,
        stem_channels=stem_c,
        stem_out_size=stem_size,
        blocks=tuple(out),
        head_channels=head_c,
        features=head_c if head_c > 0 else in_c,
        positions=tuple(positions),
    )


def _resolve_one(
    name: str, b: BlockSpec, in_c: int, out_c: int, stride: int, size: int, out_size: int
) -> ResolvedBlock:
    where = name.rsplit(".", 1)[0]
    btype = _bt.block_type(b.type)
    mid = btype.mid_channels(in_c, out_c, b.expansion)
    if mid < 1:
        raise SpecError(f"{where}: expansion={b.expansion} gives {mid} channels")
    residual = btype.residual(b.skip, stride, in_c, out_c)
    se_c = max(1, int(in_c * b.se)) if b.se > 0 else 0
    dk = dv = heads = 0
    relative = False
    mode = ""
    if b.aa is not None:
        site = btype.sites(in_c, mid, out_c, b.kernel, stride, size, out_size)[b.aa.mode]
        if site.out_size > MAX_AA_RESOLUTION:
            raise SpecError(
                f"{where}.aa: attention on a {site.out_size}x{site.out_size} feature map exceeds "
                f"the supported maximum {MAX_AA_RESOLUTION}x{MAX_AA_RESOLUTION}"
            )
        try:
            dk, dv = aa_channels(
                site.out_channels, b.aa.kappa, b.aa.upsilon, b.aa.heads, b.aa.min_key_depth
            )
        except ValueError as exc:
            raise SpecError(f"{where}.aa: {exc}") from None
        heads, relative, mode = b.aa.heads, b.aa.relative, b.aa.mode
    return ResolvedBlock(
        name=name,
        type=b.type,
        in_channels=in_c,
        mid_channels=mid,
        out_channels=out_c,
        kernel=b.kernel,
        stride=stride,
        in_size=size,
        out_size=out_size,
        se_channels=se_c,
        act=b.act,
        residual=residual,
        dk=dk,
        dv=dv,
        heads=heads,
        relative=relative,
        aa_mode=mode,
    )


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _check_limit(where: str, key: str, value: object) -> None:
    """SpecError when a number exceeds ``SPEC_LIMITS[key]`` or is not finite.

    Values of the wrong type pass here: the field checks name them with their expected type.
    """
    if isinstance(value, bool):  # True == 1 would pass every numeric check below
        raise SpecError(f"{where}: must be a number, got {value!r}")
    if not isinstance(value, int | float) or key in _RANGE_FIELDS:
        return
    limit, why = SPEC_LIMITS[key]
    # not math.isfinite(value) alone: it raises OverflowError for an int like 10**400
    if value > limit or (isinstance(value, float) and not math.isfinite(value)):
        raise SpecError(f"{where}: must be <= {_fmt(limit)} ({why}), got {value!r}")


def _check_limits(spec: ArchSpec) -> None:
    """Every field against SPEC_LIMITS, before any repeat is expanded or channel derived."""
    for key in ("input_size", "num_classes", "width", "dropout", "head_channels"):
        _check_limit(key, key, getattr(spec, key))
    for key in ("channels", "kernel", "stride"):
        _check_limit(f"stem.{key}", f"stem.{key}", getattr(spec.stem, key, None))
    stages = spec.stages
    if isinstance(stages, Sized):
        _check_limit("stages", "stages", len(stages))
    total = 0
    for i, stage in enumerate(stages):
        if isinstance(stage, Sized):
            _check_limit(f"stage{i}", "blocks", len(stage))
        for j, b in enumerate(stage):
            where = f"stage{i}.block{j}"
            for key in ("repeats", "out_channels", "kernel", "stride", "expansion", "se"):
                _check_limit(f"{where}.{key}", key, getattr(b, key, None))
            aa = getattr(b, "aa", None)
            for key in ("kappa", "upsilon", "heads", "min_key_depth"):
                _check_limit(f"{where}.aa.{key}", f"aa.{key}", getattr(aa, key, None))
            # flags from a dict must be real bools: {"skip": {}} would make the spec unhashable
            _check_bool(f"{where}.skip", getattr(b, "skip", True))
            _check_bool(f"{where}.aa.relative", getattr(aa, "relative", True))
            repeats = getattr(b, "repeats", None)
            total += repeats if isinstance(repeats, int) and repeats > 0 else 0
    _check_limit("stages", "total_blocks", total)


def _check_total_params(spec: ArchSpec, blocks: list[ResolvedBlock], last_c: int) -> None:
    """Weights of the whole network against SPEC_LIMITS["total_params"], before any is allocated.

    Each field can be inside its own limit while their product is not (64 repeats of a 16384-
    channel block hold 17G weights), so the sum is checked too: blocks by their record's formula,
    head conv and classifier by their weight matrices (biases and BN are negligible here).
    """
    head_c = spec.head_channels
    params = sum(_bt.block_type(rb.type).cost(rb)[0] for rb in blocks)
    params += last_c * head_c + (head_c or last_c) * spec.num_classes
    limit, why = SPEC_LIMITS["total_params"]
    if params > limit:
        raise SpecError(
            f"spec: {params / 1e9:.1f}G parameters; must be <= {limit / 1e9:.0f}G ({why})"
        )


def _check_bool(where: str, value: object) -> None:
    if not isinstance(value, bool):
        raise SpecError(f"{where}: must be true or false, got {value!r}")


def _check_resolved_channels(where: str, channels: int) -> None:
    limit, why = SPEC_LIMITS["resolved_channels"]
    if channels > limit:
        raise SpecError(
            f"{where}: {channels} channels after width and expansion; must be <= {limit} ({why})"
        )


def _check_globals(spec: ArchSpec) -> None:
    if spec.family not in FAMILIES:
        raise SpecError(f"family: unknown family {spec.family!r}; expected one of {FAMILIES}")
    _check_int("input_size", spec.input_size, 1)
    _check_int("num_classes", spec.num_classes, 1)
    _check_int("head_channels", spec.head_channels, 0)
    if not (isinstance(spec.width, float | int) and spec.width > 0):
        raise SpecError(f"width: must be a number > 0, got {spec.width!r}")
    if not (isinstance(spec.dropout, float | int) and 0.0 <= spec.dropout < 1.0):
        raise SpecError(f"dropout: must be in [0, 1), got {spec.dropout!r}")
    stem = spec.stem
    if stem.type not in STEM_TYPES:
        raise SpecError(f"stem.type: unknown stem {stem.type!r}; expected one of {STEM_TYPES}")
    _check_int("stem.channels", stem.channels, 1)
    _check_kernel("stem.kernel", stem.kernel)
    if stem.stride not in (1, 2):
        raise SpecError(f"stem.stride: must be 1 or 2, got {stem.stride!r}")
    if stem.act not in ACTIVATIONS:
        raise SpecError(f"stem.act: unknown activation {stem.act!r}; expected {ACTIVATIONS}")
    if not spec.stages or not all(spec.stages):
        raise SpecError("stages: need at least one stage, each with at least one block")
    if spec.family in _NO_HEAD_FAMILIES and spec.head_channels:
        raise SpecError(
            f"head_channels: family {spec.family!r} has no head conv; expected c0, "
            f"got c{spec.head_channels}"
        )


def _check_block(spec: ArchSpec, name: str, b: BlockSpec) -> None:
    if b.type not in BLOCK_TYPES:
        raise SpecError(
            f"{name}.type: unknown block type {b.type!r}; expected one of {BLOCK_TYPES}"
        )
    _check_int(f"{name}.out_channels", b.out_channels, 1)
    _check_int(f"{name}.repeats", b.repeats, 1)
    _check_kernel(f"{name}.kernel", b.kernel)
    if b.stride not in (1, 2):
        raise SpecError(f"{name}.stride: must be 1 or 2, got {b.stride!r}")
    if not (isinstance(b.expansion, float | int) and b.expansion > 0):
        raise SpecError(f"{name}.expansion: must be > 0, got {b.expansion!r}")
    if not (isinstance(b.se, float | int) and 0.0 <= b.se < 1.0):
        raise SpecError(f"{name}.se: ratio must be in [0, 1), got {b.se!r}")
    if b.act not in ACTIVATIONS:
        raise SpecError(f"{name}.act: unknown activation {b.act!r}; expected {ACTIVATIONS}")
    if b.aa is not None:
        aa = b.aa
        if not (isinstance(aa.kappa, float | int) and 0.0 < aa.kappa <= 1.0):
            raise SpecError(f"{name}.aa.kappa: must be in (0, 1], got {aa.kappa!r}")
        if not (isinstance(aa.upsilon, float | int) and 0.0 < aa.upsilon <= 1.0):
            raise SpecError(f"{name}.aa.upsilon: must be in (0, 1], got {aa.upsilon!r}")
        _check_int(f"{name}.aa.heads", aa.heads, 1)
        _check_int(f"{name}.aa.min_key_depth", aa.min_key_depth, 0)
        if aa.mode not in AA_MODES:
            raise SpecError(f"{name}.aa.mode: unknown mode {aa.mode!r}; expected one of {AA_MODES}")
    _bt.block_type(b.type).check(name, b, spec.family)  # per-type rules: aanas.block_types


def _check_int(field_name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SpecError(f"{field_name}: must be an integer >= {low}, got {value!r}")


def _check_kernel(field_name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise SpecError(f"{field_name}: must be an odd integer >= 1, got {value!r}")


# --- string codec ---------------------------------------------------------------------------


def _fmt(x: float) -> str:
    """Shortest exact decimal form: 6.0 -> '6', 0.25 -> '0.25' (repr round-trips floats)."""
    if float(x).is_integer():
        return str(int(x))
    return repr(float(x))


# AA token options naming AASpec.mode; "spatial" (the default) has none.
_MODE_TOKENS: dict[str, str] = {"expansion": "exp", "projection": "proj"}
_TOKEN_MODES: dict[str, str] = {v: k for k, v in _MODE_TOKENS.items()}


def _encode_aa(aa: AASpec) -> str:
    text = f"aa{_fmt(aa.kappa)}-{_fmt(aa.upsilon)}-{aa.heads}"
    if not aa.relative:
        text += "-abs"
    if aa.min_key_depth:
        text += f"-d{aa.min_key_depth}"
    if aa.mode != "spatial":
        text += f"-{_MODE_TOKENS[aa.mode]}"
    return text


def _encode_block(b: BlockSpec) -> str:
    tokens = [
        b.type,
        f"r{b.repeats}",
        f"k{b.kernel}",
        f"s{b.stride}",
        f"e{_fmt(b.expansion)}",
        f"c{b.out_channels}",
    ]
    if b.se:
        tokens.append(f"se{_fmt(b.se)}")
    if b.act != "relu":
        tokens.append(b.act)
    if not b.skip:
        tokens.append("noskip")
    if b.aa is not None:
        tokens.append(_encode_aa(b.aa))
    return "_".join(tokens)


def encode(spec: ArchSpec) -> str:
    """Canonical string of ``spec`` (grammar in the module docstring)."""
    glob = f"i{spec.input_size}_n{spec.num_classes}_w{_fmt(spec.width)}_d{_fmt(spec.dropout)}"
    st = spec.stem
    stem = f"{st.type}_c{st.channels}_k{st.kernel}_s{st.stride}"
    if st.act != "relu":
        stem += f"_{st.act}"
    stages = "/".join(",".join(_encode_block(b) for b in stage) for stage in spec.stages)
    return f"{spec.family}:{glob}:{stem}:{stages}:c{spec.head_channels}"


def _parse_number(field_name: str, text: str, kind: type) -> Any:
    try:
        value = kind(text)
    except ValueError:
        raise SpecError(f"{field_name}: cannot parse {text!r} as {kind.__name__}") from None
    if kind is float and not math.isfinite(value):
        raise SpecError(f"{field_name}: must be finite, got {text!r}")
    return value


def _split_tokens(where: str, text: str) -> list[str]:
    tokens = text.split("_")
    if any(not t for t in tokens):
        raise SpecError(f"{where}: empty token in {text!r}")
    return tokens


# Keyed tokens of a block string: prefix -> (BlockSpec field, type).
_BLOCK_KEYS: dict[str, tuple[str, type]] = {
    "r": ("repeats", int),
    "k": ("kernel", int),
    "s": ("stride", int),
    "e": ("expansion", float),
    "c": ("out_channels", int),
    "se": ("se", float),
}


def _decode_aa(where: str, token: str) -> AASpec:
    parts = token[2:].split("-")
    if len(parts) < 3:
        raise SpecError(f"{where}: AA token {token!r} must be aa<kappa>-<upsilon>-<heads>")
    kappa = _parse_number(f"{where}.aa.kappa", parts[0], float)
    upsilon = _parse_number(f"{where}.aa.upsilon", parts[1], float)
    heads = _parse_number(f"{where}.aa.heads", parts[2], int)
    relative, min_key_depth, mode = True, 0, "spatial"
    seen: set[str] = set()
    for opt in parts[3:]:
        key = "abs" if opt == "abs" else "mode" if opt in _TOKEN_MODES else opt[:1]
        if key in seen:
            raise SpecError(f"{where}: duplicate AA option {opt!r} in {token!r}")
        seen.add(key)
        if opt == "abs":
            relative = False
        elif opt in _TOKEN_MODES:
            mode = _TOKEN_MODES[opt]
        elif opt.startswith("d") and opt[1:]:
            min_key_depth = _parse_number(f"{where}.aa.min_key_depth", opt[1:], int)
        else:
            raise SpecError(f"{where}: unknown AA option {opt!r} in {token!r}")
    return AASpec(kappa, upsilon, heads, relative, min_key_depth, mode)


def _decode_block(where: str, text: str) -> BlockSpec:
    tokens = _split_tokens(where, text)
    btype = tokens[0]
    if btype not in BLOCK_TYPES:
        raise SpecError(f"{where}: unknown block type {btype!r}; expected one of {BLOCK_TYPES}")
    values: dict[str, Any] = {"type": btype}
    for token in tokens[1:]:
        if token in ACTIVATIONS:
            key, value = "act", token
        elif token == "noskip":
            key, value = "skip", False
        elif token.startswith("aa"):
            key, value = "aa", _decode_aa(where, token)
        else:
            prefix = "se" if token.startswith("se") else token[:1]
            if prefix not in _BLOCK_KEYS:
                raise SpecError(f"{where}: unknown token {token!r} in {text!r}")
            key, kind = _BLOCK_KEYS[prefix]
            value = _parse_number(f"{where}.{key}", token[len(prefix) :], kind)
        if key in values:
            raise SpecError(f"{where}: duplicate {key} token {token!r} in {text!r}")
        values[key] = value
    if "out_channels" not in values:
        raise SpecError(f"{where}: block {text!r} needs an output-channel token c<N>")
    return BlockSpec(**values)


def _decode_stem(text: str) -> StemSpec:
    tokens = _split_tokens("stem", text)
    values: dict[str, Any] = {"type": tokens[0]}
    keys = {"c": ("channels", int), "k": ("kernel", int), "s": ("stride", int)}
    for token in tokens[1:]:
        if token in ACTIVATIONS:
            key, value = "act", token
        elif token[:1] in keys:
            key, kind = keys[token[:1]]
            value = _parse_number(f"stem.{key}", token[1:], kind)
        else:
            raise SpecError(f"stem: unknown token {token!r} in {text!r}")
        if key in values:
            raise SpecError(f"stem: duplicate {key} token {token!r}")
        values[key] = value
    return StemSpec(**values)


def _decode_globals(text: str) -> dict[str, Any]:
    keys = {
        "i": ("input_size", int),
        "n": ("num_classes", int),
        "w": ("width", float),
        "d": ("dropout", float),
    }
    values: dict[str, Any] = {}
    for token in _split_tokens("globals", text):
        if token[:1] not in keys:
            raise SpecError(f"globals: unknown token {token!r} in {text!r}")
        key, kind = keys[token[:1]]
        if key in values:
            raise SpecError(f"globals: duplicate {key} token {token!r}")
        values[key] = _parse_number(key, token[1:], kind)
    return values


def decode(text: str) -> ArchSpec:
    """Parse and validate a spec string (see module docstring).

    Raises:
        SpecError: naming the part, block and token that is wrong.
    """
    if not isinstance(text, str):
        raise SpecError(f"spec: expected a spec string, got {type(text).__name__}")
    parts = text.strip().split(":")
    if len(parts) != 5:
        raise SpecError(
            f"spec string must have 5 ':'-separated parts "
            f"(family:globals:stem:stages:head), got {len(parts)} in {text!r}"
        )
    family, glob, stem, stages_text, head = parts
    stages: list[tuple[BlockSpec, ...]] = []
    stage_texts = stages_text.split("/")
    _check_limit("stages", "stages", len(stage_texts))  # before decoding any block
    for i, stage_text in enumerate(stage_texts):
        block_texts = stage_text.split(",")
        _check_limit(f"stage{i}", "blocks", len(block_texts))
        blocks = tuple(
            _decode_block(f"stage{i}.block{j}", block_text)
            for j, block_text in enumerate(block_texts)
        )
        stages.append(blocks)
    if not head.startswith("c"):
        raise SpecError(f"head: expected c<channels>, got {head!r}")
    spec = ArchSpec(
        family=family,
        stem=_decode_stem(stem),
        stages=tuple(stages),
        head_channels=_parse_number("head_channels", head[1:], int),
        **_decode_globals(glob),
    )
    return spec.validate()


# --- dict codec -------------------------------------------------------------------------------


def to_dict(spec: ArchSpec) -> dict[str, Any]:
    """Nested plain-dict form (lists for tuples), for JSON/YAML; inverse of :func:`from_dict`."""
    data = dataclasses.asdict(spec)
    data["stages"] = [list(stage) for stage in data["stages"]]
    return json.loads(json.dumps(data))  # tuples -> lists everywhere


def _build(cls: type, where: str, data: Any) -> Any:
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = dataclasses.fields(cls)
    names = {f.name for f in fields}
    unknown = sorted((k for k in data if k not in names), key=str)  # keys may be any YAML scalar
    if unknown:
        raise SpecError(f"{where}: unknown key {unknown[0]!r}; expected keys {sorted(names)}")
    for f in fields:
        no_default = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if no_default and f.name not in data:
            raise SpecError(f"{where}: missing key {f.name!r}")
    return cls(**data)


def _as_list(where: str, data: Any) -> list[Any] | tuple[Any, ...]:
    if not isinstance(data, list | tuple):
        raise SpecError(f"{where}: expected a list, got {type(data).__name__}")
    return data


def from_dict(data: Mapping[str, Any]) -> ArchSpec:
    """Build and validate an ArchSpec from :func:`to_dict` output (unknown keys are errors)."""
    if not isinstance(data, Mapping):
        raise SpecError(f"spec: expected a mapping, got {type(data).__name__}")
    fields: dict[str, Any] = dict(data)
    for required in ("family", "stem", "stages"):
        if required not in fields:
            raise SpecError(f"spec: missing key {required!r}")
    fields["stem"] = _build(StemSpec, "stem", fields["stem"])
    stages = []
    stage_list = _as_list("stages", fields["stages"])
    _check_limit("stages", "stages", len(stage_list))  # before building any block
    for i, stage in enumerate(stage_list):
        blocks = []
        block_list = _as_list(f"stage{i}", stage)
        _check_limit(f"stage{i}", "blocks", len(block_list))
        for j, block in enumerate(block_list):
            where = f"stage{i}.block{j}"
            block = dict(_as_mapping(where, block))
            if block.get("aa") is not None:
                block["aa"] = _build(AASpec, f"{where}.aa", block["aa"])
            blocks.append(_build(BlockSpec, where, block))
        stages.append(tuple(blocks))
    fields["stages"] = tuple(stages)
    spec: ArchSpec = _build(ArchSpec, "spec", fields)
    for key in ("width", "dropout"):
        spec = dataclasses.replace(spec, **{key: _as_float(getattr(spec, key))})
    return _normalize_numbers(spec).validate()


def _as_mapping(where: str, data: Any) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise SpecError(f"{where}: expected a mapping, got {type(data).__name__}")
    return data


def _normalize_numbers(spec: ArchSpec) -> ArchSpec:
    """JSON turns 6.0 into 6: coerce float fields back so from_dict(to_dict(s)) == s."""

    def block(b: BlockSpec) -> BlockSpec:
        aa = b.aa
        if aa is not None:
            aa = dataclasses.replace(aa, kappa=_as_float(aa.kappa), upsilon=_as_float(aa.upsilon))
        return dataclasses.replace(b, expansion=_as_float(b.expansion), se=_as_float(b.se), aa=aa)

    stages = tuple(tuple(block(b) for b in stage) for stage in spec.stages)
    return dataclasses.replace(spec, stages=stages)


def _as_float(x: Any) -> Any:
    """int -> float; an int too large for a float stays an int, for the limits to reject."""
    if isinstance(x, int) and not isinstance(x, bool) and abs(x) < 2**1000:
        return float(x)
    return x
