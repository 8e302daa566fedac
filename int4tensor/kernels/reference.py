"""Reference backend: dequantize, then the dense op in the activation's dtype.

Runs on every device and dtype (CPU, CUDA without fbgemm, fp32/fp16/bf16), and is what
every fast path is tested against. Like every backend it reads the weight's fields
(``qdata``, ``scale``, ``zero_point``, ``block_size``) and calls no tensor method.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from int4tensor import quant_primitives
from int4tensor.kernels import cuda_dequant, custom_ops


def dequantize_int4(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale + zero_point`` in ``dtype``, ``[..., N, K]``: one CUDA kernel where it can
    run (bf16), torch ops elsewhere (the same bits; see
    :func:`int4tensor.quant_primitives.dequantize_int4`)."""
    if cuda_dequant.can_run(qdata, scale, zero_point, dtype):
        return custom_ops.dequantize_int4_cuda(qdata, scale, zero_point, group_size)
    return quant_primitives.dequantize_int4(qdata, scale, zero_point, group_size, dtype)


def _stored_weight(weight, dtype: torch.dtype) -> torch.Tensor:
    """The stored ``[..., N, K]`` weight ``q * scale + zero_point`` (never transposed)."""
    return dequantize_int4(weight.qdata, weight.scale, weight.zero_point,
                           weight.block_size[-1], dtype)


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, q * scale + zero_point, bias)`` in ``x.dtype``; ``x [*, K]`` -> ``[*, N]``."""
    return F.linear(x, _stored_weight(weight, x.dtype), bias)


def bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T`` per batch for a stored ``W [B, N, K]`` -> ``[B, M, N]``."""
    return torch.bmm(x, _stored_weight(weight, x.dtype).transpose(-1, -2))
