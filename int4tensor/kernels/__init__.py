"""Kernel dispatch: the one place that decides which backend computes an int4 op.

Backends live one per module (:mod:`.reference`, :mod:`.fbgemm`, :mod:`.cuda_gemv`,
:mod:`.cuda_gemm`, :mod:`.cuda_fp8_rows`, :mod:`.cuda_dequant`, :mod:`.triton_int4`). This
module writes, once, the ordered candidate tables of :mod:`.dispatch` (best first; each
candidate says why it refuses a call) and the op entry points the tensor classes call:
:func:`int4_linear`, :func:`int4_bmm`, :func:`int4_grouped_mm`, :func:`preshuffled_linear`,
:func:`preshuffled_bmm`.
Inputs are validated by the caller (the op implementation) before they get here.

The orderings come from measurements on an H200 (benchmarks/bench_linear.py,
scripts/probe_cuda_gemv.py, scripts/probe_cuda_gemm.py, scripts/probe_fp8.py):

* plain layout, bf16 activations: our tensor-core GEMV up to CUDA_GEMV_MAX_M rows (G = 128
  or 256; faster than fbgemm, tinygemm, Triton and GemLite there on every shape measured),
  our tensor-core GEMM for 17 to 32 rows, from DENSE_MIN_M rows one dequantize kernel +
  cuBLAS (0.95-0.99x bf16 at M = 8192 against 0.77-0.88x for fbgemm's int4 GEMM, at the cost
  of one layer's bf16 weight during the call), our Triton GEMV at M = 1 where ours cannot
  run, fbgemm's CUTLASS GEMM on Hopper, our Triton kernel up to TRITON_MAX_M elsewhere, and
  the reference path (dequantize + the dense op) for everything else (CPU, fp16/fp32);
* fp8 activations on the plain layout: fbgemm's ``f8i4bf16_rowwise`` from
  FP8_ROWWISE_MIN_M rows; below, the bf16 table on the fp8-rounded activations (the weight
  read dominates there);
* the preshuffled layout: our GEMV and GEMM reading it, then fbgemm's shuffled kernels;
* grouped matmul (``aten._grouped_mm``, MoE experts) on the plain layout: our grouped GEMV up
  to GROUPED_GEMV_MAX_ROWS rows per active expert (offsets read on the GPU); for the group
  sizes it refuses our Triton grouped GEMV up to TRITON_GROUPED_GEMV_MAX_ROWS; our Triton
  tensor-core grouped kernel up to TRITON_GROUPED_MAX_ROWS, else the reference path
  (benchmarks/bench_moe.py); on the bf16 preshuffled layout our GEMV reading it at every T
  (its reference path would unshuffle the stack per call).
"""

from __future__ import annotations

import warnings

import torch

from int4tensor import quant_primitives
from int4tensor.kernels import (
    cpu, cuda_dequant, cuda_fp8_rows, cuda_gemm, cuda_gemv, custom_ops, fbgemm, reference)
from int4tensor.kernels.dispatch import (
    Call, Candidate, cached_plan, decide, describe, eager_plan, is_eager, plan_count,
    register)

CUDA_GEMV_MAX_M = 16
TRITON_ALWAYS_MAX_M = 1
TRITON_MAX_M = 16
DENSE_MIN_M = 4096
FP8_ROWWISE_MIN_M = 64
#: grouped GEMV up to this many rows per active expert (T / min(E, T): the host never reads
#: offs; each 16 rows of an expert read its weights once more), our Triton grouped kernel up to
#: TRITON_GROUPED_MAX_ROWS, the reference path (dequantize + bf16 grouped_mm) above. H200,
#: benchmarks/results/bench_moe.csv and bench_moe_sweep.csv: at 16 rows the GEMV beats the
#: Triton kernel (Mixtral gate_up 341 vs 457 us), at 32 the Triton kernel beats the GEMV
#: (Mixtral 547 vs 578, 279 vs 342), at 64 by more (782 vs 1085; DeepSeek-V3 down 3479 vs
#: 4174); at 128 it still beats the reference (Qwen3 611 vs 795), at 256-512 it does not
#: (session 12's dequantizing kernel: gpt-oss 1197 vs 1155, Mixtral 3000 vs 2716). Groups of
#: 64 (which the GEMV refuses) take the Triton kernel up to the same size.
GROUPED_GEMV_MAX_ROWS = 16
TRITON_GROUPED_MAX_ROWS = 128
#: our Triton grouped GEMV (one row at a time, any power-of-two group size) up to this many
#: rows per active expert, for stacks the CUDA GEMV refuses (groups of 64: gpt-oss's K = 2880)
TRITON_GROUPED_GEMV_MAX_ROWS = 1
TRITON_GROUPED_GEMV_MAX_EXPERTS = 4096

