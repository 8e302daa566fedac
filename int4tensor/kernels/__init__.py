"""Kernel dispatch: the one place that decides which backend computes an int4 op.

Backends live one per module (:mod:`.reference`, :mod:`.fbgemm`) and take the tensor
subclass's fields; the tensor classes call only the functions here, so a backend can be
added or swapped without touching them. Inputs are validated by the caller (the op
implementation) before they get here.
"""

from __future__ import annotations

import torch

from int4tensor.kernels import fbgemm, reference

__all__ = ["int4_bmm", "int4_linear", "linear_backend"]


def linear_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`int4_linear` uses for these arguments."""
    if fbgemm.can_run_linear(x, weight):
        return "fbgemm"
    return "reference"


def int4_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [*, K] @ W.T + bias -> [*, N]`` for an ``Int4Tensor`` ``W [N, K]``.

    Backends see the int4 part only: an ``act_pre_scale`` is applied to ``x`` here, once.
    """
    if weight.act_pre_scale is not None:
        x = x * weight.act_pre_scale.to(x.dtype)
    if linear_backend(x, weight) == "fbgemm":
        return fbgemm.linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def int4_bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]`` for a stored (not transposed) ``W [B, N, K]``."""
    if weight.act_pre_scale is not None:
        x = x * weight.act_pre_scale.to(x.dtype).unsqueeze(-2)
    return reference.bmm(x, weight)
