"""The tensor-core decode GEMV (int4tensor/kernels/cuda_gemv.py) against the reference path on
random inputs, its dispatch, and its use under CUDA graphs and torch.compile (CUDA only,
except the contract checks at the end)."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4PreshuffledTensor, Int4Tensor, kernels
from int4tensor.kernels import cuda_gemv, custom_ops, fbgemm, reference
from test.helpers import check_compiled_decode_mlp, quantized_cuda, rel_error, sqnr

gpu = pytest.mark.gpu


@gpu
@pytest.mark.parametrize("n, k", [(4096, 4096), (8192, 1024), (200, 384), (96, 640),
                                  (1000, 4224), (28672, 256)])
@pytest.mark.parametrize("m", [1, 2, 3, 8, 9, 16])
def test_matches_reference(m, n, k):
    w, t = quantized_cuda(n, k)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, 128)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    err = rel_error(reference.linear(x, t, None), out)
    print(f"cuda gemv vs reference M={m} N={n} K={k}: rel err {err:.2e}")
    assert err < 1e-2
    assert sqnr(x.double() @ w.double().t(), out) > 18


@gpu
@pytest.mark.parametrize("g", [128, 256])
@pytest.mark.parametrize("domain", ["float", "int", "none"])
def test_group_sizes_and_zero_point_domains(g, domain):
    _, t = quantized_cuda(512, 2048, g, domain)
    x = torch.randn(3, 2048, dtype=torch.bfloat16, device="cuda")
    out = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, g)
    assert rel_error(reference.linear(x, t, None), out) < 1e-2


@gpu
@pytest.mark.parametrize("cfg", [dict(WARPS_N=1, U=2, SLICES=8), dict(WARPS_N=8, U=8, SLICES=1),
                                 dict(WARPS_N=2, U=4, SLICES=4), dict(WARPS_N=4, U=2, SLICES=2),
                                 dict(WARPS_N=2, U=2, SLICES=4, MIN_BLOCKS=2),
                                 dict(WARPS_N=1, U=8, SLICES=8, MIN_BLOCKS=2),
                                 dict(WARPS_N=2, U=2, SLICES=4, R=2),
                                 dict(WARPS_N=1, U=1, SLICES=8, R=2, MIN_BLOCKS=2),
                                 dict(WARPS_N=4, U=3, SLICES=2, R=2)])
@pytest.mark.parametrize("n", [1000, 1008])
def test_every_launch_config_writes_every_output(cfg, n):
    """K slices that get no chunk, chunks left after the U-chunk steps, rows, tiles and warps
    past N, two row tiles per warp (R = 2): all outputs right."""
    _, t = quantized_cuda(n, 1152)
    for m in (1, 7, 16):
        x = torch.randn(m, 1152, dtype=torch.bfloat16, device="cuda")
        out = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, 128, cfg)
        assert torch.isfinite(out).all()
        assert rel_error(reference.linear(x, t, None), out) < 1e-2


@gpu
def test_large_and_tiny_activations_stay_accurate():
    """Activation sums are factored out per chunk: rows of very different scale, and a row of
    zeros, must each be right on their own."""
    _, t = quantized_cuda(512, 4096)
    x = torch.randn(4, 4096, dtype=torch.bfloat16, device="cuda")
    x[0] *= 1e3
    x[1] *= 1e-3
    x[2] = 0
    out = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, 128)
    ref = reference.linear(x, t, None)
    for row in (0, 1, 3):
        assert rel_error(ref[row], out[row]) < 1e-2
    assert out[2].abs().max() == 0


@gpu
@pytest.mark.parametrize("m, backend", [(1, "cuda"), (8, "cuda"), (16, "cuda"), (17, None)])
def test_dispatch_takes_it_for_decode_sizes(m, backend):
    _, t = quantized_cuda(256, 512)
    x = torch.randn(m, 512, dtype=torch.bfloat16, device="cuda")
    if backend is None:
        assert kernels.linear_backend(x, t) != "cuda"
    else:
        assert kernels.linear_backend(x, t) == backend
    assert rel_error(reference.linear(x, t, None), F.linear(x, t)) < 1e-2


@gpu
def test_dispatch_skips_it_where_the_contract_fails():
    _, t64 = quantized_cuda(256, 512, g=64)  # a chunk of 128 would straddle two groups
    x = torch.randn(1, 512, dtype=torch.bfloat16, device="cuda")
    assert kernels.linear_backend(x, t64) != "cuda"
    _, t = quantized_cuda(256, 512)
    assert kernels.linear_backend(x.half(), t) != "cuda"
    x_offset = torch.randn(1, 520, dtype=torch.bfloat16, device="cuda")[:, 8:]  # 16-byte aligned
    assert kernels.linear_backend(x_offset, t) == "cuda"
    x_odd = torch.randn(1, 513, dtype=torch.bfloat16, device="cuda")[:, 1:]  # not aligned
    assert kernels.linear_backend(x_odd, t) != "cuda"
    assert rel_error(reference.linear(x_odd, t, None), F.linear(x_odd, t)) < 1e-2


@gpu
def test_three_dim_input_and_bias_through_linear():
    w, t = quantized_cuda(384, 1024)
    x = torch.randn(2, 3, 1024, dtype=torch.bfloat16, device="cuda")
    bias = torch.randn(384, dtype=torch.bfloat16, device="cuda")
    out = F.linear(x, t, bias)
    assert out.shape == (2, 3, 384)
    assert rel_error(reference.linear(x, t, bias), out) < 1e-2


@gpu
def test_in_a_cuda_graph_and_compiled():
    weights = [quantized_cuda(n, k)[1] for n, k in ((4096, 4096), (1000, 2048))]
    t = weights[0]
    x = torch.randn(2, 4096, dtype=torch.bfloat16, device="cuda")
    cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, 128)  # compile before capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, 128)
    for _ in range(4):
        x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(reference.linear(x, t, None), out) < 1e-2

    check_compiled_decode_mlp(custom_ops.int4_gemv_cuda)


@gpu
@pytest.mark.parametrize("e, m, n, k", [(8, 1, 1024, 2048), (4, 16, 512, 1024), (3, 5, 200, 384),
                                        (64, 3, 256, 512), (2, 9, 4096, 4096)])
def test_batched_weights_in_one_launch(e, m, n, k):
    """3D weights (experts, ``torch.bmm``): one launch with a grid row per batch entry gives
    each entry exactly what a 2D call with the same launch config gives, for activations with
    a batch stride other than M * K too."""
    w = torch.randn(e, n, k, dtype=torch.bfloat16, device="cuda") * 0.02
    t = Int4Tensor.from_hp(w, (1, 1, 128))
    x = torch.randn(e, m + 3, k, dtype=torch.bfloat16, device="cuda")[:, 3:]
    cfg = cuda_gemv.pick_config(m, e * n, k, torch.cuda.get_device_properties(0).multi_processor_count)
    out = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, 128, cfg)
    assert out.shape == (e, m, n)
    for b in range(e):
        one = cuda_gemv.int4_gemv(x[b], t.qdata[b], t.scale[b], t.zero_point[b], 128, cfg)
        assert torch.equal(one, out[b]), b
    assert rel_error(reference.bmm(x, t), out) < 1e-2
    assert sqnr(torch.bmm(x.double(), w.double().mT), out) > 18


@gpu
@pytest.mark.parametrize("m, backend", [(1, "cuda"), (16, "cuda"), (17, None)])
def test_bmm_dispatch_takes_it_for_decode_sizes(m, backend):
    w = torch.randn(4, 512, 1024, dtype=torch.bfloat16, device="cuda") * 0.02
    t = Int4Tensor.from_hp(w, (1, 1, 128))
    x = torch.randn(4, m, 1024, dtype=torch.bfloat16, device="cuda")
    got = kernels.bmm_backend(x, t)
    assert got == backend if backend else got != "cuda"
    out = torch.bmm(x, t.mT)
    assert out.shape == (4, m, 512)
    assert rel_error(reference.bmm(x, t), out) < 1e-2
    assert torch.library.opcheck(custom_ops.int4_gemv_cuda,
                                 (x[:, :1], t.qdata, t.scale, t.zero_point, 128)) is not None


def preshuffled(n, k, g=128):
    """A weight in the plain layout and in fbgemm's bf16 preshuffled one (needs fbgemm on an
    sm90+ GPU, like every preshuffled test)."""
    if not fbgemm.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the preshuffled layout needs fbgemm-gpu-genai on an sm90+ GPU")
    w, t = quantized_cuda(n, k, g)
    return w, t, Int4PreshuffledTensor.from_int4_tensor(t)


@gpu
@pytest.mark.parametrize("n, k", [(4096, 4096), (200, 384), (96, 640), (1024, 4224), (28672, 256)])
@pytest.mark.parametrize("m", [1, 3, 8, 9, 16])
def test_reads_fbgemms_preshuffled_layout(m, n, k):
    """The same GEMV on fbgemm's bf16 preshuffled layout (rows padded to 16): right against
    the reference path, and the plain-layout GEMV's result up to fp32 summation order."""
    w, t, p = preshuffled(n, k)
    x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
    out = cuda_gemv.int4_gemv(x, p.qdata, p.group_scale, p.group_zero, 128, shuffled=True)
    assert out.shape == (m, p.qdata.shape[0])
    out = out[:, :n]
    assert rel_error(reference.linear(x, t, None), out) < 1e-2
    assert sqnr(x.double() @ w.double().t(), out) > 18
    plain = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, 128)
    assert rel_error(plain, out) < 5e-3


