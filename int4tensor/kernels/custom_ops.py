"""Our own kernels as ``torch.library`` custom ops, so compiled graphs and CUDA graphs keep them
as single opaque calls. Registering imports nothing heavy: triton is imported on first use."""

from __future__ import annotations

import torch


@torch.library.custom_op("int4tensor::int4_matmul_triton", mutates_args=())
def int4_matmul_triton(
    x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` on CUDA through the Triton kernel (see triton_int4.py)."""
    from int4tensor.kernels import triton_int4

    return triton_int4.int4_matmul(x, qdata, scale, zero_point, group_size)


@int4_matmul_triton.register_fake
def _(x, qdata, scale, zero_point, group_size):
    return x.new_empty(x.shape[0], qdata.shape[0])
