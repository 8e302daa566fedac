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

from int4tensor.kernels import cuda_gemv


@triton.jit
def _gemv_row(x_row, q_rows, s_cols, z_cols, stride_sg, i_start, i_end,
              G: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS_PER_ITER: tl.constexpr):
    """One activation row (``x_row``) times BLOCK_N weight rows over the iterations ``[i_start,
    i_end)`` of GROUPS_PER_ITER groups: float32 ``[BLOCK_N]``. ``q_rows [BLOCK_N, 1, 1]``
    points at the rows' packed bytes, ``s_cols, z_cols [BLOCK_N, 1]`` at their group-0 scales
    and zero points.

    Each iteration reads GROUPS_PER_ITER consecutive groups of BLOCK_N rows as one 3D tile
    ``[BLOCK_N, GROUPS_PER_ITER, G/2]`` (long contiguous runs per row). Nibbles become float32
    without an int->float conversion: the bits 0x4B000000 | u are the float 2**23 + u, so
    subtracting 2**23 + 8 leaves q = u - 8 exactly."""
    offs_g = tl.arange(0, GROUPS_PER_ITER)
    tile_b = offs_g[:, None] * (G // 2) + tl.arange(0, G // 2)[None, :]  # bytes in an iteration
    tile_k = offs_g[:, None] * G + tl.arange(0, G)[None, :]  # K positions in an iteration
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(i_start, i_end):
        byte0 = i * (GROUPS_PER_ITER * G // 2)
        q = tl.load(q_rows + byte0 + tile_b[None, :, :])
        q32 = q.to(tl.int32)
        lo = ((q32 & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
        hi = (((q32 >> 4) & 0xF) ^ 0x4B000008).to(tl.float32, bitcast=True) - 8388616.0
        # interleave in registers (k = 2j, 2j+1) so the activations load contiguously
        w = tl.reshape(tl.join(lo, hi), (BLOCK_N, GROUPS_PER_ITER, G))
        x = tl.load(x_row + 2 * byte0 + tile_k).to(tl.float32)  # [GPI, G]
        dot = tl.sum(w * x[None, :, :], axis=2)  # [BN, GPI]
        x_sum = tl.sum(x, axis=1)  # [GPI]
        g = (i * GROUPS_PER_ITER + offs_g)[None, :] * stride_sg
        s = tl.load(s_cols + g).to(tl.float32)  # [BN, GPI]
        z = tl.load(z_cols + g).to(tl.float32)
        acc += tl.sum(s * dot + z * x_sum[None, :], axis=1)
    return acc


@triton.jit
def _int4_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sg, stride_om,
    G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr, GROUPS_PER_ITER: tl.constexpr,
):
    """One activation row per program (grid axis 2), CUDA-core FMAs: for M of 1 to a few."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n = tl.where(mask_n, offs_n, 0)  # rows past N re-read row 0 instead of masking
    num_iters = K // (G * GROUPS_PER_ITER)
    iters_per_split = tl.cdiv(num_iters, SPLIT_K)
    i_start = pid_k * iters_per_split
    i_end = tl.minimum(i_start + iters_per_split, num_iters)
    acc = _gemv_row(x_ptr + m * stride_xm, q_ptr + offs_n[:, None, None] * stride_qn,
                    s_ptr + offs_n[:, None], z_ptr + offs_n[:, None], stride_sg, i_start, i_end,
                    G, BLOCK_N, GROUPS_PER_ITER)
    out_ptrs = out_ptr + m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask_n, sem="relaxed")


@triton.jit
def _int4_matmul_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, out_ptr,
    M, N, K,
    stride_xm, stride_qn, stride_sg, stride_om,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUPS_PER_ITER: tl.constexpr,
):
    """A tile of BLOCK_M activation rows per program, tensor-core dots per group."""
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_h = tl.arange(0, G // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    offs_n_safe = tl.where(mask_n, offs_n, 0)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    num_iters = K // (G * GROUPS_PER_ITER)
    iters_per_split = tl.cdiv(num_iters, SPLIT_K)
    i_start = pid_k * iters_per_split
    i_end = tl.minimum(i_start + iters_per_split, num_iters)
    for i in range(i_start, i_end):
        for j in tl.static_range(GROUPS_PER_ITER):
            g = i * GROUPS_PER_ITER + j
            byte0 = g * (G // 2)
            # packed weights, loaded transposed: [G/2, BLOCK_N] int8
            q = tl.load(q_ptr + offs_n_safe[None, :] * stride_qn + (byte0 + offs_h)[:, None])
            q16 = q.to(tl.int16)
            lo = ((q16 & 0xF) ^ 0x4308).to(tl.bfloat16, bitcast=True)  # bf16 136 + q_lo
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


def _split_k(programs: int, iters: int, target: int) -> int:
    """K split (a power of two up to 16, at least two iterations each) that brings the
    programs towards ``target``."""
    split_k = 1
    while programs * split_k < target and split_k < 16 and iters >= 2 * split_k:
        split_k *= 2
    return split_k


def gemv_config(rows: int, n: int, k: int, group_size: int = 128) -> dict:
    """The CUDA-core GEMV's launch for ``rows`` activation rows (one program row each) of an
    ``[N, K]`` weight. Best on an H200 for 8192x8192 and 4096x4096 (sweep of 96 configs):
    32 weight rows, two groups per iteration, K split until ~4096 programs."""
    groups = k // group_size
    gpi = 2 if groups % 2 == 0 else 1
    cfg = dict(kernel="gemv", BLOCK_N=32, GROUPS_PER_ITER=gpi, num_warps=2, num_stages=3)
    cfg["SPLIT_K"] = _split_k(triton.cdiv(n, cfg["BLOCK_N"]) * rows, groups // gpi, 4096)
    return cfg


def pick_config(m: int, n: int, k: int, group_size: int = 128) -> dict:
    """Kernel and launch configuration by shape, chosen from device sweeps
    (``benchmarks/bench_linear.py --sweep``)."""
    if m <= GEMV_MAX_M:
        return gemv_config(m, n, k, group_size)
    block_m = 16 if m <= 16 else (32 if m <= 32 else 64)
    cfg = dict(kernel="mma", BLOCK_M=block_m, BLOCK_N=128 if m <= 16 else 64,
               GROUPS_PER_ITER=1, num_warps=4, num_stages=3)
    programs = triton.cdiv(n, cfg["BLOCK_N"]) * triton.cdiv(m, block_m)
    cfg["SPLIT_K"] = _split_k(programs, k // group_size, 1024)
    return cfg


#: activation rows up to which the CUDA-core GEMV kernel is used (tensor-core kernel above)
GEMV_MAX_M = 1


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
        config: kernel and launch parameters (default: :func:`pick_config`).
    """
    m, k = x.shape
    n = qdata.shape[0]
    cfg = dict(config or pick_config(m, n, k, group_size))
    kernel = cfg.pop("kernel")
    split_k = cfg["SPLIT_K"]
    if split_k == 1:
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        out = torch.zeros(m, n, dtype=torch.float32, device=x.device)
    args = (x, qdata, scale, zero_point, out, m, n, k,
            x.stride(0), qdata.stride(0), scale.stride(0), out.stride(0))
    if kernel == "gemv":
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k, m)
        _int4_gemv_kernel[grid](*args, G=group_size, **cfg)
    else:
        grid = (triton.cdiv(n, cfg["BLOCK_N"]), triton.cdiv(m, cfg["BLOCK_M"]), split_k)
        _int4_matmul_kernel[grid](*args, G=group_size, **cfg)
    return out if split_k == 1 else out.to(x.dtype)


# ---- grouped matmul (MoE experts, tokens sorted by expert) ---------------------------------
@triton.jit
def _int4_grouped_matmul_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, offs_ptr, out_ptr,
    T, N, K, E,
    stride_xm, stride_qe, stride_qn, stride_se, stride_sg, stride_om,
    G: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, E_POW2: tl.constexpr,
    SPLIT_X: tl.constexpr, DEQUANT: tl.constexpr, BLOCK_K: tl.constexpr,
    SWAP_AB: tl.constexpr,
):
    """One BLOCK_M x BLOCK_N output tile of one expert per program, tensor-core dots per group
    (``DEQUANT`` False) or per BLOCK_K slice of dequantized weights (True).

    With ``DEQUANT`` the weight tile is scaled to bf16 (``q * scale + zero_point``, in fp32,
    then rounded as the reference path rounds) before the dot, so every dot accumulates into
    one fp32 tile: the long accumulation chain the tensor cores pipeline. Without it the dot
    runs on the integers and each group's result is scaled into the accumulator, which costs
    no per-weight arithmetic but ends the chain every group (faster for few rows per tile).
    ``SWAP_AB`` (with ``DEQUANT``) computes the tile transposed, ``W x^T``: the dequantized
    weights, made in registers, are then the dot's first operand, which Hopper's wgmma reads
    from registers, and only the loaded activations go through shared memory.

    Grid axis 0 walks the row tiles of all experts in order (expert e owns rows offs[e-1] ..
    offs[e]), then those of the rows past offs[E-1], which belong to no expert and are
    written as zeros; programs past the last tile return at once. The launch never knows
    offs: the grid is an upper bound, cdiv(T, BLOCK_M) + E + 1 row tiles."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    # the row-tile schedule, from the offsets alone: E + 1 groups (the last: rows past offs)
    e_idx = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=0)
    starts = tl.load(offs_ptr + e_idx - 1, mask=(e_idx > 0) & (e_idx < E), other=0)
    last_end = tl.load(offs_ptr + E - 1)
    ends = tl.where(e_idx == E, T, ends)
    starts = tl.where(e_idx == E, last_end, starts)
    rows = tl.maximum(ends - starts, 0)
    tiles = (rows + BLOCK_M - 1) // BLOCK_M
    cum_tiles = tl.cumsum(tiles, 0)
    if pid_m >= tl.sum(tiles):
        return
    e = tl.sum((cum_tiles <= pid_m).to(tl.int32))
    first_tile = tl.sum(tl.where(e_idx < e, tiles, 0))
    row0 = tl.sum(tl.where(e_idx == e, starts, 0)) + (pid_m - first_tile) * BLOCK_M
    row_end = tl.sum(tl.where(e_idx == e, ends, 0))

    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < row_end
    mask_n = offs_n < N
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if e == E:  # rows routed to no expert
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        return

    offs_n_safe = tl.where(mask_n, offs_n, 0)
    offs_h = tl.arange(0, G // 2)
    offs_k = tl.arange(0, G)
    q_base = q_ptr + e.to(tl.int64) * stride_qe + offs_n_safe[:, None] * stride_qn \
        + offs_h[None, :]
    s_base = s_ptr + e.to(tl.int64) * stride_se + offs_n_safe
    z_base = z_ptr + e.to(tl.int64) * stride_se + offs_n_safe
    x_base = x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :]
    x_half_base = x_ptr + offs_m[:, None] * stride_xm + offs_h[None, :]
    if DEQUANT:
        offs_hk = tl.arange(0, BLOCK_K // 2)
        qk_base = q_ptr + e.to(tl.int64) * stride_qe + offs_n_safe[:, None] * stride_qn \
            + offs_hk[None, :]
        xk_base = x_ptr + offs_m[:, None] * stride_xm + offs_hk[None, :]
        xt_base = x_ptr + offs_m[None, :] * stride_xm + offs_hk[:, None]  # [BLOCK_K/2, BLOCK_M]
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        for kb in range(0, K // BLOCK_K):
            # [BLOCK_N, BLOCK_K/2] int8 as stored; x arrives as [even k, odd k] halves of
            # each BLOCK_K slice (SPLIT_X is implied)
            q = tl.load(qk_base + kb * (BLOCK_K // 2)).to(tl.int16)
            g = (kb * BLOCK_K) // G
            s = tl.load(s_base + g * stride_sg).to(tl.float32)[:, None]
            zs = tl.load(z_base + g * stride_sg).to(tl.float32)[:, None] - 136.0 * s
            lo = ((q & 0xF) ^ 0x4308).to(tl.bfloat16, bitcast=True).to(tl.float32)
            hi = (((q >> 4) & 0xF) ^ 0x4308).to(tl.bfloat16, bitcast=True).to(tl.float32)
            w_lo = (lo * s + zs).to(tl.bfloat16)  # (136 + q) * s + z - 136 s = q * s + z
            w_hi = (hi * s + zs).to(tl.bfloat16)
            if SWAP_AB:
                xt_even = tl.load(xt_base + kb * BLOCK_K, mask=mask_m[None, :], other=0.0)
                xt_odd = tl.load(xt_base + kb * BLOCK_K + BLOCK_K // 2, mask=mask_m[None, :],
                                 other=0.0)
                acc_t = tl.dot(w_lo, xt_even, acc_t)
                acc_t = tl.dot(w_hi, xt_odd, acc_t)
            else:
                x_even = tl.load(xk_base + kb * BLOCK_K, mask=mask_m[:, None], other=0.0)
                x_odd = tl.load(xk_base + kb * BLOCK_K + BLOCK_K // 2, mask=mask_m[:, None],
                                other=0.0)
                acc = tl.dot(x_even, tl.trans(w_lo), acc)
                acc = tl.dot(x_odd, tl.trans(w_hi), acc)
        if SWAP_AB:
            acc = tl.trans(acc_t)
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)
        return
    for g in range(0, K // G):
        # packed weights as stored, [BLOCK_N, G/2] int8; even k in the low nibble
        q = tl.load(q_base + g * (G // 2)).to(tl.int16)
        lo = ((q & 0xF) ^ 0x4308).to(tl.bfloat16, bitcast=True)  # bf16 136 + q
        hi = (((q >> 4) & 0xF) ^ 0x4308).to(tl.bfloat16, bitcast=True)
        if SPLIT_X:  # x's groups arrive as [even k, odd k] halves: two dots, no interleave
            x_even = tl.load(x_half_base + g * G, mask=mask_m[:, None], other=0.0)
            x_odd = tl.load(x_half_base + g * G + G // 2, mask=mask_m[:, None], other=0.0)
            dot = tl.dot(x_even, tl.trans(lo)) + tl.dot(x_odd, tl.trans(hi))
            x_sum = tl.sum(x_even.to(tl.float32), axis=1) + tl.sum(x_odd.to(tl.float32), axis=1)
        else:
            w = tl.interleave(lo, hi)  # [BLOCK_N, G] in K order
            x = tl.load(x_base + g * G, mask=mask_m[:, None], other=0.0)  # [BLOCK_M, G]
            dot = tl.dot(x, tl.trans(w))
            x_sum = tl.sum(x.to(tl.float32), axis=1)
        s = tl.load(s_base + g * stride_sg).to(tl.float32)
        z = tl.load(z_base + g * stride_sg).to(tl.float32)
        acc += s[None, :] * dot + (z - 136.0 * s)[None, :] * x_sum[:, None]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def pick_grouped_config(rows_per_expert: int, group_size: int = 128) -> dict:
    """Launch configuration of the grouped kernel by the rows an active expert gets on
    average (the host never reads offs), chosen from device sweeps
    (``benchmarks/bench_moe.py --sweep``, bench_moe_sweep.csv)."""
    # H200, session 12 sweeps: up to 8 rows the integer dot on 16-row tiles (gpt-oss T = 16:
    # 229 vs 235 us for the next best); from 9 rows the dequantizing kernel, whose W x^T form
    # (SWAP_AB) on 32-row tiles leads at 16 rows (Qwen3 gate_up 196 vs 238), the plain
    # dequantizing one on 64-row tiles at 32 rows (gpt-oss down 198 vs 228 swapped), and
    # W x^T on 128-row tiles from 64 rows (Mixtral gate_up 715 vs 811 for the integer dot,
    # down 377 vs 494; Qwen3 at 128 rows 611 vs 715), on 256-row tiles from 256 (Mixtral
    # 3000 vs 3198 at 512 rows)
    if rows_per_expert <= 8:
        return dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, SPLIT_X=False)
    dequant = dict(DEQUANT=True, BLOCK_K=min(64, group_size), SPLIT_X=True)
    if rows_per_expert <= 16:
        return dict(BLOCK_M=32, BLOCK_N=128, num_warps=4, num_stages=4, SWAP_AB=True, **dequant)
    if rows_per_expert <= 48:
        return dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, **dequant)
    if rows_per_expert <= 192:
        return dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, SWAP_AB=True,
                    **dequant)
    return dict(BLOCK_M=256, BLOCK_N=128, num_warps=8, num_stages=3, SWAP_AB=True, **dequant)


def int4_grouped_matmul(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    offs: torch.Tensor,
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """``out[t] = x[t] @ W[e].T -> [T, N]`` for the rows ``t`` of expert ``e`` (rows
    ``offs[e-1] .. offs[e]``; rows from ``offs[E-1]`` on come out 0), ``W[e] = q * scale[e] +
    zero_point[e]`` in the plain layout. offs is read on the GPU only.

    Args:
        x: bf16 ``[T, K]`` sorted by expert, last dim contiguous.
        qdata: int8 ``[E, N, K/2]``, last dim contiguous; scale, zero_point: ``[E, K/G, N]``,
            last dim contiguous, the same strides.
        offs: int32 ``[E]`` cumulative row counts, on x's device.
        config: launch parameters (default: :func:`pick_grouped_config`).
    """
    t, k = x.shape
    e, n = qdata.shape[0], qdata.shape[1]
    cfg = dict(config or pick_grouped_config(cuda_gemv.rows_per_expert(t, e), group_size))
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    dequant = cfg.setdefault("DEQUANT", False)
    block_k = cfg.setdefault("BLOCK_K", group_size)
    if dequant and (block_k > group_size or group_size % block_k or block_k < 32):
        raise ValueError(f"BLOCK_K = {block_k} must divide the group size {group_size} (>= 32)")
    if cfg.setdefault("SWAP_AB", False) and not dequant:
        raise ValueError("SWAP_AB needs DEQUANT (the weights' tile made in registers)")
    split_x = cfg.setdefault("SPLIT_X", False) or dequant
    cfg["SPLIT_X"] = split_x
    if split_x:  # each slice's even K positions, then its odd ones (slice: a group, or BLOCK_K)
        width = block_k if dequant else group_size
        x = x.view(t, k // width, width // 2, 2).transpose(-1, -2).reshape(t, k)
    grid = (triton.cdiv(t, cfg["BLOCK_M"]) + e + 1, triton.cdiv(n, cfg["BLOCK_N"]))
    _int4_grouped_matmul_kernel[grid](
        x, qdata, scale, zero_point, offs, out, t, n, k, e,
        x.stride(0), qdata.stride(0), qdata.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), G=group_size, E_POW2=triton.next_power_of_2(e + 1), **cfg)
    return out


@triton.jit
def _int4_grouped_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, offs_ptr, out_ptr,
    T, N, K, E,
    stride_xm, stride_qe, stride_qn, stride_se, stride_sg, stride_om,
    G: tl.constexpr, BLOCK_N: tl.constexpr, SPLIT_K: tl.constexpr,
    GROUPS_PER_ITER: tl.constexpr, E_POW2: tl.constexpr,
):
    """Row m of x (grid axis 2) times its expert's weights, CUDA-core FMAs: for about one row
    per active expert (decode). The expert is the number of offsets <= m, read here on the
    device; a row past offs[E-1] belongs to no expert and comes out 0."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    e_idx = tl.arange(0, E_POW2)
    ends = tl.load(offs_ptr + e_idx, mask=e_idx < E, other=2147483647)
    e = tl.sum((ends <= m).to(tl.int32))
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_n = tl.where(mask_n, offs_n, 0)
    out_ptrs = out_ptr + m * stride_om + offs_n
    if e >= E:
        if SPLIT_K == 1:  # else the output starts zeroed
            tl.store(out_ptrs, tl.zeros((BLOCK_N,), dtype=out_ptr.dtype.element_ty), mask=mask_n)
        return
    num_iters = K // (G * GROUPS_PER_ITER)
    iters_per_split = tl.cdiv(num_iters, SPLIT_K)
    i_start = pid_k * iters_per_split
    i_end = tl.minimum(i_start + iters_per_split, num_iters)
    expert = e.to(tl.int64)
    acc = _gemv_row(x_ptr + m * stride_xm,
                    q_ptr + expert * stride_qe + offs_n[:, None, None] * stride_qn,
                    s_ptr + expert * stride_se + offs_n[:, None],
                    z_ptr + expert * stride_se + offs_n[:, None], stride_sg, i_start, i_end,
                    G, BLOCK_N, GROUPS_PER_ITER)
    if SPLIT_K == 1:
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out_ptrs, acc, mask=mask_n, sem="relaxed")


