"""Contract over every block type x attention mode (aanas.block_types): a spec that validates
builds; the analytical count equals thop and FlopCounterMode; the supernet path equals the
extracted static model; the ONNX export matches PyTorch. Plus seeded random specs per family:
whatever validates must build and count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aanas import spec as S
from aanas.block_types import AA_MODES, BLOCK_TYPES, block_type
from aanas.cost import count_module, count_spec, reference_macs
from aanas.errors import SpecError
from aanas.export import to_onnx
from aanas.models import create_model
from aanas.models._builder import STATIC_BUILDERS
from aanas.ops.attention import AAConv2d
from aanas.space import SearchSpace
from aanas.supernet import UNSUPPORTED_BLOCK_TYPES, SuperNet

# One tiny network per block type; {aa} marks the block run under test (stage 1, or stage 0 for
# ds), whose first block is strided where the type allows it.
_BASES: dict[str, tuple[str, int]] = {
    "ir": ("mnasnet:i32_n10_w1_d0:conv_c8_k3_s2:ds_r1_k3_s1_e1_c8/ir_r2_k3_s2_e3_c16{aa}:c32", 1),
    "ds": ("mnasnet:i32_n10_w1_d0:conv_c8_k3_s2:ds_r2_k3_s1_e1_c8{aa}/ir_r1_k3_s2_e3_c16:c0", 0),
    "bottle": (
        "resnet:i32_n10_w1_d0:resnet_c8_k3_s1:basic_r1_k3_s1_e1_c8/bottle_r2_k3_s2_e0.5_c16{aa}:c0",
        1,
    ),
    "basic": (
        "resnet:i32_n10_w1_d0:resnet_c8_k3_s1:basic_r1_k3_s1_e1_c8/basic_r2_k3_s2_e1_c16{aa}:c0",
        1,
    ),
    "preact": (
        "wrn:i16_n10_w1_d0:plain_c8_k3_s1:preact_r1_k3_s1_e1_c8/preact_r2_k3_s2_e1_c16{aa}:c0",
        1,
    ),
}
_MODE_TOKEN = {"spatial": "", "expansion": "-exp", "projection": "-proj"}
# Written out by hand (not read from the records): the static module each mode augments, and
# what the attention branch reads (in channels) and produces (Fout) in the first block.
_SITES: dict[tuple[str, str], tuple[str, str, str]] = {
    ("ir", "spatial"): ("conv_dw", "mid", "mid"),
    ("ir", "expansion"): ("conv_pw", "in", "mid"),
    ("ir", "projection"): ("conv_pwl", "mid", "out"),
    ("ds", "spatial"): ("conv_dw", "in", "in"),
    ("ds", "projection"): ("conv_pw", "in", "out"),
    ("bottle", "spatial"): ("conv2", "mid", "mid"),
    ("bottle", "expansion"): ("conv1", "in", "mid"),
    ("bottle", "projection"): ("conv3", "mid", "out"),
    ("basic", "spatial"): ("conv1", "in", "out"),
    ("preact", "spatial"): ("conv1", "in", "out"),
}
CASES = [(t, m) for t in BLOCK_TYPES for m in (None, *BLOCK_TYPES[t].aa_modes)]
AA_CASES = [c for c in CASES if c[1] is not None]
# Types whose modes test_supernet_mixed_modes_share_one_position covers all at once.
_MIXED = ("ir", "bottle")


def _case_id(case: tuple[str, str | None]) -> str:
    return f"{case[0]}-{case[1] or 'plain'}"


def _spec(btype: str, mode: str | None) -> S.ArchSpec:
    text, _ = _BASES[btype]
    aa = "" if mode is None else f"_aa0.5-0.5-2{_MODE_TOKEN[mode]}"
    return S.decode(text.format(aa=aa))


def _calibrated(model: nn.Module, size: int) -> nn.Module:
    """BN statistics from two random batches, so eval outputs are O(1) and input-dependent."""
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, size, size))
    return model.eval()


def test_every_block_type_has_every_part() -> None:
    assert set(STATIC_BUILDERS) == set(BLOCK_TYPES) == set(_BASES)
    for name, record in BLOCK_TYPES.items():
        assert record.name == name and record.families
        assert set(record.aa_modes) <= set(AA_MODES) and "spatial" in record.aa_modes
    assert not UNSUPPORTED_BLOCK_TYPES  # every type has an elastic layout


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_validate_build_count(case: tuple[str, str | None]) -> None:
    btype, mode = case
    spec = _spec(btype, mode)
    stage = _BASES[btype][1]
    rb = next(b for (s, j, b) in S.resolve(spec).staged() if s == stage and j == 0)
    assert rb.type == btype and rb.aa_mode == (mode or "")
    torch.manual_seed(0)
    model = create_model(spec)
    layers = {n: m for n, m in model.named_modules() if isinstance(m, AAConv2d)}
    if mode is None:
        assert not layers
    else:
        name, reads, fout = _SITES[(btype, mode)]
        assert set(layers) == {f"blocks.{stage}.0.{name}", f"blocks.{stage}.1.{name}"}
        first = layers[f"blocks.{stage}.0.{name}"]
        channels = {"in": rb.in_channels, "mid": rb.mid_channels, "out": rb.out_channels}
        assert (first.in_channels, first.out_channels) == (channels[reads], channels[fout])
        assert (first.dk, first.dv) == S.aa_channels(channels[fout], 0.5, 0.5, 2)
    # forward + backward reach every parameter
    out = model(torch.randn(2, 3, spec.input_size, spec.input_size))
    assert out.shape == (2, 10)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    # analytical == thop == FlopCounterMode, params == numel
    analytical, hooks = count_spec(spec), count_module(model)
    assert (analytical.params, analytical.macs) == (hooks.params, hooks.macs)
    assert analytical.params == sum(p.numel() for p in model.parameters())
    assert reference_macs(model, spec.input_size) == analytical.macs


@pytest.mark.parametrize("case", AA_CASES, ids=_case_id)  # plain blocks: tests/test_export.py
def test_export_parity(case: tuple[str, str | None], tmp_path: Path) -> None:
    spec = _spec(*case)
    model = _calibrated(create_model(spec), spec.input_size)
    report = to_onnx(model, tmp_path / "m.onnx", batch_sizes=(2,))
    assert report.checked and report.max_abs_diff is not None and report.max_abs_diff <= 1e-4
    with torch.no_grad():  # outputs depend on the input, so the bound tests something
        assert model(torch.randn(4, 3, spec.input_size, spec.input_size)).std(0).mean() > 1e-3


def _space(btype: str, modes: list[str]) -> SearchSpace:
    text, stage = _BASES[btype]
    return SearchSpace.from_dict(
        {
            "name": f"contract_{btype}",
            "base": text.format(aa=""),
            "stages": {
                stage: {
                    "depth": [1, 2],
                    "kernel": [3, 5],
                    "aa": {
                        "placement": ["none", "last", "all"],
                        "mode": modes,
                        "kappa": [0.25, 0.5],
                        "upsilon": [0.25, 0.5],
                        "heads": [1, 2],
                    },
                }
            },
        }
    )


def _paths_equal(space: SearchSpace, n: int, seed: int) -> set[str]:
    """Every checked path == its extracted static model; returns the modes seen."""
    torch.manual_seed(seed)
    net = SuperNet(space)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-trivial BN statistics, so a wrong slice cannot hide
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
    net.eval()
    rng = np.random.default_rng(seed)
    size = space.base.input_size
    x = torch.randn(2, 3, size, size)
    seen: set[str] = set()
    for spec in [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n)]:
        seen |= {b.aa_mode for b in S.resolve(spec).blocks if b.dv}
        with torch.no_grad():
            torch.testing.assert_close(net(x, spec), net.extract(spec).eval()(x), atol=1e-5, rtol=0)
    return seen


@pytest.mark.parametrize("case", [c for c in AA_CASES if c[0] not in _MIXED], ids=_case_id)
def test_supernet_path_equals_extracted(case: tuple[str, str | None]) -> None:
    btype, mode = case
    assert mode is not None
    assert mode in _paths_equal(_space(btype, [mode]), 3, seed=0)


@pytest.mark.parametrize("btype", _MIXED)
def test_supernet_mixed_modes_share_one_position(btype: str) -> None:
    # All three modes at the same block positions: conv and attention channels of every site
    # live in separate banks, so any path still equals its extracted model.
    seen = _paths_equal(_space(btype, list(AA_MODES)), 12, seed=1)
    assert seen == set(AA_MODES)


# --- validation is complete: what validates builds --------------------------------------------


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("resnet:i32_n10_w1_d0:resnet_c8_k3_s1:basic_r1_k3_s1_e1_c8:c128", "head_channels"),
        ("wrn:i16_n10_w1_d0:plain_c8_k3_s1:preact_r1_k3_s1_e1_c8:c16", "head_channels"),
        ("resnet:i32_n10_w1_d0:resnet_c8_k3_s1:ir_r1_k3_s1_e3_c8:c0", "not allowed in family"),
        ("resnet:i32_n10_w1_d0:resnet_c8_k3_s1:basic_r1_k3_s1_e2_c8:c0", "take e1"),
        ("resnet:i32_n10_w1_d0:resnet_c8_k3_s1:bottle_r1_k3_s1_e1_se0.25_c8:c0", "squeeze"),
        ("resnet:i32_n10_w1_d0:resnet_c8_k3_s1:basic_r1_k3_s1_e1_c8_aa0.5-0.5-2-exp:c0", "mode"),
        ("mnasnet:i32_n10_w1_d0:conv_c8_k3_s2:ds_r1_k3_s1_e1_c8_aa0.5-0.5-2-exp:c0", "mode"),
    ],
)
def test_invalid_specs_raise_spec_error(text: str, match: str) -> None:
    with pytest.raises(SpecError, match=match):
        S.decode(text)


def test_mode_token_round_trip() -> None:
    for btype, mode in CASES:
        spec = _spec(btype, mode)
        assert S.decode(spec.encode()) == spec
        assert S.from_dict(spec.to_dict()) == spec
    text = _BASES["ir"][0].format(aa="_aa0.25-0.5-2-proj")
    assert "aa0.25-0.5-2-proj" in S.decode(text).encode()
    with pytest.raises(ValueError, match="duplicate AA option 'proj'"):  # one mode per token
        S.decode(_BASES["ir"][0].format(aa="_aa0.25-0.5-2-exp-proj"))
    plain = S.decode(_BASES["ir"][0].format(aa="_aa0.25-0.5-2"))
    assert plain.stages[1][0].aa is not None and plain.stages[1][0].aa.mode == "spatial"


def _random_spec(rng: np.random.Generator, family: str) -> S.ArchSpec:
    """A random spec from wide ranges; many are invalid, which is the point."""
    kinds = [t for t, r in BLOCK_TYPES.items() if family in r.families]
    if rng.random() < 0.05:
        kinds = list(BLOCK_TYPES)  # occasionally a block of another family

    def pick(values: list) -> object:  # type: ignore[type-arg]
        return values[int(rng.integers(len(values)))]

    stages = []
    for _ in range(int(rng.integers(1, 4))):
        blocks = []
        for _ in range(int(rng.integers(1, 3))):
            btype = str(pick(kinds))
            record = block_type(btype)
            fixed, has_se, modes = record.fixed_expansion, record.se, record.aa_modes
            aa = None
            if rng.random() < 0.6:
                aa = S.AASpec(
                    kappa=float(pick([0.1, 0.25, 0.5, 1.0])),
                    upsilon=float(pick([0.1, 0.25, 0.5, 1.0])),
                    heads=int(pick([1, 2, 3, 4])),
                    relative=bool(rng.random() < 0.7),
                    min_key_depth=int(pick([0, 0, 3])),
                    mode=str(pick(list(AA_MODES) if rng.random() < 0.1 else list(modes))),
                )
            blocks.append(
                S.BlockSpec(
                    btype,
                    int(pick([1, 4, 8, 12, 16, 24])),
                    repeats=int(rng.integers(1, 3)),
                    kernel=int(pick([1, 3, 5])),
                    stride=int(pick([1, 2])),
                    expansion=float(
                        pick([1.0] if fixed and rng.random() < 0.9 else [0.25, 1.0, 3.0])
                    ),
                    se=float(pick([0.0, 0.0, 0.25]) if has_se or rng.random() < 0.1 else 0.0),
                    act=str(pick(list(S.ACTIVATIONS))),
                    skip=bool(rng.random() < 0.8),
                    aa=aa,
                )
            )
        stages.append(tuple(blocks))
    return S.ArchSpec(
        family=family,
        stem=S.StemSpec(
            str(pick(list(S.STEM_TYPES))),
            int(pick([4, 8, 16])),
            int(pick([1, 3])),
            int(pick([1, 2])),
            str(pick(list(S.ACTIVATIONS))),
        ),
        stages=tuple(stages),
        head_channels=int(pick([0, 0, 16])),
        num_classes=int(pick([1, 10])),
        input_size=int(pick([8, 12, 16])),
        width=float(pick([0.5, 1.0, 1.0])),
    )


@pytest.mark.parametrize("family", S.FAMILIES)
def test_random_valid_specs_build_and_count(family: str) -> None:
    rng = np.random.default_rng(12)
    built = 0
    for _ in range(40):
        spec = _random_spec(rng, family)
        try:
            spec.validate()
        except SpecError:
            continue
        # shapes only: the meta device checks every layer fits without computing anything
        with torch.device("meta"):
            model = create_model(spec)
            out = model(torch.empty(2, 3, spec.input_size, spec.input_size))
        assert out.shape == (2, spec.num_classes), spec.encode()
        cost = count_spec(spec)
        assert cost.params == sum(p.numel() for p in model.parameters()), spec.encode()
        hooks = count_module(model)
        assert (cost.params, cost.macs) == (hooks.params, hooks.macs), spec.encode()
        built += 1
    assert built >= 10, built  # the generator must produce enough valid specs to mean anything
