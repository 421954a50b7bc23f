"""Fused CPU kernel for relative self-attention (Bello et al., arXiv:1904.09925).

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

This kernel keeps four query rows' logits (``4 HW`` values, 14 KiB at 28x28) in cache and does
all the per-logit work in a few passes over them, flash-attention style, one vector of keys
at a time (GCC vector extensions: whole AVX-512 registers here, halves or quarters elsewhere):

* forward: each query's relative logits against the ``2H - 1`` / ``2W - 1`` table rows it uses
  (``H + W`` dot products); logits = ``rel_h[x'] + rel_w[y'] + q_i · k_j`` and their max in
  one pass; ``2^(logit - max)`` (logits in base 2: q is scaled by ``log2 e``), its sum and
  ``o_c = sum_j p_j v_cj / s`` in a second; saves ``lse = m + log2 s`` per query.
* backward: recomputes ``p`` from ``lse``; ``dS = p * (dO_i · v_j - delta_i)`` with
  ``dv += p dO``; ``dk += dS q``, ``dq = dS k``; the row/column sums of ``dS``, which are the
  gradients of the relative logits, carried on to ``dq`` and to the tables.

The four rows share every load of k and v and every update of dk and dv (a quarter of the
memory traffic of one row at a time) and give the core four independent exp chains. Key rows
are padded to whole vectors (28 -> 32 positions; padded keys get weight 0), so no loop has a
scalar remainder. No ``(HW)^2`` tensor is ever allocated, and nothing but the kernel runs per
logit. The kernel also does the small jobs around the core, which as separate torch ops cost
more than the core at MnasNet's 7x7 and 14x14 maps: it reads q, k, v where the qkv projection
left them (channel slices, no copies), scales q, pads k and v, checks the inputs are finite,
computes the backward's ``delta`` and writes unpadded gradients (28x28: 0.48 -> 0.19 ms of
glue per call, forward + backward; 7x7: 0.20 -> 0.09 ms).

(A first version took the relative logits ``(BN, HW, H)`` and ``(BN, HW, W)`` from autograd ops
around the kernel; their thin matmuls and the strided view's backward cost a third of its time.
The second went one row at a time through loops gcc vectorised itself: 28x28, B=4, Nh=8, one
thread, quiet: 8.4 / 13.3 ms forward / backward, against 5.4 / 9.3 now.)

The C source is compiled once per machine with the system C compiler (``cc``/``gcc``;
``-O3 -march=native -fopenmp``) into ``$AANAS_KERNEL_CACHE`` (default
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
from torch.nn import functional as F

__all__ = ["MAX_POSITIONS", "available", "fused_relative_attention"]

_log = logging.getLogger(__name__)

# Largest map (H * W) the kernel takes: 128 x 128 maps already mean 2**28 logits per head and
# image; larger ones run chunked. (The row buffers live on the heap; the thread stacks hold a
# few values per key row and column.)
MAX_POSITIONS = 128 * 128

# Every loop over a query's keys runs over whole vectors of VL lanes, written with GCC's vector
# extensions (GCC and clang lower them to the machine's widest registers, or to pairs of
# narrower ones). For that the keys are padded: each key row of W positions is stored with
# WP >= W positions, WP a multiple of VL (AA-ResNet-50's 28 -> 32 with 16 lanes), the padding
# lanes get a logit of -1e30, hence weight 0. Layouts: q, k, v (B, heads * d | c, H, W) with
# whole channel maps contiguous and a batch stride of their own (q is scaled in the kernel); k
# and v padded by the kernel into (BN, d | c, H * WP), BN = B * heads; th (d, THL) and tw (d, TWL)
# the transposed tables, zero-padded from 2L - 1 to THL = 2H - 1 + HP - H (HP = H rounded up to
# whole vectors) and TWL = 2W - 1 + WP - W columns so that whole-vector reads stay inside them;
# out (BN, c, HW); lse (BN, HW), base 2. Forward runs groups of four query rows in parallel,
# backward (batch, head) pairs (it accumulates dk, dv per pair). Both loops hand out work
# dynamically: on a shared machine a thread that loses its core for a while then holds up the
# others less than with a static split.
_VECTOR = r"""
/* vec: values, locals and arrays of them (naturally aligned, so a stack array never splits a
   vector over two cache lines); uvec: loads and stores at any scalar's address. */
typedef scalar_t vec_SUFFIX __attribute__((vector_size(VB)));
typedef itype_t ivec_SUFFIX __attribute__((vector_size(VB)));
typedef scalar_t uvec_SUFFIX __attribute__((vector_size(VB), aligned(sizeof(scalar_t)), may_alias));
#define LD_SUFFIX(p) ((vec_SUFFIX)(*(const uvec_SUFFIX*)(p)))
#define ST_SUFFIX(p, x) (*(uvec_SUFFIX*)(p) = (uvec_SUFFIX)(x))

static inline vec_SUFFIX vmax_SUFFIX(vec_SUFFIX a, vec_SUFFIX b) {
  const ivec_SUFFIX m = a > b;
  return (vec_SUFFIX)(((ivec_SUFFIX)a & m) | ((ivec_SUFFIX)b & ~m));
}

/* Head n = (batch n / heads, head n % heads) of a (B, heads * ch, H, W) map with whole channel
   maps contiguous and batch stride sb: its ch channels, contiguous from here. */
static inline const scalar_t* head_SUFFIX(const scalar_t* base, long sb, long heads, long ch,
                                          long hw, long n) {
  return base + (n / heads) * sb + (n % heads) * ch * hw;
}

