"""Fused CPU kernel for relative self-attention (Bello et al., arXiv:1904.09925), row by row.

Why a hand-written kernel: on CPU the eager paths of :mod:`aanas.ops.attention` spend their time
in memory passes over the ``(HW)^2`` logits, not in arithmetic. With the thin heads of the
paper's networks (``dk/Nh = 3``, ``dv/Nh = 2`` in AA-ResNet-50's 28x28 stage) every logit costs
about 10 flops, but the chunked path makes ~20 eager passes over it (bias write, a K=3 matmul
into it, softmax, ``P @ v``; in backward the same again plus ``dS``, four matmuls and two
reductions). ``torch.compile`` (inductor's C++/OpenMP backend) was tried first and did not
help: it fuses the forward into one kernel but still materialises the logits and writes separate
loops for row and column reductions (28x28, B=4, Nh=8, one thread, CPU time on a loaded
machine: chunked 27 + 62 ms forward + backward; inductor 16-28 + 63-88 ms; with recomputation
forced instead of stored buffers, 64 + 77 ms).

This kernel keeps one query row's logits (``HW`` values, a few KiB) in cache and does all the
per-logit work in a handful of vectorised loops over it, flash-attention style:

* forward: the query's relative logits against the ``2H - 1`` / ``2W - 1`` table rows it uses
  (``H + W`` dot products), logits = ``rel_h[x'] + rel_w[y'] + q_i · k_j``; max; ``exp``;
  sum; ``o_c = sum_j p_j v_cj / s``; saves ``lse = m + log s`` per query.
* backward: recomputes ``p`` from ``lse``, ``dS = p * (dO_i · v_j - delta_i)``, then
  ``dv += p dO``, ``dk += dS q``, ``dq = dS k``, and the row/column sums of ``dS``, which are
  the gradients of the relative logits, carried on to ``dq`` and to the tables.

No ``(HW)^2`` tensor is ever allocated, and nothing but the kernel runs per logit. (A first
version took the relative logits ``(BN, HW, H)`` and ``(BN, HW, W)`` from autograd ops around
the kernel; their thin matmuls and the strided view's backward cost a third of its time.)

The C source is compiled once per machine with the system C compiler (``cc``/``gcc``;
``-O3 -march=native -ffast-math -fopenmp``) into ``$AANAS_KERNEL_CACHE`` (default
``~/.cache/aanas/kernels``), named by a hash of source, flags, compiler and the CPU's feature
flags, written atomically so that
concurrent processes are safe, and loaded with :mod:`ctypes`. If anything fails (no compiler,
read-only cache, unsupported platform) :func:`available` returns False after one warning and
callers fall back to the chunked path.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["MAX_POSITIONS", "available", "fused_relative_attention", "inputs_finite"]

_log = logging.getLogger(__name__)

# Largest map (H * W) the kernel takes: it keeps a few rows of HW values on each thread's stack
# (backward: 2 * HW, 256 KiB in float64 at this size, well inside the 2 MiB+ thread stacks).
# 128 x 128 maps already mean 2**28 logits per head and image; larger ones run chunked.
MAX_POSITIONS = 128 * 128

# One body, instantiated for float and double (double serves gradcheck). Layouts, all
# contiguous: q, k (BN, d, HW) with q already scaled; v (BN, c, HW); rh (BN, HW, H) and
# rw (BN, HW, W) the relative logits of each query against every key row / key column;
# out (BN, c, HW); lse (BN, HW). Rows are independent in forward (parallel over BN * HW);
# backward accumulates dk, dv per (batch, head) and runs in parallel over BN. Both loops hand
# out work dynamically: on a shared machine a thread that loses its core for a while then
# holds up the others less than with a static split.
_BODY = r"""
/* rh[x'] = q_i . tH[x' - x + H - 1], rw[y'] = q_i . tW[y' - y + W - 1] for query i = (x, y);
   the tables come transposed, (d, 2L - 1), so that both loops run along contiguous rows. */
