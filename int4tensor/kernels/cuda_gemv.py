"""CUDA GEMV over the plain Int4Tensor layout, for decode (M = 1 to a few rows).

At decode sizes a linear layer is bound by reading its weights, and what keeps an int4 kernel
from the bandwidth limit is (a) too few bytes in flight per multiprocessor and (b) too many
instructions per weight to unpack nibbles. This kernel:

* has every lane load 16 bytes (32 weights) of a row at a time, ``U`` loads for each of ``R``
  rows issued before any is used, so a warp keeps ``U * R * 512`` bytes in flight;
* turns nibbles into float32 with one bitwise op each and no int->float conversion: for a
  nibble ``u`` sitting at bits ``p..p+3 <= 22`` of a 32-bit word (inside the mantissa),
  ``(word & (0xF << p)) | 0x3F800000`` is the float ``1 + u * 2**(p - 23)``. Three cheap
  shifts/permutes per word place every odd nibble at bit 12 and every even one at bit 16, so
  each product is ``x * (1 + u * 2**-c)`` for ``c`` = 11 or 7, and
  ``sum x * u = (sum x * f - sum x) * 2**c`` is recovered once per 32 weights (relative
  rounding ~1e-4, below the bf16 output's);
* factors the group scale and zero point out of the inner product:
  ``sum_k x_k w_k = s * sum_k x_k u_k + (z - 8 s) * sum_k x_k`` for ``w = (u - 8) * s + z``
  (``q = u - 8`` is the stored signed value), so the per-weight work is one bitwise op and one
  FMA per activation row.

Rows of a block share the 32-byte sectors that hold their scales (``scale [K/G, N]`` is
N-contiguous), so the scale reads cost ~6% of the weight bytes, as the format does.

The source is compiled at first use with NVRTC through ``torch.cuda._compile_kernel``, so it
needs no compiler at install time. Where that is missing or fails, :func:`is_available` is False
and the dispatcher picks the Triton kernels instead. This module imports nothing but torch.
"""

from __future__ import annotations

import functools

import torch

#: warps per block along N; each covers ``R`` consecutive rows (4 * 4 = 16 rows = the 32-byte
#: sector of bf16 scales)
WARPS_N = 4
#: the largest number of activation rows the kernel is compiled for
MAX_M = 8
#: the most K slices (warps splitting one row's K) a block may have: the register budget
#: (__launch_bounds__) is set by the block size, and 4 slices leave 128 registers per thread
MAX_SLICES = 4

