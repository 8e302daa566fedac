"""CUDA tensor-core GEMM over fbgemm's bf16 preshuffled layout for 17 to 64 activation rows
(batched decode, short prompts), where the weights are still read once but each weight now
meets enough activation rows that the decode GEMV's per-warp activation loads dominate.

* A block of 8 warps owns 256 weight rows (two 16-row tiles per warp, as the GEMV's ``R = 2``)
  and a range of ``BLOCK_CHUNKS`` 128-wide K chunks (split-K over the grid's y). It first
  copies the activations of its K range, ``x [M, K range]``, into shared memory
  (``cp.async``, rows up to the next multiple of 8 zero-filled); all warps then read them
  there. Activation traffic is one copy per block instead of one per warp.
* Weights stream from HBM into registers (``U`` chunks in flight per warp) in the layout the
  GEMV reads (see cuda_gemv.py: a lane's 16-byte load holds four mma A fragments of its K
  step, so the activations need no permutation), and are dequantized before the mma:
  ``(136 + q) -> q`` exactly, then ``q * s + z`` in one bf16x2 fma, rounded once as the
  reference path rounds its dequantized weight. With M >= 17 this costs fewer instructions
  than the GEMV's separate activation sums, whose mma count grows with M.
* Each ``mma.m16n8k16`` multiplies a 16-row weight tile by 8 activation rows; the fp32
  results of the K ranges are added into a zeroed fp32 ``[M, N]`` buffer (``red.add``, in
  L2) and cast to bf16 at the end.

Compiled at first use with NVRTC (like cuda_gemv.py); this module imports nothing but torch.
"""

from __future__ import annotations

import functools

import torch

from int4tensor.kernels import nvrtc

#: the activation rows this kernel is built for (8-row mma tiles: up to 8 of them)
MIN_M, MAX_M = 17, 64
CHUNK = 128
WARPS = 8
#: weight rows per block: 8 warps x 2 tiles x 16 rows
BLOCK_N = WARPS * 2 * 16
#: shared memory one block may use (H100 / H200 allow 227 KB)
MAX_SMEM = 200 * 1024

