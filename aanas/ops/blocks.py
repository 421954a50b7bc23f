"""Convolutional building blocks of the MnasNet, ResNet and Wide-ResNet families.

Every block takes plain integers and layer types (``norm_layer``, ``act_layer``), never a spec:
``aanas.models._builder`` is the one place that turns an ``ArchSpec`` into these modules. One
convolution of a block can be attention-augmented (Bello et al., *Attention Augmented
Convolutional Networks*, ICCV 2019, arXiv:1904.09925) by passing ``dv > 0``; it then becomes an
:class:`~aanas.ops.attention.AAConv2d`. ``attention_at`` picks which (the modes of
``aanas.block_types``, where each is documented):

- :class:`InvertedResidual` (MnasNet, arXiv:1807.11626): ``"spatial"`` the depthwise k x k
  stage (``AAConv2d(depthwise=True)``), ``"expansion"`` ``conv_pw``, ``"projection"``
  ``conv_pwl``. :class:`DepthwiseSeparable`: ``"spatial"`` or ``"projection"`` (``conv_pw``).
- :class:`Bottleneck` (ResNet v1.5, torchvision layout): ``"spatial"`` the 3x3 convolution,
  ``"expansion"`` ``conv1``, ``"projection"`` ``conv3``.
- :class:`BasicBlock` and :class:`PreActBasicBlock` (Wide-ResNet, arXiv:1605.07146): the first
  3x3 convolution.

Submodule names follow torchvision for ResNet blocks (``conv1``, ``bn1``, ``downsample.0``) and
timm for MnasNet blocks (``conv_pw``, ``conv_dw``, ``conv_pwl``), so that checkpoint key mapping
stays a short rename table (see ``aanas.models.torchvision_key``).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from aanas.ops.attention import AAConv2d

__all__ = [
    "ACTIVATION_LAYERS",
    "BasicBlock",
    "Bottleneck",
    "ConvBnAct",
    "DepthwiseSeparable",
    "InvertedResidual",
    "PreActBasicBlock",
    "SqueezeExcite",
    "act_fn",
    "spatial_conv",
]

LayerFn = Callable[[int], nn.Module]  # norm layer: channels -> module
ActFn = Callable[[], nn.Module]  # activation: () -> module

# The one activation table: spec name -> (module class, the same function). Static blocks use the
# modules (inplace where a BN output is overwritten), the supernet the functions.
ACTIVATION_LAYERS: dict[str, tuple[type[nn.Module], Callable[[Tensor], Tensor]]] = {
    "relu": (nn.ReLU, F.relu),
    "relu6": (nn.ReLU6, F.relu6),
    "swish": (nn.SiLU, F.silu),  # swish(x) = x * sigmoid(x) = SiLU
    "hswish": (nn.Hardswish, F.hardswish),
}
_ATTENTION_SITES = ("spatial", "expansion", "projection")


def act_fn(name: str) -> Callable[[Tensor], Tensor]:
    """The functional form of activation ``name`` (``"swish"`` -> ``F.silu``).

    Raises:
        ValueError: for an unknown name.
    """
    if name not in ACTIVATION_LAYERS:
        raise ValueError(f"unknown activation {name!r}; expected one of {tuple(ACTIVATION_LAYERS)}")
    return ACTIVATION_LAYERS[name][1]


def _check_site(attention_at: str, allowed: tuple[str, ...]) -> None:
    """``attention_at`` must name one of the block's convolutions."""
    if attention_at not in allowed:
        raise ValueError(f"attention_at must be one of {allowed}, got {attention_at!r}")


