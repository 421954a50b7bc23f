"""ONNX export of aanas models, with an onnxruntime-vs-PyTorch parity check.

:func:`to_onnx` writes a model (any classifier with a ``.spec``, including the
attention-augmented convolutions of Bello et al., arXiv:1904.09925) as ONNX with a dynamic
batch axis, runs ``onnx.checker``, verifies onnxruntime against PyTorch on random and real
images and only then moves the file into place (temporary file + :func:`os.replace`), so a
failed export never leaves a model behind. ``metadata_props`` carry the canonical spec string,
input size, normalization, MACs and parameters.

Parity tolerance. Two float32 implementations of one network differ by round-off that grows
with depth and with the size of the logits, so one fixed bound is either too loose for a small
net or too tight for a deep one (AA-ResNet-50 at 128 px with trained BN statistics: onnxruntime
1.1e-3 from PyTorch, while PyTorch's own float32 result is 5.8e-4 from float64 on the same
input). Each input is therefore judged against the round-off PyTorch itself makes on it::

    tol = max(atol, roundoff_factor * max|torch_fp32 - torch_fp64|, rtol * max|torch_fp32|)

- ``roundoff_factor`` = 8: onnxruntime's own float32 error is of the same kind as PyTorch's
  (other summation orders, BN folded into convolutions); measured on MnasNet-B1, AA-MnasNet-A1,
  ResNet-50 and AA-ResNet-50 (32-64 px, default and randomised BN statistics) its difference
  from PyTorch was 0.8-3.4 times PyTorch's own |fp32 - fp64|; 8 leaves a margin of two.
- ``rtol`` = 1e-5 of the largest logit, ~84 float32 ulps (eps 1.19e-7) of it: a scale floor in
  case the measured round-off is by chance tiny; the measured differences were <= 1.5e-6 of it.
- ``atol`` = 1e-5, the float32 ``atol`` of :func:`torch.testing.assert_close`: logits near zero
  have no magnitude to scale with.

A real graph mismatch (a wrong op, a missing bias) changes the logits by a fraction of their
size, orders of magnitude above these bounds; the tests inject one and require the failure.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` at opset 17, the one
that :class:`aanas.ops.attention.AAConv2d` is written for: it detects the export
(``torch.onnx.is_in_onnx_export()``) and takes its traceable "simple" attention path; shape
checks only see the fixed spatial size, so the batch axis stays symbolic. ``dynamo=True``
(``torch.export``) works as well but is ~4x slower here and emits opset 18.

Sources of a model (:func:`load_model`): a search run directory (read by
:class:`~aanas.search.run_dir.RunDirectory`), a weights file in any format
:func:`aanas.train.load_checkpoint` reads, or random initialisation.

Layer L6: imports spec, models, data, cost, train and the run directory; never the search
engines or the CLI. Timing an exported file is :func:`aanas.cost.measure_onnx`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aanas import __version__
from aanas._io import check_writable_file
from aanas.errors import CheckpointError
from aanas.search.run_dir import RunDirectory
from aanas.spec import ArchSpec, decode, encode
from aanas.train import load_checkpoint

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_ROUNDOFF_FACTOR",
    "DEFAULT_RTOL",
    "MIN_OPSET",
    "ExportMismatchError",
    "ExportReport",
    "LoadedModel",
    "load_model",
    "parity_tolerance",
    "real_images",
    "to_onnx",
]

_LOG = logging.getLogger(__name__)

MIN_OPSET = 17  # required minimum; the TorchScript exporter's well-tested opset
# Parity tolerance (module docstring): tol = max(atol, factor * fp32 round-off, rtol * max|logit|)
DEFAULT_ATOL = 1e-5  # absolute floor: torch.testing.assert_close's float32 atol
DEFAULT_RTOL = 1e-5  # of the largest |logit|: ~84 float32 ulps (eps 1.19e-7)
DEFAULT_ROUNDOFF_FACTOR = 8.0  # x PyTorch's own max|fp32 - fp64|; onnxruntime measured 0.8-3.4x
_INPUT = "input"
_OUTPUT = "logits"
_REAL_COUNT = 4  # real images in the parity check
_DIGITS_MAX_SIDE = 64  # digits are upsampled in memory by aanas.data: build at most 64x64 ...
# ... and resize the few images we need, rather than 1797 images at e.g. 224x224 (1 GB).


class ExportMismatchError(RuntimeError):
    """onnxruntime's outputs differ from PyTorch's by more than the tolerance.

    Attributes:
        report: the :class:`ExportReport` of the failed export (``path`` was not written).
    """

    def __init__(self, report: ExportReport, message: str) -> None:
        super().__init__(message)
        self.report = report


@dataclasses.dataclass(frozen=True)
class ExportReport:
    """What :func:`to_onnx` wrote and verified."""

    path: Path
    spec: str  # canonical spec string ("" for a module without .spec)
    opset: int
    input_size: int
    num_classes: int
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    normalization: str  # where mean/std came from
    macs: int
    params: int
    metadata: dict[str, str]
    checked: bool  # parity check ran
    diffs: dict[str, float]  # "random[b=1]", "random[b=3]", "real[b=4]" -> max abs diff
    tolerances: dict[str, float]  # the same keys -> the tolerance that input was held to
    roundoff: dict[str, float]  # the same keys -> PyTorch's max|fp32 - fp64| (nan: no fp64)
    atol: float
    rtol: float
    roundoff_factor: float
    size_bytes: int

    @property
    def max_abs_diff(self) -> float | None:
        """Largest difference over all checked inputs (None without a check)."""
        return max(self.diffs.values()) if self.diffs else None

    @property
    def worst_margin(self) -> float | None:
        """Largest ``diff / tolerance`` over the checked inputs (<= 1 passed; None unchecked)."""
        if not self.diffs:
            return None
        return max(
            d / self.tolerances[k] if self.tolerances[k] > 0 else math.inf
            for k, d in self.diffs.items()
        )

    def summary(self) -> str:
        """A few human-readable lines (the CLI prints them)."""
        if not self.checked:
            parity = "not checked"
        else:
            each = ", ".join(
                f"{k}: {self.diffs[k]:.2g} <= {self.tolerances[k]:.2g}" for k in self.diffs
            )
            parity = (
                f"max abs diff {self.max_abs_diff:.3g}, at most {self.worst_margin:.2g} of the "
                f"tolerance ({each})"
            )
        norm = "n/a" if self.mean is None else f"mean {list(self.mean)}, std {list(self.std or ())}"
        return "\n".join(
            [
                f"wrote   {self.path} ({self.size_bytes / 1e6:.2f} MB, opset {self.opset}, "
                "dynamic batch)",
                f"spec    {self.spec or '(module without .spec)'}",
                f"input   (batch, 3, {self.input_size}, {self.input_size}); {norm} "
                f"[{self.normalization}]",
                f"cost    {self.params / 1e6:.3f} M params, {self.macs / 1e6:.2f} M MACs",
                f"parity  onnxruntime vs PyTorch: {parity}",
            ]
        )


# --- helpers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _eval_cpu(model: nn.Module) -> Iterator[nn.Module]:
    """The model in eval mode on CPU (a copy if it lives elsewhere); restores train mode."""
    param = next(model.parameters(), None)
    target = model
    if param is not None and param.device.type != "cpu":
        target = copy.deepcopy(model).cpu()
    was_training = model.training
    target.eval()
    try:
        yield target
    finally:
        model.train(was_training)


def _spec_of(model: nn.Module) -> ArchSpec | None:
    spec = getattr(model, "spec", None)
    return spec if isinstance(spec, ArchSpec) else None


def _cost(model: nn.Module, spec: ArchSpec | None, input_size: int) -> tuple[int, int]:
    """(params, MACs) at ``input_size``: analytical for a spec, thop hooks otherwise."""
    from aanas.cost import count

    if spec is None:
        c = count(model, input_size)
        return c.params, c.macs
    # Params belong to the built model (attention tables are sized by spec.input_size); MACs
    # to the exported input size.
    params = count(spec).params
    macs = count(spec, input_size).macs if input_size != spec.input_size else count(spec).macs
    return params, macs


def _onnx_outputs(session: Any, x: Tensor) -> np.ndarray:
    """Run the session on one batch (a seam for tests that perturb the ONNX side)."""
    out: np.ndarray = session.run([_OUTPUT], {_INPUT: x.numpy()})[0]
    return out


def _float64_outputs(model: nn.Module) -> Callable[[Tensor], np.ndarray | None]:
    """``x -> model(x)`` in float64 (a copy of the model), or None if it cannot run in float64."""
    try:
        m64: nn.Module | None = copy.deepcopy(model).double().eval()
    except Exception as exc:  # noqa: BLE001 - a custom module may refuse; fall back to rtol
        _LOG.warning("cannot run the model in float64 (%s): parity tolerance without it", exc)
        m64 = None

    def run(x: Tensor) -> np.ndarray | None:
        if m64 is None:
            return None
        try:
            with torch.no_grad():
                out: np.ndarray = m64(x.double()).numpy()
            return out
        except Exception as exc:  # noqa: BLE001 - as above
            _LOG.warning("float64 forward failed (%s): parity tolerance without it", exc)
            return None

    return run


def parity_tolerance(
    ref32: np.ndarray,
    ref64: np.ndarray | None,
    *,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    roundoff_factor: float = DEFAULT_ROUNDOFF_FACTOR,
) -> tuple[float, float]:
    """``(tolerance, roundoff)`` for one input's logits (see the module docstring).

    ``roundoff`` is PyTorch's own ``max|ref32 - ref64|`` (nan when ``ref64`` is None, which
    leaves ``max(atol, rtol * max|ref32|)``). Example: logits up to 2.0 with round-off 3e-7 ->
    ``max(1e-5, 8 * 3e-7, 1e-5 * 2.0) = 2.0e-5``.
    """
    scale = float(np.abs(ref32).max()) if ref32.size else 0.0
    roundoff = (
        float(np.abs(ref32.astype(np.float64) - ref64).max()) if ref64 is not None else math.nan
    )
    terms = [atol, rtol * scale]
    if math.isfinite(roundoff):
        terms.append(roundoff_factor * roundoff)
    return max(terms), roundoff


def _export_graph(model: nn.Module, example: Tensor, path: str, opset: int) -> None:
    with warnings.catch_warnings():
        # Tracer warnings flag the shape checks in forward(); they see only the fixed spatial
        # size (the batch axis is declared dynamic), so they are expected here.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        torch.onnx.export(
            model,
            (example,),
            path,
            dynamo=False,
            opset_version=opset,
            input_names=[_INPUT],
            output_names=[_OUTPUT],
            dynamic_axes={_INPUT: {0: "batch"}, _OUTPUT: {0: "batch"}},
            do_constant_folding=True,
        )


def _metadata(
    spec: ArchSpec | None,
    input_size: int,
    num_classes: int,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    normalization: str,
    params: int,
    macs: int,
    extra: Mapping[str, str] | None,
) -> dict[str, str]:
    meta = {
        "spec": encode(spec) if spec is not None else "",
        "spec_digest": spec.digest() if spec is not None else "",
        "input_size": str(input_size),
        "input_shape": f"[batch, 3, {input_size}, {input_size}]",
        "input_layout": "NCHW RGB float32: pixels scaled to [0, 1], then (x - mean) / std",
        "mean": json.dumps(list(mean)) if mean is not None else "",
        "std": json.dumps(list(std)) if std is not None else "",
        "normalization": normalization,
        "num_classes": str(num_classes),
        "params": str(params),
        "macs": str(macs),
        "producer": f"aanas {__version__}",
    }
    for key, value in (extra or {}).items():
        if not isinstance(value, str):
            raise ValueError(f"metadata[{key!r}]: values must be strings, got {value!r}")
        meta[key] = value
    return meta


# --- the export -------------------------------------------------------------------------------


def to_onnx(
    model: nn.Module,
    path: str | os.PathLike[str],
    input_size: int | None = None,
    opset: int = MIN_OPSET,
    check: bool = True,
    *,
    real_inputs: Tensor | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    normalization: str | None = None,
    atol: float = DEFAULT_ATOL,
    rtol: float = DEFAULT_RTOL,
    roundoff_factor: float = DEFAULT_ROUNDOFF_FACTOR,
    batch_sizes: Sequence[int] = (1, 3),
    metadata: Mapping[str, str] | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` (atomically) and verify it with onnxruntime.

    The graph has a dynamic batch axis (input ``"input"``: ``(batch, 3, S, S)``, output
    ``"logits"``); ``onnx.checker.check_model`` always runs. With ``check=True`` onnxruntime
    (CPU) and PyTorch (eval mode, float32) run the same inputs: seeded random batches of every
    size in ``batch_sizes`` and, when given, ``real_inputs``. On each, the largest absolute
    difference of the logits must be within ``max(atol, roundoff_factor * r, rtol * max|logit|)``
    where ``r`` is PyTorch's own float32 round-off on that input (its max distance from the same
    model run in float64; see the module docstring for the constants). Only then is the file
    moved to ``path``.

    Args:
        model: a classifier; its ``.spec`` (an ArchSpec) goes into the metadata when present.
        path: destination ``.onnx`` file (its folder is created; checked before any work).
        input_size: square input side; default ``model.spec.input_size``. Attention layers
            accept sizes up to the spec's own.
        opset: ONNX opset, at least 17.
        check: run the onnxruntime parity check.
        real_inputs: ``(N, 3, S, S)`` normalised images for the check (see :func:`real_images`).
        mean: per-channel normalization mean the model expects (metadata only).
        std: per-channel standard deviation (metadata only).
        normalization: where mean/std come from, for the metadata (e.g. "checkpoint recipe").
        atol: absolute floor of the tolerance.
        rtol: tolerance per unit of the largest |logit| of the input.
        roundoff_factor: tolerance per unit of PyTorch's own float32-vs-float64 round-off.
        batch_sizes: random batch sizes run through the one exported graph.
        metadata: extra string ``metadata_props``.
        seed: seed of the random inputs.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportMismatchError: onnxruntime differs from PyTorch by more than the tolerance; the
            message names the max diff and each term of the tolerance on that input.
        OutputPathError: ``path`` is a folder or cannot be written.
        ValueError: bad ``opset``, ``input_size``, tolerances or inputs.
    """
    import onnx
    import onnxruntime as ort

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    for label, bound in (("atol", atol), ("rtol", rtol), ("roundoff_factor", roundoff_factor)):
        if not (isinstance(bound, int | float) and math.isfinite(bound) and bound >= 0):
            raise ValueError(f"{label} must be a finite number >= 0, got {bound!r}")
    spec = _spec_of(model)
    if input_size is None:
        if spec is None:
            raise ValueError("input_size is required for a module without a .spec")
        input_size = spec.input_size
    if isinstance(input_size, bool) or not isinstance(input_size, int) or input_size < 1:
        raise ValueError(f"input_size must be an integer >= 1, got {input_size!r}")
    if spec is not None and input_size > spec.input_size and _has_attention(model):
        raise ValueError(
            f"input_size {input_size} exceeds the spec's {spec.input_size}: its attention "
            "tables only cover that size; build the model with create_model(..., "
            f"input_size={input_size})"
        )
    if not batch_sizes or any(int(b) < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive integers, got {list(batch_sizes)}")
    shape = (3, input_size, input_size)
    if real_inputs is not None and tuple(real_inputs.shape[1:]) != shape:
        raise ValueError(
            f"real_inputs must be (N, {', '.join(map(str, shape))}), got {tuple(real_inputs.shape)}"
        )
    if (mean is None) != (std is None):
        raise ValueError("mean and std must be given together")

    dest = check_writable_file(path, "path")
    dest.parent.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    inputs = {f"random[b={b}]": torch.randn(int(b), *shape, generator=gen) for b in batch_sizes}
    if real_inputs is not None:
        inputs[f"real[b={real_inputs.shape[0]}]"] = real_inputs.detach().float().cpu()

    with (
        _eval_cpu(model) as net,
        tempfile.TemporaryDirectory(prefix=f".{dest.name}.", dir=dest.parent) as tmp,
    ):
        raw = os.path.join(tmp, "graph.onnx")
        example = torch.randn(2, *shape, generator=gen)  # batch 2: not a special size for tracing
        with torch.no_grad():
            _export_graph(net, example, raw, opset)
            num_classes = int(net(example[:1]).shape[1])
        params, macs = _cost(net, spec, input_size)
        meta = _metadata(
            spec,
            input_size,
            num_classes,
            mean,
            std,
            normalization or ("given" if mean is not None else "unknown"),
            params,
            macs,
            metadata,
        )
        proto = onnx.load(raw)
        del proto.metadata_props[:]
        for key, value in meta.items():
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value
        proto.doc_string = f"aanas {__version__}: {meta['spec'] or type(model).__name__}"
        final = os.path.join(tmp, "model.onnx")
        onnx.save(proto, final)
        onnx.checker.check_model(final, full_check=True)
        opset_used = max(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))

        diffs: dict[str, float] = {}
        tolerances: dict[str, float] = {}
        roundoff: dict[str, float] = {}
        failure = ""
        if check:
            float64 = _float64_outputs(net)
            options = ort.SessionOptions()
            options.log_severity_level = 3
            session = ort.InferenceSession(final, options, providers=["CPUExecutionProvider"])
            batch_dim = session.get_inputs()[0].shape[0]
            if isinstance(batch_dim, int):
                raise AssertionError(f"exported batch axis is static ({batch_dim})")
            for name, x in inputs.items():
                with torch.no_grad():
                    ref = net(x).numpy()
                got = _onnx_outputs(session, x)
                if got.shape != ref.shape:
                    diffs[name] = float("inf")
                    tolerances[name] = roundoff[name] = math.nan
                    failure = failure or f"{name}: output shape {got.shape} != {ref.shape}"
                    continue
                diffs[name] = float(np.abs(got.astype(np.float64) - ref).max())
                tolerances[name], roundoff[name] = parity_tolerance(
                    ref, float64(x), atol=atol, rtol=rtol, roundoff_factor=roundoff_factor
                )
                if not diffs[name] <= tolerances[name] and not failure:
                    failure = (
                        f"{name}: max abs diff {diffs[name]:.3g} > tolerance "
                        f"{tolerances[name]:.3g} = max(atol {atol:g}, {roundoff_factor:g} x "
                        f"PyTorch's own float32 round-off {roundoff[name]:.3g}, rtol {rtol:g} x "
                        f"max|logit| {np.abs(ref).max():.3g})"
                    )
        report = ExportReport(
            path=dest,
            spec=meta["spec"],
            opset=opset_used,
            input_size=input_size,
            num_classes=num_classes,
            mean=tuple(float(v) for v in mean) if mean is not None else None,
            std=tuple(float(v) for v in std) if std is not None else None,
            normalization=meta["normalization"],
            macs=macs,
            params=params,
            metadata=meta,
            checked=check,
            diffs=diffs,
            tolerances=tolerances,
            roundoff=roundoff,
            atol=atol,
            rtol=rtol,
            roundoff_factor=roundoff_factor,
            size_bytes=os.path.getsize(final),
        )
        if failure:
            raise ExportMismatchError(
                report,
                f"onnxruntime output differs from PyTorch for {meta['spec'] or 'the model'}: "
                f"{failure}; all inputs: "
                + ", ".join(f"{k} {v:.3g}" for k, v in diffs.items())
                + f". Nothing was written to {dest}",
            )
        os.replace(final, dest)
    _LOG.info("exported %s (opset %d, max abs diff %s)", dest, opset_used, report.max_abs_diff)
    return report


