"""Kernel dispatch: the one place that decides which backend computes an int4 op.

Backends live one per module (:mod:`.reference`, :mod:`.fbgemm`, :mod:`.cuda_gemv`,
:mod:`.cuda_gemm`, :mod:`.cuda_fp8_rows`, :mod:`.cuda_dequant`, :mod:`.triton_int4`) and take
the tensor subclass's fields; the tensor classes call only the functions here, so a backend
can be added or swapped without touching them. Inputs are validated by the caller (the op
implementation) before they get here.
"""

from __future__ import annotations

import torch

from int4tensor import quant_primitives
from int4tensor.kernels import (
    cuda_dequant, cuda_fp8_rows, cuda_gemm, cuda_gemv, custom_ops, fbgemm, reference)

#: Dispatch by the number of activation rows M (from benchmarks/bench_linear.py and
#: scripts/probe_cuda_gemv.py on an H200): up to CUDA_GEMV_MAX_M rows run our tensor-core
#: GEMV (G = 128/256; faster than fbgemm, tinygemm and Triton there on every shape measured),
#: 17 to 32 rows our tensor-core GEMM (cuda_gemm.MIN_M, MAX_M; scripts/probe_cuda_gemm.py);
#: where they cannot run, M = 1 runs our Triton GEMV. Larger M runs fbgemm's CUTLASS GEMM on
#: Hopper, or our Triton tensor-core kernel up to TRITON_MAX_M where fbgemm cannot run (other
#: GPUs, G = 32); beyond that the reference path.
CUDA_GEMV_MAX_M = 16
TRITON_ALWAYS_MAX_M = 1
TRITON_MAX_M = 16
#: From this many rows the plain layout runs as a temporary bf16 weight (one dequantize
#: kernel) and cuBLAS: at M = 8192 that is 0.95-0.99x bf16 against 0.77-0.88x for fbgemm's
#: int4 GEMM (benchmarks/bench_linear.py on an H200), at the cost of one layer's bf16 weight
#: in memory during the call.
DENSE_MIN_M = 4096
#: fp8 activations on the plain layout: from this many rows fbgemm's f8i4bf16_rowwise runs;
#: below, the bf16 kernels above run on the fp8-rounded activations, which is faster there
#: (the weight read dominates; scripts/probe_fp8.py and bench_linear.py on an H200).
FP8_ROWWISE_MIN_M = 64

__all__ = ["bmm_backend", "dequantize_int4", "int4_bmm", "int4_linear", "linear_backend",
           "preshuffled_backend", "preshuffled_bmm", "preshuffled_linear", "quantize_fp8_rows",
           "round_fp8_rows"]


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


def _our_cuda_kernel_can_run(kernel, x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                             zero_point: torch.Tensor, group_size: int, **options) -> bool:
    """Whether one of our CUDA kernel modules (cuda_gemv, cuda_gemm) takes ``x [*, K]`` with a
    2D weight (rows = all of x's leading dims) or ``x [B, M, K]`` with a 3D one (bmm)."""
    if not (x.is_cuda and x.numel() and x.stride(-1) == 1 and kernel.is_available()):
        return False
    if qdata.ndim == 2:
        x = x.reshape(-1, x.shape[-1])
    elif not (qdata.ndim == 3 and x.ndim == 3):
        return False
    return (
        kernel.can_run(x, qdata, scale, zero_point, group_size, **options)
        and torch.cuda.get_device_capability(x.device) >= (8, 0)  # mma, cp.async, bf16x2 fma
        and kernel.can_compile(x.device.index if x.device.index is not None
                               else torch.cuda.current_device())
    )


