"""Tests for aanas.ops.attention against independent references (arXiv:1904.09925)."""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import aanas.ops.attention as attention
from aanas.ops import (
    AAConv2d,
    _fused_cpu,
    aa_channels,
    attention_input,
    central_rel_rows,
    rel_embedding_matrix,
    relative_attention,
)

MAX = (9, 9)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These tensors are tiny: a second intra-op thread only adds spin-wait contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _layer(
    *,
    cin: int = 6,
    cout: int = 10,
    k: int = 3,
    stride: int = 1,
    dk: int = 4,
    dv: int = 4,
    heads: int = 2,
    relative: bool = True,
    depthwise: bool = False,
    seed: int = 0,
) -> AAConv2d:
    torch.manual_seed(seed)
    if depthwise:
        cin = cout
    layer = AAConv2d(
        cin,
        cout,
        k,
        stride,
        dk=dk,
        dv=dv,
        num_heads=heads,
        relative=relative,
        max_size=MAX,
        depthwise=depthwise,
    )
    # Random biases so that a wrong bias placement cannot hide behind PyTorch's zero-ish init.
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.normal_()
    return layer.double()


# ---------------------------------------------------------------------------------------------
# Brute-force reference: explicit loops over query and key positions, straight from the formula
#   logit = q·k + q·r_W[y' - y] + q·r_H[x' - x],  q scaled by (dk/Nh)^-0.5,
# with row o + max - 1 of a table holding offset o.
# ---------------------------------------------------------------------------------------------


def _pool_loops(x: Tensor) -> Tensor:
    """3x3 / stride 2 / pad 1 average over valid pixels only, by loops."""
    b, c, h, w = x.shape
    ho, wo = (h + 1) // 2, (w + 1) // 2
    out = x.new_zeros(b, c, ho, wo)
    for i in range(ho):
        for j in range(wo):
            rows = [r for r in (2 * i - 1, 2 * i, 2 * i + 1) if 0 <= r < h]
            cols = [s for s in (2 * j - 1, 2 * j, 2 * j + 1) if 0 <= s < w]
            out[:, :, i, j] = x[:, :, rows][:, :, :, cols].mean(dim=(2, 3))
    return out


def _conv1x1(conv: nn.Conv2d, x: Tensor) -> Tensor:
    assert conv.bias is not None
    return torch.einsum("oc,bchw->bohw", conv.weight[:, :, 0, 0], x) + conv.bias[:, None, None]


def reference_forward(layer: AAConv2d, x: Tensor) -> Tensor:
    """The layer's output recomputed from its weights with Python loops (use float64)."""
    outs = []
    dk, dv, nh = layer.dk, layer.dv, layer.num_heads
    if layer.conv_out is not None:
        conv_in = x[:, : layer.out_channels - dv] if layer.depthwise else x
        conv = layer.conv_out
        outs.append(
            F.conv2d(
                conv_in,
                conv.weight,
                conv.bias,
                layer.stride,
                layer.kernel_size // 2,
                1,
                conv.groups,
            )
        )
    if dv > 0:
        assert layer.qkv_conv is not None and layer.attn_out is not None
        xa = x if layer.stride == 1 else _pool_loops(x)
        qkv = _conv1x1(layer.qkv_conv, xa)
        q, k, v = qkv[:, :dk], qkv[:, dk : 2 * dk], qkv[:, 2 * dk :]
        b, _, h, w = q.shape
        dkh, dvh = dk // nh, dv // nh
        max_h, max_w = layer.max_size
        rel_w, rel_h = layer.key_rel_w, layer.key_rel_h
        attn = x.new_zeros(b, dv, h, w)
        for n in range(b):
            for head in range(nh):
                ks, vs = slice(head * dkh, (head + 1) * dkh), slice(head * dvh, (head + 1) * dvh)
                for qx in range(h):
                    for qy in range(w):
                        qvec = q[n, ks, qx, qy] * dkh**-0.5
                        logits = []
                        for kx in range(h):
                            for ky in range(w):
                                logit = qvec @ k[n, ks, kx, ky]
                                if rel_w is not None and rel_h is not None:
                                    logit = logit + qvec @ rel_w[ky - qy + max_w - 1]
                                    logit = logit + qvec @ rel_h[kx - qx + max_h - 1]
                                logits.append(logit)
                        weights = torch.softmax(torch.stack(logits), dim=0)
                        values = v[n, vs].reshape(dvh, h * w)
                        attn[n, vs, qx, qy] = values @ weights
        outs.append(_conv1x1(layer.attn_out, attn))
    return torch.cat(outs, dim=1)


BRUTE_CASES = [
    # relative, stride, depthwise, (H, W), kernel
    (True, 1, False, (5, 7), 3),
    (False, 1, False, (5, 7), 3),
    (True, 2, False, (5, 7), 3),
    (False, 2, False, (6, 4), 5),
    (True, 1, True, (4, 4), 3),
    (True, 2, True, (6, 5), 3),
    (True, 1, False, MAX, 3),
    (True, 1, False, (1, 3), 1),
]


