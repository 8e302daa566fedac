"""CPU kernels for int4 weights: torch's int4 CPU GEMM up to hundreds of rows, a dequantize +
dense GEMM above.

torch ships ``aten._weight_int4pack_mm_for_cpu(x [M, K], packed, G, scale_and_zero)``, which
computes ``x @ W.T`` with ``W[n, k] = (u[n, k] - 8) * scale[k // G, n] + zero[k // G, n]``,
``u`` in ``[0, 15]``, in float32 (the same dequantization as ours with ``q = u - 8`` and
``zero = zero_point``, so a plain weight converts exactly). It reads the weight once per 4
activation rows (benchmarks/bench_cpu.py; figures in docs/performance.md). Beyond
:func:`int4mm_max_m` rows (512 on AVX512 CPUs, no limit on AVX2 ones) the layer dequantizes
the weight (vectorized, :func:`dequantize_t`) and runs the dense GEMM.

The packed layout is torch's (``weight_to_int4pack_kernel``), which depends on the CPU: N in
blocks of ``B`` output features, each block ``[K, B/2]`` bytes where byte ``j`` holds ``u[j]``
in its low nibble and ``u[j + B/2]`` in its high nibble; ``B`` = 64 on AVX512 CPUs and 32 on
AVX2 ones. :func:`block_n` finds this machine's ``B`` once per process by packing a small
random weight with torch's own op and comparing (:func:`why_not_available` says why not when
no block size matches). We build and read the layout with torch ops (:func:`pack`,
:func:`unpack`), so 3D expert stacks pack at once and the weight can go back to the plain
layout exactly; files always hold the plain layout, so a packed weight never leaves the
process that packed it. N is zero-padded to a multiple of ``B``; outputs are sliced back to N.

The candidates are registered in :mod:`int4tensor.kernels.dispatch` as the ``"cpu"`` layout's
tables (:data:`LINEAR_CANDIDATES`, :data:`BMM_CANDIDATES`), so ``int4tensor.explain`` reports
their reasons; :func:`cpu_linear` and :func:`cpu_bmm` plan eager calls once per activation
signature like the other layouts.
"""

from __future__ import annotations

import functools
import torch

from int4tensor.kernels.dispatch import (
    Call, Candidate, decide, describe, eager_plan, is_eager, register)
from int4tensor.kernels.reference import grouped_mm_by_expert
from int4tensor.quant_primitives import pack_int4, unpack_int4

__all__ = ["BLOCK_SIZES", "BMM_CANDIDATES", "INT4MM_MAX_M", "INT4MM_MAX_M_BY_BLOCK",
           "LINEAR_CANDIDATES", "block_n", "int4mm_max_m",
           "choose", "cpu_bmm", "cpu_linear", "dequantize_t", "explain", "grouped_mm_experts",
           "pack", "unpack", "why_not_available"]

#: The blocks of output features torch's CPU int4 packing uses: 64 on AVX512, 32 on AVX2.
BLOCK_SIZES = (64, 32)

#: Up to this many activation rows (per expert for bmm) run torch's int4 GEMM; more rows run
#: dequantize + dense GEMM. From benchmarks/bench_cpu.py on the project's 2-core CPU machine
#: (results/bench_cpu.csv): the int4 GEMM re-reads the weight once per 4 rows, yet its cost
#: per row stays within 1.0-1.3x of the bf16 GEMM's (no AMX here), while the dequantize costs
#: many rows' worth of GEMM; on all three Llama shapes the int4 GEMM was the faster of the two
#: at every M measured up to 512, and the two met around 512-1024.
INT4MM_MAX_M = 512
#: The same limit by layout block (this machine's :func:`block_n`). On an AVX2 CPU (blocks of 32)
#: torch's int4 GEMM stayed 2.2-2.8x faster than the bf16 GEMM and than dequantize + dense GEMM
#: at every M measured (1-512 on three Llama shapes, results/bench_cpu_avx2.txt; 4096 x 4096 at
#: M = 2048: 2.2 s against 6.4 s dense and 6.3 s bf16): no limit there.
INT4MM_MAX_M_BY_BLOCK = {64: INT4MM_MAX_M, 32: None}