_SOURCE = r"""
#define MT %(m_tiles)d          // 8-row activation tiles
#define STAGES %(stages)d       // K chunks in flight per warp (cp.async ring)
#define MIN_BLOCKS %(min_blocks)d
#define WARPS 8
#define R 2                     // 16-row weight tiles per warp
// a warp's ring slot: R tiles x (K steps 8c + t, 8c + 4 + t) x 32 lanes x 16 bytes, then the
// 32 rows' group scales and zeros (64 bytes each)
#define SLOT_BYTES (R * 2 * 512 + 128)

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
// 16 bytes global -> shared, asynchronously; zero-filled where !valid (nothing is read)
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
  unsigned a;
  asm("{ .reg .u64 t; cvta.to.shared.u64 t, %%1; cvt.u32.u64 %%0, t; }" : "=r"(a) : "l"(dst));
  asm volatile("cp.async.cg.shared.global [%%0], [%%1], 16, %%2;" :: "r"(a), "l"(src), "r"(valid ? 16 : 0));
}

extern "C" __global__ void __launch_bounds__(32 * WARPS, MIN_BLOCKS)
%(name)s(const bf16_t* __restrict__ x, const uint4* __restrict__ q,
         const bf16_t* __restrict__ scale, const bf16_t* __restrict__ zero,
         float* __restrict__ out, int M, int N, int K, int ldx, int lds, int group_shift,
         int block_chunks) {
  extern __shared__ __align__(16) unsigned char smem[];
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, g = lane >> 2, t = lane & 3;
  const int c_begin = blockIdx.y * block_chunks;
  const int c_end = min(c_begin + block_chunks, K >> 7);
  // activation rows of 16-byte pieces plus 16 bytes: a warp's 16-byte reads of 8 rows x 4 K
  // steps hit distinct banks
  const int xs_stride = (block_chunks << 7) + 8;
  bf16_t* xs = reinterpret_cast<bf16_t*>(smem);
  unsigned char* ring = smem + 16 * MT * xs_stride + warp * STAGES * SLOT_BYTES;

  {  // x[0, 8 MT) x [K range] -> shared memory; rows >= M are zero-filled
    const int pieces = (c_end - c_begin) << 4, k0 = c_begin << 7;
    for (int i = threadIdx.x; i < 8 * MT * pieces; i += 32 * WARPS) {
      const int m = i / pieces, p = i - m * pieces;
      copy16(xs + m * xs_stride + 8 * p, x + (size_t)min(m, M - 1) * ldx + k0 + 8 * p, m < M);
    }
  }

  const int r0 = blockIdx.x * (WARPS * R * 16) + warp * (R * 16);  // this warp's first row
  const int tiles = N >> 4;
  // lane (g, t) reads K steps 8c + t (wa) and 8c + 4 + t (wb) of row pair g of its tiles (the
  // GEMV's addressing); a tile past N reads the last one again (its output is not written)
  const int tile0 = min(r0 >> 4, tiles - 1);
  const uint4* qa = q + ((size_t)t * tiles + tile0) * 8 + g;
  const uint4* qb = qa + (size_t)32 * tiles;
  int toff[R];
#pragma unroll
  for (int r = 0; r < R; ++r) toff[r] = 8 * (min((r0 >> 4) + r, tiles - 1) - tile0);

  // chunk c -> ring slot: every lane its own weights, lanes 0-7 the warp's scales and zeros;
  // one commit group per call (empty past the block's range) keeps the group count uniform
  auto issue = [&](int slot, int c) {
    if (c < c_end) {
      unsigned char* base = ring + slot * SLOT_BYTES;
      uint4* w = reinterpret_cast<uint4*>(base);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const size_t off = (size_t)c * 64 * tiles + toff[r];
        copy16(w + (2 * r) * 32 + lane, qa + off, true);
        copy16(w + (2 * r + 1) * 32 + lane, qb + off, true);
      }
      if (lane < 8) {  // 4 x 16 bytes of scales, then of zeros: rows r0 .. r0 + 31
        const int piece = lane & 3;
        const bool valid = r0 + 8 * piece < N;
        const bf16_t* src = (lane < 4 ? scale : zero) + (size_t)((c << 7) >> group_shift) * lds +
                            r0 + 8 * piece;
        copy16(base + R * 2 * 512 + (lane >> 2) * 64 + piece * 16, valid ? src : scale, valid);
      }
    }
    asm volatile("cp.async.commit_group;");
  };

  float acc[R][MT][4];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[r][mt][i] = 0.f;

#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) issue(s, c_begin + s);  // the first group holds x too
  asm volatile("cp.async.wait_group %%0;" :: "n"(STAGES - 2) : "memory");
  __syncthreads();  // every thread's share of x has landed
  if (r0 >= N) return;

  // this lane's activations: row g of each 8-row tile, the 16 values of its K step
  const bf16_t* xl = xs + g * xs_stride + (t << 4);
#pragma unroll 1
  for (int c = c_begin, i = 0; c < c_end; ++c, ++i) {
    asm volatile("cp.async.wait_group %%0;" :: "n"(STAGES - 2) : "memory");
    __syncwarp();  // chunk c's slot complete for all lanes; the previous slot read by all
    issue((i + STAGES - 1) %% STAGES, c + STAGES - 1);
    const unsigned char* base = ring + (i %% STAGES) * SLOT_BYTES;
    const uint4* w = reinterpret_cast<const uint4*>(base);
    const bf16_t* sc = reinterpret_cast<const bf16_t*>(base + R * 2 * 512);
    const bf16_t* xc = xl + ((c - c_begin) << 7);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      // words j, j + 1 of the lane's 16 bytes: K pairs (2j, 2j + 2) and (2j + 8, 2j + 10)
      // of its step, rows g (even slots) and g + 8 (odd slots), see cuda_gemv.py
      unsigned lo[2][R][4], hi[2][R][4];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 W = w[(2 * r + half) * 32 + lane];
        const unsigned sa = splat(sc[16 * r + g]), sb = splat(sc[16 * r + g + 8]);
        const unsigned za = splat(sc[32 + 16 * r + g]), zb = splat(sc[32 + 16 * r + g + 8]);
#pragma unroll
        for (int jj = 0; jj < 2; ++jj) {
          const unsigned w0 = word(W, 2 * jj), w1 = word(W, 2 * jj + 1);
          lo[jj][r][0] = dequant2(nibbles_to_bf16x2(w0), sa, za);
          lo[jj][r][1] = dequant2(nibbles_to_bf16x2(w0 >> 4), sb, zb);
          lo[jj][r][2] = dequant2(nibbles_to_bf16x2(w1), sa, za);
          lo[jj][r][3] = dequant2(nibbles_to_bf16x2(w1 >> 4), sb, zb);
          hi[jj][r][0] = dequant2(nibbles_to_bf16x2(w0 >> 8), sa, za);
          hi[jj][r][1] = dequant2(nibbles_to_bf16x2(w0 >> 12), sb, zb);
          hi[jj][r][2] = dequant2(nibbles_to_bf16x2(w1 >> 8), sa, za);
          hi[jj][r][3] = dequant2(nibbles_to_bf16x2(w1 >> 12), sb, zb);
        }
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
  }

  // C fragment: acc[r][mt][i] is out[m = 8 mt + 2t + (i & 1)][n = r0 + 16 r + g + 8 (i >> 1)]
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


def _smem_bytes(m_tiles: int, block_chunks: int, stages: int) -> int:
    """The activation copy plus each warp's ring of ``stages`` weight slots."""
    return 16 * m_tiles * (block_chunks * CHUNK + 8) + WARPS * stages * (2 * 2 * 512 + 128)


