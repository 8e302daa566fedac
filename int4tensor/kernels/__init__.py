"""Kernel dispatch: the one place that decides which backend computes an int4 op.

Backends live one per module (:mod:`.reference`, :mod:`.fbgemm`, :mod:`.cuda_gemv`,
:mod:`.triton_int4`) and take the tensor
subclass's fields; the tensor classes call only the functions here, so a backend can be
added or swapped without touching them. Inputs are validated by the caller (the op
implementation) before they get here.
"""

from __future__ import annotations

import torch

from int4tensor.kernels import cuda_gemv, custom_ops, fbgemm, reference

#: Dispatch by the number of activation rows M (from benchmarks/bench_linear.py and
#: scripts/probe_cuda_gemv.py on an H200): up to CUDA_GEMV_MAX_M rows run our tensor-core
#: GEMV (G = 128/256; faster than fbgemm and Triton there on every shape measured); where it
#: cannot run, M = 1 runs our Triton GEMV. Larger M runs fbgemm's CUTLASS GEMM on Hopper, or
#: our Triton tensor-core kernel up to TRITON_MAX_M where fbgemm cannot run (other GPUs,
#: G = 32); beyond that the reference path.
CUDA_GEMV_MAX_M = 8
TRITON_ALWAYS_MAX_M = 1
TRITON_MAX_M = 16

__all__ = ["bmm_backend", "int4_bmm", "int4_linear", "linear_backend"]


def _triton_can_run(x: torch.Tensor, weight) -> bool:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and weight.ndim == 2
        and 0 < rows <= TRITON_MAX_M
        and weight.scale.dtype == torch.bfloat16
        and weight.zero_point.dtype == torch.bfloat16
        and weight.qdata.is_contiguous()
        and weight.scale.is_contiguous()
        and weight.zero_point.is_contiguous()
        and torch.cuda.get_device_capability(x.device) >= (8, 0)
    )


def _cuda_gemv_can_run(x: torch.Tensor, weight) -> bool:
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    return (
        0 < rows <= CUDA_GEMV_MAX_M
        and weight.ndim == 2
        and x.is_cuda
        and x.stride(-1) == 1
        and cuda_gemv.is_available()
        and cuda_gemv.can_run(x.reshape(-1, x.shape[-1]), weight.qdata, weight.scale,
                              weight.zero_point, weight.group_size)
        and torch.cuda.get_device_capability(x.device) >= (8, 0)  # mma.m16n8k16 bf16
        and cuda_gemv.can_compile(x.device.index if x.device.index is not None
                                  else torch.cuda.current_device())
    )


def linear_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`int4_linear` uses for these arguments: ``"cuda"``,
    ``"triton"``, ``"fbgemm"`` or ``"reference"`` (see CUDA_GEMV_MAX_M)."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if _cuda_gemv_can_run(x, weight):
        return "cuda"
    if rows <= TRITON_ALWAYS_MAX_M and _triton_can_run(x, weight):
        return "triton"
    if fbgemm.can_run_linear(x, weight):
        return "fbgemm"
    if _triton_can_run(x, weight):
        return "triton"
    return "reference"


def int4_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [*, K] @ W.T + bias -> [*, N]`` for an ``Int4Tensor`` ``W [N, K]``.

    Backends see the int4 part only: an ``act_pre_scale`` is applied to ``x`` here, once.
    """
    if weight.act_pre_scale is not None:
        x = x * weight.act_pre_scale.to(x.dtype)
    if weight.activation_dtype == "fp8":
        return _fp8_linear(x, weight, bias)
    backend = linear_backend(x, weight)
    if backend in ("cuda", "triton"):
        op = custom_ops.int4_gemv_cuda if backend == "cuda" else custom_ops.int4_matmul_triton
        x2d = x.reshape(-1, x.shape[-1]).contiguous()
        out = op(x2d, weight.qdata, weight.scale, weight.zero_point, weight.group_size)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out
    if backend == "fbgemm":
        return fbgemm.linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def _fp8_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """fp8 activations: ``x`` quantized per row to float8 e4m3, then fbgemm's
    ``f8i4bf16_rowwise`` on the plain layout, or (anywhere else) the reference path on the
    fp8-rounded activations. The fbgemm kernel also rounds the dequantized weights to fp8
    (3.3% relative difference from the reference path, measured on an H200)."""
    x2d = x.reshape(-1, x.shape[-1])
    xq, x_scale = fbgemm.quantize_fp8_rows(x2d)
    if fbgemm.can_run_fp8_linear(x2d, weight):
        out = custom_ops.fbgemm_f8i4_rowwise(
            xq, weight.qdata, x_scale, weight.scale, weight.zero_point)
    else:
        x_rounded = (xq.float() * x_scale.unsqueeze(-1)).to(x.dtype)
        out = reference.linear(x_rounded, weight, None)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out + bias if bias is not None else out


def bmm_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`int4_bmm` uses: ``"fbgemm"`` or ``"reference"``."""
    if fbgemm.can_run_bmm(x, weight):
        return "fbgemm"
    return "reference"


def int4_bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]`` for a stored (not transposed) ``W [B, N, K]``."""
    if weight.act_pre_scale is not None:
        x = x * weight.act_pre_scale.to(x.dtype).unsqueeze(-2)
    if weight.activation_dtype == "fp8":  # the same activation rounding as linear, then bf16
        xq, x_scale = fbgemm.quantize_fp8_rows(x.reshape(-1, x.shape[-1]))
        x = (xq.float() * x_scale.unsqueeze(-1)).to(x.dtype).reshape(x.shape)
    if bmm_backend(x, weight) == "fbgemm":
        return fbgemm.bmm(x, weight)
    return reference.bmm(x, weight)
