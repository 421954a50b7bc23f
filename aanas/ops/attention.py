"""Attention-augmented convolution (Bello et al., ICCV 2019, arXiv:1904.09925).

An :class:`AAConv2d` concatenates a convolution producing ``out_channels - dv`` maps with a
multi-head self-attention branch producing ``dv`` maps, where every query attends to every
position of the feature map with 2D relative position logits (separate width and height
embeddings, shared by all heads of one layer).

The attention itself lives in one functional core, :func:`relative_attention`, which takes
q/k/v as feature maps. The static layer and the weight-sharing supernet (which calls it with
sliced weights) therefore run one implementation. It has interchangeable paths, all equal to
the formula in forward and backward:

* ``"simple"``: materialises the ``(B, Nh, HW, HW)`` logits, as the paper's appendix does, but
  adds the relative terms by broadcasting ``(B, Nh, H, W, H)`` and ``(B, Nh, H, W, W)`` tensors
  instead of tiling them to ``(HW, HW)``. Trace-friendly (no data-dependent Python loops); used
  for ONNX export and small problems.
* ``"chunked"``: a custom autograd function that processes a few query rows at a time and
  recomputes each chunk's logits and softmax in backward (flash-attention style), so neither the
  logits, their gradient nor the softmax output is ever stored whole. Used for training on CUDA
  where memory limits, and on CPU where the fused kernel is unavailable (see
  :func:`relative_attention`).
* ``"fused"``: CPU only, a small C kernel (:mod:`aanas.ops._fused_cpu`, built once per machine)
  that does the whole softmax attention four query rows at a time in cache, forward and
  backward; no ``(HW)^2`` tensor at all. The default for CPU training where it builds (3.5x the
  chunked path's speed at AA-ResNet-50's 28x28 layers, forward + backward, one thread); the
  chunked path is its fallback.
* ``"sdpa"``: ``F.scaled_dot_product_attention`` with the relative logits as an additive mask.
* ``"flex"``: CUDA ``flex_attention`` with the relative logits as a score modification.

Everything is computed in the channel-major ``(B*Nh, d, HW)`` layout the 1x1 ``qkv_conv``
produces, so q, k and v are never permuted into copies; under autocast the core runs in float32.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

# The kappa/upsilon -> (dk, dv) rule is spec arithmetic (no torch), owned by aanas.spec so that
# specs validate without building a layer; re-exported here as part of the layer's API.
from aanas.ops import _fused_cpu
from aanas.spec import aa_channels

__all__ = [
    "AAConv2d",
    "aa_channels",
    "attention_input",
    "central_rel_rows",
    "rel_embedding_matrix",
    "relative_attention",
]

ATTENTION_IMPLS = ("auto", "simple", "chunked", "fused", "sdpa", "flex")

# "auto" switches to the chunked path on CPU from this many logits elements, B * Nh * (HW)^2.
# Measured with relative_attention forward+backward, one thread, process CPU time (2-core EPYC
# shared with other jobs, torch 2.14): 2**15.2 logits (7x7, B=4, Nh=4) simple 2.0 ms, chunked
# 2.1 ms; 2**16.2 (7x7, Nh=8) 2.7 vs 2.2 ms; 2**19.2 (14x14, Nh=4) 15.0 vs 9.0 ms; 2**24.2
# (28x28, Nh=8, dkh=3) 515 vs 153 ms. The chunked path's reused buffer and in-place softmax
# avoid the page faults of fresh (HW)^2 tensors, so it wins from about 2**16.
_CHUNK_MIN_LOGITS = 1 << 16
# Target number of logits elements per chunk (B * Nh * rows * W * HW), 2 MiB in float32. Same
# setup, chunk_rows swept: 14x14 Nh=8: 11.8 / 10.8 / 11.0 ms at 2**16.5 / 2**17.5 / 2**18.5
# logits per chunk; 28x28 Nh=8: 154 / 178 / 164 ms at 2**19.4 / 2**20.4 / 2**21.4.
_CHUNK_TARGET_LOGITS = 1 << 19
# On CUDA the chunked path is launch-bound at these sizes (H100, 28x28, B=4, `--sweep`: simple
# 4.0 ms, chunked 6.0 ms with 2 chunks and 42.8 ms with 28), so it is used only once the logits
# would take 256 MiB, where memory rather than speed limits the batch size, with 64 MiB chunks.
_CHUNK_MIN_LOGITS_CUDA = 1 << 26
# dtypes the fused C kernel is built for (autocast runs the core in float32).
_FUSED_DTYPES = (torch.float32, torch.float64)
# "auto" takes the fused kernel on CPU from this many logits. Forward+backward, one thread,
# process CPU time (same shared 2-core machine, loaded, torch 2.14), simple / chunked / fused
# (the kernel's first version; the current one is about 1.4x faster at 28x28):
# 2**10.3 (5x5, B=1, Nh=2) 0.61 / 0.85 / 0.64 ms; 2**13.2 (7x7, B=1, Nh=4) 0.73 / 0.60 /
# 0.45 ms; 2**16.2 (7x7, B=4, Nh=8, dkh=13) 2.6 / 2.3 / 1.6 ms; 2**20.2 (14x14, dkh=6)
# 15.8 / 10.7 / 7.4 ms; 2**24.2 (28x28, dkh=3) 349 / 98 / 58 ms.
_FUSED_MIN_LOGITS = 1 << 12
_CHUNK_TARGET_LOGITS_CUDA = 1 << 24


def attention_input(x: Tensor, stride: int) -> Tensor:
    """Returns the map the attention branch reads for a layer of the given stride.

    With stride 2 the conv branch strides, and the attention branch must produce the same output
    size. Here it runs on the input downsampled by 3x3 average pooling with stride 2 and padding
    1 (``count_include_pad=False``, like TF 'SAME' average pooling), which gives
    ``ceil(H / 2) x ceil(W / 2)``, the same size as a stride-2 conv with ``padding = k // 2``.
    This choice could not be verified from the paper's text (it does not say how strided
    attention-augmented layers downsample), so it is kept in this one function. Note that TF
    'SAME' pads even inputs only at the bottom/right; this pads symmetrically.

    Args:
        x: ``(B, C, H, W)`` layer input.
        stride: 1 or 2.

    Returns:
        ``x`` itself for stride 1, else the pooled ``(B, C, ceil(H/2), ceil(W/2))`` map.

    Raises:
        ValueError: if ``stride`` is not 1 or 2.
    """
    if stride == 1:
        return x
    if stride == 2:
        return F.avg_pool2d(x, kernel_size=3, stride=2, padding=1, count_include_pad=False)
    raise ValueError(f"stride must be 1 or 2, got {stride}")


def central_rel_rows(table: Tensor, size: int) -> Tensor:
    """Slices the rows of a relative embedding table that a map of ``size`` positions uses.

    A table made for at most ``M`` positions has ``2M - 1`` rows, row ``o + M - 1`` holding
    offset ``o`` in ``[-(M-1), M-1]``. A map of ``size <= M`` positions only sees offsets in
    ``[-(size-1), size-1]``: rows ``M - size .. M - size + 2*size - 2``. Example: ``M = 9``,
    ``size = 5`` keeps rows 4..12 of 17.

    Args:
        table: ``(2M - 1, d)`` embeddings.
        size: actual number of positions along the axis, ``1 <= size <= M``.

    Returns:
        ``(2*size - 1, d)`` view; row ``o + size - 1`` holds offset ``o``.

    Raises:
        ValueError: if the table has an even number of rows or ``size`` is out of range.
    """
    rows = table.shape[0]
    if rows % 2 != 1:
        raise ValueError(f"relative table must have 2*max - 1 (odd) rows, got {rows}")
    max_size = (rows + 1) // 2
    if not 1 <= size <= max_size:
        raise ValueError(f"size {size} is outside 1..{max_size} (table of {rows} rows)")
    start = max_size - size
    return table[start : start + 2 * size - 1]


def rel_embedding_matrix(table: Tensor, size: int) -> Tensor:
    """Expands a relative table to the ``(size, size, d)`` matrix ``E[i, j] = r[j - i]``.

    Replaces the appendix's pad-and-reshape ``rel_to_abs`` trick: the matrix is tiny (it has no
    batch or head dimension) and the relative logits become one batched matmul,
    ``einsum('...id,ijd->...ij', q, E)``.

    Args:
        table: ``(2M - 1, d)`` embeddings with ``M >= size`` (central rows are used).
        size: actual number of positions along the axis.

    Returns:
        ``(size, size, d)`` tensor; differentiable with respect to ``table``.
    """
    rows = central_rel_rows(table, size)  # (2*size - 1, d)
    pos = torch.arange(size, device=table.device)
    index = pos[None, :] - pos[:, None] + (size - 1)  # (size, size): j - i + size - 1
    return rows[index]  # (size, size, d)


def _rel_logits(qt4: Tensor, e_h: Tensor, e_w: Tensor) -> tuple[Tensor, Tensor]:
    """Relative logits ``(BN, h, W, H)`` (height) and ``(BN, h, W, W)`` (width).

    ``qt4`` is ``(BN, dkh, h, W)`` (scaled queries of ``h`` rows, channel-major as the conv
    produced them); ``e_h`` is ``(h, H, dkh)`` (the rows' slice of the height matrix) and
    ``e_w`` is ``(W, W, dkh)``. Entry ``[n, x, y, x']`` of the first is ``q(x, y)·r_H[x' - x]``.
    """
    rel_h = torch.einsum("ndxy,xkd->nxyk", qt4, e_h)  # (BN, h, W, H)
    rel_w = torch.einsum("ndxy,ykd->nxyk", qt4, e_w)  # (BN, h, W, W)
    return rel_h, rel_w


def _simple_attention(
    qt: Tensor, kt: Tensor, vt: Tensor, e_h: Tensor | None, e_w: Tensor | None, h: int, w: int
) -> Tensor:
    """Whole-map attention in plain autograd ops (traceable); returns ``(BN, HW, dvh)``.

    ``qt`` (scaled), ``kt`` and ``vt`` are ``(BN, d, HW)``: channel-major, the layout of the
    conv that made them, so that no permute copies them (the matmuls read transposed views).
    """
    dkh, hw = qt.shape[1], h * w
    logits = torch.matmul(qt.transpose(1, 2), kt)  # (BN, HW, HW)
    if e_h is not None and e_w is not None:
        rel_h, rel_w = _rel_logits(qt.reshape(-1, dkh, h, w), e_h, e_w)
        logits = logits.view(-1, h, w, h, w)  # (BN, H, W, H', W')
        logits = logits + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
        logits = logits.reshape(-1, hw, hw)  # (BN, HW, HW)
    weights = torch.softmax(logits, dim=-1)  # (BN, HW, HW)
    return torch.matmul(weights, vt.transpose(1, 2))  # (BN, HW, dvh)


def _sdpa_attention(
    qt: Tensor,
    kt: Tensor,
    vt: Tensor,
    e_h: Tensor | None,
    e_w: Tensor | None,
    h: int,
    w: int,
    num_heads: int,
) -> Tensor:
    """``F.scaled_dot_product_attention`` with the relative logits as an additive float mask.

    The mask is the full ``(BN, HW, HW)`` bias (it needs a gradient, which PyTorch's fused
    kernels take as a materialised tensor); returns ``(BN, HW, dvh)``.
    """
    dkh, dvh, hw = qt.shape[1], vt.shape[1], h * w
    bias = None
    if e_h is not None and e_w is not None:
        rel_h, rel_w = _rel_logits(qt.reshape(-1, dkh, h, w), e_h, e_w)
        bias = (rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)).reshape(-1, num_heads, hw, hw)
    out = F.scaled_dot_product_attention(
        qt.transpose(1, 2).reshape(-1, num_heads, hw, dkh),  # (B, Nh, HW, dkh)
        kt.transpose(1, 2).reshape(-1, num_heads, hw, dkh),
        vt.transpose(1, 2).reshape(-1, num_heads, hw, dvh),
        attn_mask=bias,
        scale=1.0,  # q is already scaled, before the relative logits as in the appendix
    )  # (B, Nh, HW, dvh)
    return out.reshape(-1, hw, dvh)


@functools.cache
def _compiled_flex_attention() -> Any:
    """``flex_attention`` compiled once (eager flex materialises the scores and is slow)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def _flex_head_dim(d: int) -> int:
    """Head size the Triton flex kernels take: a power of two >= 16 (3 -> 16, 24 -> 32)."""
    return max(16, 1 << (d - 1).bit_length())


def _flex_attention(
    qt: Tensor,
    kt: Tensor,
    vt: Tensor,
    e_h: Tensor | None,
    e_w: Tensor | None,
    h: int,
    w: int,
    num_heads: int,
) -> Tensor:
    """``flex_attention`` (CUDA) with the relative logits as a ``score_mod``; ``(BN, HW, dvh)``.

    The score modification reads the per-query tables ``(B, Nh, HW, H)`` and
    ``(B, Nh, HW, W)`` at the key's row ``kv // W`` and column ``kv % W``: the full
    ``(HW)^2`` bias is never built, and flex's backward scatters the tables' gradients. Head
    sizes are zero-padded to what the kernels take, which changes no dot product.
    """
    dkh, dvh, hw = qt.shape[1], vt.shape[1], h * w
    pad_k, pad_v = _flex_head_dim(dkh) - dkh, _flex_head_dim(dvh) - dvh
    q = F.pad(qt.transpose(1, 2), (0, pad_k)).reshape(-1, num_heads, hw, dkh + pad_k)
    k = F.pad(kt.transpose(1, 2), (0, pad_k)).reshape(-1, num_heads, hw, dkh + pad_k)
    v = F.pad(vt.transpose(1, 2), (0, pad_v)).reshape(-1, num_heads, hw, dvh + pad_v)
    score_mod = None
    if e_h is not None and e_w is not None:
        rel_h, rel_w = _rel_logits(qt.reshape(-1, dkh, h, w), e_h, e_w)
        rel_h = rel_h.reshape(-1, num_heads, hw, h)  # (B, Nh, HW, H)
        rel_w = rel_w.reshape(-1, num_heads, hw, w)  # (B, Nh, HW, W)

        def score_mod(score: Tensor, b: Tensor, n: Tensor, qi: Tensor, kv: Tensor) -> Tensor:
            return score + rel_h[b, n, qi, kv // w] + rel_w[b, n, qi, kv % w]

    out: Tensor = _compiled_flex_attention()(q, k, v, score_mod=score_mod, scale=1.0)
    return out[..., :dvh].reshape(-1, hw, dvh)  # (BN, HW, dvh)


def _rel_rows(q_rows: Tensor, table: Tensor) -> Tensor:
    """``q·r[o]`` for every offset: ``(BN, n, 2L - 1)``, as the appendix's first step."""
    return torch.matmul(q_rows, table.t())  # (BN, n, dkh) @ (dkh, 2L-1)


def _abs_view(rel: Tensor, c: int, w: int, height: bool, r0: int) -> Tensor:
    """The appendix's ``rel_to_abs`` as a strided view of ``(BN, c*W, 2L - 1)`` logits.

    For query ``(x, y)`` of the chunk (global row ``r0 + x``) and key column ``y'`` the width
    logit sits at ``rel[n, x*W + y, y' - y + W - 1]``: flat offset
    ``x*W*(2W-1) + y*(2W-2) + y' + (W-1)``, all strides positive. The height logit for key
    row ``x'`` sits at ``rel[n, x*W + y, x' - (r0 + x) + H - 1]``: offset
    ``x*(W*(2H-1) - 1) + y*(2H-1) + x' + (H-1-r0)``. Both maps are one-to-one (distinct
    ``(x, y, key)`` hit distinct entries), so gradients can be written through the same view.
    Example: W = 3, width: the view's rows for y = 0, 1, 2 start at offsets 2, 6, 10 of
    rows of 5, i.e. columns 2, 1, 0: offsets 0, -1, -2 for key column 0.

    Returns:
        ``(BN, c, W, H)`` (height) or ``(BN, c, W, W)`` (width) view of ``rel``.
    """
    bn, n, m = rel.shape
    size = (m + 1) // 2  # H for the height table, W for the width table
    if height:
        strides = (n * m, w * m - 1, m, 1)
        offset = size - 1 - r0
    else:
        strides = (n * m, w * m, m - 1, 1)
        offset = size - 1
    return rel.as_strided((bn, c, w, size), strides, rel.storage_offset() + offset)


def _chunk_probs(
    qt: Tensor,
    kt: Tensor,
    t_h: Tensor | None,
    t_w: Tensor | None,
    w: int,
    r0: int,
    r1: int,
    buf: Tensor,
) -> Tensor:
    """Softmax weights ``(BN, c*W, HW)`` of query rows ``r0:r1``, written into ``buf``.

    One reused buffer instead of fresh chunk-sized tensors: large CPU allocations are mmapped
    and page-faulted anew on every call, which cost more than the arithmetic here. The bias is
    written first and the content logits accumulated onto it (``baddbmm_``), then the softmax
    runs in place (on CPU, where PyTorch's row-wise kernel allows it).
    """
    bn, _, hw = qt.shape
    h, c = hw // w, r1 - r0
    q_rows = qt[:, :, r0 * w : r1 * w].transpose(1, 2)  # (BN, c*W, dkh) view
    logits = buf[: bn * c * w * hw].view(bn, c * w, hw)  # (BN, c*W, HW)
    if t_h is not None and t_w is not None:
        rel_h = _abs_view(_rel_rows(q_rows, t_h), c, w, True, r0)  # (BN, c, W, H)
        rel_w = _abs_view(_rel_rows(q_rows, t_w), c, w, False, r0)  # (BN, c, W, W)
        torch.add(rel_h.unsqueeze(-1), rel_w.unsqueeze(-2), out=logits.view(bn, c, w, h, w))
        logits.baddbmm_(q_rows, kt)
    else:
        torch.bmm(q_rows, kt, out=logits)
    if logits.is_cuda:
        return torch.softmax(logits, dim=-1)
    return torch.ops.aten._softmax.out(logits, -1, False, out=logits)  # type: ignore[no-any-return]


class _ChunkedRelAttention(torch.autograd.Function):
    """Query-row-chunked relative attention that recomputes each chunk in backward.

    Saves only q, k, v, the output and the two small relative tables; the backward pass
    recomputes one chunk's softmax at a time (the flash-attention recipe,
    ``dS = P * (dP - rowsum(dO * O))``), so peak memory holds one chunk of logits instead of
    the full ``(B, Nh, HW, HW)`` logits, their gradient and the softmax. Every matmul reads
    its operands in the layout BLAS is fast for with these skinny heads (``dkh``, ``dvh`` of
    2-24): measured on CPU, ``P @ v`` with v as a transposed view of ``(dvh, HW)`` ran 6x
    faster than with a contiguous ``(HW, dvh)`` v, and ``dv^T += dO^T @ P`` 4-6x faster than
    ``dv += P^T @ dO``. The relative logits are one dense matmul against the ``2L - 1`` table
    rows plus a strided view (:func:`_abs_view`), not per-row einsums with the ``(L, L, d)``
    matrices, whose small batched matmuls cost a third of the step (torch.profiler).

    Autocast: :func:`relative_attention` runs this in float32 (inputs cast, autocast off), so
    q, k, v and the tables always share one dtype here.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        qt: Tensor,
        kt: Tensor,
        vt: Tensor,
        t_h: Tensor | None,
        t_w: Tensor | None,
        w: int,
        rows: int,
    ) -> Tensor:
        bn, _, hw = qt.shape
        h, dvh = hw // w, vt.shape[1]
        out_t = vt.new_empty(bn, dvh, hw)  # (BN, dvh, HW), the layout the caller returns
        buf = qt.new_empty(bn * min(rows, h) * w * hw)
        v_rows = vt.transpose(1, 2)  # (BN, HW, dvh) view
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            probs = _chunk_probs(qt, kt, t_h, t_w, w, r0, r1, buf)  # (BN, c*W, HW)
            out_t[:, :, r0 * w : r1 * w] = torch.bmm(probs, v_rows).transpose(1, 2)
        rel = () if t_h is None or t_w is None else (t_h, t_w)
        ctx.save_for_backward(qt, kt, vt, out_t, *rel)
        ctx.w, ctx.rows = w, rows  # type: ignore[attr-defined]
        return out_t

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        qt, kt, vt, out_t, *rel = ctx.saved_tensors
        t_h, t_w = rel if rel else (None, None)
        w, rows = ctx.w, ctx.rows
        bn, dkh, hw = qt.shape
        h = hw // w
        g_t = grad_out.contiguous()  # (BN, dvh, HW)
        delta = (g_t * out_t).sum(1)  # (BN, HW): rowsum(dO * O) per query
        grad_qt = torch.empty_like(qt)  # (BN, dkh, HW)
        grad_kt = torch.zeros_like(kt)  # (BN, dkh, HW)
        grad_vt = torch.zeros_like(vt)  # (BN, dvh, HW)
        # Table gradients transposed, (dkh, 2L - 1), summed over the batch at the end.
        grad_th = qt.new_zeros(bn, dkh, 2 * h - 1) if t_h is not None else None
        grad_tw = qt.new_zeros(bn, dkh, 2 * w - 1) if t_w is not None else None
        n_max = min(rows, h) * w
        buf = qt.new_empty(bn * n_max * hw)
        buf_grad = qt.new_empty(bn * n_max * hw)
        k_rows = kt.transpose(1, 2)  # (BN, HW, dkh) view
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            c, sl = r1 - r0, slice(r0 * w, r1 * w)
            probs = _chunk_probs(qt, kt, t_h, t_w, w, r0, r1, buf)  # (BN, c*W, HW)
            g_c = g_t[:, :, sl]  # (BN, dvh, c*W)
            grad_vt.baddbmm_(g_c, probs)  # dv^T += dO^T P
            grad_s = buf_grad[: bn * c * w * hw].view(bn, c * w, hw)  # (BN, c*W, HW)
            # dS = P * (dP - delta), dP = dO v^T: the subtraction rides on the matmul.
            torch.baddbmm(-delta[:, sl].unsqueeze(-1), g_c.transpose(1, 2), vt, out=grad_s)
            grad_s.mul_(probs)
            q_c = qt[:, :, sl]  # (BN, dkh, c*W)
            grad_kt.baddbmm_(q_c, grad_s)  # dk^T += q^T dS
            grad_qc = torch.bmm(grad_s, k_rows)  # (BN, c*W, dkh): dq = dS k
            if t_h is not None and t_w is not None:
                assert grad_th is not None and grad_tw is not None
                grad_s5 = grad_s.view(bn, c, w, h, w)  # (BN, c, W, H', W')
                for table, grad_t, height, dim in (
                    (t_h, grad_th, True, -1),
                    (t_w, grad_tw, False, -2),
                ):
                    grad_rel = grad_s.new_zeros(bn, c * w, table.shape[0])  # (BN, c*W, 2L-1)
                    _abs_view(grad_rel, c, w, height, r0).copy_(grad_s5.sum(dim))
                    grad_qc.add_(torch.matmul(grad_rel, table))  # (BN, c*W, dkh)
                    grad_t.baddbmm_(q_c, grad_rel)  # (BN, dkh, 2L-1)
            grad_qt[:, :, sl] = grad_qc.transpose(1, 2)
        grad_t_h = grad_th.sum(0).t() if grad_th is not None else None  # (2H-1, dkh)
        grad_t_w = grad_tw.sum(0).t() if grad_tw is not None else None  # (2W-1, dkh)
        return grad_qt, grad_kt, grad_vt, grad_t_h, grad_t_w, None, None


def _auto_chunk_rows(batch: int, num_heads: int, height: int, width: int, cuda: bool) -> int:
    """Query rows per chunk so that one chunk holds about the target number of logits."""
    per_row = batch * num_heads * width * height * width
    target = _CHUNK_TARGET_LOGITS_CUDA if cuda else _CHUNK_TARGET_LOGITS
    return max(1, min(height, target // max(1, per_row)))


def _exporting() -> bool:
    """True while tracing, exporting to ONNX or compiling: only the simple path is traceable."""
    return (
        torch.jit.is_tracing()  # type: ignore[attr-defined,no-untyped-call]
        or torch.onnx.is_in_onnx_export()
        or torch.compiler.is_compiling()
    )


def _auto_impl(q: Tensor, logits: int, needs_grad: bool) -> str:
    """The path ``impl="auto"`` takes (see :func:`relative_attention`).

    Without a gradient the simple path serves inference on every device: it is what
    ``aanas.cost.reference_macs`` counts with FlopCounterMode (the chunked path's relative
    logits multiply the whole ``2L - 1`` tables, so its MAC count differs).
    """
    if _exporting() or not needs_grad:
        return "simple"
    if q.is_cuda:
        return "chunked" if logits >= _CHUNK_MIN_LOGITS_CUDA else "simple"
    if q.device.type == "cpu" and q.dtype in _FUSED_DTYPES and logits >= _FUSED_MIN_LOGITS:
        if _fused_cpu.available():
            return "fused"
    return "chunked" if logits >= _CHUNK_MIN_LOGITS else "simple"


def relative_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    key_rel_w: Tensor | None = None,
    key_rel_h: Tensor | None = None,
    *,
    impl: str = "auto",
    chunk_rows: int | None = None,
) -> Tensor:
    """Multi-head 2D self-attention with relative position logits over feature maps.

    For query position ``(x, y)`` (row, column) and key ``(x', y')`` of head ``h``::

        logit = q·k + q·r_W[y' - y] + q·r_H[x' - x],   q scaled by (dk / Nh) ** -0.5

    followed by a softmax over all keys and a weighted sum of values (Bello et al. 2019,
    Sec. 3.1-3.2 and appendix). Channel block ``h*d_h:(h+1)*d_h`` of q/k/v belongs to head
    ``h``, and the output keeps that layout. ``W^O`` (``attn_out``) is not applied here, so that
    a supernet can slice it separately.

    Paths (``impl``), all equal to the formula in forward and backward:

    * ``"simple"``: materialises the ``(B, Nh, HW, HW)`` logits in plain autograd ops;
      traceable, so export always takes it.
    * ``"chunked"``: a custom autograd function over chunks of ``chunk_rows`` query rows that
      recomputes each chunk's softmax in backward; never holds the full logits.
    * ``"sdpa"``: ``F.scaled_dot_product_attention`` with the relative logits as an additive
      float mask (materialised, since it needs a gradient). Never chosen by ``"auto"``: on
      CPU it measured slower than ``"chunked"`` at every size tried (28x28: 571 vs 153 ms).
    * ``"flex"``: CUDA only, ``torch.nn.attention.flex_attention`` (compiled) with the relative
      logits as a score modification reading ``(HW, H)`` and ``(HW, W)`` per-query tables;
      never builds an ``(HW)^2`` tensor. Opt-in: it could not be run where this was written.
    * ``"fused"``: CPU only (float32/float64, or under CPU autocast), the C kernel of
      :mod:`aanas.ops._fused_cpu`: four query rows at a time, softmax, weighted sum and every
      gradient in a few vectorised passes over cached rows; no ``(HW)^2`` tensor. Where the
      kernel cannot be built (no C compiler), it warns once and runs ``"chunked"``.
    * ``"auto"``: ``"simple"`` while tracing/exporting/compiling or when no gradient is
      needed; otherwise, on CPU, ``"fused"`` from ``2**12`` logits (``B * Nh * (HW)^2``)
      where the kernel is available, else ``"chunked"`` from ``2**16``; on CUDA ``"chunked"``
      from ``2**26``; else ``"simple"``.

    Mixed precision: under autocast the attention runs in float32 with autocast off (q, k, v
    and the tables cast up) and the result is cast back to q's dtype, so the summed content +
    relative logits and the softmax never overflow float16 and every path's backward sees
    one dtype. The projections around it (``qkv_conv``, ``attn_out``) stay in low precision.

    Args:
        q: ``(B, dk, H, W)`` queries, **unscaled** (the scale is applied here, so callers with
            sliced weights cannot forget it).
        k: ``(B, dk, H, W)`` keys.
        v: ``(B, dv, H, W)`` values.
        num_heads: ``Nh``; must divide ``dk`` and ``dv``.
        key_rel_w: ``(2*max_W - 1, dk / Nh)`` width embeddings, or None for no position terms.
        key_rel_h: ``(2*max_H - 1, dk / Nh)`` height embeddings; given iff ``key_rel_w`` is.
            Tables made for a larger map are fine: their central rows are used.
        impl: one of ``"auto"``, ``"simple"``, ``"chunked"``, ``"fused"``, ``"sdpa"``,
            ``"flex"``.
        chunk_rows: query rows per chunk for the chunked path; None picks chunks of about
            2**19 logits (2**24 on CUDA).

    Returns:
        ``(B, dv, H, W)`` attention output before ``attn_out``, in q's dtype.

    Raises:
        ValueError: on inconsistent shapes, head counts or ``impl`` (``"flex"`` off CUDA,
            ``"fused"`` off CPU or in a low-precision dtype without autocast).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"impl must be one of {ATTENTION_IMPLS}, got {impl!r}")
    if q.dim() != 4 or q.shape != k.shape:
        raise ValueError(f"q and k must be equal (B, dk, H, W) maps, got {q.shape}, {k.shape}")
    b, dk, h, w = q.shape
    dv = v.shape[1]
    if v.dim() != 4 or v.shape[0] != b or v.shape[2:] != q.shape[2:]:
        raise ValueError(f"v must be (B, dv, H, W) matching q {tuple(q.shape)}, got {v.shape}")
    if num_heads < 1 or dk % num_heads or dv % num_heads:
        raise ValueError(f"num_heads={num_heads} must divide dk={dk} and dv={dv}")
    if (key_rel_w is None) != (key_rel_h is None):
        raise ValueError("key_rel_w and key_rel_h must both be given or both be None")
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if impl == "flex" and not q.is_cuda:
        raise ValueError(f"impl='flex' needs CUDA tensors, got device {q.device}")
    if impl == "fused" and (
        q.device.type != "cpu"
        or (q.dtype not in _FUSED_DTYPES and not torch.is_autocast_enabled("cpu"))
    ):
        raise ValueError(
            f"impl='fused' needs float32/float64 CPU tensors (or CPU autocast), got {q.dtype} "
            f"on {q.device}"
        )
    device_type = q.device.type
    # The meta device (shape-only cost counting) has no autocast, and asking raises.
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(
        device_type
    )
    for name, t in (("k", k), ("v", v), ("key_rel_w", key_rel_w), ("key_rel_h", key_rel_h)):
        if t is not None and t.dtype != q.dtype and not autocast:
            raise ValueError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
    dkh = dk // num_heads
    if key_rel_w is not None and key_rel_h is not None:
        for name, table in (("key_rel_w", key_rel_w), ("key_rel_h", key_rel_h)):
            if table.dim() != 2 or table.shape[1] != dkh:
                raise ValueError(f"{name} must be (2*max - 1, dk/Nh={dkh}), got {table.shape}")

    if autocast:
        # Float32 inside autocast: fp16 logits overflow, and a custom backward must not mix
        # dtypes (the float32 tables against bfloat16 q failed before this).
        with torch.autocast(device_type, enabled=False):
            rel_w = None if key_rel_w is None else key_rel_w.float()
            rel_h = None if key_rel_h is None else key_rel_h.float()
            out = _relative_attention(
                q.float(), k.float(), v.float(), num_heads, rel_w, rel_h, impl, chunk_rows
            )
        return out.to(q.dtype)
    return _relative_attention(q, k, v, num_heads, key_rel_w, key_rel_h, impl, chunk_rows)


def _relative_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    num_heads: int,
    key_rel_w: Tensor | None,
    key_rel_h: Tensor | None,
    impl: str,
    chunk_rows: int | None,
) -> Tensor:
    """:func:`relative_attention` after its checks, in one dtype."""
    b, dk, h, w = q.shape
    dv, hw = v.shape[1], h * w
    dkh, dvh = dk // num_heads, dv // num_heads
    if impl == "auto":
        # Short-circuit order matters: under torch.export the batch is symbolic, so the size
        # is only computed when not exporting.
        exporting = _exporting()
        needs_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (q, k, v, key_rel_w, key_rel_h)
        )
        logits = 0 if exporting else b * num_heads * hw * hw
        impl = "simple" if exporting else _auto_impl(q, logits, needs_grad)

    if impl == "fused" and not _fused_cpu.available():
        impl = "chunked"  # _fused_cpu warned once why
    if impl == "fused" and hw > _fused_cpu.MAX_POSITIONS:
        impl = "chunked"  # 2**28 logits per head and image: the chunked path bounds memory
    t_h = t_w = None  # the central table rows, (2H - 1, dkh) and (2W - 1, dkh)
    if impl in ("fused", "chunked") and key_rel_w is not None and key_rel_h is not None:
        t_h, t_w = central_rel_rows(key_rel_h, h), central_rel_rows(key_rel_w, w)
    if impl == "fused":
        # The kernel reads the heads from q, k, v where they are and scales q itself.
        out_f = _fused_cpu.fused_relative_attention(q, k, v, t_h, t_w, num_heads)
        if out_f is not None:
            return out_f  # (B, dv, H, W)
        impl = "chunked"  # a NaN/inf in the inputs: exact IEEE semantics
    # Channel-major per head, as the conv produced them; scaling before both the content and
    # the relative logits, as in the appendix code.
    qt = q.reshape(-1, dkh, hw) * dkh**-0.5  # (BN, dkh, HW), BN = B * Nh
    kt = k.reshape(-1, dkh, hw)  # (BN, dkh, HW)
    vt = v.reshape(-1, dvh, hw)  # (BN, dvh, HW)
    if impl == "chunked":
        rows = chunk_rows or _auto_chunk_rows(b, num_heads, h, w, q.is_cuda)
        out_t: Tensor = _ChunkedRelAttention.apply(
            qt.contiguous(), kt.contiguous(), vt.contiguous(), t_h, t_w, w, min(rows, h)
        )  # (BN, dvh, HW)
        return out_t.reshape(-1, dv, h, w)  # (B, dv, H, W): a view, heads are channel blocks
    e_h = e_w = None
    if key_rel_w is not None and key_rel_h is not None:
        e_h = rel_embedding_matrix(key_rel_h, h)  # (H, H, dkh)
        e_w = rel_embedding_matrix(key_rel_w, w)  # (W, W, dkh)
    if impl == "simple":
        out = _simple_attention(qt, kt, vt, e_h, e_w, h, w)  # (BN, HW, dvh)
    elif impl == "sdpa":
        out = _sdpa_attention(qt, kt, vt, e_h, e_w, h, w, num_heads)
    else:
        out = _flex_attention(qt, kt, vt, e_h, e_w, h, w, num_heads)
    return out.transpose(1, 2).reshape(-1, dv, h, w)  # (B, dv, H, W)


