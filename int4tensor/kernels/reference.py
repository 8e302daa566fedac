"""Reference backend: dequantize, then the dense op in the activation's dtype.

Runs on every device and dtype (CPU, CUDA without fbgemm, fp32/fp16/bf16), and is what
every fast path is tested against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, q * scale + zero_point, bias)`` in ``x.dtype``; ``x [*, K]`` -> ``[*, N]``."""
    return F.linear(x, weight.dequantize_stored(x.dtype), bias)


def bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T`` per batch for a stored ``W [B, N, K]`` -> ``[B, M, N]``."""
    return torch.bmm(x, weight.dequantize_stored(x.dtype).transpose(-1, -2))
