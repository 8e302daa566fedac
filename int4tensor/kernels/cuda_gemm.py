"""CUDA tensor-core GEMM for 17 to 32 activation rows (batched decode) over fbgemm's bf16
preshuffled layout or the plain Int4Tensor one, where the weights are still read once but
each weight meets enough activation rows that the decode GEMV's per-warp activation loads
(through L1/L2, once per warp) dominate.

* A block of 8 warps owns 256 weight rows (two 16-row tiles per warp, as the GEMV's ``R = 2``)
  and a range of ``BLOCK_CHUNKS`` 128-wide K chunks (split-K over the grid's y). It first
  copies the activations of its K range, ``x [M, K range]``, into shared memory
  (``cp.async``, rows up to the next multiple of 8 zero-filled); all warps then read them
  there, one copy per block instead of one per warp.
* Weights stream from HBM into registers with the GEMV's per-lane addressing (see
  cuda_gemv.py: on the preshuffled layout a lane's 16-byte load holds four mma A fragments of
  its K step, so the activations need no permutation; on the plain one it holds 32 K of one
  row and the lane permutes its activations, whose 16-byte pieces are swizzled in shared
  memory so that the four lanes of a row read distinct banks); with ``PREFETCH`` the next
  ``U`` chunks are loaded while the current ones are multiplied. They are dequantized before
  the mma: ``(136 + q) -> q`` exactly, then ``q * s + z`` in one bf16x2 fma, rounded once as
  the reference path rounds its dequantized weight. At M >= 17 that costs fewer
  instructions than the GEMV's activation sums on the tensor cores, whose count grows with M.
* Each ``mma.m16n8k16`` multiplies a 16-row weight tile by 8 activation rows in fp32. The K
  ranges' sums are added into a zero-filled fp32 ``[M, N]`` buffer in L2 (``red.add``), cast
  to bf16 after the kernel by a small kernel of our own, which zeroes the buffer again: an
  eager call reuses one buffer per stream and so needs no fill (:func:`bind`); the custom op
  (what compiled graphs run) fills a buffer of its own with ``cuMemsetD32Async``. (Fill and
  cast took ~3.5 us of GPU time per call on an H200.)
  The order of those additions varies, so results are not bit-reproducible from run to run
  (last-bit differences).
* 3D weights (MoE experts) run in one launch, a grid z per expert.

Measured on an H200 (``scripts/probe_cuda_gemm.py [--plain]``, ``benchmarks/results/
probe_cuda_gemm*.txt``): preshuffled 1.1-1.8x bf16 at M = 17 and 1.0-1.4x at M = 32 where
fbgemm's ``bf16i4bf16_shuffled`` gives 0.7-1.3x and 0.7-1.2x; plain 1.05-1.7x and 0.9-1.1x where
``bf16i4bf16_rowwise`` gives 0.6-1.1x and 0.7-1.0x. Above 32 rows it falls behind fbgemm (the
activation reads from shared memory and the mma count grow with M), so the dispatcher stops
there.

Compiled at first use with NVRTC (like cuda_gemv.py); this module imports nothing but torch.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from int4tensor.kernels import cuda_gemv, nvrtc

#: the activation rows the dispatcher gives this kernel (it runs any M up to 64)
MIN_M, MAX_M = 17, 32
CHUNK = 128
WARPS = 8
#: weight rows per block: 8 warps x 2 tiles x 16 rows
BLOCK_N = WARPS * 2 * 16
#: shared memory one block may use (H100 / H200 allow 227 KB)
MAX_SMEM = 200 * 1024

_SOURCE = r"""
#define MT %(m_tiles)d        // 8-row activation tiles
#define U %(u)d               // K chunks in flight per warp
#define MIN_BLOCKS %(min_blocks)d
#define PREFETCH %(prefetch)d     // load the next U chunks while multiplying these
#define SHUFFLED %(shuffled)d      // 1: fbgemm's bf16 preshuffled layout; 0: plain [N, K/2]
#define WARPS 8
#define R 2                   // 16-row weight tiles per warp

