"""Benchmark AAConv2d against a literal port of the paper's appendix algorithm.

Bello et al., *Attention Augmented Convolutional Networks*, arXiv:1904.09925, appendix A: the
relative logits are computed against a ``(2W - 1)`` table, converted to absolute offsets by the
pad-and-reshape ``rel_to_abs`` trick, tiled to ``(HW, HW)`` and added to the content logits.
The port below is written from that code (NHWC inside, as in TF) and shares the layer's weights,
so the outputs are asserted equal before anything is timed.

Measured per configuration, in one run: forward+backward time (median of ``--repeats`` runs;
the reference is timed before *and* after AAConv2d and its two medians are pooled, so drift in
machine speed shows up in both) and peak memory. On CPU the peak is the max over time of the
summed categories of the PyTorch profiler's memory timeline (not process RSS); on CUDA it is
``torch.cuda.max_memory_allocated`` above the memory held before the step.

Usage::

    python benchmarks/aa_layer.py            # CPU, one thread, all sizes
    python benchmarks/aa_layer.py --quick    # fewer repeats, main size only
    python benchmarks/aa_layer.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from aanas.ops.attention import (
    ATTENTION_IMPLS,
    AAConv2d,
    _auto_impl,
    aa_channels,
    attention_input,
)


@dataclass(frozen=True)
class Case:
    """One benchmarked layer configuration."""

    name: str
    batch: int
    channels: int
    size: int
    dk: int
    dv: int
    num_heads: int
    depthwise: bool = False


def _cases(quick: bool) -> list[Case]:
    """The issue's main size, ResNet-50 stage 4 and a MnasNet-like expanded depthwise stage."""
    main = Case("main 28x28 128ch dk64 dv32 Nh8", 4, 128, 28, 64, 32, 8)
    if quick:
        return [main]
    r_dk, r_dv = aa_channels(512, 0.2, 0.1, 8)  # (104, 48)
    m_dk, m_dv = aa_channels(480, 0.1, 0.05, 4)  # (48, 24)
    return [
        main,
        Case(f"ResNet-50 s4 7x7 512ch dk{r_dk} dv{r_dv} Nh8", 4, 512, 7, r_dk, r_dv, 8),
        Case(f"MnasNet 14x14 480ch dw dk{m_dk} dv{m_dv} Nh4", 4, 480, 14, m_dk, m_dv, 4, True),
    ]


# ---------------------------------------------------------------------------------------------
# Literal port of the appendix code (TF -> PyTorch, NHWC kept), reading the layer's weights.
# ---------------------------------------------------------------------------------------------


