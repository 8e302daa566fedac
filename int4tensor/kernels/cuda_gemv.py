"""CUDA tensor-core GEMV over the plain Int4Tensor layout (and fbgemm's bf16 preshuffled one), for
decode (M = 1 to 16 rows).

At decode sizes a linear layer is bound by reading its weights. What keeps int4 kernels from
the bandwidth limit is the work per weight: unpacking and multiplying on CUDA cores takes ~4
instructions per weight, which at full bandwidth is more than a multiprocessor can issue. This
kernel hands the multiplies to the tensor cores (``mma.m16n8k16`` bf16, fp32 accumulate) even
at M = 1, which leaves under one instruction per weight for the unpacking:

* A warp owns ``R`` tiles of 16 weight rows (R = 1 or 2); lane ``(g, t)`` (``g = lane / 4``,
  ``t = lane % 4``) loads 16 bytes (32 weights) of rows ``g`` and ``g + 8`` of each tile per
  128-wide K chunk, so the four lanes of a row read its 64 contiguous bytes. ``U`` chunks,
  with their scales and zero points, are loaded before any is used. The activations of a
  chunk are loaded, permuted and summed once for the R tiles (with R = 2, 8192^2 at M = 16
  takes 22.9 instead of 29.7 us on an H200).
* A lane's registers are used in place as the mma's A fragment. The fragment wants each lane to
  hold K positions ``2t, 2t+1, 2t+8, 2t+9`` of its two rows; a dot product does not care how K
  is ordered as long as the activations (the B fragment) follow the same order, so K slot
  ``(t, e)`` of each of the 8 mma steps is mapped to a nibble of the lane's own 32, and each
  lane permutes its activations (``prmt``) to match. No shuffles.
* One ``lop3`` turns two nibbles (bits ``s`` and ``s + 16`` of a word, two's complement ``q``)
  into the bf16 pair ``(136 + q)``: ``(w & 0x000F000F) ^ 0x43084308``. The product with ``x``
  is exact in the fp32 accumulator.
* Per chunk (one group when G = 128, half of one when G = 256) the group scale and zero point
  are applied to the accumulator:
  ``sum_k x_k w_k = s * (sum_k x_k (136 + q_k)) + (z - 136 s) * sum_k x_k``
  for ``w = q * s + z``. The activation sums come from the tensor cores as well: the same mma
  with an all-ones A fragment hands each lane the sums of exactly the activation rows its
  output fragment holds, so nothing is precomputed, shared or synchronised. (Computing them
  in a per-block prologue instead cost 15-45% of the kernel's time, measured on an H200 with
  ``scripts/probe_gemv_ablation.py``.)

K is split over ``SLICES`` warps of a block, each reading a contiguous range of chunks (partial
sums reduced in shared memory, no atomics, no zero-init).

The same kernel reads fbgemm's bf16 preshuffled layout (``Int4PreshuffledTensor``; compile-time
``SHUFFLED``), which stores each lane's mma A fragment for a 16-row tile and a 16-wide K step as
one word: a lane's 16-byte load is four fragments of its K step, which need no activation
permutation, and a warp's loads per step are contiguous. It is 1-30% faster than the plain
layout at M <= 16 (H200, ``benchmarks/results/bench_linear.csv``) and 1.4-3.3x faster than
fbgemm's own ``bf16i4bf16_shuffled`` there. The source is compiled at first use with NVRTC through
``torch.cuda._compile_kernel``, so no compiler is needed at install time; where that is missing
or fails, the dispatcher uses the Triton kernels instead. This module imports nothing but torch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from int4tensor.kernels import nvrtc

#: the most activation rows (two 8-wide mma tiles)
MAX_M = 16
#: K chunk per mma sweep: 4 lanes x 32 weights of one row
CHUNK = 128
#: block size cap (warps), which sets the register budget through __launch_bounds__
MAX_WARPS = 8

_CHUNK_MATH = r"""
#define M_TILES %(m_tiles)d
#define R %(r)d  // 16-row tiles per warp
#define SHUFFLED %(shuffled)d  // 0: plain [N, K/2]; 1: fbgemm's bf16 preshuffled layout

%(bf16_helpers)s
%(mma_helpers)s
// One 128-wide K chunk c of R 16-row tiles (the lane's rows g and g + 8 of each), for all M
// rows of x: acc[r][mt] += s * (x . (136 + q)) + (z - 136 s) * sum(x), see the module
// docstring. The activations, their permutation and their sums are shared by the R tiles.
__device__ __forceinline__ void accumulate_chunk(
    float (&acc)[R][M_TILES][4], const uint4 (&wa)[R], const uint4 (&wb)[R],
    const float (&sa)[R], const float (&sb)[R], const float (&za)[R], const float (&zb)[R],
    const bf16_t* __restrict__ x, int M, int ldx, int c, int g, int t) {
#if SHUFFLED
  // wa: K steps 8c + t, wb: 8c + 4 + t; the lane needs the 16 activations of each
  const int kc = (c << 7) + (t << 4);
#else
  const int kc = (c << 7) + (t << 5);  // this lane's 32 K positions
#endif
  uint4 xv[M_TILES][4];
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt) {
    const int m = g + 8 * mt;
    const uint4* xp = reinterpret_cast<const uint4*>(x + (size_t)min(m, M - 1) * ldx + kc);
#pragma unroll
    for (int j = 0; j < 4; ++j)  // shuffled: xp + 0, 1 (wa's K step) and + 8, 9 (wb's)
      xv[mt][j] = m < M ? __ldg(xp + (SHUFFLED ? (j & 1) + 8 * (j >> 1) : j)) : make_uint4(0, 0, 0, 0);
  }
  float d[R][M_TILES][4], e[M_TILES][4];  // d: x . (136 + q); e: sum(x), with A = ones