__all__ = ["bmm_backend", "dequantize_int4", "explain_call", "int4_bmm", "int4_grouped_mm",
           "int4_linear", "is_eager",
           "linear_backend", "preshuffled_backend", "preshuffled_bmm", "preshuffled_linear",
           "quantize_fp8_rows", "round_fp8_rows"]


# ---- predicates (each returns why a candidate refuses a call, or None) ---------------------
def _not_cuda(call: Call, min_capability=(8, 0), feature: str | None = None) -> str | None:
    if call.device_type != "cuda":
        return f"on {call.device_type}, not CUDA"
    if call.capability is None or call.capability < min_capability:
        return (f"needs compute capability {min_capability[0]}.{min_capability[1]}+, this GPU "
                f"has {call.capability}")
    if feature is not None and feature not in call.features:
        return {"nvrtc": "our CUDA kernels do not compile here (NVRTC missing or failing)",
                "fbgemm": "fbgemm-gpu-genai is not installed (pip install fbgemm-gpu-genai)",
                "triton": "triton is not importable"}[feature]
    return None


def _weight_fields(call: Call):
    """(qdata, scale, zero_point) of either layout (the preshuffled one's group scales)."""
    w = call.weight
    if hasattr(w, "group_zero"):
        return w.qdata, w.group_scale, w.group_zero
    return w.qdata, w.scale, w.zero_point


def _our_kernel(kernel, lo: int, hi: int, shuffled: bool):
    """Refusal of our GEMV (``kernel = cuda_gemv``) or GEMM (``cuda_gemm``) for ``lo..hi``
    rows per batch entry."""
    def why_not(call: Call) -> str | None:
        problem = _not_cuda(call, (8, 0), "nvrtc")
        if problem:
            return problem
        if not lo <= call.rows <= hi:
            return f"M = {call.rows} rows, it takes {lo} to {hi}"
        qdata, scale, zero = _weight_fields(call)
        if shuffled and qdata.shape[-2] % 16:
            return f"N = {qdata.shape[-2]} is not a multiple of 16"
        if kernel is cuda_gemm and not cuda_gemm.shared_memory_configurable():
            return "this torch cannot raise a kernel's shared-memory limit"
        return cuda_gemv.operands_problem(call.x, qdata, scale, zero, call.weight.group_size)
    return why_not


def _dense_why_not(call: Call) -> str | None:
    problem = _not_cuda(call, (8, 0), "nvrtc")
    if problem:
        return problem
    if call.rows < DENSE_MIN_M:
        return f"M = {call.rows} < {DENSE_MIN_M} (below that the int4 kernels are faster)"
    w = call.weight
    if not cuda_dequant.operands_fit(w.qdata, w.scale, w.zero_point, call.x.dtype):
        return ("the dequantize kernel needs bf16, contiguous qdata and N-contiguous scales "
                "(a sliced weight is not)")
    return None


def _triton_why_not(max_rows: int):
    def why_not(call: Call) -> str | None:
        problem = _not_cuda(call, (8, 0), "triton")
        if problem:
            return problem
        if not 0 < call.rows <= max_rows:
            return f"M = {call.rows} rows, it takes 1 to {max_rows}"
        return _bf16_contiguous_problem(call)
    return why_not


def _bf16_contiguous_problem(call: Call) -> str | None:
    w = call.weight
    if call.x.dtype != torch.bfloat16:
        return f"activations are {call.x.dtype}, it takes bf16"
    if w.scale.dtype != torch.bfloat16 or w.zero_point.dtype != torch.bfloat16:
        return f"scales are {w.scale.dtype}, it takes bf16"
    if not (w.qdata.is_contiguous() and w.scale.is_contiguous() and w.zero_point.is_contiguous()):
        return "the weight's fields are not contiguous (a sliced weight; .contiguous() fixes it)"
    return None


def _fbgemm_why_not(call: Call) -> str | None:
    problem = _not_cuda(call, (9, 0), "fbgemm")
    if problem:
        return problem
    if call.x.numel() == 0:
        return "empty activation"
    if call.weight.group_size < 64:
        return f"G = {call.weight.group_size}: fbgemm's int4 kernels give wrong results below 64"
    return _bf16_contiguous_problem(call)


def _fbgemm_fp8_why_not(call: Call) -> str | None:
    if call.rows < FP8_ROWWISE_MIN_M:
        return (f"M = {call.rows} < {FP8_ROWWISE_MIN_M}: the bf16 kernels on fp8-rounded "
                "activations are faster")
    if call.weight.group_size != 128:
        return f"G = {call.weight.group_size}, f8i4bf16_rowwise takes 128"
    return _fbgemm_why_not(call)


def _fbgemm_preshuffled_why_not(call: Call) -> str | None:
    problem = _not_cuda(call, (9, 0), "fbgemm")
    if problem:
        return problem
    if call.x.dtype != torch.bfloat16:
        return f"activations are {call.x.dtype}, fbgemm's shuffled kernels take bf16"
    return None