def _has_attention(model: nn.Module) -> bool:
    from aanas.ops.attention import AAConv2d

    return any(isinstance(m, AAConv2d) and m.dv > 0 for m in model.modules())


# --- real images ------------------------------------------------------------------------------


def real_images(
    data: str = "digits",
    input_size: int = 32,
    count: int = _REAL_COUNT,
    *,
    root: str | Path | None = None,
) -> tuple[Tensor, tuple[float, ...], tuple[float, ...]]:
    """The first ``count`` TEST images of ``data`` via :func:`aanas.data.build_data`.

    Images are normalised with the data set's own mean/std, which are returned too. ``digits``
    is built at ``min(input_size, 64)`` and the few images are resized bilinearly, because
    ``aanas.data`` upsamples the whole set in memory.

    Returns:
        ``(images (count, 3, S, S), mean, std)``.
    """
    import torch.nn.functional as F

    from aanas.data import build_data

    build_size = min(input_size, _DIGITS_MAX_SIDE) if data == "digits" else input_size
    bundle = build_data(
        data, root=root, input_size=build_size, batch_size=count, val_fraction=0.0, augment=False
    )
    images, _ = next(iter(bundle.test))
    if build_size != input_size:
        images = F.interpolate(images, size=(input_size, input_size), mode="bilinear")
    return images.float(), tuple(bundle.mean), tuple(bundle.std)