%(bf16_helpers)s
%(mma_helpers)s
// bf16x2 (136 + q) from nibbles_to_bf16x2 -> q * s + z: q is exact after the first fma, the
// second rounds once
__device__ __forceinline__ unsigned dequant2(unsigned v, unsigned s2, unsigned z2) {
  unsigned q, w;
  asm("fma.rn.bf16x2 %%0, %%1, %%2, %%3;" : "=r"(q) : "r"(v), "r"(0x3f803f80u), "r"(0xc308c308u));
  asm("fma.rn.bf16x2 %%0, %%1, %%2, %%3;" : "=r"(w) : "r"(q), "r"(s2), "r"(z2));
  return w;
}
__device__ __forceinline__ unsigned splat(bf16_t v) { return (unsigned)v | ((unsigned)v << 16); }
// Where 16-byte piece p of an activation row lives in shared memory. On the plain layout the
// lanes t = 0..3 of a row read pieces 4t + j, which fall on the same banks for t and t + 2;
// flipping bit 1 of the pieces 8-15 of each 128-wide chunk spreads them (with rows 16 bytes
// apart, a quarter warp's reads then hit distinct banks).
__device__ __forceinline__ int swizzle(int p) { return SHUFFLED ? p : p ^ (((p >> 3) & 1) << 1); }

// U chunks from chunk c: the lane's weights as the GEMV reads them (rows g and g + 8 of its R
// tiles: uint4 `c * cstride + offa[r]` of qa, `... + offb[r]` of qb) and the group scales /
// zeros of its rows; chunks past the block's range repeat its last one (loaded, not used)
__device__ __forceinline__ void load_stage(
    uint4 (&wa)[U][R], uint4 (&wb)[U][R], bf16_t (&sz)[U][4][R], int c, int c_end,
    const uint4* __restrict__ qa, const uint4* __restrict__ qb, const bf16_t* __restrict__ scale,
    const bf16_t* __restrict__ zero, const size_t (&offa)[R], const size_t (&offb)[R],
    size_t cstride, const int (&ra)[R], const int (&rb)[R], int lds, int group_shift) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    const int cc = min(c + u, c_end - 1);
    const size_t gi = (size_t)((cc << 7) >> group_shift) * lds;
#pragma unroll
    for (int r = 0; r < R; ++r) {
      wa[u][r] = qa[cc * cstride + offa[r]];
      wb[u][r] = qb[cc * cstride + offb[r]];
      sz[u][0][r] = scale[gi + ra[r]]; sz[u][1][r] = scale[gi + rb[r]];
      sz[u][2][r] = zero[gi + ra[r]]; sz[u][3][r] = zero[gi + rb[r]];
    }
  }
}

