"""Tests for aanas.supernet and aanas.ops.elastic: path == extracted static subnet, slicing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from aanas.models import create_model
from aanas.ops.elastic import ElasticAttention, split_index
from aanas.space import SearchSpace
from aanas.supernet import SuperNet, recalibrate_bn, train_supernet

# A ResNet-family space (basic + bottleneck blocks, width choice) small enough for CPU tests.
_RESNET_SPACE = {
    "name": "tiny_resnet",
    "base": "test_resnet",
    "width": [0.5, 1.0],
    "stages": {
        1: {
            "depth": [1, 2],
            "kernel": [3, 5],
            "aa": {
                "placement": ["none", "all"],
                "kappa": [0.25],
                "upsilon": [0.25, 0.5],
                "heads": [2, 4],
            },
        },
        2: {
            "expansion": [0.25, 0.5],
            "aa": {
                "placement": ["none", "last", "each"],
                "kappa": [0.25, 0.5],
                "upsilon": [0.25],
                "heads": [2],
                "relative": [True, False],
            },
        },
    },
}


@pytest.fixture(scope="module")
def tiny() -> SearchSpace:
    return SearchSpace.from_yaml("tiny")


def _randomize(net: nn.Module, seed: int = 0) -> None:
    """Non-trivial BN statistics/affine and biases, so mismatched slices cannot hide."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
        for name, p in net.named_parameters():
            if name.endswith("bias") and p.dim() >= 1:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)


def _check_paths(space: SearchSpace, n: int, size: int, seed: int) -> None:
    torch.manual_seed(seed)
    net = SuperNet(space)
    _randomize(net, seed)
    net.eval()
    rng = np.random.default_rng(seed)
    x = torch.randn(2, 3, size, size)
    specs = [space.largest(), space.smallest()] + [space.sample(rng) for _ in range(n)]
    for spec in specs:
        with torch.no_grad():
            path = net(x, spec)
            static = net.extract(spec).eval()
            assert type(static) is type(create_model(spec))
            assert static.spec == spec
            out = static(x)
        assert path.shape == out.shape == (2, spec.num_classes)
        torch.testing.assert_close(path, out, atol=1e-5, rtol=0)


def test_path_equals_extracted_tiny(tiny: SearchSpace) -> None:
    _check_paths(tiny, 14, 32, seed=0)


def test_path_equals_extracted_resnet() -> None:
    space = SearchSpace.from_dict(_RESNET_SPACE)
    _check_paths(space, 5, 32, seed=1)


def test_gradients_only_on_selected_slice(tiny: SearchSpace) -> None:
    torch.manual_seed(0)
    net = SuperNet(tiny).train()
    spec = tiny.smallest()
    # one AA block with 2 of the 4 possible heads, so head and dim slicing are exercised
    params = tiny.encode_params(spec)
    params.update({"stage3.aa.placement": "all", "stage3.aa.heads": 2})
    spec = tiny.decode(params)
    loss = net(torch.randn(2, 3, 32, 32), spec).square().mean()
    loss.backward()
    used = net.static_state(spec)  # what the path reads
    blocks = net.blocks
    # stage 1 runs one block: the second one gets no gradient at all
    assert all(p.grad is None for p in blocks[1][1].parameters())
    b = blocks[1][0]
    grad = b.expand.weight.grad
    mid = spec.stages[1][0].expansion * 16  # e3 on 16 input channels
    assert grad[: int(mid)].abs().sum() > 0 and grad[int(mid) :].abs().sum() == 0
    k = b.spatial.weight.grad  # kernel 3 of 5: the outer ring has zero gradient
    assert k[:, :, 1:4, 1:4].abs().sum() > 0
    assert k[:, :, 0].abs().sum() == 0 and k[:, :, :, 4].abs().sum() == 0
    attn = blocks[3][0].attn["spatial"]
    assert attn is not None
    rb = [
        r
        for r in __import__("aanas.spec", fromlist=["resolve"]).resolve(spec).blocks
        if r.name.startswith("stage3")
    ][0]
    dkh = rb.dk // rb.heads
    g = attn.q_weight.grad
    assert g[:2, :dkh, : rb.mid_channels].abs().sum() > 0
    assert g[2:].abs().sum() == 0 and g[:, dkh:].abs().sum() == 0
    assert g[:, :, rb.mid_channels :].abs().sum() == 0
    assert attn.key_rel_w.grad[:, dkh:].abs().sum() == 0
    # BN of the attention bank: the channels after dv get no gradient
    bank = blocks[3][0].s_max
    bn_grad = blocks[3][0].spatial_bn.weight.grad
    assert bn_grad[bank : bank + rb.dv].abs().sum() > 0
    assert bn_grad[bank + rb.dv :].abs().sum() == 0
    assert "blocks.3.0.conv_dw.qkv_conv.weight" in used


