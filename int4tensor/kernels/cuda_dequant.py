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

// One block per row (n of batch b), its threads striding over the row's packed words: 8
// weights per word, element 2i in the low nibble of byte i. No divisions.
extern "C" __global__ void int4_dequant_bf16(
    const unsigned* __restrict__ q, const bf16_t* __restrict__ scale,
    const bf16_t* __restrict__ zero, uint4* __restrict__ out, int N, int K, int lds,
    int batch_stride, int group_shift) {
  const int row = blockIdx.x, per_row = K >> 3;
  const int b = row / N, n = row - b * N;
  const unsigned* qr = q + (size_t)row * per_row;
  uint4* o = out + (size_t)row * per_row;
  const bf16_t* sr = scale + (size_t)b * batch_stride + n;
  const bf16_t* zr = zero + (size_t)b * batch_stride + n;
  for (int i = threadIdx.x; i < per_row; i += blockDim.x) {
    const size_t at = (size_t)((i << 3) >> group_shift) * lds;
    const float s = bf16_to_f(sr[at]), z = bf16_to_f(zr[at]);
    const unsigned w = qr[i];
    unsigned r[4];
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      const int lo = (int)((w >> (8 * j)) & 15u), hi = (int)((w >> (8 * j + 4)) & 15u);
      const float a = __fadd_rn(__fmul_rn((float)(lo - ((lo & 8) << 1)), s), z);
      const float c = __fadd_rn(__fmul_rn((float)(hi - ((hi & 8) << 1)), s), z);
      r[j] = (unsigned)f_to_bf16(a) | ((unsigned)f_to_bf16(c) << 16);
    }
    o[i] = make_uint4(r[0], r[1], r[2], r[3]);
  }
}
"""

_KERNEL = _SOURCE % dict(bf16_helpers=nvrtc.BF16_HELPERS)


def operands_fit(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                 dtype: torch.dtype) -> bool:
    """The kernel's operand contract, the device not checked: bf16 out and bf16 scales,
    contiguous 4-byte-aligned ``qdata [N, K/2]`` or ``[B, N, K/2]`` with K % 8 == 0, scales
    ``[(B,) K/G, N]`` with unit stride along N and the same strides for the zero points."""
    return (
        qdata.ndim in (2, 3)
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
    )


def can_run(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
            dtype: torch.dtype) -> bool:
    """:func:`operands_fit` on CUDA, where the kernel compiles."""
    return (
        qdata.is_cuda
        and operands_fit(qdata, scale, zero_point, dtype)
        and nvrtc.is_available()
        and nvrtc.compiles(_KERNEL, "int4_dequant_bf16", nvrtc.device_capability(qdata.device))
    )


def dequantize_int4(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    group_size: int) -> torch.Tensor:
    """``q * scale + zero_point`` -> bf16 ``[(B,) N, K]``; shapes as in :func:`can_run`,
    G a power of two."""
    *lead, n, half_k = qdata.shape
    k = 2 * half_k
    out = torch.empty(*lead, n, k, dtype=torch.bfloat16, device=qdata.device)
    kernel = nvrtc.compile_kernel(_KERNEL, "int4_dequant_bf16", nvrtc.device_capability(qdata.device))
    rows = qdata.numel() // half_k
    threads = min(256, max(32, -(-(k // 8) // 32) * 32))
    nvrtc.launch(kernel, (rows, 1, 1), (threads, 1, 1),
                 [qdata, scale, zero_point, out, n, k, scale.stride(-2),
                  scale.stride(0) if scale.ndim == 3 else 0, group_size.bit_length() - 1])
    return out