# --- loading models ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A model ready to export and what is known about how it was trained."""

    model: nn.Module
    spec: ArchSpec  # the spec it was built from (== model.spec)
    source: str  # "run <dir>", "checkpoint <path> (aanas train)", "random init", ...
    data: str | None  # data set named by the checkpoint recipe / run.json
    data_root: str | None
    trained: bool


def _classifier_outputs(state: Mapping[str, Tensor]) -> int | None:
    """Outputs of the classifier (``classifier.weight`` / ``fc.weight``) of a state_dict."""
    for key in ("classifier.weight", "fc.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def _load_state(model: nn.Module, state: Mapping[str, Tensor], where: Path) -> None:
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:600]
        raise CheckpointError(
            f"{where}: weights do not fit {encode(model.spec)}: {first} (wrong --model, "  # type: ignore[arg-type]
            "--input-size or --num-classes?)"
        ) from None


def _decode_from(spec: str, where: Path) -> ArchSpec:
    """The spec string a weights file names, as an ArchSpec (errors name the file)."""
    try:
        return decode(spec)
    except ValueError as exc:
        raise CheckpointError(f"{where}: its spec does not decode: {exc}") from None


def _build(spec: ArchSpec) -> nn.Module:
    from aanas.models import create_model

    return create_model(spec)


