"""Triton int4 matmul over the plain Int4Tensor layout, for decode-sized inputs (small M).

At small M a linear layer is bound by reading its weights, so this kernel reads the packed
``qdata [N, K/2]`` once, straight from the checkpoint layout, and never materializes a
dequantized weight. Per group ``g`` of ``G`` input features it factors the zero point out of
the inner product:

    out[m, n] = sum_g  scale[g, n] * (x[m, g] . q[n, g])  +  zero_point[g, n] * sum(x[m, g])

so the inner loop is one tensor-core dot of the activations with the *integer* values. The
nibbles become bf16 without any arithmetic: OR-ing a nibble ``u`` (= q + 8) into the bits of
bf16 128.0 gives the bf16 number ``128 + u`` exactly, so ``x . (136 + q)`` is what the dot
computes and ``136 * sum(x)`` is taken off afterwards. Even and odd K positions sit in the low
and high nibbles of one byte; the activations are read with stride 2 to match them, so no
interleave is needed. Split-K (atomic fp32 adds) fills the GPU when N alone is too narrow.

This module imports triton: it is only imported by :mod:`int4tensor.kernels` for CUDA inputs.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _int4_matmul_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sg, stride_om,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, G // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_n_safe = tl.where(mask_n, offs_n, 0)  # rows past N re-read row 0 instead of masking

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_groups = K // G
    groups_per_split = tl.cdiv(num_groups, SPLIT_K)
    g_start = pid_k * groups_per_split
    g_end = tl.minimum(g_start + groups_per_split, num_groups)
    for g in range(g_start, g_end):
        byte0 = g * (G // 2)
        # packed weights, loaded transposed: [G/2, BLOCK_N] int8
        q = tl.load(q_ptr + offs_n_safe[None, :] * stride_qn + (byte0 + offs_h)[:, None])
        q16 = q.to(tl.int16)
        lo = ((q16 & 0xF) ^ 0x4308).to(tl.bfloat16, bitcast=True)  # 128 + (q_lo + 8)
        hi = (((q16 >> 4) & 0xF) ^ 0x4308).to(tl.bfloat16, bitcast=True)
        # activations at even / odd K positions: [BLOCK_M, G/2]
        x_even_ptr = x_ptr + offs_m[:, None] * stride_xm + (2 * (byte0 + offs_h))[None, :]
        x_even = tl.load(x_even_ptr, mask=mask_m[:, None], other=0.0)
        x_odd = tl.load(x_even_ptr + 1, mask=mask_m[:, None], other=0.0)
        dot = tl.dot(x_even, lo) + tl.dot(x_odd, hi)
        x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
        s = tl.load(s_ptr + g * stride_sg + offs_n_safe).to(tl.float32)
        z = tl.load(z_ptr + g * stride_sg + offs_n_safe).to(tl.float32)
        acc += s[None, :] * dot + (z - 136.0 * s)[None, :] * x_sum[:, None]

    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask, sem="relaxed")


def pick_config(m: int, n: int, k: int) -> dict:
    """Launch configuration by shape, chosen from device benchmarks (benchmarks/)."""
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    block_n = 32 if m <= 16 else 64
    programs = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    split_k = 1
    while programs * split_k < 264 and split_k < 8 and k // 128 >= 2 * split_k * 2:
        split_k *= 2
    return dict(BLOCK_M=block_m, BLOCK_N=block_n, SPLIT_K=split_k, num_warps=4, num_stages=4)


def int4_matmul(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` for ``W = q * scale + zero_point`` in the plain layout.

    Args:
        x: bf16 ``[M, K]``, last dim contiguous.
        qdata: int8 ``[N, K/2]`` contiguous; scale, zero_point: ``[K/G, N]`` contiguous.
    """
    m, k = x.shape
    n = qdata.shape[0]
    cfg = dict(config or pick_config(m, n, k))
    split_k = cfg["SPLIT_K"]
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split_k)
    _int4_matmul_kernel[grid](
        x, qdata, scale, zero_point, out,
        m, n, k,
        x.stride(0), qdata.stride(0), scale.stride(0), out.stride(0),
        G=group_size, **cfg,
    )
    return out if split_k == 1 else out.to(x.dtype)