#pragma unroll
  for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      e[mt][i] = 0.f;
#pragma unroll
      for (int r = 0; r < R; ++r) d[r][mt][i] = 0.f;
    }
#if SHUFFLED
  // fbgemm's layout stores, per 16-row tile and 16-wide K step, the A fragment of
  // mma.m16n8k16 for lane (g, t) as one word: nibble 4e + 2h + hi is row g + 8 hi, K 2t + e +
  // 8h. Any two K pairs can share an mma as long as the activations follow, so words j, j + 1
  // of a lane's 16 bytes (its own K step) give the mmas for K pairs (2j, 2j + 2) and
  // (2j + 8, 2j + 10), whose activations are adjacent words of that step's 16 values: no
  // permutation, and both B registers come straight from one 16-byte load.
#pragma unroll
  for (int half = 0; half < 2; ++half)
#pragma unroll
    for (int j = 0; j < 4; j += 2) {
      unsigned lo[R][4], hi[R][4];  // K pairs (2j, 2j + 2) and (2j + 8, 2j + 10)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const unsigned w0 = word(half ? wb[r] : wa[r], j), w1 = word(half ? wb[r] : wa[r], j + 1);
        lo[r][0] = nibbles_to_bf16x2(w0); lo[r][1] = nibbles_to_bf16x2(w0 >> 4);
        lo[r][2] = nibbles_to_bf16x2(w1); lo[r][3] = nibbles_to_bf16x2(w1 >> 4);
        hi[r][0] = nibbles_to_bf16x2(w0 >> 8); hi[r][1] = nibbles_to_bf16x2(w0 >> 12);
        hi[r][2] = nibbles_to_bf16x2(w1 >> 8); hi[r][3] = nibbles_to_bf16x2(w1 >> 12);
      }
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt) {
        const uint4 X0 = xv[mt][2 * half], X1 = xv[mt][2 * half + 1];  // K 0..7, 8..15 of the step
        const unsigned x0 = word(X0, j), x1 = word(X0, j + 1), x8 = word(X1, j), x9 = word(X1, j + 1);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          mma_bf16(d[r][mt], lo[r][0], lo[r][1], lo[r][2], lo[r][3], x0, x1);
          mma_bf16(d[r][mt], hi[r][0], hi[r][1], hi[r][2], hi[r][3], x8, x9);
        }
        const unsigned one = 0x3f803f80u;
        mma_bf16(e[mt], one, one, one, one, x0, x1);
        mma_bf16(e[mt], one, one, one, one, x8, x9);
      }
    }
#else
#pragma unroll
  for (int j = 0; j < 4; ++j) {  // word j: K positions kc + 8j .. kc + 8j + 7
    // pair p holds nibbles (p, p + 4) of the word: K offsets 8j + p and 8j + p + 4
    unsigned fa[R][4], fb[R][4];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int p = 0; p < 4; ++p) {
        fa[r][p] = nibbles_to_bf16x2(word(wa[r], j) >> (4 * p));
        fb[r][p] = nibbles_to_bf16x2(word(wb[r], j) >> (4 * p));
      }
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      const uint4 X = xv[mt][j];  // (x0, x1), (x2, x3), (x4, x5), (x6, x7)
      const unsigned x04 = __byte_perm(X.x, X.z, 0x5410), x15 = __byte_perm(X.x, X.z, 0x7632);
      const unsigned x26 = __byte_perm(X.y, X.w, 0x5410), x37 = __byte_perm(X.y, X.w, 0x7632);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        mma_bf16(d[r][mt], fa[r][0], fb[r][0], fa[r][1], fb[r][1], x04, x15);
        mma_bf16(d[r][mt], fa[r][2], fb[r][2], fa[r][3], fb[r][3], x26, x37);
      }
      // the activation sums on the (otherwise idle) tensor cores too: A = bf16 ones gives
      // each lane the sums of exactly the rows m its C fragment holds
      const unsigned one = 0x3f803f80u;
      mma_bf16(e[mt], one, one, one, one, x04, x15);
      mma_bf16(e[mt], one, one, one, one, x26, x37);
    }
  }