// acc += W x for the U loaded chunks (the first `left` of them are in the block's range);
// xrow: activation row g of the first chunk in shared memory
__device__ __forceinline__ void mma_stage(
    float (&acc)[R][MT][4], const uint4 (&wa)[U][R], const uint4 (&wb)[U][R],
    const bf16_t (&sz)[U][4][R], const bf16_t* xrow, int xs_stride, int left, int t) {
#pragma unroll
  for (int u = 0; u < U; ++u) {
    if (u >= left) break;
#if SHUFFLED
    const bf16_t* xc = xrow + (u << 7) + (t << 4);  // the 16 values of the lane's K step
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // words j, j + 1 of the lane's 16 bytes: K pairs (2j, 2j + 2) and (2j + 8, 2j + 10)
      // of its step, rows g (even slots) and g + 8 (odd slots), see cuda_gemv.py
      unsigned lo[2][R][4], hi[2][R][4];
#pragma unroll
      for (int jj = 0; jj < 2; ++jj)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint4 W = half ? wb[u][r] : wa[u][r];
          const unsigned w0 = word(W, 2 * jj), w1 = word(W, 2 * jj + 1);
          const unsigned sa = splat(sz[u][0][r]), sb = splat(sz[u][1][r]);
          const unsigned za = splat(sz[u][2][r]), zb = splat(sz[u][3][r]);
          lo[jj][r][0] = dequant2(nibbles_to_bf16x2(w0), sa, za);
          lo[jj][r][1] = dequant2(nibbles_to_bf16x2(w0 >> 4), sb, zb);
          lo[jj][r][2] = dequant2(nibbles_to_bf16x2(w1), sa, za);
          lo[jj][r][3] = dequant2(nibbles_to_bf16x2(w1 >> 4), sb, zb);
          hi[jj][r][0] = dequant2(nibbles_to_bf16x2(w0 >> 8), sa, za);
          hi[jj][r][1] = dequant2(nibbles_to_bf16x2(w0 >> 12), sb, zb);
          hi[jj][r][2] = dequant2(nibbles_to_bf16x2(w1 >> 8), sa, za);
          hi[jj][r][3] = dequant2(nibbles_to_bf16x2(w1 >> 12), sb, zb);
        }
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4* xp = reinterpret_cast<const uint4*>(xc + mt * 8 * xs_stride + half * 64);
        const uint4 X0 = xp[0], X1 = xp[1];  // K 0..7 and 8..15 of the step
#pragma unroll
        for (int jj = 0; jj < 2; ++jj)
#pragma unroll
          for (int r = 0; r < R; ++r) {
            mma_bf16(acc[r][mt], lo[jj][r][0], lo[jj][r][1], lo[jj][r][2], lo[jj][r][3],
                     word(X0, 2 * jj), word(X0, 2 * jj + 1));
            mma_bf16(acc[r][mt], hi[jj][r][0], hi[jj][r][1], hi[jj][r][2], hi[jj][r][3],
                     word(X1, 2 * jj), word(X1, 2 * jj + 1));
          }
      }
    }
#else
    // plain layout: word j of the lane's 16 bytes holds K kc + 8j .. + 7 (kc = 32 t) of its
    // row; pair p = nibbles (p, p + 4). The activations follow with a byte permute, as in the
    // GEMV; their 16-byte pieces are swizzled in shared memory (see swizzle()).
    const bf16_t* xc = xrow + (u << 7);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      unsigned fa[R][4], fb[R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const unsigned sa = splat(sz[u][0][r]), sb = splat(sz[u][1][r]);
        const unsigned za = splat(sz[u][2][r]), zb = splat(sz[u][3][r]);
#pragma unroll
        for (int p = 0; p < 4; ++p) {
          fa[r][p] = dequant2(nibbles_to_bf16x2(word(wa[u][r], j) >> (4 * p)), sa, za);
          fb[r][p] = dequant2(nibbles_to_bf16x2(word(wb[u][r], j) >> (4 * p)), sb, zb);
        }
      }
      const int piece = swizzle(4 * t + j);
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const uint4 X = *reinterpret_cast<const uint4*>(xc + mt * 8 * xs_stride + 8 * piece);
        const unsigned x04 = __byte_perm(X.x, X.z, 0x5410), x15 = __byte_perm(X.x, X.z, 0x7632);
        const unsigned x26 = __byte_perm(X.y, X.w, 0x5410), x37 = __byte_perm(X.y, X.w, 0x7632);
#pragma unroll
        for (int r = 0; r < R; ++r) {
          mma_bf16(acc[r][mt], fa[r][0], fb[r][0], fa[r][1], fb[r][1], x04, x15);
          mma_bf16(acc[r][mt], fa[r][2], fb[r][2], fa[r][3], fb[r][3], x26, x37);
        }
      }
    }
#endif
  }
}

extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS)
%(name)s(const bf16_t* __restrict__ x, const uint4* __restrict__ q,
         const bf16_t* __restrict__ scale, const bf16_t* __restrict__ zero,
         float* __restrict__ out, int M, int N, int K, int ldx, int lds, int group_shift,
         int block_chunks, int x_batch, int q_batch, int s_batch) {
  // block: 8 warps; grid (256-row blocks, K ranges, batch entries of 3D weights)
  extern __shared__ __align__(16) unsigned char smem[];
  {  // this block's batch entry: strides in elements (q: uint4); out is [B, M, N]
    const size_t b = blockIdx.z;
    x += b * x_batch; q += b * q_batch; scale += b * s_batch; zero += b * s_batch;
    out += b * M * N;
  }
  bf16_t* xs = reinterpret_cast<bf16_t*>(smem);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int c_begin = blockIdx.y * block_chunks;
  const int c_end = min(c_begin + block_chunks, K >> 7);
  // a row of 16-byte pieces plus 16 bytes: a quarter warp's 16-byte reads (2 rows x 4 lanes)
  // hit distinct banks
  const int xs_stride = (block_chunks << 7) + 8;

  {  // x[0, 8 MT) x [K range] -> shared memory; rows >= M are zero-filled
    const int pieces = (c_end - c_begin) << 4, k0 = c_begin << 7;
    for (int i = threadIdx.x; i < 8 * MT * pieces; i += 32 * WARPS) {
      const int m = i / pieces, p = i - m * pieces;
      const bf16_t* src = x + (size_t)min(m, M - 1) * ldx + k0 + 8 * p;
      unsigned dst;
      asm("{ .reg .u64 a; cvta.to.shared.u64 a, %%1; cvt.u32.u64 %%0, a; }"
          : "=r"(dst) : "l"(xs + m * xs_stride + 8 * swizzle(p)));
      asm volatile("cp.async.cg.shared.global [%%0], [%%1], 16, %%2;"
                   :: "r"(dst), "l"(src), "r"(m < M ? 16 : 0));
    }
    asm volatile("cp.async.commit_group;");
  }

  const int r0 = blockIdx.x * (WARPS * R * 16) + warp * (R * 16);  // this warp's first row
  int ra[R], rb[R];  // the lane's rows g and g + 8 of each tile; rows past N read the last one
#pragma unroll
  for (int r = 0; r < R; ++r) {
    ra[r] = min(r0 + 16 * r + g, N - 1);
    rb[r] = min(r0 + 16 * r + g + 8, N - 1);
  }
  size_t offa[R], offb[R], cstride;  // the GEMV's addressing, per layout
#if SHUFFLED
  // K steps 8c + t (wa) and 8c + 4 + t (wb) of row pair g of the lane's tiles
  const int tiles = N >> 4, tile0 = min(r0 >> 4, tiles - 1);
  const uint4* qa = q + ((size_t)t * tiles + tile0) * 8 + g;
  const uint4* qb = qa + (size_t)32 * tiles;
#pragma unroll
  for (int r = 0; r < R; ++r) offa[r] = offb[r] = 8 * (min(tile0 + r, tiles - 1) - tile0);
  cstride = (size_t)64 * tiles;
#else
  // 32 nibbles of rows ra / rb from K 128 c + 32 t
  const int row_len = K >> 5;  // uint4 per row
  const uint4* qa = q + (size_t)ra[0] * row_len + t;
  const uint4* qb = q + (size_t)rb[0] * row_len + t;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    offa[r] = (size_t)(ra[r] - ra[0]) * row_len;
    offb[r] = (size_t)(rb[r] - rb[0]) * row_len;
  }
  cstride = 4;
#endif
  const bf16_t* xl = xs + g * xs_stride;  // activation row g of each 8-row tile

  float acc[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][mt][i] = 0.f;

  // U chunks' weights and group scales / zeros; with PREFETCH the next U are loaded while
  // these are multiplied
  uint4 wa[U][R], wb[U][R], na[U][R], nb[U][R];
  bf16_t sz[U][4][R], nsz[U][4][R];
  const bool active = r0 < N;
  if (active)
    load_stage(wa, wb, sz, c_begin, c_end, qa, qb, scale, zero, offa, offb, cstride, ra, rb, lds,
               group_shift);
  asm volatile("cp.async.wait_all;" ::: "memory");
  __syncthreads();
  if (!active) return;