def test_bn_running_stats_update_only_slice(tiny: SearchSpace) -> None:
    net = SuperNet(tiny).train()
    spec = tiny.smallest()
    before = {n: b.clone() for n, b in net.named_buffers() if "running_mean" in n}
    with torch.no_grad():
        net(torch.randn(4, 3, 32, 32) + 1.0, spec)
    after = dict(net.named_buffers())
    assert torch.equal(
        after["blocks.1.1.expand_bn.running_mean"], before["blocks.1.1.expand_bn.running_mean"]
    )
    changed = (
        after["blocks.1.0.expand_bn.running_mean"] != before["blocks.1.0.expand_bn.running_mean"]
    )
    mid = int(spec.stages[1][0].expansion * 16)
    assert changed[:mid].all() and not changed[mid:].any()


def test_split_index_and_attention_layout() -> None:
    assert split_index(5, 0, 8, torch.device("cpu")) == slice(0, 5)
    assert split_index(5, 2, 8, torch.device("cpu")).tolist() == [0, 1, 2, 3, 4, 8, 9]
    attn = ElasticAttention(in_max=6, heads_max=4, dkh_max=3, dvh_max=2, dv_max=8, size_max=5)
    state = attn.static_state(slice(0, 4), dk=4, dv=4, heads=2, relative=True, size=3)
    qkv = state["qkv_conv.weight"][:, :, 0, 0]
    # row h*dkh + i of q is q_weight[h, i] (first 2 heads, first 2 dims each)
    torch.testing.assert_close(qkv[2], attn.q_weight[1, 0, :4])
    torch.testing.assert_close(qkv[4 + 3], attn.k_weight[1, 1, :4])
    torch.testing.assert_close(qkv[8 + 2], attn.v_weight[1, 0, :4])
    assert state["key_rel_w"].shape == (5, 2)
    torch.testing.assert_close(state["key_rel_w"], attn.key_rel_w[2:7, :2])


def test_train_recalibrate_save_load(tiny: SearchSpace, tmp_path: Path) -> None:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    data = [
        (torch.randn(4, 3, 32, 32, generator=gen), torch.randint(0, 10, (4,), generator=gen))
        for _ in range(3)
    ]
    for rule in ("sandwich", "uniform"):
        net = SuperNet(tiny)
        seen: list[int] = []
        out = train_supernet(
            net,
            data,
            epochs=2,
            lr=0.05,
            rule=rule,
            distill=rule == "sandwich",
            seed=0,
            max_batches=1,
            on_epoch=lambda e, m, seen=seen: seen.append(e),
        )
        assert seen == [0, 1] and len(out["epochs"]) == 2
        assert all(np.isfinite(m["train_loss"]) for m in out["epochs"])
    with pytest.raises(ValueError, match="rule"):
        train_supernet(net, data, epochs=1, lr=0.1, rule="greedy")
    spec = tiny.sample(np.random.default_rng(5))
    sub = recalibrate_bn(net.extract(spec), data, batches=3)
    assert not sub.training
    bn = next(m for m in sub.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 3 and bn.momentum is not None
    path = tmp_path / "sn" / "supernet.pt"
    net.save(path)
    other = SuperNet(tiny)
    other.load(path)
    x = data[0][0]
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x, spec), other.eval()(x, spec))
    assert [p.name for p in path.parent.iterdir()] == ["supernet.pt"]  # no temp files left
    resnet = SuperNet(SearchSpace.from_dict(_RESNET_SPACE))
    with pytest.raises(ValueError, match="space"):
        resnet.load(path)
