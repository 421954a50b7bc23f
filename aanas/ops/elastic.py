"""Weight-slicing ("elastic") layers for the weight-sharing supernet (once-for-all style).

Each layer holds the largest weight any architecture of a search space needs and, given plain
integers, returns or applies the slice one architecture uses (Cai et al., *Once-for-All*,
arXiv:1908.09791; attention from Bello et al., arXiv:1904.09925):

- channels: the first ``n`` output / input channels, or an explicit index (see
  :func:`split_index`: a conv part followed by an attention part kept in separate banks);
- kernels: the centre ``k x k`` of the largest kernel (no OFA kernel-transform matrices);
- BatchNorm: the same channels of the affine parameters and running statistics; in training
  the running statistics of exactly those channels are updated;
- attention: :class:`ElasticAttention` stores q/k/v per head, ``(heads, dims per head, in)``,
  and takes the first ``Nh`` heads and the first ``dk/Nh`` (``dv/Nh``) dims of each, so that
  head ``h`` of a small architecture is always a sub-head of head ``h`` of the largest one.

No layer keeps an "active" setting: every call gets its integers explicitly, and the
``*_weight`` methods return exactly the tensors a static layer of that size is loaded with.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aanas.ops.attention import attention_input, central_rel_rows, relative_attention

__all__ = [
    "ChannelIndex",
    "ElasticAttention",
    "ElasticBatchNorm2d",
    "ElasticConv2d",
    "ElasticLinear",
    "split_index",
]

# Which channels of a bank a layer uses: the first n (a slice, so views and in-place
# running-stat updates work) or an explicit index tensor.
ChannelIndex = slice | Tensor


def split_index(n_conv: int, n_attn: int, conv_bank: int, device: torch.device) -> ChannelIndex:
    """Channels of an attention-augmented tensor in a bank of ``conv_bank + attn_bank`` rows.

    An AAConv2d output is ``[conv (n_conv) | attention (n_attn)]``. Layers that read it keep
    the conv channels in rows ``0 .. conv_bank-1`` and the attention channels from row
    ``conv_bank`` on, so conv channel ``c`` always uses row ``c`` and attention channel ``t``
    row ``conv_bank + t``, whatever the split. Example: ``(5, 2, 8)`` -> rows
    ``[0, 1, 2, 3, 4, 8, 9]``; ``(5, 0, 8)`` -> ``slice(0, 5)``.
    """
    if n_attn == 0:
        return slice(0, n_conv)
    return torch.cat(
        [
            torch.arange(n_conv, device=device),
            torch.arange(conv_bank, conv_bank + n_attn, device=device),
        ]
    )


def _take(t: Tensor, dim: int, index: ChannelIndex) -> Tensor:
    if isinstance(index, slice):
        return t.narrow(dim, index.start or 0, index.stop - (index.start or 0))
    return t.index_select(dim, index)


def _centre(weight: Tensor, kernel: int) -> Tensor:
    """Centre ``k x k`` of a ``(..., K, K)`` kernel: K = 7, k = 3 keeps rows/cols 2..4."""
    big = weight.shape[-1]
    start = (big - kernel) // 2
    return weight[..., start : start + kernel, start : start + kernel]


class ElasticConv2d(nn.Module):
    """A conv holding ``(out_max, in_max, K, K)`` (depthwise: ``(out_max, 1, K, K)``)."""

    def __init__(
        self,
        in_max: int,
        out_max: int,
        kernel_max: int,
        *,
        depthwise: bool = False,
        bias: bool = False,
    ) -> None:
        """Allocates the largest weight (Kaiming-normal, fan_out, as the static models)."""
        super().__init__()
        self.depthwise = depthwise
        shape = (out_max, 1 if depthwise else in_max, kernel_max, kernel_max)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.zeros(out_max)) if bias else None
        nn.init.kaiming_normal_(self.weight, mode="fan_out", nonlinearity="relu")

    def sliced_weight(self, out: ChannelIndex, inp: ChannelIndex, kernel: int) -> Tensor:
        """The static conv's weight: ``out`` rows, ``inp`` columns, centre ``kernel``."""
        w = _take(self.weight, 0, out)
        if not self.depthwise:
            w = _take(w, 1, inp)
        return _centre(w, kernel)

    def sliced_bias(self, out: ChannelIndex) -> Tensor | None:
        """The static conv's bias (None without one)."""
        return None if self.bias is None else _take(self.bias, 0, out)

    def forward(
        self, x: Tensor, out: ChannelIndex, inp: ChannelIndex, kernel: int, stride: int = 1
    ) -> Tensor:
        """``conv(x)`` with the slice; ``x`` has exactly the ``inp`` channels."""
        w = self.sliced_weight(out, inp, kernel)
        groups = w.shape[0] if self.depthwise else 1
        return F.conv2d(x, w, self.sliced_bias(out), stride, kernel // 2, 1, groups)


class ElasticBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over a bank of channels; a call normalises (and updates) only its slice."""

    def sliced_state(self, index: ChannelIndex) -> dict[str, Tensor]:
        """The static BN's state_dict entries for ``index``."""
        assert self.running_mean is not None and self.running_var is not None
        assert self.num_batches_tracked is not None
        return {
            "weight": _take(self.weight, 0, index),
            "bias": _take(self.bias, 0, index),
            "running_mean": _take(self.running_mean, 0, index),
            "running_var": _take(self.running_var, 0, index),
            "num_batches_tracked": self.num_batches_tracked,
        }

    def forward(self, x: Tensor, index: ChannelIndex | None = None) -> Tensor:
        """Normalises ``x`` (its channels are ``index``, default the first ``C``)."""
        if index is None:
            index = slice(0, x.shape[1])
        assert self.running_mean is not None and self.running_var is not None
        training = self.training or not self.track_running_stats
        momentum = self.momentum
        if self.training and self.track_running_stats:
            assert self.num_batches_tracked is not None
            self.num_batches_tracked.add_(1)
            if momentum is None:  # cumulative moving average (used by BN recalibration)
                momentum = 1.0 / float(self.num_batches_tracked)
        mean = _take(self.running_mean, 0, index)
        var = _take(self.running_var, 0, index)
        if isinstance(index, Tensor):  # copies: update them and write them back
            mean, var = mean.clone(), var.clone()
        out = F.batch_norm(
            x,
            mean,
            var,
            _take(self.weight, 0, index),
            _take(self.bias, 0, index),
            training,
            momentum or 0.0,
            self.eps,
        )
        if isinstance(index, Tensor) and self.training:
            with torch.no_grad():
                self.running_mean[index] = mean
                self.running_var[index] = var
        return out


class ElasticLinear(nn.Module):
    """A linear layer holding ``(out, in_max)``; a call uses the first ``in`` features."""

    def __init__(self, in_max: int, out_features: int) -> None:
        """Allocates the weight (N(0, 0.01) and zero bias, as the static classifiers)."""
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_max).normal_(0.0, 0.01))
        self.bias = nn.Parameter(torch.zeros(out_features))

    def forward(self, x: Tensor) -> Tensor:
        """``x @ W[:, :in].T + b`` for ``x`` of ``in`` features."""
        return F.linear(x, self.weight[:, : x.shape[1]], self.bias)


