"""Model families built from an ArchSpec, the name registry, and torchvision conversion.

``create_model`` accepts a registered name (``"aa_resnet50"``), a spec string (anything with a
``':'``, see ``aanas.spec``) or an ``ArchSpec``, and dispatches on ``spec.family``. Models
follow timm's contract (``forward_features``, ``forward_head``, ``reset_classifier``) and keep
their ``.spec``. Attention augmentation follows Bello et al., arXiv:1904.09925.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

from torch import Tensor, nn

from aanas.models import mnasnet_cifar as _mnasnet_cifar  # noqa: F401  (registers CIFAR specs)
from aanas.models._builder import ClassifierModel, zero_init_residual
from aanas.models._registry import get_spec, list_models, register_arch
from aanas.models.mnasnet import MnasNet
from aanas.models.resnet import ResNet
from aanas.models.wrn import WideResNet
from aanas.spec import ArchSpec, decode, round_channels

__all__ = [
    "ClassifierModel",
    "MnasNet",
    "ResNet",
    "WideResNet",
    "create_model",
    "from_torchvision",
    "get_spec",
    "list_models",
    "load_torchvision_state_dict",
    "register_arch",
    "resolve_spec",
    "torchvision_key",
    "zero_init_residual",
]

_FAMILY_MODELS: dict[str, type[ClassifierModel]] = {
    "mnasnet": MnasNet,
    "resnet": ResNet,
    "wrn": WideResNet,
}


def resolve_spec(name_or_spec: str | ArchSpec, input_size: int | None = None) -> ArchSpec:
    """Registered name, spec string (contains ``':'``) or ArchSpec -> ArchSpec, the one way
    every command and cost function reads a model argument; ``input_size`` replaces the spec's
    own (validated again: attention may not fit the new maps).

    Raises:
        ValueError: unknown name (with close matches), bad spec string or input size.
        TypeError: ``name_or_spec`` of another type.
    """
    if isinstance(name_or_spec, str):
        spec = decode(name_or_spec) if ":" in name_or_spec else get_spec(name_or_spec)
    elif isinstance(name_or_spec, ArchSpec):
        spec = name_or_spec
    else:
        raise TypeError(
            f"expected a model name, spec string or ArchSpec, got {type(name_or_spec).__name__}"
        )
    if input_size is not None and input_size != spec.input_size:
        spec = dataclasses.replace(spec, input_size=input_size).validate()
    return spec


def create_model(
    name_or_spec: str | ArchSpec,
    *,
    num_classes: int | None = None,
    input_size: int | None = None,
    width: float | None = None,
) -> ClassifierModel:
    """Builds a randomly initialised model.

    Overrides replace the spec's fields (``dataclasses.replace``) before validation, so
    ``create_model("aa_resnet50", input_size=32)`` sizes every attention table for 32x32
    inputs; ``model.spec`` is the overridden spec.

    Args:
        name_or_spec: registered name, spec string, or ArchSpec.
        num_classes: classifier outputs.
        input_size: square input side the model is built for (attention tables).
        width: channel multiplier replacing the spec's (not multiplied with it).

    Returns:
        A ``MnasNet``, ``ResNet`` or ``WideResNet``.

    Raises:
        ValueError: unknown name (with close matches), bad spec string or override.
        TypeError: ``name_or_spec`` of another type.
    """
    spec = resolve_spec(name_or_spec)
    changes: dict[str, object] = {}
    if num_classes is not None:
        changes["num_classes"] = num_classes
    if input_size is not None:
        changes["input_size"] = input_size
    if width is not None:
        if isinstance(width, bool) or not isinstance(width, int | float):
            raise ValueError(f"width: must be a number > 0, got {width!r}")
        changes["width"] = float(width)
    if changes:
        spec = dataclasses.replace(spec, **changes).validate()  # type: ignore[arg-type]
    return _FAMILY_MODELS[spec.family](spec)


# --- torchvision conversion -----------------------------------------------------------------

# torchvision _InvertedResidual.layers index -> our InvertedResidual child (2 and 5 are ReLUs).
_TV_IR = {"0": "conv_pw", "1": "bn1", "3": "conv_dw", "4": "bn2", "6": "conv_pwl", "7": "bn3"}
# torchvision MNASNet.layers index -> our module, outside the inverted-residual stacks 8..13.
_TV_MNASNET = {
    "0": "stem.conv",
    "1": "stem.bn",
    "3": "blocks.0.0.conv_dw",  # depthwise-separable block: layers 3..7
    "4": "blocks.0.0.bn1",
    "6": "blocks.0.0.conv_pw",
    "7": "blocks.0.0.bn2",
    "14": "head.conv",
    "15": "head.bn",
}
_TV_RESNET = {"conv1": "stem.conv", "bn1": "stem.bn", "fc": "fc"}


def torchvision_key(key: str, family: str) -> str:
    """Maps one torchvision state_dict key to ours.

    MnasNet (``torchvision.models.MNASNet``, any alpha; version 2 layout)::

        layers.0.weight                -> stem.conv.weight
        layers.1.running_mean          -> stem.bn.running_mean
        layers.3.weight                -> blocks.0.0.conv_dw.weight    (ds block: 3, 4, 6, 7)
        layers.8.0.layers.3.weight     -> blocks.1.0.conv_dw.weight    (stack s: layers.<7+s>)
        layers.13.0.layers.7.bias      -> blocks.6.0.bn3.bias
        layers.14.weight               -> head.conv.weight
        classifier.1.weight            -> classifier.weight

    ResNet (``torchvision.models.ResNet``; blocks keep torchvision's internal names)::

        conv1.weight                   -> stem.conv.weight
        bn1.running_var                -> stem.bn.running_var
        layer3.1.conv2.weight          -> blocks.2.1.conv2.weight
        layer2.0.downsample.0.weight   -> blocks.1.0.downsample.0.weight
        fc.weight                      -> fc.weight

    Raises:
        ValueError: for a family without a torchvision counterpart or an unknown key.
    """
    if family == "mnasnet":
        m = re.fullmatch(r"layers\.(\d+)\.(\d+)\.layers\.(\d+)\.(\w+)", key)
        if m and 8 <= int(m[1]) <= 13 and m[3] in _TV_IR:
            return f"blocks.{int(m[1]) - 7}.{m[2]}.{_TV_IR[m[3]]}.{m[4]}"
        m = re.fullmatch(r"layers\.(\d+)\.(\w+)", key)
        if m and m[1] in _TV_MNASNET:
            return f"{_TV_MNASNET[m[1]]}.{m[2]}"
        m = re.fullmatch(r"classifier\.1\.(\w+)", key)
        if m:
            return f"classifier.{m[1]}"
    elif family == "resnet":
        m = re.fullmatch(r"layer([1-4])\.(\d+)\.(.+)", key)
        if m:
            return f"blocks.{int(m[1]) - 1}.{m[2]}.{m[3]}"
        m = re.fullmatch(r"(conv1|bn1|fc)\.(\w+)", key)
        if m:
            return f"{_TV_RESNET[m[1]]}.{m[2]}"
    else:
        raise ValueError(
            f"family {family!r} has no torchvision counterpart; expected mnasnet/resnet"
        )
    raise ValueError(f"unknown torchvision {family} state_dict key {key!r}")


def load_torchvision_state_dict(model: ClassifierModel, state_dict: Mapping[str, Tensor]) -> None:
    """Loads a torchvision MNASNet/ResNet state_dict into ``model`` (strict, renamed keys).

    Raises:
        ValueError: unknown keys (see :func:`torchvision_key`) or mismatched shapes, e.g. a
            torchvision width that does not match the model's spec.
    """
    family = model.spec.family
    mapped = {torchvision_key(k, family): v for k, v in state_dict.items()}
    try:
        model.load_state_dict(mapped, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"torchvision state_dict does not fit {model.spec}: {exc}") from None


# torchvision's MNASNet alphas; the stem width (_get_depths(alpha)[0]) identifies them uniquely:
# 16, 24, 32, 40.
_TV_MNASNET_NAMES = {
    0.5: "mnasnet_b1_050",
    0.75: "mnasnet_b1_075",
    1.0: "mnasnet_b1_100",
    1.3: "mnasnet_b1_130",
}
# (block type, blocks per layer) -> registered name, as torchvision.models.resnet18 .. 152.
_TV_RESNET_NAMES = {
    ("basic", (2, 2, 2, 2)): "resnet18",
    ("basic", (3, 4, 6, 3)): "resnet34",
    ("bottle", (3, 4, 6, 3)): "resnet50",
    ("bottle", (3, 4, 23, 3)): "resnet101",
    ("bottle", (3, 8, 36, 3)): "resnet152",
}


def _tv_spec(tv_model: nn.Module) -> ArchSpec:
    """The registered spec matching a torchvision MNASNet/ResNet instance."""
    from torchvision.models import MNASNet
    from torchvision.models import ResNet as TVResNet
    from torchvision.models.resnet import BasicBlock as TVBasicBlock
    from torchvision.models.resnet import Bottleneck as TVBottleneck

    if isinstance(tv_model, MNASNet):
        stem = tv_model.layers[0].out_channels
        by_stem = {round_channels(32 * a): name for a, name in _TV_MNASNET_NAMES.items()}
        if stem not in by_stem:
            raise ValueError(
                f"torchvision MNASNet with stem width {stem} matches no alpha in "
                f"{sorted(_TV_MNASNET_NAMES)} (stem widths {sorted(by_stem)})"
            )
        classifier = tv_model.classifier
        return dataclasses.replace(
            get_spec(by_stem[stem]),
            num_classes=classifier[1].out_features,
            dropout=float(classifier[0].p),
        )
    if isinstance(tv_model, TVResNet):
        first = tv_model.layer1[0]
        if isinstance(first, TVBottleneck):
            block = "bottle"
            if first.conv2.groups != 1 or first.conv2.out_channels != 64:
                raise ValueError("ResNeXt / Wide ResNet (grouped or widened 3x3) is not supported")
        elif isinstance(first, TVBasicBlock):
            block = "basic"
        else:
            raise ValueError(f"unsupported torchvision ResNet block {type(first).__name__}")
        counts = tuple(len(getattr(tv_model, f"layer{i}")) for i in range(1, 5))
        key = (block, counts)
        if key not in _TV_RESNET_NAMES:
            raise ValueError(f"torchvision ResNet with {block} blocks {counts} is not registered")
        return dataclasses.replace(
            get_spec(_TV_RESNET_NAMES[key]), num_classes=tv_model.fc.out_features
        )
    raise ValueError(
        f"from_torchvision supports torchvision MNASNet and ResNet, got {type(tv_model).__name__}"
    )


def from_torchvision(tv_model: nn.Module) -> ClassifierModel:
    """Converts a torchvision MNASNet (alpha 0.5/0.75/1.0/1.3) or ResNet-18..152, weights and
    BatchNorm statistics included, into the equivalent aanas model (identical outputs).

    The train/eval mode is copied too. Keys are renamed by :func:`torchvision_key`.

    Raises:
        ValueError: for another model type or an unsupported configuration.
    """
    spec = _tv_spec(tv_model)
    model = create_model(spec)
    load_torchvision_state_dict(model, tv_model.state_dict())
    model.train(tv_model.training)
    return model
