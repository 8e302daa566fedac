"""Per-row fp8 (e4m3) quantization of activations in one CUDA kernel.

fp8-activation linears quantize their input at run time. As separate torch ops (abs, amax,
divide, clamp, cast) that costs 18-20 µs at M = 1 and 59 µs at M = 1024, K = 4096, measured in
CUDA graphs on an H200: as much as the int4 GEMM itself (``scripts/probe_fp8.py``). This kernel
does it in one pass per row (one block per row: the row's absolute maximum, then the scaled
and rounded values), with the same arithmetic as :func:`int4tensor.quant_primitives.quantize_fp8_rows`,
bit for bit:

    x_scale[m] = max(max_k |x[m, k]|, 1e-12) * fp32(1/448)  (fp32)
    xq[m, k]   = e4m3(clamp(x[m, k] / x_scale[m], -448, 448)) (round to nearest even)

It writes either ``(xq, x_scale)`` for the fp8 kernels, or the activations rounded through fp8
and back, ``bf16(float(xq) * x_scale)``, for bf16 kernels that should see the same activations.
"""

from __future__ import annotations

import functools

import torch

from int4tensor.kernels import nvrtc

_SOURCE = r"""
%(bf16_helpers)s
#define ROUNDED %(rounded)d
#define HELD 4

// two floats -> two e4m3 bytes (lo in the low byte), round to nearest even, saturating
__device__ __forceinline__ unsigned short f32x2_to_e4m3x2(float lo, float hi) {
  unsigned short r;
  asm("cvt.rn.satfinite.e4m3x2.f32 %%0, %%1, %%2;" : "=h"(r) : "f"(hi), "f"(lo));
  return r;
}
__device__ __forceinline__ float2 e4m3x2_to_f32x2(unsigned short v) {
  unsigned h2;
  asm("cvt.rn.f16x2.e4m3x2 %%0, %%1;" : "=r"(h2) : "h"(v));
  float lo, hi;
  asm("cvt.f32.f16 %%0, %%1;" : "=f"(lo) : "h"((unsigned short)(h2 & 0xffffu)));
  asm("cvt.f32.f16 %%0, %%1;" : "=f"(hi) : "h"((unsigned short)(h2 >> 16)));
  return make_float2(lo, hi);
}

// torch's clamp keeps NaN (fminf / fmaxf alone would drop it)
__device__ __forceinline__ float clamp448(float v) {
  return v != v ? v : fminf(fmaxf(v, -448.f), 448.f);
}

extern "C" __global__ void %(name)s(const uint4* __restrict__ x, void* __restrict__ out,
                                    float* __restrict__ x_scale, int K, int ldx, int ldo) {
  __shared__ float warp_max[32];
  const int m = blockIdx.x, vecs = K >> 3;  // 8 bf16 per uint4
  const uint4* row = x + (size_t)m * (ldx >> 3);
  // the first HELD vectors of each thread stay in registers for the second pass (all of the
  // row when K <= 8 * HELD * blockDim): one read of x, and loads in flight together
  uint4 held[HELD];
#pragma unroll
  for (int j = 0; j < HELD; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    held[j] = i < vecs ? __ldg(row + i) : make_uint4(0, 0, 0, 0);
  }
  float amax = 0.f;
  unsigned nan_seen = 0;  // fmaxf drops NaN, torch's amax keeps it: track it on the bits
  auto absmax = [&](const uint4& v) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      amax = fmaxf(amax, fmaxf(fabsf(bf16_lo(w[j])), fabsf(bf16_hi(w[j]))));
      nan_seen |= ((w[j] & 0x7fffu) > 0x7f80u) | (((w[j] >> 16) & 0x7fffu) > 0x7f80u);
    }
  };
#pragma unroll
  for (int j = 0; j < HELD; ++j) absmax(held[j]);
  for (int i = threadIdx.x + HELD * blockDim.x; i < vecs; i += blockDim.x) absmax(__ldg(row + i));
  for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x >> 5] = amax;
  const int any_nan = __syncthreads_or(nan_seen);  // also the barrier for warp_max
  amax = 0.f;
  for (int i = 0; i < (blockDim.x >> 5); ++i) amax = fmaxf(amax, warp_max[i]);
  const float scale = any_nan ? __int_as_float(0x7fc00000) : fmaxf(amax, 1e-12f) * (1.0f / 448.0f);
  if (!ROUNDED && threadIdx.x == 0) x_scale[m] = scale;

  auto emit = [&](const uint4& v, int i) {
    const unsigned w[4] = {v.x, v.y, v.z, v.w};
    unsigned short q[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      q[j] = f32x2_to_e4m3x2(clamp448(bf16_lo(w[j]) / scale), clamp448(bf16_hi(w[j]) / scale));
    }
    if (ROUNDED) {
      unsigned r[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const float2 f = e4m3x2_to_f32x2(q[j]);
        r[j] = (unsigned)f_to_bf16(f.x * scale) | ((unsigned)f_to_bf16(f.y * scale) << 16);
      }
      reinterpret_cast<uint4*>(out)[(size_t)m * (ldo >> 3) + i] = make_uint4(r[0], r[1], r[2], r[3]);
    } else {
      reinterpret_cast<uint2*>(out)[(size_t)m * (ldo >> 3) + i] =
          make_uint2(q[0] | ((unsigned)q[1] << 16), q[2] | ((unsigned)q[3] << 16));
    }
  };
#pragma unroll
  for (int j = 0; j < HELD; ++j) {
    const int i = threadIdx.x + j * blockDim.x;
    if (i < vecs) emit(held[j], i);
  }
  for (int i = threadIdx.x + HELD * blockDim.x; i < vecs; i += blockDim.x) emit(__ldg(row + i), i);
}
"""


