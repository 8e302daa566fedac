"""The one-kernel fp8 row quantization of activations (int4tensor/kernels/cuda_fp8_rows.py):
bit for bit the torch-ops definition in quant_primitives, on random and edge-case rows, under
CUDA graphs and torch.compile (CUDA only, except the contract check at the end)."""

import pytest
import torch

from int4tensor import Float8DynamicActivationInt4WeightConfig, kernels, quant_primitives, quantize_
from int4tensor.kernels import cuda_fp8_rows, custom_ops

gpu = pytest.mark.gpu


def assert_same_quantization(x):
    xq, scale = cuda_fp8_rows.quantize_fp8_rows(x)
    ref_q, ref_scale = quant_primitives.quantize_fp8_rows(x)
    assert xq.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert torch.equal(scale, ref_scale)
    assert torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(cuda_fp8_rows.round_fp8_rows(x), quant_primitives.round_fp8_rows(x))


@gpu
@pytest.mark.parametrize("m, k", [(1, 4096), (1, 14336), (5, 1600), (128, 8), (1024, 4096),
                                  (3000, 512)])
def test_bitwise_equal_to_the_torch_definition(m, k):
    torch.manual_seed(m + k)
    x = (torch.randn(m, k, device="cuda") * torch.logspace(-3, 3, m, device="cuda")[:, None])
    assert_same_quantization(x.to(torch.bfloat16))


@gpu
def test_edge_rows():
    x = torch.randn(6, 1024, device="cuda", dtype=torch.bfloat16)
    x[0] = 0  # all zero: scale 1e-12 / 448, values 0
    x[1, 7] = 3.0e38  # one huge value (bf16 max range)
    x[2] = 1e-30  # tiny, below the 1e-12 floor of the scale
    x[3, ::2] = -x[3, 1::2]  # ties of magnitude
    x[4] = float("inf")
    assert_same_quantization(x[:4].contiguous())
    xq, scale = cuda_fp8_rows.quantize_fp8_rows(x)
    assert torch.isnan(xq[4].float()).all() or torch.isinf(scale[4])  # inf / inf, as in torch
    x[5, 100] = float("nan")
    xq, scale = cuda_fp8_rows.quantize_fp8_rows(x)
    assert torch.isnan(scale[5]) and torch.isnan(xq[5].float()).all()
    assert torch.isnan(cuda_fp8_rows.round_fp8_rows(x)[5]).all()
    assert not torch.isnan(xq[:4].float()).any()


@gpu
def test_dispatch_uses_it_and_handles_views():
    x = torch.randn(8, 3000, device="cuda", dtype=torch.bfloat16)
    view = x[:, 4:2052]  # rows not 16-byte aligned: the dispatcher copies first
    assert not cuda_fp8_rows.can_run(view)
    xq, scale = kernels.quantize_fp8_rows(view)
    ref_q, ref_scale = quant_primitives.quantize_fp8_rows(view)
    assert torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8))
    assert torch.equal(scale, ref_scale)
    odd = torch.randn(2, 100, device="cuda", dtype=torch.bfloat16)  # K % 8 != 0: torch ops
    assert not cuda_fp8_rows.can_run(odd)
    assert torch.equal(kernels.round_fp8_rows(odd), quant_primitives.round_fp8_rows(odd))


@gpu
def test_in_a_cuda_graph_and_in_a_compiled_model():
    x = torch.randn(4, 2048, device="cuda", dtype=torch.bfloat16)
    kernels.round_fp8_rows(x)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kernels.round_fp8_rows(x)
    x.mul_(3)
    graph.replay()
    assert torch.equal(out, quant_primitives.round_fp8_rows(x))
    # an fp8-activation layer compiled whole: the kernel stays one custom op in the graph
    model = torch.nn.Linear(2048, 512, dtype=torch.bfloat16, device="cuda")
    quantize_(model, Float8DynamicActivationInt4WeightConfig(int4_packing_format="plain"))
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert torch.equal(eager, compiled)
    torch.library.opcheck(custom_ops.fp8_quantize_rows, (x,),
                          test_utils=("test_schema", "test_faketensor"))
    torch.library.opcheck(custom_ops.fp8_round_rows, (x,),
                          test_utils=("test_schema", "test_faketensor"))


def test_contract_rejects_cpu_and_unsupported_inputs():
    """Runs everywhere: CPU tensors never reach the kernel, and the dispatcher's torch path is
    the definition itself."""
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    assert not cuda_fp8_rows.can_run(x)
    xq, scale = kernels.quantize_fp8_rows(x)
    ref_q, ref_scale = quant_primitives.quantize_fp8_rows(x)
    assert torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(scale, ref_scale)
    # the definition: each row's largest magnitude maps to ±448, and rounding error is small
    assert torch.equal(xq.float().abs().amax(-1), torch.full((3,), 448.0))
    back = quant_primitives.round_fp8_rows(x)
    assert float((back.float() - x.float()).norm() / x.float().norm()) < 0.05
