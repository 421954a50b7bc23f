"""Weight-sharing supernet over a :class:`~aanas.space.SearchSpace` (once-for-all style).

One :class:`SuperNet` per space holds, at every block position, the largest version of every
choice the space allows (Cai et al., *Once-for-All*, arXiv:1908.09791; attention from Bello et
al., arXiv:1904.09925). An architecture selects a path through it:

- depth: a stage runs its first ``d`` blocks (trailing blocks are skipped);
- kernel: the centre ``k x k`` of the largest kernel;
- expansion / width: the first channels of every conv and BatchNorm;
- squeeze-excitation: the first ``se`` squeeze channels, or no gate;
- attention: the first ``Nh`` heads and the first ``dk/Nh`` / ``dv/Nh`` dims of each head of a
  shared per-head q/k/v projection, the first ``dv`` outputs of ``W^O``, and the central rows /
  first ``dk/Nh`` columns of the shared relative tables (:class:`~aanas.ops.elastic.
  ElasticAttention`). Layers that read an attention-augmented tensor keep its conv channels and
  its attention channels in separate banks (:func:`~aanas.ops.elastic.split_index`), so an
  attention channel never shares weights or BN statistics with a conv channel.

The spec is always passed explicitly (``supernet(x, spec)``); nothing is "activated".
:meth:`SuperNet.extract` returns the static model ``aanas.create_model(spec)`` builds, loaded
with exactly the sliced tensors the supernet path uses, so both give the same outputs.

Supported block types: ``ir``, ``ds`` (MnasNet), ``bottle``, ``basic`` (ResNet).
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from aanas._io import atomic_open, load_torch_file
from aanas.errors import CheckpointError
from aanas.ops.elastic import (
    ChannelIndex,
    ElasticAttention,
    ElasticBatchNorm2d,
    ElasticConv2d,
    ElasticLinear,
    split_index,
)
from aanas.space import SearchSpace
from aanas.spec import ArchSpec, ResolvedArch, ResolvedBlock, resolve

__all__ = ["SuperNet", "recalibrate_bn", "train_supernet"]

logger = logging.getLogger(__name__)

_SUPPORTED = ("ir", "ds", "bottle", "basic")
_ACTS: dict[str, Callable[[Tensor], Tensor]] = {
    "relu": F.relu,
    "relu6": F.relu6,
    "swish": F.silu,
    "hswish": F.hardswish,
}
# Supernet BatchNorm momentum: PyTorch's default. The static MnasNet uses torchvision's 3e-4,
# which would leave the shared running statistics near their initial values for thousands of
# steps; subnets are BN-recalibrated before evaluation anyway (recalibrate_bn).
_BN_MOMENTUM = 0.1


def _first(n: int) -> slice:
    return slice(0, n)


def _prefixed(prefix: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {f"{prefix}{k}": v for k, v in state.items()}


@dataclass
class _Bounds:
    """Largest integers one block position needs over the whole space."""

    type: str
    in_size: int
    in_max: int = 0
    mid_max: int = 0
    out_max: int = 0
    kernel_max: int = 1
    se_max: int = 0
    heads_max: int = 0
    dkh_max: int = 0
    dvh_max: int = 0
    dv_max: int = 0
    projection: bool = False  # ResNet blocks: a downsample conv somewhere in the space

    def update(self, rb: ResolvedBlock) -> None:
        if rb.type != self.type or rb.in_size != self.in_size:
            raise ValueError(
                f"{rb.name}: block type/size differs between architectures of the space "
                f"({rb.type}@{rb.in_size} vs {self.type}@{self.in_size}); not supported"
            )
        self.in_max = max(self.in_max, rb.in_channels)
        self.mid_max = max(self.mid_max, rb.mid_channels)
        self.out_max = max(self.out_max, rb.out_channels)
        self.kernel_max = max(self.kernel_max, rb.kernel)
        self.se_max = max(self.se_max, rb.se_channels)
        if rb.dv:
            self.heads_max = max(self.heads_max, rb.heads)
            self.dkh_max = max(self.dkh_max, rb.dk // rb.heads)
            self.dvh_max = max(self.dvh_max, rb.dv // rb.heads)
            self.dv_max = max(self.dv_max, rb.dv)
        if rb.type in ("bottle", "basic") and rb.residual:
            self.projection |= rb.stride != 1 or rb.in_channels != rb.out_channels


def _stage_positions(resolved: ResolvedArch) -> Iterable[tuple[int, int, ResolvedBlock]]:
    """``(stage, index within stage, block)`` for every resolved block."""
    counts: dict[int, int] = {}
    for rb in resolved.blocks:
        stage = int(rb.name.split(".", 1)[0].removeprefix("stage"))
        j = counts.get(stage, 0)
        counts[stage] = j + 1
        yield stage, j, rb


# --- super blocks -------------------------------------------------------------------------------


class _SuperBlock(nn.Module):
    """One block position: MBConv (ir/ds) or ResNet (bottle/basic) at its largest."""

    def __init__(self, b: _Bounds) -> None:
        super().__init__()
        self.block_type = b.type
        self.conv_bank = b.mid_max if b.type != "basic" else b.out_max  # AA-conv output bank
        aug_in = b.mid_max if b.type != "basic" else b.in_max
        split = self.conv_bank + b.dv_max  # conv bank + attention bank
        self.attn: ElasticAttention | None = None
        if b.dv_max:
            self.attn = ElasticAttention(
                aug_in, b.heads_max, b.dkh_max, b.dvh_max, b.dv_max, b.in_size
            )
        self.expand: ElasticConv2d | None = None
        self.se_reduce: ElasticConv2d | None = None
        self.se_expand: ElasticConv2d | None = None
        self.down: ElasticConv2d | None = None
        self.down_bn: ElasticBatchNorm2d | None = None
        if b.type in ("ir", "ds"):
            if b.type == "ir":
                self.expand = ElasticConv2d(b.in_max, b.mid_max, 1)
                self.expand_bn = ElasticBatchNorm2d(b.mid_max, momentum=_BN_MOMENTUM)
            self.spatial = ElasticConv2d(b.mid_max, b.mid_max, b.kernel_max, depthwise=True)
            self.spatial_bn = ElasticBatchNorm2d(split, momentum=_BN_MOMENTUM)
            if b.se_max:
                self.se_reduce = ElasticConv2d(split, b.se_max, 1, bias=True)
                self.se_expand = ElasticConv2d(b.se_max, split, 1, bias=True)
            self.project = ElasticConv2d(split, b.out_max, 1)
            self.project_bn = ElasticBatchNorm2d(b.out_max, momentum=_BN_MOMENTUM)
        elif b.type == "bottle":
            self.expand = ElasticConv2d(b.in_max, b.mid_max, 1)
            self.expand_bn = ElasticBatchNorm2d(b.mid_max, momentum=_BN_MOMENTUM)
            self.spatial = ElasticConv2d(b.mid_max, b.mid_max, b.kernel_max)
            self.spatial_bn = ElasticBatchNorm2d(split, momentum=_BN_MOMENTUM)
            self.project = ElasticConv2d(split, b.out_max, 1)
            self.project_bn = ElasticBatchNorm2d(b.out_max, momentum=_BN_MOMENTUM)
        else:  # basic: conv1 (augmented) -> bn1 -> conv2 -> bn2
            self.spatial = ElasticConv2d(b.in_max, b.out_max, b.kernel_max)
            self.spatial_bn = ElasticBatchNorm2d(split, momentum=_BN_MOMENTUM)
            self.project = ElasticConv2d(split, b.out_max, b.kernel_max)
            self.project_bn = ElasticBatchNorm2d(b.out_max, momentum=_BN_MOMENTUM)
        if b.projection:
            self.down = ElasticConv2d(b.in_max, b.out_max, 1)
            self.down_bn = ElasticBatchNorm2d(b.out_max, momentum=_BN_MOMENTUM)

    # The static block's sub-module names, per type: (expand conv, expand bn, spatial conv,
    # spatial bn, project conv, project bn).
    _NAMES = {
        "ir": ("conv_pw", "bn1", "conv_dw", "bn2", "conv_pwl", "bn3"),
        "ds": (None, None, "conv_dw", "bn1", "conv_pw", "bn2"),
        "bottle": ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3"),
        "basic": (None, None, "conv1", "bn1", "conv2", "bn2"),
    }

    def _plan(self, rb: ResolvedBlock, device: torch.device) -> tuple[int, int, ChannelIndex]:
        """(channels entering the augmented conv, its conv channels, its output index)."""
        aug_out = rb.out_channels if rb.type == "basic" else rb.mid_channels
        aug_in = rb.in_channels if rb.type in ("basic", "ds") else rb.mid_channels
        n_conv = aug_out - rb.dv
        return aug_in, n_conv, split_index(n_conv, rb.dv, self.conv_bank, device)

    def static_state(self, rb: ResolvedBlock) -> dict[str, Tensor]:
        """The static block's state_dict (keys as in ``aanas.ops.blocks``)."""
        n_exp, bn_exp, n_sp, bn_sp, n_proj, bn_proj = self._NAMES[rb.type]
        aug_in, n_conv, idx = self._plan(rb, self.spatial.weight.device)
        out = _first(rb.out_channels)
        state: dict[str, Tensor] = {}
        if self.expand is not None and n_exp is not None and bn_exp is not None:
            state[f"{n_exp}.weight"] = self.expand.sliced_weight(
                _first(rb.mid_channels), _first(rb.in_channels), 1
            )
            state.update(
                _prefixed(f"{bn_exp}.", self.expand_bn.sliced_state(_first(rb.mid_channels)))
            )
        spatial_in = _first(1 if self.spatial.depthwise else aug_in)
        conv_key = f"{n_sp}.weight" if rb.dv == 0 else f"{n_sp}.conv_out.weight"
        if n_conv > 0:
            state[conv_key] = self.spatial.sliced_weight(_first(n_conv), spatial_in, rb.kernel)
        if rb.dv:
            assert self.attn is not None
            attn = self.attn.static_state(
                _first(aug_in), rb.dk, rb.dv, rb.heads, rb.relative, rb.in_size
            )
            state.update(_prefixed(f"{n_sp}.", attn))
        state.update(_prefixed(f"{bn_sp}.", self.spatial_bn.sliced_state(idx)))
        if rb.se_channels:
            assert self.se_reduce is not None and self.se_expand is not None
            se = _first(rb.se_channels)
            state["se.conv_reduce.weight"] = self.se_reduce.sliced_weight(se, idx, 1)
            state["se.conv_reduce.bias"] = self.se_reduce.sliced_bias(se)  # type: ignore[assignment]
            state["se.conv_expand.weight"] = self.se_expand.sliced_weight(idx, se, 1)
            state["se.conv_expand.bias"] = self.se_expand.sliced_bias(idx)  # type: ignore[assignment]
        kernel = rb.kernel if rb.type == "basic" else 1
        state[f"{n_proj}.weight"] = self.project.sliced_weight(out, idx, kernel)
        state.update(_prefixed(f"{bn_proj}.", self.project_bn.sliced_state(out)))
        if rb.residual and (rb.stride != 1 or rb.in_channels != rb.out_channels):
            if rb.type in ("bottle", "basic"):
                assert self.down is not None and self.down_bn is not None
                state["downsample.0.weight"] = self.down.sliced_weight(
                    out, _first(rb.in_channels), 1
                )
                state.update(_prefixed("downsample.1.", self.down_bn.sliced_state(out)))
        return state

    def forward(self, x: Tensor, rb: ResolvedBlock) -> Tensor:
        act = _ACTS[rb.act]
        aug_in, n_conv, idx = self._plan(rb, x.device)
        mid = _first(rb.mid_channels)
        out = _first(rb.out_channels)
        h = x
        if self.expand is not None:
            h = act(self.expand_bn(self.expand(x, mid, _first(rb.in_channels), 1), mid))
        parts = []
        if n_conv > 0:
            if self.spatial.depthwise:
                parts.append(
                    self.spatial(h[:, :n_conv], _first(n_conv), _first(1), rb.kernel, rb.stride)
                )
            else:
                parts.append(self.spatial(h, _first(n_conv), _first(aug_in), rb.kernel, rb.stride))
        if rb.dv:
            assert self.attn is not None
            parts.append(
                self.attn(h, _first(aug_in), rb.dk, rb.dv, rb.heads, rb.relative, rb.stride)
            )
        h = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)  # (B, aug_out, H', W')
        h = act(self.spatial_bn(h, idx))
        if rb.se_channels:
            assert self.se_reduce is not None and self.se_expand is not None
            se = _first(rb.se_channels)
            s = h.mean((2, 3), keepdim=True)  # (B, C, 1, 1)
            s = self.se_expand(act(self.se_reduce(s, se, idx, 1)), idx, se, 1)
            h = h * torch.sigmoid(s)
        kernel = rb.kernel if rb.type == "basic" else 1
        h = self.project_bn(self.project(h, out, idx, kernel), out)  # (B, out, H', W')
        if rb.type in ("ir", "ds"):
            mb: Tensor = h + x if rb.residual else h
            return mb
        if rb.residual:
            if rb.stride != 1 or rb.in_channels != rb.out_channels:
                assert self.down is not None and self.down_bn is not None
                shortcut = self.down_bn(
                    self.down(x, out, _first(rb.in_channels), 1, rb.stride), out
                )
            else:
                shortcut = x
            h = h + shortcut
        return act(h)


