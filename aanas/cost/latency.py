"""Measured and predicted latency of aanas networks.

Two parts:

* :func:`measure` times one network (a module or an :class:`~aanas.spec.ArchSpec`) on PyTorch or
  onnxruntime with a fixed thread count: warm-up, many timed repeats, median and interquartile
  range. Results of specs are cached on disk, keyed by the spec digest, the measurement settings
  and a fingerprint of the machine (CPU model, torch and onnxruntime versions), so a search never
  measures the same network twice on the same machine.
* :class:`LatencyTable` predicts a network's latency from a per-block lookup table, the approach
  of MnasNet (Tan et al., arXiv:1807.11626), FBNet (Wu et al., arXiv:1812.03443) and
  Once-for-All (Cai et al., arXiv:1908.09791): every distinct block configuration (its
  :class:`~aanas.spec.ResolvedBlock` fields without the name) is measured once at its input
  resolution, and a network costs the sum of its stem, blocks and head plus overheads per block
  kind and an intercept, fitted by least squares on measured whole networks. Parts and whole
  networks are timed together, in interleaved rounds (:func:`time_interleaved`), so a slow phase
  of a shared machine is spread over all of them; every timed run follows an untimed priming
  run and an L1/L2 eviction, so a part finds its weights where they are inside a network that
  runs repeatedly (in the last-level cache, not in L2). onnxruntime with one thread is the
  reference backend; eager PyTorch is an option.

Latency here is the time of one forward pass in eval mode under ``torch.no_grad()``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import gc
import hashlib
import io
import json
import logging
import math
import os
import platform
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import nn

from aanas._io import atomic_open
from aanas.errors import AanasError
from aanas.spec import ArchSpec, ResolvedArch, ResolvedBlock, resolve

__all__ = [
    "BACKENDS",
    "CLOCKS",
    "STATS",
    "LatencyResult",
    "LatencyTable",
    "block_kind",
    "block_signature",
    "cache_dir",
    "machine_fingerprint",
    "measure",
    "measure_onnx",
    "robust_ms",
    "time_interleaved",
]

_LOG = logging.getLogger(__name__)

BACKENDS: tuple[str, ...] = ("torch", "onnxruntime")
# Default repeats/warm-up: 1-thread CPU forwards of the small networks a search measures take
# 1-50 ms, so 50 repeats keep one measurement under a few seconds while the median over 50 is
# stable to a few percent on a quiet machine.
_DEFAULT_REPEATS = 50
_DEFAULT_WARMUP = 10
# Bump when the cached record's layout or the timing method changes (2: onnxruntime runs use
# io-binding, no numpy copies in or out).
_CACHE_VERSION = 2
_ONNX_OPSET = 17


# --- results and machine identity -------------------------------------------------------------


@dataclass(frozen=True)
class LatencyResult:
    """One latency measurement: summary statistics of ``repeats`` timed forward passes."""

    median_ms: float
    iqr_ms: float  # 75th minus 25th percentile
    mean_ms: float
    min_ms: float
    repeats: int
    backend: str
    threads: int
    batch: int
    device: str
    input_size: int
    cached: bool = False  # True when read from the on-disk cache

    def to_dict(self) -> dict[str, Any]:
        """Plain-dict form (the cache record)."""
        return dataclasses.asdict(self)


def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo (Linux), else ``platform.processor()``."""
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def _ort_version() -> str:
    try:
        import onnxruntime

        return str(onnxruntime.__version__)
    except ImportError:  # pragma: no cover - a required dependency, but keep torch-only use alive
        return "none"


