"""Spec codec round trips, validation errors and channel arithmetic (aanas.spec)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from aanas import spec as S
from aanas.errors import SpecError
from aanas.spec import AASpec, ArchSpec, BlockSpec, StemSpec

MNASNET_B1 = (
    "mnasnet:i224_n1000_w1_d0.2:conv_c32_k3_s2:ds_r1_k3_s1_e1_c16_noskip/ir_r3_k3_s2_e3_c24/"
    "ir_r3_k5_s2_e3_c40/ir_r3_k5_s2_e6_c80/ir_r2_k3_s1_e6_c96/ir_r4_k5_s2_e6_c192/"
    "ir_r1_k3_s1_e6_c320:c1280"
)


# --- strategies -----------------------------------------------------------------------------

_floats = st.sampled_from([0.05, 0.1, 0.125, 0.2, 0.25, 0.3, 0.5, 1.0, 0.123456789])
_aa = st.builds(
    AASpec,
    kappa=_floats,
    upsilon=st.sampled_from([0.05, 0.1, 0.125, 0.25]),
    heads=st.sampled_from([1, 2, 4]),
    relative=st.booleans(),
    min_key_depth=st.sampled_from([0, 4]),
)


@st.composite
def _mnasnet_block(draw: st.DrawFn) -> BlockSpec:
    btype = draw(st.sampled_from(["ir", "ds"]))
    return BlockSpec(
        type=btype,
        out_channels=draw(st.integers(8, 96)),
        repeats=draw(st.integers(1, 3)),
        kernel=draw(st.sampled_from([1, 3, 5, 7])),
        stride=draw(st.sampled_from([1, 2])),
        expansion=1.0 if btype == "ds" else draw(st.sampled_from([1.0, 3.0, 4.5, 6.0])),
        se=draw(st.sampled_from([0.0, 0.25, 0.5])),
        act=draw(st.sampled_from(S.ACTIVATIONS)),
        skip=draw(st.booleans()),
        aa=draw(st.none() | _aa),
    )


@st.composite
def _resnet_block(draw: st.DrawFn) -> BlockSpec:
    btype = draw(st.sampled_from(["basic", "bottle"]))
    return BlockSpec(
        type=btype,
        out_channels=draw(st.integers(16, 128)),
        repeats=draw(st.integers(1, 3)),
        kernel=3,
        stride=draw(st.sampled_from([1, 2])),
        expansion=0.25 if btype == "bottle" else 1.0,
        skip=draw(st.booleans()),
        aa=draw(st.none() | _aa),
    )


@st.composite
def _wrn_block(draw: st.DrawFn) -> BlockSpec:
    return BlockSpec(
        type="preact",
        out_channels=draw(st.integers(16, 160)),
        repeats=draw(st.integers(1, 3)),
        kernel=draw(st.sampled_from([1, 3])),
        stride=draw(st.sampled_from([1, 2])),
        skip=draw(st.booleans()),
        aa=draw(st.none() | _aa),
    )


_STEMS = {"mnasnet": "conv", "resnet": "resnet", "wrn": "plain"}
_BLOCKS = {"mnasnet": _mnasnet_block, "resnet": _resnet_block, "wrn": _wrn_block}


@st.composite
def arch_specs(draw: st.DrawFn) -> ArchSpec:
    family = draw(st.sampled_from(S.FAMILIES))
    block = _BLOCKS[family]()
    stages = draw(st.lists(st.lists(block, min_size=1, max_size=3), min_size=1, max_size=4))
    return ArchSpec(
        family=family,
        stem=StemSpec(
            type=_STEMS[family],
            channels=draw(st.integers(8, 64)),
            kernel=draw(st.sampled_from([3, 5, 7])),
            stride=draw(st.sampled_from([1, 2])),
            act=draw(st.sampled_from(S.ACTIVATIONS)),
        ),
        stages=tuple(tuple(s) for s in stages),
        head_channels=draw(st.sampled_from([0, 64, 1280])),
        num_classes=draw(st.integers(1, 1000)),
        input_size=draw(st.sampled_from([32, 56, 64])),
        width=draw(st.sampled_from([0.5, 0.75, 1.0, 1.3])),
        dropout=draw(st.sampled_from([0.0, 0.2, 0.5])),
    )


def _valid(spec: ArchSpec) -> bool:
    try:
        spec.validate()
    except ValueError:
        return False
    return True


# --- round trips ----------------------------------------------------------------------------


# Invalid draws (attention on a too-large map, more heads than channels) are discarded with
# assume(), so Hypothesis counts only valid examples and fails the health check if most are not.
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(arch_specs())
def test_string_and_dict_round_trip(spec: ArchSpec) -> None:
    assume(_valid(spec))
    text = S.encode(spec)
    assert S.decode(text) == spec
    assert S.encode(S.decode(text)) == text
    as_json = json.loads(json.dumps(S.to_dict(spec)))
    assert S.from_dict(as_json) == spec
    assert hash(S.decode(text)) == hash(spec)


def test_known_string_is_canonical() -> None:
    spec = S.decode(MNASNET_B1)
    assert S.encode(spec) == MNASNET_B1
    assert spec.stages[1][0] == BlockSpec("ir", 24, repeats=3, kernel=3, stride=2, expansion=3)
    assert spec.stages[0][0].skip is False


def test_decode_accepts_any_token_order() -> None:
    a = S.decode("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_c24_e6_s2_k5_r2_se0.25:c0")
    b = S.decode("mnasnet:n10_i32_d0_w1:conv_s2_k3_c16:ir_r2_k5_s2_e6_c24_se0.25:c0")
    assert a == b
    assert S.encode(a) == "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_r2_k5_s2_e6_c24_se0.25:c0"


def test_aa_token() -> None:
    spec = S.decode("resnet:i32_n10_w1_d0:resnet_c64_k7_s2:basic_r1_k3_s1_e1_c64_aa0.2-0.1-8:c0")
    assert spec.stages[0][0].aa == AASpec(0.2, 0.1, 8)
    text = "wrn:i32_n100_w1_d0:plain_c16_k3_s1:preact_r1_k3_s1_e1_c160_aa0.2-0.1-8-abs-d20:c0"
    spec = S.decode(text)
    assert spec.stages[0][0].aa == AASpec(0.2, 0.1, 8, relative=False, min_key_depth=20)
    assert S.encode(spec) == text


def test_digest_is_stable_and_distinguishes() -> None:
    spec = S.decode(MNASNET_B1)
    # The digest is a cache key across runs and machines: pin it, and check it is the documented
    # sha256 prefix of the canonical string (computed here by hashlib, not by the code under test).
    assert spec.digest() == "ab3327c2d06d3df7"
    assert spec.digest() == hashlib.sha256(MNASNET_B1.encode("utf-8")).hexdigest()[:16]
    other = dataclasses.replace(spec, num_classes=10)
    assert other.digest() != spec.digest()
    code = f"from aanas.spec import decode; print(decode({MNASNET_B1!r}).digest())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == spec.digest()


def test_spec_module_does_not_import_torch() -> None:
    code = "import sys, aanas.spec; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# --- validation -----------------------------------------------------------------------------

_BASE = "mnasnet:i224_n1000_w1_d0.2:conv_c32_k3_s2:{block}:c1280"


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ("ir_r1_k3_s3_e6_c24", r"stage0\.block0\.stride: must be 1 or 2, got 3"),
        ("ir_r1_k4_s1_e6_c24", r"stage0\.block0\.kernel: must be an odd integer"),
        ("ir_r0_k3_s1_e6_c24", r"stage0\.block0\.repeats: must be an integer >= 1, got 0"),
        ("ir_r1_k3_s1_e6_c24_zz9", r"stage0\.block0: unknown token 'zz9'"),
        ("ir_r1_k3_s1_e6_e3_c24", r"stage0\.block0: duplicate expansion token"),
        ("xx_r1_k3_s1_e6_c24", r"stage0\.block0: unknown block type 'xx'"),
        ("basic_r1_k3_s1_e1_c24", r"stage0\.block0\.type: block 'basic' is not allowed"),
        ("ir_r1_k3_s1_e6", r"needs an output-channel token"),
        ("ir_r1_k3_s1_e6_c24_aa0-0.1-4", r"stage0\.block0\.aa\.kappa: must be in \(0, 1\], got 0"),
        ("ir_r1_k3_s1_e6_c24_aa0.2-1.5-4", r"stage0\.block0\.aa\.upsilon: must be in \(0, 1\]"),
        ("ir_r1_k3_s1_e6_c24_aa0.2-0.1-0", r"stage0\.block0\.aa\.heads: must be an integer >= 1"),
        ("ir_r1_k3_s1_e6_c24_aa0.2-0.1", r"AA token 'aa0.2-0.1' must be"),
        ("ir_r1_k3_s1_e6_c24_aa0.2-0.1-4-xyz", r"unknown AA option 'xyz'"),
        ("ir_r1_k3_s1_e6_c24_se1.5", r"stage0\.block0\.se: ratio must be in \[0, 1\)"),
        ("ir_r1_k3_s1_ex_c24", r"stage0\.block0\.expansion: cannot parse 'x' as float"),
        ("ds_r1_k3_s1_e6_c24", r"stage0\.block0\.expansion: 'ds' blocks take e1"),
        ("ir_r1_k3_s1_e6_c24_gelu", r"unknown token 'gelu'"),
    ],
)
def test_invalid_block_names_block_and_field(block: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S.decode(_BASE.format(block=block))


def test_aa_heads_do_not_fit_the_conv() -> None:
    # ds block at 16 input channels: Nh=32 needs dv >= 32 > 16 channels.
    text = "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ds_r1_k3_s1_e1_c16_aa0.1-0.1-32:c0"
    with pytest.raises(ValueError, match=r"stage0\.block0\.aa: out_channels=16 must be >= num_"):
        S.decode(text)


def test_aa_feature_map_larger_than_max() -> None:
    text = "mnasnet:i224_n10_w1_d0:conv_c16_k3_s1:ir_r1_k3_s1_e6_c16_aa0.2-0.1-4:c0"
    with pytest.raises(ValueError, match=r"stage0\.block0\.aa: attention on a 224x224 feature map"):
        S.decode(text)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("mnasnet:i224:conv_c32_k3_s2:ir_r1_k3_s1_e6_c24", r"5 ':'-separated parts"),
        ("foo:i224_n10_w1_d0:conv_c32_k3_s2:ir_r1_k3_s1_e6_c24:c0", r"family: unknown family"),
        ("mnasnet:i224_q3:conv_c32_k3_s2:ir_r1_k3_s1_e6_c24:c0", r"globals: unknown token 'q3'"),
        ("mnasnet:i224_w0_d0:conv_c32_k3_s2:ir_r1_k3_s1_e6_c24:c0", r"width: must be a number > 0"),
        ("mnasnet:i224_d1:conv_c32_k3_s2:ir_r1_k3_s1_e6_c24:c0", r"dropout: must be in \[0, 1\)"),
        ("mnasnet:i224:cone_c32_k3_s2:ir_r1_k3_s1_e6_c24:c0", r"stem\.type: unknown stem 'cone'"),
        ("mnasnet:i224:conv_c32_k3_s2:ir_r1_k3_s1_e6_c24:x5", r"head: expected c<channels>"),
        ("mnasnet:i0:conv_c32_k3_s2:ir_r1_k3_s1_e6_c24:c0", r"input_size: must be an integer >= 1"),
    ],
)
def test_invalid_global_fields(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        S.decode(text)


def test_from_dict_rejects_unknown_keys() -> None:
    data = S.to_dict(S.decode(MNASNET_B1))
    data["stages"][2][0]["kernal"] = 5
    with pytest.raises(ValueError, match=r"stage2\.block0: unknown key 'kernal'"):
        S.from_dict(data)
    data = S.to_dict(S.decode(MNASNET_B1))
    data["colour"] = "red"
    with pytest.raises(ValueError, match=r"spec: unknown key 'colour'"):
        S.from_dict(data)


# --- channel arithmetic and resolution ------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "expected"),
    # torchvision's _round_to_multiple_of examples and its MnasNet width tables
    [(83, 80), (84, 88), (18, 24), (32 * 0.5, 16), (16 * 0.5, 8), (24 * 0.5, 16), (320 * 1.3, 416)],
)
def test_round_channels(value: float, expected: int) -> None:
    assert S.round_channels(value) == expected


def test_round_channels_matches_torchvision_mnasnet_depths() -> None:
    from torchvision.models import mnasnet as tv

    for alpha in (0.5, 0.75, 1.0, 1.3):
        base = [32, 16, 24, 40, 80, 96, 192, 320]
        assert [S.round_channels(c * alpha) for c in base] == tv._get_depths(alpha)


@pytest.mark.parametrize(
    ("fout", "kappa", "upsilon", "heads", "min_dk", "expected"),
    [
        (256, 0.2, 0.1, 8, 0, (48, 24)),  # 51.2 -> 6.4 heads -> 6*8; 25.6 -> 3.2 -> 3*8
        (512, 0.2, 0.1, 8, 0, (104, 48)),  # 102.4/8 = 12.8 -> 13*8; 51.2/8 = 6.4 -> 6*8
        (160, 0.2, 0.1, 8, 20, (160, 16)),  # the WRN rule: at least 20 key dims per head
        (480, 0.1, 0.05, 4, 0, (48, 24)),
        (10, 0.1, 0.1, 4, 0, (4, 4)),  # at least one channel per head
        (64, 1.0, 1.0, 4, 0, (64, 64)),  # fully attentional
    ],
)
def test_aa_channels(
    fout: int, kappa: float, upsilon: float, heads: int, min_dk: int, expected: tuple[int, int]
) -> None:
    assert S.aa_channels(fout, kappa, upsilon, heads, min_dk) == expected


def test_resolve_sizes_and_channels() -> None:
    spec = S.decode(MNASNET_B1)
    r = S.resolve(spec)
    assert r.stem_channels == 32 and r.stem_out_size == 112
    assert len(r.blocks) == 1 + 3 + 3 + 3 + 2 + 4 + 1
    first_ir = r.blocks[1]
    assert (first_ir.in_channels, first_ir.mid_channels, first_ir.out_channels) == (16, 48, 24)
    assert (first_ir.in_size, first_ir.out_size, first_ir.residual) == (112, 56, False)
    assert r.blocks[2].residual and r.blocks[2].stride == 1
    assert r.blocks[-1].out_size == 7 and r.features == 1280
    resnet = S.decode(
        "resnet:i224_n1000_w1_d0:resnet_c64_k7_s2:bottle_r3_k3_s1_e0.25_c256/"
        "bottle_r1_k3_s2_e0.25_c512_aa0.2-0.1-8:c0"
    )
    rr = S.resolve(resnet)
    assert rr.stem_out_size == 56
    last = rr.blocks[-1]
    assert (last.mid_channels, last.out_size, last.dk, last.dv) == (128, 28, 24, 16)
    assert rr.blocks[0].residual  # projection shortcut 64 -> 256


def test_scale() -> None:
    spec = S.decode(MNASNET_B1)
    half = spec.scale(width=0.5)
    assert half.width == 0.5 and S.resolve(half).stem_channels == 16
    deep = spec.scale(depth=1.5)
    assert [b.repeats for _, b in deep.blocks()] == [2, 5, 5, 5, 3, 6, 2]
    with pytest.raises(ValueError, match="depth multiplier"):
        spec.scale(depth=0)


def test_strategy_generates_every_family() -> None:
    from hypothesis import find

    for family in S.FAMILIES:
        found = find(arch_specs(), lambda s, f=family: s.family == f and _valid(s))
        assert found.family == family


# --- bounds (SPEC_LIMITS) -------------------------------------------------------------------

_SMALL = "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:{block}:c0"


def test_every_numeric_field_has_a_limit() -> None:
    # Read the dataclasses, not the table: a numeric field added later without a bound fails here.
    prefixes = {S.ArchSpec: "", S.StemSpec: "stem.", S.BlockSpec: "", S.AASpec: "aa."}
    import typing

    for cls, prefix in prefixes.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float):
                assert prefix + f.name in S.SPEC_LIMITS, f"{cls.__name__}.{f.name} has no limit"


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (_SMALL.format(block="ir_r999999999_k3_s1_e3_c24"), r"stage0\.block0\.repeats"),
        (_SMALL.format(block="ir_r65_k3_s1_e3_c24"), r"stage0\.block0\.repeats"),
        (_SMALL.format(block="ir_r1_k3_s1_e3_c999999999"), r"stage0\.block0\.out_channels"),
        (_SMALL.format(block="ir_r1_k33_s1_e3_c24"), r"stage0\.block0\.kernel"),
        (_SMALL.format(block="ir_r1_k3_s1_e33_c24"), r"stage0\.block0\.expansion"),
        (_SMALL.format(block="ir_r1_k3_s1_e3_c24_aa0.2-0.1-129"), r"stage0\.block0\.aa\.heads"),
        (_SMALL.format(block="ir_r1_k3_s1_e3_c24_aa0.2-0.1-4-d1025"), r"aa\.min_key_depth"),
        ("mnasnet:i4097_n10_w1_d0:conv_c16_k3_s2:ir_c24:c0", r"^input_size"),
        ("mnasnet:i32_n100001_w1_d0:conv_c16_k3_s2:ir_c24:c0", r"^num_classes"),
        ("mnasnet:i32_n10_w9_d0:conv_c16_k3_s2:ir_c24:c0", r"^width"),
        ("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_c24:c16385", r"^head_channels"),
        ("mnasnet:i32_n10_w1_d0:conv_c16385_k3_s2:ir_c24:c0", r"^stem\.channels"),
        ("mnasnet:i32_n10_w1_d0:conv_c16_k33_s2:ir_c24:c0", r"^stem\.kernel"),
        ("mnasnet:i32_n10_w1e308_d0:conv_c16_k3_s2:ir_c24:c0", r"^width"),
        ("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:" + "/".join(["ir_c8"] * 17) + ":c0", r"^stages"),
        ("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:" + ",".join(["ir_c8"] * 65) + ":c0", r"^stage0"),
        # counted before a single block is decoded: a megabyte of blocks fails at once
        ("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:" + "/".join(["ir_c8"] * 200_000) + ":c0", "^st"),
        # 16 stages of 64 repeats plus one more block: 1025 blocks after expansion > 1024
        (
            "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:" + "/".join(["ir_r64_c8"] * 16) + ",ir_c8:c0",
            r"^stages: must be <= 1024",
        ),
        # within every per-field limit, but 16384 * 8 channels after the width multiplier
        ("mnasnet:i32_n10_w8_d0:conv_c16_k3_s2:ir_r1_k3_s1_e1_c16384:c0", r"stage0\.block0\."),
        ("mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_c1024/ir_r1_k3_s1_e32_c24:c0", r"mid_channels"),
    ],
)
def test_limits_reject_before_expanding(text: str, field: str) -> None:
    import time

    start = time.perf_counter()
    with pytest.raises(SpecError, match=field) as info:
        S.decode(text)
    assert time.perf_counter() - start < 1.0
    assert "\n" not in str(info.value)


def test_limits_are_inclusive_and_reachable() -> None:
    # Exactly at the limits is valid: the limits reject only what lies beyond them. Two specs,
    # since all fields at their limits at once exceed the whole-network parameter limit.
    spec = S.decode("mnasnet:i32_n100000_w1_d0:conv_c16384_k31_s2:ir_r64_k31_s1_e1_c128:c16384")
    assert spec.stages[0][0].repeats == 64
    assert len(S.resolve(spec).blocks) == 64
    wide = S.decode(
        "mnasnet:i32_n10_w1_d0:conv_c128_k3_s2:ir_r1_k3_s1_e1_c16384_aa1-1-128-d1024:c0"
    )
    assert S.resolve(wide).blocks[0].out_channels == 16384
    with pytest.raises(SpecError, match="depth multiplier"):
        spec.scale(depth=float("inf"))


def test_total_parameters_are_bounded_before_anything_is_built() -> None:
    # Every field is within its own limit, yet 64 repeats of a 16384-channel inverted residual
    # hold 64 * (2 * 16384^2 + 9 * 16384) = 34.4G weights: counted by hand, not by the code.
    text = "mnasnet:i32_n10_w1_d0:conv_c16_k3_s2:ir_r64_k3_s1_e1_c16384:c16384"
    with pytest.raises(SpecError, match=r"^spec: 3[0-9]\.[0-9]G parameters; must be <= 2G"):
        S.decode(text)
    # ResNet-152 at width 4 (the scale of BiT-L's ResNet-152x4, 0.93G weights) stays valid
    wide = "resnet:i224_n1000_w4_d0:resnet_c64_k7_s2:bottle_r3_k3_s1_e0.25_c256/bottle_r8_k3_s2_e0.25_c512/bottle_r36_k3_s2_e0.25_c1024/bottle_r3_k3_s2_e0.25_c2048:c0"  # noqa: E501
    assert len(S.resolve(S.decode(wide)).blocks) == 50


def test_from_dict_applies_the_same_limits() -> None:
    data = S.to_dict(S.decode(MNASNET_B1))
    data["stages"][1][0]["repeats"] = 10**9
    with pytest.raises(SpecError, match=r"stage1\.block0\.repeats: must be <= 64"):
        S.from_dict(data)
    data = S.to_dict(S.decode(MNASNET_B1))
    data["width"] = float("inf")
    with pytest.raises(SpecError, match=r"^width: must be <= 8"):
        S.from_dict(data)