@gpu
@pytest.mark.parametrize("cfg", [dict(WARPS_N=1, U=8, SLICES=8, MIN_BLOCKS=2),
                                 dict(WARPS_N=2, U=2, SLICES=4, R=2),
                                 dict(WARPS_N=4, U=3, SLICES=2, R=2),
                                 dict(WARPS_N=8, U=4, SLICES=1)])
@pytest.mark.parametrize("g", [128, 256])
def test_preshuffled_layout_with_every_launch_config(cfg, g):
    """Tiles past N (1008 = 63 tiles of 16), K slices without chunks, two tiles per warp, G =
    256: every output right."""
    _, t, p = preshuffled(1008, 1280, g)
    for m in (1, 7, 16):
        x = torch.randn(m, 1280, dtype=torch.bfloat16, device="cuda")
        out = cuda_gemv.int4_gemv(x, p.qdata, p.group_scale, p.group_zero, g, cfg, shuffled=True)
        assert torch.isfinite(out).all()
        assert rel_error(reference.linear(x, t, None), out) < 1e-2


@gpu
@pytest.mark.parametrize("m", [1, 7, 16])
def test_reads_batched_preshuffled_experts(m):
    """3D preshuffled weights (each expert shuffled on its own, N padded to 16): the batched
    GEMV matches the plain layout's and the reference path; torch.bmm dispatches to it."""
    if not fbgemm.is_available() or torch.cuda.get_device_capability() < (9, 0):
        pytest.skip("the preshuffled layout needs fbgemm-gpu-genai on an sm90+ GPU")
    w = torch.randn(6, 200, 1024, dtype=torch.bfloat16, device="cuda") * 0.02
    t = Int4Tensor.from_hp(w, (1, 1, 128))
    p = Int4PreshuffledTensor.from_int4_tensor(t)
    x = torch.randn(6, m, 1024, dtype=torch.bfloat16, device="cuda")
    out = cuda_gemv.int4_gemv(x, p.qdata, p.group_scale, p.group_zero, 128, shuffled=True)
    assert out.shape == (6, m, 208)
    plain = cuda_gemv.int4_gemv(x, t.qdata, t.scale, t.zero_point, 128)
    assert rel_error(plain, out[..., :200]) < 5e-3
    assert kernels.preshuffled_backend(x, p) == "cuda"
    via_bmm = torch.bmm(x, p.mT)
    assert via_bmm.shape == (6, m, 200)
    assert rel_error(reference.bmm(x, t), via_bmm) < 1e-2