@pytest.mark.parametrize(("relative", "stride", "depthwise", "size", "kernel"), BRUTE_CASES)
def test_matches_bruteforce_reference(
    relative: bool, stride: int, depthwise: bool, size: tuple[int, int], kernel: int
) -> None:
    layer = _layer(k=kernel, stride=stride, relative=relative, depthwise=depthwise)
    x = torch.randn(2, layer.in_channels, *size, dtype=torch.float64)
    expected = reference_forward(layer, x)
    assert expected.shape == (2, 10, math.ceil(size[0] / stride), math.ceil(size[1] / stride))
    for impl, rows in (("simple", None), ("chunked", 2), ("chunked", None), ("sdpa", None)):
        layer.attention_impl, layer.chunk_rows = impl, rows
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_attention_input_matches_loops() -> None:
    x = torch.randn(2, 3, 7, 6, dtype=torch.float64)
    torch.testing.assert_close(attention_input(x, 2), _pool_loops(x))
    assert attention_input(x, 1) is x


# ---------------------------------------------------------------------------------------------
# Chunked (recompute-in-backward) and SDPA paths == simple path, forward and gradients
# ---------------------------------------------------------------------------------------------


def _forward_and_grads(layer: AAConv2d, x: Tensor, grad: Tensor) -> list[Tensor]:
    x = x.clone().requires_grad_(True)
    out = layer(x)
    return [out, *torch.autograd.grad(out, [x, *layer.parameters()], grad)]


@pytest.mark.parametrize(
    ("impl", "relative", "stride", "depthwise", "size", "rows"),
    [
        ("chunked", True, 1, False, (5, 7), 1),
        ("chunked", True, 1, False, (7, 5), 3),
        ("chunked", False, 1, False, (5, 7), 2),
        ("chunked", True, 2, True, (9, 8), 2),
        ("chunked", True, 1, True, (6, 6), None),
        ("sdpa", True, 1, False, (5, 7), None),
        ("sdpa", False, 2, True, (9, 8), None),
        ("fused", True, 1, False, (5, 7), None),
        ("fused", True, 1, False, (7, 5), None),
        ("fused", False, 1, False, (5, 7), None),
        ("fused", True, 2, True, (9, 8), None),
        ("fused", True, 1, True, (1, 6), None),
    ],
)
def test_fused_paths_equal_simple(
    impl: str,
    relative: bool,
    stride: int,
    depthwise: bool,
    size: tuple[int, int],
    rows: int | None,
) -> None:
    layer = _layer(stride=stride, relative=relative, depthwise=depthwise, dk=8, dv=6)
    x = torch.randn(3, layer.in_channels, *size, dtype=torch.float64)
    grad = torch.randn_like(layer(x))
    layer.attention_impl = "simple"
    expected = _forward_and_grads(layer, x, grad)
    layer.attention_impl, layer.chunk_rows = impl, rows
    got = _forward_and_grads(layer, x, grad)
    assert len(got) == len(expected)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bias", [False, True])