#pragma unroll 1
  for (int c = c_begin; c < c_end; c += U) {
#if PREFETCH
    if (c + U < c_end)
      load_stage(na, nb, nsz, c + U, c_end, qa, qb, scale, zero, offa, offb, cstride, ra, rb,
                 lds, group_shift);
#endif
    mma_stage(acc, wa, wb, sz, xl + ((c - c_begin) << 7), xs_stride, c_end - c, t);
#if PREFETCH
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        wa[u][r] = na[u][r]; wb[u][r] = nb[u][r];
#pragma unroll
        for (int i = 0; i < 4; ++i) sz[u][i][r] = nsz[u][i][r];
      }
#else
    if (c + U < c_end)
      load_stage(wa, wb, sz, c + U, c_end, qa, qb, scale, zero, offa, offb, cstride, ra, rb,
                 lds, group_shift);
#endif
  }

  // C fragment: acc[r][mt][i] is out[m = 8 mt + 2t + (i & 1)][n = r0 + 16 r + g + 8 (i >> 1)];
  // the K ranges are added in L2 (red.add into the zero-filled fp32 buffer). Measured on an
  // H200 and not kept: storing per-range sums for the last-arriving block to add (1.3-1.8x
  // the time at M = 32), and that block casting the sums to bf16 after a fence (the fence
  // waits for the contended red.adds: slower than a separate cast kernel).
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = 8 * mt + 2 * t + (i & 1), n = r0 + 16 * r + g + 8 * (i >> 1);
        if (m < M && n < N) atomicAdd(out + (size_t)m * N + n, acc[r][mt][i]);
      }
}
"""


#: the fp32 sums to the bf16 output, one element per thread (f_to_bf16: round to nearest
#: even), leaving the sums zero for the next call (see :func:`bind`)
_CAST_SOURCE = r"""
%(bf16_helpers)s
extern "C" __global__ void f32_to_bf16_and_zero(float* __restrict__ in, bf16_t* __restrict__ out,
                                                int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) {
    out[i] = f_to_bf16(in[i]);
    in[i] = 0.f;
  }
}
"""
_CAST_THREADS = 256


@functools.lru_cache(maxsize=None)
def _cast_kernel(capability: tuple[int, int]):
    return nvrtc.compile_kernel(_CAST_SOURCE % dict(bf16_helpers=nvrtc.BF16_HELPERS),
                                "f32_to_bf16_and_zero", capability)


def _smem_bytes(m_tiles: int, block_chunks: int) -> int:
    return 8 * m_tiles * ((block_chunks * CHUNK + 8) * 2)


@functools.lru_cache(maxsize=None)
def _kernel_source(m_tiles: int, u: int, min_blocks: int, prefetch: bool,
                   shuffled: bool = True) -> tuple[str, str]:
    """(source, name) of the kernel for ``8 * m_tiles`` activation rows, ``u`` chunks per step,
    at least ``min_blocks`` blocks per multiprocessor, with or without the prefetch, reading
    fbgemm's preshuffled layout or (``shuffled=False``) the plain one."""
    name = (f"int4_tc_gemm_{'shuffled' if shuffled else 'plain'}_m{m_tiles}_u{u}_b{min_blocks}"
            f"{'_pf' if prefetch else ''}")
    return _SOURCE % dict(m_tiles=m_tiles, u=u, min_blocks=min_blocks, prefetch=int(prefetch),
                          shuffled=int(shuffled), name=name, bf16_helpers=nvrtc.BF16_HELPERS,
                          mma_helpers=nvrtc.MMA_HELPERS), name