#endif
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float zca = za[r] - 136.f * sa[r], zcb = zb[r] - 136.f * sb[r];
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt) {
      const float xs0 = e[mt][0], xs1 = e[mt][1];  // rows m = 8 mt + 2t and 8 mt + 2t + 1
      acc[r][mt][0] = fmaf(sa[r], d[r][mt][0], fmaf(zca, xs0, acc[r][mt][0]));
      acc[r][mt][1] = fmaf(sa[r], d[r][mt][1], fmaf(zca, xs1, acc[r][mt][1]));
      acc[r][mt][2] = fmaf(sb[r], d[r][mt][2], fmaf(zcb, xs0, acc[r][mt][2]));
      acc[r][mt][3] = fmaf(sb[r], d[r][mt][3], fmaf(zcb, xs1, acc[r][mt][3]));
    }
  }
}
"""

_SOURCE = _CHUNK_MATH + r"""
#define U %(u)d
#define WARPS_N %(warps_n)d
#define MAX_WARPS %(max_warps)d
#define MIN_BLOCKS %(min_blocks)d
#define GROUPED %(grouped)d  // 1: rows grouped by expert through offs (aten._grouped_mm)

// Chunk c of the warp's rows ra[r], rb[r]: weights, and scales / zero points still in bf16
// (sz = scale a, scale b, zero a, zero b), all issued before any is used.
__device__ __forceinline__ void load_chunk(
    uint4 (&wa)[R], uint4 (&wb)[R], bf16_t (&sz)[4][R], int c, const uint4* __restrict__ qa,
    const uint4* __restrict__ qb, const bf16_t* __restrict__ scale,
    const bf16_t* __restrict__ zero, const int (&ra)[R], const int (&rb)[R], int row_len,
    int lds, int group_shift) {
  const size_t gi = (size_t)((c << 7) >> group_shift) * lds;
#pragma unroll
  for (int r = 0; r < R; ++r) {
#if SHUFFLED  // row_len = N / 16 tiles; a chunk is 8 K steps of N / 16 tiles x 8 uint4
    const size_t off = (size_t)c * 64 * row_len + 8 * ((ra[r] >> 4) - (ra[0] >> 4));
    wa[r] = qa[off];
    wb[r] = qb[off];
#else
    wa[r] = qa[(size_t)(ra[r] - ra[0]) * row_len + c * 4];
    wb[r] = qb[(size_t)(rb[r] - rb[0]) * row_len + c * 4];
#endif
    sz[0][r] = scale[gi + ra[r]]; sz[1][r] = scale[gi + rb[r]];
    sz[2][r] = zero[gi + ra[r]]; sz[3][r] = zero[gi + rb[r]];
  }
}
__device__ __forceinline__ void accumulate_loaded(
    float (&acc)[R][M_TILES][4], const uint4 (&wa)[R], const uint4 (&wb)[R],
    const bf16_t (&sz)[4][R], const bf16_t* __restrict__ x, int M, int ldx, int c, int g, int t) {
  float sa[R], sb[R], za[R], zb[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    sa[r] = bf16_to_f(sz[0][r]); sb[r] = bf16_to_f(sz[1][r]);
    za[r] = bf16_to_f(sz[2][r]); zb[r] = bf16_to_f(sz[3][r]);
  }
  accumulate_chunk(acc, wa, wb, sa, sb, za, zb, x, M, ldx, c, g, t);
}

// Rows [0, M) (M <= 8 M_TILES) of x times this block's weight rows, written to out.
__device__ __forceinline__ void gemv_rows(
    const bf16_t* __restrict__ x, const uint4* __restrict__ q, const bf16_t* __restrict__ scale,
    const bf16_t* __restrict__ zero, bf16_t* __restrict__ out, float* partial, int M, int N,
    int K, int ldx, int lds, int ldo, int group_shift) {
  const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
  const int slice = threadIdx.z, slices = blockDim.z;
  const int chunks = K >> 7;

  const int r0 = (blockIdx.x * WARPS_N + threadIdx.y) * 16 * R;
  int ra[R], rb[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    ra[r] = min(r0 + 16 * r + g, N - 1);
    rb[r] = min(r0 + 16 * r + g + 8, N - 1);
  }
#if SHUFFLED  // N is a multiple of 16 (fbgemm pads it)
  // uint4 g of 16-row tile T in K step s is at (s * N / 16 + T) * 8 + g: the lane reads
  // K steps 8c + t (wa) and 8c + 4 + t (wb) of its tiles' row pair g
  const int row_len = N >> 4;  // 16-row tiles
  const uint4* qa = q + ((size_t)t * row_len + (ra[0] >> 4)) * 8 + g;
  const uint4* qb = qa + (size_t)32 * row_len;
#else
  const int row_len = K >> 5;  // uint4 per row
  const uint4* qa = q + (size_t)ra[0] * row_len + t;  // tile r's rows: + (ra[r] - ra[0]) rows
  const uint4* qb = q + (size_t)rb[0] * row_len + t;
#endif

  float acc[R][M_TILES][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][mt][i] = 0.f;

  // This warp's K slice is the contiguous chunk range [c_begin, c_end): each warp streaming
  // its own stretch of every row reads HBM faster than warps interleaving 64-byte pieces
  // (81%% vs 74%% of copy for the load pattern alone on 8192^2, 86%% vs 68%% on 28672x8192;
  // scripts/probe_load_structure.py on an H100). U chunks per iteration: their weights,
  // scales and zero points all in flight before any is used; the last (fewer than U) chunks
  // one at a time.
  const int c_begin = slice * chunks / slices, c_end = (slice + 1) * chunks / slices;
  int c = c_begin;
  for (; c + U <= c_end; c += U) {
    uint4 wa[U][R], wb[U][R];
    bf16_t sz[U][4][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
      load_chunk(wa[u], wb[u], sz[u], c + u, qa, qb, scale, zero, ra, rb, row_len, lds, group_shift);
#pragma unroll
    for (int u = 0; u < U; ++u) accumulate_loaded(acc, wa[u], wb[u], sz[u], x, M, ldx, c + u, g, t);
  }
  for (; c < c_end; ++c) {
    uint4 wa[R], wb[R];
    bf16_t sz[4][R];
    load_chunk(wa, wb, sz, c, qa, qb, scale, zero, ra, rb, row_len, lds, group_shift);
    accumulate_loaded(acc, wa, wb, sz, x, M, ldx, c, g, t);
  }

  // C fragment: acc[r][mt][i] is out[m = 8 mt + 2t + (i & 1)][n = r0 + 16 r + g + 8 (i >> 1)]
  const int vals = R * M_TILES * 4;
  if (slices > 1) {
    const int me = (slice * WARPS_N + threadIdx.y) * 32 + lane;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[me * vals + (r * M_TILES + mt) * 4 + i] = acc[r][mt][i];
    __syncthreads();
    if (slice == 0)
      for (int z = 1; z < slices; ++z) {
        const int other = (z * WARPS_N + threadIdx.y) * 32 + lane;
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[r][mt][i] += partial[other * vals + (r * M_TILES + mt) * 4 + i];
      }
  }
  if (slice == 0)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int mt = 0; mt < M_TILES; ++mt)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int m = 8 * mt + 2 * t + (i & 1), n = r0 + 16 * r + g + 8 * (i >> 1);
          if (m < M && n < N) out[(size_t)m * ldo + n] = f_to_bf16(acc[r][mt][i]);
        }
  if (slices > 1) __syncthreads();  // partial is written again by the next call (grouped)
}