@gpu
@pytest.mark.parametrize("m, backend", [(1, "cuda"), (16, "cuda"), (17, "cuda_gemm"),
                                        (32, "cuda_gemm"), (33, "fbgemm")])
def test_preshuffled_dispatch_ladder(m, backend):
    """The GEMV up to 16 rows, our GEMM (cuda_gemm.py) from 17 to 32, fbgemm above; x [2, M, K]
    on a 2D weight is 2M rows."""
    _, t, p = preshuffled(512, 1024)
    x = torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda")
    assert kernels.preshuffled_backend(x, p) == backend
    assert rel_error(reference.linear(x, t, None), F.linear(x, p)) < 1e-2
    if backend == "cuda_gemm":
        assert kernels.preshuffled_backend(x.expand(2, m, 1024), p) != "cuda_gemm"
    assert torch.library.opcheck(custom_ops.int4_gemv_cuda_preshuffled,
                                 (x[:1], p.qdata, p.group_scale, p.group_zero, 128)) is not None


def test_contract_rejects_cpu_and_unsupported_inputs_without_compiling():
    """Runs everywhere: the contract check never touches a GPU or compiles anything."""
    t = Int4Tensor.from_hp(torch.randn(64, 256, dtype=torch.bfloat16), (1, 128))
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    assert not cuda_gemv.can_run(x, t.qdata, t.scale, t.zero_point, 128)
    cfg = cuda_gemv.pick_config(1, 8192, 8192, 132)
    assert cfg["WARPS_N"] * cfg["SLICES"] == cuda_gemv.MAX_WARPS and 8192 // 128 >= cfg["SLICES"]
    t3 = Int4Tensor.from_hp(torch.randn(2, 64, 256, dtype=torch.bfloat16), (1, 1, 128))
    x3 = torch.randn(2, 1, 256, dtype=torch.bfloat16)
    assert not cuda_gemv.can_run(x3, t3.qdata, t3.scale, t3.zero_point, 128)
    assert not cuda_gemv.can_run(x3, t.qdata, t.scale, t.zero_point, 128)  # 3D x, 2D weight
    assert cuda_gemv._compiled.cache_info().currsize == 0
    with pytest.raises(ValueError, match="1 to 16 activation rows, got 17"):
        cuda_gemv.int4_gemv(torch.randn(17, 256, dtype=torch.bfloat16), t.qdata, t.scale,
                            t.zero_point, 128)
    assert kernels.linear_backend(x, t) == "reference"
    assert kernels.bmm_backend(x3, t3) == "reference"