static void rel_row_SUFFIX(const scalar_t* qi, const scalar_t* th, const scalar_t* tw, long d,
                           long h, long w, long x, long y, scalar_t* rh, scalar_t* rw) {
  for (long xp = 0; xp < h; ++xp) rh[xp] = 0;
  for (long yp = 0; yp < w; ++yp) rw[yp] = 0;
  for (long t = 0; t < d; ++t) {
    const scalar_t qv = qi[t];
    const scalar_t* eh = th + t * (2 * h - 1) + h - 1 - x;
    const scalar_t* ew = tw + t * (2 * w - 1) + w - 1 - y;
    for (long xp = 0; xp < h; ++xp) rh[xp] += qv * eh[xp];
    for (long yp = 0; yp < w; ++yp) rw[yp] += qv * ew[yp];
  }
}

/* row[j] = rh[x'] + rw[y'] + sum_t qi[t] k[t][j], j = x' * W + y' (d >= 1). */
static void logits_row_SUFFIX(const scalar_t* qi, const scalar_t* kn, const scalar_t* rh,
                              const scalar_t* rw, long d, long h, long w, scalar_t* row) {
  const long hw = h * w;
  const scalar_t q0 = qi[0];
  for (long xp = 0; xp < h; ++xp) {
    const scalar_t bh = rh[xp];
    scalar_t* b = row + xp * w;
    const scalar_t* k0 = kn + xp * w;
    for (long yp = 0; yp < w; ++yp) b[yp] = bh + rw[yp] + q0 * k0[yp];
  }
  for (long t = 1; t < d; ++t) {
    const scalar_t qv = qi[t];
    const scalar_t* kr = kn + t * hw;
    for (long j = 0; j < hw; ++j) row[j] += qv * kr[j];
  }
}

void aa_fwd_SUFFIX(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* th,
                   const scalar_t* tw, scalar_t* out, scalar_t* lse, long bn, long d, long c,
                   long h, long w, int rel, int nt) {
  const long hw = h * w;
  #pragma omp parallel for num_threads(nt) schedule(dynamic, 16)
  for (long r = 0; r < bn * hw; ++r) {
    const long n = r / hw, i = r % hw;
    const scalar_t* qn = q + n * d * hw;
    const scalar_t* vn = v + n * c * hw;
    scalar_t qi[d], rh[h], rw[w], row[hw];
    for (long xp = 0; xp < h; ++xp) rh[xp] = 0;
    for (long yp = 0; yp < w; ++yp) rw[yp] = 0;
    for (long t = 0; t < d; ++t) qi[t] = qn[t * hw + i];
    if (rel) rel_row_SUFFIX(qi, th, tw, d, h, w, i / w, i % w, rh, rw);
    logits_row_SUFFIX(qi, k + n * d * hw, rh, rw, d, h, w, row);
    scalar_t m = row[0];
    for (long j = 1; j < hw; ++j) m = row[j] > m ? row[j] : m;
    scalar_t s = 0, acc0 = 0;
    for (long j = 0; j < hw; ++j) {  /* exp, its sum and the first value channel */
      const scalar_t e = EXP(row[j] - m);
      row[j] = e;
      s += e;
      acc0 += e * vn[j];
    }
    out[n * c * hw + i] = acc0 / s;
    for (long cc = 1; cc < c; ++cc) {
      const scalar_t* vr = vn + cc * hw;
      scalar_t acc = 0;
      for (long j = 0; j < hw; ++j) acc += row[j] * vr[j];
      out[(n * c + cc) * hw + i] = acc / s;
    }
    lse[r] = m + LOG(s);
  }
}

/* dth, dtw: (BN, d, 2H - 1) and (BN, d, 2W - 1) table gradients per (batch, head), zeroed by
   the caller like dk and dv; the caller sums them over BN. */