class ElasticAttention(nn.Module):
    """The attention branch of an AAConv2d at its largest: per-head q/k/v, W^O, rel tables.

    Layout of the static ``qkv_conv`` (``[q | k | v]``, head ``h`` owning the contiguous block
    ``h*d:(h+1)*d`` of each): row ``h*dkh + i`` of q is ``q_weight[h, i]`` here, for the first
    ``heads`` heads and the first ``dkh = dk / heads`` dims per head (likewise k, and v with
    ``dvh``). ``attn_out`` (dv -> dv) takes output channels ``0..dv-1`` and, on the input side,
    the same per-head layout. The relative tables are shared by all heads (as in the paper):
    their central ``2*size - 1`` rows and first ``dkh`` columns.
    """

    def __init__(
        self, in_max: int, heads_max: int, dkh_max: int, dvh_max: int, dv_max: int, size_max: int
    ) -> None:
        """Allocates the largest tensors; initialised like ``nn.Conv2d`` / AAConv2d."""
        super().__init__()
        self.in_max = in_max
        self.q_weight = nn.Parameter(torch.empty(heads_max, dkh_max, in_max))
        self.k_weight = nn.Parameter(torch.empty(heads_max, dkh_max, in_max))
        self.v_weight = nn.Parameter(torch.empty(heads_max, dvh_max, in_max))
        self.q_bias = nn.Parameter(torch.zeros(heads_max, dkh_max))
        self.k_bias = nn.Parameter(torch.zeros(heads_max, dkh_max))
        self.v_bias = nn.Parameter(torch.zeros(heads_max, dvh_max))
        self.out_weight = nn.Parameter(torch.empty(dv_max, heads_max, dvh_max))
        self.out_bias = nn.Parameter(torch.zeros(dv_max))
        self.key_rel_w = nn.Parameter(torch.empty(2 * size_max - 1, dkh_max))
        self.key_rel_h = nn.Parameter(torch.empty(2 * size_max - 1, dkh_max))
        for w in (self.q_weight, self.k_weight, self.v_weight):
            nn.init.kaiming_normal_(w.view(-1, in_max), mode="fan_out", nonlinearity="relu")
        nn.init.kaiming_normal_(self.out_weight.view(dv_max, -1), mode="fan_out")
        for t in (self.key_rel_w, self.key_rel_h):
            nn.init.normal_(t, 0.0, dkh_max**-0.5)

    def static_state(
        self, inp: ChannelIndex, dk: int, dv: int, heads: int, relative: bool, size: int
    ) -> dict[str, Tensor]:
        """AAConv2d state entries (``qkv_conv.*``, ``attn_out.*``, ``key_rel_*``).

        Args:
            inp: input channels of the layer (columns of q/k/v).
            dk: total key depth; dv: total value depth; heads: Nh.
            relative: include the relative tables.
            size: the static layer's ``max_size`` side (its tables have ``2*size - 1`` rows).
        """
        dkh, dvh = dk // heads, dv // heads
        q = _take(self.q_weight[:heads, :dkh], 2, inp).reshape(dk, -1)
        k = _take(self.k_weight[:heads, :dkh], 2, inp).reshape(dk, -1)
        v = _take(self.v_weight[:heads, :dvh], 2, inp).reshape(dv, -1)
        bias = torch.cat(
            [
                self.q_bias[:heads, :dkh].reshape(-1),
                self.k_bias[:heads, :dkh].reshape(-1),
                self.v_bias[:heads, :dvh].reshape(-1),
            ]
        )
        state = {
            "qkv_conv.weight": torch.cat([q, k, v])[:, :, None, None],
            "qkv_conv.bias": bias,
            "attn_out.weight": self.out_weight[:dv, :heads, :dvh].reshape(dv, dv)[:, :, None, None],
            "attn_out.bias": self.out_bias[:dv],
        }
        if relative:
            state["key_rel_w"] = central_rel_rows(self.key_rel_w, size)[:, :dkh]
            state["key_rel_h"] = central_rel_rows(self.key_rel_h, size)[:, :dkh]
        return state

    def forward(
        self,
        x: Tensor,
        inp: ChannelIndex,
        dk: int,
        dv: int,
        heads: int,
        relative: bool,
        stride: int,
    ) -> Tensor:
        """Attention output ``(B, dv, H', W')`` after ``attn_out``, as ``AAConv2d`` computes it."""
        # The whole tables: relative_attention reads their central rows, as the static layer's
        # (smaller) tables, which are the central rows of these.
        s = self.static_state(inp, dk, dv, heads, relative, (self.key_rel_w.shape[0] + 1) // 2)
        qkv = F.conv2d(attention_input(x, stride), s["qkv_conv.weight"], s["qkv_conv.bias"])
        q, k, v = torch.split(qkv, [dk, dk, dv], dim=1)  # (B, dk|dk|dv, H', W')
        attn = relative_attention(
            q, k, v, heads, s.get("key_rel_w"), s.get("key_rel_h")
        )  # (B, dv, H', W')
        return F.conv2d(attn, s["attn_out.weight"], s["attn_out.bias"])
