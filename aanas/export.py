"""ONNX export of aanas models, with an onnxruntime-vs-PyTorch parity check.

:func:`to_onnx` writes a model (any classifier with a ``.spec``, including the
attention-augmented convolutions of Bello et al., arXiv:1904.09925) as ONNX with a dynamic
batch axis, runs ``onnx.checker``, verifies onnxruntime against PyTorch on random and real
images and only then moves the file into place (temporary file + :func:`os.replace`), so a
failed export never leaves a model behind. ``metadata_props`` carry the canonical spec string,
input size, normalization, MACs and parameters.

Exporter: the TorchScript-based ``torch.onnx.export(..., dynamo=False)`` at opset 17, the one
that :class:`aanas.ops.attention.AAConv2d` is written for: it detects the export
(``torch.onnx.is_in_onnx_export()``) and takes its traceable "simple" attention path; shape
checks only see the fixed spatial size, so the batch axis stays symbolic. ``dynamo=True``
(``torch.export``) works as well but is ~4x slower here and emits opset 18.

Sources of a model (:func:`load_model`): a search run directory (``best/spec.txt`` +
``best/model.pt``), a ``aanas train`` checkpoint, a ``{"spec", "state_dict"}`` file, a bare
state_dict, or random initialisation.

Layer L6: imports spec, models, data, cost and train; never the search engines or the CLI.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from aanas import __version__
from aanas.spec import ArchSpec, decode, encode

__all__ = [
    "DEFAULT_ATOL",
    "MIN_OPSET",
    "ExportMismatchError",
    "ExportReport",
    "LoadedModel",
    "export_cli",
    "load_model",
    "measure_latency",
    "real_images",
    "to_onnx",
]

_LOG = logging.getLogger(__name__)

MIN_OPSET = 17  # required minimum; the TorchScript exporter's well-tested opset
DEFAULT_ATOL = 1e-4  # max abs logit difference onnxruntime vs PyTorch (float32)
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
    atol: float
    size_bytes: int

    @property
    def max_abs_diff(self) -> float | None:
        """Largest difference over all checked inputs (None without a check)."""
        return max(self.diffs.values()) if self.diffs else None

    def summary(self) -> str:
        """A few human-readable lines (the CLI prints them)."""
        parity = (
            "not checked"
            if not self.checked
            else f"max abs diff {self.max_abs_diff:.3g} <= {self.atol:g} ("
            + ", ".join(f"{k}: {v:.2g}" for k, v in self.diffs.items())
            + ")"
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


def _float64_roundoff(model: nn.Module, x: Tensor, ref: np.ndarray) -> float:
    """PyTorch's own float32 error on ``x``: max |fp32 - fp64| (explains borderline failures)."""
    try:
        m64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            ref64 = m64(x.double()).numpy()
        return float(np.abs(ref.astype(np.float64) - ref64).max())
    except Exception:  # noqa: BLE001 - a diagnostic only; never mask the real error
        return float("nan")


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
    batch_sizes: Sequence[int] = (1, 3),
    metadata: Mapping[str, str] | None = None,
    seed: int = 0,
) -> ExportReport:
    """Export ``model`` to ONNX at ``path`` (atomically) and verify it with onnxruntime.

    The graph has a dynamic batch axis (input ``"input"``: ``(batch, 3, S, S)``, output
    ``"logits"``); ``onnx.checker.check_model`` always runs. With ``check=True`` onnxruntime
    (CPU) and PyTorch (eval mode, float32) run the same inputs: seeded random batches of every
    size in ``batch_sizes`` and, when given, ``real_inputs``; the largest absolute difference
    must be ``<= atol``. Only then is the file moved to ``path``.

    Args:
        model: a classifier; its ``.spec`` (an ArchSpec) goes into the metadata when present.
        path: destination ``.onnx`` file (its folder is created).
        input_size: square input side; default ``model.spec.input_size``. Attention layers
            accept sizes up to the spec's own.
        opset: ONNX opset, at least 17.
        check: run the onnxruntime parity check.
        real_inputs: ``(N, 3, S, S)`` normalised images for the check (see :func:`real_images`).
        mean: per-channel normalization mean the model expects (metadata only).
        std: per-channel standard deviation (metadata only).
        normalization: where mean/std come from, for the metadata (e.g. "checkpoint recipe").
        atol: largest allowed absolute difference of the logits.
        batch_sizes: random batch sizes run through the one exported graph.
        metadata: extra string ``metadata_props``.
        seed: seed of the random inputs.

    Returns:
        An :class:`ExportReport`.

    Raises:
        ExportMismatchError: onnxruntime differs from PyTorch by more than ``atol``; the message
            names the max diff (and PyTorch's own float32-vs-float64 round-off on that input).
        ValueError: bad ``opset``, ``input_size``, ``atol`` or inputs.
    """
    import onnx
    import onnxruntime as ort

    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ValueError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    if not atol >= 0:
        raise ValueError(f"atol must be >= 0, got {atol!r}")
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

    dest = Path(path)
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
        failure = ""
        if check:
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
                    failure = failure or f"{name}: output shape {got.shape} != {ref.shape}"
                    continue
                diffs[name] = float(np.abs(got.astype(np.float64) - ref).max())
                if not diffs[name] <= atol and not failure:
                    floor = _float64_roundoff(net, x, ref)
                    failure = (
                        f"{name}: max abs diff {diffs[name]:.3g} > atol {atol:g} "
                        f"(logits up to {np.abs(ref).max():.3g}; PyTorch's own float32 round-off "
                        f"vs float64 on this input: {floor:.3g})"
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
            atol=atol,
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
    source: str  # "run <dir>", "checkpoint <path> (aanas train)", "random init", ...
    data: str | None  # data set named by the checkpoint recipe / run.json
    data_root: str | None
    trained: bool


def _strip_prefix(state: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in state.items()}


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items())
    )