def _our_cuda_backend(x: torch.Tensor, qdata: torch.Tensor, scale: torch.Tensor,
                      zero_point: torch.Tensor, group_size: int, shuffled: bool) -> str | None:
    """``"cuda"`` (our GEMV, up to CUDA_GEMV_MAX_M rows) or ``"cuda_gemm"`` (our GEMM, 17 to 32
    rows) where one of them takes these arguments, else None; rows count per batch entry for
    a 3D weight."""
    rows = x.shape[-2] if qdata.ndim == 3 else (x.numel() // x.shape[-1] if x.numel() else 0)
    if rows <= CUDA_GEMV_MAX_M and _our_cuda_kernel_can_run(
            cuda_gemv, x, qdata, scale, zero_point, group_size):
        return "cuda"
    if _our_cuda_kernel_can_run(cuda_gemm, x, qdata, scale, zero_point, group_size,
                                shuffled=shuffled):
        return "cuda_gemm"
    return None


#: our kernels' custom ops by backend name, for each layout
_PLAIN_OPS = {"cuda": custom_ops.int4_gemv_cuda, "cuda_gemm": custom_ops.int4_gemm_cuda,
              "triton": custom_ops.int4_matmul_triton}
_PRESHUFFLED_OPS = {"cuda": custom_ops.int4_gemv_cuda_preshuffled,
                    "cuda_gemm": custom_ops.int4_gemm_cuda_preshuffled}


def linear_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`int4_linear` uses for these arguments: ``"cuda"`` (our
    GEMV), ``"cuda_gemm"`` (our GEMM, 17 to 32 rows), ``"triton"``, ``"fbgemm"`` or
    ``"reference"`` (dequantize, then the dense op; see CUDA_GEMV_MAX_M and DENSE_MIN_M)."""
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    ours = _our_cuda_backend(x, weight.qdata, weight.scale, weight.zero_point, weight.group_size,
                             shuffled=False)
    if ours:
        return ours
    if rows >= DENSE_MIN_M and x.is_cuda and \
            cuda_dequant.can_run(weight.qdata, weight.scale, weight.zero_point, x.dtype):
        return "reference"  # dequantize (one kernel), then cuBLAS
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
    fp8 activations (``W.activation_dtype == "fp8"``) are quantized per row; from
    FP8_ROWWISE_MIN_M rows fbgemm's ``f8i4bf16_rowwise`` takes them (it also rounds the
    dequantized weights to fp8: 3.3% from the reference path, measured on an H200), otherwise
    the bf16 backends run on the fp8-rounded activations, as the reference path does.
    """
    if weight.act_pre_scale is not None:
        x = x * weight.act_pre_scale.to(x.dtype)
    x2d = x.reshape(-1, x.shape[-1])
    if weight.activation_dtype == "fp8":
        if x2d.shape[0] >= FP8_ROWWISE_MIN_M and fbgemm.can_run_fp8_linear(x2d, weight):
            xq, x_scale = quantize_fp8_rows(x2d)
            out = custom_ops.fbgemm_f8i4_rowwise(
                xq, weight.qdata, x_scale, weight.scale, weight.zero_point)
            out = out.reshape(*x.shape[:-1], out.shape[-1])
            return out + bias if bias is not None else out
        x = round_fp8_rows(x2d).reshape(x.shape)
    backend = linear_backend(x, weight)
    if backend in _PLAIN_OPS:
        out = _PLAIN_OPS[backend](x.reshape(-1, x.shape[-1]).contiguous(), weight.qdata,
                                  weight.scale, weight.zero_point, weight.group_size)
        out = out.reshape(*x.shape[:-1], out.shape[-1])
        return out + bias if bias is not None else out
    if backend == "fbgemm":
        return fbgemm.linear(x, weight, bias)
    return reference.linear(x, weight, bias)


def dequantize_int4(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                    group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale + zero_point`` in ``dtype``, ``[..., N, K]``: one CUDA kernel where it can
    run (bf16), torch ops elsewhere (the same bits; see
    :func:`int4tensor.quant_primitives.dequantize_int4`)."""
    if cuda_dequant.can_run(qdata, scale, zero_point, dtype):
        return custom_ops.dequantize_int4_cuda(qdata, scale, zero_point, group_size)
    return quant_primitives.dequantize_int4(qdata, scale, zero_point, group_size, dtype)


def quantize_fp8_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 quantization of bf16 activations ``[M, K]`` -> ``(xq, x_scale [M])``: one
    CUDA kernel where it can run, torch ops elsewhere (the same bits; see
    :func:`int4tensor.quant_primitives.quantize_fp8_rows`)."""
    x2d = x2d.contiguous()
    if cuda_fp8_rows.can_run(x2d):
        return custom_ops.fp8_quantize_rows(x2d)
    return quant_primitives.quantize_fp8_rows(x2d)


def round_fp8_rows(x2d: torch.Tensor) -> torch.Tensor:
    """Activations ``[M, K]`` rounded through their per-row fp8 quantization and back."""
    x2d = x2d.contiguous()
    if cuda_fp8_rows.can_run(x2d):
        return custom_ops.fp8_round_rows(x2d)
    return quant_primitives.round_fp8_rows(x2d)


def preshuffled_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`preshuffled_linear` and :func:`preshuffled_bmm` use, for bf16
    activations: ``"cuda"`` (our GEMV reading the preshuffled layout, up to CUDA_GEMV_MAX_M
    rows; G = 128 / 256), ``"cuda_gemm"`` (our GEMM, 17 to 32 rows) or ``"fbgemm"``; rows
    count per batch entry for a 3D weight."""
    if weight.activation_dtype != "bf16":
        return "fbgemm"
    return _our_cuda_backend(x, weight.qdata, weight.group_scale, weight.group_zero,
                             weight.group_size, shuffled=True) or "fbgemm"


def _our_preshuffled(x: torch.Tensor, weight) -> torch.Tensor | None:
    """Our GEMV or GEMM on a bf16 ``Int4PreshuffledTensor`` where :func:`preshuffled_backend`
    picks one, else None."""
    op = _PRESHUFFLED_OPS.get(preshuffled_backend(x, weight))
    if op is None:
        return None
    return op(x, weight.qdata, weight.group_scale, weight.group_zero, weight.group_size)


def preshuffled_linear(x2d: torch.Tensor, weight) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, Np]`` for a 2D ``Int4PreshuffledTensor``: bf16 activations run
    our GEMV at decode sizes (see :func:`preshuffled_backend`; fbgemm's ``bf16i4bf16_shuffled``
    takes 1.5-3x its time there), our GEMM from 17 to 32 rows and ``bf16i4bf16_shuffled``
    above; fp8 activations ``f8i4bf16_shuffled`` after quantizing ``x`` per row."""
    if weight.activation_dtype == "bf16":
        out = _our_preshuffled(x2d, weight)
        if out is not None:
            return out
        return custom_ops.fbgemm_bf16i4_shuffled(
            x2d, weight.qdata, weight.group_scale, weight.group_zero)
    xq, x_scale = quantize_fp8_rows(x2d)
    return custom_ops.fbgemm_f8i4_shuffled(
        xq, weight.qdata, x_scale, weight.row_scale, weight.group_scale)


def preshuffled_bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, Np]`` for a 3D ``Int4PreshuffledTensor``, one launch for
    all B (no loop over experts): bf16 activations run our GEMV up to CUDA_GEMV_MAX_M rows per
    entry, our GEMM from 17 to 32, fbgemm's batched kernel above; fp8 activations fbgemm's
    grouped kernel."""
    n = weight.qdata.shape[-2]
    if weight.activation_dtype == "bf16":
        out = _our_preshuffled(x, weight)
        if out is not None:
            return out
        return custom_ops.fbgemm_bf16i4_shuffled_batched(
            x.contiguous(), weight.qdata,
            weight.group_scale.reshape(-1, n), weight.group_zero.reshape(-1, n))
    b, m, k = x.shape
    xq, x_scale = quantize_fp8_rows(x.reshape(b * m, k))
    return custom_ops.fbgemm_f8i4_shuffled_batched(
        xq.view(b, m, k), weight.qdata, x_scale.view(b, m), weight.row_scale,
        weight.group_scale)


def bmm_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`int4_bmm` uses: ``"cuda"`` (our GEMV, up to
    CUDA_GEMV_MAX_M rows per batch entry), ``"cuda_gemm"`` (our GEMM, 17 to 32 rows per entry),
    ``"fbgemm"`` or ``"reference"``."""
    ours = _our_cuda_backend(x, weight.qdata, weight.scale, weight.zero_point, weight.group_size,
                             shuffled=False)
    if ours:
        return ours
    if fbgemm.can_run_bmm(x, weight):
        return "fbgemm"
    return "reference"


def int4_bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]`` for a stored (not transposed) ``W [B, N, K]``."""
    if weight.act_pre_scale is not None:
        x = x * weight.act_pre_scale.to(x.dtype).unsqueeze(-2)
    if weight.activation_dtype == "fp8":  # the same activation rounding as linear, then bf16
        x = round_fp8_rows(x.reshape(-1, x.shape[-1])).reshape(x.shape)
    backend = bmm_backend(x, weight)
    if backend in ("cuda", "cuda_gemm"):
        return _PLAIN_OPS[backend](x, weight.qdata, weight.scale, weight.zero_point,
                                   weight.group_size)
    if backend == "fbgemm":
        return fbgemm.bmm(x, weight)
    return reference.bmm(x, weight)