def _always(call: Call) -> None:
    return None


# ---- run functions: x as the kernel receives it, the stored weight -------------------------
def _plain_op(traced, eager):
    def run(x, w):
        return traced(x, w.qdata, w.scale, w.zero_point, w.group_size)

    def run_eager(x, w):
        return eager(x, w.qdata, w.scale, w.zero_point, w.group_size)
    return run, run_eager


def _shuffled_op(traced, eager):
    def run(x, w):
        return traced(x, w.qdata, w.group_scale, w.group_zero, w.group_size)

    def run_eager(x, w):
        return eager(x, w.qdata, w.group_scale, w.group_zero, w.group_size)
    return run, run_eager


def _gemv_plain(x, q, s, z, g):
    return cuda_gemv.int4_gemv(x, q, s, z, g)


def _gemm_plain(x, q, s, z, g):
    return cuda_gemm.int4_gemm(x, q, s, z, g, shuffled=False)


def _gemv_shuffled(x, q, s, z, g):
    return cuda_gemv.int4_gemv(x, q, s, z, g, shuffled=True)


def _gemm_shuffled(x, q, s, z, g):
    return cuda_gemm.int4_gemm(x, q, s, z, g)


def _triton(x, q, s, z, g):
    from int4tensor.kernels import triton_int4

    return triton_int4.int4_matmul(x, q, s, z, g)


def _fbgemm_rowwise(x, q, s, z, g):
    return torch.ops.fbgemm.bf16i4bf16_rowwise(x, q, s, z)


def _dense_linear(x, w, bias):
    return torch.nn.functional.linear(x, dequantize_int4(w.qdata, w.scale, w.zero_point,
                                                         w.group_size, x.dtype), bias)


def _reference_linear(x, w, bias):
    return reference.linear(x, w, bias)


def _reference_bmm(x, w):
    return reference.bmm(x, w)


def _fbgemm_fp8_rowwise(x, w):
    xq, x_scale = quantize_fp8_rows(x)
    return custom_ops.fbgemm_f8i4_rowwise(xq, w.qdata, x_scale, w.scale, w.zero_point)


def _fbgemm_bmm(x, w):
    n = w.qdata.shape[-2]
    return custom_ops.fbgemm_bf16i4_rowwise_batched(
        x, w.qdata, w.scale.reshape(-1, n), w.zero_point.reshape(-1, n))


def _fbgemm_shuffled(x, w):
    return custom_ops.fbgemm_bf16i4_shuffled(x, w.qdata, w.group_scale, w.group_zero)


def _fbgemm_shuffled_eager(x, w):
    return torch.ops.fbgemm.bf16i4bf16_shuffled(x, w.qdata, w.group_scale, w.group_zero)


def _fbgemm_f8_shuffled(x, w):
    xq, x_scale = quantize_fp8_rows(x)
    return custom_ops.fbgemm_f8i4_shuffled(xq, w.qdata, x_scale, w.row_scale, w.group_scale)


def _fbgemm_f8_shuffled_eager(x, w):
    xq, x_scale = quantize_fp8_rows(x)
    return torch.ops.fbgemm.f8i4bf16_shuffled(xq, w.qdata, x_scale, w.row_scale, w.group_scale)


def _fbgemm_shuffled_batched(x, w):
    n = w.qdata.shape[-2]
    return custom_ops.fbgemm_bf16i4_shuffled_batched(
        x, w.qdata, w.group_scale.reshape(-1, n), w.group_zero.reshape(-1, n))


def _fbgemm_f8_shuffled_batched(x, w):
    b, m, k = x.shape
    xq, x_scale = quantize_fp8_rows(x.reshape(b * m, k))
    return custom_ops.fbgemm_f8i4_shuffled_batched(
        xq.view(b, m, k), w.qdata, x_scale.view(b, m), w.row_scale, w.group_scale)


def _bind(kernel, shuffled: bool):
    def bind(x, w, out_shape=None):
        fields = (w.qdata, w.group_scale, w.group_zero) if shuffled else \
            (w.qdata, w.scale, w.zero_point)
        return kernel.bind(x, *fields, w.group_size, shuffled=shuffled, out_shape=out_shape)
    return bind


_GEMV = Candidate("cuda", _our_kernel(cuda_gemv, 1, CUDA_GEMV_MAX_M, False),
                  *_plain_op(custom_ops.int4_gemv_cuda, _gemv_plain),
                  bind=_bind(cuda_gemv, False))
_GEMM = Candidate("cuda_gemm", _our_kernel(cuda_gemm, cuda_gemm.MIN_M, cuda_gemm.MAX_M, False),
                  *_plain_op(custom_ops.int4_gemm_cuda, _gemm_plain),
                  bind=_bind(cuda_gemm, False))
