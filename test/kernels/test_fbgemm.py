"""fbgemm backend on a Hopper GPU: same quantization bits, same results as the reference path."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4Tensor, Int4WeightOnlyConfig, kernels, quantize_
from int4tensor.kernels import fbgemm, reference
from test.helpers import rel_error, sqnr

pytestmark = pytest.mark.gpu


def needs_fbgemm_hopper():
    if not fbgemm.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("needs fbgemm-gpu-genai on an sm90+ GPU")


@pytest.mark.parametrize("shape", [(256, 512), (1000, 4096), (3, 128, 256)])
def test_quantization_is_bit_identical_to_fbgemm(shape):
    needs_fbgemm_hopper()
    from fbgemm_gpu.experimental.gen_ai.quantize import int4_row_quantize_zp, pack_int4

    w = torch.randn(shape, dtype=torch.bfloat16, device="cuda")
    t = Int4Tensor.from_hp(w, (1,) * (len(shape) - 1) + (128,))
    w2d = w.reshape(-1, shape[-1])
    q, scale, zero = int4_row_quantize_zp(w2d, 128)
    assert torch.equal(t.qdata.reshape(-1, shape[-1] // 2), pack_int4(q))
    if len(shape) == 2:  # fbgemm returns [K/G, rows] for a 2D input
        assert torch.equal(t.scale, scale.to(torch.bfloat16))
        assert torch.equal(t.zero_point, zero.to(torch.bfloat16))


@pytest.mark.parametrize("n, k", [(256, 512), (4096, 4096), (1024, 8192), (200, 384), (96, 640)])
@pytest.mark.parametrize("m", [1, 3, 16, 128, 1000])
def test_linear_fbgemm_matches_reference(m, n, k):
    needs_fbgemm_hopper()
    w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    t = Int4Tensor.from_hp(w, (1, 128))
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = fbgemm.linear(x, t, None)
    ref = reference.linear(x, t, None)
    assert out.shape == (m, n)
    print(f"linear fbgemm vs reference M={m} N={n} K={k}: rel err {rel_error(ref, out):.2e}")
    assert rel_error(ref, out) < 1e-2
    assert sqnr(x.double() @ w.double().t(), out) > 18


def test_linear_fbgemm_leading_dims_and_bias():
    needs_fbgemm_hopper()
    w = torch.randn(512, 1024, dtype=torch.bfloat16, device="cuda")
    t = Int4Tensor.from_hp(w, (1, 128))
    x = torch.randn(2, 5, 1024, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(512, dtype=torch.bfloat16, device="cuda")
    out = fbgemm.linear(x, t, bias)
    assert out.shape == (2, 5, 512)
    assert rel_error(reference.linear(x, t, bias), out) < 1e-2


@pytest.mark.parametrize("m, backend", [(1, "cuda"), (8, "cuda"), (9, "cuda"),
                                        (16, "cuda"), (17, "cuda_gemm"), (32, "cuda_gemm"),
                                        (33, "fbgemm"), (512, "fbgemm"), (4096, "dense")])
def test_dispatch_by_batch_size(m, backend):
    needs_fbgemm_hopper()
    t = Int4Tensor.from_hp(torch.randn(256, 512, dtype=torch.bfloat16, device="cuda"), (1, 128))
    x = torch.randn(m, 512, dtype=torch.bfloat16, device="cuda")
    assert kernels.linear_backend(x, t) == backend
    assert rel_error(reference.linear(x, t, None), F.linear(x, t)) < 1e-2


def test_g32_uses_triton_up_to_16_rows_then_reference():
    t = Int4Tensor.from_hp(torch.randn(256, 512, dtype=torch.bfloat16, device="cuda"), (1, 32))
    for m, backend in ((1, "triton"), (16, "triton"), (17, "reference")):
        x = torch.randn(m, 512, dtype=torch.bfloat16, device="cuda")
        assert kernels.linear_backend(x, t) == backend
        assert rel_error(reference.linear(x, t, None), F.linear(x, t)) < 1e-2


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes_use_reference_on_cuda(dtype):
    w = torch.randn(256, 512, dtype=dtype, device="cuda")
    t = Int4Tensor.from_hp(w, (1, 128))
    x = torch.randn(4, 512, dtype=dtype, device="cuda")
    assert kernels.linear_backend(x, t) == "reference"
    assert sqnr(x.double() @ w.double().t(), F.linear(x, t)) > 18


def test_quantized_model_on_cuda_eager_and_compiled():
    model = torch.nn.Sequential(
        torch.nn.Linear(1024, 2048), torch.nn.SiLU(), torch.nn.Linear(2048, 1024)
    ).to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(8, 1024, dtype=torch.bfloat16, device="cuda")
    ref = model(x)
    quantize_(model, Int4WeightOnlyConfig())
    eager = model(x)
    assert sqnr(ref, eager) > 18
    compiled = torch.compile(model, fullgraph=True)(x)
    assert rel_error(eager, compiled) < 1e-2


def test_move_cpu_model_to_cuda():
    model = torch.nn.Linear(512, 256, dtype=torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig())
    x = torch.randn(4, 512, dtype=torch.bfloat16)
    cpu_out = model(x)
    model.to("cuda")
    assert model.weight.qdata.is_cuda and isinstance(model.weight, Int4Tensor)
    assert rel_error(cpu_out, model(x.cuda()).cpu()) < 1e-2


@pytest.mark.parametrize("e, m, n, k", [(8, 1, 1024, 2048), (4, 16, 512, 1024), (8, 64, 256, 4096),
                                        (3, 5, 200, 384)])
def test_bmm_batched_kernel_matches_reference(e, m, n, k):
    needs_fbgemm_hopper()
    w = torch.randn(e, n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    t = Int4Tensor.from_hp(w, (1, 1, 128))
    x = torch.randn(e, m, k, dtype=torch.bfloat16, device="cuda")
    # dispatch runs our GEMV up to 16 rows per expert; the fbgemm kernel is called directly
    assert kernels.bmm_backend(x, t) == ("cuda" if m <= 16 else "fbgemm")
    out = fbgemm.bmm(x, t)
    err = rel_error(reference.bmm(x, t), out)
    print(f"bmm fbgemm vs reference E={e} M={m} N={n} K={k}: rel err {err:.2e}")
    assert err < 1e-2
    assert sqnr(torch.bmm(x.double(), w.double().mT), out) > 18


def test_moe_model_quantized_by_name_on_gpu():
    needs_fbgemm_hopper()
    w_in = torch.randn(4, 512, 1024, dtype=torch.bfloat16, device="cuda") * 0.05
    module = torch.nn.Module()
    module.w_in = torch.nn.Parameter(w_in.clone())
    x = torch.randn(4, 7, 512, dtype=torch.bfloat16, device="cuda")
    ref = torch.bmm(x, w_in)
    quantize_(module, {"w_in": Int4WeightOnlyConfig(k_dim=-2)})
    assert sqnr(ref, torch.bmm(x, module.w_in)) > 18