static inline scalar_t hmax_SUFFIX(vec_SUFFIX a) {
  scalar_t m = a[0];
  for (int l = 1; l < VL; ++l) m = a[l] > m ? a[l] : m;
  return m;
}
"""

_HEADER = r"""
#include <math.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#define BASE2_SCALE 1.44269504088896340736  /* log2(e) */
"""

# 2^y on whole vectors, y <= 0 (the kernel works in base 2: it scales q by log2(e), so the
# logits come out multiplied by log2(e) and 2^(logit - max) is the softmax's exp): n = round(y),
# f = y - n exact, |f| <= 1/2, 2^f by a polynomial of degree 5 fitted here for minimal relative
# error on [-1/2, 1/2] (1.9e-7 at most, evaluated in float32; Cephes' degree-7 expf: about
# 1e-7), times 2^n. With AVX-512 rounding and scaling by 2^n are one instruction each
# (vrndscaleps, vscalefps); elsewhere the 1.5 * 2^23 trick rounds and leaves n + 127 in the low
# bits, two integer ops from 2^n. Below -126 the result is exactly 0 (2^-126 = 1.2e-38 against a
# largest term of 1 in every sum it enters), which zeroes the padding lanes (logit -1e30) and
# keeps denormals out. Non-finite inputs never get here (aa_fwd checks them first); the kernel is
# built without -ffast-math, which would fold the rounding trick away.
_EXP_F32 = r"""
static inline vec_SUFFIX poly_exp2_SUFFIX(vec_SUFFIX f) {
  vec_SUFFIX p = f * 1.326472731307149e-3f + 9.671512991189957e-3f;
  p = p * f + 5.550733581185341e-2f;
  p = p * f + 2.4022242426872253e-1f;
  p = p * f + 6.931470036506653e-1f;
  return p * f + 1.0f;
}
#if VB == 64 && defined(__AVX512F__)
static inline vec_SUFFIX vexp2_SUFFIX(vec_SUFFIX y) {
  const __m512 n = _mm512_roundscale_ps((__m512)y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask16 live = _mm512_cmp_ps_mask((__m512)y, _mm512_set1_ps(-126.0f), _CMP_GE_OQ);
  return (vec_SUFFIX)_mm512_maskz_scalef_ps(live, (__m512)poly_exp2_SUFFIX(y - (vec_SUFFIX)n), n);
}
#elif VB == 32 && defined(__AVX512VL__)
static inline vec_SUFFIX vexp2_SUFFIX(vec_SUFFIX y) {
  const __m256 n = _mm256_roundscale_ps((__m256)y, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __mmask8 live = _mm256_cmp_ps_mask((__m256)y, _mm256_set1_ps(-126.0f), _CMP_GE_OQ);
  return (vec_SUFFIX)_mm256_maskz_scalef_ps(live, (__m256)poly_exp2_SUFFIX(y - (vec_SUFFIX)n), n);
}
#else
static inline vec_SUFFIX vexp2_SUFFIX(vec_SUFFIX y) {
  const vec_SUFFIX zero = {0};
  const ivec_SUFFIX live = y >= zero - 126.0f;
  const vec_SUFFIX t = y + 12582912.0f;
  const vec_SUFFIX p = poly_exp2_SUFFIX(y - (t - 12582912.0f));
  const vec_SUFFIX e = p * (vec_SUFFIX)(((ivec_SUFFIX)t + 127) << 23);
  return (vec_SUFFIX)((ivec_SUFFIX)e & live);
}
#endif
"""

# Double precision serves gradcheck and the tests, not speed: libm's exp2 lane by lane.
_EXP_F64 = r"""
static inline vec_SUFFIX vexp2_SUFFIX(vec_SUFFIX y) {
  vec_SUFFIX e;
  for (int l = 0; l < VL; ++l) e[l] = exp2(y[l]);
  return e;
}
"""

_BODY = r"""
/* rh[x'] = q_i . tH[x' - x + H - 1] (x' < H) and rw[y'] = q_i . tW[y' - y + W - 1] (y' < W)
   for query i = (x, y); rw's padding lanes y' >= W get -1e30, so that padded keys weigh 0. */
static void rel_bias_SUFFIX(const scalar_t* restrict qi, const scalar_t* restrict th,
                            const scalar_t* restrict tw, long d, long h, long w, long wp,
                            long thl, long twl, long x, long y, int rel, scalar_t* restrict rh,
                            vec_SUFFIX* restrict rw) {
  const long sb = wp / VL;
  for (long xp = 0; xp < h; ++xp) rh[xp] = 0;
  for (long ob = 0; ob < sb; ++ob) rw[ob] = (vec_SUFFIX){0};
  if (rel) {
    for (long t = 0; t < d; ++t) {
      const scalar_t qv = qi[t];
      const scalar_t* eh = th + t * thl + h - 1 - x;
      const scalar_t* ew = tw + t * twl + w - 1 - y;
      for (long xp = 0; xp < h; ++xp) rh[xp] += qv * eh[xp];
      for (long ob = 0; ob < sb; ++ob) rw[ob] += qv * LD_SUFFIX(ew + ob * VL);
    }
  }
  for (long yp = w; yp < wp; ++yp) rw[yp / VL][yp % VL] = -1e30;
}

/* row[a * nb + b] = logits of query row a (of Q) against the keys of vector b: bias + q . k,
   the loads of k shared by the Q rows. With exp == 0 also m[a] = their maximum; with exp != 0
   stores 2^(logits - sub[a]) instead. Q and D (the key depth, where small) are constants
   after inlining (see logits_SUFFIX). */
static inline __attribute__((always_inline)) void logits_qd_SUFFIX(
    const int Q, const long D, const scalar_t* restrict qs, const scalar_t* restrict kn,
    const scalar_t* restrict rh, const vec_SUFFIX* restrict rw, long h, long sb, long hwp,
    long nb, int exp, scalar_t* restrict m, vec_SUFFIX* restrict row) {
  const vec_SUFFIX zero = {0};
  vec_SUFFIX mv[Q];
  for (int a = 0; a < Q; ++a) mv[a] = zero - (scalar_t)1e30;
  for (long xp = 0, b = 0; xp < h; ++xp) {
    #pragma GCC unroll 2
    for (long ob = 0; ob < sb; ++ob) {
      const scalar_t* kb = kn + (b + ob) * VL;
      vec_SUFFIX sa[Q];
      for (int a = 0; a < Q; ++a) sa[a] = rw[a * sb + ob] + rh[a * h + xp];
      for (long t = 0; t < D; ++t) {
        const vec_SUFFIX kv = LD_SUFFIX(kb + t * hwp);
        for (int a = 0; a < Q; ++a) sa[a] += qs[a * D + t] * kv;
      }
      for (int a = 0; a < Q; ++a) {
        if (exp) {
          row[a * nb + b + ob] = vexp2_SUFFIX(sa[a] - m[a]);
        } else {
          row[a * nb + b + ob] = sa[a];
          mv[a] = vmax_SUFFIX(mv[a], sa[a]);
        }
      }
    }
    b += sb;
  }
  if (!exp)
    for (int a = 0; a < Q; ++a) m[a] = hmax_SUFFIX(mv[a]);
}

static inline __attribute__((always_inline)) void logits_SUFFIX(
    const int Q, const scalar_t* restrict qs, const scalar_t* restrict kn,
    const scalar_t* restrict rh, const vec_SUFFIX* restrict rw, long d, long h, long sb,
    long hwp, long nb, int exp, scalar_t* restrict m, vec_SUFFIX* restrict row) {
  switch (d) {
    case 1: logits_qd_SUFFIX(Q, 1, qs, kn, rh, rw, h, sb, hwp, nb, exp, m, row); break;
    case 2: logits_qd_SUFFIX(Q, 2, qs, kn, rh, rw, h, sb, hwp, nb, exp, m, row); break;
    case 3: logits_qd_SUFFIX(Q, 3, qs, kn, rh, rw, h, sb, hwp, nb, exp, m, row); break;
    case 4: logits_qd_SUFFIX(Q, 4, qs, kn, rh, rw, h, sb, hwp, nb, exp, m, row); break;
    default: logits_qd_SUFFIX(Q, d, qs, kn, rh, rw, h, sb, hwp, nb, exp, m, row);
  }
}

/* Channel groups of G <= 4 channels per pass over a row, G a constant after inlining, so that
   the G accumulators live in registers (in arrays they would carry every iteration's
   dependency through memory). */
#define GROUPS_SUFFIX(n, CALL)                                   \
  for (long c0 = 0; c0 < (n); c0 += 4) {                         \
    switch ((n) - c0 < 4 ? (n) - c0 : 4) {                       \
      case 1: CALL(1); break;                                    \
      case 2: CALL(2); break;                                    \
      case 3: CALL(3); break;                                    \
      default: CALL(4);                                          \
    }                                                            \
  }

/* Forward, value channels c0 .. c0 + G - 1 of Q query rows: acc = sum_j e_j v_j (vectors,
   lanes summed by the caller). The first group turns the logits into e = 2^(logits - m) in
   place and sums them (sv). */
static inline __attribute__((always_inline)) void fwd_values_SUFFIX(
    const int Q, const int G, int first, vec_SUFFIX* restrict row, const scalar_t* restrict vc,
    long hwp, long nb, const scalar_t* restrict m, vec_SUFFIX* restrict sv,
    vec_SUFFIX* restrict acc, long c) {
  const vec_SUFFIX zero = {0};
  vec_SUFFIX av[Q][G], sa[Q];
  for (int a = 0; a < Q; ++a) {
    sa[a] = zero;
    for (int u = 0; u < G; ++u) av[a][u] = zero;
  }
  for (long b = 0; b < nb; ++b) {
    vec_SUFFIX vv[G];
    for (int u = 0; u < G; ++u) vv[u] = LD_SUFFIX(vc + u * hwp + b * VL);
    for (int a = 0; a < Q; ++a) {
      vec_SUFFIX e = row[a * nb + b];
      if (first) {
        e = vexp2_SUFFIX(e - m[a]);
        row[a * nb + b] = e;
        sa[a] += e;
      }
      for (int u = 0; u < G; ++u) av[a][u] += e * vv[u];
    }
  }
  for (int a = 0; a < Q; ++a) {
    if (first) sv[a] = sa[a];
    for (int u = 0; u < G; ++u) acc[a * c + u] = av[a][u];
  }
}

/* Forward of Q query rows i0 .. i0 + Q - 1 of one (batch, head) (Q a constant after
   inlining): their logits (sharing the loads of k) and maxima in one pass, then 2^(logits -
   max), its sum and the weighted values (sharing the loads of v); lanes summed in bulk. */
static inline __attribute__((always_inline)) void fwd_rows_SUFFIX(
    const int Q, long i0, const scalar_t* restrict qn, const scalar_t* restrict kn,
    const scalar_t* restrict vn, const scalar_t* restrict th, const scalar_t* restrict tw,
    scalar_t* restrict outn, scalar_t* restrict lsen, long d, long c, long h, long w, long wp,
    long thl, long twl, scalar_t scale, int rel, vec_SUFFIX* restrict row) {
  const long hw = h * w, hwp = h * wp, sb = wp / VL, nb = hwp / VL;
  scalar_t qs[Q * d], rh[Q * h], m[Q], ssum[Q], osum[Q * c];
  vec_SUFFIX rw[Q * sb], sv[Q], acc[Q * c];
  for (int a = 0; a < Q; ++a) {
    const long i = i0 + a;
    for (long t = 0; t < d; ++t) qs[a * d + t] = qn[t * hw + i] * scale;
    rel_bias_SUFFIX(qs + a * d, th, tw, d, h, w, wp, thl, twl, i / w, i % w, rel, rh + a * h,
                    rw + a * sb);
  }
  logits_SUFFIX(Q, qs, kn, rh, rw, d, h, sb, hwp, nb, 0, m, row);
#define FWD_VALUES_SUFFIX(G) \
  fwd_values_SUFFIX(Q, G, c0 == 0, row, vn + c0 * hwp, hwp, nb, m, sv, acc + c0, c)
  GROUPS_SUFFIX(c, FWD_VALUES_SUFFIX)
#undef FWD_VALUES_SUFFIX
  lane_sums_SUFFIX(sv, Q, ssum);
  lane_sums_SUFFIX(acc, Q * c, osum);
  for (int a = 0; a < Q; ++a) {
    for (long cc = 0; cc < c; ++cc) outn[cc * hw + i0 + a] = osum[a * c + cc] / ssum[a];
    lsen[i0 + a] = m[a] + LOG(ssum[a]);
  }
}

/* Copies (batch, head) n's ch channels of src (channel-major, batch stride sb, heads * ch
   channels) into dst (ch, H, WP), each key row zero-padded from W to WP; returns 1 if any value
   copied is not finite. */
static int pad_rows_SUFFIX(const scalar_t* restrict src, long sb, long heads, long ch, long h,
                           long w, long wp, long n, scalar_t* restrict dst) {
  const long hw = h * w, hwp = h * wp;
  const scalar_t* s = head_SUFFIX(src, sb, heads, ch, hw, n);
  scalar_t* o = dst + n * ch * hwp;
  int bad = 0;
  for (long t = 0; t < ch; ++t)
    for (long x = 0; x < h; ++x) {
      const scalar_t* sr = s + t * hw + x * w;
      scalar_t* orow = o + t * hwp + x * wp;
      for (long y = 0; y < w; ++y) {
        orow[y] = sr[y];
        bad |= !isfinite(sr[y]);
      }
      for (long y = w; y < wp; ++y) orow[y] = 0;
    }
  return bad;
}

/* 1 if any of the n values is not finite (pad_rows' convention). */
static int nonfinite_SUFFIX(const scalar_t* restrict x, long n) {
  int bad = 0;
  for (long i = 0; i < n; ++i) bad |= !isfinite(x[i]);
  return bad;
}

/* q, k, v: (B, heads * d | d | c, H, W) channel-major views with batch strides qsb, ksb, vsb
   (channel slices of one qkv tensor need no copy); kp, vp get k and v padded, (BN, d | c,
   H * WP). First the copies and a check that q, k, v and the tables are finite (returns 1
   without computing anything otherwise); then query rows four at a time (the last hw % 4 of
   each (batch, head) one at a time), in parallel, each thread keeping four rows' logits in one
   buffer. scale multiplies q (dkh^-1/2). */
int aa_fwd_SUFFIX(const scalar_t* restrict q, const scalar_t* restrict k,
                  const scalar_t* restrict v, const scalar_t* restrict th,
                  const scalar_t* restrict tw, scalar_t* restrict kp, scalar_t* restrict vp,
                  scalar_t* restrict out, scalar_t* restrict lse, long bn, long heads, long d,
                  long c, long h, long w, long wp, long thl, long twl, long qsb, long ksb,
                  long vsb, scalar_t scale, int rel, int nt) {
  const long hw = h * w, hwp = h * wp, nb = hwp / VL, ng = (hw + 3) / 4;
  if (rel && (nonfinite_SUFFIX(th, d * thl) || nonfinite_SUFFIX(tw, d * twl))) return 1;
  int bad = 0;
  #pragma omp parallel for num_threads(nt) schedule(static) reduction(| : bad)
  for (long n = 0; n < bn; ++n) {
    bad |= pad_rows_SUFFIX(k, ksb, heads, d, h, w, wp, n, kp);
    bad |= pad_rows_SUFFIX(v, vsb, heads, c, h, w, wp, n, vp);
    bad |= nonfinite_SUFFIX(head_SUFFIX(q, qsb, heads, d, hw, n), d * hw);
  }
  if (bad) return 1;
  const scalar_t qscale = scale * (scalar_t)BASE2_SCALE;
  #pragma omp parallel num_threads(nt)
  {
    vec_SUFFIX* row = aligned_alloc(64, 4 * nb * sizeof(vec_SUFFIX));  /* whole cache lines */
    #pragma omp for schedule(dynamic, 4)
    for (long r = 0; r < bn * ng; ++r) {
      const long n = r / ng, i0 = (r % ng) * 4;
      const scalar_t* qn = head_SUFFIX(q, qsb, heads, d, hw, n);
#define FWD_ROWS_SUFFIX(Q, i)                                                               \
      fwd_rows_SUFFIX(Q, i, qn, kp + n * d * hwp, vp + n * c * hwp, th, tw,                 \
                      out + n * c * hw, lse + n * hw, d, c, h, w, wp, thl, twl, qscale,     \
                      rel, row)
      if (i0 + 4 <= hw) {
        FWD_ROWS_SUFFIX(4, i0);
      } else {
        for (long i = i0; i < hw; ++i) FWD_ROWS_SUFFIX(1, i);
      }
#undef FWD_ROWS_SUFFIX
    }
    free(row);
  }
  return 0;
}

/* Backward, key channels c0 .. c0 + G - 1 of Q query rows: dk += sum_q dS_q q_q and
   dq_q = dS_q . k (as vectors: their lanes are summed later, with the relative terms'). */
static inline __attribute__((always_inline)) void bwd_keys_SUFFIX(
    const int Q, const int G, const vec_SUFFIX* restrict ds, long nb, const scalar_t* restrict kc,
    scalar_t* restrict dkc, const scalar_t* restrict qc, long d, vec_SUFFIX* restrict dqc,
    long hwp) {
  const vec_SUFFIX zero = {0};
  vec_SUFFIX acc[Q][G];
  for (int a = 0; a < Q; ++a)
    for (int u = 0; u < G; ++u) acc[a][u] = zero;
  for (long b = 0; b < nb; ++b) {
    for (int u = 0; u < G; ++u) {
      const vec_SUFFIX kv = LD_SUFFIX(kc + u * hwp + b * VL);
      scalar_t* dkb = dkc + u * hwp + b * VL;
      vec_SUFFIX dka = zero;
      for (int a = 0; a < Q; ++a) {
        const vec_SUFFIX g = ds[a * nb + b];
        acc[a][u] += g * kv;
        dka += g * qc[a * d + u];
      }
      ST_SUFFIX(dkb, LD_SUFFIX(dkb) + dka);
    }
  }
  for (int a = 0; a < Q; ++a)
    for (int u = 0; u < G; ++u) dqc[a * d + u] = acc[a][u];
}

/* Backward of Q query rows i0 .. i0 + Q - 1 of one (batch, head) (Q a constant after
   inlining): they share every pass over k, v, dk and dv, which quarters that memory traffic for
   Q = 4. Per row: P = exp(logits - lse) (logits recomputed); then dp = dO_i . v - delta_i with
   dv, dS = P * dp and its sums over key rows (gx) and columns (gw, lanes are columns), the
   relative logits' gradients; then dk and dq by groups of key channels; last the relative
   terms through the tables to dq and to the tables. Lanes are summed in bulk (lane_sums). */
static inline __attribute__((always_inline)) void bwd_rows_SUFFIX(
    const int Q, long i0, const scalar_t* restrict qn, const scalar_t* restrict kn,
    const scalar_t* restrict vn, const scalar_t* restrict th, const scalar_t* restrict tw,
    const scalar_t* restrict lse, const scalar_t* restrict gn, const scalar_t* restrict on,
    scalar_t* restrict dqn, scalar_t* restrict dkn, scalar_t* restrict dvn,
    scalar_t* restrict dthn, scalar_t* restrict dtwn, long d, long c, long h, long w, long wp,
    long thl, long twl, scalar_t scale, int rel, vec_SUFFIX* restrict p,
    vec_SUFFIX* restrict ds) {
  const long hw = h * w, hwp = h * wp, sb = wp / VL, nb = hwp / VL, hb = (h + VL - 1) / VL;
  const vec_SUFFIX zero = {0};
  scalar_t qi[Q * d], qs[Q * d], dqi[Q * d], gi[Q * c], rh[Q * h], dl[Q], lq[Q], gxs[hb * VL];
  vec_SUFFIX rw[Q * sb], gw[Q * sb], gx[Q * h], dqv[Q * d];
  for (int a = 0; a < Q; ++a) {
    const long i = i0 + a;
    for (long t = 0; t < d; ++t) {
      qi[a * d + t] = qn[t * hw + i] * scale;
      qs[a * d + t] = qi[a * d + t] * (scalar_t)BASE2_SCALE;
    }
    dl[a] = 0;  /* delta_i = dO_i . O_i */
    for (long cc = 0; cc < c; ++cc) {
      gi[a * c + cc] = gn[cc * hw + i];
      dl[a] += gi[a * c + cc] * on[cc * hw + i];
    }
    for (long ob = 0; ob < sb; ++ob) gw[a * sb + ob] = zero;
    rel_bias_SUFFIX(qs + a * d, th, tw, d, h, w, wp, thl, twl, i / w, i % w, rel, rh + a * h,
                    rw + a * sb);
    lq[a] = lse[i];
  }
  logits_SUFFIX(Q, qs, kn, rh, rw, d, h, sb, hwp, nb, 1, lq, p);
  for (long xp = 0, b = 0; xp < h; ++xp) {
    vec_SUFFIX sx[Q];
    for (int a = 0; a < Q; ++a) sx[a] = zero;
    for (long ob = 0; ob < sb; ++ob, ++b) {
      const long o = b * VL;
      vec_SUFFIX dp[Q];
      for (int a = 0; a < Q; ++a) dp[a] = zero - dl[a];
      for (long cc = 0; cc < c; ++cc) {
        const vec_SUFFIX vv = LD_SUFFIX(vn + cc * hwp + o);
        scalar_t* dvb = dvn + cc * hwp + o;
        vec_SUFFIX dva = zero;
        for (int a = 0; a < Q; ++a) {
          dp[a] += gi[a * c + cc] * vv;
          dva += gi[a * c + cc] * p[a * nb + b];
        }
        ST_SUFFIX(dvb, LD_SUFFIX(dvb) + dva);
      }
      for (int a = 0; a < Q; ++a) {
        const vec_SUFFIX g = p[a * nb + b] * dp[a];
        ds[a * nb + b] = g;
        gw[a * sb + ob] += g;
        sx[a] += g;
      }
    }
    for (int a = 0; a < Q; ++a) gx[a * h + xp] = sx[a];
  }
#define BWD_KEYS_SUFFIX(G) \
  bwd_keys_SUFFIX(Q, G, ds, nb, kn + c0 * hwp, dkn + c0 * hwp, qi + c0, d, dqv + c0, hwp)
  GROUPS_SUFFIX(d, BWD_KEYS_SUFFIX)
#undef BWD_KEYS_SUFFIX
  if (rel) {
    for (long xp = h; xp < hb * VL; ++xp) gxs[xp] = 0;
    for (int a = 0; a < Q; ++a) {
      const long i = i0 + a, x = i / w, y = i % w;
      lane_sums_SUFFIX(gx + a * h, h, gxs);
      /* Padding lanes hold 0 * dp: zero unless dO is NaN, which must not reach tW's entries
         that no key of this query uses. */
      for (long yp = w; yp < wp; ++yp) gw[a * sb + yp / VL][yp % VL] = 0;
      for (long t = 0; t < d; ++t) {
        const scalar_t qv = qi[a * d + t];
        const scalar_t* eh = th + t * thl + h - 1 - x;
        const scalar_t* ew = tw + t * twl + w - 1 - y;
        scalar_t* geh = dthn + t * thl + h - 1 - x;
        scalar_t* gew = dtwn + t * twl + w - 1 - y;
        vec_SUFFIX acc = dqv[a * d + t];
        for (long u = 0; u < hb; ++u) {
          const vec_SUFFIX g = LD_SUFFIX(gxs + u * VL);
          acc += g * LD_SUFFIX(eh + u * VL);
          ST_SUFFIX(geh + u * VL, LD_SUFFIX(geh + u * VL) + g * qv);
        }
        for (long ob = 0; ob < sb; ++ob) {
          const vec_SUFFIX g = gw[a * sb + ob];
          acc += g * LD_SUFFIX(ew + ob * VL);
          ST_SUFFIX(gew + ob * VL, LD_SUFFIX(gew + ob * VL) + g * qv);
        }
        dqv[a * d + t] = acc;
      }
    }
  }
  lane_sums_SUFFIX(dqv, Q * d, dqi);
  for (int a = 0; a < Q; ++a)
    for (long t = 0; t < d; ++t) dqn[t * hw + i0 + a] = dqi[a * d + t] * scale;
}

/* q as in aa_fwd (batch stride qsb), kp and vp as aa_fwd padded them, out and dout (BN, c,
   HW); writes dq (BN, d, HW), dk (BN, d, HW), dv (BN, c, HW) and, with rel, the tables'
   gradients per (batch, head), dth (BN, d, THL) and dtw (BN, d, TWL) (the caller sums them
   over BN). Per (batch, head), on one thread: query rows four at a time (bwd_rows), the last
   hw % 4 one at a time. Per thread, allocated once: P and dS of four rows, dk and dv padded,
   and the table gradients (accumulated here and copied out at the end of each (batch, head):
   neighbouring pairs' slices of dth and dtw share cache lines, which two threads updating them
   row after row would pass back and forth). */
void aa_bwd_SUFFIX(const scalar_t* restrict q, const scalar_t* restrict kp,
                   const scalar_t* restrict vp, const scalar_t* restrict th,
                   const scalar_t* restrict tw, const scalar_t* restrict lse,
                   const scalar_t* restrict out, const scalar_t* restrict dout,
                   scalar_t* restrict dq, scalar_t* restrict dk, scalar_t* restrict dv,
                   scalar_t* restrict dth, scalar_t* restrict dtw, long bn, long heads, long d,
                   long c, long h, long w, long wp, long thl, long twl, long qsb,
                   scalar_t scale, int rel, int nt) {
  const long hw = h * w, hwp = h * wp, nb = hwp / VL;
  #pragma omp parallel num_threads(nt)
  {
    vec_SUFFIX* p = aligned_alloc(64, (8 * nb + (d + c) * nb) * sizeof(vec_SUFFIX));
    vec_SUFFIX* ds = p + 4 * nb;
    scalar_t* dkp = (scalar_t*)(ds + 4 * nb);  /* (d, H * WP) then dvp (c, H * WP) */
    scalar_t* dvp = dkp + d * hwp;
    scalar_t* gt = rel ? malloc(d * (thl + twl) * sizeof(scalar_t)) : NULL;
    #pragma omp for schedule(dynamic, 1)
    for (long n = 0; n < bn; ++n) {
      memset(dkp, 0, (d + c) * hwp * sizeof(scalar_t));
      if (rel) memset(gt, 0, d * (thl + twl) * sizeof(scalar_t));
#define BWD_ROWS_SUFFIX(Q, i0)                                                              \
      bwd_rows_SUFFIX(Q, i0, head_SUFFIX(q, qsb, heads, d, hw, n), kp + n * d * hwp,         \
                      vp + n * c * hwp, th, tw, lse + n * hw, dout + n * c * hw,            \
                      out + n * c * hw, dq + n * d * hw, dkp, dvp, gt, gt + d * thl, d, c,  \
                      h, w, wp, thl, twl, scale, rel, p, ds)
      long i = 0;
      for (; i + 4 <= hw; i += 4) BWD_ROWS_SUFFIX(4, i);
      for (; i < hw; ++i) BWD_ROWS_SUFFIX(1, i);
#undef BWD_ROWS_SUFFIX
      for (long t = 0; t < d + c; ++t) {
        scalar_t* o = (t < d ? dk + (n * d + t) * hw : dv + (n * c + t - d) * hw);
        for (long x = 0; x < h; ++x)
          memcpy(o + x * w, dkp + t * hwp + x * wp, w * sizeof(scalar_t));
      }
      if (rel) {
        memcpy(dth + n * d * thl, gt, d * thl * sizeof(scalar_t));
        memcpy(dtw + n * d * twl, gt + d * thl, d * twl * sizeof(scalar_t));
      }
    }
    free(gt);
    free(p);
  }
}
"""


def _lane_sums(lanes: int) -> str:
    """C source of ``lane_sums_SUFFIX(v, n, out)``: ``out[i] = sum of v[i]'s lanes`` for n
    vectors, VL at a time through a network of two-vector shuffles and adds (VL - 1 pair steps
    of two shuffles and an add per VL vectors, against VL - 1 dependent scalar adds per vector
    one at a time). Generated per vector width: shuffle indices must be constants."""
    lines = []
    # Each live value: (name, segment length, input ids in segment order).
    values = [(f"x[{i}]", lanes, [i]) for i in range(lanes)]
    step = 0
    while len(values) > 1:
        paired = []
        for (a, s, ids_a), (b, _, ids_b) in zip(values[0::2], values[1::2], strict=True):
            half = s // 2
            lo, hi, ids = [], [], []
            for j in range(len(ids_a)):
                lo += [j * s + u for u in range(half)] + [lanes + j * s + u for u in range(half)]
                hi += [j * s + half + u for u in range(half)]
                hi += [lanes + j * s + half + u for u in range(half)]
                ids += [ids_a[j], ids_b[j]]
            name = f"s{step}"
            step += 1
            lines.append(
                f"    const vec_SUFFIX {name} = (vec_SUFFIX)SHUFFLE_SUFFIX({a}, {b}, "
                f"{', '.join(map(str, lo))}) + (vec_SUFFIX)SHUFFLE_SUFFIX({a}, {b}, "
                f"{', '.join(map(str, hi))});"
            )
            paired.append((name, half, ids))
        values = paired
    name, _, ids = values[0]
    body = "\n".join(lines)
    stores = "\n".join(
        f"    if (g + {i} < n) out[g + {i}] = {name}[{lane}];" for lane, i in enumerate(ids)
    )
    return f"""
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE_SUFFIX(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE_SUFFIX(a, b, ...) __builtin_shuffle(a, b, (ivec_SUFFIX){{__VA_ARGS__}})
#endif
static void lane_sums_SUFFIX(const vec_SUFFIX* restrict v, long n, scalar_t* restrict out) {{
  for (long g = 0; g < n; g += VL) {{
    vec_SUFFIX x[VL];
    for (long l = 0; l < VL; ++l) {{
      x[l] = (vec_SUFFIX){{0}};
      if (g + l < n) x[l] = v[g + l];
    }}
{body}
{stores}
  }}
}}
"""


def _vector_bytes(cpu_flags: str) -> int:
    """Bytes per vector of the wide kernels: 64 where AVX-512 is there, else 32 (AVX2 takes
    these whole; narrower machines split them into pairs)."""
    return 64 if "avx512f" in cpu_flags.split() else 32


def _variants(vector_bytes: int) -> dict[str, tuple[str, str, int, str, str]]:
    """Kernel variants: suffix -> (scalar, integer type, vector bytes, exp body, log). float32
    comes with full and half vectors (7x7 maps pad to 8, not 16); float64 with full ones."""
    return {
        "f32": ("float", "int", vector_bytes, _EXP_F32, "log2f"),
        "f32h": ("float", "int", vector_bytes // 2, _EXP_F32, "log2f"),
        "f64": ("double", "long long", vector_bytes, _EXP_F64, "log2"),
    }


def _lanes(scalar: str, nbytes: int) -> int:
    """Lanes of a vector of ``nbytes`` of C ``scalar`` (float or double)."""
    return nbytes // (4 if scalar == "float" else 8)


def _source(vector_bytes: int) -> str:
    """The C source: every variant's vector helpers, exp and body."""
    parts = [_HEADER]
    for suffix, (scalar, itype, nbytes, exp_body, log) in _variants(vector_bytes).items():
        lanes = _lanes(scalar, nbytes)
        for text in (_VECTOR, _lane_sums(lanes), exp_body, _BODY):
            parts.append(
                text.replace("itype_t", itype)
                .replace("scalar_t", scalar)
                .replace("SUFFIX", suffix)
                .replace("VB", str(nbytes))
                .replace("VL", str(lanes))
                .replace("LOG", log)
            )
    return "".join(parts)


# No -ffast-math: the kernel's arithmetic is explicit vectors (nothing left for gcc to
# reassociate), and fast-math would fold the 2^x rounding trick away. -fno-math-errno lets the
# scalar log2 calls inline. Measured per change (28x28, B=4, Nh=8, dkh=3, dvh=2, one thread,
# forward / backward ms): the first kernel, row passes auto-vectorised by gcc with
# -ffast-math: scalar libm expf 85 / 68 (CPU time, loaded); libmvec vector expf 18.8 / 32.0;
# inlined expf, tables read along rows, passes merged 13.3 / 22.2 (quiet machine: 8.4 /
# 13.3). This kernel, quiet: whole vectors over padded rows, one row at a time 8.3 / 13.8;
# 2^x with vrndscaleps / vscalefps and a degree-5 polynomial 7.0 / -; backward four rows at a
# time - / 10.9; the relative-term tail's lane sums in bulk - / 10.7; forward four rows at a
# time 6.1 / -; stack arrays of vectors naturally aligned (they were aligned to 4 bytes, so
# whether a vector split two cache lines depended on the process's stack address: the forward
# took 6.0 or 8.1 ms from one run to the next) 5.4 / 9.3. Tried and dropped: one fused pass
# per row in backward (register pressure: 16.0 ms against 10.8 for the passes), two rows at a
# time (forward 8.1, backward 11.5), the backward in chunks of 16 key vectors to keep P, dS
# and the slices of k, v, dk, dv in L1 (10.1 against 9.5).
_FLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fopenmp", "-fPIC")


def _signatures(scalar: Any) -> tuple[list[Any], list[Any]]:
    """ctypes argument types of aa_fwd and aa_bwd for a variant of C type ``scalar``."""
    fwd = [ctypes.c_void_p] * 9 + [ctypes.c_long] * 12 + [scalar] + [ctypes.c_int] * 2
    bwd = [ctypes.c_void_p] * 13 + [ctypes.c_long] * 10 + [scalar] + [ctypes.c_int] * 2
    return fwd, bwd


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


def _compiler() -> str | None:
    """The C compiler: ``$CC``, else ``cc``, else ``gcc`` on PATH."""
    for name in (os.environ.get("CC"), "cc", "gcc"):
        if name and shutil.which(name):
            return name
    return None


def _build() -> tuple[ctypes.CDLL, dict[str, int]]:
    """Compiles (or reuses) the shared library and declares its functions' signatures; returns
    it with the lanes per vector of each variant."""
    if not sys.platform.startswith("linux"):
        raise RuntimeError(f"fused CPU attention kernel is built on Linux only, not {sys.platform}")
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found ($CC, cc, gcc)")
    flags = _cpu_flags()
    vector_bytes = _vector_bytes(flags)
    source = _source(vector_bytes)
    # -march=native: the CPU's feature flags join the key, so a cache folder shared between
    # machines never hands one of them another's instructions.
    key = hashlib.sha256(
        "\n".join((source, " ".join(_FLAGS), cc, platform.machine(), flags)).encode()
    ).hexdigest()[:16]
    cache = _cache_dir()
    lib_path = cache / f"aa_fused_{key}.so"
    if not lib_path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src = Path(tmp) / "aa_fused.c"
            src.write_text(source)
            out = Path(tmp) / "aa_fused.so"
            cmd = [cc, *_FLAGS, "-shared", str(src), "-o", str(out), "-lm"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed: {proc.stderr.strip()[-500:]}")
            os.replace(out, lib_path)  # atomic: concurrent builders leave one whole file
        _log.info("built fused attention kernel %s", lib_path)
    lib = ctypes.CDLL(str(lib_path))
    lanes = {}
    for suffix, (scalar, _, nbytes, _, _) in _variants(vector_bytes).items():
        fwd, bwd = _signatures(ctypes.c_float if scalar == "float" else ctypes.c_double)
        getattr(lib, f"aa_fwd_{suffix}").argtypes = fwd
        getattr(lib, f"aa_fwd_{suffix}").restype = ctypes.c_int
        getattr(lib, f"aa_bwd_{suffix}").argtypes = bwd
        getattr(lib, f"aa_bwd_{suffix}").restype = None
        lanes[suffix] = _lanes(scalar, nbytes)
    return lib, lanes


@functools.cache
def _library() -> tuple[ctypes.CDLL, dict[str, int]] | None:
    """The loaded kernel and its variants' lanes, or None (after one warning) where it cannot
    be built."""
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


def _round_up(n: int, lanes: int) -> int:
    """``n`` rounded up to whole vectors of ``lanes``: a padded map side (WP, HP)."""
    return -(-n // lanes) * lanes


def _variant(lanes: dict[str, int], dtype: torch.dtype, w: int) -> str:
    """The kernel variant for ``dtype`` and map width ``w``: for float32 the full or the half
    vector, whichever pads the rows less (full on a tie)."""
    if dtype == torch.float64:
        return "f64"
    return min(("f32", "f32h"), key=lambda suffix: _round_up(w, lanes[suffix]))


class _NonFinite(Exception):
    """Raised inside the forward when the kernel finds a NaN or inf in its inputs."""


def _channel_major(t: Tensor) -> Tensor:
    """``t`` (B, C, H, W) itself where each channel is a contiguous map (a channel slice of a
    contiguous tensor, as q, k, v split from one qkv projection are), else a contiguous copy."""
    h, w = t.shape[2], t.shape[3]
    return t if t.stride()[1:] == (h * w, w, 1) else t.contiguous()


def _table(table: Tensor | None, d: int, size: int, padded: int, like: Tensor) -> Tensor:
    """A relative table as the kernel reads it: transposed to ``(d, 2L - 1)`` (rows along
    contiguous memory), zero-padded by ``padded - L`` columns for whole-vector reads, and
    contiguous (``F.pad`` by zero columns hands back the transposed view itself); zeros
    without relative logits."""
    if table is None:
        return like.new_zeros(d, 2 * size - 1 + padded - size)
    return F.pad(table.t(), (0, padded - size)).contiguous()


class _FusedRelAttention(torch.autograd.Function):
    """Autograd wrapper of the C kernel: inputs ``q, k, v`` (B, heads * d | d | c, H, W) and
    the tables ``t_h, t_w``; output (B, heads * c, H, W).

    The kernel reads q, k and v where they are (channel slices of the qkv projection need no
    copy), scales q, pads k and v itself and computes the backward's row sums; around it run
    only the tables' transposes and the sum of their per-(batch, head) gradients. Saves q, the
    padded k and v, the two tables, the output and ``lse``: ``O(HW)`` per head, nothing of size
    ``(HW)^2``.
    """

    @staticmethod
    def forward(
        ctx: FunctionCtx,
        q: Tensor,
        k: Tensor,
        v: Tensor,
        t_h: Tensor | None,
        t_w: Tensor | None,
        heads: int,
    ) -> Tensor:
        loaded = _library()
        assert loaded is not None, "caller checks available()"
        lib, lanes = loaded
        q, k, v = (_channel_major(t) for t in (q, k, v))
        b, _, h, w = q.shape
        bn, d, c = b * heads, q.shape[1] // heads, v.shape[1] // heads
        suffix = _variant(lanes, q.dtype, w)
        wp, hp = _round_up(w, lanes[suffix]), _round_up(h, lanes[suffix])
        rel = t_h is not None and t_w is not None
        th, tw = _table(t_h, d, h, hp, q), _table(t_w, d, w, wp, q)
        kp, vp = q.new_empty(bn, d, h * wp), q.new_empty(bn, c, h * wp)
        out = q.new_empty(b, heads * c, h, w)  # = (BN, c, HW)
        lse = q.new_empty(bn, h * w)
        scale = d**-0.5
        tensors = (q, k, v, th, tw, kp, vp, out, lse)
        sizes = (bn, heads, d, c, h, w, wp, th.shape[1], tw.shape[1])
        strides = (q.stride(0), k.stride(0), v.stride(0))
        threads = torch.get_num_threads()
        fn = getattr(lib, f"aa_fwd_{suffix}")
        if fn(*map(_ptr, tensors), *sizes, *strides, scale, int(rel), threads):
            raise _NonFinite
        ctx.save_for_backward(q, kp, vp, th, tw, out, lse)
        ctx.rel, ctx.heads, ctx.suffix, ctx.scale = rel, heads, suffix, scale  # type: ignore[attr-defined]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        loaded = _library()
        assert loaded is not None
        lib = loaded[0]
        q, kp, vp, th, tw, out, lse = ctx.saved_tensors
        b, _, h, w = q.shape
        heads = ctx.heads
        bn, d, c, thl, twl = b * heads, kp.shape[1], vp.shape[1], th.shape[1], tw.shape[1]
        g = grad_out.contiguous()  # (B, heads * c, H, W) = (BN, c, HW)
        dq = q.new_empty(b, heads * d, h, w)
        dk = q.new_empty(b, heads * d, h, w)
        dv = q.new_empty(b, heads * c, h, w)
        dth = q.new_empty(bn, d, thl) if ctx.rel else q.new_empty(1)
        dtw = q.new_empty(bn, d, twl) if ctx.rel else q.new_empty(1)
        tensors = (q, kp, vp, th, tw, lse, out, g, dq, dk, dv, dth, dtw)
        sizes = (bn, heads, d, c, h, w, kp.shape[2] // h, thl, twl, q.stride(0))
        threads = torch.get_num_threads()
        fn = getattr(lib, f"aa_bwd_{ctx.suffix}")
        fn(*map(_ptr, tensors), *sizes, ctx.scale, int(ctx.rel), threads)
        if not ctx.rel:
            return dq, dk, dv, None, None, None
        dt_h, dt_w = dth.sum(0)[:, : 2 * h - 1].t(), dtw.sum(0)[:, : 2 * w - 1].t()
        return dq, dk, dv, dt_h, dt_w, None


def fused_relative_attention(
    q: Tensor, k: Tensor, v: Tensor, t_h: Tensor | None, t_w: Tensor | None, heads: int
) -> Tensor | None:
    """Softmax attention with 2D relative logits through the fused kernel, or None where an
    input holds a NaN or inf (the kernel checks while it copies; the caller then runs an exact
    IEEE path).

    Args:
        q: ``(B, heads * dkh, H, W)`` queries, not yet scaled (CPU, float32 or float64); head
            ``n`` owns channels ``n * dkh .. (n + 1) * dkh - 1``, as for k and v.
        k: ``(B, heads * dkh, H, W)`` keys.
        v: ``(B, heads * dvh, H, W)`` values.
        t_h: ``(2H - 1, dkh)`` height table, row ``o + H - 1`` for offset ``o``; or None.
        t_w: ``(2W - 1, dkh)`` width table; given iff ``t_h`` is.
        heads: number of heads.

    Returns:
        ``(B, heads * dvh, H, W)``, or None.
    """
    if any(t is not None and t.dtype != q.dtype for t in (k, v, t_h, t_w)):
        raise ValueError("the fused kernel needs q, k, v and the tables in one dtype")
    try:
        out: Tensor = _FusedRelAttention.apply(q, k, v, t_h, t_w, heads)
    except _NonFinite:
        return None
    return out