_REFERENCE = Candidate("reference", _always, _reference_linear, takes_bias=True)

PLAIN_LINEAR = [
    _GEMV,
    _GEMM,
    Candidate("dense", _dense_why_not, _dense_linear, takes_bias=True),
    Candidate("triton", _triton_why_not(TRITON_ALWAYS_MAX_M),
              *_plain_op(custom_ops.int4_matmul_triton, _triton)),
    Candidate("fbgemm", _fbgemm_why_not,
              *_plain_op(custom_ops.int4_matmul_fbgemm, _fbgemm_rowwise)),
    Candidate("triton", _triton_why_not(TRITON_MAX_M),
              *_plain_op(custom_ops.int4_matmul_triton, _triton)),
    _REFERENCE,
]
#: fp8-activation plain weights: fbgemm's fp8 GEMM at large M; else the bf16 table on the
#: fp8-rounded activations (int4_linear rounds them; the reference path rounds the same way)
PLAIN_LINEAR_FP8 = [Candidate("fbgemm_fp8", _fbgemm_fp8_why_not, _fbgemm_fp8_rowwise)]
PLAIN_BMM = [
    _GEMV,
    _GEMM,
    Candidate("fbgemm", lambda call: _fbgemm_why_not(call), _fbgemm_bmm),
    Candidate("reference", _always, _reference_bmm),
]
_GEMV_SHUFFLED = Candidate("cuda", _our_kernel(cuda_gemv, 1, CUDA_GEMV_MAX_M, True),
                           *_shuffled_op(custom_ops.int4_gemv_cuda_preshuffled, _gemv_shuffled),
                           bind=_bind(cuda_gemv, True))
_GEMM_SHUFFLED = Candidate("cuda_gemm",
                           _our_kernel(cuda_gemm, cuda_gemm.MIN_M, cuda_gemm.MAX_M, True),
                           *_shuffled_op(custom_ops.int4_gemm_cuda_preshuffled, _gemm_shuffled),
                           bind=_bind(cuda_gemm, True))
PRESHUFFLED_LINEAR = [_GEMV_SHUFFLED, _GEMM_SHUFFLED,
                      Candidate("fbgemm", _fbgemm_preshuffled_why_not, _fbgemm_shuffled,
                                _fbgemm_shuffled_eager)]
PRESHUFFLED_LINEAR_FP8 = [Candidate("fbgemm", _fbgemm_preshuffled_why_not, _fbgemm_f8_shuffled,
                                    _fbgemm_f8_shuffled_eager)]
PRESHUFFLED_BMM = [_GEMV_SHUFFLED, _GEMM_SHUFFLED,
                   Candidate("fbgemm", _fbgemm_preshuffled_why_not, _fbgemm_shuffled_batched)]
PRESHUFFLED_BMM_FP8 = [Candidate("fbgemm", _fbgemm_preshuffled_why_not,
                                 _fbgemm_f8_shuffled_batched)]

def _grouped_gemv_refusal(max_rows: int | None):
    """Refusal of our grouped GEMV for more than ``max_rows`` rows per active expert (None:
    any number; the kernel takes 16 rows per pass)."""
    def why_not(call: Call) -> str | None:
        problem = _not_cuda(call, (8, 0), "nvrtc")
        if problem:
            return problem
        qdata, scale, zero = _weight_fields(call)
        rows = cuda_gemv.rows_per_expert(call.x.shape[0], qdata.shape[0])
        if max_rows is not None and rows > max_rows:
            return (f"{call.x.shape[0]} rows over {qdata.shape[0]} experts: ~{rows} per "
                    f"active expert, it takes up to {max_rows}")
        return cuda_gemv.grouped_operands_problem(call.x, qdata, scale, zero,
                                                  call.weight.group_size)
    return why_not


def _grouped_gemv(shuffled: bool):
    """(run, run_eager, bind) of our grouped GEMV on either layout's fields."""
    op = custom_ops.int4_grouped_gemv_cuda_preshuffled if shuffled else \
        custom_ops.int4_grouped_gemv_cuda

    def fields(w):
        return (w.qdata, w.group_scale, w.group_zero) if shuffled else \
            (w.qdata, w.scale, w.zero_point)

    def run(x, w, offs):
        return op(x, *fields(w), offs, w.group_size)

    def run_eager(x, w, offs):
        return cuda_gemv.int4_grouped_gemv(x, *fields(w), offs, w.group_size, shuffled)

    def bind(x, w):
        return cuda_gemv.bind_grouped(x, *fields(w), w.group_size, shuffled)
    return run, run_eager, bind


