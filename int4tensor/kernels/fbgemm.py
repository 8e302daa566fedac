"""fbgemm-gpu-genai backend (Hopper, sm90+).

fbgemm is imported lazily, the first time a CUDA bf16 input asks for it, so that
``import int4tensor`` never imports it and CPU-only machines never need it.
"""

from __future__ import annotations

import functools

import torch

from int4tensor.kernels import custom_ops
from int4tensor.quant_primitives import pack_int4


@functools.cache
def is_available() -> bool:
    """True when ``fbgemm_gpu.experimental.gen_ai`` imports and registers its int4 ops."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return False
    return hasattr(torch.ops.fbgemm, "bf16i4bf16_rowwise")


@functools.cache
def _is_sm90_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def can_run_linear(x: torch.Tensor, weight) -> bool:
    """``bf16i4bf16_rowwise`` takes bf16 activations and bf16 scale/zero on sm90+ GPUs."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and weight.ndim == 2
        and weight.scale.dtype == torch.bfloat16
        and weight.zero_point.dtype == torch.bfloat16
        and x.numel() > 0
        and weight.group_size >= 64  # measured on an H200: G=32 gives wrong results
        and _is_sm90_or_newer(x.device.index if x.device.index is not None else 0)
        and is_available()
    )


def can_run_fp8_linear(x: torch.Tensor, weight) -> bool:
    """``f8i4bf16_rowwise`` reads the plain layout (bf16 scale/zero ``[K/G, N]``), G = 128."""
    return can_run_linear(x, weight) and weight.group_size == 128


def can_run_bmm(x: torch.Tensor, weight) -> bool:
    """``bf16i4bf16_rowwise_batched``: bf16, contiguous 3D weight fields, sm90+."""
    return (
        can_run_linear(x[0] if x.ndim == 3 else x, weight[0] if weight.ndim == 3 else weight)
        and x.ndim == 3 and weight.ndim == 3
        and weight.qdata.is_contiguous() and weight.scale.is_contiguous()
        and weight.zero_point.is_contiguous()
    )


def bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]`` through ``bf16i4bf16_rowwise_batched``, which
    reads the scales as one 2D ``[B*K/G, N]`` tensor (a 3D one is silently misread)."""
    n = weight.qdata.shape[-2]
    return custom_ops.fbgemm_bf16i4_rowwise_batched(
        x.contiguous(), weight.qdata, weight.scale.reshape(-1, n), weight.zero_point.reshape(-1, n))


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [*, K]`` bf16 -> ``[*, N]`` bf16 through ``torch.ops.fbgemm.bf16i4bf16_rowwise``."""
    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    out = custom_ops.int4_matmul_fbgemm(x2d, weight.qdata, weight.scale, weight.zero_point,
                             weight.group_size)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out + bias if bias is not None else out


# ---- preshuffled layout (Int4PreshuffledTensor) ---------------------------------------------
# Contracts measured on an H200 with fbgemm-gpu-genai 1.6.0 (scripts/probe_contracts.py):
# * preshuffle_i4 rewrites its input tensor in place: always hand it a copy;
# * the shuffled kernels give wrong results (no error) unless N % 16 == 0, and for G = 32;
# * the *_batched kernels want the scales flattened to 2D [B*K/G, N] (a 3D [B, K/G, N] is
#   silently misread: relative error 0.44);
# * bf16i4bf16_shuffled is bit-identical to bf16i4bf16_rowwise on the same data.
N_ALIGN = 16