def _pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """``7 -> (7, 7)``; ``(7, 9) -> (7, 9)``; checks both are positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(p, int) and p >= 1 for p in pair):
        raise ValueError(f"{name} must be a positive int or a pair of them, got {value!r}")
    return pair[0], pair[1]


class AAConv2d(nn.Module):
    """Attention-augmented convolution: ``concat([conv(x), attention(x)], dim=1)``.

    The conv branch produces ``out_channels - dv`` channels (first), the self-attention branch
    ``dv`` channels (last), following the appendix code of Bello et al. 2019: a 1x1 ``qkv_conv``
    to ``[q | k | v]`` (``2*dk + dv`` channels, head ``h`` owning the contiguous block
    ``h*d_h:(h+1)*d_h`` within each), :func:`relative_attention`, then the 1x1 ``attn_out``
    (``W^O``). All three convs have a bias like the TF layers of the appendix; ``bias`` only
    switches the conv branch's bias (backbones put BatchNorm after the layer).

    ``dv == 0`` (then ``dk`` must be 0) makes the layer exactly its conv, which the search uses
    to switch attention off; ``dv == out_channels`` makes it fully attentional (``conv_out`` is
    None).

    ``depthwise=True`` serves MnasNet, where attention augments the depthwise k x k stage of an
    inverted bottleneck: it needs ``in_channels == out_channels = C_exp``; the depthwise conv
    runs on the first ``C_exp - dv`` input channels and produces ``C_exp - dv`` channels, the
    attention branch reads the whole expanded tensor and produces ``dv`` channels, and the two
    are concatenated back to ``C_exp``.

    Stride 2 strides the conv and runs attention on the pooled input (:func:`attention_input`).

    Attributes:
        attention_impl: ``"auto"`` (default) or any path of :func:`relative_attention`; see
            :func:`relative_attention`. A flag rather than a subclass, so export and training
            use one module; "auto" already picks the simple path while tracing/exporting.
        chunk_rows: query rows per chunk for the chunked path (None: automatic).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        dk: int,
        dv: int,
        num_heads: int,
        relative: bool = True,
        max_size: int | Sequence[int] = (32, 32),
        depthwise: bool = False,
        bias: bool = True,
    ) -> None:
        """Builds the layer.

        Args:
            in_channels: input channels.
            out_channels: output channels, ``conv`` + ``dv``.
            kernel_size: odd conv kernel size (``padding = kernel_size // 2`` keeps the size).
            stride: 1 or 2.
            dk: total key (and query) depth, divisible by ``num_heads``.
            dv: total value depth = attention output channels, ``0 <= dv <= out_channels``.
            num_heads: attention heads ``Nh``.
            relative: add 2D relative position logits.
            max_size: largest input ``(H, W)`` (or one int for square) the layer accepts; sizes
                the relative tables to ``2*max - 1`` rows. Smaller inputs, and the halved map
                of a stride-2 layer, use the tables' central rows (:func:`central_rel_rows`).
            depthwise: depthwise conv branch on the first ``out - dv`` channels (see above).
            bias: bias of the conv branch only.

        Raises:
            ValueError: on any invalid value or combination, naming it.
        """
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if kernel_size < 1 or kernel_size % 2 != 1:
            raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size}")
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        if num_heads < 1:
            raise ValueError(f"num_heads must be >= 1, got {num_heads}")
        if dk < 0 or dv < 0:
            raise ValueError(f"dk and dv must be >= 0, got dk={dk}, dv={dv}")
        if dv > out_channels:
            raise ValueError(f"dv={dv} must be <= out_channels={out_channels}")
        if dv == 0 and dk != 0:
            raise ValueError(f"dv=0 (no attention) requires dk=0, got dk={dk}")
        if dv > 0 and dk == 0:
            raise ValueError(f"dk must be >= num_heads when dv > 0, got dk=0 with dv={dv}")
        if dk % num_heads or dv % num_heads:
            raise ValueError(f"dk={dk} and dv={dv} must be divisible by num_heads={num_heads}")
        if depthwise and in_channels != out_channels:
            raise ValueError(
                f"depthwise requires in_channels == out_channels, got {in_channels} != "
                f"{out_channels}"
            )
        max_h, max_w = _pair(max_size, "max_size")

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.dk = dk
        self.dv = dv
        self.num_heads = num_heads
        self.relative = relative
        self.max_size = (max_h, max_w)
        self.depthwise = depthwise
        self.attention_impl = "auto"
        self.chunk_rows: int | None = None

        conv_channels = out_channels - dv
        self.conv_out: nn.Conv2d | None = None
        if conv_channels > 0:
            self.conv_out = nn.Conv2d(
                conv_channels if depthwise else in_channels,
                conv_channels,
                kernel_size,
                stride,
                padding=kernel_size // 2,
                groups=conv_channels if depthwise else 1,
                bias=bias,
            )
        self.qkv_conv: nn.Conv2d | None = None
        self.attn_out: nn.Conv2d | None = None
        self.key_rel_w: nn.Parameter | None = None
        self.key_rel_h: nn.Parameter | None = None
        if dv > 0:
            self.qkv_conv = nn.Conv2d(in_channels, 2 * dk + dv, 1)
            self.attn_out = nn.Conv2d(dv, dv, 1)
            if relative:
                dkh = dk // num_heads
                self.key_rel_w = nn.Parameter(torch.empty(2 * max_w - 1, dkh))
                self.key_rel_h = nn.Parameter(torch.empty(2 * max_h - 1, dkh))
        self.reset_rel_parameters()

    def reset_rel_parameters(self) -> None:
        """Initialises the relative tables from N(0, dkh^-1)."""
        # The appendix passes dkh**-0.5 positionally to tf.random_normal_initializer, whose
        # first argument is the *mean*: almost certainly unintended. We use mean 0 and
        # std dkh**-0.5, the scale the argument was evidently meant to set.
        for table in (self.key_rel_w, self.key_rel_h):
            if table is not None:
                nn.init.normal_(table, mean=0.0, std=(self.dk // self.num_heads) ** -0.5)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, dk={self.dk}, dv={self.dv}, num_heads={self.num_heads}, "
            f"relative={self.relative}, max_size={self.max_size}, depthwise={self.depthwise}"
        )

    def _shares_input(self) -> bool:
        """True where the conv branch is a 1x1, stride-1, dense conv: it then reads exactly
        what the qkv projection reads."""
        return self.kernel_size == 1 and self.stride == 1 and not self.depthwise

    def _fused_pointwise(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The conv branch and the qkv projection as one 1x1 convolution, split after."""
        assert self.conv_out is not None and self.qkv_conv is not None
        conv_channels = self.out_channels - self.dv
        convs = (self.conv_out, self.qkv_conv)
        weight = torch.cat([c.weight for c in convs])
        bias = None
        if any(c.bias is not None for c in convs):
            bias = torch.cat(
                [c.weight.new_zeros(c.out_channels) if c.bias is None else c.bias for c in convs]
            )
        out = F.conv2d(x, weight, bias)
        conv, qkv = torch.split(out, [conv_channels, out.shape[1] - conv_channels], dim=1)
        return conv, qkv

    def forward(self, x: Tensor) -> Tensor:
        """Applies the layer.

        Args:
            x: ``(B, in_channels, H, W)`` with ``H, W`` at most ``max_size``.

        Returns:
            ``(B, out_channels, H', W')``, ``H' = ceil(H / stride)``; conv channels first.

        Raises:
            ValueError: on a wrong channel count or an input larger than ``max_size``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        h, w = int(x.shape[2]), int(x.shape[3])
        if h > self.max_size[0] or w > self.max_size[1]:
            raise ValueError(
                f"input size {(h, w)} exceeds max_size={self.max_size}; build the layer with "
                "a larger max_size"
            )
        outs: list[Tensor] = []
        qkv: Tensor | None = None
        if self.conv_out is not None and self.qkv_conv is not None and self._shares_input():
            # One convolution for both branches (same input, both 1x1): a second small conv
            # and the sum of the two input gradients cost more than the copy of the weights.
            conv, qkv = self._fused_pointwise(x)
            outs.append(conv)
        elif self.conv_out is not None:
            conv_in = x[:, : self.out_channels - self.dv] if self.depthwise else x
            outs.append(self.conv_out(conv_in))  # (B, out - dv, H', W')
        if self.qkv_conv is not None and self.attn_out is not None:
            if qkv is None:
                qkv = self.qkv_conv(attention_input(x, self.stride))  # (B, 2dk + dv, H', W')
            q, k, v = torch.split(qkv, [self.dk, self.dk, self.dv], dim=1)
            attn = relative_attention(
                q,
                k,
                v,
                self.num_heads,
                self.key_rel_w,
                self.key_rel_h,
                impl=self.attention_impl,
                chunk_rows=self.chunk_rows,
            )  # (B, dv, H', W')
            outs.append(self.attn_out(attn))
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)