def can_run(x2d: torch.Tensor) -> bool:
    """The kernel's contract: CUDA bf16 ``[M, K]``, K % 8 == 0, rows 16-byte aligned, unit
    stride along K, on an sm89+ GPU (the e4m3 conversion instructions) where it compiles."""
    return (
        x2d.is_cuda
        and x2d.dtype == torch.bfloat16
        and x2d.ndim == 2
        and x2d.shape[0] > 0
        and x2d.shape[1] % 8 == 0
        and x2d.stride(-1) == 1
        and x2d.stride(0) % 8 == 0
        and x2d.storage_offset() % 8 == 0
        and nvrtc.is_available()
        and nvrtc.device_capability(x2d.device) >= (8, 9)
        and nvrtc.compiles(*_KERNELS[False], nvrtc.device_capability(x2d.device))
    )


#: (source, name) of the two variants, built once (a cached compile check hashes the source)
_KERNELS = {rounded: (_SOURCE % dict(bf16_helpers=nvrtc.BF16_HELPERS, rounded=int(rounded),
                                     name=name), name)
            for rounded, name in ((False, "fp8_quantize_rows"), (True, "fp8_round_rows"))}


def _launcher(x2d: torch.Tensor, rounded: bool) -> nvrtc.Launcher:
    """The launch for bf16 ``x2d [M, K]`` (output rows contiguous)."""
    return _planned(tuple(x2d.shape), x2d.stride(0), x2d.device.index, rounded)


@functools.lru_cache(maxsize=1024)
def _planned(shape: tuple, row_stride: int, device_index: int, rounded: bool) -> nvrtc.Launcher:
    kernel = nvrtc.compile_kernel(*_KERNELS[rounded], torch.cuda.get_device_capability(device_index))
    m, k = shape
    # few rows: enough threads per row to hold it in registers (4 vectors of 8 each)
    threads = 1024 if m <= 128 else 256
    threads = min(threads, max(32, -(-(k // 32) // 32) * 32))
    return nvrtc.Launcher(kernel, (m, 1, 1), (threads, 1, 1), 0, 3, (k, row_stride, k),
                          device_index)


def _launch(x2d: torch.Tensor, out: torch.Tensor, x_scale: torch.Tensor, rounded: bool) -> None:
    _planned(tuple(x2d.shape), x2d.stride(0), x2d.device.index, rounded)(x2d, out, x_scale)


def bind_round(x2d: torch.Tensor):
    """``f(x) -> round_fp8_rows(x)`` for contiguous activations of ``x2d``'s shape and
    device, the launch planned once."""
    launch = _launcher(x2d, True).launch
    allocate = nvrtc.empty_allocator(tuple(x2d.shape), torch.bfloat16, x2d.device)
    no_scales = torch.empty(0, dtype=torch.float32, device=x2d.device)
    no_scales_ptr = no_scales.data_ptr()

    def round_rows(x: torch.Tensor, _keep=no_scales) -> torch.Tensor:
        """``x``: contiguous, ``x2d``'s rows in any shape (read through its pointer)."""
        out = allocate()
        launch(x.data_ptr(), out.data_ptr(), no_scales_ptr)
        return out
    return round_rows


def quantize_fp8_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``x [M, K]`` -> ``(xq float8_e4m3fn [M, K], x_scale fp32 [M])``, see the module."""
    out = torch.empty(x2d.shape, dtype=torch.float8_e4m3fn, device=x2d.device)
    x_scale = torch.empty(x2d.shape[0], dtype=torch.float32, device=x2d.device)
    _launch(x2d, out, x_scale, rounded=False)
    return out, x_scale


def round_fp8_rows(x2d: torch.Tensor) -> torch.Tensor:
    """bf16 ``x [M, K]`` -> bf16 ``[M, K]``, each row rounded through its fp8 quantization."""
    out = torch.empty_like(x2d, memory_format=torch.contiguous_format)
    _launch(x2d, out, out.new_empty(0, dtype=torch.float32), rounded=True)
    return out