def _classifier_outputs(state: Mapping[str, Tensor]) -> int | None:
    """Outputs of the classifier (``classifier.weight`` / ``fc.weight``) of a state_dict."""
    for key in ("classifier.weight", "fc.weight"):
        if key in state and state[key].dim() == 2:
            return int(state[key].shape[0])
    return None


def _load_state(model: nn.Module, state: Mapping[str, Tensor], where: str) -> None:
    try:
        model.load_state_dict(dict(state), strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).split())[:600]
        raise ValueError(
            f"{where}: weights do not fit {encode(model.spec)}: {first} (wrong --model, "  # type: ignore[arg-type]
            "--input-size or --num-classes?)"
        ) from None


def _build(spec: ArchSpec) -> nn.Module:
    from aanas.models import create_model

    return create_model(spec)


def _same_arch(a: ArchSpec, b: ArchSpec) -> bool:
    """Equal up to what ``create_model`` overrides (classes, input size, width)."""
    keep = {"num_classes": b.num_classes, "input_size": b.input_size, "width": b.width}
    return dataclasses.replace(a, **keep) == b  # type: ignore[arg-type]


def _resolve_name(
    name: str, num_classes: int | None, input_size: int | None
) -> tuple[ArchSpec, str]:
    from aanas.models import create_model

    model = create_model(name, num_classes=num_classes, input_size=input_size)
    return model.spec, name  # type: ignore[return-value]