def spatial_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    *,
    depthwise: bool = False,
    dk: int = 0,
    dv: int = 0,
    num_heads: int = 1,
    relative: bool = True,
    max_size: int | Sequence[int] = (32, 32),
) -> nn.Module:
    """One convolution of a block: a plain ``nn.Conv2d`` or, with ``dv > 0``, an AAConv2d.

    Without attention a plain conv is built (not ``AAConv2d(dv=0)``), so the state_dict of an
    un-augmented block has torchvision's flat keys (``conv_dw.weight``, not
    ``conv_dw.conv_out.weight``). Both have no bias: a BatchNorm always follows.

    Args:
        in_channels: input channels.
        out_channels: output channels (``== in_channels`` when ``depthwise``).
        kernel_size: odd kernel size; padding ``kernel_size // 2`` keeps ``ceil(H / stride)``.
        stride: 1 or 2.
        depthwise: one group per channel (MnasNet's depthwise stage).
        dk: total key depth of the attention branch; 0 without attention.
        dv: attention output channels; 0 means a plain convolution.
        num_heads: attention heads.
        relative: 2-D relative position logits.
        max_size: largest input ``(H, W)`` the attention layer accepts.

    Returns:
        The convolution module.
    """
    if dv == 0:
        return nn.Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding=kernel_size // 2,
            groups=in_channels if depthwise else 1,
            bias=False,
        )
    return AAConv2d(
        in_channels,
        out_channels,
        kernel_size,
        stride,
        dk=dk,
        dv=dv,
        num_heads=num_heads,
        relative=relative,
        max_size=max_size,
        depthwise=depthwise,
        bias=False,
    )


class ConvBnAct(nn.Sequential):
    """``conv -> [norm] -> [act]`` with children named ``conv``, ``bn``, ``act``.

    A ``Sequential`` so a stem can append a pooling layer (ResNet's 3x3/2 max-pool) while its
    checkpoint keys stay ``stem.conv.weight``, ``stem.bn.running_mean``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        *,
        norm_layer: LayerFn | None = nn.BatchNorm2d,
        act_layer: ActFn | None = nn.ReLU,
    ) -> None:
        """Builds the layers; ``norm_layer=None`` / ``act_layer=None`` leave them out.

        Args:
            in_channels: input channels.
            out_channels: output channels.
            kernel_size: odd kernel size (same padding).
            stride: conv stride.
            groups: conv groups.
            norm_layer: normalisation factory; the conv has a bias only without one.
            act_layer: activation factory.
        """
        layers: list[tuple[str, nn.Module]] = [
            (
                "conv",
                nn.Conv2d(
                    in_channels,
                    out_channels,
                    kernel_size,
                    stride,
                    padding=kernel_size // 2,
                    groups=groups,
                    bias=False,
                ),
            )
        ]
        if norm_layer is not None:
            layers.append(("bn", norm_layer(out_channels)))
        if act_layer is not None:
            layers.append(("act", act_layer()))
        super().__init__(OrderedDict(layers))


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation gate (Hu et al., arXiv:1709.01507), timm/MnasNet layout.

    ``x * sigmoid(expand(act(reduce(avgpool(x)))))`` with biased 1x1 convs; MnasNet-A1 squeezes
    to a quarter of the *block input* channels (timm ``se_from_exp=False``), which the caller
    passes as ``rd_channels``.
    """

    def __init__(
        self,
        channels: int,
        rd_channels: int,
        *,
        act_layer: ActFn = nn.ReLU,
        gate_layer: ActFn = nn.Sigmoid,
    ) -> None:
        """Builds the gate.

        Args:
            channels: channels of the gated tensor.
            rd_channels: squeezed width.
            act_layer: activation between the two 1x1 convs.
            gate_layer: gating non-linearity.

        Raises:
            ValueError: if a channel count is < 1.
        """
        super().__init__()
        if channels < 1 or rd_channels < 1:
            raise ValueError(
                f"channels and rd_channels must be >= 1, got {channels}, {rd_channels}"
            )
        self.conv_reduce = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act1 = act_layer()
        self.conv_expand = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = gate_layer()

    def forward(self, x: Tensor) -> Tensor:
        """Gates ``x`` channel-wise."""
        s = x.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
        s = self.conv_expand(self.act1(self.conv_reduce(s)))
        return x * self.gate(s)