@functools.lru_cache(maxsize=None)
def _kernel_source(m_tiles: int, stages: int, min_blocks: int) -> tuple[str, str]:
    name = f"int4_tc_gemm_shuffled_m{m_tiles}_s{stages}_b{min_blocks}"
    return _SOURCE % dict(m_tiles=m_tiles, stages=stages, min_blocks=min_blocks, name=name,
                          bf16_helpers=nvrtc.BF16_HELPERS, mma_helpers=nvrtc.MMA_HELPERS), name


@functools.lru_cache(maxsize=None)
def _compiled(m_tiles: int, stages: int, min_blocks: int, capability: tuple[int, int]):
    return nvrtc.compile_kernel(*_kernel_source(m_tiles, stages, min_blocks), capability)


@functools.lru_cache(maxsize=None)
def _allow_smem(kernel) -> None:
    """Opt the kernel into up to MAX_SMEM of dynamic shared memory, once (a later, smaller
    setting would lower torch's recorded limit for every launch)."""
    kernel.set_shared_memory_config(MAX_SMEM)


def can_compile(device_index: int) -> bool:
    """Whether the kernel compiles and loads on this device (tried once per device)."""
    return nvrtc.compiles(*_kernel_source(3, 4, 1), torch.cuda.get_device_capability(device_index))


def pick_config(m: int, n: int, k: int, num_sms: int) -> dict:
    """``STAGES`` K chunks in flight per warp, ``MIN_BLOCKS`` per multiprocessor (a register
    cap) and ``BLOCK_CHUNKS`` 128-wide K chunks per block (the shared-memory activation
    copy)."""
    return dict(STAGES=4, MIN_BLOCKS=1, BLOCK_CHUNKS=8)


def can_run(x: torch.Tensor, qdata: torch.Tensor, group_scale: torch.Tensor,
            group_zero: torch.Tensor, group_size: int) -> bool:
    """The kernel's contract, checked without touching the GPU: bf16 ``x [17 <= M <= 64, K]``
    with 16-byte aligned rows, a contiguous preshuffled ``qdata [N, K/2]`` (N a multiple of
    16), bf16 N-contiguous group scales / zeros, G = 128 or 256, K a multiple of 128, and the
    shared-memory API of torch's NVRTC kernels (above 48 KB)."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and x.ndim == 2 and qdata.ndim == 2
        and MIN_M <= x.shape[0] <= MAX_M
        and x.stride(-1) == 1
        and x.stride(0) % 8 == 0
        and x.storage_offset() % 8 == 0
        and qdata.is_contiguous()
        and qdata.storage_offset() % 16 == 0
        and qdata.shape[0] % 16 == 0
        and qdata.shape[-1] * 2 == x.shape[-1]
        and x.shape[-1] % CHUNK == 0
        and group_scale.dtype == torch.bfloat16
        and group_zero.dtype == torch.bfloat16
        and group_scale.stride(-1) == 1
        and group_zero.stride() == group_scale.stride()
        and group_size in (128, 256)
        and hasattr(getattr(torch.cuda, "_utils", None), "_CudaKernel")
        and hasattr(torch.cuda._utils._CudaKernel, "set_shared_memory_config")
    )


def int4_gemm(
    x: torch.Tensor,
    qdata: torch.Tensor,
    group_scale: torch.Tensor,
    group_zero: torch.Tensor,
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` for a bf16 ``Int4PreshuffledTensor``'s fields,
    ``W = q * group_scale + group_zero``.

    Args:
        x: bf16 ``[M, K]``, ``17 <= M <= 64``, rows 16-byte aligned (see :func:`can_run`).
        qdata: int8 ``[N, K/2]`` in fbgemm's bf16 preshuffled layout, N a multiple of 16.
        group_scale, group_zero: bf16 ``[K/G, N]``, last dim contiguous; G = 128 or 256.
        config: any of ``STAGES``, ``MIN_BLOCKS``, ``BLOCK_CHUNKS`` (the rest from
            :func:`pick_config`).

    Returns:
        bf16 ``[M, N]``.
    """
    m, k = x.shape
    n = qdata.shape[0]
    props = torch.cuda.get_device_properties(x.device)
    cfg = dict(pick_config(m, n, k, props.multi_processor_count), **(config or {}))
    m_tiles = -(-m // 8)
    chunks = k // CHUNK
    block_chunks = min(cfg["BLOCK_CHUNKS"], chunks)
    smem = _smem_bytes(m_tiles, block_chunks, cfg["STAGES"])
    if smem > MAX_SMEM:
        raise ValueError(f"{cfg} needs {smem} bytes of shared memory at M={m}, more than "
                         f"{MAX_SMEM}")
    kernel = _compiled(m_tiles, cfg["STAGES"], cfg["MIN_BLOCKS"], (props.major, props.minor))
    if smem >= 48 * 1024:
        _allow_smem(kernel)
    acc = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    kernel(
        grid=(-(-n // BLOCK_N), -(-chunks // block_chunks), 1),
        block=(32 * WARPS, 1, 1),
        args=[x, qdata, group_scale, group_zero, acc, m, n, k, x.stride(0),
              group_scale.stride(0), group_size.bit_length() - 1, block_chunks],
        shared_mem=smem,
    )
    return acc.to(torch.bfloat16)