def _same_arch(a: ArchSpec, b: ArchSpec) -> bool:
    """Equal up to what ``create_model`` overrides (classes, input size, width)."""
    keep = {"num_classes": b.num_classes, "input_size": b.input_size, "width": b.width}
    return dataclasses.replace(a, **keep) == b  # type: ignore[arg-type]


def _resolve_name(name: str, num_classes: int | None, input_size: int | None) -> ArchSpec:
    from aanas.models import create_model

    spec: ArchSpec = create_model(name, num_classes=num_classes, input_size=input_size).spec
    return spec


def load_model(
    run_dir: str | Path | None = None,
    *,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
) -> LoadedModel:
    """Build the model to export from a run directory, a checkpoint or a name.

    - ``run_dir``: the best trial's spec and weights as :class:`RunDirectory` reads them;
      ``run.json`` names the data set.
    - ``model`` + ``checkpoint``: any file :func:`aanas.train.load_checkpoint` reads (for an
      ``aanas train`` checkpoint, its EMA weights when the recipe used EMA, since those are
      what it evaluated). A checkpoint's spec wins over ``model``'s classes and input size, but
      must be the same architecture.
    - ``model`` alone: random initialisation, with a warning.

    Raises:
        CheckpointError: an unreadable checkpoint, or weights that do not fit.
        ValueError: conflicting arguments or specs.
        FileNotFoundError: a missing run directory or best trial.
    """
    if (run_dir is None) == (model is None and checkpoint is None):
        raise ValueError("give either a run directory or --model/--checkpoint, not both or neither")
    if run_dir is not None:
        run = RunDirectory(run_dir)
        spec = decode(run.read_best_spec())
        try:
            weights = run.read_best_weights()
        except FileNotFoundError as exc:
            raise FileNotFoundError(
                f"{exc}. To export the architecture with random weights use: aanas export "
                f'--model "{encode(spec)}"'
            ) from None
        net = _build(spec)
        _load_state(net, weights.state_dict, weights.path)
        data, data_root = run.training_data()
        return LoadedModel(net, spec, f"run {run.path}", data, data_root, True)
    ckpt = load_checkpoint(checkpoint) if checkpoint is not None else None
    ckpt_spec = _decode_from(ckpt.spec, ckpt.path) if ckpt is not None and ckpt.spec else None
    if ckpt_spec is not None:
        if model is not None:
            named = _resolve_name(model, ckpt_spec.num_classes, ckpt_spec.input_size)
            if not _same_arch(named, ckpt_spec):
                raise ValueError(
                    f"--model {model!r} is not the checkpoint's architecture {encode(ckpt_spec)}"
                )
        if input_size is not None and input_size != ckpt_spec.input_size:
            ckpt_spec = dataclasses.replace(ckpt_spec, input_size=input_size).validate()
        spec = ckpt_spec
    else:
        if model is None:
            raise ValueError(f"{checkpoint}: a bare state_dict needs --model NAME_OR_SPEC")
        if num_classes is None and ckpt is not None:
            num_classes = _classifier_outputs(ckpt.state_dict)
        spec = _resolve_name(model, num_classes, input_size)
    net = _build(spec)
    if ckpt is not None:
        _load_state(net, ckpt.state_dict, ckpt.path)
        data, data_root = ckpt.recipe.get("data"), ckpt.recipe.get("data_root")
        source = f"checkpoint {ckpt.path} ({ckpt.description})"
        return LoadedModel(net, spec, source, data, data_root, True)
    _LOG.warning(
        "exporting %s with RANDOM weights (no --checkpoint): fine for testing the pipeline, "
        "useless for inference",
        model,
    )
    return LoadedModel(net, spec, "random init", None, None, False)
