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


# ---- grouped matmul (MoE experts) ----------------------------------------------------------
def grouped_mm_padded(a: torch.Tensor, b: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
    """``a [T, K]`` rows grouped by ``offs`` (cumulative ends, ``[E]``) times ``b [E, K, N]``,
    as one batched matmul: rows are scattered into ``[E, M, K]`` (M: the largest group), one
    ``bmm``, gathered back. Rows at or past ``offs[-1]`` belong to no group and come out 0."""
    t, e = a.shape[0], b.shape[0]
    ends = offs.to(torch.int64)
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    rows = torch.arange(t, device=a.device)
    group = torch.searchsorted(ends, rows, right=True)  # E for rows past the last end
    valid = group < e
    group = group.clamp(max=e - 1)
    slot = torch.where(valid, rows - starts[group], 0)
    m = int((ends - starts).clamp(min=0).max().item()) if e else 0
    padded = a.new_zeros(e, max(m, 1), a.shape[1])
    padded[group[valid], slot[valid]] = a[valid]
    out = torch.bmm(padded, b)[group, slot]
    return out * valid.unsqueeze(1).to(out.dtype)


def grouped_mm_dense(a, b, offs, out_dtype):
    """``aten._grouped_mm`` on dense operands: torch's op where it takes this dtype, else the
    padded batched formulation (2D x 3D with offs; 3D x 3D is a bmm)."""
    if a.device.type == "cpu" or a.dtype == torch.bfloat16:
        return torch.ops.aten._grouped_mm.default(a, b, offs, None, out_dtype)
    if a.ndim == 3 and b.ndim == 3 and offs is None:
        out = torch.bmm(a, b)
    elif a.ndim == 2 and b.ndim == 3 and offs is not None:
        out = grouped_mm_padded(a, b, offs)
    else:
        return torch.ops.aten._grouped_mm.default(a, b, offs, None, out_dtype)
    return out if out_dtype is None else out.to(out_dtype)


def grouped_mm_by_expert(x: torch.Tensor, offs: torch.Tensor, n: int, expert_matmul) -> torch.Tensor:
    """``out[t] = expert_matmul(x[rows of e], e)`` for each expert ``e`` with rows, ``out [T,
    n]`` (rows from ``offs[-1]`` on: 0). Reads ``offs`` on the host, so only for CPU tensors
    (free there; a synchronization on a GPU) and eager calls: one call per active expert, so
    an MoE decode step touches the routed experts' weights only."""
    out = x.new_zeros(x.shape[0], n)
    start = 0
    for e, end in enumerate(offs.tolist()):
        end = min(max(end, start), x.shape[0])
        if end > start:
            out[start:end] = expert_matmul(x[start:end], e)
        start = end
    return out


def grouped_mm_active_experts(x: torch.Tensor, weight, offs: torch.Tensor) -> torch.Tensor:
    """:func:`grouped_mm` dequantizing only the experts that have rows (eager CPU calls)."""
    g = weight.block_size[-1]

    def expert_matmul(rows: torch.Tensor, e: int) -> torch.Tensor:
        w = dequantize_int4(weight.qdata[e], weight.scale[e], weight.zero_point[e], g, x.dtype)
        return F.linear(rows, w)
    return grouped_mm_by_expert(x, offs, weight.qdata.shape[-2], expert_matmul)


def grouped_mm(x: torch.Tensor, weight, offs: torch.Tensor) -> torch.Tensor:
    """``out[t] = x[t] @ W[e].T`` for the rows of expert ``e`` (``offs`` cumulative ends) for a
    stored ``W [E, N, K]``: the weight dequantized to ``x.dtype``, then the dense op."""
    return grouped_mm_dense(x, _stored_weight(weight, x.dtype).transpose(-2, -1), offs, None)