def load_model(
    run_dir: str | Path | None = None,
    *,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    num_classes: int | None = None,
    input_size: int | None = None,
) -> LoadedModel:
    """Build the model to export from a run directory, a checkpoint or a name.

    - ``run_dir``: ``best/spec.txt`` and ``best/model.pt`` (``{"spec", "state_dict"}``) as the
      search writes them; the two spec strings must agree. ``run.json`` names the data set.
    - ``model`` + ``checkpoint``: an ``aanas train`` checkpoint (its EMA weights when the
      recipe used EMA, since those are what it evaluated), a ``{"spec", "state_dict"}`` file or
      a bare state_dict. A checkpoint's spec wins over ``model``'s classes and input size, but
      must be the same architecture.
    - ``model`` alone: random initialisation, with a warning.

    Raises:
        ValueError: conflicting arguments, specs or weights.
        FileNotFoundError: missing files.
    """
    if (run_dir is None) == (model is None and checkpoint is None):
        raise ValueError("give either a run directory or --model/--checkpoint, not both or neither")
    if run_dir is not None:
        return _load_run(Path(run_dir))
    ckpt_spec: ArchSpec | None = None
    state: Mapping[str, Tensor] | None = None
    data = data_root = None
    kind = ""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise FileNotFoundError(f"checkpoint not found: {path}")
        obj = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(obj, Mapping) and "version" in obj and "model" in obj:
            from aanas.train import load_checkpoint

            obj = load_checkpoint(path)  # checks the checkpoint version
            recipe = obj.get("recipe") or {}
            state = obj["model"]
            if obj.get("ema") is not None and float(recipe.get("ema_decay", 0.0)) > 0:
                ema = _strip_prefix(obj["ema"], "module.")
                ema.pop("n_averaged", None)
                state = ema
                kind = " (EMA weights)"
            ckpt_spec = decode(obj["spec"]) if obj.get("spec") else None
            data, data_root = recipe.get("data"), recipe.get("data_root")
            kind = f"aanas train{kind}"
        elif isinstance(obj, Mapping) and "state_dict" in obj:
            state = obj["state_dict"]
            ckpt_spec = decode(obj["spec"]) if obj.get("spec") else None
            kind = "spec + state_dict"
        elif _is_state_dict(obj):
            state = obj
            kind = "bare state_dict"
        else:
            raise ValueError(
                f"{path}: not an aanas train checkpoint, a {{'spec', 'state_dict'}} dict or a "
                "state_dict"
            )
    if ckpt_spec is not None:
        if model is not None:
            named, _ = _resolve_name(model, ckpt_spec.num_classes, ckpt_spec.input_size)
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
        if num_classes is None and state is not None:
            num_classes = _classifier_outputs(state)
        spec, _ = _resolve_name(model, num_classes, input_size)
    net = _build(spec)
    if state is not None:
        _load_state(net, state, str(checkpoint))
        return LoadedModel(net, f"checkpoint {checkpoint} ({kind})", data, data_root, True)
    _LOG.warning(
        "exporting %s with RANDOM weights (no --checkpoint): fine for testing the pipeline, "
        "useless for inference",
        model,
    )
    return LoadedModel(net, "random init", None, None, False)


def _load_run(run: Path) -> LoadedModel:
    if not run.is_dir():
        raise FileNotFoundError(f"run directory not found: {run}")
    spec_txt = run / "best" / "spec.txt"
    weights = run / "best" / "model.pt"
    if not spec_txt.is_file():
        raise FileNotFoundError(f"{spec_txt} not found: no finished trial in {run} yet?")
    spec = decode(spec_txt.read_text(encoding="utf-8").strip())
    if not weights.is_file():
        raise FileNotFoundError(
            f"{weights} not found: the search stored no weights. To export the architecture "
            f'with random weights use: aanas export --model "{encode(spec)}"'
        )
    obj = torch.load(weights, map_location="cpu", weights_only=True)
    if not (isinstance(obj, Mapping) and "state_dict" in obj and "spec" in obj):
        raise ValueError(f"{weights}: expected a {{'spec', 'state_dict'}} dict")
    if encode(decode(obj["spec"])) != encode(spec):
        raise ValueError(
            f"{weights} holds spec {obj['spec']!r}, but {spec_txt} says {encode(spec)!r}"
        )
    net = _build(spec)
    _load_state(net, obj["state_dict"], str(weights))
    data = data_root = None
    meta_path = run / "run.json"
    if meta_path.is_file():
        try:
            recipe = json.loads(meta_path.read_text(encoding="utf-8")).get("recipe", {})
            data, data_root = recipe.get("data"), recipe.get("data_root")
        except (ValueError, AttributeError):
            _LOG.warning("%s is unreadable; normalization falls back to the defaults", meta_path)
    return LoadedModel(net, f"run {run}", data, data_root, True)


# --- latency ------------------------------------------------------------------------------------