def int4_grouped_gemv(
    x: torch.Tensor,
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    offs: torch.Tensor,
    group_size: int,
    config: dict | None = None,
) -> torch.Tensor:
    """:func:`int4_grouped_matmul` one activation row at a time (each row reads its expert's
    weights), for decode: about one row per active expert, any power-of-two group size.

    Args:
        x: bf16 ``[T, K]`` sorted by expert, last dim contiguous.
        qdata: int8 ``[E, N, K/2]``, last dim contiguous; scale, zero_point: ``[E, K/G, N]``,
            last dim contiguous, the same strides; ``W[e] = q * scale[e] + zero_point[e]``.
        offs: int32 ``[E]`` cumulative row counts, on x's device (read there only).
        config: launch parameters (default: :func:`gemv_config` for T rows).

    Returns:
        bf16 ``[T, N]``; rows from ``offs[E-1]`` on are 0.
    """
    t, k = x.shape
    e, n = qdata.shape[0], qdata.shape[1]
    cfg = dict(config or gemv_config(t, n, k, group_size))
    cfg.pop("kernel", None)
    if t == 0:
        return torch.empty(0, n, dtype=x.dtype, device=x.device)
    split_k = cfg["SPLIT_K"]
    out = (torch.empty(t, n, dtype=x.dtype, device=x.device) if split_k == 1 else
           torch.zeros(t, n, dtype=torch.float32, device=x.device))
    grid = (triton.cdiv(n, cfg["BLOCK_N"]), split_k, t)
    _int4_grouped_gemv_kernel[grid](
        x, qdata, scale, zero_point, offs, out, t, n, k, e,
        x.stride(0), qdata.stride(0), qdata.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), G=group_size, E_POW2=triton.next_power_of_2(e), **cfg)
    return out if split_k == 1 else out.to(x.dtype)