def _attention_kwargs(
    attention_at: str,
    allowed: tuple[str, ...],
    dk: int,
    dv: int,
    num_heads: int,
    relative: bool,
    max_size: int | Sequence[int],
) -> Callable[[str], dict[str, Any]]:
    """``site(name)`` -> the AAConv2d arguments if ``name`` is the augmented conv, else ``{}``."""
    _check_site(attention_at, allowed)
    aa: dict[str, Any] = {
        "dk": dk,
        "dv": dv,
        "num_heads": num_heads,
        "relative": relative,
        "max_size": max_size,
    }
    return lambda name: aa if name == attention_at else {}


def _se(channels: int, se_channels: int, act_layer: ActFn) -> nn.Module:
    """An SE gate, or Identity when ``se_channels == 0``."""
    if se_channels == 0:
        return nn.Identity()
    return SqueezeExcite(channels, se_channels, act_layer=act_layer)


class InvertedResidual(nn.Module):
    """MnasNet/MobileNetV2 inverted bottleneck (arXiv:1807.11626, arXiv:1801.04381).

    ``pw expand -> BN -> act -> dw kxk/stride [AA] -> BN -> act -> [SE] -> pw linear -> BN``,
    plus the identity when ``residual``. Same layers as torchvision's ``_InvertedResidual``
    (whose ``layers.{0,1,3,4,6,7}`` are ``conv_pw, bn1, conv_dw, bn2, conv_pwl, bn3`` here).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        se_channels: int = 0,
        residual: bool = False,
        dk: int = 0,
        dv: int = 0,
        num_heads: int = 1,
        relative: bool = True,
        max_size: int | Sequence[int] = (32, 32),
        attention_at: str = "spatial",
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: ActFn = nn.ReLU,
    ) -> None:
        """Builds the block.

        Args:
            in_channels: input channels.
            out_channels: output channels.
            mid_channels: expanded channels (``in_channels * expansion``).
            kernel_size: depthwise kernel size.
            stride: depthwise stride.
            se_channels: SE squeeze width; 0 = no SE.
            residual: add the identity (needs ``stride == 1`` and ``in == out``).
            dk: attention key depth; 0 without attention.
            dv: attention output channels of the augmented conv; 0 = no attention.
            num_heads: attention heads.
            relative: relative position logits.
            max_size: largest input of the augmented conv the attention accepts.
            attention_at: ``"spatial"`` (conv_dw), ``"expansion"`` (conv_pw) or
                ``"projection"`` (conv_pwl).
            norm_layer: normalisation factory.
            act_layer: activation factory.

        Raises:
            ValueError: if ``residual`` is requested where shapes differ.
        """
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"residual needs stride 1 and in == out, got stride={stride}, "
                f"{in_channels} -> {out_channels}"
            )
        self.residual = residual
        site = _attention_kwargs(
            attention_at, _ATTENTION_SITES, dk, dv, num_heads, relative, max_size
        )
        self.conv_pw = spatial_conv(in_channels, mid_channels, 1, **site("expansion"))
        self.bn1 = norm_layer(mid_channels)
        self.act1 = act_layer()
        self.conv_dw = spatial_conv(
            mid_channels,
            mid_channels,
            kernel_size,
            stride,
            depthwise=True,
            **site("spatial"),
        )
        self.bn2 = norm_layer(mid_channels)
        self.act2 = act_layer()
        self.se = _se(mid_channels, se_channels, act_layer)
        self.conv_pwl = spatial_conv(mid_channels, out_channels, 1, **site("projection"))
        self.bn3 = norm_layer(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block."""
        out = self.act1(self.bn1(self.conv_pw(x)))  # (B, mid, H, W)
        out = self.act2(self.bn2(self.conv_dw(out)))  # (B, mid, H', W')
        out = self.bn3(self.conv_pwl(self.se(out)))  # (B, out, H', W')
        return out + x if self.residual else out