def int4mm_max_m() -> int | None:
    """The most activation rows torch's int4 GEMM takes on this machine (None: any number)."""
    return INT4MM_MAX_M_BY_BLOCK.get(block_n(), INT4MM_MAX_M)


ACTIVATION_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---- layout ---------------------------------------------------------------------------------
def pack(qdata: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
         block: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The plain fields in torch's CPU int4 layout.

    Args:
        qdata: int8 ``[..., N, K/2]`` (:func:`int4tensor.quant_primitives.pack_int4`).
        scale, zero_point: ``[..., K/G, N]``.
        block: output features per block (:data:`BLOCK_SIZES`); this machine's
            :func:`block_n` by default.

    Returns:
        ``(packed uint8 [..., Np, K/2], scale_and_zero [..., K/G, Np, 2])`` in scale's dtype,
        ``Np`` = N rounded up to ``block`` (padded rows are zero: ``u = 0``, scale 0, zero 0).
    """
    block = block or block_n()
    *lead, n, half = qdata.shape
    k, pad = 2 * half, -n % block
    u = (unpack_int4(qdata) + 8).to(torch.uint8)                  # [..., N, K] in [0, 15]
    u = torch.nn.functional.pad(u, (0, 0, 0, pad))
    blocks = u.view(*lead, (n + pad) // block, 2, block // 2, k)
    packed = blocks[..., 0, :, :] | (blocks[..., 1, :, :] << 4)   # [..., NB, B/2, K]
    packed = packed.transpose(-1, -2).contiguous().view(*lead, n + pad, half)
    scale_and_zero = torch.stack([scale, zero_point], dim=-1)
    scale_and_zero = torch.nn.functional.pad(scale_and_zero, (0, 0, 0, pad)).contiguous()
    return packed, scale_and_zero


def unpack(packed: torch.Tensor, block: int | None = None) -> torch.Tensor:
    """Inverse of :func:`pack` on the weight values: uint8 ``[..., Np, K/2]`` -> int8 ``q``
    ``[..., Np, K]`` in ``[-8, 7]`` (padded rows included)."""
    block = block or block_n()
    *lead, np_, half = packed.shape
    k = 2 * half
    b = packed.view(*lead, np_ // block, k, block // 2)
    u = torch.stack([b & 0xF, b >> 4], dim=-3)                    # [..., NB, 2, K, B/2]
    q = u.transpose(-1, -2).reshape(*lead, np_, k).view(torch.int8) - 8
    return q


def dequantize_t(packed: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int,
                 dtype: torch.dtype, block: int | None = None) -> torch.Tensor:
    """``W.T`` as a dense ``dtype`` ``[..., K, Np]``: ``W[n, k] = q * scale + zero``, the
    product and the sum each rounded to float32, then cast: bit for bit the plain layout's
    :func:`~int4tensor.quant_primitives.dequantize_int4`, transposed.

    Computed in the packed layout's own order (a block's output features contiguous per k), so
    every pass runs over contiguous rows of the block with the scales broadcast along K, and the
    last one writes ``[K, N]`` directly (the fp32 GEMM's operand; :func:`gemm_operand` re-lays
    it for the half-precision one).
    """
    bn = block or block_n()
    *lead, np_, half = packed.shape
    k, nb, g = 2 * half, np_ // bn, group_size
    b = packed.view(*lead, nb, k, bn // 2)
    if torch.compiler.is_compiling():
        return _dequantize_t_formula(b, scale_and_zero, g, dtype)
    u = torch.empty(*lead, nb, k, 2, bn // 2, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(b, 0xF, out=u[..., 0, :])
    torch.bitwise_right_shift(b, 4, out=u[..., 1, :])
    q = u.view(torch.int8).sub_(8).view(*lead, nb, k // g, g, bn)
    out = torch.empty(*lead, k, nb, bn, dtype=dtype, device=packed.device)
    blocks = out.view(*lead, k // g, g, nb, bn).movedim(-2, -4)  # [..., NB, K/G, G, B]
    # scale_and_zero [..., K/G, NB*B, 2] -> scale, zero [..., NB, K/G, 1, B]
    sz = scale_and_zero.view(*lead, k // g, nb, bn, 2).movedim(-3, -4).unsqueeze(-3)
    scale, zero = sz[..., 0], sz[..., 1]
    if dtype == scale_and_zero.dtype and dtype in (torch.bfloat16, torch.float16):
        # One pass: q * scale is exact in float32 (at most 4 + 11 significant bits), so
        # torch's half-precision addcmul (float32 inside, one rounding) gives the same float32
        # sum as the reference's multiply-then-add, then the same cast.
        blocks.copy_(q)
        torch.addcmul(zero.contiguous(), blocks, scale.contiguous(), out=blocks)
    else:
        w = q.to(torch.float32)
        w.mul_(scale.to(torch.float32).contiguous()).add_(zero.to(torch.float32).contiguous())
        blocks.copy_(w)
    return out.view(*lead, k, np_)


def _dequantize_t_formula(b: torch.Tensor, scale_and_zero: torch.Tensor, group_size: int,
                          dtype: torch.dtype) -> torch.Tensor:
    """:func:`dequantize_t` as one expression, for torch.compile (Inductor fuses it; the
    in-place passes above write through permuted views, which its graphs do not keep)."""
    *lead, nb, k, half_block = b.shape
    bn = 2 * half_block
    shifts = torch.tensor([0, 4], dtype=torch.uint8, device=b.device).view(2, 1)
    u = (b.unsqueeze(-2) >> shifts) & 0xF                         # [..., NB, K, 2, B/2]
    q = u.view(torch.int8).reshape(*lead, nb, k // group_size, group_size, bn) - 8
    sz = scale_and_zero.to(torch.float32).reshape(*lead, k // group_size, nb, bn, 2)
    sz = sz.movedim(-3, -4).unsqueeze(-3)
    w = (q.to(torch.float32) * sz[..., 0] + sz[..., 1]).to(dtype)
    return w.reshape(*lead, nb, k, bn).movedim(-3, -2).reshape(*lead, k, nb * bn)


@functools.lru_cache(maxsize=None)
def _probe() -> tuple[int | None, str | None]:
    """(this machine's block size, None) or (None, why torch's CPU int4 GEMM cannot be used)."""
    op = getattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu", None)
    if op is None or not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        return None, f"torch {torch.__version__} has no CPU int4 GEMM (_weight_int4pack_mm_for_cpu)"
    n = 2 * max(BLOCK_SIZES)
    generator = torch.Generator().manual_seed(0)
    u = torch.randint(0, 16, (n, 64), generator=generator, dtype=torch.int32)
    try:
        theirs = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u, 1).view(torch.uint8)
    except RuntimeError as e:
        return None, f"torch's CPU int4 packing failed: {e}"
    q, ones = pack_int4((u - 8).to(torch.int8)), torch.ones(1, n)
    for block in BLOCK_SIZES:
        if torch.equal(theirs.reshape(-1), pack(q, ones, ones, block)[0].reshape(-1)):
            return block, None
    return None, (f"torch's CPU int4 packing on this {torch.backends.cpu.get_cpu_capability()} "
                  f"CPU is none of the layouts int4tensor reads (blocks of {BLOCK_SIZES})")


def why_not_available() -> str | None:
    """None when torch's CPU int4 GEMM runs here in a layout :func:`pack` writes, else why not
    (checked once per process on a small random weight)."""
    return _probe()[1]


def block_n() -> int:
    """The output features per block of torch's CPU int4 layout on this machine; 64 where torch's
    GEMM cannot be used (:func:`why_not_available`; then only int4tensor's own ops read it)."""
    return _probe()[0] or BLOCK_SIZES[0]


# ---- kernels --------------------------------------------------------------------------------
def _scale_and_zero_for(weight, dtype: torch.dtype) -> torch.Tensor:
    """The weight's scale_and_zero in the activation dtype (the GEMM takes them alike)."""
    sz = weight.scale_and_zero
    return sz if sz.dtype == dtype else sz.to(dtype)


def linear_int4mm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]`` with torch's CPU int4 GEMM."""
    out = torch.ops.aten._weight_int4pack_mm_for_cpu(
        x.contiguous(), weight.qdata, weight.group_size, _scale_and_zero_for(weight, x.dtype))
    n = weight.stored_n
    return out if out.shape[1] == n else out[:, :n]