def test_pointwise_layer_runs_one_convolution_for_both_branches(
    bias: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 1x1 stride-1 layer (the projection and expansion placements) computes its conv branch
    and its qkv projection as one convolution: same outputs and gradients as the two modules
    called one by one, and a single convolution call."""
    torch.manual_seed(0)
    layer = AAConv2d(6, 10, 1, dk=4, dv=4, num_heads=2, max_size=MAX, bias=bias).double()
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:
                p.normal_()
    x = torch.randn(2, 6, 5, 7, dtype=torch.float64)
    grad = torch.randn(2, 10, 5, 7, dtype=torch.float64)
    calls = []
    real_conv2d = F.conv2d
    monkeypatch.setattr(F, "conv2d", lambda *a, **k: calls.append(1) or real_conv2d(*a, **k))
    fused = _forward_and_grads(layer, x, grad)
    assert len(calls) == 2  # the fused 1x1 and attn_out
    monkeypatch.setattr(AAConv2d, "_shares_input", lambda self: False)
    for g, e in zip(fused, _forward_and_grads(layer, x, grad), strict=True):
        torch.testing.assert_close(g, e)


def test_chunked_float32_matches_simple() -> None:
    layer = _layer(dk=8, dv=6).float()
    x = torch.randn(2, layer.in_channels, 8, 9)
    grad = torch.randn(2, 10, 8, 9)
    layer.attention_impl = "simple"
    expected = _forward_and_grads(layer, x, grad)
    layer.attention_impl, layer.chunk_rows = "chunked", 3
    for g, e in zip(_forward_and_grads(layer, x, grad), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)


def test_auto_path_selection(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    original = attention._ChunkedRelAttention.apply

    def spy(*args: object) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(attention._ChunkedRelAttention, "apply", spy)
    layer = _layer()
    x = torch.randn(1, layer.in_channels, 5, 5, dtype=torch.float64)
    layer(x)  # tiny problem: simple
    assert calls == []
    monkeypatch.setattr(attention, "_CHUNK_MIN_LOGITS", 0)
    with torch.no_grad():
        layer(x)  # no grad needed: simple (what FlopCounterMode-based MAC counts see)
    assert calls == []
    layer(x)  # grad and "big": chunked
    assert calls == [1]
    layer.attention_impl = "simple"
    layer(x)
    assert calls == [1]
    assert attention._auto_impl(x, 1 << 30, needs_grad=True) == "fused"
    assert attention._auto_impl(x.float(), 1 << 30, needs_grad=True) == "fused"
    assert attention._auto_impl(x.bfloat16(), 1 << 30, needs_grad=True) == "chunked"
    assert attention._auto_impl(x, 1 << 30, needs_grad=False) == "simple"
    monkeypatch.setattr(attention._fused_cpu, "available", lambda: False)
    assert attention._auto_impl(x, 1 << 30, needs_grad=True) == "chunked"


# ---------------------------------------------------------------------------------------------
# gradcheck (float64), both paths
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("impl", "rows"), [("simple", None), ("chunked", 2), ("fused", None)])
def test_gradcheck_layer_input_and_tables(impl: str, rows: int | None) -> None:
    layer = _layer(cin=3, cout=5, dk=4, dv=4)
    layer.attention_impl, layer.chunk_rows = impl, rows
    x = torch.randn(1, 3, 3, 4, dtype=torch.float64, requires_grad=True)
    assert layer.key_rel_w is not None and layer.key_rel_h is not None
    rel_w = layer.key_rel_w.detach().clone().requires_grad_(True)
    rel_h = layer.key_rel_h.detach().clone().requires_grad_(True)

    def fn(x: Tensor, rel_w: Tensor, rel_h: Tensor) -> Tensor:
        params = {"key_rel_w": rel_w, "key_rel_h": rel_h}
        out: Tensor = torch.func.functional_call(layer, params, (x,))
        return out

    assert torch.autograd.gradcheck(fn, (x, rel_w, rel_h))


@pytest.mark.parametrize(
    ("impl", "rows"), [("simple", None), ("chunked", 1), ("sdpa", None), ("fused", None)]
)
def test_gradcheck_functional_core(impl: str, rows: int | None) -> None:
    torch.manual_seed(1)

    def t(*shape: int) -> Tensor:
        return torch.randn(*shape, dtype=torch.float64, requires_grad=True)

    q, k, v = t(1, 4, 3, 2), t(1, 4, 3, 2), t(1, 6, 3, 2)
    rel_w, rel_h = t(5, 2), t(7, 2)  # tables made for a larger (4, 3) map

    def fn(q: Tensor, k: Tensor, v: Tensor, rel_w: Tensor, rel_h: Tensor) -> Tensor:
        return relative_attention(q, k, v, 2, rel_w, rel_h, impl=impl, chunk_rows=rows)

    assert torch.autograd.gradcheck(fn, (q, k, v, rel_w, rel_h))


# ---------------------------------------------------------------------------------------------
# Mixed precision: every path under autocast against float32 (the attention runs in float32)
# ---------------------------------------------------------------------------------------------


def _rel_norm_err(got: Tensor, expected: Tensor) -> float:
    return ((got.double() - expected.double()).norm() / expected.double().norm()).item()


@pytest.mark.parametrize("impl", ["simple", "chunked", "sdpa", "fused"])
def test_autocast_bfloat16_cpu_forward_and_backward(impl: str) -> None:
    layer = _layer(dk=8, dv=6).float()
    layer.attention_impl, layer.chunk_rows = impl, 2
    x = torch.randn(2, layer.in_channels, 7, 6)
    grad = torch.randn(2, 10, 7, 6)
    expected = _forward_and_grads(layer, x, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _forward_and_grads(layer, x, grad)
    assert got[0].dtype == torch.bfloat16  # the projections and the conv ran in bfloat16
    assert all(g.dtype == torch.float32 for g in got[1:])  # grads of float32 leaves
    # bfloat16 keeps 8 bits of mantissa (relative step 2**-8 = 0.4 %); the errors of the
    # bfloat16 convs around the attention add up to about 1 % of each tensor's norm.
    for g, e in zip(got, expected, strict=True):
        assert _rel_norm_err(g, e) < 0.03


@pytest.mark.parametrize("impl", ["simple", "chunked", "sdpa", "fused"])
def test_autocast_functional_core_mixed_dtypes(impl: str) -> None:
    """bfloat16 q/k/v with float32 tables: the case whose chunked backward used to fail."""
    torch.manual_seed(2)
    q, k, v = (torch.randn(2, n, 5, 6, requires_grad=True) for n in (8, 8, 6))
    rel_w, rel_h = (torch.randn(2 * n - 1, 4, requires_grad=True) for n in (6, 5))
    grad = torch.randn(2, 6, 5, 6)
    inputs = [q, k, v, rel_w, rel_h]
    expected = relative_attention(q, k, v, 2, rel_w, rel_h, impl="simple")
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = [t.bfloat16() for t in (q, k, v)]
        out = relative_attention(*low, 2, rel_w, rel_h, impl=impl, chunk_rows=2)
    assert out.dtype == torch.bfloat16
    grads = torch.autograd.grad(out, inputs, grad)
    assert _rel_norm_err(out, expected) < 0.02
    for g, e in zip(grads, expected_grads, strict=True):
        assert _rel_norm_err(g, e) < 0.02


@pytest.mark.parametrize("impl", ["simple", "chunked", "sdpa", "fused"])
def test_autocast_float16_logits_do_not_overflow(impl: str) -> None:
    """Logits of ~1e5 exceed float16's 65504: the float32 attention must still be exact."""
    torch.manual_seed(3)
    q = (300 * torch.randn(1, 4, 3, 4)).half()
    k = (300 * torch.randn(1, 4, 3, 4)).half()
    v = torch.randn(1, 4, 3, 4).half()
    rel_w, rel_h = 30 * torch.randn(7, 2), 30 * torch.randn(5, 2)
    expected = relative_attention(
        q.double(), k.double(), v.double(), 2, rel_w.double(), rel_h.double(), impl="simple"
    )
    assert expected.abs().max() > 0
    with torch.autocast("cpu", dtype=torch.float16):
        got = relative_attention(q, k, v, 2, rel_w, rel_h, impl=impl, chunk_rows=1)
    assert got.dtype == torch.float16 and torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), expected, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# Structure, special cases, helpers