def measure_latency(
    path: str | os.PathLike[str],
    model: nn.Module,
    input_size: int,
    *,
    threads: int = 1,
    repeats: int = 50,
    warmup: int = 10,
) -> dict[str, dict[str, float]]:
    """Batch-1 latency of the exported file (onnxruntime) beside the PyTorch model.

    PyTorch goes through :func:`aanas.cost.measure` (no cache); the ONNX file is timed the same
    way (``perf_counter`` around each run, median and interquartile range).

    Returns:
        ``{"torch": {...}, "onnxruntime": {...}}`` with ``median_ms``, ``iqr_ms``, ``repeats``.
    """
    import onnxruntime as ort

    from aanas.cost import measure

    res = measure(
        model,
        input_size,
        backend="torch",
        threads=threads,
        repeats=repeats,
        warmup=warmup,
        cache=False,
    )
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feed = {
        _INPUT: np.random.default_rng(0).standard_normal(
            (1, 3, input_size, input_size), dtype=np.float32
        )
    }
    for _ in range(warmup):
        session.run(None, feed)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        session.run(None, feed)
        times.append((time.perf_counter() - t) * 1e3)
    q = statistics.quantiles(times, n=4) if len(times) > 1 else [times[0]] * 3
    return {
        "torch": {"median_ms": res.median_ms, "iqr_ms": res.iqr_ms, "repeats": res.repeats},
        "onnxruntime": {
            "median_ms": statistics.median(times),
            "iqr_ms": q[2] - q[0],
            "repeats": repeats,
        },
    }


# --- the CLI's whole job ----------------------------------------------------------------------


def _default_out(run_dir: str | Path | None, model: str | None, spec: ArchSpec) -> Path:
    if run_dir is not None:
        return Path(run_dir) / "best" / "model.onnx"
    name = model if model is not None and ":" not in model else spec.digest()
    return Path(f"{name}.onnx")


def export_cli(
    *,
    run_dir: str | Path | None = None,
    model: str | None = None,
    checkpoint: str | Path | None = None,
    out: str | Path | None = None,
    input_size: int | None = None,
    num_classes: int | None = None,
    opset: int = MIN_OPSET,
    data: str | None = None,
    atol: float = DEFAULT_ATOL,
    check: bool = True,
    check_latency: bool = False,
) -> tuple[ExportReport, dict[str, dict[str, float]]]:
    """``aanas export``: load (:func:`load_model`), export and verify (:func:`to_onnx`).

    Real images for the check come from ``data``, else the data set the checkpoint/run was
    trained on (when it is available locally), else digits. Normalization metadata: the
    training data set's mean/std when known, else that of the data used for the check.

    Returns:
        The report and, with ``check_latency``, the latency dict of :func:`measure_latency`.
    """
    loaded = load_model(
        run_dir, model=model, checkpoint=checkpoint, num_classes=num_classes, input_size=input_size
    )
    spec = loaded.model.spec  # type: ignore[union-attr]
    size = input_size or spec.input_size
    # Real images: --data, else the training data (if present here), else digits.
    names = [data] if data else [n for n in (loaded.data, "digits") if n]
    real = mean = std = None
    used = ""
    for name in names:
        try:
            root = loaded.data_root if name == loaded.data else None
            real, mean, std = real_images(name, size, root=root)
            used = name
            break
        except (FileNotFoundError, ValueError) as exc:
            if name == data:
                raise
            _LOG.warning("cannot load data %r (%s); trying the next", name, exc)
    # Normalization: the training data's statistics when known, else the check data's.
    source = f"{used} (training data)" if used and used == loaded.data else f"{used} (default)"
    if loaded.data and used != loaded.data:
        try:
            _, mean, std = real_images(loaded.data, size, 1, root=loaded.data_root)
            source = f"{loaded.data} (training data)"
        except (FileNotFoundError, ValueError) as exc:
            _LOG.warning(
                "training data %r unavailable (%s): normalization metadata from %r",
                loaded.data,
                exc,
                used,
            )
    dest = Path(out) if out is not None else _default_out(run_dir, model, spec)
    report = to_onnx(
        loaded.model,
        dest,
        input_size=size,
        opset=opset,
        check=check,
        real_inputs=real if check else None,
        mean=mean,
        std=std,
        normalization=source,
        atol=atol,
        metadata={"source": loaded.source, "trained": str(loaded.trained).lower()},
    )
    latency = measure_latency(dest, loaded.model, size) if check_latency else {}
    return report, latency