def gemm_operand(w_t: torch.Tensor) -> torch.Tensor:
    """The dense ``W.T [..., K, N]`` in the memory layout torch's CPU GEMM is fast with: for
    bf16/fp16 the weight's own ``[N, K]`` rows (a transposed view), as ``nn.Linear`` holds it;
    with a row-major ``[K, N]`` operand torch's half-precision GEMM takes a slow path on CPUs
    without AVX512-BF16 (an AVX2 machine, 4096 x 4096, M = 8: 1751 ms against 24). fp32 keeps
    ``[K, N]`` (21 ms there; 53 ms on ``[N, K]``)."""
    return w_t if w_t.dtype == torch.float32 else w_t.mT.contiguous().mT


def linear_dense(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [M, K] @ W.T -> [M, N]``: dequantize (:func:`dequantize_t`), then the dense GEMM."""
    w_t = dequantize_t(weight.qdata, weight.scale_and_zero, weight.group_size, x.dtype)
    return torch.mm(x, gemm_operand(w_t[:, : weight.stored_n]))


def bmm_int4mm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]``: torch's CPU int4 GEMM per batch entry."""
    sz = _scale_and_zero_for(weight, x.dtype)
    x = x.contiguous()
    n = weight.stored_n
    return torch.stack([
        torch.ops.aten._weight_int4pack_mm_for_cpu(x[b], weight.qdata[b], weight.group_size,
                                                   sz[b])[:, :n]
        for b in range(x.shape[0])])


def grouped_mm_experts(x: torch.Tensor, weight, offs: torch.Tensor) -> torch.Tensor:
    """``out[t] = x[t] @ W[e].T -> [T, N]`` for the rows of each expert (``offs [E]``
    cumulative ends, read on the host: eager CPU calls), one call per active expert: torch's
    CPU int4 GEMM up to :func:`int4mm_max_m` rows, else that expert dequantized + the dense
    GEMM."""
    sz = _scale_and_zero_for(weight, x.dtype)
    n, g = weight.stored_n, weight.group_size
    fast, limit = why_not_available() is None, int4mm_max_m()
    x = x.contiguous()

    def expert_matmul(rows: torch.Tensor, e: int) -> torch.Tensor:
        if fast and (limit is None or rows.shape[0] <= limit):
            return torch.ops.aten._weight_int4pack_mm_for_cpu(rows, weight.qdata[e], g,
                                                              sz[e])[:, :n]
        return torch.mm(rows, gemm_operand(dequantize_t(weight.qdata[e],
                                                        weight.scale_and_zero[e], g,
                                                        x.dtype)[:, :n]))
    return grouped_mm_by_expert(x, offs, n, expert_matmul)


def bmm_dense(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]``: dequantize every entry, then ``torch.bmm``."""
    w_t = dequantize_t(weight.qdata, weight.scale_and_zero, weight.group_size, x.dtype)
    return torch.bmm(x, gemm_operand(w_t[..., : weight.stored_n]))


# ---- dispatch -------------------------------------------------------------------------------
def why_not_int4mm(call: Call) -> str | None:
    """torch's int4 GEMM takes CPU calls with 1 to :func:`int4mm_max_m` rows."""
    if call.device_type != "cpu":
        return f"runs on CPU only, the activation is on {call.device_type}"
    if call.x.dtype not in ACTIVATION_DTYPES:
        return f"takes fp32/bf16/fp16 activations, got {call.x.dtype}"
    if call.rows == 0:
        return "no activation rows"
    limit = int4mm_max_m()
    if limit is not None and call.rows > limit:
        what = " rows per expert" if call.op == "bmm" else ""
        return (f"M = {call.rows}{what} > {limit}: dequantize + dense GEMM is faster on "
                "CPU")
    return why_not_available()


def why_not_dense(call: Call) -> str | None:
    """Dequantize + dense GEMM takes every call (the last candidate)."""
    return None


#: The tables of the CPU layout (``"cpu"`` in :mod:`int4tensor.kernels.dispatch`), best first.
LINEAR_CANDIDATES = [Candidate("cpu_int4mm", why_not_int4mm, linear_int4mm),
                     Candidate("cpu_dense", why_not_dense, linear_dense)]
BMM_CANDIDATES = [Candidate("cpu_int4mm", why_not_int4mm, bmm_int4mm),
                  Candidate("cpu_dense", why_not_dense, bmm_dense)]
LAYOUT = "cpu"
register("linear", LAYOUT, "bf16", LINEAR_CANDIDATES)
register("bmm", LAYOUT, "bf16", BMM_CANDIDATES)


def explain(op: str, x: torch.Tensor, weight) -> list[tuple[str, str | None]]:
    """``[(candidate, why not or None)]`` in table order, up to the one that runs, for ``x``
    as the kernel receives it (2D for linear, 3D for bmm)."""
    decision = decide(describe(op, x, weight), LAYOUT)
    return [*decision.refused, (decision.backend, None)]


def choose(op: str, x: torch.Tensor, weight) -> Candidate:
    """The candidate that runs ``op`` for ``x`` (2D for linear, 3D for bmm), uncached."""
    return decide(describe(op, x, weight), LAYOUT).candidate


# ---- entry points (Int4CPUTensor's linear and bmm) -----------------------------------------
def _plan(op: str, x: torch.Tensor, weight):
    """``(Decision, f(x, bias))`` for eager calls like ``x``: ``op`` is ``"linear"`` (``x
    [*, K]``) or ``"bmm"`` (``x [B, M, K]``), decided once per activation signature."""
    pre = weight.act_pre_scale
    k, lead = x.shape[-1], tuple(x.shape[:-1])
    rows = (lambda t: t.reshape(-1, k)) if op == "linear" else (lambda t: t)
    decision = decide(describe(op, rows(x), weight), LAYOUT)
    run = decision.candidate.run

    def call(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if pre is not None:
            x = x * (pre.to(x.dtype) if op == "linear" else pre.to(x.dtype).unsqueeze(-2))
        out = run(rows(x), weight)
        if op == "linear":
            out = out.reshape(*lead, out.shape[-1])
        return out + bias if bias is not None else out
    return decision, call


def cpu_linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [*, K] @ W.T + bias -> [*, N]`` for a 2D stored ``Int4CPUTensor`` (its
    ``act_pre_scale`` applied to ``x`` first)."""
    if is_eager(x):
        return eager_plan("linear", x, weight, lambda: _plan("linear", x, weight))(x, bias)
    return _plan("linear", x, weight)[1](x, bias)


def cpu_bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]`` for a 3D stored ``Int4CPUTensor``."""
    if is_eager(x):
        return eager_plan("bmm", x, weight, lambda: _plan("bmm", x, weight))(x, None)
    return _plan("bmm", x, weight)[1](x, None)
