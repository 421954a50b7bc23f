"""Model families, registry and torchvision conversion (aanas.models, aanas.ops.blocks)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from aanas import spec as S
from aanas.models import (
    MnasNet,
    create_model,
    from_torchvision,
    get_spec,
    list_models,
    load_torchvision_state_dict,
    register_arch,
    torchvision_key,
    zero_init_residual,
)
from aanas.ops.attention import AAConv2d
from aanas.ops.blocks import InvertedResidual, PreActBasicBlock, SqueezeExcite
from aanas.spec import ArchSpec

ALL = list_models()
# Deep or wide presets: still run by default, deselect with -m "not slow" for a quick pass.
_SLOW = {"resnet101", "resnet152", "aa_resnet101", "aa_resnet152", "wrn28_10", "aa_wrn28_10"}
SWEEP = [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in ALL]
# torchvision constructor -> our registered name.
TV_NAMES = {
    "mnasnet0_5": "mnasnet_b1_050",
    "mnasnet0_75": "mnasnet_b1_075",
    "mnasnet1_0": "mnasnet_b1_100",
    "mnasnet1_3": "mnasnet_b1_130",
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "resnet152": "resnet152",
}


def _num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _randomized_tv(name: str) -> nn.Module:
    """Seeded torchvision model with non-trivial BN affine params and running stats, eval."""
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=gen) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(n, generator=gen) * 0.4 - 0.2)
                m.num_batches_tracked.fill_(7)
    return model.eval()


# --- torchvision parity ---------------------------------------------------------------------


@pytest.mark.parametrize("tv_name", ["mnasnet1_0", "mnasnet0_5", "resnet18", "resnet50"])
def test_torchvision_parity(tv_name: str) -> None:
    tv = _randomized_tv(tv_name)
    converted = from_torchvision(tv)
    assert not converted.training
    assert converted.spec == dataclasses.replace(get_spec(TV_NAMES[tv_name]))
    loaded = create_model(TV_NAMES[tv_name]).eval()
    load_torchvision_state_dict(loaded, tv.state_dict())
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = tv(x)
        for ours in (converted, loaded):
            assert (ours(x) - want).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tv_name", sorted(TV_NAMES))
def test_param_count_equals_torchvision(tv_name: str) -> None:
    with torch.device("meta"):  # shapes only: no init compute, no forward
        tv = getattr(torchvision.models, tv_name)()
        ours = create_model(TV_NAMES[tv_name])
    assert _num_params(ours) == _num_params(tv)
    family = ours.spec.family
    tv_shapes = {torchvision_key(k, family): v.shape for k, v in tv.state_dict().items()}
    assert tv_shapes == {k: v.shape for k, v in ours.state_dict().items()}


def test_mnasnet_bn_momentum_matches_torchvision() -> None:
    with torch.device("meta"):
        tv = torchvision.models.mnasnet1_0()
        ours = create_model("mnasnet_b1_100")
    tv_m = {m.momentum for m in tv.modules() if isinstance(m, nn.BatchNorm2d)}
    ours_m = {m.momentum for m in ours.modules() if isinstance(m, nn.BatchNorm2d)}
    assert ours_m == tv_m and len(tv_m) == 1


def test_torchvision_key_examples() -> None:
    assert torchvision_key("layers.0.weight", "mnasnet") == "stem.conv.weight"
    assert torchvision_key("layers.4.running_var", "mnasnet") == "blocks.0.0.bn1.running_var"
    assert torchvision_key("layers.8.0.layers.3.weight", "mnasnet") == "blocks.1.0.conv_dw.weight"
    assert torchvision_key("layers.13.0.layers.7.bias", "mnasnet") == "blocks.6.0.bn3.bias"
    assert torchvision_key("layers.15.weight", "mnasnet") == "head.bn.weight"
    assert torchvision_key("classifier.1.weight", "mnasnet") == "classifier.weight"
    assert torchvision_key("bn1.running_mean", "resnet") == "stem.bn.running_mean"
    assert torchvision_key("layer3.1.conv2.weight", "resnet") == "blocks.2.1.conv2.weight"
    assert (
        torchvision_key("layer2.0.downsample.1.weight", "resnet")
        == "blocks.1.0.downsample.1.weight"
    )
    with pytest.raises(ValueError, match="layers.2.weight"):
        torchvision_key("layers.2.weight", "mnasnet")
    with pytest.raises(ValueError, match="wrn"):
        torchvision_key("fc.weight", "wrn")


def _zero_bn_scales(state: dict[str, torch.Tensor]) -> set[str]:
    return {k for k, v in state.items() if k.endswith(".weight") and v.ndim == 1 and not v.any()}


@pytest.mark.parametrize("name", ["resnet18", "resnet50"])
def test_zero_init_residual_matches_torchvision(name: str) -> None:
    model = create_model(name)
    assert zero_init_residual(model) == {"resnet18": 8, "resnet50": 16}[name]
    reference = getattr(torchvision.models, name)(zero_init_residual=True)
    expected = {torchvision_key(k, "resnet") for k in _zero_bn_scales(reference.state_dict())}
    assert _zero_bn_scales(model.state_dict()) == expected


def test_zero_init_residual_makes_every_skip_block_the_identity() -> None:
    torch.manual_seed(0)
    model = create_model("mnasnet_a1_cifar_050").train()
    residual = [m for m in model.modules() if getattr(m, "residual", None) is True]
    assert zero_init_residual(model) == len(residual) == 9
    seen: list[bool] = []
    for block in residual:
        block.register_forward_hook(lambda m, i, o: seen.append(torch.equal(o, i[0])))
    model(torch.randn(4, 3, 32, 32))
    assert seen == [True] * 9
    # blocks without a skip (stride 2 or a channel change) keep their BN scale
    first = model.blocks[1][0]
    assert not first.residual and first.bn3.weight.abs().min() > 0


def test_from_torchvision_rejects_unsupported() -> None:
    with torch.device("meta"):
        wide = torchvision.models.wide_resnet50_2()
    with pytest.raises(ValueError, match="Wide ResNet"):
        from_torchvision(wide)
    with pytest.raises(ValueError, match="MNASNet and ResNet"):
        from_torchvision(nn.Linear(2, 2))
    tv = torchvision.models.mnasnet0_5()
    with pytest.raises(ValueError, match="does not fit"):
        load_torchvision_state_dict(create_model("mnasnet_b1_100"), tv.state_dict())


# --- contract over every registered architecture --------------------------------------------


@pytest.mark.parametrize("name", SWEEP)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = create_model(name, input_size=32)
    assert model.spec.input_size == 32
    x = torch.randn(2, 3, 32, 32)
    out = model(x)
    assert out.shape == (2, model.spec.num_classes)
    out.square().mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stem.conv.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ALL)
def test_spec_round_trip(name: str) -> None:
    spec = get_spec(name)
    with torch.device("meta"):
        model = create_model(name)
    assert model.spec == spec
    assert S.decode(S.encode(model.spec)) == spec
    assert S.decode(str(spec)).encode() == spec.encode()


def test_aa_preset_at_224() -> None:
    model = create_model("aa_mnasnet_a1_100").eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert out.shape == (1, 1000)


# --- attention placement ----------------------------------------------------------------------


def _aa_layers(model: nn.Module) -> dict[str, AAConv2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, AAConv2d)}


def test_aa_mnasnet_placement() -> None:
    with torch.device("meta"):
        model = create_model("aa_mnasnet_a1_100")
    layers = _aa_layers(model)
    # The last 7 of MnasNet-A1's 16 blocks (stage sizes 1, 2, 3, 4, 2, 3, 1): the last c80 block,
    # then every block of c112, c160 and c320; attention on the 1x1 projection (conv_pwl).
    want = {"blocks.3.3"} | {f"blocks.4.{i}" for i in range(2)}
    want |= {f"blocks.5.{i}" for i in range(3)} | {"blocks.6.0"}
    assert {n.rsplit(".", 1)[0] for n in layers} == want
    assert all(n.endswith("conv_pwl") and not m.depthwise for n, m in layers.items())
    first = layers["blocks.4.0.conv_pwl"]  # reads the 80 * 6 = 480 expanded channels -> 112
    # kappa 0.1 * 112 / 4 heads = 2.8 -> 3 per head -> dk 12; upsilon 0.05 * 112 / 4 = 1.4 -> dv 4
    assert (first.in_channels, first.out_channels) == (480, 112)
    assert (first.dk, first.dv, first.num_heads) == (12, 4, 4)
    assert layers["blocks.6.0.conv_pwl"].dk == 32  # 0.1 * 320 / 4 = 8 per head


@pytest.mark.parametrize("width", ["050", "075", "100", "140"])
def test_aa_mnasnet_a1_is_light(width: str) -> None:
    # Counted independently of aanas.cost: parameter tensors and FlopCounterMode at 224 px.
    def params_macs(name: str) -> tuple[int, int]:
        with torch.device("meta"):
            model = create_model(name).eval()
            x = torch.empty(1, 3, 224, 224)
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(x)
        return _num_params(model), counter.get_total_flops() // 2

    aa_params, aa_macs = params_macs(f"aa_mnasnet_a1_{width}")
    params, macs = params_macs(f"mnasnet_a1_{width}")
    assert 1.0 < aa_params / params <= 1.06 and 1.0 < aa_macs / macs <= 1.08
    if width == "100":  # the paper's budget: about 3.9M -> 4.1M (Bello et al., Table 3)
        assert round(aa_params / 1e6, 2) == 4.07 and round(params / 1e6, 2) == 3.89


def test_aa_resnet_placement_and_channels() -> None:
    with torch.device("meta"):
        model = create_model("aa_resnet50")
    layers = _aa_layers(model)
    assert not any(n.startswith("blocks.0.") for n in layers)
    assert len(layers) == 4 + 6 + 3 and all(n.endswith("conv2") for n in layers)
    # Every layer matches spec.resolve's integers (the builder recomputes nothing).
    for rb in S.resolve(model.spec).blocks:
        stage, _, k = rb.name.split(".")
        if rb.dv:
            idx = sum(
                b.repeats
                for b in model.spec.stages[int(stage[5:])][: int(rb.name.split(".")[1][5:])]
            )
            layer = layers[f"blocks.{stage[5:]}.{idx + int(k)}.conv2"]
            assert (layer.dk, layer.dv, layer.out_channels) == (rb.dk, rb.dv, rb.mid_channels)


def test_aa_wrn_min_key_depth() -> None:
    with torch.device("meta"):
        model = create_model("aa_wrn28_10")
    layers = _aa_layers(model)
    assert len(layers) == 12 and all(n.endswith("conv1") for n in layers)
    assert all(m.dk // m.num_heads >= 20 for m in layers.values())
    assert isinstance(model.blocks[1][0], PreActBasicBlock)


def test_wrn28_10_param_count() -> None:
    with torch.device("meta"):
        model = create_model("wrn28_10")
    # Zagoruyko & Komodakis Table 1 and Bello et al. Table 1: 36.5M.
    assert round(_num_params(model) / 1e6, 1) == 36.5


def test_mnasnet_a1_param_count() -> None:
    with torch.device("meta"):
        model = create_model("mnasnet_a1_100")
    assert round(_num_params(model) / 1e6, 2) == 3.89  # timm mnasnet_a1: 3.89M
    se = [m for m in model.modules() if isinstance(m, SqueezeExcite)]
    assert se[0].conv_reduce.out_channels == 6  # 24 input channels * 0.25


# --- tiny fixture, overrides, classifier --------------------------------------------------------


def test_tiny_input_size_override(tiny: ArchSpec) -> None:
    model = create_model(tiny, input_size=48)
    assert isinstance(model, MnasNet) and model.spec.input_size == 48
    assert isinstance(model.blocks[2][0], InvertedResidual)
    assert model(torch.randn(1, 3, 48, 48)).shape == (1, 10)
    with pytest.raises(ValueError, match="max_size"):
        create_model(tiny)(torch.randn(1, 3, 64, 64))


def test_overrides_and_spec_string(tiny: ArchSpec) -> None:
    model = create_model(S.encode(tiny), num_classes=7, width=2.0)
    assert model.spec == dataclasses.replace(tiny, num_classes=7, width=2.0)
    assert model.stem.conv.out_channels == 32
    with pytest.raises(ValueError, match="width"):
        create_model(tiny, width=-1.0)
    with pytest.raises(ValueError, match="num_classes"):
        create_model(tiny, num_classes=0)
    with pytest.raises(TypeError, match="int"):
        create_model(3)  # type: ignore[arg-type]


def test_classifier_contract(tiny: ArchSpec) -> None:
    model = create_model(tiny).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 4, 4)  # 32 / 8 (stem s2, two s2 stages)
    assert model.forward_head(feats, pre_logits=True).shape == (2, 64)
    assert torch.equal(model.forward_head(feats), model(x))
    model.reset_classifier(5)
    assert model(x).shape == (2, 5) and model.spec.num_classes == 5
    model.reset_classifier(0)
    assert model(x).shape == (2, 64) and model.num_classes == 0
    with pytest.raises(ValueError, match="-1"):
        model.reset_classifier(-1)
    assert MnasNet._version == 1


# --- registry -----------------------------------------------------------------------------------


def test_registry_duplicate_and_unknown(tiny: ArchSpec) -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_arch("resnet50", tiny)
    with pytest.raises(ValueError, match="resnet50"):
        create_model("resnet05")
    with pytest.raises(ValueError, match="aa_mnasnet_a1_100"):
        get_spec("aa_mnasnet_a1_10")
    with pytest.raises(ValueError, match="':'"):
        register_arch("a:b", tiny)


def test_list_models_patterns() -> None:
    assert list_models("resnet*") == ["resnet101", "resnet152", "resnet18", "resnet34", "resnet50"]
    plain = list_models("*resnet*", exclude=("aa_*", "test_*"))
    assert plain == list_models("resnet*")
    assert {"mnasnet_a1_100", "aa_mnasnet_a1_140", "wrn28_10", "aa_wrn28_10"} <= set(ALL)
    assert all(isinstance(get_spec(n), ArchSpec) for n in ALL)


# --- CIFAR-sized MnasNets -----------------------------------------------------------------------

CIFAR = list_models("*mnasnet_*_cifar_*")


def test_cifar_names_registered() -> None:
    for fam in ("a1", "b1"):
        for w in ("050", "075", "100"):
            assert {f"mnasnet_{fam}_cifar_{w}", f"aa_mnasnet_{fam}_cifar_{w}"} <= set(CIFAR)


@pytest.mark.parametrize("name", CIFAR)
def test_cifar_maps_are_4x4_and_attention_at_least_4x4(name: str) -> None:
    model = create_model(name).eval()
    assert (model.spec.input_size, model.spec.num_classes) == (32, 10)
    seen: list[tuple[int, int]] = []
    hooks = [
        m.register_forward_hook(lambda _m, i, _o: seen.append(tuple(i[0].shape[-2:])))
        for m in _aa_layers(model).values()
    ]
    with torch.no_grad():
        feats = model.forward_features(torch.randn(2, 3, 32, 32))
    for h in hooks:
        h.remove()
    assert feats.shape[-2:] == (4, 4)
    if name.startswith("aa_"):
        # the last 7 blocks, never on 2x2 or 1x1 maps: A1 c80, c112 x2 on 8x8, c160 x3 and c320
        # on 4x4; B1 c96 x2 on 8x8, c192 x4 and c320 on 4x4
        on_4x4 = 4 if "_a1_" in name else 5
        assert sorted(seen) == [(4, 4)] * on_4x4 + [(8, 8)] * (7 - on_4x4)
    else:
        assert seen == []


@pytest.mark.parametrize("fam", ["a1", "b1"])
@pytest.mark.parametrize("width", ["050", "075", "100"])
def test_aa_cifar_is_light(fam: str, width: str) -> None:
    # Counted independently of aanas.cost: parameter tensors and FlopCounterMode at 32 px.
    def params_macs(name: str) -> tuple[int, int]:
        model = create_model(name).eval()
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(torch.randn(1, 3, 32, 32))
        return _num_params(model), counter.get_total_flops() // 2

    aa_params, aa_macs = params_macs(f"aa_mnasnet_{fam}_cifar_{width}")
    params, macs = params_macs(f"mnasnet_{fam}_cifar_{width}")
    # A1: +5.3..6.9 % params; B1 up to +8.1 % (see aanas/models/mnasnet_cifar.py); MACs <= +8 %
    assert 1.0 < aa_params / params <= (1.07 if fam == "a1" else 1.085)
    assert 1.0 < aa_macs / macs <= 1.08
    from aanas.cost import count_spec

    cost = count_spec(get_spec(f"aa_mnasnet_{fam}_cifar_{width}"))
    # FlopCounterMode sees the attention matmuls differently from the analytical formula (a few
    # thousand MACs of the relative logits); test_cost.py owns the exact cross-checks
    assert cost.params == aa_params and cost.macs == pytest.approx(aa_macs, rel=1e-3)


def test_aa_cifar_exports_to_onnx(tmp_path: Path) -> None:
    from aanas.export import to_onnx

    torch.manual_seed(0)
    model = create_model("aa_mnasnet_a1_cifar_050")
    model.train()
    with torch.no_grad():  # a few batches give BN non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 32, 32))
    report = to_onnx(model.eval(), tmp_path / "m.onnx", batch_sizes=(2,))
    assert report.max_abs_diff is not None and report.max_abs_diff <= 1e-3


def test_cifar_space_samples_attend_on_at_least_4x4() -> None:
    import numpy as np

    from aanas.space import SearchSpace

    space = SearchSpace.from_yaml("cifar_aa_mnasnet")
    modes, augmented = set(), 0
    for seed in range(100):
        spec = space.sample(np.random.default_rng(seed))
        assert (spec.input_size, spec.num_classes) == (32, 10)
        plan = S.resolve(spec)
        assert plan.blocks[-1].out_size == 4
        for b in plan.blocks:
            if b.dv:
                augmented += 1
                modes.add(b.aa_mode)
                assert min(b.in_size, b.out_size) >= 4, (seed, b.name)
        assert S.decode(S.encode(spec)) == spec
    assert modes == {"spatial", "expansion", "projection"} and augmented > 100
    # one sample builds, runs and is costed consistently
    spec = space.sample(np.random.default_rng(3))
    model = create_model(spec).eval()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        assert model(torch.randn(1, 3, 32, 32)).shape == (1, 10)
    from aanas.cost import count_spec

    assert count_spec(spec).macs == pytest.approx(counter.get_total_flops() // 2, rel=1e-3)