_SOURCE = r"""
#define M_ROWS %(m)d
#define R %(r)d
#define U %(u)d
#define WARPS_N %(warps_n)d
#define MAX_SLICES %(max_slices)d

typedef unsigned short bf16_t;

__device__ __forceinline__ float bf16_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(unsigned v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float bf16_to_f(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ bf16_t f_to_bf16(float f) {  // round to nearest even, NaN kept
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16_t)(u >> 16);
}
// 1 + u * 2**(P - 23) for the nibble u at bits P..P+3 of v
#define NIB(v, P) __uint_as_float(((v) & (0xFu << (P))) | 0x3F800000u)

extern "C" __global__ void __launch_bounds__(32 * WARPS_N * MAX_SLICES)
%(name)s(const bf16_t* __restrict__ x, const uint4* __restrict__ q,
         const bf16_t* __restrict__ scale, const bf16_t* __restrict__ zero,
         bf16_t* __restrict__ out, int N, int K, int ldx, int lds, int ldo, int group_shift) {
  // block (32, WARPS_N, KS): lane, row group, K slice; each step covers 1024 K positions
  const int lane = threadIdx.x;
  const int slice = threadIdx.z;
  const int slices = blockDim.z;
  const int row0 = (blockIdx.x * WARPS_N + threadIdx.y) * R;
  const int steps = (K + 1023) >> 10;
  const int q_row_len = K >> 5;  // uint4 per row
  int rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) rows[r] = min(row0 + r, N - 1);

  float acc[M_ROWS][R];
#pragma unroll
  for (int m = 0; m < M_ROWS; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;

  for (int s0 = slice; s0 < steps; s0 += slices * U) {
    uint4 w[U][R];
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int k0 = ((s0 + i * slices) << 10) + (lane << 5);
      const bool valid = (s0 + i * slices) < steps && k0 < K;
#pragma unroll
      for (int r = 0; r < R; ++r)
        w[i][r] = valid ? q[(size_t)rows[r] * q_row_len + (k0 >> 5)] : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int i = 0; i < U; ++i) {
      const int k0 = ((s0 + i * slices) << 10) + (lane << 5);
      if ((s0 + i * slices) >= steps || k0 >= K) continue;
      // keep the compiler from hoisting every step's activation loads (register spills at M > 1);
      // the weight loads above are already in flight
      asm volatile("" ::: "memory");
      const int g = k0 >> group_shift;
      float s[R], zc[R];
#pragma unroll
      for (int r = 0; r < R; ++r) {
        s[r] = bf16_to_f(scale[(size_t)g * lds + rows[r]]);
        zc[r] = bf16_to_f(zero[(size_t)g * lds + rows[r]]) - 8.f * s[r];
      }
      // per activation row m and weight row r: sums of x * f over odd / even nibbles
      float a12[M_ROWS][R], a16[M_ROWS][R], c12[M_ROWS], c16[M_ROWS];
#pragma unroll
      for (int m = 0; m < M_ROWS; ++m) {
        c12[m] = 0.f; c16[m] = 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) { a12[m][r] = 0.f; a16[m][r] = 0.f; }
      }
#pragma unroll
      for (int j = 0; j < 4; ++j) {  // word j of each lane's 16 bytes: k0 + 8j .. k0 + 8j + 7
        float xf[M_ROWS][8];
#pragma unroll
        for (int m = 0; m < M_ROWS; ++m) {
          const uint4 xv = __ldg(reinterpret_cast<const uint4*>(x + (size_t)m * ldx + k0) + j);
          xf[m][0] = bf16_lo(xv.x); xf[m][1] = bf16_hi(xv.x); xf[m][2] = bf16_lo(xv.y); xf[m][3] = bf16_hi(xv.y);
          xf[m][4] = bf16_lo(xv.z); xf[m][5] = bf16_hi(xv.z); xf[m][6] = bf16_lo(xv.w); xf[m][7] = bf16_hi(xv.w);
          c12[m] += (xf[m][1] + xf[m][3]) + (xf[m][5] + xf[m][7]);
          c16[m] += (xf[m][0] + xf[m][2]) + (xf[m][4] + xf[m][6]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          // two's-complement nibbles b; b ^ 8 = q + 8 = u
          const unsigned v0 = ((j == 0) ? w[i][r].x : (j == 1) ? w[i][r].y : (j == 2) ? w[i][r].z : w[i][r].w) ^ 0x88888888u;
          // nibble n of v0 holds k = k0 + 8j + n; odd nibbles go to bit 12, even ones to 16
          const unsigned v1 = __byte_perm(v0, 0, 0x1032);  // n7 -> 12, n0 -> 16
          const unsigned v2 = v0 << 8;                      // n1 -> 12, n2 -> 16
          const unsigned v3 = v0 >> 8;                      // n5 -> 12, n6 -> 16
          const float f1 = NIB(v2, 12), f3 = NIB(v0, 12), f5 = NIB(v3, 12), f7 = NIB(v1, 12);
          const float f0 = NIB(v1, 16), f2 = NIB(v2, 16), f4 = NIB(v0, 16), f6 = NIB(v3, 16);
#pragma unroll
          for (int m = 0; m < M_ROWS; ++m) {
            a12[m][r] = fmaf(xf[m][1], f1, fmaf(xf[m][3], f3, fmaf(xf[m][5], f5, fmaf(xf[m][7], f7, a12[m][r]))));
            a16[m][r] = fmaf(xf[m][0], f0, fmaf(xf[m][2], f2, fmaf(xf[m][4], f4, fmaf(xf[m][6], f6, a16[m][r]))));
          }
        }
      }
#pragma unroll
      for (int m = 0; m < M_ROWS; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const float dot = (a12[m][r] - c12[m]) * 2048.f + (a16[m][r] - c16[m]) * 128.f;
          acc[m][r] = fmaf(s[r], dot, fmaf(zc[r], c12[m] + c16[m], acc[m][r]));
        }
    }
  }

  // reduce over the 32 lanes, then over the K slices through shared memory
  __shared__ float partial[MAX_SLICES][WARPS_N][M_ROWS * R];
#pragma unroll
  for (int m = 0; m < M_ROWS; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float v = acc[m][r];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
      acc[m][r] = v;
    }
  if (slices > 1) {
    if (lane == 0)
#pragma unroll
      for (int i = 0; i < M_ROWS * R; ++i) partial[slice][threadIdx.y][i] = acc[i / R][i %% R];
    __syncthreads();
    if (slice != 0) return;
    for (int i = lane; i < M_ROWS * R; i += 32) {
      float v = 0.f;
      for (int z = 0; z < slices; ++z) v += partial[z][threadIdx.y][i];
      const int m = i / R, r = i %% R;
      if (row0 + r < N) out[(size_t)m * ldo + row0 + r] = f_to_bf16(v);
    }
    return;
  }
  if (lane == 0)
#pragma unroll
    for (int m = 0; m < M_ROWS; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r)
        if (row0 + r < N) out[(size_t)m * ldo + row0 + r] = f_to_bf16(acc[m][r]);
}
"""


