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
``~/.cache/aanas/kernels``), named by a hash of source and flags, written atomically so that
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

__all__ = ["available", "fused_relative_attention"]

_log = logging.getLogger(__name__)

# One body, instantiated for float and double (double serves gradcheck). Layouts, all
# contiguous: q, k (BN, d, HW) with q already scaled; v (BN, c, HW); rh (BN, HW, H) and
# rw (BN, HW, W) the relative logits of each query against every key row / key column;
# out (BN, c, HW); lse (BN, HW). Rows are independent in forward (parallel over BN * HW);
# backward accumulates dk, dv per (batch, head) and runs in parallel over BN.
_BODY = r"""
/* rh[x'] = q_i . tH[x' - x + H - 1], rw[y'] = q_i . tW[y' - y + W - 1] for query i = (x, y). */
static void rel_row_SUFFIX(const scalar_t* qi, const scalar_t* th, const scalar_t* tw, long d,
                           long h, long w, long x, long y, scalar_t* rh, scalar_t* rw) {
  for (long xp = 0; xp < h; ++xp) {
    const scalar_t* e = th + (xp - x + h - 1) * d;
    scalar_t acc = 0;
    for (long t = 0; t < d; ++t) acc += qi[t] * e[t];
    rh[xp] = acc;
  }
  for (long yp = 0; yp < w; ++yp) {
    const scalar_t* e = tw + (yp - y + w - 1) * d;
    scalar_t acc = 0;
    for (long t = 0; t < d; ++t) acc += qi[t] * e[t];
    rw[yp] = acc;
  }
}

/* row[j] = rh[x'] + rw[y'] + sum_t qi[t] k[t][j], j = x' * W + y'. */
static void logits_row_SUFFIX(const scalar_t* qi, const scalar_t* kn, const scalar_t* rh,
                              const scalar_t* rw, long d, long h, long w, scalar_t* row) {
  const long hw = h * w;
  for (long xp = 0; xp < h; ++xp) {
    const scalar_t bh = rh[xp];
    scalar_t* b = row + xp * w;
    for (long yp = 0; yp < w; ++yp) b[yp] = bh + rw[yp];
  }
  for (long t = 0; t < d; ++t) {
    const scalar_t qv = qi[t];
    const scalar_t* kr = kn + t * hw;
    for (long j = 0; j < hw; ++j) row[j] += qv * kr[j];
  }
}

void aa_fwd_SUFFIX(const scalar_t* q, const scalar_t* k, const scalar_t* v, const scalar_t* th,
                   const scalar_t* tw, scalar_t* out, scalar_t* lse, long bn, long d, long c,
                   long h, long w, int rel, int nt) {
  const long hw = h * w;
  #pragma omp parallel for num_threads(nt) schedule(static)
  for (long r = 0; r < bn * hw; ++r) {
    const long n = r / hw, i = r % hw;
    const scalar_t* qn = q + n * d * hw;
    const scalar_t* vn = v + n * c * hw;
    scalar_t qi[d], rh[h], rw[w], row[hw];
    for (long t = 0; t < d; ++t) qi[t] = qn[t * hw + i];
    for (long xp = 0; xp < h; ++xp) rh[xp] = 0;
    for (long yp = 0; yp < w; ++yp) rw[yp] = 0;
    if (rel) rel_row_SUFFIX(qi, th, tw, d, h, w, i / w, i % w, rh, rw);
    logits_row_SUFFIX(qi, k + n * d * hw, rh, rw, d, h, w, row);
    scalar_t m = row[0];
    for (long j = 1; j < hw; ++j) m = row[j] > m ? row[j] : m;
    scalar_t s = 0;
    for (long j = 0; j < hw; ++j) {
      const scalar_t e = EXP(row[j] - m);
      row[j] = e;
      s += e;
    }
    for (long cc = 0; cc < c; ++cc) {
      const scalar_t* vr = vn + cc * hw;
      scalar_t acc = 0;
      for (long j = 0; j < hw; ++j) acc += row[j] * vr[j];
      out[(n * c + cc) * hw + i] = acc / s;
    }
    lse[r] = m + LOG(s);
  }
}

/* dth, dtw: (BN, 2H - 1, d) and (BN, 2W - 1, d) table gradients per (batch, head), zeroed by
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
    for (long i = 0; i < hw; ++i) {
      const long r = n * hw + i, x = i / w, y = i % w;
      for (long t = 0; t < d; ++t) qi[t] = qn[t * hw + i];
      for (long xp = 0; xp < h; ++xp) rh[xp] = 0;
      for (long yp = 0; yp < w; ++yp) rw[yp] = 0;
      if (rel) rel_row_SUFFIX(qi, th, tw, d, h, w, x, y, rh, rw);
      logits_row_SUFFIX(qi, kn, rh, rw, d, h, w, p);
      const scalar_t l = lse[r];
      for (long j = 0; j < hw; ++j) p[j] = EXP(p[j] - l);
      for (long j = 0; j < hw; ++j) ds[j] = -delta[r];
      for (long cc = 0; cc < c; ++cc) {
        const scalar_t g = gn[cc * hw + i];
        const scalar_t* vr = vn + cc * hw;
        scalar_t* dvr = dvn + cc * hw;
        for (long j = 0; j < hw; ++j) {
          ds[j] += g * vr[j];
          dvr[j] += g * p[j];
        }
      }
      for (long j = 0; j < hw; ++j) ds[j] *= p[j];
      for (long t = 0; t < d; ++t) {
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
        for (long xp = 0; xp < h; ++xp) {
          const long o = (xp - x + h - 1) * d;
          for (long t = 0; t < d; ++t) {
            dqi[t] += rh[xp] * th[o + t];
            dthn[o + t] += rh[xp] * qi[t];
          }
        }
        for (long yp = 0; yp < w; ++yp) {
          const long o = (yp - y + w - 1) * d;
          for (long t = 0; t < d; ++t) {
            dqi[t] += rw[yp] * tw[o + t];
            dtwn[o + t] += rw[yp] * qi[t];
          }
        }
      }
      for (long t = 0; t < d; ++t) dqn[t * hw + i] = dqi[t];
    }
  }
}
"""

