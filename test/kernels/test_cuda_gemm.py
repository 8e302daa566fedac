"""The mid-M tensor-core GEMM (int4tensor/kernels/cuda_gemm.py) on fbgemm's preshuffled layout
and on the plain one, against the reference path on random inputs, its dispatch on the plain
layout (on the preshuffled one: test_cuda_gemv.py's ladder) and compiled. CUDA (the
preshuffled tests: with fbgemm on sm90+), except the contract and config checks at the end,
which run everywhere."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4PreshuffledTensor, Int4Tensor, kernels
from int4tensor.kernels import cuda_gemm, cuda_gemv, custom_ops, fbgemm, reference
from test.helpers import quantized_cuda, rel_error, sqnr

gpu = pytest.mark.gpu


def preshuffled(n, k, g=128):
    if not fbgemm.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the preshuffled layout needs fbgemm-gpu-genai on an sm90+ GPU")
    w, t = quantized_cuda(n, k, g)
    return w, t, Int4PreshuffledTensor.from_int4_tensor(t)


@gpu
@pytest.mark.parametrize("n, k", [(4096, 4096), (208, 384), (1000, 4224), (8192, 1024)])
@pytest.mark.parametrize("m", [17, 20, 24, 31, 32])
def test_matches_reference(m, n, k):
    """N padded to 16 (1000 -> 1008), K ranges that do not divide the chunks (4224 = 33)."""
    w, t, p = preshuffled(n, k)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = cuda_gemm.int4_gemm(x, p.qdata, p.group_scale, p.group_zero, 128)
    assert out.shape == (m, p.qdata.shape[0]) and out.dtype == torch.bfloat16
    out = out[:, :n]
    err = rel_error(reference.linear(x, t, None), out)
    print(f"cuda gemm vs reference M={m} N={n} K={k}: rel err {err:.2e}")
    assert err < 2e-3  # the weights are dequantized and rounded to bf16 as the reference does
    assert sqnr(x.double() @ w.double().t(), out) > 18


@gpu
@pytest.mark.parametrize("cfg", [dict(U=1, BLOCK_CHUNKS=2), dict(U=2, BLOCK_CHUNKS=3, MIN_BLOCKS=1),
                                 dict(U=1, BLOCK_CHUNKS=8, PREFETCH=False),
                                 dict(U=2, BLOCK_CHUNKS=12, MIN_BLOCKS=1)])
@pytest.mark.parametrize("g", [128, 256])
def test_every_launch_config_and_group_size(cfg, g):
    """Blocks past N (1008 rows: 4 blocks of 256), a last block of fewer chunks, chunks left
    after the U-chunk steps, with and without the register prefetch; G = 256 (two chunks a
    group); M up to the kernel's 64 rows."""
    _, t, p = preshuffled(1008, 2304, g)
    for m in (17, 32, 40, 64):
        x = torch.randn(m, 2304, dtype=torch.bfloat16, device="cuda")
        out = cuda_gemm.int4_gemm(x, p.qdata, p.group_scale, p.group_zero, g, cfg)
        assert torch.isfinite(out).all()
        assert rel_error(reference.linear(x, t, None), out[:, :1008]) < 2e-3


@gpu
@pytest.mark.parametrize("n, k", [(4096, 4096), (200, 384), (1000, 4224)])
@pytest.mark.parametrize("m", [17, 24, 32])
@pytest.mark.parametrize("g", [128, 256])
def test_plain_layout_matches_reference(m, n, k, g):
    """The same GEMM on the plain Int4Tensor layout (any N; activations permuted per lane and
    swizzled in shared memory)."""
    if k % g:
        pytest.skip("K must be a multiple of G")
    w, t = quantized_cuda(n, k, g)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = cuda_gemm.int4_gemm(x, t.qdata, t.scale, t.zero_point, g, shuffled=False)
    assert out.shape == (m, n)
    assert rel_error(reference.linear(x, t, None), out) < 2e-3
    assert sqnr(x.double() @ w.double().t(), out) > 18
    for cfg in (dict(U=2, BLOCK_CHUNKS=3, MIN_BLOCKS=1), dict(U=1, BLOCK_CHUNKS=2, PREFETCH=False)):
        again = cuda_gemm.int4_gemm(x, t.qdata, t.scale, t.zero_point, g, cfg, shuffled=False)
        assert rel_error(reference.linear(x, t, None), again) < 2e-3


@gpu
@pytest.mark.parametrize("m, backend", [(16, "cuda"), (17, "cuda_gemm"), (32, "cuda_gemm")])
def test_plain_dispatch_from_17_to_32_rows(m, backend):
    """F.linear on an Int4Tensor: rows counted over x's leading dims; the custom op has an
    autograd formula for the activation like the other plain-layout ops."""
    _, t = quantized_cuda(512, 1024)
    x = torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda")
    assert kernels.linear_backend(x, t) == backend
    two = kernels.linear_backend(x.expand(2, m, 1024), t)  # 2M rows
    assert (two == "cuda_gemm") == (2 * m <= 32)
    assert rel_error(reference.linear(x, t, None), F.linear(x, t)) < 1e-2
    if backend == "cuda_gemm":
        assert torch.library.opcheck(custom_ops.int4_gemm_cuda,
                                     (x, t.qdata, t.scale, t.zero_point, 128)) is not None