# ---------------------------------------------------------------------------------------------


def test_parameter_shapes_and_bias_flag() -> None:
    layer = AAConv2d(16, 24, 3, dk=8, dv=4, num_heads=2, max_size=(7, 11), bias=False)
    assert layer.conv_out is not None and layer.qkv_conv is not None
    assert layer.attn_out is not None
    assert layer.conv_out.weight.shape == (20, 16, 3, 3) and layer.conv_out.bias is None
    assert layer.qkv_conv.weight.shape == (20, 16, 1, 1) and layer.qkv_conv.bias is not None
    assert layer.attn_out.weight.shape == (4, 4, 1, 1) and layer.attn_out.bias is not None
    assert layer.key_rel_w is not None and layer.key_rel_w.shape == (21, 4)
    assert layer.key_rel_h is not None and layer.key_rel_h.shape == (13, 4)
    assert layer(torch.randn(2, 16, 7, 11)).shape == (2, 24, 7, 11)
    plain = AAConv2d(16, 24, 3, dk=8, dv=4, num_heads=2, relative=False)
    assert plain.key_rel_w is None and plain.key_rel_h is None


def test_relative_table_init_std() -> None:
    layer = AAConv2d(8, 8, 3, dk=64, dv=8, num_heads=4, max_size=200)
    assert layer.key_rel_w is not None
    table = layer.key_rel_w.detach()  # (399, 16): std should be 16**-0.5 = 0.25, mean 0
    assert abs(table.mean().item()) < 0.03
    assert table.std().item() == pytest.approx(0.25, rel=0.08)


def test_batch_independence() -> None:
    layer = _layer(dk=8, dv=6)
    x = torch.randn(3, layer.in_channels, 6, 7, dtype=torch.float64, requires_grad=True)
    for impl in ("simple", "chunked"):
        layer.attention_impl = impl
        out = layer(x)
        for n in range(3):
            torch.testing.assert_close(out[n : n + 1], layer(x[n : n + 1]))
        (grad,) = torch.autograd.grad(out[0].sum(), x)
        assert grad[1:].abs().max() == 0 and grad[0].abs().max() > 0


@pytest.mark.parametrize("depthwise", [False, True])
@pytest.mark.parametrize("stride", [1, 2])
def test_dv_zero_is_plain_conv(depthwise: bool, stride: int) -> None:
    torch.manual_seed(0)
    cin = 8 if depthwise else 5
    layer = AAConv2d(cin, 8, 3, stride, dk=0, dv=0, num_heads=4, depthwise=depthwise, max_size=16)
    assert layer.qkv_conv is None and layer.attn_out is None and layer.key_rel_w is None
    conv = nn.Conv2d(cin, 8, 3, stride, padding=1, groups=8 if depthwise else 1)
    conv.load_state_dict({k.removeprefix("conv_out."): v for k, v in layer.state_dict().items()})
    assert set(layer.state_dict()) == {"conv_out.weight", "conv_out.bias"}
    x = torch.randn(2, cin, 9, 10)
    torch.testing.assert_close(layer(x), conv(x))


def test_fully_attentional() -> None:
    layer = _layer(cin=5, cout=6, dk=4, dv=6)
    assert layer.conv_out is None and layer.qkv_conv is not None and layer.attn_out is not None
    x = torch.randn(2, 5, 4, 6, dtype=torch.float64)
    q, k, v = torch.split(layer.qkv_conv(x), [4, 4, 6], dim=1)
    expected = layer.attn_out(relative_attention(q, k, v, 2, layer.key_rel_w, layer.key_rel_h))
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x), reference_forward(layer, x))