def preshuffle(qdata: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(qdata [N, K/2] int8, scale)`` -> fbgemm's preshuffled ``(qdata, scale)``; 2D only."""
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401

    return torch.ops.fbgemm.preshuffle_i4(qdata.clone(), scale)


def quantize_fp8_weight(weight: torch.Tensor, group_size: int):
    """bf16 ``[N, K]`` -> preshuffled symmetric int4 with fp8 group scales and fp32 row scales:
    ``(qdata [N, K/2], group_scale fp8 [K/G, 8, N], row_scale fp32 [N])``."""
    from fbgemm_gpu.experimental.gen_ai.quantize import quantize_int4_preshuffle

    qdata, (group_scale, row_scale) = quantize_int4_preshuffle(
        weight.to(torch.bfloat16), group_size, dtype="fp8")
    return qdata, group_scale, row_scale


def preshuffle_fp8(q: torch.Tensor, group_scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int4 ``q [N, K]`` (int8) with fp8 group scales ``[K/G, N]`` -> fbgemm's
    preshuffled ``(qdata [N, K/2], packed group scales fp8 [K/G, 8, N])`` for
    ``f8i4bf16_shuffled``; 2D only."""
    import fbgemm_gpu.experimental.gen_ai  # noqa: F401

    return torch.ops.fbgemm.preshuffle_i4(pack_int4(q), group_scale.contiguous())


def unpack_fp8_group_scales(packed: torch.Tensor) -> torch.Tensor:
    """fp8 group scales ``[..., K/G, N]`` from fbgemm's packed ``[..., K/G, 8, N]``, exactly.

    Measured on an H200 (scripts/probe_fp8.py): the packed tensor's memory is ``[K/G, N, 8]``
    holding ``e4m3(s * v)`` for ``v = -8 .. -1`` (the products the kernel looks up for
    negative int4 values), so the last slot is ``-s``, exact in e4m3."""
    groups, n = packed.shape[-3], packed.shape[-1]
    last = packed.reshape(*packed.shape[:-3], groups, n, 8)[..., 7]
    return (-last.float()).to(torch.float8_e4m3fn)


def fp8_weight_parts(weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The exact parts of a preshuffled fp8-activation weight ``W = e4m3(q * group_scale) *
    row_scale``: ``(q int8 [..., Np, K], group_scale fp8 [..., K/G, Np], row_scale fp32
    [..., Np])``. q is read back through the kernel (identity activations, unit scales:
    integers in [-8, 7] are exact), so it needs no knowledge of the shuffle."""
    k = weight.qdata.shape[-1] * 2
    n = weight.qdata.shape[-2]
    groups = weight.group_scale.shape[-3]
    zeros = torch.zeros(n, k, dtype=torch.int8, device=weight.device)
    unit = torch.ones(groups, n, dtype=torch.float8_e4m3fn, device=weight.device)
    _, unit_packed = preshuffle_fp8(zeros, unit)
    eye = torch.eye(k, device=weight.device, dtype=torch.float8_e4m3fn)
    ones_k = torch.ones(k, device=weight.device)
    ones_n = torch.ones(n, device=weight.device)
    qs = [torch.ops.fbgemm.f8i4bf16_shuffled(eye, qd, ones_k, ones_n, unit_packed).t()
          for qd in weight.qdata.reshape(-1, n, k // 2)]
    q = torch.stack(qs).round().to(torch.int8).reshape(*weight.qdata.shape[:-1], k)
    return q, unpack_fp8_group_scales(weight.group_scale), weight.row_scale


def unshuffle_int4(weight) -> torch.Tensor:
    """Exact int4 values ``q [..., N_padded, K]`` (int8) of a preshuffled bf16-activation
    weight: the kernel run on an identity input with unit scales and zero zero-points returns
    q itself (integers in [-8, 7] are exact in bf16)."""
    k = weight.qdata.shape[-1] * 2
    eye = torch.eye(k, device=weight.device, dtype=torch.bfloat16)
    qs = [torch.ops.fbgemm.bf16i4bf16_shuffled(eye, q, torch.ones_like(s), torch.zeros_like(s))
          for q, s in zip(weight.qdata.reshape(-1, *weight.qdata.shape[-2:]),
                          weight.group_scale.reshape(-1, *weight.group_scale.shape[-2:]))]
    return torch.stack([q.t().round().to(torch.int8) for q in qs]).reshape(
        *weight.qdata.shape[:-1], k)


def dequantize_fp8_weight(weight) -> torch.Tensor:
    """Dense bf16 ``[..., N_padded, K]`` of a preshuffled fp8-activation weight: the kernel's
    output for an identity input (x = I exactly in fp8, x_scale = 1)."""
    k = weight.qdata.shape[-1] * 2
    eye = torch.eye(k, device=weight.device, dtype=torch.bfloat16).to(torch.float8_e4m3fn)
    unit = torch.ones(k, device=weight.device, dtype=torch.float32)
    lead = weight.qdata.shape[:-2]
    outs = [torch.ops.fbgemm.f8i4bf16_shuffled(eye, q, unit, r, s).t()
            for q, s, r in zip(weight.qdata.reshape(-1, *weight.qdata.shape[-2:]),
                               weight.group_scale.reshape(-1, *weight.group_scale.shape[-3:]),
                               weight.row_scale.reshape(-1, weight.row_scale.shape[-1]))]
    return torch.stack(outs).reshape(*lead, *outs[0].shape)
