"""Parameters and multiply-accumulates (MACs) of aanas networks, three independent ways.

* :func:`count_spec`: analytical, straight from an :class:`~aanas.spec.ArchSpec` through
  :func:`~aanas.spec.resolve` with no model built (microseconds, cached), so a search can reject
  over-budget candidates before it instantiates anything (the Once-for-All approach,
  ``count_flops_given_config``; Cai et al., arXiv:1908.09791).
* :func:`count_module`: hook-based, with thop's per-layer rules for ordinary layers and
  :func:`_count_aaconv` for :class:`~aanas.ops.attention.AAConv2d`.
* :func:`reference_macs`: PyTorch's own ``torch.utils.flop_counter.FlopCounterMode``, which
  sees every aten convolution/matmul actually executed (an independent reference).

Counting convention (all three agree on it; the tests hold them to it):

* One MAC is one multiply-add. ``flops = 2 * macs``: the convention of the AA paper (Bello et
  al., arXiv:1904.09925, Table 2 lists ResNet-50 at 8.2 GFLOPs = 4.1 G MACs) and of
  FlopCounterMode. MnasNet's "312M mult-adds" and torchvision's "0.31 GFLOPS" for
  ``mnasnet1_0`` are MACs in this sense.
* Counted: convolutions (``out_elements * in_channels / groups * kh * kw``), linear layers
  (``in * out``), and every matmul of the attention branch.
* Not counted: biases, batch norm, activations, the SE sigmoid gate and the residual add,
  softmax, the attention scaling, pooling (including attention's 3x3/2 average pooling and
  global average pooling), dropout.
* Attention of one :class:`~aanas.ops.attention.AAConv2d` on an ``H x W`` map (after its
  stride-2 pooling, if any), ``HW = H * W``, with ``Nh`` heads of depth
  ``dkh = dk / Nh`` and ``dvh = dv / Nh``::

      qkv_conv (1x1)    HW * in * (2 dk + dv)
      q k^T             Nh * HW * HW * dkh     = HW^2 * dk
      weights v         Nh * HW * HW * dvh     = HW^2 * dv
      relative logits   Nh * HW * (H + W) * dkh = HW * (H + W) * dk      (if relative)
      attn_out (1x1)    HW * dv * dv

  The relative logits are counted **as our implementation computes them**: one
  ``einsum('bnxyd,xkd->bnxyk')`` of every query with the ``(H, H, dkh)`` height-offset matrix
  plus one with the ``(W, W, dkh)`` width-offset matrix (:func:`aanas.ops.attention.
  relative_attention`). The paper's appendix instead multiplies each query with the whole
  ``(2W - 1)`` table (``HW * (2W - 1) * dkh`` per head for width, the same with ``2H - 1`` for
  height) and discards half the products in ``rel_to_abs``; that would count
  ``HW * (H + W - 2) * dk`` more MACs per layer. Building the ``(H, H, dkh)`` matrix from the
  table is an index gather, not counted.
* Squeeze-excitation counts its two 1x1 convolutions on the pooled ``1 x 1`` map.

Agreement (``tests/test_cost.py``, ``benchmarks/cost_table.py --check``): the analytical and
thop counts are equal, params and MACs, and FlopCounterMode equals both exactly (0.0000 %) on
every registered preset and on random specs from ``search_spaces/*.yaml``; there is no op that
one side counts and another does not under this convention.

Parameters are all trainable tensors (weights, biases, batch-norm affine, the relative position
tables); batch-norm running statistics are buffers and not counted.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn

from aanas.block_types import aa_conv_cost, block_type, bn_cost, conv_cost
from aanas.models import resolve_spec
from aanas.spec import ArchSpec, ResolvedArch, ResolvedBlock, resolve

__all__ = [
    "Cost",
    "aa_conv_cost",
    "block_cost",
    "count",
    "count_module",
    "count_spec",
    "reference_macs",
]


@dataclass(frozen=True)
class Cost:
    """Parameters and MACs of a network, with a per-part breakdown.

    ``blocks`` maps part names to ``(params, macs)``: ``"stem"``, every block by its resolved
    name (``"stage2.block0.1"``), ``"head"`` (the 1x1 head conv and final norm, if any) and
    ``"classifier"``; the parts sum to the totals.
    """

    params: int
    macs: int
    blocks: Mapping[str, tuple[int, int]] = dataclasses.field(
        default_factory=lambda: MappingProxyType({}), hash=False
    )

    @property
    def flops(self) -> int:
        """``2 * macs`` (one multiply-add = two FLOPs, the AA paper's convention)."""
        return 2 * self.macs

    def __str__(self) -> str:
        return f"params {self.params / 1e6:.3f}M, MACs {self.macs / 1e6:.1f}M"


def _cost(parts: dict[str, tuple[int, int]]) -> Cost:
    """A Cost whose totals are the sums of ``parts``."""
    return Cost(
        params=sum(p for p, _ in parts.values()),
        macs=sum(m for _, m in parts.values()),
        blocks=MappingProxyType(dict(parts)),
    )


# Per-layer and per-block formulas live in aanas.block_types (L0), so cost filters need no torch.


# --- hook-based count (thop) --------------------------------------------------------------------


def _count_aaconv(
    module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
) -> None:
    """thop rule for AAConv2d: conv branch + every attention matmul (module docstring).

    Reads the layer's own attributes and the actual output shape (batch included), so it is an
    independent check of :func:`aa_conv_cost`.
    """
    from aanas.ops.attention import AAConv2d

    assert isinstance(module, AAConv2d)
    in_channels = int(inputs[0].shape[1])
    batch, _, out_h, out_w = (int(d) for d in output.shape)
    hw = out_h * out_w
    macs = 0
    if module.conv_out is not None:
        conv = module.conv_out
        kh, kw = conv.kernel_size
        macs += hw * conv.out_channels * (conv.in_channels // conv.groups) * kh * kw
    if module.qkv_conv is not None:
        dk, dv = module.dk, module.dv
        macs += hw * in_channels * (2 * dk + dv)  # qkv_conv, 1x1 on the (pooled) input
        macs += hw * hw * (dk + dv)  # q k^T, weights v
        if module.key_rel_w is not None:
            macs += hw * (out_h + out_w) * dk  # relative logits, height + width
        macs += hw * dv * dv  # attn_out
    _add_ops(module, batch * macs)


def _add_ops(module: nn.Module, ops: int) -> None:
    """Add to the ``total_ops`` buffer thop registers on every hooked module."""
    total: torch.Tensor = module.total_ops  # type: ignore[assignment]
    total += torch.tensor([float(ops)], dtype=torch.float64)


def _zero_ops(module: nn.Module, inputs: Any, output: Any) -> None:
    """thop rule for layers whose MACs are not counted (BN, activations, pooling)."""
    _add_ops(module, 0)


def _thop_custom_ops() -> dict[type, Any]:
    """thop overrides: AAConv2d rule; BN, activations and pooling count zero MACs.

    thop's defaults count 2 ops per element for batch norm and pooling ops (336M instead of
    314M for torchvision's mnasnet1_0). Modules listed here still get their parameters counted.
    """
    from aanas.ops.attention import AAConv2d

    zero: tuple[type, ...] = (
        nn.BatchNorm1d,
        nn.BatchNorm2d,
        nn.GroupNorm,
        nn.LayerNorm,
        nn.ReLU,
        nn.ReLU6,
        nn.SiLU,
        nn.Hardswish,
        nn.Hardsigmoid,
        nn.Sigmoid,
        nn.GELU,
        nn.Softmax,
        nn.AvgPool2d,
        nn.MaxPool2d,
        nn.AdaptiveAvgPool2d,
        nn.AdaptiveMaxPool2d,
        nn.Dropout,
        nn.Identity,
        nn.Flatten,
    )
    ops: dict[type, Any] = {t: _zero_ops for t in zero}
    ops[AAConv2d] = _count_aaconv
    return ops


def _thop_profile(model: nn.Module, example: torch.Tensor) -> tuple[int, int, dict[str, Any]]:
    """thop's (MACs, params, nested per-child info) of ``model(example)`` in eval mode."""
    with warnings.catch_warnings():  # thop 0.1.1 imports distutils' LooseVersion
        warnings.simplefilter("ignore", DeprecationWarning)
        from thop import profile

    was_training = model.training
    try:
        macs, params, info = profile(
            model,
            inputs=(example,),
            custom_ops=_thop_custom_ops(),
            verbose=False,
            ret_layer_info=True,
        )
    finally:
        model.train(was_training)
    return int(round(macs)), int(round(params)), info


def _flatten_info(info: Mapping[str, Any], prefix: str = "") -> dict[str, tuple[int, int]]:
    """thop's nested ``{child: (ops, params, children)}`` as ``{dotted name: (params, ops)}``."""
    out: dict[str, tuple[int, int]] = {}
    for name, (ops, params, children) in info.items():
        full = f"{prefix}{name}"
        out[full] = (int(round(params)), int(round(ops)))
        out.update(_flatten_info(children, full + "."))
    return out


def _device_of(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (CPU for a parameterless module).

    Both hook-based counters only need shapes, so a model built under
    ``torch.device("meta")`` is counted without allocating or computing anything.
    """
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


def reference_macs(model: nn.Module, input_size: int, *, batch: int = 1) -> int:
    """MACs of one forward pass as counted by ``torch.utils.flop_counter.FlopCounterMode``.

    FlopCounterMode counts ``2 * MACs`` for every aten convolution, ``mm``/``addmm``
    (linear layers; the bias add of ``addmm`` is not counted), ``bmm``/``matmul`` and the bmms
    that ``einsum`` lowers to, so it sees the attention matmuls exactly as they run. It counts
    nothing for batch norm, activations, pooling, softmax or elementwise ops, the same exclusions
    as our convention. Returned per image (divided by ``batch``).
    """
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    model.eval()
    example = torch.randn(batch, 3, input_size, input_size, device=_device_of(model))
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            model(example)
    finally:
        model.train(was_training)
    flops = int(counter.get_total_flops())
    assert flops % (2 * batch) == 0, flops
    return flops // (2 * batch)


# --- analytical count ---------------------------------------------------------------------------


def _add(*parts: tuple[int, int]) -> tuple[int, int]:
    """Element-wise sum of (params, MACs) pairs."""
    return sum(p for p, _ in parts), sum(m for _, m in parts)


def block_cost(b: ResolvedBlock) -> tuple[int, int]:
    """(params, MACs) of one resolved block: its record's formula (``aanas.block_types``).

    Example: MnasNet-B1 ``stage1.block0.0`` (ir 16 -> 48 -> 24, k3 s2, 112 -> 56): pw
    16*48 * 112^2 + dw 48*9 * 56^2 + pwl 48*24 * 56^2 = 9633792 + 1354752 + 3612672 MACs.
    """
    return block_type(b.type).cost(b)


def _stem_cost(r: ResolvedArch) -> tuple[int, int]:
    """Stem conv (+ BN unless ``plain``); the ResNet max-pool counts nothing."""
    stem = r.spec.stem
    conv_size = -(-r.spec.input_size // stem.stride)
    conv = conv_cost(3, r.stem_channels, stem.kernel, conv_size)
    return conv if stem.type == "plain" else _add(conv, bn_cost(r.stem_channels))


def _head_cost(r: ResolvedArch) -> tuple[int, int]:
    """1x1 head conv + BN (MnasNet), or the final BN of a pre-activation net (Wide-ResNet)."""
    last = r.blocks[-1]
    if r.head_channels > 0:
        return _add(
            conv_cost(last.out_channels, r.head_channels, 1, last.out_size),
            bn_cost(r.head_channels),
        )
    if r.spec.family == "wrn":
        return bn_cost(last.out_channels)
    return 0, 0


def _classifier_cost(r: ResolvedArch) -> tuple[int, int]:
    """Linear ``features -> num_classes`` with bias (MACs: features * num_classes)."""
    weights = r.features * r.spec.num_classes
    return weights + r.spec.num_classes, weights


@functools.lru_cache(maxsize=65536)
def count_spec(spec: ArchSpec) -> Cost:
    """Analytical params and MACs of ``spec`` from :func:`~aanas.spec.resolve`, no model built.

    Equal, exactly, to :func:`count_module` of ``create_model(spec)`` at ``spec.input_size``
    (tested over every registered preset and random specs). Cached on the frozen spec.

    Raises:
        ValueError: if the spec is invalid.
    """
    r = resolve(spec)
    parts: dict[str, tuple[int, int]] = {"stem": _stem_cost(r)}
    for b in r.blocks:
        parts[b.name] = block_cost(b)
    parts["head"] = _head_cost(r)
    parts["classifier"] = _classifier_cost(r)
    return _cost(parts)


def _block_paths(r: ResolvedArch) -> dict[str, str]:
    """``{"blocks.2.1": "stage2.block0.1", ...}``: module path of every resolved block
    (``aanas.models._builder.build_blocks`` nests ``blocks[stage][index within stage]``)."""
    return {f"blocks.{stage}.{j}": b.name for stage, j, b in r.staged()}


def count_module(model: nn.Module, input_size: int | None = None) -> Cost:
    """Params and MACs of ``model`` by thop forward hooks (one image of ``input_size``).

    thop's own rules count convolutions and linear layers without their biases, as our
    convention does; this overrides its rules for batch norm, activations and pooling (zero)
    and adds :func:`_count_aaconv` for AAConv2d. For an aanas model (one with ``.spec``) the
    breakdown uses the spec's part names (``stem``, ``stage1.block0.2``, ``head``,
    ``classifier``); for any other module, its top-level children.

    Raises:
        ValueError: if ``input_size`` is missing for a module without a ``.spec``.
    """
    spec = getattr(model, "spec", None)
    if input_size is None:
        if not isinstance(spec, ArchSpec):
            raise ValueError("input_size is required for a module without a .spec")
        input_size = spec.input_size
    example = torch.randn(1, 3, input_size, input_size, device=_device_of(model))
    macs, params, info = _thop_profile(model, example)
    flat = _flatten_info(info)
    parts: dict[str, tuple[int, int]] = {}
    if isinstance(spec, ArchSpec):
        paths = _block_paths(resolve(spec))
        for top in info:
            if top == "stem":
                parts["stem"] = flat[top]
            elif top == "blocks":
                parts.update({name: flat[path] for path, name in paths.items()})
            elif isinstance(model.get_submodule(top), nn.Linear):
                parts["classifier"] = _add(parts.get("classifier", (0, 0)), flat[top])
            else:
                parts["head"] = _add(parts.get("head", (0, 0)), flat[top])
    else:
        parts = {top: flat[top] for top in info}
    cost = _cost(parts)
    assert (cost.params, cost.macs) == (params, macs), ((cost.params, cost.macs), (params, macs))
    return cost


def count(spec_or_model: ArchSpec | str | nn.Module, input_size: int | None = None) -> Cost:
    """Params, MACs (and ``.flops``) of a spec, preset name, spec string or module.

    Specs go through the analytical :func:`count_spec` (``input_size`` replaces the spec's own,
    which also sizes the attention tables); modules through the thop-based
    :func:`count_module`. The two agree exactly; see the module docstring for the convention.
    """
    if isinstance(spec_or_model, nn.Module):
        return count_module(spec_or_model, input_size)
    return count_spec(resolve_spec(spec_or_model, input_size))
