"""Int4 -> bf16 dequantization of the plain layout in one CUDA kernel.

As torch ops (unpack, cast, multiply, add, cast) dequantizing a weight makes several passes
over it; this kernel reads the packed bytes once and writes the bf16 weight once. It computes
``w = q * scale + zero_point`` in fp32 with two separate roundings, as the torch ops do, so it
is bit for bit :func:`int4tensor.quant_primitives.dequantize_int4`. Large-M linears use it:
a temporary bf16 weight and cuBLAS beat the int4 GEMMs there (see kernels/__init__.py).
"""

from __future__ import annotations

import torch

from int4tensor.kernels import nvrtc

_SOURCE = r"""
%(bf16_helpers)s

// One thread per packed word: 8 weights of one row (element 2i in the low nibble of byte i).
extern "C" __global__ void int4_dequant_bf16(
    const unsigned* __restrict__ q, const bf16_t* __restrict__ scale,
    const bf16_t* __restrict__ zero, uint4* __restrict__ out, int words, int N, int K,
    int lds, int batch_stride, int group_shift) {
  const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= words) return;
  const int per_row = K >> 3;
  const long long row = i / per_row;
  const int k0 = (int)(i - row * per_row) << 3;
  const long long b = row / N, n = row - b * N;
  const long long at = b * (long long)batch_stride + (long long)(k0 >> group_shift) * lds + n;
  const float s = bf16_to_f(scale[at]), z = bf16_to_f(zero[at]);
  const unsigned w = q[i];
  unsigned r[4];
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int lo = (int)((w >> (8 * j)) & 15u), hi = (int)((w >> (8 * j + 4)) & 15u);
    const float a = __fadd_rn(__fmul_rn((float)(lo - ((lo & 8) << 1)), s), z);
    const float c = __fadd_rn(__fmul_rn((float)(hi - ((hi & 8) << 1)), s), z);
    r[j] = (unsigned)f_to_bf16(a) | ((unsigned)f_to_bf16(c) << 16);
  }
  out[i] = make_uint4(r[0], r[1], r[2], r[3]);
}
"""


def can_run(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
            dtype: torch.dtype) -> bool:
    """The kernel's contract: CUDA, bf16 out and bf16 scales, contiguous 4-byte-aligned
    ``qdata [..., N, K/2]`` with K % 8 == 0, scales ``[..., K/G, N]`` with unit stride along N
    and the same strides for the zero points."""
    return (
        qdata.is_cuda
        and dtype == torch.bfloat16
        and qdata.numel() > 0
        and qdata.is_contiguous()
        and qdata.storage_offset() % 4 == 0
        and qdata.shape[-1] % 4 == 0
        and scale.dtype == torch.bfloat16
        and zero_point.dtype == torch.bfloat16
        and scale.stride(-1) == 1
        and scale.stride() == zero_point.stride()
        and qdata.numel() // 4 < 2**31 and scale.numel() < 2**31  # int kernel arguments
        and nvrtc.is_available()
    )


def dequantize_int4(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """``q * scale + zero_point`` -> bf16 ``[..., N, K]``; shapes as in :func:`can_run`,
    G a power of two."""
    *lead, n, half_k = qdata.shape
    k = 2 * half_k
    out = torch.empty(*lead, n, k, dtype=torch.bfloat16, device=qdata.device)
    source = _SOURCE % dict(bf16_helpers=nvrtc.BF16_HELPERS)
    kernel = nvrtc.compile_kernel(source, "int4_dequant_bf16", nvrtc.device_capability(qdata.device))
    words = qdata.numel() // 4
    batch_stride = scale.stride(-3) if scale.ndim >= 3 else 0
    if scale.ndim > 3:  # flatten leading dims; the strides must nest
        scale, zero_point = scale.reshape(-1, *scale.shape[-2:]), zero_point.reshape(-1, *scale.shape[-2:])
        batch_stride = scale.stride(0)
    kernel(grid=(-(-words // 256), 1, 1), block=(256, 1, 1),
           args=[qdata, scale, zero_point, out, words, n, k, scale.stride(-2), batch_stride,
                 group_size.bit_length() - 1])
    return out
