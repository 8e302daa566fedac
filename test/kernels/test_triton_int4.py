"""The Triton decode kernel against the reference path on random inputs (CUDA only)."""

import pytest
import torch

from int4tensor.kernels import custom_ops, reference
from test.helpers import check_compiled_decode_mlp, quantized_cuda, rel_error, sqnr

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("n, k", [(4096, 4096), (8192, 1024), (200, 384), (96, 640), (4100, 2048)])
@pytest.mark.parametrize("m", [1, 2, 5, 16, 33, 128])
def test_matches_reference(m, n, k):
    from int4tensor.kernels import triton_int4

    w, t = quantized_cuda(n, k)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = triton_int4.int4_matmul(x, t.qdata, t.scale, t.zero_point, 128)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    err = rel_error(reference.linear(x, t, None), out)
    print(f"linear triton vs reference M={m} N={n} K={k}: rel err {err:.2e}")
    assert err < 1e-2
    assert sqnr(x.double() @ w.double().t(), out) > 18


@pytest.mark.parametrize("g", [32, 64, 256])
@pytest.mark.parametrize("domain", ["float", "int", "none"])
def test_group_sizes_and_domains(g, domain):
    from int4tensor.kernels import triton_int4

    _, t = quantized_cuda(512, 1024, g, domain)
    x = torch.randn(3, 1024, dtype=torch.bfloat16, device="cuda")
    out = triton_int4.int4_matmul(x, t.qdata, t.scale, t.zero_point, g)
    assert rel_error(reference.linear(x, t, None), out) < 1e-2


def test_every_output_is_written():
    from int4tensor.kernels import triton_int4

    _, t = quantized_cuda(1000, 2048)
    x = torch.randn(7, 2048, dtype=torch.bfloat16, device="cuda")
    for cfg in (dict(kernel="mma", BLOCK_M=16, BLOCK_N=64, SPLIT_K=1, GROUPS_PER_ITER=1,
                     num_warps=4, num_stages=3),
                dict(kernel="mma", BLOCK_M=16, BLOCK_N=32, SPLIT_K=4, GROUPS_PER_ITER=2,
                     num_warps=4, num_stages=3),
                dict(kernel="gemv", BLOCK_N=64, SPLIT_K=1, GROUPS_PER_ITER=4, num_warps=4,
                     num_stages=3),
                dict(kernel="gemv", BLOCK_N=16, SPLIT_K=4, GROUPS_PER_ITER=1, num_warps=2,
                     num_stages=3)):
        out = triton_int4.int4_matmul(x, t.qdata, t.scale, t.zero_point, 128, cfg)
        assert torch.isfinite(out).all()
        assert rel_error(reference.linear(x, t, None), out) < 1e-2


def test_custom_op_under_compile_and_cuda_graph():
    check_compiled_decode_mlp(custom_ops.int4_matmul_triton)


def test_split_k_is_right_call_after_call_and_in_a_cuda_graph():
    """Split-K partial sums (atomic adds into a zeroed buffer): many calls, shapes and a graph
    replay with new inputs must all agree with the reference path."""
    from int4tensor.kernels import triton_int4

    weights = [quantized_cuda(n, k)[1] for n, k in ((4096, 4096), (1000, 2048), (8192, 1024))]
    for i in range(12):
        t = weights[i % 3]
        x = torch.randn(1, t.shape[1], dtype=torch.bfloat16, device="cuda")
        out = triton_int4.int4_matmul(x, t.qdata, t.scale, t.zero_point, 128)
        assert rel_error(reference.linear(x, t, None), out) < 1e-2
    t = weights[0]
    x = torch.randn(1, 4096, dtype=torch.bfloat16, device="cuda")
    triton_int4.int4_matmul(x, t.qdata, t.scale, t.zero_point, 128)  # compile before capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        triton_int4.int4_matmul(x, t.qdata, t.scale, t.zero_point, 128)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = triton_int4.int4_matmul(x, t.qdata, t.scale, t.zero_point, 128)
    for _ in range(5):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(reference.linear(x, t, None), out) < 1e-2