@functools.lru_cache(maxsize=None)
def _compiled(m_tiles: int, u: int, min_blocks: int, prefetch: bool, shuffled: bool,
              capability: tuple[int, int]):
    """The kernel of :func:`_kernel_source` for one GPU architecture (NVRTC, once per process)."""
    return nvrtc.compile_kernel(*_kernel_source(m_tiles, u, min_blocks, prefetch, shuffled),
                                capability)


@functools.lru_cache(maxsize=None)
def _allow_smem(kernel) -> None:
    """Opt the kernel into up to MAX_SMEM of dynamic shared memory, once (a later, smaller
    setting would lower torch's recorded limit for every launch)."""
    kernel.set_shared_memory_config(MAX_SMEM)


is_available = nvrtc.is_available


def can_compile(device_index: int) -> bool:
    """Whether the kernel compiles and loads on this device (tried once per device)."""
    return nvrtc.compiles(*_kernel_source(3, 1, 2, True),
                          torch.cuda.get_device_capability(device_index))


def pick_config(m: int, n: int, k: int, num_sms: int) -> dict:
    """``U`` chunks per step (``PREFETCH``: the next step's loaded during this one's math),
    ``MIN_BLOCKS`` per multiprocessor (a register cap) and ``BLOCK_CHUNKS`` 128-wide K chunks
    per block: the most of 8, 4, 2 that still give 1.25 blocks per multiprocessor (the sweep
    of ``scripts/probe_cuda_gemm.py`` on an H200: 8 on 8192x8192, 4 on 6144x4096, 2 on
    4096x4096)."""
    m_tiles, chunks = -(-m // 8), k // CHUNK
    block_chunks = 8
    while block_chunks > 2 and -(-n // BLOCK_N) * -(-chunks // block_chunks) < 1.25 * num_sms:
        block_chunks //= 2
    return dict(U=1, PREFETCH=True, MIN_BLOCKS=2 if m_tiles <= 4 else 1, BLOCK_CHUNKS=block_chunks)


def can_run(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
            zero_point: torch.Tensor, group_size: int, shuffled: bool = True) -> bool:
    """The kernel's contract, checked without touching the GPU: the GEMV's operand contract
    (:func:`cuda_gemv.operands_fit`: 2D, or 3D for bmm) with 17 to 32 rows (per batch entry),
    N a multiple of 16 on the preshuffled layout, and torch's NVRTC kernels able to take more
    than 48 KB of shared memory."""
    return (
        MIN_M <= x.shape[-2] <= MAX_M
        and (not shuffled or qdata.shape[-2] % 16 == 0)
        and cuda_gemv.operands_fit(x, qdata, scale, zero_point, group_size)
        and shared_memory_configurable()
    )


def shared_memory_configurable() -> bool:
    """Whether torch's NVRTC kernels can be given more than 48 KB of shared memory."""
    return hasattr(getattr(torch.cuda, "_utils", None), "_CudaKernel") and \
        hasattr(torch.cuda._utils._CudaKernel, "set_shared_memory_config")


def int4_gemm(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    config: dict | None = None,
    shuffled: bool = True,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` for ``W = q * scale + zero_point``; 3D weights
    (``torch.bmm``, MoE experts): ``x [B, M, K] @ W[b].T -> [B, M, N]`` in one launch.

    Args:
        x: bf16 ``[M, K]`` or ``[B, M, K]``, ``1 <= M <= 64`` (the dispatcher sends 17 to 32),
            rows 16-byte aligned.
        qdata: int8 ``[N, K/2]`` or ``[B, N, K/2]``: fbgemm's bf16 preshuffled layout (N a
            multiple of 16; ``Int4PreshuffledTensor``), or with ``shuffled=False`` the plain
            layout (``Int4Tensor``, any N).
        scale, zero_point: bf16 ``[K/G, N]`` or ``[B, K/G, N]``, last dim contiguous; G = 128
            or 256.
        config: any of ``U``, ``MIN_BLOCKS``, ``BLOCK_CHUNKS``, ``PREFETCH`` (the rest from
            :func:`pick_config`).
        shuffled: which layout ``qdata`` is in.

    Returns:
        bf16 ``[M, N]`` or ``[B, M, N]``.
    """
    plan = _launch_plan(tuple(x.shape), x.stride(), tuple(qdata.shape), qdata.stride(0),
                        scale.stride(), x.device.index, group_size, shuffled,
                        tuple(sorted(config.items())) if config else ())
    return plan(x, qdata, scale, zero_point)


def bind(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
         group_size: int, shuffled: bool = True, out_shape: tuple | None = None):
    """``f(x) -> int4_gemm(x, qdata, scale, zero_point, group_size, shuffled=shuffled)`` for
    activations of ``x``'s shape, strides and device: the launch is planned here, once.
    ``out_shape`` as for :func:`cuda_gemv.bind`.

    An eager call adds its K ranges into an fp32 buffer kept for the current stream (shared by
    every bound weight of the same output size), which the cast kernel leaves zeroed: two
    launches, no fill. Calls on one stream run in order, so they never share the buffer at
    once. A call being captured into a CUDA graph takes a buffer of its own (filled with zeros
    by the graph): replays of graphs can run on any stream, concurrently."""
    plan = _launch_plan(tuple(x.shape), x.stride(), tuple(qdata.shape), qdata.stride(0),
                        scale.stride(), x.device.index, group_size, shuffled, ())
    out_like = nvrtc.empty_allocator(cuda_gemv._checked_out_shape(out_shape, plan.sums_shape),
                                     torch.bfloat16, x.device)
    launch, cast, device_index = plan.launch.launch, plan.cast.launch, plan.device_index
    elements = math.prod(plan.sums_shape)
    zeroed = _ZEROED_SUMS.setdefault((elements, device_index), {})
    current_stream = torch._C._cuda_getCurrentRawStream
    capturing = torch._C._cuda_isCurrentStreamCapturing
    # the weight's addresses, read once (see cuda_gemv.bind); the tuple keeps them alive
    weight = (qdata, scale, zero_point)
    q_ptr, s_ptr, z_ptr = (t.data_ptr() for t in weight)

    def gemm(x: torch.Tensor, _weight=weight) -> torch.Tensor:
        if capturing():
            return plan.run(x.data_ptr(), q_ptr, s_ptr, z_ptr, out_like)
        stream = current_stream(device_index)
        sums_ptr = zeroed.get(stream) or _new_zeroed_sums(zeroed, elements, stream, device_index)
        launch(x.data_ptr(), q_ptr, s_ptr, z_ptr, sums_ptr)
        out = out_like()
        cast(sums_ptr, out.data_ptr())
        return out
    return gemm


#: (elements, device index) -> {raw stream handle: the data pointer of a zeroed fp32 buffer},
#: for :func:`bind`; the buffers themselves are held in :data:`_SUMS_BUFFERS` for the
#: process's life (one per output size and stream: 16 MB for a 128256-wide lm_head at M = 32)
_ZEROED_SUMS: dict[tuple[int, int], dict[int, int]] = {}
_SUMS_BUFFERS: list[torch.Tensor] = []


def _new_zeroed_sums(zeroed: dict[int, int], elements: int, stream: int,
                     device_index: int) -> int:
    """A zeroed buffer for the eager calls on ``stream`` (made outside any graph capture)."""
    buffer = torch.zeros(elements, dtype=torch.float32, device=torch.device("cuda", device_index))
    _SUMS_BUFFERS.append(buffer)
    zeroed[stream] = buffer.data_ptr()
    return zeroed[stream]


class _LaunchPlan(NamedTuple):
    launch: nvrtc.Launcher
    cast: nvrtc.Launcher
    kernel: object
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    ints: tuple[int, ...]
    sums_shape: tuple[int, ...]
    device_index: int

    def __call__(self, x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                 zero_point: torch.Tensor) -> torch.Tensor:
        return self.run(x.data_ptr(), qdata.data_ptr(), scale.data_ptr(), zero_point.data_ptr())

    def run(self, x_ptr: int, q_ptr: int, s_ptr: int, z_ptr: int, out_like=None) -> torch.Tensor:
        """One call on the operands at these addresses, with fp32 sums of its own: zero them,
        launch, cast them to the bf16 output (``out_like()``: one of the same elements in
        another shape). What the custom op runs, also inside torch.compile's CUDA graphs, whose
        warm-up runs in the graphs' memory pool: the plan itself holds no tensor (one left in
        the pool fails their check). The fill goes through the driver: ``torch.zeros`` costs
        more host time than the GEMM's launch itself (bench_host.py, M = 32)."""
        device = torch.device("cuda", self.device_index)
        sums = torch.empty(self.sums_shape, dtype=torch.float32, device=device)
        nvrtc.zero_async(sums, self.device_index)
        self.launch.launch(x_ptr, q_ptr, s_ptr, z_ptr, sums.data_ptr())
        out = (out_like() if out_like is not None else
               torch.empty(self.sums_shape, dtype=torch.bfloat16, device=device))
        self.cast.launch(sums.data_ptr(), out.data_ptr())
        return out


@functools.lru_cache(maxsize=4096)
def _launch_plan(x_shape: tuple, x_stride: tuple, q_shape: tuple, q_batch_stride: int,
                 s_stride: tuple, device_index: int, group_size: int, shuffled: bool,
                 config: tuple) -> _LaunchPlan:
    """Everything a launch needs that follows from the operands' shapes and strides: made once
    per signature, so a repeated call only allocates its output and launches."""
    batched = len(x_shape) == 3
    batch = x_shape[0] if batched else 1
    m, k = x_shape[-2:]
    if not 1 <= m <= 64:  # 8 mma tiles at most (registers)
        raise ValueError(f"the GEMM takes 1 to 64 activation rows, got {m}")
    n = q_shape[-2]
    props = torch.cuda.get_device_properties(device_index)
    # the batch's blocks share the multiprocessors, so the config sees all of their rows
    cfg = dict(pick_config(m, batch * n, k, props.multi_processor_count), **dict(config))
    m_tiles = -(-m // 8)
    chunks = k // CHUNK
    block_chunks = min(cfg["BLOCK_CHUNKS"], chunks)
    smem = _smem_bytes(m_tiles, block_chunks)
    if smem > MAX_SMEM:
        raise ValueError(f"BLOCK_CHUNKS={block_chunks} needs {smem} bytes of shared memory at "
                         f"M={m}, more than {MAX_SMEM}")
    kernel = _compiled(m_tiles, cfg["U"], cfg["MIN_BLOCKS"], bool(cfg["PREFETCH"]), shuffled,
                       (props.major, props.minor))
    if smem >= 48 * 1024:
        _allow_smem(kernel)
    strides = (x_stride[0], q_batch_stride // 16, s_stride[0]) if batched else (0, 0, 0)
    return _with_launcher(
        kernel=kernel,
        grid=(-(-n // BLOCK_N), -(-chunks // block_chunks), batch),
        block=(32 * WARPS, 1, 1),
        shared_mem=smem,
        device_index=device_index,
        ints=(m, n, k, x_stride[-2], s_stride[-2], group_size.bit_length() - 1, block_chunks,
              *strides),
        sums_shape=(*x_shape[:-1], n),
    )


def _with_launcher(device_index: int, **fields) -> _LaunchPlan:
    launch = nvrtc.Launcher(fields["kernel"], fields["grid"], fields["block"],
                            fields["shared_mem"], 5, fields["ints"], device_index)
    elements = 1
    for size in fields["sums_shape"]:
        elements *= size
    capability = torch.cuda.get_device_capability(device_index)
    cast = nvrtc.Launcher(_cast_kernel(capability), (-(-elements // _CAST_THREADS), 1, 1),
                          (_CAST_THREADS, 1, 1), 0, 2, (elements,), device_index)
    return _LaunchPlan(launch=launch, cast=cast, device_index=device_index, **fields)