def _triton_grouped_refusal(max_rows: int, above: str, max_experts: int | None = None):
    """Refusal of a Triton grouped kernel for more than ``max_rows`` rows per active expert
    (``above``: what is faster then) or more than ``max_experts`` experts (None: any)."""
    def why_not(call: Call) -> str | None:
        problem = _not_cuda(call, (8, 0), "triton")
        if problem:
            return problem
        x, w = call.x, call.weight
        qdata, scale, zero = w.qdata, w.scale, w.zero_point
        if x.ndim != 2 or qdata.ndim != 3:
            return f"x {x.ndim}D with a {qdata.ndim}D weight: it takes x [T, K], W [E, N, K]"
        if x.dtype != torch.bfloat16 or scale.dtype != torch.bfloat16 \
                or zero.dtype != torch.bfloat16:
            return f"activations {x.dtype}, scales {scale.dtype}: it takes bf16"
        g = w.group_size
        if g < 32 or g & (g - 1) or x.shape[1] % g:
            return (f"group size {g} with K = {x.shape[1]}: it takes a power of two >= 32 "
                    f"dividing K")
        if x.stride(-1) != 1 or qdata.stride(-1) != 1 or scale.stride(-1) != 1 \
                or zero.stride() != scale.stride():
            return ("it needs last-dim-contiguous x, qdata and scales, zero points strided like "
                    "the scales (a sliced weight may not be)")
        if x.shape[0] * max(x.stride(0), qdata.shape[1]) >= 2**31:
            return "activations or output too large for the kernel's 32-bit row offsets"
        rows = cuda_gemv.rows_per_expert(x.shape[0], qdata.shape[0])
        if rows > max_rows:
            return (f"{x.shape[0]} rows over {qdata.shape[0]} experts: ~{rows} per active "
                    f"expert, it takes up to {max_rows} ({above} is faster above)")
        if max_experts is not None and qdata.shape[0] > max_experts:
            return (f"{qdata.shape[0]} experts: its offset scan holds up to {max_experts} in "
                    f"registers")
        return None
    return why_not


_triton_grouped_gemv_why_not = _triton_grouped_refusal(
    TRITON_GROUPED_GEMV_MAX_ROWS, "the tensor-core kernel", TRITON_GROUPED_GEMV_MAX_EXPERTS)
_triton_grouped_why_not = _triton_grouped_refusal(
    TRITON_GROUPED_MAX_ROWS, "dequantizing for bf16 grouped_mm")


def _triton_grouped_calls(op, function_name: str):
    """(run, run_eager) of a Triton grouped kernel on a plain stack: its custom op, and the
    ``triton_int4`` function itself (imported at the first eager call: it imports triton)."""
    def run(x, w, offs):
        return op(x, w.qdata, w.scale, w.zero_point, offs, w.group_size)

    def run_eager(x, w, offs):
        from int4tensor.kernels import triton_int4

        return getattr(triton_int4, function_name)(x, w.qdata, w.scale, w.zero_point, offs,
                                                   w.group_size)
    return run, run_eager


def _cpu_experts_why_not(call: Call) -> str | None:
    """The reference path over the active experts only (eager calls; compiled ones dequantize
    the stack, as the offsets cannot be read while tracing)."""
    if call.device_type != "cpu":
        return f"on {call.device_type}: it reads offs on the host (a synchronization there)"
    return None


def _reference_grouped_preshuffled(x, w, offs):
    return reference.grouped_mm_dense(x, w.dequantize(x.dtype).transpose(-2, -1), offs, None)


_PLAIN_GROUPED_GEMV, _SHUFFLED_GROUPED_GEMV = _grouped_gemv(False), _grouped_gemv(True)

#: aten._grouped_mm, x [T, K] sorted by expert, stored W [E, N, K], offs [E]
PLAIN_GROUPED_MM = [
    Candidate("cuda", _grouped_gemv_refusal(GROUPED_GEMV_MAX_ROWS), *_PLAIN_GROUPED_GEMV[:2],
              bind=_PLAIN_GROUPED_GEMV[2]),
    Candidate("triton_gemv", _triton_grouped_gemv_why_not,
              *_triton_grouped_calls(custom_ops.int4_grouped_gemv_triton, "int4_grouped_gemv")),
    Candidate("triton", _triton_grouped_why_not,
              *_triton_grouped_calls(custom_ops.int4_grouped_mm_triton, "int4_grouped_matmul")),
    # eager CPU calls read offs on the host; traced ones cannot, and dequantize the stack
    Candidate("cpu_experts", _cpu_experts_why_not, reference.grouped_mm,
              reference.grouped_mm_active_experts),
    Candidate("reference", _always, reference.grouped_mm),
]
#: the same on a bf16 preshuffled stack (output [T, Np]), our GEMV at every T: the reference
#: path would unshuffle the stack on every call (3-11x slower than the GEMV at T = 2048,
#: bench_moe_session8.csv, the forced-GEMV column). fbgemm's bf16i4bf16_shuffled_grouped is
#: no candidate: it ignores zero points (symmetric weights only; relative error 0.34 on ours,
#: H200), see docs/kernels.md
PRESHUFFLED_GROUPED_MM = [
    Candidate("cuda", _grouped_gemv_refusal(None), *_SHUFFLED_GROUPED_GEMV[:2],
              bind=_SHUFFLED_GROUPED_GEMV[2]),
    Candidate("reference", _always, _reference_grouped_preshuffled),
]