# --- the supernet -------------------------------------------------------------------------------


class SuperNet(nn.Module):
    """Weight-sharing supernet of a search space; ``supernet(x, spec)`` runs one path.

    Args:
        space: the search space; every architecture ``space.decode`` can return is a path.

    Raises:
        ValueError: for a family/block type the supernet does not support (``wrn``/preact).
    """

    _version = 1

    def __init__(self, space: SearchSpace) -> None:
        super().__init__()
        self.space = space
        largest = space.largest()
        if largest.family == "wrn":
            raise ValueError(f"{space.name}: SuperNet supports mnasnet and resnet spaces only")
        self.family = largest.family
        bounds: dict[tuple[int, int], _Bounds] = {}
        stem_max = head_in = features = 0
        for spec in (largest, *space.variant_specs()):
            resolved = resolve(spec)
            stem_max = max(stem_max, resolved.stem_channels)
            head_in = max(head_in, resolved.blocks[-1].out_channels)
            features = max(features, resolved.features)
            for stage, j, rb in _stage_positions(resolved):
                if rb.type not in _SUPPORTED:
                    raise ValueError(f"{rb.name}: SuperNet does not support {rb.type!r} blocks")
                bounds.setdefault((stage, j), _Bounds(rb.type, rb.in_size)).update(rb)
        stem = largest.stem
        self.stem = ElasticConv2d(3, stem_max, stem.kernel)
        self.stem_bn = ElasticBatchNorm2d(stem_max, momentum=_BN_MOMENTUM)
        n_stages = len(largest.stages)
        self.blocks = nn.ModuleList(
            nn.ModuleList(
                _SuperBlock(bounds[(i, j)]) for j in range(sum(1 for (s, _) in bounds if s == i))
            )
            for i in range(n_stages)
        )
        self.head: ElasticConv2d | None = None
        if largest.head_channels:
            self.head = ElasticConv2d(head_in, largest.head_channels, 1)
            self.head_bn = ElasticBatchNorm2d(largest.head_channels, momentum=_BN_MOMENTUM)
        self.classifier = ElasticLinear(features, largest.num_classes)

    def _block(self, stage: int, index: int) -> _SuperBlock:
        block = self.blocks[stage][index]  # type: ignore[index]
        assert isinstance(block, _SuperBlock)
        return block

    def _resolve(self, spec: ArchSpec) -> ResolvedArch:
        resolved = resolve(spec)
        if spec.family != self.family:
            raise ValueError(f"spec family {spec.family!r} is not the supernet's {self.family!r}")
        return resolved

    def forward(self, x: Tensor, spec: ArchSpec) -> Tensor:
        """Logits of the architecture ``spec`` (which must be in the space) on images ``x``."""
        resolved = self._resolve(spec)
        stem = spec.stem
        c = _first(resolved.stem_channels)
        h = self.stem(x, c, _first(3), stem.kernel, stem.stride)  # (B, C, H/2, W/2)
        if stem.type != "plain":
            h = _ACTS[stem.act](self.stem_bn(h, c))
        if stem.type == "resnet":
            h = F.max_pool2d(h, 3, 2, 1)
        for stage, j, rb in _stage_positions(resolved):
            h = self._block(stage, j)(h, rb)
        if self.head is not None:
            hc = _first(resolved.head_channels)
            h = _ACTS[stem.act](self.head_bn(self.head(h, hc, _first(h.shape[1]), 1), hc))
        h = h.mean((2, 3))  # (B, C)
        h = F.dropout(h, spec.dropout, self.training)
        logits: Tensor = self.classifier(h)
        return logits

    @torch.no_grad()
    def static_state(self, spec: ArchSpec) -> dict[str, Tensor]:
        """The state_dict of ``create_model(spec)`` with the weights of this path."""
        resolved = self._resolve(spec)
        stem = spec.stem
        c = _first(resolved.stem_channels)
        state = {"stem.conv.weight": self.stem.sliced_weight(c, _first(3), stem.kernel)}
        if stem.type != "plain":
            state.update(_prefixed("stem.bn.", self.stem_bn.sliced_state(c)))
        for stage, j, rb in _stage_positions(resolved):
            block_state = self._block(stage, j).static_state(rb)
            state.update(_prefixed(f"blocks.{stage}.{j}.", block_state))
        if self.head is not None:
            hc = _first(resolved.head_channels)
            last = _first(resolved.blocks[-1].out_channels)
            state["head.conv.weight"] = self.head.sliced_weight(hc, last, 1)
            state.update(_prefixed("head.bn.", self.head_bn.sliced_state(hc)))
        name = "classifier" if self.family == "mnasnet" else "fc"
        state[f"{name}.weight"] = self.classifier.weight[:, : resolved.features]
        state[f"{name}.bias"] = self.classifier.bias
        return {k: v.detach().clone() for k, v in state.items()}

    def extract(self, spec: ArchSpec) -> nn.Module:
        """The static model ``aanas.create_model(spec)`` with this path's weights copied in."""
        from aanas.models import create_model  # L2; the supernet sits above models

        model = create_model(spec)
        device = self.classifier.weight.device
        model.load_state_dict(self.static_state(spec), strict=True)
        return model.to(device)

    # -- persistence -------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the supernet state (and its space's source) atomically: temp file + replace."""
        payload = {
            "version": self._version,
            "space": self.space.name,
            "state_dict": self.state_dict(),
        }
        with atomic_open(path, "wb") as fh:
            torch.save(payload, fh)

    def load(self, path: str | os.PathLike[str]) -> None:
        """Load a state written by :meth:`save` (``weights_only=True``; the space must match).

        Raises:
            CheckpointError: the file is missing, empty, truncated or not a supernet state, or
                it was saved from another space or version; the message names the file.
        """
        payload = load_torch_file(path, "supernet checkpoint")
        if not isinstance(payload, dict) or not isinstance(payload.get("state_dict"), dict):
            raise CheckpointError(
                f"supernet checkpoint {path}: not written by SuperNet.save (no state_dict)"
            )
        if payload.get("version") != self._version or payload.get("space") != self.space.name:
            raise CheckpointError(
                f"supernet checkpoint {path}: supernet of space {payload.get('space')!r} "
                f"v{payload.get('version')}, expected {self.space.name!r} v{self._version}"
            )
        try:
            self.load_state_dict(payload["state_dict"], strict=True)
        except RuntimeError as exc:
            first = " ".join(str(exc).split())[:300]
            msg = f"supernet checkpoint {path}: weights do not fit: {first}"
            raise CheckpointError(msg) from None