_SOURCE = "#include <math.h>\n" + "".join(
    _BODY.replace("scalar_t", t).replace("SUFFIX", s).replace("EXP", e).replace("LOG", lg)
    for t, s, e, lg in (("float", "f32", "expf", "logf"), ("double", "f64", "exp", "log"))
)
# -ffast-math lets gcc vectorise the max/sum reductions and call glibc's vector expf
# (libmvec's _ZGVdN8v_expf; without -ffinite-math-only, which fast-math implies, gcc calls the
# scalar expf and the forward ran 3x slower). A NaN or inf in q/k/v still reaches the output:
# the arithmetic stays IEEE, only compile-time assumptions change (tested).
_FLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC")

_ARGS_FWD = [ctypes.c_void_p] * 7 + [ctypes.c_long] * 5 + [ctypes.c_int] * 2
_ARGS_BWD = [ctypes.c_void_p] * 13 + [ctypes.c_long] * 5 + [ctypes.c_int] * 2


def _cache_dir() -> Path:
    """``$AANAS_KERNEL_CACHE`` or ``~/.cache/aanas/kernels``."""
    env = os.environ.get("AANAS_KERNEL_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "aanas" / "kernels"


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
    key = hashlib.sha256((_SOURCE + " ".join(_FLAGS) + cc).encode()).hexdigest()[:16]
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
        th = t_h if t_h is not None else qt.new_zeros(2 * h - 1, d)
        tw = t_w if t_w is not None else qt.new_zeros(2 * w - 1, d)
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
        dth = qt.new_zeros(bn, 2 * h - 1, d) if ctx.rel else qt.new_zeros(1)
        dtw = qt.new_zeros(bn, 2 * w - 1, d) if ctx.rel else qt.new_zeros(1)
        fn = lib.aa_bwd_f32 if qt.dtype == torch.float32 else lib.aa_bwd_f64
        tensors = (qt, kt, vt, th, tw, lse, g, delta, dq, dk, dv, dth, dtw)
        fn(*map(_ptr, tensors), bn, d, c, h, w, int(ctx.rel), torch.get_num_threads())
        if not ctx.rel:
            return dq, dk, dv, None, None, None
        return dq, dk, dv, dth.sum(0), dtw.sum(0), None


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