void aa_bwd_SUFFIX(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* th,
                   const scalar_t* tw, const scalar_t* lse, const scalar_t* dout,
                   const scalar_t* delta, scalar_t* dq, scalar_t* dk, scalar_t* dv,
                   scalar_t* dth, scalar_t* dtw, long bn, long d, long c, long h, long w,
                   int rel, int nt) {
  const long hw = h * w;
  #pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (long n = 0; n < bn; ++n) {
    const scalar_t* qn = q + n * d * hw;
    const scalar_t* kn = k + n * d * hw;
    const scalar_t* vn = v + n * c * hw;
    const scalar_t* gn = dout + n * c * hw;
    scalar_t* dqn = dq + n * d * hw;
    scalar_t* dkn = dk + n * d * hw;
    scalar_t* dvn = dv + n * c * hw;
    scalar_t* dthn = dth + n * (2 * h - 1) * d;
    scalar_t* dtwn = dtw + n * (2 * w - 1) * d;
    scalar_t qi[d], dqi[d], rh[h], rw[w], p[hw], ds[hw];
    for (long xp = 0; xp < h; ++xp) rh[xp] = 0;
    for (long yp = 0; yp < w; ++yp) rw[yp] = 0;
    for (long i = 0; i < hw; ++i) {
      const long r = n * hw + i, x = i / w, y = i % w;
      for (long t = 0; t < d; ++t) qi[t] = qn[t * hw + i];
      if (rel) rel_row_SUFFIX(qi, th, tw, d, h, w, x, y, rh, rw);
      logits_row_SUFFIX(qi, kn, rh, rw, d, h, w, p);
      /* Passes over the row (fused where the loop stays simple enough to vectorise):
         P = exp(logits - lse) with dP - delta and dv from the first value channel; the other
         value channels; dS = P * (dP - delta) with dk, dq from the first key channel; the other
         key channels. */
      const scalar_t l = lse[r], dl = delta[r];
      {
        const scalar_t g = gn[i];
        const scalar_t* vr = vn;
        for (long j = 0; j < hw; ++j) {
          const scalar_t e = EXP(p[j] - l);
          p[j] = e;
          ds[j] = g * vr[j] - dl;
          dvn[j] += g * e;
        }
      }
      for (long cc = 1; cc < c; ++cc) {
        const scalar_t g = gn[cc * hw + i];
        const scalar_t* vr = vn + cc * hw;
        scalar_t* dvr = dvn + cc * hw;
        for (long j = 0; j < hw; ++j) {
          ds[j] += g * vr[j];
          dvr[j] += g * p[j];
        }
      }
      {
        const scalar_t qv = qi[0];
        scalar_t acc = 0;
        for (long j = 0; j < hw; ++j) {
          const scalar_t gs = ds[j] * p[j];
          ds[j] = gs;
          acc += gs * kn[j];
          dkn[j] += gs * qv;
        }
        dqi[0] = acc;
      }
      for (long t = 1; t < d; ++t) {
        const scalar_t qv = qi[t];
        const scalar_t* kr = kn + t * hw;
        scalar_t* dkr = dkn + t * hw;
        scalar_t acc = 0;
        for (long j = 0; j < hw; ++j) {
          acc += ds[j] * kr[j];
          dkr[j] += ds[j] * qv;
        }
        dqi[t] = acc;
      }
      if (rel) {
        /* Gradients of the relative logits: row and column sums of dS, then through the
           tables to q and to the tables. */
        for (long yp = 0; yp < w; ++yp) rw[yp] = 0;
        for (long xp = 0; xp < h; ++xp) {
          const scalar_t* b = ds + xp * w;
          scalar_t acc = 0;
          for (long yp = 0; yp < w; ++yp) {
            acc += b[yp];
            rw[yp] += b[yp];
          }
          rh[xp] = acc;
        }
        for (long t = 0; t < d; ++t) {
          const scalar_t qv = qi[t];
          const scalar_t* eh = th + t * (2 * h - 1) + h - 1 - x;
          const scalar_t* ew = tw + t * (2 * w - 1) + w - 1 - y;
          scalar_t* geh = dthn + t * (2 * h - 1) + h - 1 - x;
          scalar_t* gew = dtwn + t * (2 * w - 1) + w - 1 - y;
          scalar_t a = 0;
          for (long xp = 0; xp < h; ++xp) {
            a += rh[xp] * eh[xp];
            geh[xp] += rh[xp] * qv;
          }
          for (long yp = 0; yp < w; ++yp) {
            a += rw[yp] * ew[yp];
            gew[yp] += rw[yp] * qv;
          }
          dqi[t] += a;
        }
      }
      for (long t = 0; t < d; ++t) dqn[t * hw + i] = dqi[t];
    }
  }
}
"""

# Cephes' expf (S. Moshier): exp(x) = 2^n * P(r), n = round(x / ln 2), |r| <= ln(2) / 2, with
# ln 2 split in two for an exact r; relative error about 1e-7. Inlined so that gcc vectorises it
# with the loop (libmvec's vector expf is a call per 16 floats: a third of the forward's time).
# x is clamped at -87 so that 2^n stays normal (exp(-87) = 1.6e-38 stands for 0 in a sum of
# terms of which the largest is 1). Under -ffast-math the clamp turns a NaN into -87, so the
# caller sends non-finite inputs to the chunked path (:func:`inputs_finite`).
_FAST_EXP = r"""
static inline float fast_expf(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = floorf(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int bits = ((int)n + 127) << 23;
  float scale;
  memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}
"""
_SOURCE = (
    "#include <math.h>\n#include <string.h>\n"
    + _FAST_EXP
    + "".join(
        _BODY.replace("scalar_t", t).replace("SUFFIX", s).replace("EXP", e).replace("LOG", lg)
        for t, s, e, lg in (("float", "f32", "fast_expf", "logf"), ("double", "f64", "exp", "log"))
    )
)
# -ffast-math lets gcc vectorise the max/sum reductions (reassociation) and, for double, call
# glibc's vector exp (libmvec needs -ffinite-math-only, part of fast-math). It also lets the
# compiler assume no NaN/inf: see inputs_finite. Measured per change (28x28, B=4, Nh=8,
# dkh=3, dvh=2, one thread, CPU time, loaded machine, forward / backward ms): scalar libm expf
# (without finite-math) 85 / 68; libmvec vector expf 18.8 / 32.0; with the inlined expf
# above, tables read transposed along contiguous rows and the bias merged into the first
# content pass 13.7 / 24.1; backward passes merged (exp with the first value channel, dS with
# the first key channel) 13.7 / 22.2; exp merged with the first value channel in forward
# 13.3 / 22.2. A single fused pass per row (all of d and c unrolled in one loop) measured
# 19 / 59 with d, c fixed at compile time: the many streams defeat the vectoriser.
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")

_ARGS_FWD = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 5 + [ctypes.c_int] * 2
_ARGS_BWD = [ctypes.c_void_p] * 13 + [ctypes.c_long] * 5 + [ctypes.c_int] * 2


def _cache_dir() -> Path:
    """``$AANAS_KERNEL_CACHE`` or ``~/.cache/aanas/kernels``."""
    env = os.environ.get("AANAS_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "aanas" / "kernels"


def _cpu_flags() -> str:
    """The ``flags`` line of ``/proc/cpuinfo`` (empty where it cannot be read)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return ""


def inputs_finite(*tensors: Tensor | None) -> bool:
    """True when no tensor holds a NaN or inf: the kernel, compiled with ``-ffast-math``,
    promises correct results only then. The check reads ``O(HW)`` values per head, against the
    kernel's ``O((HW)^2)`` work."""
    return all(t is None or bool(torch.isfinite(t).all()) for t in tensors)


def _compiler() -> str | None:
    """The C compiler: ``$CC``, else ``cc``, else ``gcc`` on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> ctypes.CDLL:
    """Compiles (or reuses) the shared library and declares its functions' signatures."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"fused CPU attention kernel is built on Linux only, not {sys.platform}")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc)")
    # -march=native: the CPU's feature flags join the key, so a cache folder shared between
    # machines never hands one of them another's instructions.
    key = hashlib.sha256(
        "\n".join((_SOURCE, " ".join(_FLAGS), cc, platform.machine(), _cpu_flags())).encode()
    ).hexdigest()[:16]
    cache = _cache_dir()
    lib_path = cache / f"aa_fused_{key}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "aa_fused.c"
            src.write_text(_SOURCE)
            out = Path(tmp) / "aa_fused.so"
            cmd = [cc, *_FLAGS, "-shared", str(src), "-o", str(out), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
            os.replace(out, lib_path)  # atomic: concurrent builders leave one whole file
        _log.info("built fused attention kernel %s", lib_path)
    lib = ctypes.CDLL(str(lib_path))
    for suffix in ("f32", "f64"):
        getattr(lib, f"aa_fwd_{suffix}").argtypes = _ARGS_FWD
        getattr(lib, f"aa_fwd_{suffix}").restype = None
        getattr(lib, f"aa_bwd_{suffix}").argtypes = _ARGS_BWD
        getattr(lib, f"aa_bwd_{suffix}").restype = None
    return lib


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The loaded kernel, or None (after one warning) where it cannot be built."""
    try:
        return _build()
    except (OSError, RuntimeError, subprocess.SubprocessError) as err:
        warnings.warn(
            f"fused CPU attention kernel unavailable ({err}); using the chunked path",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


def available() -> bool:
    """True where the kernel is built and loaded (builds it on the first call)."""
    return _library() is not None


def _ptr(t: Tensor) -> int:
    return int(t.data_ptr())


class _FusedRelAttention(torch.autograd.Function):
    """Autograd wrapper of the C kernel: inputs ``qt, kt, vt, t_h, t_w``, output ``o``.

    Saves q, k, v, the two tables, the output and ``lse``: ``O(HW)`` per head, nothing of
    size ``(HW)^2``. The table gradients are accumulated per (batch, head) by the kernel, so
    threads never share an accumulator, and summed here.
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
    ) -> Tensor:
        lib = _library()
        assert lib is not None, "caller checks available()"
        bn, d, hw = qt.shape
        c, h = vt.shape[1], hw // w
        rel = t_h is not None and t_w is not None
        # Transposed tables (d, 2L - 1): the kernel reads them along contiguous rows.
        th = t_h.t().contiguous() if t_h is not None else qt.new_zeros(d, 2 * h - 1)
        tw = t_w.t().contiguous() if t_w is not None else qt.new_zeros(d, 2 * w - 1)
        out = qt.new_empty(bn, c, hw)  # (BN, dvh, HW)
        lse = qt.new_empty(bn, hw)  # (BN, HW)
        fn = lib.aa_fwd_f32 if qt.dtype == torch.float32 else lib.aa_fwd_f64
        tensors = (qt, kt, vt, th, tw, out, lse)
        fn(*map(_ptr, tensors), bn, d, c, h, w, int(rel), torch.get_num_threads())
        ctx.save_for_backward(qt, kt, vt, th, tw, out, lse)
        ctx.rel, ctx.w = rel, w  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        lib = _library()
        assert lib is not None
        qt, kt, vt, th, tw, out, lse = ctx.saved_tensors
        bn, d, hw = qt.shape
        c, w = vt.shape[1], ctx.w
        h = hw // w
        g = grad_out.contiguous()  # (BN, dvh, HW)
        delta = (g * out).sum(1)  # (BN, HW): rowsum(dO * O) per query
        dq = torch.empty_like(qt)
        dk = torch.zeros_like(kt)
        dv = torch.zeros_like(vt)
        dth = qt.new_zeros(bn, d, 2 * h - 1) if ctx.rel else qt.new_zeros(1)
        dtw = qt.new_zeros(bn, d, 2 * w - 1) if ctx.rel else qt.new_zeros(1)
        fn = lib.aa_bwd_f32 if qt.dtype == torch.float32 else lib.aa_bwd_f64
        tensors = (qt, kt, vt, th, tw, lse, g, delta, dq, dk, dv, dth, dtw)
        fn(*map(_ptr, tensors), bn, d, c, h, w, int(ctx.rel), torch.get_num_threads())
        if not ctx.rel:
            return dq, dk, dv, None, None, None
        return dq, dk, dv, dth.sum(0).t(), dtw.sum(0).t(), None


def fused_relative_attention(
    qt: Tensor, kt: Tensor, vt: Tensor, t_h: Tensor | None, t_w: Tensor | None, w: int
) -> Tensor:
    """Softmax attention with 2D relative logits, ``(BN, dvh, HW)``, through the fused kernel.

    Args:
        qt: ``(BN, dkh, HW)`` scaled queries (CPU, float32 or float64), ``HW = H * W``.
        kt: ``(BN, dkh, HW)`` keys.
        vt: ``(BN, dvh, HW)`` values.
        t_h: ``(2H - 1, dkh)`` height table, row ``o + H - 1`` for offset ``o``; or None.
        t_w: ``(2W - 1, dkh)`` width table; given iff ``t_h`` is.
        w: map width ``W``.

    Returns:
        ``(BN, dvh, HW)``, channel-major like the inputs.
    """
    tables = [None if t is None else t.contiguous() for t in (t_h, t_w)]
    out: Tensor = _FusedRelAttention.apply(
        qt.contiguous(), kt.contiguous(), vt.contiguous(), *tables, w
    )
    return out