def _split_heads_2d(inputs: Tensor, nh: int) -> Tensor:
    b, h, w, d = inputs.shape
    split = inputs.reshape(b, h, w, nh, d // nh)  # (B, H, W, Nh, d/Nh)
    return split.permute(0, 3, 1, 2, 4)  # (B, Nh, H, W, d/Nh)


def _combine_heads_2d(inputs: Tensor) -> Tensor:
    transposed = inputs.permute(0, 2, 3, 1, 4)  # (B, H, W, Nh, d/Nh)
    b, h, w, nh, c = transposed.shape
    return transposed.reshape(b, h, w, nh * c)  # (B, H, W, d)


def _rel_to_abs(x: Tensor) -> Tensor:
    b, nh, length, _ = x.shape
    col_pad = x.new_zeros(b, nh, length, 1)
    x = torch.cat([x, col_pad], dim=3)  # (B, Nh, L, 2L)
    flat_x = x.reshape(b, nh, length * 2 * length)  # (B, Nh, 2L^2)
    flat_pad = x.new_zeros(b, nh, length - 1)
    flat_x_padded = torch.cat([flat_x, flat_pad], dim=2)  # (B, Nh, 2L^2 + L - 1)
    final_x = flat_x_padded.reshape(b, nh, length + 1, 2 * length - 1)  # (B, Nh, L+1, 2L-1)
    return final_x[:, :, :length, length - 1 :]  # (B, Nh, L, L)


def _relative_logits_1d(
    q: Tensor, rel_k: Tensor, h: int, w: int, nh: int, transpose_mask: list[int]
) -> Tensor:
    rel_logits = torch.einsum("bhxyd,md->bhxym", q, rel_k)  # (B, Nh, H, W, 2W-1)
    rel_logits = rel_logits.reshape(-1, nh * h, w, 2 * w - 1)  # (B, Nh*H, W, 2W-1)
    rel_logits = _rel_to_abs(rel_logits)  # (B, Nh*H, W, W)
    rel_logits = rel_logits.reshape(-1, nh, h, w, w)  # (B, Nh, H, W, W)
    rel_logits = rel_logits.unsqueeze(3)  # (B, Nh, H, 1, W, W)
    rel_logits = rel_logits.repeat(1, 1, 1, h, 1, 1)  # tf.tile: (B, Nh, H, H, W, W)
    rel_logits = rel_logits.permute(*transpose_mask)
    return rel_logits.reshape(-1, nh, h * w, h * w)  # (B, Nh, HW, HW)


def _central(table: Tensor, size: int) -> Tensor:
    """The appendix builds a (2W - 1) table per layer; take the matching rows of a larger one."""
    m = (table.shape[0] + 1) // 2
    return table[m - size : m + size - 1]


def appendix_forward(layer: AAConv2d, x: Tensor) -> Tensor:
    """``augmented_conv2d`` of the appendix, run with ``layer``'s weights (NCHW in and out)."""
    assert layer.qkv_conv is not None and layer.attn_out is not None
    nh, dk, dv = layer.num_heads, layer.dk, layer.dv
    outs = []
    if layer.conv_out is not None:
        outs.append(layer.conv_out(x[:, : layer.out_channels - dv] if layer.depthwise else x))
    qkv = layer.qkv_conv(attention_input(x, layer.stride)).permute(0, 2, 3, 1)  # (B, H, W, C)
    b, h, w, _ = qkv.shape
    q, k, v = torch.split(qkv, [dk, dk, dv], dim=3)
    q = _split_heads_2d(q, nh)  # (B, Nh, H, W, dkh)
    k = _split_heads_2d(k, nh)
    v = _split_heads_2d(v, nh)
    dkh = dk // nh
    q = q * dkh**-0.5
    flat_q = q.reshape(b, nh, h * w, dkh)  # (B, Nh, HW, dkh)
    flat_k = k.reshape(b, nh, h * w, dkh)
    flat_v = v.reshape(b, nh, h * w, dv // nh)  # (B, Nh, HW, dvh)
    logits = torch.matmul(flat_q, flat_k.transpose(-1, -2))  # (B, Nh, HW, HW)
    if layer.relative:
        assert layer.key_rel_w is not None and layer.key_rel_h is not None
        rel_w = _relative_logits_1d(q, _central(layer.key_rel_w, w), h, w, nh, [0, 1, 2, 4, 3, 5])
        rel_h = _relative_logits_1d(
            q.permute(0, 1, 3, 2, 4), _central(layer.key_rel_h, h), w, h, nh, [0, 1, 4, 2, 5, 3]
        )
        logits = logits + rel_h
        logits = logits + rel_w
    weights = torch.softmax(logits, dim=-1)
    attn = torch.matmul(weights, flat_v)  # (B, Nh, HW, dvh)
    attn = attn.reshape(b, nh, h, w, dv // nh)  # (B, Nh, H, W, dvh)
    attn = _combine_heads_2d(attn).permute(0, 3, 1, 2)  # (B, dv, H, W)
    outs.append(layer.attn_out(attn))
    return torch.cat(outs, dim=1)


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------


def _step(
    fn: Callable[[Tensor], Tensor], x: Tensor, grad: Tensor, params: Sequence[Tensor]
) -> list[Tensor]:
    """One forward+backward; returns the gradients of x and of all parameters."""
    out = fn(x)
    return list(torch.autograd.grad(out, [x, *params], grad))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


_CLOCK: Callable[[], float] = time.perf_counter  # --clock cpu: time.process_time


def _times(step: Callable[[], object], repeats: int, device: torch.device) -> list[float]:
    step()  # warm-up
    out = []
    for _ in range(repeats):
        _sync(device)
        t0 = _CLOCK()
        step()
        _sync(device)
        out.append(_CLOCK() - t0)
    return out


def _peak_bytes(step: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        _sync(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return float(torch.cuda.max_memory_allocated(device) - base)
    with warnings.catch_warnings():  # export_memory_timeline is deprecated but still works
        warnings.simplefilter("ignore", FutureWarning)
        return _profiled_peak_bytes(step)


def _profiled_peak_bytes(step: Callable[[], object]) -> float:
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU],
        profile_memory=True,
        record_shapes=True,
        with_stack=True,
    ) as prof:
        step()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "timeline.json"
        prof.export_memory_timeline(str(path), device="cpu")
        # [times, sizes]: sizes[i] lists the bytes held by each category (parameters,
        # activations, gradients, temporaries, ...) at times[i]; their sum is the total.
        _, sizes = json.loads(path.read_text())
    return float(max(sum(row) for row in sizes))


@dataclass(frozen=True)
class Result:
    """Measured figures of one case."""

    case: Case
    ref_ms: float
    ours_ms: float
    ref_mb: float
    ours_mb: float
    path: str


def run_case(case: Case, device: torch.device, repeats: int, impl: str = "auto") -> Result:
    """Checks that both implementations agree, then times and profiles them."""
    torch.manual_seed(0)
    layer = AAConv2d(
        case.channels,
        case.channels,
        3,
        dk=case.dk,
        dv=case.dv,
        num_heads=case.num_heads,
        max_size=case.size,
        depthwise=case.depthwise,
    ).to(device)
    params = list(layer.parameters())
    x = torch.randn(case.batch, case.channels, case.size, case.size, device=device)
    x.requires_grad_(True)
    grad = torch.randn(case.batch, case.channels, case.size, case.size, device=device)

    logits = case.batch * case.num_heads * (case.size**2) ** 2
    # What attention_impl="auto" picks, or the path asked for.
    path = _auto_impl(x, logits, needs_grad=True) if impl == "auto" else impl
    layer.attention_impl = path

    def ref() -> list[Tensor]:
        return _step(lambda t: appendix_forward(layer, t), x, grad, params)

    def ours() -> list[Tensor]:
        return _step(layer, x, grad, params)

    # Same outputs and gradients before timing anything. On CUDA, float32 sums over
    # B * Nh * HW^2 terms in other orders make single near-zero gradient entries differ by ~1%
    # (bias gradients), so there the bound is on the norm of the difference.
    with torch.no_grad():
        torch.testing.assert_close(layer(x), appendix_forward(layer, x), rtol=1e-4, atol=1e-4)
    for g_ours, g_ref in zip(ours(), ref(), strict=True):
        if device.type == "cpu":
            torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-4)
        else:
            err = ((g_ours - g_ref).norm() / g_ref.norm().clamp_min(1e-12)).item()
            assert err < 1e-4, f"gradients differ: relative norm error {err:.2e}"

    ref_t = _times(ref, repeats, device)
    ours_t = _times(ours, repeats, device)
    ref_t += _times(ref, repeats, device)
    ref_mb = _peak_bytes(ref, device) / 2**20
    ours_mb = _peak_bytes(ours, device) / 2**20
    return Result(
        case,
        1e3 * statistics.median(ref_t),
        1e3 * statistics.median(ours_t),
        ref_mb,
        ours_mb,
        path,
    )


def sweep(case: Case, device: torch.device, repeats: int) -> None:
    """Times the simple path and the chunked path for several ``chunk_rows`` (tuning aid)."""
    torch.manual_seed(0)
    layer = AAConv2d(
        case.channels,
        case.channels,
        3,
        dk=case.dk,
        dv=case.dv,
        num_heads=case.num_heads,
        max_size=case.size,
        depthwise=case.depthwise,
    ).to(device)
    params = list(layer.parameters())
    x = torch.randn(case.batch, case.channels, case.size, case.size, device=device)
    x.requires_grad_(True)
    grad = torch.randn_like(x)
    settings: list[tuple[str, int | None]] = [("simple", None), ("chunked", None)]
    if device.type == "cpu":
        settings.append(("fused", None))
    settings += [("chunked", r) for r in (1, 2, 4, 7, 14) if r < case.size]
    for impl, rows in settings:
        layer.attention_impl, layer.chunk_rows = impl, rows
        ms = 1e3 * statistics.median(_times(lambda: _step(layer, x, grad, params), repeats, device))
        mb = _peak_bytes(lambda: _step(layer, x, grad, params), device) / 2**20
        print(f"  sweep {case.name}: {impl} chunk_rows={rows}: {ms:.2f} ms, {mb:.1f} MiB")


def main() -> None:
    """Parses arguments, runs every case and prints a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per block")
    parser.add_argument("--quick", action="store_true", help="main size only, fewer repeats")
    parser.add_argument("--sweep", action="store_true", help="also time several chunk sizes")
    parser.add_argument(
        "--impl", choices=ATTENTION_IMPLS, default="auto", help="AAConv2d path to time"
    )
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="cpu: process CPU time, which a loaded shared machine does not inflate (1 thread)",
    )
    args = parser.parse_args()
    global _CLOCK
    _CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.set_num_threads(args.threads)
    # Exact float32 on CUDA (no TF32), so that both implementations compute the same thing.
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    device = torch.device(args.device)
    repeats = args.repeats or (3 if args.quick else 5)

    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    header = (
        f"torch {torch.__version__}, device {dev_name}, torch.get_num_threads()="
        f"{torch.get_num_threads()}, {args.clock} clock, forward+backward, median of {repeats} "
        f"runs (reference: "
        f"{2 * repeats} runs, before and after), 3x3 kernel, stride 1, relative=True"
    )
    print(header, flush=True)
    results = []
    for case in _cases(args.quick):
        res = run_case(case, device, repeats, args.impl)
        results.append(res)
        print(
            f"  {case.name}: appendix {res.ref_ms:.1f} ms / {res.ref_mb:.1f} MiB, AAConv2d "
            f"({res.path}) {res.ours_ms:.1f} ms / {res.ours_mb:.1f} MiB",
            flush=True,
        )
    if args.sweep:
        for case in _cases(args.quick):
            sweep(case, device, repeats)
    mem = "profiler memory timeline" if device.type == "cpu" else "cuda max_memory_allocated"
    print()
    print(
        f"| layer (B=4) | path | appendix ms | ours ms | speed-up | peak MiB ref -> ours ({mem}) "
        "| memory ratio |"
    )
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r.case.name} | {r.path} | {r.ref_ms:.1f} | {r.ours_ms:.1f} | "
            f"{r.ref_ms / r.ours_ms:.2f}x | {r.ref_mb:.1f} -> {r.ours_mb:.1f} | "
            f"{r.ours_mb / r.ref_mb:.2f}x |"
        )
    print(f"\n{header}")


if __name__ == "__main__":
    main()