def machine_fingerprint(device: str = "cpu") -> dict[str, str]:
    """What makes a latency number comparable: CPU (or GPU) model and library versions."""
    fp = {
        "cpu": _cpu_model(),
        "torch": str(torch.__version__),
        "onnxruntime": _ort_version(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        fp["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return fp


def _fingerprint_digest(fp: dict[str, str]) -> str:
    """Stable 16-hex-digit hash of a fingerprint dict."""
    return hashlib.sha256(json.dumps(fp, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The latency cache directory: ``path``, else ``$AANAS_CACHE_DIR``, else
    ``~/.cache/aanas/latency``."""
    if path is not None:
        return Path(path)
    env = os.environ.get("AANAS_CACHE_DIR")
    if env:
        return Path(env)
    return Path.home() / ".cache" / "aanas" / "latency"


# --- timing -------------------------------------------------------------------------------------


def _time_runs(
    run: Callable[[], object],
    repeats: int,
    warmup: int,
    sync: bool,
    before: Callable[[], object] | None = None,
    clock: Callable[[], float] = time.perf_counter,
) -> list[float]:
    """Seconds of each of ``repeats`` calls of ``run`` after ``warmup`` untimed calls;
    ``before`` (untimed) runs ahead of every timed call; ``clock`` reads the time."""
    for _ in range(warmup):
        run()
    if sync:
        torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        if before is not None:
            before()
            if sync:
                torch.cuda.synchronize()
        start = clock()
        run()
        if sync:
            torch.cuda.synchronize()
        times.append(clock() - start)
    return times


def _summarize(times_s: Sequence[float], **meta: Any) -> LatencyResult:
    """Median / IQR / mean / min in milliseconds."""
    ms = np.asarray(times_s, dtype=np.float64) * 1e3
    q1, q3 = np.percentile(ms, [25, 75])
    return LatencyResult(
        median_ms=float(np.median(ms)),
        iqr_ms=float(q3 - q1),
        mean_ms=float(ms.mean()),
        min_ms=float(ms.min()),
        repeats=len(ms),
        **meta,
    )


@contextlib.contextmanager
def _torch_threads(threads: int) -> Iterator[None]:
    """Set torch's intra-op thread count for the block, then restore it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _time_module(
    model: nn.Module,
    example: torch.Tensor,
    *,
    backend: str,
    threads: int,
    device: str,
    repeats: int,
    warmup: int,
    before: Callable[[], object] | None = None,
) -> list[float]:
    """Per-run seconds of ``model(example)`` on the given backend (model already in eval)."""
    if backend == "torch":
        model = model.to(device)
        x = example.to(device)
        with _torch_threads(threads), torch.no_grad():
            return _time_runs(
                lambda: model(x), repeats, warmup, sync=device.startswith("cuda"), before=before
            )
    run = _runner(model, example, backend, threads, device)
    return _time_runs(run, repeats, warmup, sync=False, before=before)


def _onnx_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """``model`` exported (TorchScript exporter, opset 17) to an in-memory ONNX file."""
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model.cpu(),
            (example.cpu(),),
            buf,
            opset_version=_ONNX_OPSET,
            input_names=["input"],
            output_names=["output"],
            dynamo=False,
        )
    return buf.getvalue()


def _ort_session(path: str | os.PathLike[str] | bytes, threads: int) -> Any:
    """A CPU ``InferenceSession`` (of a file or ONNX bytes) with ``threads`` intra-op threads
    and no inter-op pool."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    model = path if isinstance(path, bytes) else str(path)
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _check_settings(backend: str, threads: int, batch: int, repeats: int, warmup: int) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    for name, value, low in (
        ("threads", threads, 1),
        ("batch", batch, 1),
        ("repeats", repeats, 1),
        ("warmup", warmup, 0),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")


# --- the cache ----------------------------------------------------------------------------------


def _cache_key(
    digest: str, input_size: int, backend: str, threads: int, batch: int, device: str
) -> tuple[str, dict[str, Any]]:
    """File name and full key record of one measurement."""
    fp = machine_fingerprint(device)
    key = {
        "version": _CACHE_VERSION,
        "spec": digest,
        "input_size": input_size,
        "backend": backend,
        "threads": threads,
        "batch": batch,
        "device": device,
        "machine": fp,
    }
    name = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:24]
    return f"{digest}-{name}.json", key


def _read_cache(path: Path, key: dict[str, Any]) -> LatencyResult | None:
    """The cached result at ``path`` if it exists, parses and matches ``key``; else None."""
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        if record["key"] != key:
            _LOG.warning("latency cache entry %s has a different key; remeasuring", path)
            return None
        fields = {f.name for f in dataclasses.fields(LatencyResult)}
        values = {k: v for k, v in record["result"].items() if k in fields}
        result = LatencyResult(**{**values, "cached": True})
        if not (math.isfinite(result.median_ms) and result.median_ms > 0):
            raise ValueError(f"median_ms={result.median_ms}")
        return result
    except (OSError, ValueError, KeyError, TypeError) as exc:
        _LOG.warning("ignoring corrupt latency cache entry %s (%s); remeasuring", path, exc)
        return None


_UNWRITABLE_CACHES: set[Path] = set()  # cache folders already warned about (warn once each)


def _write_cache(path: Path, key: dict[str, Any], result: LatencyResult) -> None:
    """Write atomically: a tempfile in the same directory, then ``os.replace``.

    The cache is an optimisation: a folder that cannot be written (read-only file system, no
    permission, disk full, a file in the way) is warned about once and the measurement is
    returned uncached, rather than losing it, a whole ``aanas profile`` or a search's trials.
    """
    record = {"key": key, "result": {**result.to_dict(), "cached": False}}
    try:
        with atomic_open(path, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=1, sort_keys=True)
    except OSError as exc:
        folder = path.parent
        if folder not in _UNWRITABLE_CACHES:
            _UNWRITABLE_CACHES.add(folder)
            _LOG.warning(
                "latency cache %s is not writable (%s): measuring without it; set "
                "AANAS_CACHE_DIR to a writable folder to keep measurements",
                folder,
                exc.strerror or exc,
            )


# --- measure ------------------------------------------------------------------------------------


def _as_model(
    model_or_spec: nn.Module | ArchSpec | str, input_size: int | None
) -> tuple[nn.Module, ArchSpec | None, int]:
    """(module, its spec if known, input size) for whatever :func:`measure` was given."""
    from aanas.models import resolve_spec  # local: torch-free callers of cost need not load it

    if isinstance(model_or_spec, nn.Module):
        spec = getattr(model_or_spec, "spec", None)
        spec = spec if isinstance(spec, ArchSpec) else None
        size = input_size or (spec.input_size if spec is not None else None)
        if size is None:
            raise ValueError("input_size is required for a module without a .spec")
        if spec is not None and size != spec.input_size:
            spec = dataclasses.replace(spec, input_size=size)
        return model_or_spec, spec, size
    spec = resolve_spec(model_or_spec, input_size)
    from aanas.models import create_model

    return create_model(spec), spec, spec.input_size


def measure(
    model_or_spec: nn.Module | ArchSpec | str,
    input_size: int | None = None,
    backend: str = "torch",
    threads: int = 1,
    batch: int = 1,
    device: str = "cpu",
    repeats: int = _DEFAULT_REPEATS,
    warmup: int = _DEFAULT_WARMUP,
    *,
    cache: bool = True,
    cache_path: str | os.PathLike[str] | None = None,
) -> LatencyResult:
    """Median and interquartile range of one forward pass.

    The model runs in eval mode under ``torch.no_grad()`` with ``threads`` intra-op threads
    (torch's previous thread count is restored afterwards); ``warmup`` untimed runs precede
    ``repeats`` runs timed with ``time.perf_counter`` (CUDA is synchronized around each). With
    ``backend="onnxruntime"`` the model is exported with ``torch.onnx.export`` (opset 17) to a
    temporary file and run by an ``InferenceSession`` with ``intra_op_num_threads=threads``.

    Networks with a spec (an ArchSpec, a preset name or spec string, or a module with a ``.spec``)
    are cached on disk under :func:`cache_dir` keyed by spec digest, input size, backend, threads,
    batch, device and :func:`machine_fingerprint`; writes are atomic and an unreadable entry is
    ignored with a warning and remeasured.

    Args:
        model_or_spec: module, ArchSpec, registered preset name or spec string.
        input_size: square input side; defaults to the spec's own.
        backend: ``"torch"`` or ``"onnxruntime"``.
        threads: intra-op threads.
        batch: batch size.
        device: ``"cpu"`` or ``"cuda[:i]"`` (torch backend only).
        repeats: timed runs.
        warmup: untimed runs before them.
        cache: read and write the on-disk cache.
        cache_path: cache directory (default: :func:`cache_dir`).

    Returns:
        A :class:`LatencyResult` (``cached=True`` when read from the cache).

    Raises:
        ValueError: on an unknown backend or a non-positive setting.
    """
    _check_settings(backend, threads, batch, repeats, warmup)
    model, spec, size = _as_model(model_or_spec, input_size)
    path: Path | None = None
    key: dict[str, Any] = {}
    if cache and spec is not None:
        name, key = _cache_key(spec.digest(), size, backend, threads, batch, device)
        path = cache_dir(cache_path) / name
        hit = _read_cache(path, key)
        if hit is not None:
            _LOG.debug("latency cache hit %s", path)
            return hit
    was_training = model.training
    model.eval()
    try:
        example = torch.randn(batch, 3, size, size)
        times = _time_module(
            model,
            example,
            backend=backend,
            threads=threads,
            device=device,
            repeats=repeats,
            warmup=warmup,
        )
    finally:
        model.train(was_training)
    result = _summarize(
        times, backend=backend, threads=threads, batch=batch, device=device, input_size=size
    )
    if path is not None:
        _write_cache(path, key, result)
    return result


def measure_onnx(
    path: str | os.PathLike[str],
    input_size: int | None = None,
    threads: int = 1,
    batch: int = 1,
    repeats: int = _DEFAULT_REPEATS,
    warmup: int = _DEFAULT_WARMUP,
) -> LatencyResult:
    """Latency of an existing ONNX file under onnxruntime, timed exactly as :func:`measure`.

    Same timer, warm-up and summary (median, and IQR = 75th minus 25th percentile with linear
    interpolation, :func:`numpy.percentile`) as the torch backend, so the two numbers of
    ``aanas export --check-latency`` are comparable. Never cached: a file has no spec digest.

    Args:
        path: the ``.onnx`` file; its first input is fed ``(batch, 3, S, S)`` random floats.
        input_size: ``S``; default: the file's own static spatial size.
        threads: onnxruntime intra-op threads.
        batch: batch size (the batch axis must be dynamic or equal to it).
        repeats: timed runs.
        warmup: untimed runs before them.
    """
    _check_settings("onnxruntime", threads, batch, repeats, warmup)
    session = _ort_session(path, threads)
    first = session.get_inputs()[0]
    size = input_size or (first.shape[-1] if isinstance(first.shape[-1], int) else None)
    if size is None:
        raise ValueError(f"{path}: dynamic spatial size; pass input_size")
    x = np.random.default_rng(0).standard_normal((batch, 3, size, size), dtype=np.float32)
    feed = {first.name: x}
    times = _time_runs(lambda: session.run(None, feed), repeats, warmup, sync=False)
    return _summarize(
        times, backend="onnxruntime", threads=threads, batch=batch, device="cpu", input_size=size
    )


# --- interleaved timing ---------------------------------------------------------------------------

STATS: tuple[str, ...] = ("min", "trimmed", "median")
# Share cut from EACH end by the "trimmed" statistic: 25 % leaves the interquartile mean.
_TRIM = 0.25
# Rounds and untimed calls per job for the table: one timed call per job and round, so a slow
# phase of a shared machine lands on all jobs of a round alike instead of on a few entries.
_DEFAULT_ROUNDS = 30
_DEFAULT_ROUND_WARMUP = 2
# Jobs held (built, exported, with an onnxruntime session each) at a time: 64 AA-MnasNets at
# 224 px are ~2 GB of sessions; parts are far smaller.
_ROUND_CHUNK = 64

Job = Callable[[], tuple[nn.Module, torch.Tensor]]


def robust_ms(times_ms: Sequence[float] | np.ndarray, stat: str = "min") -> float:
    """One latency figure from many short runs, robust to a machine's slow phases.

    ``"min"``: the fastest run (interference only ever adds time, so the minimum is the run
    that saw least of it); ``"trimmed"``: the mean of the middle half (25 % cut from each end);
    ``"median"``. E.g. runs ``[5, 1, 2, 3, 9, 4, 6, 7]`` ms: min 1, trimmed mean(3, 4, 5, 6) =
    4.5, median 4.5.

    Raises:
        ValueError: on an unknown ``stat`` or no runs.
    """
    t = np.sort(np.asarray(times_ms, dtype=np.float64))
    if t.size == 0:
        raise ValueError("robust_ms needs at least one run")
    if stat == "min":
        return float(t[0])
    if stat == "median":
        return float(np.median(t))
    if stat == "trimmed":
        cut = int(t.size * _TRIM)
        return float(t[cut : t.size - cut].mean())
    raise ValueError(f"stat must be one of {STATS}, got {stat!r}")


CLOCKS: tuple[str, ...] = ("wall", "thread")


def _clock(clock: str, threads: int, device: str) -> Callable[[], float]:
    """The timer of ``clock`` (see :func:`time_interleaved`), checked against the settings."""
    if clock == "wall":
        return time.perf_counter
    if clock != "thread":
        raise ValueError(f"clock must be one of {CLOCKS}, got {clock!r}")
    if threads != 1 or device != "cpu":
        raise ValueError(f"clock 'thread' needs threads=1 on cpu, got {threads} on {device!r}")
    return time.thread_time


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection inside the timed rounds (a collection costs milliseconds)."""
    enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _runner(
    model: nn.Module, example: torch.Tensor, backend: str, threads: int, device: str
) -> Callable[[], object]:
    """A no-argument call running one forward of ``model`` on ``example`` on ``backend``."""
    model.eval()
    if backend == "torch":
        return functools.partial(model.to(device), example.to(device))
    if device != "cpu":
        raise ValueError(f"backend 'onnxruntime' runs on device 'cpu' only, got {device!r}")
    import onnxruntime as ort

    session = _ort_session(_onnx_bytes(model, example), threads)
    # Bound input and preallocated output: a run copies no numpy arrays in or out (a
    # (1, 32, 112, 112) output is 1.6 MB, a copy that no block inside a network makes).
    x = example.cpu().numpy()
    (y,) = session.run(None, {session.get_inputs()[0].name: x})
    binding = session.io_binding()
    binding.bind_ortvalue_input(session.get_inputs()[0].name, ort.OrtValue.ortvalue_from_numpy(x))
    out = ort.OrtValue.ortvalue_from_shape_and_type(y.shape, y.dtype)
    binding.bind_ortvalue_output(session.get_outputs()[0].name, out)
    return functools.partial(session.run_with_iobinding, binding)


def time_interleaved(
    jobs: Sequence[Job],
    *,
    backend: str = "onnxruntime",
    threads: int = 1,
    device: str = "cpu",
    repeats: int = _DEFAULT_ROUNDS,
    warmup: int = _DEFAULT_ROUND_WARMUP,
    flush_cache: bool = True,
    seed: int = 0,
    chunk: int = _ROUND_CHUNK,
    clock: str = "wall",
) -> list[np.ndarray]:
    """Milliseconds of ``repeats`` forward passes of every job, timed in interleaved rounds.

    The jobs (no-argument factories returning ``(module, example input)``, built lazily) are
    shuffled with ``seed`` and taken ``chunk`` at a time; each chunk's modules are built (and,
    for onnxruntime, exported and given a session), warmed up ``warmup`` times each, then timed
    in ``repeats`` rounds, each round calling every job of the chunk in a fresh random order:
    an untimed priming call, an untimed read of a buffer twice the L2 size (with
    ``flush_cache``, CPU), then the timed call. Table parts and whole networks given in one call
    therefore share the machine's slow and fast phases, and no job is always timed right after
    the same neighbour. Priming then evicting L1/L2 leaves a job's weights in the last-level
    cache, as a block finds them inside a network run back to back (:func:`measure`), where the
    other blocks evicted them from L2 but not from L3. (Evicting everything with a 64 MiB write
    instead made tiny 32x32 networks 3.4x slower than back-to-back runs: their time is mostly
    DRAM misses and the write-back of the dirty buffer.) onnxruntime jobs run with a bound
    input and preallocated output (io-binding), so no run copies numpy arrays.

    ``clock="thread"`` (one CPU thread only) times with the calling thread's CPU time
    (``time.thread_time``): a one-thread onnxruntime or PyTorch run computes on the calling
    thread, so on a quiet machine it equals the wall time, and on a shared one it leaves out
    the time other processes held the core (it still counts their cache and memory-bandwidth
    interference). ``"wall"`` is ``time.perf_counter``.

    Returns:
        Per job (in the given order), an array of ``repeats`` times in milliseconds.
    """
    _check_settings(backend, threads, 1, repeats, warmup)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk!r}")
    timer = _clock(clock, threads, device)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(jobs))
    out: list[np.ndarray] = [np.empty(0)] * len(jobs)
    flush = _cache_flusher(device) if flush_cache else None
    sync = device.startswith("cuda")
    with _torch_threads(threads), torch.no_grad():
        for start in range(0, len(order), chunk):
            idx = order[start : start + chunk]
            runners = [_runner(*jobs[i](), backend, threads, device) for i in idx]
            times = np.empty((len(idx), repeats))
            with _gc_paused():
                for run in runners:
                    for _ in range(warmup):
                        run()
                for r in range(repeats):
                    for k in rng.permutation(len(idx)):
                        runners[k]()  # prime: the job's weights into the last-level cache
                        times[k, r] = _time_runs(runners[k], 1, 0, sync, flush, timer)[0]
            for k, i in enumerate(idx):
                out[i] = times[k] * 1e3
            del runners
            _LOG.debug("timed %d/%d jobs", min(start + chunk, len(order)), len(order))
    return out


# --- the per-block lookup table -----------------------------------------------------------------

Signature = tuple[Any, ...]
_BLOCK_FIELDS: tuple[str, ...] = tuple(
    f.name for f in dataclasses.fields(ResolvedBlock) if f.name != "name"
)
# 2: block entries gained ``aa_mode``; per-block-kind overheads; the entries' statistic.
_TABLE_VERSION = 2
_TABLE_KEYS = frozenset(
    {"version", "fingerprint", "backend", "threads", "batch", "device", "flush_cache", "stat"}
    | {"clock"}
    | {"overhead_ms", "scale", "type_overheads", "entries"}
)
_REQUIRED_KEYS = frozenset({"version", "fingerprint", "backend", "threads", "batch", "device"})


def block_signature(block: ResolvedBlock) -> Signature:
    """``("block", type, in, mid, out, kernel, stride, in_size, out_size, se, act, residual,
    dk, dv, heads, relative, aa_mode)``: every field of the ResolvedBlock but its name."""
    return ("block", *(getattr(block, f) for f in _BLOCK_FIELDS))


def block_kind(block: ResolvedBlock) -> str:
    """The block kind whose per-block overhead :meth:`LatencyTable.fit_overhead` fits.

    Type, then ``+se`` with squeeze-excite and ``+aa:<mode>`` with attention, e.g.
    ``"ir+se+aa:projection"``: these change the operator sequence (and so the per-call
    overheads and the cache traffic between operators) that an isolated part misses.
    """
    kind = block.type + ("+se" if block.se_channels else "")
    if block.dv or block.dk:
        kind += f"+aa:{block.aa_mode or 'spatial'}"
    return kind


def _stem_signature(r: ResolvedArch) -> Signature:
    st = r.spec.stem
    return ("stem", st.type, r.stem_channels, st.kernel, st.stride, st.act, r.spec.input_size)


def _head_signature(r: ResolvedArch) -> Signature:
    last = r.blocks[-1]
    return (
        "head",
        r.spec.family,
        last.out_channels,
        last.out_size,
        r.head_channels,
        r.spec.num_classes,
    )


def _signatures(r: ResolvedArch) -> list[Signature]:
    """Stem, every block, head: the parts a network's prediction sums."""
    return [_stem_signature(r), *(block_signature(b) for b in r.blocks), _head_signature(r)]


def _part_input(sig: Signature, batch: int) -> torch.Tensor:
    """A random input of the right shape for the part with signature ``sig``."""
    if sig[0] == "stem":
        size = sig[6]
        return torch.randn(batch, 3, size, size)
    if sig[0] == "block":
        fields = dict(zip(_BLOCK_FIELDS, sig[1:], strict=True))
        return torch.randn(batch, fields["in_channels"], fields["in_size"], fields["in_size"])
    _, _, channels, size, *_ = sig
    return torch.randn(batch, channels, size, size)


# YAML field names of the stem / head signature tuples (after the kind).
_STEM_KEYS: tuple[str, ...] = ("type", "channels", "kernel", "stride", "act", "input_size")
_HEAD_KEYS: tuple[str, ...] = ("family", "in_channels", "in_size", "head_channels", "num_classes")


def _sig_to_yaml(sig: Signature) -> dict[str, Any]:
    """One signature as a readable YAML mapping."""
    if sig[0] == "block":
        return {"kind": "block", **dict(zip(_BLOCK_FIELDS, sig[1:], strict=True))}
    keys = _STEM_KEYS if sig[0] == "stem" else _HEAD_KEYS
    return {"kind": sig[0], **dict(zip(keys, sig[1:], strict=True))}


def _sig_from_yaml(data: dict[str, Any]) -> Signature:
    """Inverse of :func:`_sig_to_yaml`.

    Raises:
        KeyError: naming the missing field.
        ValueError: on an unknown kind or an unexpected field.
    """
    kind = data["kind"]
    if kind == "block":
        keys = _BLOCK_FIELDS
    elif kind == "stem":
        keys = _STEM_KEYS
    elif kind == "head":
        keys = _HEAD_KEYS
    else:
        raise ValueError(f"unknown entry kind {kind!r}; expected block, stem or head")
    extra = set(data) - {"kind", *keys}
    if extra:
        raise ValueError(f"unexpected {kind} fields {sorted(extra)}")
    return (kind, *(data[k] for k in keys))


class LatencyTable:
    """Per-block latency lookup table with fitted per-block-kind overheads.

    ``predict(spec) = scale * (stem + sum(blocks) + head) + overhead_ms
    + sum_k type_overheads[k] * count_k(spec)``, where ``count_k`` counts the blocks of kind
    ``k`` (:func:`block_kind`). Every entry is one distinct part (stem, block signature, head),
    measured in isolation on an input of its own resolution with the table's settings
    (backend, threads, batch, device) and summarised by ``stat`` (:func:`robust_ms`) over many
    short runs. The intercept and per-kind constants are a least-squares fit on whole networks
    timed in the same interleaved rounds as the parts (:meth:`update`): they absorb what part
    timing misses (per-call overhead of the runtime, operator fusion and cache traffic across
    block boundaries), which grows with the number of blocks of each kind rather than staying
    one constant per network.

    The reference backend is onnxruntime with one intra-op thread, the runtime an exported
    model is deployed with (:mod:`aanas.export`); ``backend="torch"`` times eager PyTorch.

    Parts are timed primed, then with L1/L2 evicted (``flush_cache``, see
    :func:`time_interleaved`): a block inside a network finds its weights evicted from L2 by the
    other blocks but still in L3. Timed back to back, a lone block keeps its weights in L1/L2
    and looks faster than inside a network (on a 2-core AMD EPYC, 2 MiB L2, sums of warm parts
    underestimated whole MnasNets at 64x64 by ~35 %, eager PyTorch); after a 64 MiB write that
    evicts everything it looks far slower (3.4x for tiny 32x32 networks under onnxruntime).

    Defaults, from ``benchmarks/latency_predictor.py`` on a 2-core EPYC shared with other
    jobs (onnxruntime, one thread): with ``clock="thread"`` the noise floor fell from 15-38 %
    (wall clock, load 8-15) to 2-7 %. In the full run (224x224, 30 + 50 networks, 30 rounds,
    load 4-6) minima gave MAPE 2.5 % at a noise floor of 3.1 %, trimmed means 8.3 % at 9.1 %
    and medians 10.1 % at 11.1 %, so entries are minima by default. The wall clock stays the
    default (latency is wall time; ``"thread"`` needs one thread).

    The table records the :func:`machine_fingerprint` it was measured on; :meth:`load` refuses
    (with a warning) a table from another machine, and a table of another format version with
    a one-line :class:`~aanas.errors.AanasError` (or a warning, see its ``stale`` argument).
    """

    def __init__(
        self,
        entries: dict[Signature, float] | None = None,
        *,
        overhead_ms: float = 0.0,
        scale: float = 1.0,
        type_overheads: dict[str, float] | None = None,
        backend: str = "onnxruntime",
        threads: int = 1,
        batch: int = 1,
        device: str = "cpu",
        flush_cache: bool = True,
        stat: str = "min",
        clock: str = "wall",
        fingerprint: dict[str, str] | None = None,
    ) -> None:
        """Creates a table (usually via :meth:`build` or :meth:`load`).

        Args:
            entries: signature -> milliseconds.
            overhead_ms: constant added to every prediction (the fit's intercept).
            scale: factor on the sum of parts (1 unless fitted with ``fit_scale``).
            type_overheads: block kind (:func:`block_kind`) -> ms added per block of that kind.
            backend: measurement backend of the entries.
            threads: intra-op threads of the entries.
            batch: batch size of the entries.
            device: device of the entries.
            flush_cache: evict L1/L2 (untimed) before every timed run, see the class
                docstring.
            stat: how an entry summarises its runs (:data:`STATS`, see :func:`robust_ms`).
            clock: ``"wall"`` or ``"thread"`` (CPU time of the one timing thread, see
                :func:`time_interleaved`).
            fingerprint: machine the entries were measured on (default: this one).
        """
        _check_settings(backend, threads, batch, 1, 0)
        if stat not in STATS:
            raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
        self.entries: dict[Signature, float] = dict(entries or {})
        self.overhead_ms = float(overhead_ms)
        self.scale = float(scale)
        self.type_overheads: dict[str, float] = dict(type_overheads or {})
        self.backend = backend
        self.threads = threads
        self.batch = batch
        self.device = device
        self.flush_cache = flush_cache
        self.stat = stat
        _clock(clock, threads, device)  # checks it
        self.clock = clock
        self.fingerprint = fingerprint or machine_fingerprint(device)
        # Raw per-run ms of the parts this object measured (not saved): lets :meth:`use_stat`
        # re-summarise them, e.g. to compare statistics on one set of measurements.
        self.samples: dict[Signature, np.ndarray] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def __repr__(self) -> str:
        return (
            f"LatencyTable({len(self)} entries, scale={self.scale:.3f}, "
            f"overhead={self.overhead_ms:.3f} ms, {len(self.type_overheads)} kind overheads, "
            f"backend={self.backend!r}, threads={self.threads}, batch={self.batch}, "
            f"stat={self.stat!r}, clock={self.clock!r})"
        )

    # -- prediction --

    def missing(self, spec: ArchSpec) -> list[Signature]:
        """Signatures of ``spec``'s parts that have no entry yet (in network order, unique)."""
        seen: dict[Signature, None] = {}
        for sig in _signatures(resolve(spec)):
            if sig not in self.entries:
                seen[sig] = None
        return list(seen)

    def parts(self, spec: ArchSpec) -> list[tuple[str, float]]:
        """``(part name, ms)`` for the stem, every block and the head of ``spec``.

        Raises:
            KeyError: naming the first part that has no entry (see :meth:`update`).
        """
        r = resolve(spec)
        names = ["stem", *(b.name for b in r.blocks), "head"]
        out = []
        for name, sig in zip(names, _signatures(r), strict=True):
            if sig not in self.entries:
                raise KeyError(f"no latency entry for {name} {_sig_to_yaml(sig)}; call update()")
            out.append((name, self.entries[sig]))
        return out

    @staticmethod
    def kind_counts(spec: ArchSpec) -> dict[str, int]:
        """Blocks of each :func:`block_kind` in ``spec``."""
        counts: dict[str, int] = {}
        for b in resolve(spec).blocks:
            counts[block_kind(b)] = counts.get(block_kind(b), 0) + 1
        return counts

    def predict(self, spec: ArchSpec) -> float:
        """Predicted latency of ``spec`` in milliseconds (see the class docstring)."""
        total = self.scale * sum(ms for _, ms in self.parts(spec)) + self.overhead_ms
        for kind, n in self.kind_counts(spec).items():
            total += self.type_overheads.get(kind, 0.0) * n
        return total

    # -- measurement --

    def update(
        self,
        specs: Iterable[ArchSpec],
        *,
        networks: Sequence[ArchSpec] = (),
        repeats: int = _DEFAULT_ROUNDS,
        warmup: int = _DEFAULT_ROUND_WARMUP,
        seed: int = 0,
        chunk: int = _ROUND_CHUNK,
    ) -> list[np.ndarray]:
        """Measure the parts of ``specs`` (and of ``networks``) that have no entry yet, and the
        whole ``networks``, all in the same interleaved rounds (:func:`time_interleaved`).

        A spec listed twice in ``networks`` is measured twice, independently (its own module
        and session): the spread between the two is the noise floor of a measurement.

        Returns:
            Per network, its ``repeats`` run times in ms (summarise with :func:`robust_ms`).
        """
        networks = list(networks)
        todo: dict[Signature, ArchSpec] = {}
        for spec in [*specs, *networks]:
            for sig in self.missing(spec):
                todo.setdefault(sig, spec)
        jobs: list[Job] = [
            functools.partial(_part_job, sig, spec, self.batch) for sig, spec in todo.items()
        ]
        jobs += [functools.partial(_network_job, spec, self.batch) for spec in networks]
        times = time_interleaved(
            jobs,
            backend=self.backend,
            threads=self.threads,
            device=self.device,
            repeats=repeats,
            warmup=warmup,
            flush_cache=self.flush_cache,
            seed=seed,
            chunk=chunk,
            clock=self.clock,
        )
        for sig, t in zip(todo, times, strict=False):
            self.samples[sig] = t
            self.entries[sig] = robust_ms(t, self.stat)
        _LOG.debug("LUT: measured %d parts and %d networks", len(todo), len(networks))
        return times[len(todo) :]

    def use_stat(self, stat: str) -> None:
        """Re-summarise the entries this object measured (:attr:`samples`) with ``stat``."""
        if stat not in STATS:
            raise ValueError(f"stat must be one of {STATS}, got {stat!r}")
        self.stat = stat
        for sig, t in self.samples.items():
            self.entries[sig] = robust_ms(t, stat)

    def fit_overhead(
        self,
        specs: Sequence[ArchSpec],
        measured_ms: Sequence[float],
        *,
        fit_scale: bool = False,
        per_type: bool = False,
    ) -> float:
        """Least-squares fit of the overheads on measured whole networks; returns the intercept.

        Fits ``measured - sum(parts) = c`` (the mean residual). With ``per_type``, fits
        ``measured - sum(parts) = c + sum_k o_k * count_k`` over the block kinds whose count
        varies among ``specs`` (a constant count is indistinguishable from ``c``), stored in
        :attr:`type_overheads`, with a ridge penalty on the ``o_k`` chosen by leave-one-out
        error (:func:`_ridge_loo`); needs at least two networks per fitted constant, else it
        warns and fits ``c`` alone. With ``fit_scale``, the sum of parts gets a fitted factor
        :attr:`scale` too (needs >= 2 networks of different sums): isolated part timings can
        over- or understate blocks by a share rather than a constant.

        Raises:
            ValueError: on unequal or empty inputs, or ``fit_scale`` without two distinct sums.
        """
        if len(specs) != len(measured_ms) or not specs:
            raise ValueError("fit_overhead needs equally many (>= 1) specs and measurements")
        sums = np.asarray([sum(ms for _, ms in self.parts(s)) for s in specs])
        measured = np.asarray(measured_ms, dtype=np.float64)
        cols = [np.ones_like(sums)]
        if fit_scale:
            if len(specs) < 2 or np.ptp(sums) == 0:
                raise ValueError("fit_scale needs >= 2 networks with different part sums")
            cols.append(sums)
        kinds: list[str] = []
        if per_type:
            counts = [self.kind_counts(s) for s in specs]
            for kind in sorted(set().union(*counts)):
                col = np.asarray([c.get(kind, 0) for c in counts], dtype=np.float64)
                if np.ptp(col) > 0:
                    kinds.append(kind)
                    cols.append(col)
            if kinds and len(specs) < 2 * len(cols):
                _LOG.warning(
                    "%d networks are too few to fit %d overheads (%d block kinds vary); fitting "
                    "one constant (measure >= %d networks)",
                    len(specs),
                    len(cols),
                    len(kinds),
                    2 * len(cols),
                )
                cols, kinds = cols[: 1 + fit_scale], []
        design = np.stack(cols, 1)
        target = measured if fit_scale else measured - sums
        coef = _ridge_loo(design, target, free=1 + fit_scale)
        self.overhead_ms = float(coef[0])
        self.scale = float(coef[1]) if fit_scale else 1.0
        self.type_overheads = {
            k: float(v) for k, v in zip(kinds, coef[1 + fit_scale :], strict=True)
        }
        return self.overhead_ms

    @classmethod
    def build(
        cls,
        space_or_specs: Any,
        *,
        samples: int = 200,
        seed: int = 0,
        fit_networks: int = 20,
        fit_scale: bool = False,
        per_type: bool = True,
        backend: str = "onnxruntime",
        threads: int = 1,
        batch: int = 1,
        device: str = "cpu",
        flush_cache: bool = True,
        stat: str = "min",
        clock: str = "wall",
        input_size: int | None = None,
        repeats: int = _DEFAULT_ROUNDS,
        warmup: int = _DEFAULT_ROUND_WARMUP,
        table: LatencyTable | None = None,
    ) -> LatencyTable:
        """Measure every distinct part of a space's samples (or of given specs), fit overheads.

        The first ``fit_networks`` samples are also timed whole, in the same interleaved
        rounds as the parts, and :meth:`fit_overhead` fits the intercept (and, with
        ``per_type``, the per-block-kind overheads) on them.

        Args:
            space_or_specs: a ``SearchSpace`` (sampled ``samples`` times with
                ``numpy.random.default_rng(seed)``), a path to its YAML, or a sequence of specs.
            samples: samples drawn from a space to enumerate its distinct blocks.
            seed: sampling seed (and the timing order's).
            fit_networks: whole networks measured (the first ones) to fit the overheads;
                0 keeps the table's overheads.
            fit_scale: also fit a factor on the sum of parts (see :meth:`fit_overhead`).
            per_type: fit per-block-kind overheads (see :meth:`fit_overhead`).
            backend: measurement backend.
            threads: intra-op threads.
            batch: batch size.
            device: device.
            flush_cache: evict L1/L2 before every timed run (see the class docstring).
            stat: statistic of the runs (:func:`robust_ms`).
            clock: ``"wall"`` or ``"thread"`` (see :func:`time_interleaved`).
            input_size: replaces every spec's input size (e.g. 128 to measure faster).
            repeats: interleaved rounds (timed runs per part and per network).
            warmup: untimed runs of each before them.
            table: an existing table to refresh (its settings win); None starts a new one.

        Returns:
            The table.
        """
        specs = _specs_of(space_or_specs, samples, seed)
        if input_size is not None:
            specs = [dataclasses.replace(s, input_size=input_size).validate() for s in specs]
        if table is None:
            table = cls(
                backend=backend,
                threads=threads,
                batch=batch,
                device=device,
                flush_cache=flush_cache,
                stat=stat,
                clock=clock,
            )
        before = len(table)
        fit = specs[: max(fit_networks, 0)]
        times = table.update(specs, networks=fit, repeats=repeats, warmup=warmup, seed=seed)
        _LOG.info("LUT: measured %d new parts (%d in table)", len(table) - before, len(table))
        if fit:
            measured = [robust_ms(t, table.stat) for t in times]
            table.fit_overhead(fit, measured, fit_scale=fit_scale, per_type=per_type)
        return table

    # -- persistence --

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the table as YAML (atomically), with its settings and machine fingerprint."""
        data = {
            "version": _TABLE_VERSION,
            "fingerprint": dict(self.fingerprint),
            "backend": self.backend,
            "threads": self.threads,
            "batch": self.batch,
            "device": self.device,
            "flush_cache": self.flush_cache,
            "stat": self.stat,
            "clock": self.clock,
            "overhead_ms": self.overhead_ms,
            "scale": self.scale,
            "type_overheads": dict(self.type_overheads),
            "entries": [{**_sig_to_yaml(sig), "ms": float(ms)} for sig, ms in self.entries.items()],
        }
        with atomic_open(path, "w", encoding="utf-8") as f:
            yaml.safe_dump(data, f, sort_keys=False)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        check_fingerprint: bool = True,
        stale: str = "raise",
    ) -> LatencyTable | None:
        """Read a table written by :meth:`save`.

        Args:
            path: the YAML file.
            check_fingerprint: refuse a table measured on another machine.
            stale: a table of another format version (an older aanas) raises ``"raise"``, or
                is skipped with a warning (None) with ``"ignore"``, e.g. to rebuild it.

        Returns:
            The table, or None (with a logged warning) when it was measured on a machine with
            another fingerprint and ``check_fingerprint`` is true, or is stale and ``stale``
            is ``"ignore"``.

        Raises:
            FileNotFoundError: if ``path`` does not exist.
            AanasError: if the file is not a latency table of this version, or is malformed.
        """
        if stale not in ("raise", "ignore"):
            raise ValueError(f"stale must be 'raise' or 'ignore', got {stale!r}")
        with open(path, encoding="utf-8") as f:
            try:
                data = yaml.safe_load(f)
            except yaml.YAMLError as exc:
                raise AanasError(f"{path}: not a YAML latency table ({exc.problem})") from None
        if not isinstance(data, dict) or "entries" not in data or "version" not in data:
            raise AanasError(f"{path}: not an aanas latency table (no version or entries)")
        if data["version"] != _TABLE_VERSION:
            message = (
                f"{path}: latency table version {data['version']!r}, this aanas reads version "
                f"{_TABLE_VERSION}; rebuild it: aanas profile --build-lut SPACE.yaml --out {path}"
            )
            if stale == "ignore":
                _LOG.warning("%s", message)
                return None
            raise AanasError(message)
        unknown = set(data) - _TABLE_KEYS
        missing = _REQUIRED_KEYS - set(data)
        if unknown or missing:
            raise AanasError(
                f"{path}: unexpected keys {sorted(unknown)}, missing keys {sorted(missing)}"
            )
        fingerprint = {str(k): str(v) for k, v in data["fingerprint"].items()}
        here = machine_fingerprint(data["device"])
        if check_fingerprint and fingerprint != here:
            _LOG.warning(
                "latency table %s was measured on %s, this machine is %s; not using it",
                path,
                fingerprint,
                here,
            )
            return None
        entries = {}
        for i, item in enumerate(data.get("entries") or []):
            try:
                item = dict(item)
                ms = float(item.pop("ms"))
                entries[_sig_from_yaml(item)] = ms
            except KeyError as exc:
                raise AanasError(f"{path}: entries[{i}] has no field {exc}") from None
            except (TypeError, ValueError) as exc:
                raise AanasError(f"{path}: entries[{i}]: {exc}") from None
        return cls(
            entries,
            overhead_ms=float(data.get("overhead_ms", 0.0)),
            scale=float(data.get("scale", 1.0)),
            type_overheads={
                str(k): float(v) for k, v in (data.get("type_overheads") or {}).items()
            },
            backend=data["backend"],
            threads=int(data["threads"]),
            batch=int(data["batch"]),
            device=data["device"],
            flush_cache=bool(data.get("flush_cache", True)),
            stat=str(data.get("stat", "min")),
            clock=str(data.get("clock", "wall")),
            fingerprint=fingerprint,
        )


# Twice the 2 MiB per-core L2 of the EPYC this was tuned on: a read of it evicts L1/L2 but not
# the 32 MiB L3, and (unlike a write) leaves no dirty lines to be written back in the timed run.
# Ridge penalties tried on the per-kind overheads, times the number of networks (a count
# column's squared norm is about that): 0 is plain least squares, 1e4 is a constant alone.
_RIDGE_GRID = (0.0, *np.logspace(-3, 4, 15))


def _ridge_loo(design: np.ndarray, target: np.ndarray, free: int) -> np.ndarray:
    """Least squares with a ridge penalty on the columns after the first ``free``, the penalty
    chosen from :data:`_RIDGE_GRID` by leave-one-out error (closed form for a linear smoother,
    ``e_i / (1 - H_ii)``, Hastie et al., *Elements of Statistical Learning*, eq. 7.52).

    On noisy timings, plain least squares gives rare block kinds overheads of several ms of
    either sign (a shared-machine run fitted -3.1 ms to one kind, +2.7 ms to another); the
    held-out-chosen penalty shrinks them toward a constant overhead when the data cannot
    support them, and leaves them alone (penalty 0) when it can.
    """
    n, p = design.shape
    if p == free:
        return np.linalg.lstsq(design, target, rcond=None)[0]
    best: tuple[float, np.ndarray] | None = None
    for lam in _RIDGE_GRID:
        penalty = np.diag([0.0] * free + [lam * n] * (p - free))
        gram_inv = np.linalg.pinv(design.T @ design + penalty)
        coef = gram_inv @ design.T @ target
        hat = np.einsum("ij,jk,ik->i", design, gram_inv, design)  # diag of the hat matrix
        resid = (target - design @ coef) / np.clip(1.0 - hat, 1e-9, None)
        loo = float(np.mean(resid**2))
        if best is None or loo < best[0] - 1e-12 * max(1.0, best[0]):
            best = (loo, coef)
    assert best is not None
    return best[1]


_FLUSH_BYTES = 4 * 2**20


def _cache_flusher(device: str) -> Callable[[], object] | None:
    """An untimed read of a buffer twice the size of the L2 cache (CPU only)."""
    if device != "cpu":
        return None
    buf = torch.ones(_FLUSH_BYTES // 4)
    return buf.sum


def _specs_of(space_or_specs: Any, samples: int, seed: int) -> list[ArchSpec]:
    """Specs from a SearchSpace, a path to its YAML, a single spec or a sequence of specs."""
    if isinstance(space_or_specs, ArchSpec):
        return [space_or_specs]
    if isinstance(space_or_specs, str | os.PathLike):
        from aanas.space import SearchSpace

        space_or_specs = SearchSpace.from_yaml(space_or_specs)
    if hasattr(space_or_specs, "sample"):
        rng = np.random.default_rng(seed)
        return [space_or_specs.sample(rng) for _ in range(samples)]
    specs = list(space_or_specs)
    for s in specs:
        if not isinstance(s, ArchSpec):
            raise TypeError(f"expected ArchSpec items, got {type(s).__name__}")
    return specs


def _part_job(sig: Signature, spec: ArchSpec, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """(module, input) of one LUT part: a :data:`Job` for :func:`time_interleaved`."""
    return _part_module(sig, spec), _part_input(sig, batch)


def _network_job(spec: ArchSpec, batch: int) -> tuple[nn.Module, torch.Tensor]:
    """(whole network, input) of ``spec``: a :data:`Job` for :func:`time_interleaved`."""
    from aanas.models import create_model

    size = spec.input_size
    return create_model(spec), torch.randn(batch, 3, size, size)


def _part_module(sig: Signature, spec: ArchSpec) -> nn.Module:
    """The module of one LUT part of ``spec``, built with the models' own builder code.

    Stem: ``build_stem``; block: the builder's one-block constructor; head: the whole model with
    ``stem`` and ``blocks`` replaced by Identity, so it runs exactly what follows the blocks
    (MnasNet head conv, WRN final BN-ReLU, pooling, dropout, classifier).
    """
    from aanas.models import _builder, create_model

    r = resolve(spec)
    if sig[0] == "stem":
        return _builder.build_stem(r)
    if sig[0] == "block":
        for b in r.blocks:
            if block_signature(b) == sig:
                return _builder.build_block(b, nn.BatchNorm2d)
        raise AssertionError(f"{sig} is not a block of {spec}")
    model = create_model(spec)
    model.stem = nn.Identity()
    model.blocks = nn.Identity()
    return model