extern "C" __global__ void __launch_bounds__(32 * MAX_WARPS, MIN_BLOCKS)
%(name)s(const bf16_t* __restrict__ x, const uint4* __restrict__ q,
         const bf16_t* __restrict__ scale, const bf16_t* __restrict__ zero,
         bf16_t* __restrict__ out,
#if GROUPED
         const int* __restrict__ offs,
#endif
         int M, int N, int K, int ldx, int lds, int ldo,
         int group_shift, int x_batch, int q_batch, int s_batch, int o_batch
#if GROUPED
         , int experts
#endif
         ) {
  // block (32, WARPS_N, SLICES): lane, R 16-row tiles, K slice; grid (row tiles, batch entry
  // or active-expert slot); strides in elements (q: uint4)
  extern __shared__ float partial[];  // K-slice partial sums (SLICES > 1)
#if GROUPED
  // Expert e owns rows [offs[e - 1], offs[e]) of x and out (M: all rows), read here on the
  // device. Every active expert has a row, so at most min(E, M) are active: slot y of the
  // grid takes the y-th expert that has rows (found by one warp scanning offs, E / 32 ballots)
  // and a slot past the last active expert returns, so no block is spent on an empty
  // expert. Rows from offs[E - 1] on belong to no expert: the last slot writes them as zeros.
  __shared__ int slot[3];  // expert, its first row, its row end
  if (threadIdx.y == 0 && threadIdx.z == 0) {
    const int lane = threadIdx.x;
    int wanted = blockIdx.y, e_found = -1, begin_found = 0, end_found = 0;
    for (int e0 = 0; e0 < experts && e_found < 0; e0 += 32) {
      const int e = e0 + lane;
      int end = 0, begin = 0;
      if (e < experts) {
        end = min(max(offs[e], 0), M);
        begin = e ? min(max(offs[e - 1], 0), end) : 0;
      }
      const unsigned active = __ballot_sync(0xffffffffu, end > begin);
      const int count = __popc(active);
      if (wanted < count) {
        unsigned rest = active;
        for (int i = 0; i < wanted; ++i) rest &= rest - 1;  // drop the first `wanted` bits
        const int src = __ffs(rest) - 1;
        e_found = e0 + src;
        begin_found = __shfl_sync(0xffffffffu, begin, src);
        end_found = __shfl_sync(0xffffffffu, end, src);
      }
      wanted -= count;
    }
    if (lane == 0) { slot[0] = e_found; slot[1] = begin_found; slot[2] = end_found; }
  }
  __syncthreads();
  const int b = slot[0], row_begin = slot[1];
  const int row_end = b < 0 ? 0 : slot[2];
  if (blockIdx.y == gridDim.y - 1) {
    const int tail = min(max(offs[experts - 1], 0), M);
    const int n0 = blockIdx.x * WARPS_N * 16 * R, width = min(WARPS_N * 16 * R, N - n0);
    const int tid = (threadIdx.z * blockDim.y + threadIdx.y) * 32 + threadIdx.x;
    const int threads = 32 * blockDim.y * blockDim.z;
    for (int i = tid; i < (M - tail) * width; i += threads)
      out[(size_t)(tail + i / width) * ldo + n0 + i %% width] = 0;
  }
  if (b < 0) return;
#else
  const int b = blockIdx.y;
#endif
  q += (size_t)b * q_batch; scale += (size_t)b * s_batch; zero += (size_t)b * s_batch;
#if GROUPED
  for (int m0 = row_begin; m0 < row_end; m0 += 8 * M_TILES)
    gemv_rows(x + (size_t)m0 * ldx, q, scale, zero, out + (size_t)m0 * ldo, partial,
              min(8 * M_TILES, row_end - m0), N, K, ldx, lds, ldo, group_shift);
#else
  gemv_rows(x + (size_t)b * x_batch, q, scale, zero, out + (size_t)b * o_batch, partial, M, N,
            K, ldx, lds, ldo, group_shift);
#endif
}
"""


def _smem_bytes(m_tiles: int, warps_n: int, slices: int, r: int = 1) -> int:
    """Dynamic shared memory: the K-slice partial sums."""
    return 4 * 32 * warps_n * slices * 4 * m_tiles * r if slices > 1 else 0


is_available = nvrtc.is_available


@functools.lru_cache(maxsize=None)  # dispatch asks can_compile on every call
def _kernel_source(m_tiles: int, warps_n: int, u: int, min_blocks: int, r: int,
                   shuffled: bool = False, grouped: bool = False) -> tuple[str, str]:
    """(source, name) of the kernel for ``8 * m_tiles`` activation rows, ``warps_n`` warps of
    ``r`` 16-row tiles per block, ``u`` chunks in flight per warp and at least ``min_blocks``
    blocks per multiprocessor (a register cap), reading the plain layout or (``shuffled``)
    fbgemm's bf16 preshuffled one; ``grouped``: rows grouped by expert (``offs``), any number
    per expert, ``8 * m_tiles`` at a time."""
    name = (f"int4_tc_gemv_m{m_tiles}_w{warps_n}_u{u}_b{min_blocks}_r{r}"
            f"{'_shuffled' if shuffled else ''}{'_grouped' if grouped else ''}")
    return _SOURCE % dict(m_tiles=m_tiles, u=u, warps_n=warps_n, max_warps=MAX_WARPS, name=name,
                          bf16_helpers=nvrtc.BF16_HELPERS, mma_helpers=nvrtc.MMA_HELPERS,
                          min_blocks=min_blocks, r=r, shuffled=int(shuffled),
                          grouped=int(grouped)), name


@functools.lru_cache(maxsize=None)
def _compiled(m_tiles: int, warps_n: int, u: int, capability: tuple[int, int],
              min_blocks: int = 1, r: int = 1, shuffled: bool = False, grouped: bool = False):
    """The kernel of :func:`_kernel_source` for one GPU architecture (NVRTC, ~1 s, once per
    process)."""
    return nvrtc.compile_kernel(
        *_kernel_source(m_tiles, warps_n, u, min_blocks, r, shuffled, grouped), capability)


def can_compile(device_index: int) -> bool:
    """Whether the kernel compiles and loads on this device (tried once per device): no NVRTC
    or an old driver make the dispatcher fall back to Triton."""
    return nvrtc.compiles(*_kernel_source(1, 2, 4, 1, 1), torch.cuda.get_device_capability(device_index))


def pick_config(m: int, n: int, k: int, num_sms: int, shuffled: bool = False) -> dict:
    """Launch config for one call, from device sweeps in ``scripts/probe_cuda_gemv.py`` on an
    H200 (132 multiprocessors; in benchmarks/results ``probe_cuda_gemv_sweep.csv`` for the plain
    layout, ``probe_cuda_gemv_shuffled_sweep.csv`` and ``probe_llama_shapes.csv`` for fbgemm's
    preshuffled one; MIN_BLOCKS 3-4 never won). Plain layout: within 3.5% of each case's best
    on average (geometric mean over 8 shapes x 5 M), 16% in the worst case; preshuffled: 1.2%
    on average over 8 shapes x 2-4 M, 7.2% worst.

    8 warps per block. Where N <= 4096, K is split over 8 of them (few row tiles to share the
    multiprocessors). Above, on the preshuffled layout and for K <= 4096 on the plain one, over
    as few as keep 12 warps per multiprocessor busy, so each warp streams a longer stretch of
    its rows (128256x4096 preshuffled at M = 1: 83.8 us with 1 slice, 97.2 with 8); the plain
    layout with longer rows reads best split over 4-8. Above 4 activation rows (N > 4096) and
    above 8 (N <= 4096) each warp takes two 16-row tiles (R = 2), which halves the activation
    loads per weight."""
    chunks = k // CHUNK
    tile_pairs, busy = n // 32, 12 * num_sms
    if n <= 4096 * num_sms // 132:
        cfg = (dict(SLICES=8, U=2, MIN_BLOCKS=2, R=1) if m <= 4 else
               dict(SLICES=8, U=4, MIN_BLOCKS=2, R=1) if m <= 8 else
               dict(SLICES=8, U=4, MIN_BLOCKS=1, R=2))
    elif (shuffled or k <= 4096) and m <= 8 and 8 * tile_pairs < busy:
        cfg = dict(SLICES=8, U=1, MIN_BLOCKS=2, R=1)  # few rows (6144x4096): a tile per warp
    elif shuffled or (k <= 4096 and 8 * tile_pairs >= busy):
        slices = 1
        while slices < 8 and slices * tile_pairs < busy:
            slices *= 2
        cfg = dict(SLICES=slices, U=2 if m <= 8 else 1, MIN_BLOCKS=2, R=2)
    else:
        cfg = (dict(SLICES=4, U=2, MIN_BLOCKS=2, R=1) if m <= 4 else
               dict(SLICES=8, U=2, MIN_BLOCKS=2, R=2) if m <= 8 else
               dict(SLICES=4, U=4, MIN_BLOCKS=1, R=2))
    while cfg["SLICES"] > 1 and chunks < 2 * cfg["SLICES"]:
        cfg["SLICES"] //= 2
    return dict(cfg, WARPS_N=MAX_WARPS // cfg["SLICES"])


def operands_problem(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                     zero_point: torch.Tensor, group_size: int) -> str | None:
    """Why the operands do not fit every kernel reading this per-lane layout (any M), or None:
    bf16 ``x`` with 16-byte aligned rows, contiguous 16-byte aligned ``qdata`` with K a
    multiple of 128, bf16 N-contiguous scales and zero points, G = 128 or 256 (a 128-wide
    chunk must not straddle groups); 2D (``x [M, K]``, ``qdata [N, K/2]``, scales ``[K/G, N]``)
    or batched (``x [B, M, K]``, ``qdata [B, N, K/2]``, scales ``[B, K/G, N]``, B < 2^16 grid
    rows, batch strides within the kernels' 32-bit arguments). The device is not checked."""
    if not (x.ndim == qdata.ndim == scale.ndim and x.ndim in (2, 3)):
        return f"x {x.ndim}D with a {qdata.ndim}D weight: it takes 2D/2D or 3D/3D"
    if x.ndim == 3 and not (
            x.shape[0] == qdata.shape[0] == scale.shape[0] and x.shape[0] < 2**16
            and max(x.stride(0), qdata.stride(0), scale.stride(0),
                    x.shape[1] * qdata.shape[-2]) < 2**31):
        return "batch sizes differ or exceed the kernel's 32-bit strides"
    if x.dtype != torch.bfloat16:
        return f"activations are {x.dtype}, it takes bf16"
    if group_size not in (128, 256):
        return f"G = {group_size}, it takes 128 or 256"
    if x.shape[-1] % CHUNK:
        return f"K = {x.shape[-1]} is not a multiple of {CHUNK}"
    # offsets, not data pointers: fake tensors (torch.compile) have none; allocations are
    # 16-byte aligned
    if not (x.stride(-1) == 1 and all(s % 8 == 0 for s in x.stride()[:-1])
            and x.storage_offset() % 8 == 0):
        return "activation rows are not 16-byte aligned"
    if not (qdata.is_contiguous() and qdata.storage_offset() % 16 == 0):
        return "qdata is not contiguous (a sliced weight; .contiguous() fixes it)"
    if qdata.shape[-1] * 2 != x.shape[-1] or scale.shape[-1] != qdata.shape[-2]:
        return "operand shapes disagree"
    if not (scale.dtype == zero_point.dtype == torch.bfloat16):
        return f"scales are {scale.dtype}, it takes bf16"
    if not (scale.stride(-1) == 1 and zero_point.stride() == scale.stride()):
        return "scales are not N-contiguous with zero points of the same strides"
    return None


def operands_fit(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, group_size: int) -> bool:
    """:func:`operands_problem` is None, on CUDA."""
    return x.is_cuda and operands_problem(x, qdata, scale, zero_point, group_size) is None


def can_run(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
            zero_point: torch.Tensor, group_size: int) -> bool:
    """The kernel's contract, checked without touching the GPU: :func:`operands_fit` with
    ``1 <= M <= 16`` rows (per batch entry)."""
    return 1 <= x.shape[-2] <= MAX_M and operands_fit(x, qdata, scale, zero_point, group_size)


def int4_gemv(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    config: dict | None = None,
    shuffled: bool = False,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` for ``W = q * scale + zero_point``; batched (3D weights,
    ``torch.bmm``): ``x [B, M, K] @ W[b].T -> [B, M, N]`` in one launch.

    Args:
        x: bf16 ``[M, K]`` or ``[B, M, K]``, ``1 <= M <= 16``, rows 16-byte aligned (see
            :func:`can_run`).
        qdata: int8 ``[N, K/2]`` or ``[B, N, K/2]``, contiguous: the plain layout (two's
            complement nibbles, element 2i low), or with ``shuffled`` fbgemm's bf16 preshuffled
            layout (``Int4PreshuffledTensor``, N a multiple of 16).
        scale, zero_point: bf16 ``[K/G, N]`` or ``[B, K/G, N]``, last dim contiguous; G = 128
            or 256.
        config: any of ``WARPS_N``, ``U``, ``SLICES``, ``MIN_BLOCKS``, ``R`` (the rest from
            :func:`pick_config`).
        shuffled: read fbgemm's bf16 preshuffled layout instead of the plain one.

    Returns:
        bf16 ``[M, N]`` or ``[B, M, N]``.
    """
    plan = _launch_plan(tuple(x.shape), x.stride(), tuple(qdata.shape), qdata.stride(0),
                        scale.stride(), x.device.index, group_size, shuffled,
                        tuple(sorted(config.items())) if config else ())
    out = torch.empty(plan.out_shape, dtype=torch.bfloat16, device=x.device)
    plan.launch(x, qdata, scale, zero_point, out)
    return out


def bind(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
         group_size: int, shuffled: bool = False, out_shape: tuple | None = None):
    """``f(x) -> int4_gemv(x, qdata, scale, zero_point, group_size)`` for activations of
    ``x``'s shape, strides and device: the launch is planned here, once. ``out_shape``: the
    output's shape, any with as many elements as ``[M, N]`` (``[*, N]`` for ``x [*, K]``
    with the rows of ``x``); ``f`` then also takes ``x`` in any shape with those rows."""
    plan = _launch_plan(tuple(x.shape), x.stride(), tuple(qdata.shape), qdata.stride(0),
                        scale.stride(), x.device.index, group_size, shuffled, ())
    allocate = nvrtc.empty_allocator(_checked_out_shape(out_shape, plan.out_shape),
                                     torch.bfloat16, x.device)
    launch = plan.launch.launch
    # the weight's addresses, read once: its fields are fixed for the tensor's life (copy_
    # writes into them; a new tensor gets new plans); the tuple keeps them alive
    weight = (qdata, scale, zero_point)
    q_ptr, s_ptr, z_ptr = (t.data_ptr() for t in weight)

    def gemv(x: torch.Tensor, _weight=weight) -> torch.Tensor:
        out = allocate()
        launch(x.data_ptr(), q_ptr, s_ptr, z_ptr, out.data_ptr())
        return out
    return gemv


def _checked_out_shape(out_shape: tuple | None, planned: tuple) -> tuple:
    """``out_shape`` where given (it must hold the planned output's elements), else ``planned``."""
    if out_shape is None:
        return planned
    if math.prod(out_shape) != math.prod(planned) or out_shape[-1] != planned[-1]:
        raise ValueError(f"output shape {list(out_shape)} does not hold the kernel's "
                         f"{list(planned)}")
    return tuple(out_shape)


class _LaunchPlan(NamedTuple):
    launch: nvrtc.Launcher
    kernel: object
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    ints: tuple[int, ...]
    out_shape: tuple[int, ...]


@functools.lru_cache(maxsize=4096)
def _launch_plan(x_shape: tuple, x_stride: tuple, q_shape: tuple, q_batch_stride: int,
                 s_stride: tuple, device_index: int, group_size: int, shuffled: bool,
                 config: tuple) -> _LaunchPlan:
    """Everything a launch needs that follows from the operands' shapes and strides: made once
    per signature, so a repeated call only allocates its output and launches."""
    batched = len(x_shape) == 3
    batch = x_shape[0] if batched else 1
    m, k = x_shape[-2:]
    if not 1 <= m <= MAX_M:  # the kernel would leave rows unwritten
        raise ValueError(f"the GEMV takes 1 to {MAX_M} activation rows, got {m}")
    n = q_shape[-2]
    if shuffled and n % 16:
        raise ValueError(f"a preshuffled weight has a multiple of 16 rows, got {n}")
    props = torch.cuda.get_device_properties(device_index)
    # the batch's row tiles share the multiprocessors, so the config sees all of them
    cfg = dict(pick_config(m, batch * n, k, props.multi_processor_count, shuffled), **dict(config))
    m_tiles = 1 if m <= 8 else 2
    kernel = _compiled(m_tiles, cfg["WARPS_N"], cfg["U"], (props.major, props.minor),
                       cfg["MIN_BLOCKS"], cfg["R"], shuffled)
    out_shape = (*x_shape[:-1], n)
    batch_strides = (x_stride[0], q_batch_stride // 16, s_stride[0], m * n) if batched \
        else (0, 0, 0, 0)
    return _with_launcher(
        kernel=kernel,
        grid=(-(-n // (16 * cfg["R"] * cfg["WARPS_N"])), batch, 1),
        block=(32, cfg["WARPS_N"], cfg["SLICES"]),
        shared_mem=_smem_bytes(m_tiles, cfg["WARPS_N"], cfg["SLICES"], cfg["R"]),
        device_index=device_index,
        ints=(m, n, k, x_stride[-2], s_stride[-2], n, group_size.bit_length() - 1,
              *batch_strides),
        out_shape=out_shape,
    )


def _with_launcher(device_index: int, **fields) -> _LaunchPlan:
    launch = nvrtc.Launcher(fields["kernel"], fields["grid"], fields["block"],
                            fields["shared_mem"], 5, fields["ints"], device_index)
    return _LaunchPlan(launch=launch, **fields)


# ---- grouped (MoE experts, aten._grouped_mm) ------------------------------------------------
def grouped_operands_problem(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                             zero_point: torch.Tensor, group_size: int) -> str | None:
    """Why ``x [T, K]`` and a stored ``[E, N, K]`` weight do not fit the grouped GEMV, or None
    (what :func:`operands_problem` asks of each expert, and E < 2^16)."""
    if x.ndim != 2 or qdata.ndim != 3:
        return f"x {x.ndim}D with a {qdata.ndim}D weight: it takes x [T, K], W [E, N, K]"
    if qdata.shape[0] >= 2**16 or max(qdata.stride(0), scale.stride(0)) >= 2**31 \
            or x.shape[0] * max(x.stride(0), qdata.shape[-2]) >= 2**31:
        return "too many experts or rows for the kernel's 32-bit arguments"
    if zero_point.stride(0) != scale.stride(0):
        return "scales and zero points have different expert strides"
    return operands_problem(x, qdata[0], scale[0], zero_point[0], group_size)


def rows_per_expert(tokens: int, experts: int) -> int:
    """Rows an active expert gets on average when ``tokens`` rows are routed over ``experts``
    (the host never reads the offsets): what the launch is configured for."""
    return -(-tokens // max(1, min(experts, tokens)))


def int4_grouped_gemv(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                      zero_point: torch.Tensor, offs: torch.Tensor, group_size: int,
                      shuffled: bool = False) -> torch.Tensor:
    """``out[t] = x[t] @ W[e].T`` for the rows ``t`` of expert ``e``: ``x [T, K]`` sorted by
    expert, ``offs`` int32 ``[E]`` cumulative row counts (expert ``e`` owns rows
    ``offs[e-1] .. offs[e]``; equal neighbours: an empty expert), read on the GPU only. Rows
    from ``offs[E-1]`` on belong to no expert and come out 0.

    Args:
        x: bf16 ``[T, K]``, rows 16-byte aligned.
        qdata: int8 ``[E, N, K/2]`` contiguous (the plain layout), ``W[e] = q * scale[e] +
            zero_point[e]``; with ``shuffled`` fbgemm's bf16 preshuffled layout (N a multiple
            of 16).
        scale, zero_point: bf16 ``[E, K/G, N]``, last dim contiguous; G = 128 or 256.
        offs: int32 ``[E]`` on x's device.
        shuffled: read fbgemm's bf16 preshuffled layout instead of the plain one.

    Returns:
        bf16 ``[T, N]``.

    Each expert's blocks read its weights once per ``8 * m_tiles`` of its rows (16 at most),
    so the weight bytes read are those of the active experts; launched for
    :func:`rows_per_expert` rows.
    """
    return bind_grouped(x, qdata, scale, zero_point, group_size, shuffled)(x, offs)


def bind_grouped(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor, group_size: int, shuffled: bool = False):
    """``f(x, offs) -> int4_grouped_gemv(x, qdata, scale, zero_point, offs, group_size)`` for
    activations of ``x``'s shape, strides and device, planned once."""
    plan = _grouped_launch_plan(tuple(x.shape), x.stride(), tuple(qdata.shape), qdata.stride(0),
                                scale.stride(), x.device.index, group_size, shuffled)
    allocate = nvrtc.empty_allocator(plan.out_shape, torch.bfloat16, x.device)
    launch = plan.launch.launch
    weight = (qdata, scale, zero_point)  # as in bind: addresses read once, tensors kept alive
    q_ptr, s_ptr, z_ptr = (t.data_ptr() for t in weight)

    def grouped_gemv(x: torch.Tensor, offs: torch.Tensor, _weight=weight) -> torch.Tensor:
        out = allocate()
        launch(x.data_ptr(), q_ptr, s_ptr, z_ptr, out.data_ptr(), offs.data_ptr())
        return out
    return grouped_gemv


@functools.lru_cache(maxsize=1024)
def _grouped_launch_plan(x_shape: tuple, x_stride: tuple, q_shape: tuple, q_expert_stride: int,
                         s_stride: tuple, device_index: int, group_size: int,
                         shuffled: bool = False) -> _LaunchPlan:
    tokens, k = x_shape
    experts, n = q_shape[0], q_shape[1]
    if shuffled and n % 16:
        raise ValueError(f"a preshuffled weight has a multiple of 16 rows, got {n}")
    rows = rows_per_expert(tokens, experts)
    props = torch.cuda.get_device_properties(device_index)
    # the active experts' row tiles share the multiprocessors
    active = max(1, min(experts, tokens))
    cfg = pick_config(min(rows, MAX_M), active * n, k, props.multi_processor_count, shuffled)
    m_tiles = 1 if rows <= 8 else 2
    kernel = _compiled(m_tiles, cfg["WARPS_N"], cfg["U"], (props.major, props.minor),
                       cfg["MIN_BLOCKS"], cfg["R"], shuffled, True)
    # one grid row per expert that can have rows (slots past the active ones return at once)
    grid = (-(-n // (16 * cfg["R"] * cfg["WARPS_N"])), max(1, min(experts, tokens)), 1)
    block = (32, cfg["WARPS_N"], cfg["SLICES"])
    shared = _smem_bytes(m_tiles, cfg["WARPS_N"], cfg["SLICES"], cfg["R"])
    ints = (tokens, n, k, x_stride[0], s_stride[-2], n, group_size.bit_length() - 1,
            0, q_expert_stride // 16, s_stride[0], 0, experts)
    launch = nvrtc.Launcher(kernel, grid, block, shared, 6, ints, device_index)
    return _LaunchPlan(launch=launch, kernel=kernel, grid=grid, block=block, shared_mem=shared,
                       ints=ints, out_shape=(tokens, n))