def test_central_rows_and_embedding_matrix() -> None:
    table = torch.arange(17.0)[:, None].repeat(1, 2)  # row r holds value r; max = 9
    assert central_rel_rows(table, 5)[:, 0].tolist() == list(range(4, 13))
    assert central_rel_rows(table, 9)[:, 0].tolist() == list(range(17))
    e = rel_embedding_matrix(table, 4)  # (4, 4, 2): E[i, j] = table[j - i + 9 - 1]
    for i in range(4):
        for j in range(4):
            assert e[i, j, 0].item() == j - i + 8
    with pytest.raises(ValueError, match="size 10 is outside 1..9"):
        central_rel_rows(table, 10)
    with pytest.raises(ValueError, match="odd"):
        central_rel_rows(table[:16], 3)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ((512, 0.2, 0.1, 8), (104, 48)),  # 102.4 / 8 = 12.8 -> 13; 51.2 / 8 = 6.4 -> 6
        ((480, 0.1, 0.05, 4), (48, 24)),
        ((160, 0.2, 0.1, 8, 20), (160, 16)),  # CIFAR WRN: >= 20 key dims per head
        ((20, 0.25, 0.25, 2), (6, 6)),  # 2.5 rounds half up to 3
        ((10, 0.3, 1.0, 2), (4, 10)),  # 1.4999999999999998 -> 2 (float epsilon); dv = Fout
        ((7, 0.01, 1.0, 2), (2, 6)),  # at least Nh; dv clipped to the multiple of Nh <= Fout
        ((64, 1.0, 0.05, 8), (64, 8)),
    ],
)
def test_aa_channels_examples(args: tuple[Any, ...], expected: tuple[int, int]) -> None:
    assert aa_channels(*args) == expected


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((64, 0.0, 0.1, 8), "kappa must be in \\(0, 1\\], got 0.0"),
        ((64, 0.2, 1.5, 8), "upsilon must be in \\(0, 1\\], got 1.5"),
        ((64, 0.2, 0.1, 0), "num_heads must be >= 1, got 0"),
        ((0, 0.2, 0.1, 8), "out_channels must be >= 1, got 0"),
        ((4, 0.2, 0.1, 8), "out_channels=4 must be >= num_heads=8"),
        ((64, 0.2, 0.1, 8, -1), "min_key_depth_per_head must be >= 0, got -1"),
    ],
)
def test_aa_channels_errors(args: tuple[Any, ...], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        aa_channels(*args)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"dk": 5}, "dk=5 and dv=4 must be divisible by num_heads=2"),
        ({"dv": 3}, "dk=4 and dv=3 must be divisible by num_heads=2"),
        ({"dv": 12}, "dv=12 must be <= out_channels=10"),
        ({"dk": 0}, "dk must be >= num_heads when dv > 0, got dk=0 with dv=4"),
        ({"dv": 0}, "dv=0 \\(no attention\\) requires dk=0, got dk=4"),
        ({"dk": -2}, "dk and dv must be >= 0, got dk=-2"),
        ({"kernel_size": 4}, "kernel_size must be a positive odd int, got 4"),
        ({"kernel_size": 0}, "kernel_size must be a positive odd int, got 0"),
        ({"stride": 3}, "stride must be 1 or 2, got 3"),
        ({"in_channels": 0}, "in_channels must be >= 1, got 0"),
        ({"out_channels": 0}, "out_channels must be >= 1, got 0"),
        ({"num_heads": 0}, "num_heads must be >= 1, got 0"),
        ({"depthwise": True}, "depthwise requires in_channels == out_channels, got 6 != 10"),
        ({"max_size": (0, 5)}, re.escape("max_size must be a positive int or a pair of them")),
        ({"max_size": (5, 5, 5)}, "max_size must be"),
    ],
)
def test_invalid_arguments(kwargs: dict[str, Any], match: str) -> None:
    base: dict[str, Any] = {
        "in_channels": 6,
        "out_channels": 10,
        "kernel_size": 3,
        "dk": 4,
        "dv": 4,
        "num_heads": 2,
    }
    with pytest.raises(ValueError, match=match):
        AAConv2d(**{**base, **kwargs})


def test_forward_errors() -> None:
    layer = AAConv2d(6, 10, 3, dk=4, dv=4, num_heads=2, max_size=(9, 8))
    with pytest.raises(ValueError, match=re.escape("input size (9, 9) exceeds max_size=(9, 8)")):
        layer(torch.randn(1, 6, 9, 9))
    with pytest.raises(
        ValueError, match=re.escape("expected (B, 6, H, W) input, got (1, 5, 4, 4)")
    ):
        layer(torch.randn(1, 5, 4, 4))
    layer.attention_impl = "fast"
    with pytest.raises(ValueError, match="impl must be one of .* got 'fast'"):
        layer(torch.randn(1, 6, 4, 4))
    with pytest.raises(ValueError, match="stride must be 1 or 2, got 4"):
        attention_input(torch.randn(1, 6, 4, 4), 4)


def test_functional_errors() -> None:
    q, v = torch.randn(1, 4, 3, 3), torch.randn(1, 6, 3, 3)
    with pytest.raises(ValueError, match="num_heads=4 must divide dk=4 and dv=6"):
        relative_attention(q, q, v, 4)
    with pytest.raises(ValueError, match="both be given or both be None"):
        relative_attention(q, q, v, 2, torch.randn(5, 2))
    with pytest.raises(ValueError, match="key_rel_h must be"):
        relative_attention(q, q, v, 2, torch.randn(5, 2), torch.randn(5, 3))
    with pytest.raises(ValueError, match="size 3 is outside 1..2"):
        relative_attention(q, q, v, 2, torch.randn(5, 2), torch.randn(3, 2))
    with pytest.raises(ValueError, match="chunk_rows must be >= 1, got 0"):
        relative_attention(q, q, v, 2, impl="chunked", chunk_rows=0)


# ---------------------------------------------------------------------------------------------
# ONNX export: one file, two batch sizes (dynamic batch axis), onnxruntime parity <= 1e-4
# ---------------------------------------------------------------------------------------------


def _onnx_parity(path: Path, layer: AAConv2d, size: tuple[int, int]) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.randn(batch, layer.in_channels, *size)
        (got,) = session.run(None, {"x": x.numpy()})
        with torch.no_grad():
            expected = layer(x).numpy()
        assert got.shape == expected.shape
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("stride", [1, 2])
def test_onnx_export_torchscript_exporter(tmp_path: Path, stride: int) -> None:
    layer = _layer(stride=stride, dk=8, dv=6).float().eval()
    path = tmp_path / "aa.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecation of the legacy exporter, tracer warnings
        torch.onnx.export(
            layer,
            (torch.randn(2, layer.in_channels, 7, 9),),
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=["x"],
            output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
        )
    _onnx_parity(path, layer, (7, 9))