@gpu
@pytest.mark.parametrize("shuffled", [False, True])
@pytest.mark.parametrize("e, m, n, k", [(8, 17, 1024, 2048), (4, 32, 512, 1024), (3, 24, 208, 384)])
def test_batched_weights_in_one_launch(shuffled, e, m, n, k):
    """3D weights (MoE experts, torch.bmm): one launch with a grid z per expert gives each
    expert what a 2D call with the same launch config gives, up to the order in which the K
    ranges' fp32 sums land (atomic additions: not bit-reproducible); bmm dispatches to it."""
    w = torch.randn(e, n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    t = Int4Tensor.from_hp(w, (1, 1, 128))
    if shuffled:
        if not fbgemm.is_available() or torch.cuda.get_device_capability() < (9, 0):
            pytest.skip("the preshuffled layout needs fbgemm-gpu-genai on an sm90+ GPU")
        p = Int4PreshuffledTensor.from_int4_tensor(t)
        fields, weight = (p.qdata, p.group_scale, p.group_zero), p
    else:
        fields, weight = (t.qdata, t.scale, t.zero_point), t
    x = torch.randn(e, m + 5, k, dtype=torch.bfloat16, device="cuda")[:, 5:]
    cfg = cuda_gemm.pick_config(m, e * fields[0].shape[-2], k, 132)
    out = cuda_gemm.int4_gemm(x, *fields, 128, cfg, shuffled=shuffled)
    assert out.shape == (e, m, fields[0].shape[-2])
    for b in range(e):
        one = cuda_gemm.int4_gemm(x[b], *(f[b] for f in fields), 128, cfg, shuffled=shuffled)
        assert rel_error(one, out[b]) < 1e-3, b
    assert rel_error(reference.bmm(x, t), out[..., :n]) < 2e-3
    if shuffled:
        assert kernels.preshuffled_backend(x, weight) == "cuda_gemm"
    else:
        assert kernels.bmm_backend(x, weight) == "cuda_gemm"
    assert rel_error(reference.bmm(x, t), torch.bmm(x, weight.mT)) < 2e-3


@gpu
def test_custom_op_and_compiled_linear():
    _, t, p = preshuffled(512, 1024)
    x = torch.randn(24, 1024, dtype=torch.bfloat16, device="cuda")
    assert torch.library.opcheck(custom_ops.int4_gemm_cuda_preshuffled,
                                 (x, p.qdata, p.group_scale, p.group_zero, 128)) is not None
    fn = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True)
    assert rel_error(F.linear(x, p), fn(x, p)) < 1e-3


@gpu
@pytest.mark.parametrize("lead,backend", [((4, 6), "cuda_gemm"), ((1, 1), "cuda"),
                                          ((2, 3), "cuda")])
@pytest.mark.parametrize("activations", ["bf16", "fp8"])
def test_three_dim_input_and_bias_through_linear(lead, backend, activations):
    """Eager F.linear hands a contiguous x [*, K] to the kernel (and to the fp8 rounding) as it
    is and gets the output in its final shape: repeated calls, with and without bias, equal
    the reference (GEMM and GEMV, transformers' [batch, seq, K] activations)."""
    from int4tensor import quant_primitives

    _, t = quantized_cuda(1000, 1024, 128)
    if activations == "fp8":
        t = Int4Tensor(t.qdata, t.scale, t.zero_point, t.block_size, t.shape,
                       activation_dtype="fp8")
    bias = torch.randn(1000, dtype=torch.bfloat16, device="cuda")
    for _ in range(2):
        x = torch.randn(*lead, 1024, dtype=torch.bfloat16, device="cuda")
        assert kernels.linear_backend(x.view(-1, 1024), t) == backend
        out = F.linear(x, t, bias)
        assert out.shape == (*lead, 1000)
        xr = x if activations == "bf16" else \
            quant_primitives.round_fp8_rows(x.view(-1, 1024)).view(x.shape)
        # (bf16 outputs rounded apart: ~2.5e-3 from the reference path, a wrong row ~1)
        assert rel_error(reference.linear(xr, t, bias), out) < 5e-3
        assert rel_error(reference.linear(xr, t, None), F.linear(x, t)) < 5e-3


@gpu
@pytest.mark.parametrize("preshuffled", [False, True])
def test_compiled_with_cuda_graphs_at_gemm_rows(preshuffled):
    """transformers' static-cache decode at batch 17-32 (torch.compile, reduce-overhead): the
    custom op runs inside CUDA graphs' warm-up and recording, in their memory pool; a tensor it
    kept (a cached allocation template) made the warm-up fail ("tensors in the cudagraph pool
    not tracked as outputs")."""
    from test.helpers import check_compiled_decode_mlp

    op = custom_ops.int4_gemm_cuda_preshuffled if preshuffled else custom_ops.int4_gemm_cuda
    check_compiled_decode_mlp(op, rows=32, preshuffled=preshuffled)


