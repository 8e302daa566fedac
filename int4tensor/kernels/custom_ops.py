"""Kernels as ``torch.library`` custom ops, so compiled graphs and CUDA graphs keep them as
single opaque calls, with a fake (shape) implementation and an autograd formula for the
activation (the int4 weight is frozen). Registering imports nothing heavy: triton and fbgemm
are imported on first use."""

from __future__ import annotations

import torch

from int4tensor.quant_primitives import dequantize_int4


@torch.library.custom_op("int4tensor::int4_matmul_triton", mutates_args=())
def int4_matmul_triton(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` through our Triton kernels (see triton_int4.py)."""
    from int4tensor.kernels import triton_int4

    return triton_int4.int4_matmul(x, qdata, scale, zero_point, group_size)


@torch.library.custom_op("int4tensor::int4_matmul_fbgemm", mutates_args=())
def int4_matmul_fbgemm(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` through fbgemm's ``bf16i4bf16_rowwise``."""
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401

    return torch.ops.fbgemm.bf16i4bf16_rowwise(x, qdata, scale, zero_point)


def _fake(x, qdata, scale, zero_point, group_size):
    return x.new_empty(x.shape[0], qdata.shape[0])


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


for _op in (int4_matmul_triton, int4_matmul_fbgemm):
    _op.register_fake(_fake)
    _op.register_autograd(_backward, setup_context=_setup_context)