@pytest.mark.slow  # torch.export tracing: ~6 s on an idle 2-core CPU
def test_onnx_export_dynamo_exporter(tmp_path: Path) -> None:
    layer = _layer(stride=2, dk=8, dv=6, depthwise=True).float().eval()
    path = tmp_path / "aa.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            layer,
            (torch.randn(2, layer.in_channels, 8, 7),),
            str(path),
            dynamo=True,
            opset_version=18,
            input_names=["x"],
            output_names=["y"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch")}},
        )
    _onnx_parity(path, layer, (8, 7))


# ---------------------------------------------------------------------------------------------
# GPU
# ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["simple", "chunked"])
def test_cuda_matches_cpu(impl: str) -> None:
    layer = _layer(stride=2, dk=8, dv=6).float()
    layer.attention_impl, layer.chunk_rows = impl, 2
    x = torch.randn(2, layer.in_channels, 9, 8)
    grad = torch.randn(2, 10, 5, 4)
    cpu = _forward_and_grads(layer, x, grad)
    layer.cuda()
    gpu = _forward_and_grads(layer, x.cuda(), grad.cuda())
    for g, c in zip(gpu, cpu, strict=True):
        torch.testing.assert_close(g.cpu(), c, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("impl", ["simple", "chunked", "sdpa", "flex"])
def test_cuda_float16_autocast_matches_float32(impl: str) -> None:
    layer = _layer(stride=1, dk=8, dv=6).float().cuda()
    x = torch.randn(2, layer.in_channels, 9, 8, device="cuda")
    grad = torch.randn(2, 10, 9, 8, device="cuda")
    layer.attention_impl = "simple"
    expected = _forward_and_grads(layer, x, grad)
    layer.attention_impl, layer.chunk_rows = impl, 2
    with torch.autocast("cuda", dtype=torch.float16):
        got = _forward_and_grads(layer, x, grad)
    assert got[0].dtype == torch.float16
    for g, e in zip(got, expected, strict=True):
        assert torch.isfinite(g).all()
        assert _rel_norm_err(g, e) < 0.01


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("relative", [True, False])
def test_cuda_flex_equals_reference(relative: bool) -> None:
    """flex_attention's score_mod path == the brute-force loops, forward and gradients."""
    layer = _layer(stride=2, relative=relative, dk=8, dv=6)  # float64 on CPU: the reference
    x = torch.randn(2, layer.in_channels, 9, 8, dtype=torch.float64)
    grad = torch.randn(2, 10, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(layer(x), reference_forward(layer, x), rtol=1e-5, atol=1e-5)
    expected = _forward_and_grads(layer, x, grad)
    layer = layer.float().cuda()
    layer.attention_impl = "flex"
    got = _forward_and_grads(layer, x.float().cuda(), grad.float().cuda())
    for g, e in zip(got, expected, strict=True):
        assert _rel_norm_err(g.cpu(), e) < 1e-4


def test_meta_device_shapes() -> None:
    """Shape-only runs on the meta device (used for cost counting) take every CPU path."""
    q, v = torch.randn(2, 8, 5, 6, device="meta"), torch.randn(2, 6, 5, 6, device="meta")
    rel_w, rel_h = torch.randn(11, 4, device="meta"), torch.randn(9, 4, device="meta")
    for impl in ("auto", "simple", "sdpa"):
        out = relative_attention(q, q, v, 2, rel_w, rel_h, impl=impl)
        assert out.shape == (2, 6, 5, 6) and out.device.type == "meta"


def test_flex_needs_cuda() -> None:
    q = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="impl='flex' needs CUDA tensors, got device cpu"):
        relative_attention(q, q, q, 2, impl="flex")


# ---------------------------------------------------------------------------------------------
# The fused C kernel (aanas.ops._fused_cpu): build, fallback, threads, float32, special values
# ---------------------------------------------------------------------------------------------


def _core_inputs(
    b: int, heads: int, dkh: int, dvh: int, h: int, w: int, dtype: torch.dtype = torch.float32
) -> list[Tensor]:
    torch.manual_seed(4)
    q, k = (torch.randn(b, heads * dkh, h, w) for _ in range(2))
    v = torch.randn(b, heads * dvh, h, w)
    rel_w, rel_h = (torch.randn(2 * n + 1, dkh) for n in (w, h))
    return [t.to(dtype).requires_grad_() for t in (q, k, v, rel_w, rel_h)]


def _core_out_and_grads(inputs: list[Tensor], heads: int, impl: str) -> list[Tensor]:
    q, k, v, rel_w, rel_h = inputs
    out = relative_attention(q, k, v, heads, rel_w, rel_h, impl=impl)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
    return [out, *torch.autograd.grad(out, inputs, grad)]


def _assert_fused_equals_simple(inputs: list[Tensor], heads: int, rtol: float, atol: float) -> None:
    """Output and every input gradient of the fused kernel equal the simple path's."""
    expected = _core_out_and_grads(inputs, heads, "simple")
    got = _core_out_and_grads(inputs, heads, "fused")
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=rtol, atol=atol)


def test_fused_kernel_is_built_here() -> None:
    """Where a C compiler exists (CI, this project's machines), the fast path must not be lost
    silently to the fallback."""
    if _fused_cpu._compiler() is None:
        pytest.skip("no C compiler on PATH: the chunked fallback is tested below")
    assert _fused_cpu.available()