@gpu
def test_eager_calls_on_two_streams_and_a_graph_between_them():
    """Bound eager calls add into a zeroed buffer kept per stream, which the cast leaves
    zeroed: calls on two streams, then a graph captured on a stream that has run eager calls
    (it takes a buffer of its own), replayed between more eager calls, all equal the
    reference."""
    _, t = quantized_cuda(1000, 1024, 128)
    x = torch.randn(24, 1024, dtype=torch.bfloat16, device="cuda")
    gemm = cuda_gemm.bind(x, t.qdata, t.scale, t.zero_point, 128, shuffled=False)
    side = torch.cuda.Stream()
    for _ in range(2):
        assert rel_error(reference.linear(x, t, None), gemm(x)) < 2e-3
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            on_side = gemm(x)
        torch.cuda.current_stream().wait_stream(side)
        assert rel_error(reference.linear(x, t, None), on_side) < 2e-3
    graph_x = torch.randn_like(x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side):  # eager calls ran on it: the capture must not take its buffer
        gemm(graph_x)
        torch.cuda.synchronize()
        with torch.cuda.graph(graph, stream=side):
            graph_out = gemm(graph_x)
    for _ in range(3):
        graph_x.copy_(torch.randn_like(x))
        graph.replay()
        eager_x = torch.randn_like(x)
        with torch.cuda.stream(side):
            side_out = gemm(eager_x)
        torch.cuda.current_stream().wait_stream(side)
        assert rel_error(reference.linear(graph_x, t, None), graph_out) < 2e-3
        assert rel_error(reference.linear(eager_x, t, None), side_out) < 2e-3


@gpu
def test_cuda_graph_replays_zero_the_sums_and_cast_each_time():
    """The zero-fill (a driver memset) and the cast (our kernel) are captured with the GEMM:
    each replay gives the result of its own inputs, not sums piled on the last ones."""
    _, t = quantized_cuda(1000, 1024, 128)
    x = torch.randn(24, 1024, dtype=torch.bfloat16, device="cuda")
    gemm = cuda_gemm.bind(x, t.qdata, t.scale, t.zero_point, 128, shuffled=False)
    gemm(x)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = gemm(x)
    for _ in range(3):
        x.copy_(torch.randn_like(x))
        graph.replay()
        assert rel_error(reference.linear(x, t, None), out) < 2e-3


def test_an_output_shape_must_hold_the_kernels_output():
    assert cuda_gemv._checked_out_shape(None, (6, 10)) == (6, 10)
    assert cuda_gemv._checked_out_shape((2, 3, 10), (6, 10)) == (2, 3, 10)
    for wrong in ((2, 2, 10), (6, 5, 2)):
        with pytest.raises(ValueError, match="does not hold"):
            cuda_gemv._checked_out_shape(wrong, (6, 10))


def test_contract_rejects_cpu_and_out_of_range_inputs_without_compiling():
    """Runs everywhere: the contract check never touches a GPU or compiles anything."""
    t = Int4Tensor.from_hp(torch.randn(64, 256, dtype=torch.bfloat16), (1, 128))
    for m in (16, 24, 33):
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert not cuda_gemm.can_run(x, t.qdata, t.scale, t.zero_point, 128)
        assert not cuda_gemm.can_run(x, t.qdata, t.scale, t.zero_point, 128, shuffled=False)
    assert kernels.linear_backend(torch.randn(24, 256, dtype=torch.bfloat16), t) == "reference"
    assert cuda_gemm._compiled.cache_info().currsize == 0
    with pytest.raises(ValueError, match="1 to 64 activation rows, got 65"):
        cuda_gemm.int4_gemm(torch.randn(65, 256, dtype=torch.bfloat16), t.qdata, t.scale,
                            t.zero_point, 128)


@pytest.mark.parametrize("n, k", [(8192, 8192), (6144, 4096), (4096, 4096), (4096, 14336),
                                  (96, 640), (28672, 128)])
@pytest.mark.parametrize("m", [17, 24, 32])
def test_launch_config_fits_shared_memory_and_fills_the_gpu(m, n, k):
    """Runs everywhere: the activation copy fits the shared memory, and K chunks per block
    halve (8, 4, 2) until the grid gives 1.25 blocks per multiprocessor."""
    cfg = cuda_gemm.pick_config(m, n, k, 132)
    chunks = k // cuda_gemm.CHUNK
    block_chunks = min(cfg["BLOCK_CHUNKS"], chunks)
    assert cuda_gemm._smem_bytes(-(-m // 8), block_chunks) * cfg["MIN_BLOCKS"] <= 227 * 1024
    blocks = lambda bc: -(-n // cuda_gemm.BLOCK_N) * -(-chunks // bc)  # noqa: E731
    assert cfg["BLOCK_CHUNKS"] in (2, 4, 8)
    assert cfg["BLOCK_CHUNKS"] == 2 or blocks(cfg["BLOCK_CHUNKS"]) >= 1.25 * 132
    assert cfg["BLOCK_CHUNKS"] == 8 or blocks(2 * cfg["BLOCK_CHUNKS"]) < 1.25 * 132
