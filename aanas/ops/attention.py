"""Attention-augmented convolution (Bello et al., ICCV 2019, arXiv:1904.09925).

An :class:`AAConv2d` concatenates a convolution producing ``out_channels - dv`` maps with a
multi-head self-attention branch producing ``dv`` maps, where every query attends to every
position of the feature map with 2D relative position logits (separate width and height
embeddings, shared by all heads of one layer).

The attention itself lives in one functional core, :func:`relative_attention`, which takes
q/k/v as feature maps. The static layer and the weight-sharing supernet (which calls it with
sliced weights) therefore run one implementation. It has two interchangeable paths:

* ``"simple"``: materialises the ``(B, Nh, HW, HW)`` logits, as the paper's appendix does, but
  adds the relative terms by broadcasting ``(B, Nh, H, W, H)`` and ``(B, Nh, H, W, W)`` tensors
  instead of tiling them to ``(HW, HW)``. Trace-friendly (no data-dependent Python loops); used
  for ONNX export, inference and tiny problems.
* ``"chunked"``: a custom autograd function that processes a few query rows at a time and
  recomputes each chunk's logits and softmax in backward (flash-attention style), so neither the
  logits, their gradient nor the softmax output is ever stored whole. Used when gradients are
  needed and the problem is large (see :func:`relative_attention` for the rule).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import FunctionCtx, once_differentiable

# The kappa/upsilon -> (dk, dv) rule is spec arithmetic (no torch), owned by aanas.spec so that
# specs validate without building a layer; re-exported here as part of the layer's API.
from aanas.spec import aa_channels

__all__ = [
    "AAConv2d",
    "aa_channels",
    "attention_input",
    "central_rel_rows",
    "rel_embedding_matrix",
    "relative_attention",
]

ATTENTION_IMPLS = ("auto", "simple", "chunked")

# "auto" switches to the chunked path from this many logits elements, B * Nh * (HW)^2 (8 MiB in
# float32). Measured with benchmarks/aa_layer.py on one CPU thread (Xeon, torch 2.11): at 2**24.2
# (28x28, B=4, Nh=8) chunked ran 1.7x faster than simple; at 2**19.2 (14x14, B=4, Nh=4) the
# simple path was 1.25x faster (per-chunk overhead), so the switch sits between the two.
_CHUNK_MIN_LOGITS = 1 << 21
# Target number of logits elements per chunk (B * Nh * rows * W * HW): 128 Ki floats = 512 KiB,
# about an L2 cache; measured with `benchmarks/aa_layer.py --sweep` (larger chunks were slower).
_CHUNK_TARGET_LOGITS = 1 << 17
# On CUDA the chunked path is launch-bound at these sizes (H100, 28x28, B=4, `--sweep`: simple
# 4.0 ms, chunked 6.0 ms with 2 chunks and 42.8 ms with 28), so it is used only once the logits
# would take 256 MiB, where memory rather than speed limits the batch size, with 64 MiB chunks.
_CHUNK_MIN_LOGITS_CUDA = 1 << 26
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


def _rel_logits(q5: Tensor, e_h: Tensor | None, e_w: Tensor | None) -> tuple[Tensor, Tensor]:
    """Relative logits ``(B, Nh, h, W, H)`` (height) and ``(B, Nh, h, W, W)`` (width)."""
    # q5: (B, Nh, h, W, dkh) for h query rows; e_h: (h, H, dkh); e_w: (W, W, dkh).
    assert e_h is not None and e_w is not None
    rel_h = torch.einsum("bnxyd,xkd->bnxyk", q5, e_h)  # (B, Nh, h, W, H)
    rel_w = torch.einsum("bnxyd,ykd->bnxyk", q5, e_w)  # (B, Nh, h, W, W)
    return rel_h, rel_w


def _simple_attention(
    q5: Tensor, k: Tensor, v: Tensor, e_h: Tensor | None, e_w: Tensor | None
) -> Tensor:
    """Whole-map attention; q5 ``(B, Nh, H, W, dkh)`` scaled, k/v ``(B, Nh, HW, d)``."""
    _, nh, h, w, dkh = q5.shape
    hw = h * w
    logits = torch.matmul(q5.reshape(-1, nh, hw, dkh), k.transpose(-1, -2))  # (B, Nh, HW, HW)
    if e_h is not None:
        rel_h, rel_w = _rel_logits(q5, e_h, e_w)
        logits = logits.view(-1, nh, h, w, h, w)  # (B, Nh, H, W, H', W')
        logits = logits + rel_h.unsqueeze(-1) + rel_w.unsqueeze(-2)
        logits = logits.reshape(-1, nh, hw, hw)  # (B, Nh, HW, HW)
    weights = torch.softmax(logits, dim=-1)  # (B, Nh, HW, HW)
    return torch.matmul(weights, v)  # (B, Nh, HW, dvh)


def _chunk_probs(
    q5: Tensor,
    k: Tensor,
    e_h: Tensor | None,
    e_w: Tensor | None,
    r0: int,
    r1: int,
) -> tuple[Tensor, Tensor]:
    """Softmax weights of query rows ``r0:r1``: ``(B, Nh, c*W, HW)``, plus the chunk's q."""
    _, nh, h, w, dkh = q5.shape
    qc5 = q5[:, :, r0:r1]  # (B, Nh, c, W, dkh), contiguous per (b, n)
    logits = torch.matmul(qc5.reshape(-1, nh, (r1 - r0) * w, dkh), k.transpose(-1, -2))
    if e_h is not None:
        rel_h, rel_w = _rel_logits(qc5, e_h[r0:r1], e_w)
        logits6 = logits.view(-1, nh, r1 - r0, w, h, w)  # (B, Nh, c, W, H', W')
        logits6.add_(rel_h.unsqueeze(-1)).add_(rel_w.unsqueeze(-2))
    return torch.softmax(logits, dim=-1), qc5  # (B, Nh, c*W, HW)