def is_available() -> bool:
    """True where the NVRTC runtime compiler is reachable through torch (CUDA builds)."""
    return torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")


@functools.lru_cache(maxsize=None)
def _compiled(m: int, r: int, u: int, capability: tuple[int, int]):
    """The kernel for ``m`` activation rows, ``r`` weight rows per warp and ``u`` loads per row
    in flight, compiled for one GPU architecture (NVRTC, about a second, once per process)."""
    name = f"int4_gemv_m{m}_r{r}_u{u}"
    source = _SOURCE % dict(m=m, r=r, u=u, warps_n=WARPS_N, max_slices=MAX_SLICES, name=name)
    return torch.cuda._compile_kernel(
        source, name, compute_capability=f"{capability[0]}{capability[1]}")


@functools.lru_cache(maxsize=None)
def can_compile(device_index: int) -> bool:
    """Whether the kernel compiles on this device (probed once per device)."""
    try:
        _compiled(1, 4, 4, torch.cuda.get_device_capability(device_index))
        return True
    except Exception:  # no NVRTC, an old driver: the dispatcher falls back to Triton
        return False


def pick_config(m: int, n: int, k: int, num_sms: int) -> dict:
    """Rows per warp, loads in flight and K slices per block for one call: enough warps to keep
    every multiprocessor's memory pipe full (~16 warps each), no more K slices than steps."""
    r, u = 4, 4
    blocks = -(-n // (WARPS_N * r))
    steps = -(-k // 1024)
    slices = 1
    while blocks * WARPS_N * slices < 16 * num_sms and slices < MAX_SLICES and steps >= 2 * slices * u:
        slices *= 2
    return dict(R=r, U=u, SLICES=slices)


def int4_gemv(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` for ``W = q * scale + zero_point`` in the plain layout.

    Args:
        x: bf16 ``[M, K]`` with ``1 <= M <= MAX_M``, contiguous, 16-byte aligned.
        qdata: int8 ``[N, K/2]`` contiguous, 16-byte aligned.
        scale, zero_point: bf16 ``[K/G, N]``, last dim contiguous.
        group_size: G, a power of two >= 32 (each lane's 32 weights lie in one group).
        config: ``R``, ``U``, ``SLICES`` (default :func:`pick_config`).

    Returns:
        bf16 ``[M, N]``.
    """
    m, k = x.shape
    n = qdata.shape[0]
    props = torch.cuda.get_device_properties(x.device)
    cfg = config or pick_config(m, n, k, props.multi_processor_count)
    kernel = _compiled(m, cfg["R"], cfg["U"], (props.major, props.minor))
    out = torch.empty(m, n, dtype=torch.bfloat16, device=x.device)
    blocks = -(-n // (WARPS_N * cfg["R"]))
    kernel(
        grid=(blocks, 1, 1),
        block=(32, WARPS_N, cfg["SLICES"]),
        args=[x, qdata, scale, zero_point, out, n, k, x.stride(0), scale.stride(0),
              out.stride(0), group_size.bit_length() - 1],
    )
    return out


def can_run(x2d: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
            zero_point: torch.Tensor, group_size: int) -> bool:
    """The kernel's contract, checked without touching the GPU."""
    return (
        x2d.is_cuda
        and x2d.dtype == torch.bfloat16
        and 1 <= x2d.shape[0] <= MAX_M
        and x2d.stride(-1) == 1
        and x2d.stride(0) % 8 == 0
        and x2d.data_ptr() % 16 == 0
        and qdata.is_contiguous()
        and qdata.data_ptr() % 16 == 0
        and scale.dtype == torch.bfloat16
        and zero_point.dtype == torch.bfloat16
        and scale.stride(-1) == 1
        and zero_point.stride() == scale.stride()
        and group_size >= 32
        and group_size & (group_size - 1) == 0
    )