register("linear", "plain", "bf16", PLAIN_LINEAR)
register("grouped_mm", "plain", "bf16", PLAIN_GROUPED_MM)
register("grouped_mm", "preshuffled", "bf16", PRESHUFFLED_GROUPED_MM)
register("linear", "plain", "fp8", PLAIN_LINEAR_FP8 + PLAIN_LINEAR)
register("bmm", "plain", "bf16", PLAIN_BMM)
register("bmm", "plain", "fp8", PLAIN_BMM)
register("linear", "preshuffled", "bf16", PRESHUFFLED_LINEAR)
register("linear", "preshuffled", "fp8", PRESHUFFLED_LINEAR_FP8)
register("bmm", "preshuffled", "bf16", PRESHUFFLED_BMM)
register("bmm", "preshuffled", "fp8", PRESHUFFLED_BMM_FP8)


# ---- entry points ---------------------------------------------------------------------------
# Each entry point has two paths. Eager (see dispatch.is_eager): the whole call is planned once
# per weight and activation signature (activation transforms, the candidate, its launch) and
# cached on the weight. Traced (torch.compile, fake tensors, autograd): decided on each trace,
# run through the candidates' custom ops.
def _rows_2d(x: torch.Tensor) -> torch.Tensor:
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.is_contiguous() else x2d.contiguous()


def _round_for(x2d: torch.Tensor):
    """The fp8 rounding of activations like ``x2d``, planned once."""
    if cuda_fp8_rows.can_run(x2d):
        return cuda_fp8_rows.bind_round(x2d)
    return quant_primitives.round_fp8_rows


#: whether :func:`_hint_cpu_conversion` has warned in this process
_CPU_HINT_GIVEN = False


def _hint_cpu_conversion(decision, x: torch.Tensor, weight, layout: str) -> None:
    """Warn once per process when a plain weight runs the reference path on a CPU where torch's
    CPU int4 GEMM would take it after conversion: the one slow case a user reaches by simply
    skipping a step. Asked when a plan is made, and only once the weight is planned for a
    second input shape, as in serving (``generate()``: prefill, then decode), not for a
    one-off forward (an accuracy check, calibration)."""
    global _CPU_HINT_GIVEN
    if (_CPU_HINT_GIVEN or plan_count(weight) == 0
            or decision.backend != "reference" or layout != "plain"
            or x.device.type != "cpu" or x.dtype != torch.bfloat16
            or weight.ndim != 2 or weight.activation_dtype != "bf16"
            or cpu.why_not_available() is not None):
        return
    _CPU_HINT_GIVEN = True
    warnings.warn(
        "int4tensor: plain Int4Tensor weights on this CPU run the reference path (dequantize, "
        "then a dense matmul), much slower than bf16; convert_model_to_packed_tensors_(model) "
        "(or convert_to_packed_tensor_based_on_current_hardware(weight)) after loading moves "
        "them to torch's CPU int4 GEMM (Int4CPUTensor). This warning is shown once.",
        UserWarning, stacklevel=2)