# --- training -----------------------------------------------------------------------------------


def _loader_of(data: Any) -> Iterable[Any]:
    loader: Iterable[Any] = data.train if hasattr(data, "train") else data
    return loader


def train_supernet(
    supernet: SuperNet,
    data: Any,
    *,
    epochs: int,
    lr: float,
    rule: str = "sandwich",
    seed: int = 0,
    device: str | torch.device = "cpu",
    max_batches: int | None = None,
    weight_decay: float = 5e-5,
    n_random: int = 1,
    on_epoch: Callable[[int, dict[str, float]], None] | None = None,
) -> dict[str, Any]:
    """Train the shared weights with single-path sampling (SGD, momentum 0.9, cosine LR).

    Args:
        supernet: the supernet (moved to ``device``).
        data: a ``DataBundle`` (its ``train`` loader is used) or any iterable of ``(x, y)``.
        epochs: passes over the loader.
        lr: peak learning rate (cosine-annealed to 0 over all steps).
        rule: ``"uniform"``: one uniformly sampled path per step; ``"sandwich"``: the largest,
            the smallest and ``n_random`` sampled paths per step, gradients accumulated
            (Yu & Huang, *BigNAS* / slimmable networks, arXiv:1903.05134).
        seed: seeds the path sampler (``numpy.random.default_rng``) and torch.
        device: training device.
        max_batches: stop each epoch after this many batches (quick runs).
        weight_decay: SGD weight decay.
        n_random: random paths per sandwich step.
        on_epoch: called as ``on_epoch(epoch, metrics)`` after each epoch.

    Returns:
        ``{"epochs": [...per-epoch metrics...], "seconds": total}``.

    Raises:
        ValueError: unknown ``rule``.
    """
    if rule not in ("sandwich", "uniform"):
        raise ValueError(f"rule must be 'sandwich' or 'uniform', got {rule!r}")
    dev = torch.device(device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    space = supernet.space
    largest, smallest = space.largest(), space.smallest()
    supernet.to(dev).train()
    loader = _loader_of(data)
    try:
        steps_per_epoch = len(loader)  # type: ignore[arg-type]
    except TypeError:
        steps_per_epoch = max_batches or 1
    if max_batches is not None:
        steps_per_epoch = min(steps_per_epoch, max_batches)
    total_steps = max(1, epochs * steps_per_epoch)
    opt = torch.optim.SGD(
        supernet.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=True
    )
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total_steps) / total_steps))
    )
    history: list[dict[str, float]] = []
    start = time.perf_counter()
    for epoch in range(epochs):
        t0 = time.perf_counter()
        loss_sum, n_seen = 0.0, 0
        for step, (x, y) in enumerate(loader):
            if max_batches is not None and step >= max_batches:
                break
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if rule == "sandwich":
                paths = [largest, smallest] + [space.sample(rng) for _ in range(n_random)]
            else:
                paths = [space.sample(rng)]
            opt.zero_grad(set_to_none=True)
            for spec in paths:
                loss = F.cross_entropy(supernet(x, spec), y)
                loss.backward()  # type: ignore[no-untyped-call]  # gradients accumulate over the paths of this step
                if spec is paths[0]:
                    loss_sum += float(loss.detach()) * len(y)
                    n_seen += len(y)
            opt.step()
            sched.step()
        metrics = {
            "epoch": float(epoch),
            "train_loss": loss_sum / max(1, n_seen),
            "seconds": time.perf_counter() - t0,
            "lr": float(opt.param_groups[0]["lr"]),
        }
        history.append(metrics)
        logger.info("supernet epoch %d: %s", epoch, metrics)
        if on_epoch is not None:
            on_epoch(epoch, metrics)
    return {"epochs": history, "seconds": time.perf_counter() - start}


@torch.no_grad()
def recalibrate_bn(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    batches: int = 20,
    device: str | torch.device = "cpu",
    spec: ArchSpec | None = None,
) -> nn.Module:
    """Re-estimate BatchNorm statistics of an (extracted) subnet on training data.

    Resets every BN's running statistics, switches to a cumulative average (``momentum=None``),
    forwards ``batches`` batches in train mode without gradients, then restores momenta and
    puts the model in eval mode. With ``spec`` the model is a :class:`SuperNet` and that path
    is recalibrated (only its BN slices change).

    Returns:
        ``model`` (modified in place), in eval mode.
    """
    dev = torch.device(device)
    model.to(dev)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    for i, (x, _) in enumerate(loader):
        if i >= batches:
            break
        x = x.to(dev, non_blocking=True)
        if spec is not None:
            model(x, spec)
        else:
            model(x)
    for m, mom in zip(norms, momenta, strict=True):
        m.momentum = mom
    return model.eval()
