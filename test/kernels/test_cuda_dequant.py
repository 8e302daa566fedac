"""The one-kernel int4 -> bf16 dequantization (int4tensor/kernels/cuda_dequant.py): bit for bit
the torch-ops definition in quant_primitives, for 2D and 3D weights, every group size and
zero-point domain; and the large-M linear that runs on it (CUDA only, except the contract
check at the end)."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4Tensor, kernels, quant_primitives
from int4tensor.kernels import cuda_dequant, custom_ops
from test.helpers import sqnr

gpu = pytest.mark.gpu


def assert_same_as_definition(t: Int4Tensor):
    assert cuda_dequant.can_run(t.qdata, t.scale, t.zero_point, torch.bfloat16)
    out = cuda_dequant.dequantize_int4(t.qdata, t.scale, t.zero_point, t.group_size)
    ref = quant_primitives.dequantize_int4(t.qdata, t.scale, t.zero_point, t.group_size,
                                           torch.bfloat16)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16
    assert torch.equal(out, ref)


SHAPES_AND_GROUPS = [(shape, g) for shape in [(256, 512), (200, 384), (3, 96, 1024), (8, 64, 256)]
                     for g in (32, 64, 128, 256) if shape[-1] % g == 0]


@gpu
@pytest.mark.parametrize("shape, g", SHAPES_AND_GROUPS)
@pytest.mark.parametrize("domain", ["float", "int", "none"])
def test_bitwise_equal_to_the_torch_definition(shape, g, domain):
    w = torch.randn(shape, dtype=torch.bfloat16, device="cuda") * 0.05
    assert_same_as_definition(Int4Tensor.from_hp(w, (1,) * (len(shape) - 1) + (g,),
                                                 zero_point_domain=domain))


@gpu
def test_views_and_the_tensor_method():
    w = torch.randn(512, 1024, dtype=torch.bfloat16, device="cuda")
    t = Int4Tensor.from_hp(w, (1, 128))
    rows = t[64:320]  # a row slice: qdata is still contiguous, the scales a strided view
    assert_same_as_definition(rows)
    cols = t[:, 256:768]  # a K slice: qdata not contiguous, so the torch ops run
    assert not cuda_dequant.can_run(cols.qdata, cols.scale, cols.zero_point, torch.bfloat16)
    assert torch.equal(cols.dequantize(), t.dequantize()[:, 256:768])
    assert torch.equal(t.mT.dequantize(), t.dequantize().mT)
    assert torch.equal(t.dequantize(torch.float32),
                       quant_primitives.dequantize_int4(t.qdata, t.scale, t.zero_point, 128,
                                                        torch.float32))


@gpu
def test_large_m_linear_runs_dense_and_compiles():
    w = torch.randn(256, 512, dtype=torch.bfloat16, device="cuda") * 0.02
    t = Int4Tensor.from_hp(w, (1, 128))
    x = torch.randn(kernels.DENSE_MIN_M, 512, dtype=torch.bfloat16, device="cuda")
    assert kernels.linear_backend(x, t) == "dense"
    out = F.linear(x, t)
    assert torch.equal(out, F.linear(x, quant_primitives.dequantize_int4(
        t.qdata, t.scale, t.zero_point, 128, torch.bfloat16)))
    assert sqnr(x.double() @ w.double().t(), out) > 18
    compiled = torch.compile(lambda x: F.linear(x, t), fullgraph=True)
    assert torch.equal(compiled(x), out)
    torch.library.opcheck(custom_ops.dequantize_int4_cuda, (t.qdata, t.scale, t.zero_point, 128),
                          test_utils=("test_schema", "test_faketensor"))


def test_contract_rejects_cpu_and_other_dtypes():
    t = Int4Tensor.from_hp(torch.randn(64, 256, dtype=torch.bfloat16), (1, 128))
    assert not cuda_dequant.can_run(t.qdata, t.scale, t.zero_point, torch.bfloat16)
    x = torch.randn(kernels.DENSE_MIN_M, 256, dtype=torch.bfloat16)
    assert kernels.linear_backend(x, t) == "reference"  # the CPU path in any case
    assert torch.equal(kernels.dequantize_int4(t.qdata, t.scale, t.zero_point, 128, torch.bfloat16),
                       quant_primitives.dequantize_int4(t.qdata, t.scale, t.zero_point, 128,
                                                        torch.bfloat16))
