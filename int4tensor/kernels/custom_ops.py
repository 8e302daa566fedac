"""Kernels as ``torch.library`` custom ops, so compiled graphs and CUDA graphs keep them as
single opaque calls, with a fake (shape) implementation and an autograd formula for the
activation (the int4 weight is frozen). Registering imports nothing heavy: triton and fbgemm
are imported on first use."""

from __future__ import annotations

import torch

from int4tensor.kernels import (  # import only torch; compile on first call
    cuda_dequant, cuda_fp8_rows, cuda_gemm, cuda_gemv)
from int4tensor.quant_primitives import dequantize_int4


@torch.library.custom_op("int4tensor::int4_matmul_triton", mutates_args=())
def int4_matmul_triton(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` through our Triton kernels (see triton_int4.py)."""
    from int4tensor.kernels import triton_int4

    return triton_int4.int4_matmul(x, qdata, scale, zero_point, group_size)


@torch.library.custom_op("int4tensor::int4_gemv_cuda", mutates_args=())
def int4_gemv_cuda(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [M <= 16, K] @ W.T -> [M, N]`` through our tensor-core GEMV (see cuda_gemv.py); 3D
    weights: ``x [B, M, K] @ W[b].T -> [B, M, N]``."""
    return cuda_gemv.int4_gemv(x, qdata, scale, zero_point, group_size)


@torch.library.custom_op("int4tensor::int4_gemv_cuda_preshuffled", mutates_args=())
def int4_gemv_cuda_preshuffled(
    x: torch.Tensor, qdata: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [M <= 16, K] @ W.T -> [M, Np]`` (or ``[B, M, K] -> [B, M, Np]``) for a bf16
    ``Int4PreshuffledTensor``'s fields through the same GEMV, reading fbgemm's preshuffled
    layout."""
    return cuda_gemv.int4_gemv(x, qdata, group_scale, group_zero, group_size, shuffled=True)


@torch.library.custom_op("int4tensor::int4_gemm_cuda", mutates_args=())
def int4_gemm_cuda(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [17 <= M <= 32, K] @ W.T -> [M, N]`` for a plain ``Int4Tensor``'s fields through our
    tensor-core GEMM (see cuda_gemm.py); 3D weights: ``x [B, M, K] @ W[b].T -> [B, M, N]``."""
    return cuda_gemm.int4_gemm(x, qdata, scale, zero_point, group_size, shuffled=False)


@torch.library.custom_op("int4tensor::int4_gemm_cuda_preshuffled", mutates_args=())
def int4_gemm_cuda_preshuffled(
    x: torch.Tensor, qdata: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [17 <= M <= 32, K] @ W.T -> [M, Np]`` (or ``[B, M, K] -> [B, M, Np]``) for a bf16
    ``Int4PreshuffledTensor``'s fields through our tensor-core GEMM (see cuda_gemm.py)."""
    return cuda_gemm.int4_gemm(x, qdata, group_scale, group_zero, group_size)


@torch.library.custom_op("int4tensor::dequantize_int4_cuda", mutates_args=())
def dequantize_int4_cuda(
    qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, group_size: int
) -> torch.Tensor:
    """int8 ``qdata [..., N, K/2]`` -> bf16 ``[..., N, K]`` in one CUDA kernel."""
    return cuda_dequant.dequantize_int4(qdata, scale, zero_point, group_size)


@dequantize_int4_cuda.register_fake
def _(qdata, scale, zero_point, group_size):
    return qdata.new_empty(*qdata.shape[:-1], 2 * qdata.shape[-1], dtype=torch.bfloat16)


@torch.library.custom_op("int4tensor::fp8_quantize_rows", mutates_args=())
def fp8_quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 ``x [M, K]`` -> ``(xq e4m3 [M, K], x_scale fp32 [M])`` in one CUDA kernel."""
    return cuda_fp8_rows.quantize_fp8_rows(x)


@fp8_quantize_rows.register_fake
def _(x):
    return (torch.empty_like(x, dtype=torch.float8_e4m3fn),
            x.new_empty(x.shape[0], dtype=torch.float32))


@torch.library.custom_op("int4tensor::fp8_round_rows", mutates_args=())
def fp8_round_rows(x: torch.Tensor) -> torch.Tensor:
    """bf16 ``x [M, K]`` rounded per row through fp8 and back, in one CUDA kernel."""
    return cuda_fp8_rows.round_fp8_rows(x)


@fp8_round_rows.register_fake
def _(x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("int4tensor::int4_matmul_fbgemm", mutates_args=())
def int4_matmul_fbgemm(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` through fbgemm's ``bf16i4bf16_rowwise``."""
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401

    return torch.ops.fbgemm.bf16i4bf16_rowwise(x, qdata, scale, zero_point)


# fbgemm 1.6.0 declares its ops' fake implementations in a module it does not ship
# (fbgemm_gpu.experimental.gen_ai.quantize_ops), so torch.compile cannot trace them; these
# wrappers give the preshuffled kernels fake implementations of ours.


@torch.library.custom_op("int4tensor::fbgemm_bf16i4_shuffled", mutates_args=())
def fbgemm_bf16i4_shuffled(
    x: torch.Tensor, qdata: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, Np]`` (fbgemm ``bf16i4bf16_shuffled``)."""
    return torch.ops.fbgemm.bf16i4bf16_shuffled(x, qdata, group_scale, group_zero)


@fbgemm_bf16i4_shuffled.register_fake
def _(x, qdata, group_scale, group_zero):
    return x.new_empty(x.shape[0], qdata.shape[0])


@torch.library.custom_op("int4tensor::fbgemm_bf16i4_shuffled_batched", mutates_args=())
def fbgemm_bf16i4_shuffled_batched(
    x: torch.Tensor, qdata: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor
) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, Np]``; scales flattened to ``[B*K/G, Np]``."""
    return torch.ops.fbgemm.bf16i4bf16_shuffled_batched(x, qdata, group_scale, group_zero)


@fbgemm_bf16i4_shuffled_batched.register_fake
def _(x, qdata, group_scale, group_zero):
    return x.new_empty(x.shape[0], x.shape[1], qdata.shape[-2])


@torch.library.custom_op("int4tensor::fbgemm_bf16i4_rowwise_batched", mutates_args=())
def fbgemm_bf16i4_rowwise_batched(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor
) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]``; scales flattened to ``[B*K/G, N]``."""
    return torch.ops.fbgemm.bf16i4bf16_rowwise_batched(x, qdata, scale, zero_point)


@fbgemm_bf16i4_rowwise_batched.register_fake
def _(x, qdata, scale, zero_point):
    return x.new_empty(x.shape[0], x.shape[1], qdata.shape[-2])


@torch.library.custom_op("int4tensor::fbgemm_f8i4_rowwise", mutates_args=())
def fbgemm_f8i4_rowwise(
    xq: torch.Tensor, qdata: torch.Tensor, x_scale: torch.Tensor, scale: torch.Tensor,
    zero_point: torch.Tensor,
) -> torch.Tensor:
    """fp8 ``xq [M, K]`` @ plain int4 ``W.T`` -> bf16 ``[M, N]`` (fbgemm ``f8i4bf16_rowwise``:
    scale/zero ``[K/G, N]`` as Int4Tensor stores them; measured on an H200)."""
    return torch.ops.fbgemm.f8i4bf16_rowwise(xq, qdata, x_scale, scale, zero_point)


@fbgemm_f8i4_rowwise.register_fake
def _(xq, qdata, x_scale, scale, zero_point):
    return xq.new_empty(xq.shape[0], qdata.shape[0], dtype=torch.bfloat16)


@torch.library.custom_op("int4tensor::fbgemm_f8i4_shuffled", mutates_args=())
def fbgemm_f8i4_shuffled(
    xq: torch.Tensor, qdata: torch.Tensor, x_scale: torch.Tensor, row_scale: torch.Tensor,
    group_scale: torch.Tensor,
) -> torch.Tensor:
    """fp8 ``xq [M, K]`` @ int4 ``W.T`` -> bf16 ``[M, Np]`` (fbgemm ``f8i4bf16_shuffled``)."""
    return torch.ops.fbgemm.f8i4bf16_shuffled(xq, qdata, x_scale, row_scale, group_scale)


@fbgemm_f8i4_shuffled.register_fake
def _(xq, qdata, x_scale, row_scale, group_scale):
    return xq.new_empty(xq.shape[0], qdata.shape[0], dtype=torch.bfloat16)


@torch.library.custom_op("int4tensor::fbgemm_f8i4_shuffled_batched", mutates_args=())
def fbgemm_f8i4_shuffled_batched(
    xq: torch.Tensor, qdata: torch.Tensor, x_scale: torch.Tensor, row_scale: torch.Tensor,
    group_scale: torch.Tensor,
) -> torch.Tensor:
    """fp8 ``xq [B, M, K]`` @ int4 ``W[b].T`` -> bf16 ``[B, M, Np]`` through fbgemm's
    ``f8i4bf16_shuffled_grouped`` with B groups of M rows (``x_scale [B, M]``; its
    ``M_sizes`` must be int32, measured on an H200: bit-identical to one
    ``f8i4bf16_shuffled`` per batch)."""
    b, m, k = xq.shape
    m_sizes = torch.full((b,), m, dtype=torch.int32, device=xq.device)
    out = torch.ops.fbgemm.f8i4bf16_shuffled_grouped(
        xq.reshape(b * m, k), qdata, x_scale.reshape(b * m), row_scale, group_scale, m_sizes)
    return out.view(b, m, qdata.shape[-2])


@fbgemm_f8i4_shuffled_batched.register_fake
def _(xq, qdata, x_scale, row_scale, group_scale):
    return xq.new_empty(xq.shape[0], xq.shape[1], qdata.shape[-2], dtype=torch.bfloat16)


@torch.library.custom_op("int4tensor::int4_grouped_gemv_cuda", mutates_args=())
def int4_grouped_gemv_cuda(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    offs: torch.Tensor, group_size: int,
) -> torch.Tensor:
    """``x [T, K]`` sorted by expert, ``offs [E]`` int32 cumulative rows: ``out[t] = x[t] @
    W[e].T -> [T, N]`` for a plain ``[E, N, K]`` weight's fields (see
    cuda_gemv.int4_grouped_gemv)."""
    return cuda_gemv.int4_grouped_gemv(x, qdata, scale, zero_point, offs, group_size)


def _grouped_fake(x, qdata, scale, zero_point, offs, group_size):  # x [T, K], W [E, N, K]
    return x.new_empty(x.shape[0], qdata.shape[-2])


def _grouped_setup_context(ctx, inputs, output):
    x, qdata, scale, zero_point, offs, group_size = inputs
    ctx.save_for_backward(qdata, scale, zero_point, offs)
    ctx.group_size = group_size
    ctx.x_dtype = x.dtype


def _grouped_backward(ctx, grad_out):
    # d(x[t] @ W[e].T)/dx[t] = grad_out[t] @ W[e]: the same grouping over W [E, N, K]
    qdata, scale, zero_point, offs = ctx.saved_tensors
    weight = dequantize_int4(qdata, scale, zero_point, ctx.group_size, ctx.x_dtype)
    grad_x = torch.ops.aten._grouped_mm.default(grad_out.contiguous(), weight, offs)
    return grad_x, None, None, None, None, None


int4_grouped_gemv_cuda.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)


@torch.library.custom_op("int4tensor::int4_grouped_mm_triton", mutates_args=())
def int4_grouped_mm_triton(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    offs: torch.Tensor, group_size: int,
) -> torch.Tensor:
    """:func:`int4_grouped_gemv_cuda` through our Triton tensor-core kernel, for many rows per
    expert (see triton_int4.int4_grouped_matmul)."""
    from int4tensor.kernels import triton_int4

    return triton_int4.int4_grouped_matmul(x, qdata, scale, zero_point, offs, group_size)


int4_grouped_mm_triton.register_autograd(_grouped_backward, setup_context=_grouped_setup_context)


@torch.library.custom_op("int4tensor::int4_grouped_gemv_triton", mutates_args=())
def int4_grouped_gemv_triton(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    offs: torch.Tensor, group_size: int,
) -> torch.Tensor:
    """:func:`int4_grouped_gemv_cuda` through our Triton CUDA-core GEMV, one row at a time, for
    decode with group sizes the CUDA GEMV does not take (see triton_int4.int4_grouped_gemv)."""
    from int4tensor.kernels import triton_int4

    return triton_int4.int4_grouped_gemv(x, qdata, scale, zero_point, offs, group_size)


int4_grouped_gemv_triton.register_autograd(_grouped_backward,
                                           setup_context=_grouped_setup_context)


@torch.library.custom_op("int4tensor::int4_grouped_gemv_cuda_preshuffled", mutates_args=())
def int4_grouped_gemv_cuda_preshuffled(
    x: torch.Tensor, qdata: torch.Tensor, group_scale: torch.Tensor, group_zero: torch.Tensor,
    offs: torch.Tensor, group_size: int,
) -> torch.Tensor:
    """:func:`int4_grouped_gemv_cuda` for a bf16 ``Int4PreshuffledTensor`` stack's fields
    (``[E, Np, K/2]``, output ``[T, Np]``), like fbgemm's shuffled ops without autograd."""
    return cuda_gemv.int4_grouped_gemv(x, qdata, group_scale, group_zero, offs, group_size,
                                       shuffled=True)