def test_fused_float32_odd_sizes_match_simple() -> None:
    """Thin heads as in AA-ResNet-50 (dk/Nh = 3, dv/Nh = 2), odd sizes that no vector width
    divides, float32 (the vectorised exp): equal to the simple path."""
    _assert_fused_equals_simple(_core_inputs(2, 4, 3, 2, 11, 13), 4, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize(
    ("dkh", "dvh", "h", "w"),
    [
        (5, 6, 9, 17),  # deeper heads than the kernel unrolls, values in two groups, W 17 -> 24
        (4, 1, 7, 7),  # MnasNet-like 7x7 (half vectors), 49 rows: one left after groups of 4
        (3, 2, 28, 28),  # AA-ResNet-50's 28x28 stage: full vectors, 28 -> 32
    ],
)
def test_fused_float32_shapes_match_simple(dkh: int, dvh: int, h: int, w: int) -> None:
    """Padded rows, row groups and their remainders, channel groups, both vector widths."""
    _assert_fused_equals_simple(_core_inputs(1, 2, dkh, dvh, h, w), 2, rtol=1e-5, atol=3e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("h", "w"), [(8, 8), (16, 16), (3, 32), (32, 4)])
def test_fused_unpadded_sizes_match_simple(dtype: torch.dtype, h: int, w: int) -> None:
    """Maps whose width or height is a whole number of vectors (CIFAR's 32, 16, 8): the
    tables get no padding, and must still reach the kernel contiguous (zero padding handed
    back the transposed view, read as if contiguous: wrong logits)."""
    tol = 3e-5 if dtype == torch.float32 else 1e-10
    _assert_fused_equals_simple(_core_inputs(2, 2, 3, 2, h, w, dtype), 2, rtol=tol, atol=tol)


def test_fused_reads_qkv_slices_and_other_layouts() -> None:
    """q, k, v as channel slices of one qkv tensor (read in place, batch stride of the whole)
    and in channels-last layout (copied first) give the simple path's outputs and gradients."""
    torch.manual_seed(3)
    heads, dkh, dvh = 2, 3, 2
    qkv = torch.randn(3, heads * (2 * dkh + dvh), 5, 6, requires_grad=True)
    rel_w, rel_h = (torch.randn(2 * n - 1, dkh, requires_grad=True) for n in (6, 5))
    grad = torch.randn(3, heads * dvh, 5, 6)
    for layout in (torch.contiguous_format, torch.channels_last):
        results = []
        for impl in ("fused", "simple"):
            x = qkv.to(memory_format=layout)
            q, k, v = torch.split(x, [heads * dkh, heads * dkh, heads * dvh], dim=1)
            out = relative_attention(q, k, v, heads, rel_w, rel_h, impl=impl)
            results.append([out, *torch.autograd.grad(out, [qkv, rel_w, rel_h], grad)])
        for g, e in zip(*results, strict=True):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize("impl", ["simple", "chunked", "fused"])
def test_mixed_dtypes_are_refused(impl: str) -> None:
    """float64 tables with float32 maps: one clear error on every path (the fused kernel would
    read everything as q's dtype, the chunked path failed inside a matmul)."""
    q, k, v, rel_w, rel_h = _core_inputs(1, 2, 3, 2, 4, 5)
    with pytest.raises(ValueError, match="key_rel_w must have q's dtype torch.float32"):
        relative_attention(q, k, v, 2, rel_w.double(), rel_h.double(), impl=impl)
    with pytest.raises(ValueError, match="v must have q's dtype torch.float32"):
        relative_attention(q, k, v.double(), 2, rel_w, rel_h, impl=impl)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts: allowed
        relative_attention(q.bfloat16(), k, v, 2, rel_w, rel_h, impl=impl)


def test_fused_narrow_vectors_match_simple(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The kernel as a machine without AVX-512 or AVX2 builds it (16-byte vectors: the generic
    2^x and lane sums over 4 and 2 lanes instead of 16 and 8) gives the same results."""
    if _fused_cpu._compiler() is None:
        pytest.skip("no C compiler on PATH")
    monkeypatch.setenv("AANAS_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(_fused_cpu, "_vector_bytes", lambda flags: 16)
    _fused_cpu._library.cache_clear()
    try:
        assert _fused_cpu._library() is not None
        assert _fused_cpu._library()[1] == {"f32": 4, "f32h": 2, "f64": 2}
        for dtype, tol in ((torch.float32, 3e-5), (torch.float64, 1e-10)):
            for h, w in ((5, 7), (4, 8)):  # padded rows; rows of whole vectors, no padding
                inputs = _core_inputs(2, 2, 3, 2, h, w, dtype)
                _assert_fused_equals_simple(inputs, 2, rtol=tol, atol=tol)
    finally:
        monkeypatch.undo()
        _fused_cpu._library.cache_clear()


def test_fused_two_threads_equal_one_thread() -> None:
    """The OpenMP loops split rows (forward) and (batch, head) pairs (backward): each output
    element is written by one thread in a fixed order, so the results are bitwise equal."""
    inputs = _core_inputs(2, 3, 4, 2, 6, 7)
    one = _core_out_and_grads(inputs, 3, "fused")
    torch.set_num_threads(2)  # the autouse fixture restores the count
    two = _core_out_and_grads(inputs, 3, "fused")
    for a, b in zip(one, two, strict=True):
        assert torch.equal(a, b)


def test_fused_propagates_nan_and_inf() -> None:
    """-ffast-math must not hide a NaN/inf (what GradScaler and anomaly checks look for):
    non-finite inputs take the chunked path; a NaN gradient runs through the kernel."""
    for bad in (float("nan"), float("inf")):
        q, k, v, rel_w, rel_h = _core_inputs(1, 2, 3, 2, 4, 5)
        with torch.no_grad():
            q[0, 0, 1, 2] = bad
        out = relative_attention(q, k, v, 2, rel_w, rel_h, impl="fused")
        expected = relative_attention(q, k, v, 2, rel_w, rel_h, impl="simple")
        assert torch.equal(torch.isnan(out), torch.isnan(expected))
        assert not torch.isfinite(out).all()
    # A NaN in the incoming gradient (finite forward: the kernel runs) reaches the same grads.
    inputs = _core_inputs(1, 2, 3, 2, 4, 5)
    grads = []
    for impl in ("fused", "simple"):
        out = relative_attention(*inputs[:3], 2, *inputs[3:], impl=impl)
        grad = torch.zeros_like(out)
        grad[0, 1, 2, 3] = float("nan")
        grads.append(torch.autograd.grad(out, inputs, grad))
    for g, e in zip(*grads, strict=True):
        assert torch.isnan(g).any() and torch.equal(torch.isnan(g), torch.isnan(e))


def test_fused_builds_into_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh cache folder gets one library file (atomic rename, no temporary left)."""
    if _fused_cpu._compiler() is None:
        pytest.skip("no C compiler on PATH")
    monkeypatch.setenv("AANAS_KERNEL_CACHE", str(tmp_path / "kernels"))
    lib, lanes = _fused_cpu._build()
    files = sorted(p.name for p in (tmp_path / "kernels").iterdir())
    assert len(files) == 1 and files[0].startswith("aa_fused_") and files[0].endswith(".so")
    assert lib.aa_fwd_f32 is not None and lib.aa_bwd_f64 is not None
    assert lanes["f32"] == 2 * lanes["f32h"] and lanes["f32"] >= 8
    assert _fused_cpu._build()[0]._name == lib._name  # second call reuses the file


def test_fused_falls_back_to_chunked_with_one_warning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AANAS_KERNEL_CACHE", str(tmp_path / "kernels"))
    monkeypatch.setattr(_fused_cpu, "_compiler", lambda: None)
    _fused_cpu._library.cache_clear()
    try:
        inputs = _core_inputs(1, 2, 3, 2, 5, 6)
        expected = _core_out_and_grads(inputs, 2, "chunked")
        with pytest.warns(RuntimeWarning, match="no C compiler found .* using the chunked"):
            got = _core_out_and_grads(inputs, 2, "fused")
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # warned once only
            assert not _fused_cpu.available()
            assert attention._auto_impl(inputs[0], 1 << 30, needs_grad=True) == "chunked"
        for g, e in zip(got, expected, strict=True):
            torch.testing.assert_close(g, e)
    finally:
        monkeypatch.undo()
        _fused_cpu._library.cache_clear()


def test_fused_errors() -> None:
    q = torch.randn(1, 4, 3, 3)
    with pytest.raises(ValueError, match="impl='fused' needs float32/float64 CPU tensors"):
        relative_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), 2, impl="fused")
    meta = q.to("meta")
    with pytest.raises(ValueError, match="impl='fused' needs .* on meta"):
        relative_attention(meta, meta, meta, 2, impl="fused")