class DepthwiseSeparable(nn.Module):
    """``dw kxk [AA] -> BN -> act -> [SE] -> pw -> BN`` with no activation after the pw conv.

    MnasNet's first block (torchvision ``layers.3..7``, timm ``DepthwiseSeparableConv``).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        *,
        se_channels: int = 0,
        residual: bool = False,
        dk: int = 0,
        dv: int = 0,
        num_heads: int = 1,
        relative: bool = True,
        max_size: int | Sequence[int] = (32, 32),
        attention_at: str = "spatial",
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: ActFn = nn.ReLU,
    ) -> None:
        """Builds the block; arguments as :class:`InvertedResidual` (no expansion, so
        ``attention_at`` is ``"spatial"`` (conv_dw) or ``"projection"`` (conv_pw)).

        Raises:
            ValueError: if ``residual`` is requested where shapes differ.
        """
        super().__init__()
        if residual and (stride != 1 or in_channels != out_channels):
            raise ValueError(
                f"residual needs stride 1 and in == out, got stride={stride}, "
                f"{in_channels} -> {out_channels}"
            )
        self.residual = residual
        site = _attention_kwargs(
            attention_at, ("spatial", "projection"), dk, dv, num_heads, relative, max_size
        )
        self.conv_dw = spatial_conv(
            in_channels,
            in_channels,
            kernel_size,
            stride,
            depthwise=True,
            **site("spatial"),
        )
        self.bn1 = norm_layer(in_channels)
        self.act1 = act_layer()
        self.se = _se(in_channels, se_channels, act_layer)
        self.conv_pw = spatial_conv(in_channels, out_channels, 1, **site("projection"))
        self.bn2 = norm_layer(out_channels)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block."""
        out = self.act1(self.bn1(self.conv_dw(x)))  # (B, in, H', W')
        out = self.bn2(self.conv_pw(self.se(out)))  # (B, out, H', W')
        return out + x if self.residual else out


def _projection(
    in_channels: int, out_channels: int, stride: int, norm_layer: LayerFn | None
) -> nn.Sequential:
    """torchvision's ``downsample``: conv1x1(stride) [+ BN]; keys ``downsample.0/1``."""
    layers: list[nn.Module] = [nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)]
    if norm_layer is not None:
        layers.append(norm_layer(out_channels))
    return nn.Sequential(*layers)


class BasicBlock(nn.Module):
    """ResNet basic block (He et al., arXiv:1512.03385), torchvision layout.

    ``conv1 kxk/stride [AA] -> BN -> act -> conv2 kxk -> BN``, plus the identity or a
    conv1x1+BN projection when the shape changes, then act.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        *,
        residual: bool = True,
        dk: int = 0,
        dv: int = 0,
        num_heads: int = 1,
        relative: bool = True,
        max_size: int | Sequence[int] = (32, 32),
        attention_at: str = "spatial",
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: ActFn = nn.ReLU,
    ) -> None:
        """Builds the block.

        Args:
            in_channels: input channels.
            out_channels: output channels.
            stride: stride of the first conv (and of the projection).
            kernel_size: kernel of both spatial convs.
            residual: add the shortcut (projected when shapes differ).
            dk: attention key depth of the first conv; 0 without attention.
            dv: attention channels of the first conv; 0 = plain conv.
            num_heads: attention heads.
            relative: relative position logits.
            max_size: largest input the attention accepts.
            attention_at: ``"spatial"`` (conv1), the only site of this block.
            norm_layer: normalisation factory.
            act_layer: activation factory.
        """
        super().__init__()
        _check_site(attention_at, ("spatial",))
        self.residual = residual
        self.conv1 = spatial_conv(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            dk=dk,
            dv=dv,
            num_heads=num_heads,
            relative=relative,
            max_size=max_size,
        )
        self.bn1 = norm_layer(out_channels)
        self.act1 = act_layer()
        self.conv2 = spatial_conv(out_channels, out_channels, kernel_size)
        self.bn2 = norm_layer(out_channels)
        self.act2 = act_layer()
        self.downsample: nn.Module | None = None
        if residual and (stride != 1 or in_channels != out_channels):
            self.downsample = _projection(in_channels, out_channels, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block."""
        out = self.act1(self.bn1(self.conv1(x)))  # (B, out, H', W')
        out = self.bn2(self.conv2(out))
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.act2(out)