def _plan(op: str, x: torch.Tensor, weight, layout: str, out_n: int | None = None):
    """``(Decision, f(x, bias))`` for eager calls like ``x``: ``op`` is ``"linear"`` (``x [*,
    K]``, output ``[*, out_n or N]``) or ``"bmm"`` (``x [B, M, K]``)."""
    pre = weight.act_pre_scale if layout == "plain" else None
    k, lead = x.shape[-1], tuple(x.shape[:-1])
    as_rows = (lambda t: t.view(-1, k)) if op == "linear" else (lambda t: t)
    contiguous = x.is_contiguous() and pre is None
    example = as_rows(x.contiguous())
    decision = decide(describe(op, example, weight), layout)
    _hint_cpu_conversion(decision, example, weight, layout)
    candidate = decision.candidate
    round_rows = None
    if layout == "plain" and weight.activation_dtype == "fp8" and candidate.name != "fbgemm_fp8":
        round_rows = _round_for(example.reshape(-1, k))
    n_kernel = weight.qdata.shape[-2]
    rounds_by_pointer = round_rows is None or cuda_fp8_rows.can_run(example)
    if (op == "linear" and contiguous and rounds_by_pointer and not candidate.takes_bias
            and candidate.bind is not None and out_n in (None, n_kernel)):
        # Our kernels (and our fp8 rounding) read x through its data pointer and row stride
        # only: a contiguous x [*, K] goes in as it is and the output is allocated in its
        # final shape [*, N] (a view of x and a reshape of the output cost 0.6-0.75 us each
        # on the CPU machine, a launch ~1 us).
        kernel = candidate.bind(example, weight, out_shape=(*lead, n_kernel))
        rounded = round_rows

        def direct(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            out = kernel(x if rounded is None else rounded(x))
            if bias is None:
                return out
            return out.add_(bias) if bias.dtype == out.dtype else out + bias
        return decision, direct
    kernel = candidate.bind(example, weight) if candidate.bind else None

    def call(x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if pre is not None:
            x = x * (pre.to(x.dtype) if op == "linear" else pre.to(x.dtype).unsqueeze(-2))
        x = as_rows(x if contiguous else x.contiguous())
        if round_rows is not None:
            x = round_rows(x.reshape(-1, k)).view(x.shape)
        if candidate.takes_bias:
            return candidate(x, weight, True, bias).view(*lead, -1)
        out = kernel(x) if kernel is not None else candidate(x, weight, True)
        if out_n is not None and out.shape[-1] != out_n:
            out = out[..., :out_n]
        out = out.reshape(*lead, out.shape[-1]) if op == "linear" else out
        if bias is None:
            return out
        return out.add_(bias) if bias.dtype == out.dtype and out.is_contiguous() else out + bias
    return decision, call


def _traced(op: str, x: torch.Tensor, weight, layout: str, bias) -> torch.Tensor:
    pre = weight.act_pre_scale if layout == "plain" else None
    if pre is not None:
        x = x * (pre.to(x.dtype) if op == "linear" else pre.to(x.dtype).unsqueeze(-2))
    xk = _rows_2d(x) if op == "linear" else x.contiguous()
    decision = decide(describe(op, xk, weight), layout)
    if layout == "plain" and weight.activation_dtype == "fp8" and \
            decision.backend != "fbgemm_fp8":
        xk = round_fp8_rows(xk.reshape(-1, xk.shape[-1])).reshape(xk.shape)
    if decision.candidate.takes_bias:
        return decision.candidate(xk, weight, False, bias).view(*x.shape[:-1], -1)
    out = decision.candidate(xk, weight, False)
    out = out.reshape(*x.shape[:-1], out.shape[-1]) if op == "linear" else out
    return out + bias if bias is not None else out


def int4_linear(x: torch.Tensor, weight, bias: torch.Tensor | None, check=None) -> torch.Tensor:
    """``x [*, K] @ W.T + bias -> [*, N]`` for an ``Int4Tensor`` ``W [N, K]``.

    An ``act_pre_scale`` is applied to ``x`` first. fp8 activations
    (``W.activation_dtype == "fp8"``): from FP8_ROWWISE_MIN_M rows fbgemm's
    ``f8i4bf16_rowwise`` takes the raw activations (it quantizes them per row and also rounds
    the dequantized weights to fp8: 3.3% from the reference path, measured on an H200);
    otherwise the bf16 table runs on the fp8-rounded activations, as the reference path does.
    ``check(x, weight)`` validates the operands: once per activation signature for eager
    calls, on every traced call.
    """
    if is_eager(x):
        def build():
            if check is not None:
                check(x, weight)
            return _plan("linear", x, weight, "plain")
        return eager_plan("linear", x, weight, build)(x, bias)
    if check is not None:
        check(x, weight)
    return _traced("linear", x, weight, "plain", bias)


def int4_bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]`` for a stored (not transposed) ``W [B, N, K]``."""
    if is_eager(x):
        return eager_plan("bmm", x, weight, lambda: _plan("bmm", x, weight, "plain"))(x, None)
    return _traced("bmm", x, weight, "plain", None)


def int4_grouped_mm(x: torch.Tensor, weight, offs: torch.Tensor) -> torch.Tensor:
    """``out[t] = x[t] @ W[e].T -> [T, N]`` for the rows ``t`` of expert ``e``: bf16 ``x [T,
    K]`` sorted by expert, a stored ``W [E, N, K]`` (plain, or bf16 preshuffled: its padded
    rows cut off), ``offs`` int32 ``[E]`` cumulative row counts (``aten._grouped_mm(x,
    W.transpose(-2, -1), offs)``). The choice depends on T and E only: offs stays on the
    device (CUDA graphs, torch.compile)."""
    layout = _layout(weight)
    n = weight.stored_n if layout == "preshuffled" else None
    if is_eager(x):
        def build():
            decision = decide(describe("grouped_mm", x, weight), layout)
            candidate = decision.candidate
            run = candidate.bind(x, weight) if candidate.bind is not None else \
                (lambda x, offs: candidate(x, weight, True, offs))
            if n is not None and n != weight.qdata.shape[-2]:
                return decision, lambda x, offs: run(x, offs)[:, :n]
            return decision, run
        return eager_plan("grouped_mm", x, weight, build)(x, offs)
    decision = decide(describe("grouped_mm", x, weight), layout)
    out = decision.candidate(x, weight, False, offs)
    return out if n is None else out[:, :n]


def preshuffled_linear(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``x [*, K] @ W.T + bias -> [*, N]`` for a 2D ``Int4PreshuffledTensor`` (the kernels'
    padded rows cut off): bf16 activations run our GEMV up to CUDA_GEMV_MAX_M rows (fbgemm's
    ``bf16i4bf16_shuffled`` takes 1.5-3x its time there), our GEMM from 17 to 32 rows and
    ``bf16i4bf16_shuffled`` above; fp8 activations ``f8i4bf16_shuffled`` after quantizing
    ``x`` per row."""
    n = weight.stored_n
    if is_eager(x):
        return eager_plan("linear", x, weight,
                          lambda: _plan("linear", x, weight, "preshuffled", n))(x, bias)
    out = _traced("linear", x, weight, "preshuffled", None)[..., :n]
    return out + bias if bias is not None else out


def preshuffled_bmm(x: torch.Tensor, weight) -> torch.Tensor:
    """``x [B, M, K] @ W[b].T -> [B, M, N]`` for a 3D ``Int4PreshuffledTensor``, one launch for
    all B (no loop over experts): bf16 activations run our GEMV up to CUDA_GEMV_MAX_M rows per
    entry, our GEMM from 17 to 32, fbgemm's batched kernel above; fp8 activations fbgemm's
    grouped kernel."""
    n = weight.stored_n
    if is_eager(x):
        return eager_plan("bmm", x, weight,
                          lambda: _plan("bmm", x, weight, "preshuffled", n))(x, None)
    return _traced("bmm", x, weight, "preshuffled", None)[..., :n]


def _layout(weight) -> str:
    if hasattr(weight, "scale_and_zero"):
        return "cpu"  # Int4CPUTensor (tables in kernels/cpu.py)
    return "preshuffled" if hasattr(weight, "group_zero") else "plain"


def explain_call(op: str, x: torch.Tensor, weight, **device):
    """The :class:`~int4tensor.kernels.dispatch.Decision` for ``op`` (``"linear"``: ``x [*, K]``;
    ``"bmm"``: ``x [B, M, K]``) on a stored weight, uncached; ``device`` overrides
    ``device_type`` / ``capability`` / ``features`` as in :func:`dispatch.describe`."""
    x = _rows_2d(x) if op == "linear" else x
    return decide(describe(op, x, weight, **device), _layout(weight))


def linear_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`int4_linear` uses for ``x [*, K]``: ``"cuda"`` (our GEMV),
    ``"cuda_gemm"`` (our GEMM), ``"dense"`` (dequantize kernel + cuBLAS), ``"triton"``,
    ``"fbgemm"``, ``"fbgemm_fp8"`` or ``"reference"``."""
    return explain_call("linear", x, weight).backend


def bmm_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`int4_bmm` uses for ``x [B, M, K]``."""
    return explain_call("bmm", x, weight).backend


def preshuffled_backend(x: torch.Tensor, weight) -> str:
    """Name of the backend :func:`preshuffled_linear` (2D ``x``) or :func:`preshuffled_bmm`
    (3D ``x``, 3D weight) uses."""
    return explain_call("bmm" if weight.ndim == 3 else "linear", x, weight).backend


# ---- helpers the tensor classes use ---------------------------------------------------------
dequantize_int4 = reference.dequantize_int4  # one CUDA kernel where it runs, torch ops elsewhere


def quantize_fp8_rows(x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 quantization of bf16 activations ``[M, K]`` -> ``(xq, x_scale [M])``: one
    CUDA kernel where it can run, torch ops elsewhere (the same bits; see
    :func:`int4tensor.quant_primitives.quantize_fp8_rows`)."""
    x2d = x2d.contiguous()
    if cuda_fp8_rows.can_run(x2d):
        if is_eager(x2d):
            return cuda_fp8_rows.quantize_fp8_rows(x2d)
        return custom_ops.fp8_quantize_rows(x2d)
    return quant_primitives.quantize_fp8_rows(x2d)


def round_fp8_rows(x2d: torch.Tensor) -> torch.Tensor:
    """Activations ``[M, K]`` rounded through their per-row fp8 quantization and back."""
    x2d = x2d.contiguous()
    if cuda_fp8_rows.can_run(x2d):
        if is_eager(x2d):
            return cuda_fp8_rows.round_fp8_rows(x2d)
        return custom_ops.fp8_round_rows(x2d)
    return quant_primitives.round_fp8_rows(x2d)