def test_fused_large_maps_and_nonfinite_run_chunked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Maps over MAX_POSITIONS never reach the kernel; with a NaN/inf in any input (q, k, v or
    a table) the kernel declines before computing and the exact path runs."""
    calls: list[int] = []
    original = _fused_cpu._FusedRelAttention.apply

    def spy(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(_fused_cpu._FusedRelAttention, "apply", spy)
    q, k, v, rel_w, rel_h = _core_inputs(1, 2, 3, 2, 4, 5)
    relative_attention(q, k, v, 2, rel_w, rel_h, impl="fused")
    assert calls == [1]
    monkeypatch.setattr(_fused_cpu, "MAX_POSITIONS", 19)  # the map has 20 positions
    out = relative_attention(q, k, v, 2, rel_w, rel_h, impl="fused")
    assert calls == [1]
    torch.testing.assert_close(out, relative_attention(q, k, v, 2, rel_w, rel_h, impl="simple"))
    monkeypatch.setattr(_fused_cpu, "MAX_POSITIONS", 20)
    for index in range(5):
        inputs = [t.detach().clone() for t in _core_inputs(1, 2, 3, 2, 4, 5)]
        inputs[index].view(-1)[3] = float("inf")
        got = relative_attention(*inputs[:3], 2, *inputs[3:], impl="fused")
        expected = relative_attention(*inputs[:3], 2, *inputs[3:], impl="chunked")
        assert torch.equal(torch.isnan(got), torch.isnan(expected))
        assert not torch.isnan(got).all()  # the table's inf reaches only some logits
        finite = ~torch.isnan(expected)
        torch.testing.assert_close(got[finite], expected[finite])
    assert len(calls) == 6  # the kernel was asked each time and declined