class Bottleneck(nn.Module):
    """ResNet v1.5 bottleneck (torchvision layout: the stride sits on the 3x3 conv).

    ``conv1 1x1 -> BN -> act -> conv2 kxk/stride [AA] -> BN -> act -> conv3 1x1 -> BN``, plus
    the identity or a conv1x1+BN projection when the shape changes, then act.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        mid_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        *,
        residual: bool = True,
        dk: int = 0,
        dv: int = 0,
        num_heads: int = 1,
        relative: bool = True,
        max_size: int | Sequence[int] = (32, 32),
        attention_at: str = "spatial",
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: ActFn = nn.ReLU,
    ) -> None:
        """Builds the block; ``mid_channels`` is the bottleneck width (``out / 4`` in ResNet).

        Other arguments as :class:`BasicBlock`; attention augments ``conv2`` (``attention_at``
        ``"spatial"``), ``conv1`` (``"expansion"``) or ``conv3`` (``"projection"``).
        """
        super().__init__()
        self.residual = residual
        site = _attention_kwargs(
            attention_at, _ATTENTION_SITES, dk, dv, num_heads, relative, max_size
        )
        self.conv1 = spatial_conv(in_channels, mid_channels, 1, **site("expansion"))
        self.bn1 = norm_layer(mid_channels)
        self.act1 = act_layer()
        self.conv2 = spatial_conv(
            mid_channels,
            mid_channels,
            kernel_size,
            stride,
            **site("spatial"),
        )
        self.bn2 = norm_layer(mid_channels)
        self.act2 = act_layer()
        self.conv3 = spatial_conv(mid_channels, out_channels, 1, **site("projection"))
        self.bn3 = norm_layer(out_channels)
        self.act3 = act_layer()
        self.downsample: nn.Module | None = None
        if residual and (stride != 1 or in_channels != out_channels):
            self.downsample = _projection(in_channels, out_channels, stride, norm_layer)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block."""
        out = self.act1(self.bn1(self.conv1(x)))  # (B, mid, H, W)
        out = self.act2(self.bn2(self.conv2(out)))  # (B, mid, H', W')
        out = self.bn3(self.conv3(out))  # (B, out, H', W')
        if self.residual:
            out = out + (x if self.downsample is None else self.downsample(x))
        return self.act3(out)


class PreActBasicBlock(nn.Module):
    """Pre-activation basic block of Wide-ResNet (Zagoruyko & Komodakis, arXiv:1605.07146).

    ``BN -> act -> conv1 kxk/stride [AA] -> BN -> act -> conv2 kxk``. As in the standard
    PyTorch WRN (xternalz/WideResNet-pytorch), the shortcut is the raw input when shapes match
    and otherwise a bias-free 1x1 conv applied to the *pre-activated* input.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        kernel_size: int = 3,
        *,
        residual: bool = True,
        dk: int = 0,
        dv: int = 0,
        num_heads: int = 1,
        relative: bool = True,
        max_size: int | Sequence[int] = (32, 32),
        attention_at: str = "spatial",
        norm_layer: LayerFn = nn.BatchNorm2d,
        act_layer: ActFn = nn.ReLU,
    ) -> None:
        """Builds the block; arguments as :class:`BasicBlock` (attention augments ``conv1``)."""
        super().__init__()
        _check_site(attention_at, ("spatial",))
        self.residual = residual
        self.bn1 = norm_layer(in_channels)
        self.act1 = act_layer()
        self.conv1 = spatial_conv(
            in_channels,
            out_channels,
            kernel_size,
            stride,
            dk=dk,
            dv=dv,
            num_heads=num_heads,
            relative=relative,
            max_size=max_size,
        )
        self.bn2 = norm_layer(out_channels)
        self.act2 = act_layer()
        self.conv2 = spatial_conv(out_channels, out_channels, kernel_size)
        self.shortcut: nn.Module | None = None
        if residual and (stride != 1 or in_channels != out_channels):
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        """Applies the block."""
        pre = self.act1(self.bn1(x))  # (B, in, H, W)
        out = self.conv2(self.act2(self.bn2(self.conv1(pre))))  # (B, out, H', W')
        if not self.residual:
            return out
        return out + (x if self.shortcut is None else self.shortcut(pre))