def _fake(x, qdata, scale, zero_point, group_size):  # x [M, K] or [B, M, K]
    return x.new_empty(*x.shape[:-1], qdata.shape[-2])


def _setup_context(ctx, inputs, output):
    x, qdata, scale, zero_point, group_size = inputs
    ctx.save_for_backward(qdata, scale, zero_point)
    ctx.group_size = group_size
    ctx.x_dtype = x.dtype


def _backward(ctx, grad_out):
    # d(x @ W.T)/dx = grad_out @ W; the int4 weight and its parameters get no gradient.
    qdata, scale, zero_point = ctx.saved_tensors
    weight = dequantize_int4(qdata, scale, zero_point, ctx.group_size, ctx.x_dtype)
    return grad_out @ weight, None, None, None, None


for _op in (int4_matmul_triton, int4_gemv_cuda, int4_gemm_cuda, int4_matmul_fbgemm):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)
for _op in (int4_gemv_cuda_preshuffled, int4_gemm_cuda_preshuffled):
    _op.register_fake(_fake)  # like fbgemm's shuffled ops: no autograd
for _op in (int4_grouped_gemv_cuda, int4_grouped_mm_triton, int4_grouped_gemv_triton,
            int4_grouped_gemv_cuda_preshuffled):
    _op.register_fake(_grouped_fake)