class _ChunkedRelAttention(torch.autograd.Function):
    """Query-row-chunked relative attention that recomputes each chunk in backward.

    Saves only q, k, v, the output and the two small embedding matrices; the backward pass
    recomputes one chunk's softmax at a time (the flash-attention recipe,
    ``dS = P * (dP - rowsum(dO * O))``), so peak memory holds one chunk of logits instead of
    the full ``(B, Nh, HW, HW)`` logits, their gradient and the softmax.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q5: Tensor,
        k: Tensor,
        v: Tensor,
        e_h: Tensor | None,
        e_w: Tensor | None,
        rows: int,
    ) -> Tensor:
        b, nh, h, w, _ = q5.shape
        out = v.new_empty(b, nh, h * w, v.shape[-1])  # (B, Nh, HW, dvh)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            probs, _ = _chunk_probs(q5, k, e_h, e_w, r0, r1)  # (B, Nh, c*W, HW)
            out[:, :, r0 * w : r1 * w] = torch.matmul(probs, v)  # (B, Nh, c*W, dvh)
        rel = () if e_h is None or e_w is None else (e_h, e_w)
        ctx.save_for_backward(q5, k, v, out, *rel)
        ctx.rows = rows  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        q5, k, v, out, *rel = ctx.saved_tensors
        e_h, e_w = rel if rel else (None, None)
        rows: int = ctx.rows
        _, nh, h, w, dkh = q5.shape
        grad_out = grad_out.contiguous()
        delta = (grad_out * out).sum(-1, keepdim=True)  # (B, Nh, HW, 1)
        grad_q = torch.empty_like(q5)  # (B, Nh, H, W, dkh)
        grad_k = torch.zeros_like(k)  # (B, Nh, HW, dkh)
        grad_v = torch.zeros_like(v)  # (B, Nh, HW, dvh)
        relative = bool(rel)
        grad_e_h = torch.zeros_like(rel[0]) if relative else None  # (H, H, dkh)
        grad_e_w = torch.zeros_like(rel[1]) if relative else None  # (W, W, dkh)
        for r0 in range(0, h, rows):
            r1 = min(h, r0 + rows)
            c, sl = r1 - r0, slice(r0 * w, r1 * w)
            probs, qc5 = _chunk_probs(q5, k, e_h, e_w, r0, r1)  # (B, Nh, c*W, HW)
            grad_oc = grad_out[:, :, sl]  # (B, Nh, c*W, dvh)
            grad_v.add_(torch.matmul(probs.transpose(-1, -2), grad_oc))
            grad_s = torch.matmul(grad_oc, v.transpose(-1, -2))  # (B, Nh, c*W, HW)
            grad_s.sub_(delta[:, :, sl]).mul_(probs)  # softmax backward, in place
            del probs
            qc = qc5.reshape(-1, nh, c * w, dkh)  # (B, Nh, c*W, dkh)
            grad_qc = torch.matmul(grad_s, k)  # (B, Nh, c*W, dkh)
            grad_k.add_(torch.matmul(grad_s.transpose(-1, -2), qc))
            if relative:
                assert e_h is not None and e_w is not None
                assert grad_e_h is not None and grad_e_w is not None
                grad_s6 = grad_s.view(-1, nh, c, w, h, w)  # (B, Nh, c, W, H', W')
                grad_rel_h = grad_s6.sum(-1)  # (B, Nh, c, W, H)
                grad_rel_w = grad_s6.sum(-2)  # (B, Nh, c, W, W)
                grad_qc5 = grad_qc.view(-1, nh, c, w, dkh)  # (B, Nh, c, W, dkh)
                grad_qc5.add_(torch.einsum("bnxyk,xkd->bnxyd", grad_rel_h, e_h[r0:r1]))
                grad_qc5.add_(torch.einsum("bnxyk,ykd->bnxyd", grad_rel_w, e_w))
                grad_e_h[r0:r1] = torch.einsum("bnxyk,bnxyd->xkd", grad_rel_h, qc5)
                grad_e_w.add_(torch.einsum("bnxyk,bnxyd->ykd", grad_rel_w, qc5))
            grad_q[:, :, r0:r1] = grad_qc.view(-1, nh, c, w, dkh)
        return grad_q, grad_k, grad_v, grad_e_h, grad_e_w, None


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

    Path selection (``impl``): ``"simple"`` materialises the full logits; ``"chunked"`` runs
    the recompute-in-backward autograd function over chunks of ``chunk_rows`` query rows;
    ``"auto"`` takes ``"chunked"`` when grad is enabled, some input requires grad, the logits
    would hold at least 2**21 elements (``B * Nh * (HW)^2``; 2**26 on CUDA), and no
    tracing/ONNX export/compilation is running; otherwise ``"simple"``.

    Args:
        q: ``(B, dk, H, W)`` queries, **unscaled** (the scale is applied here, so callers with
            sliced weights cannot forget it).
        k: ``(B, dk, H, W)`` keys.
        v: ``(B, dv, H, W)`` values.
        num_heads: ``Nh``; must divide ``dk`` and ``dv``.
        key_rel_w: ``(2*max_W - 1, dk / Nh)`` width embeddings, or None for no position terms.
        key_rel_h: ``(2*max_H - 1, dk / Nh)`` height embeddings; given iff ``key_rel_w`` is.
            Tables made for a larger map are fine: their central rows are used.
        impl: ``"auto"``, ``"simple"`` or ``"chunked"``.
        chunk_rows: query rows per chunk for the chunked path; None picks chunks of about
            2**17 logits (2**24 on CUDA).

    Returns:
        ``(B, dv, H, W)`` attention output before ``attn_out``.

    Raises:
        ValueError: on inconsistent shapes, head counts or ``impl``.
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
    dkh, dvh, hw = dk // num_heads, dv // num_heads, h * w

    # Scaling before both the content and the relative logits, as in the appendix code.
    q5 = q.reshape(-1, num_heads, dkh, h, w).permute(0, 1, 3, 4, 2)  # (B, Nh, H, W, dkh)
    q5 = q5 * dkh**-0.5
    k_ = k.reshape(-1, num_heads, dkh, hw).transpose(-1, -2)  # (B, Nh, HW, dkh)
    v_ = v.reshape(-1, num_heads, dvh, hw).transpose(-1, -2)  # (B, Nh, HW, dvh)
    e_h = e_w = None
    if key_rel_w is not None and key_rel_h is not None:
        for name, table in (("key_rel_w", key_rel_w), ("key_rel_h", key_rel_h)):
            if table.dim() != 2 or table.shape[1] != dkh:
                raise ValueError(f"{name} must be (2*max - 1, dk/Nh={dkh}), got {table.shape}")
        e_h = rel_embedding_matrix(key_rel_h, h)  # (H, H, dkh)
        e_w = rel_embedding_matrix(key_rel_w, w)  # (W, W, dkh)

    if impl == "auto":
        # Short-circuit order matters: under torch.export the batch is symbolic, so the size
        # test must not run while exporting.
        use_chunked = (
            not _exporting()
            and torch.is_grad_enabled()
            and any(t is not None and t.requires_grad for t in (q, k, v, key_rel_w, key_rel_h))
            and b * num_heads * hw * hw
            >= (_CHUNK_MIN_LOGITS_CUDA if q.is_cuda else _CHUNK_MIN_LOGITS)
        )
        impl = "chunked" if use_chunked else "simple"

    if impl == "simple":
        out = _simple_attention(q5, k_, v_, e_h, e_w)  # (B, Nh, HW, dvh)
    else:
        rows = (
            chunk_rows
            if chunk_rows is not None
            else _auto_chunk_rows(b, num_heads, h, w, q.is_cuda)
        )
        out = _ChunkedRelAttention.apply(
            q5.contiguous(), k_.contiguous(), v_.contiguous(), e_h, e_w, min(rows, h)
        )  # (B, Nh, HW, dvh)
    return out.transpose(-1, -2).reshape(-1, dv, h, w)  # (B, dv, H, W)


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
        attention_impl: ``"auto"`` (default), ``"simple"`` or ``"chunked"``; see
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
        if self.conv_out is not None:
            conv_in = x[:, : self.out_channels - self.dv] if self.depthwise else x
            outs.append(self.conv_out(conv_in))  # (B, out - dv, H', W')
        if self.qkv_conv is not None and self.attn_out is not None:
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