@pytest.mark.parametrize("m", [1, 4, 5, 8, 9, 16])
@pytest.mark.parametrize("n, k", [(8192, 8192), (4096, 14336), (96, 640), (1000, 256), (28672, 128),
                                  (14336, 4096), (6144, 4096), (128256, 4096), (8192, 28672)])
@pytest.mark.parametrize("shuffled", [False, True])
def test_launch_config_fits_the_block_and_k(m, n, k, shuffled):
    """Runs everywhere: 8 warps per block, no more K slices than half the chunks (except one
    chunk), two row tiles per warp from 9 rows up; with many rows of at most 4096 K (any K on
    the preshuffled layout), as few K slices as keep 12 warps per multiprocessor."""
    sms = 132
    cfg = cuda_gemv.pick_config(m, n, k, sms, shuffled)
    assert cfg["WARPS_N"] * cfg["SLICES"] == cuda_gemv.MAX_WARPS
    assert cfg["SLICES"] == 1 or k // cuda_gemv.CHUNK >= 2 * cfg["SLICES"]
    assert cfg["U"] >= 1 and cfg["MIN_BLOCKS"] >= 1 and cfg["R"] in (1, 2)
    if m > 8:
        assert cfg["R"] == 2
    if n > 4096 and (shuffled or k <= 4096) and cfg["R"] == 2:
        warps = lambda slices: n // 32 * slices  # noqa: E731
        assert cfg["SLICES"] == 1 or warps(cfg["SLICES"] // 2) < 12 * sms
        capped = cfg["SLICES"] == 8 or k // cuda_gemv.CHUNK < 4 * cfg["SLICES"]
        assert warps(cfg["SLICES"]) >= 12 * sms or capped or m > 8
