"""The Triton grouped int4 matmul (``aten._grouped_mm`` on MoE expert stacks with many rows
per expert, int4tensor/kernels/triton_int4.py) against the reference path on random
routings; its place in the dispatch table (CPU, device passed in) and its use under CUDA
graphs and torch.compile (CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import kernels
from int4tensor.kernels import (
    GROUPED_GEMV_MAX_ROWS, TRITON_GROUPED_MAX_ROWS, custom_ops)
from int4tensor.kernels.dispatch import decide, describe
from test.kernels.test_cuda_grouped_gemv import (
    assert_compiled_matches_eager, assert_matches_reference, assert_opcheck_and_gradient, check,
    counts_to_offs, experts, routed_activations)

gpu = pytest.mark.gpu
H200 = dict(device_type="cuda", capability=(9, 0), features=frozenset({"nvrtc", "triton"}))


# ---- dispatch (CPU) ---------------------------------------------------------------------------
def _decide(tokens, e=8, n=256, k=512, g=128, dtype=torch.bfloat16, **device):
    _, t = experts(e, n, k, g, device="cpu")
    x = torch.randn(tokens, k, dtype=dtype)
    return decide(describe("grouped_mm", x, t, **(device or H200)), "plain")


def test_many_rows_per_expert_take_triton_after_the_gemv_refuses():
    tokens = 8 * (GROUPED_GEMV_MAX_ROWS + 1)
    d = _decide(tokens)
    assert d.backend == "triton"
    assert f"{GROUPED_GEMV_MAX_ROWS + 1} per active expert" in dict(d.refused)["cuda"]
    assert _decide(8 * GROUPED_GEMV_MAX_ROWS).backend == "cuda"


def test_group_size_64_takes_triton_above_one_row_per_expert():
    for tokens in (9, 16, 8 * TRITON_GROUPED_MAX_ROWS):
        d = _decide(tokens, g=64)
        assert d.backend == "triton", tokens
        assert "2 per active expert" in dict(d.refused)["triton_gemv"] or tokens > 16
    assert "G = 64" in dict(_decide(1, g=64).refused)["cuda"]


def test_more_rows_than_triton_takes_go_to_the_reference_path():
    d = _decide(8 * (TRITON_GROUPED_MAX_ROWS + 1))
    assert d.backend == "reference"
    assert f"{TRITON_GROUPED_MAX_ROWS + 1} per active expert" in dict(d.refused)["triton"]
    assert _decide(8 * TRITON_GROUPED_MAX_ROWS).backend == "triton"


def test_refusals_name_their_reason():
    no_triton = dict(H200, features=frozenset({"nvrtc"}))
    d = _decide(512, **no_triton)
    assert d.backend == "reference" and "triton is not importable" in dict(d.refused)["triton"]
    d = _decide(512, dtype=torch.float16)
    assert d.backend == "reference" and "it takes bf16" in dict(d.refused)["triton"]
    d = _decide(512, k=544, g=32)  # a 32-wide group: K = 544 is no multiple of 64 either
    assert d.backend == "triton"


def test_sliced_stacks_keep_triton_it_reads_the_fields_strides():
    _, t = experts(8, 256, 512, device="cpu")
    for sliced in (t[:, :, :256], t[:, 64:192], t[2:6]):
        x = torch.randn(100 * sliced.shape[0], sliced.shape[-1], dtype=torch.bfloat16)
        assert decide(describe("grouped_mm", x, sliced, **H200), "plain").backend == "triton"


# ---- CUDA ---------------------------------------------------------------------------------------
def _triton(x, t, offs, **config):
    from int4tensor.kernels import triton_int4

    return triton_int4.int4_grouped_matmul(x, t.qdata, t.scale, t.zero_point, offs,
                                           t.group_size, config or None)


@gpu
@pytest.mark.parametrize("e, n, k, g", [(8, 1024, 512, 128), (16, 200, 384, 128),
                                        (4, 96, 1024, 256), (32, 360, 576, 64),
                                        (128, 1536, 256, 128), (8, 256, 512, 32)])
@pytest.mark.parametrize("tokens, top_k", [(300, 2), (1025, 4), (77, 8), (150, 1)])
def test_random_routings_match_reference(e, n, k, g, tokens, top_k):
    """Every default launch configuration (2 to 1025 rows per expert) on G = 32 to 256."""
    _, t = experts(e, n, k, g)
    x, offs = routed_activations(tokens, e, k, top_k)
    out = check(x, t, offs)
    assert torch.equal(out, _triton(x, t, offs)) or \
        kernels.explain_call("grouped_mm", x, t).backend != "triton"
    check_direct(x, t, offs)


def check_direct(x, t, offs, **config):
    assert_matches_reference(_triton(x, t, offs, **config), x, t, offs)


@gpu
@pytest.mark.parametrize("counts", [
    [0, 0, 0, 700, 0, 0, 0, 0],      # one expert takes every row
    [0, 270, 0, 0, 329, 0, 0, 1],    # empty experts first, between and last
    [601, 0, 0, 0, 0, 0, 0, 0],      # the first expert, past four 128-row tiles
    [65, 65, 65, 65, 65, 65, 65, 65],
])
def test_empty_and_crowded_experts(counts):
    _, t = experts(8, 328, 768)
    offs = counts_to_offs(counts)
    x = torch.randn(sum(counts), 768, dtype=torch.bfloat16, device="cuda")
    assert kernels.explain_call("grouped_mm", x, t).backend == "triton"
    check(x, t, offs)


@gpu
@pytest.mark.parametrize("config", [
    dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=2),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3),
    dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3),
    dict(BLOCK_M=16, BLOCK_N=128, num_warps=4, num_stages=3, SPLIT_X=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=8, num_stages=3, SPLIT_X=True),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, DEQUANT=True),
    dict(BLOCK_M=128, BLOCK_N=128, num_warps=4, num_stages=3, DEQUANT=True, BLOCK_K=64),
    dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3, DEQUANT=True, BLOCK_K=64),
    dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=4, DEQUANT=True, BLOCK_K=32),
    dict(BLOCK_M=64, BLOCK_N=128, num_warps=4, num_stages=3, DEQUANT=True, BLOCK_K=64,
         SWAP_AB=True),
    dict(BLOCK_M=128, BLOCK_N=256, num_warps=8, num_stages=3, DEQUANT=True, SWAP_AB=True),
    dict(BLOCK_M=16, BLOCK_N=64, num_warps=4, num_stages=3, DEQUANT=True, BLOCK_K=32,
         SWAP_AB=True),
])
@pytest.mark.parametrize("g", [128, 64])
def test_every_launch_config_is_right_with_rows_past_the_last_offset(config, g):
    _, t = experts(8, 200, 1024, g)
    offs = counts_to_offs([3, 0, 150, 40, 0, 0, 90, 1])  # 284 of 300 rows; 16 of no expert
    check_direct(torch.randn(300, 1024, dtype=torch.bfloat16, device="cuda"), t, offs,
                 **config)


@gpu
def test_dequantizing_kernel_refuses_a_slice_wider_than_the_group():
    _, t = experts(8, 200, 1024, 64)
    x = torch.randn(30, 1024, dtype=torch.bfloat16, device="cuda")
    with pytest.raises(ValueError, match="BLOCK_K = 128 must divide the group size 64"):
        _triton(x, t, counts_to_offs([30] + [0] * 7), BLOCK_M=64, BLOCK_N=128, num_warps=4,
                num_stages=3, DEQUANT=True, BLOCK_K=128)


@gpu
def test_sliced_stacks_match_reference():
    _, t = experts(8, 256, 1024)
    offs = counts_to_offs([0, 100, 50, 0, 200, 0, 1, 9])
    for sliced in (t[:, :, 256:768], t[:, 64:200], t[:, 64:200, 512:]):
        x = torch.randn(360, sliced.shape[-1], dtype=torch.bfloat16, device="cuda")
        check_direct(x, sliced, offs)
        check(x, sliced, offs)
    x = torch.randn(360, 1024, dtype=torch.bfloat16, device="cuda")
    check(x, t[2:6], counts_to_offs([100, 0, 200, 60]))


@gpu
def test_cuda_graph_replays_read_new_offsets():
    _, t = experts(8, 512, 1024)
    x = torch.randn(1024, 1024, dtype=torch.bfloat16, device="cuda")
    offs = counts_to_offs([128] * 8)
    w = t.transpose(-2, -1)
    assert kernels.explain_call("grouped_mm", x, t).backend == "triton"
    F.grouped_mm(x, w, offs=offs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F.grouped_mm(x, w, offs=offs)
    for counts in ([1024, 0, 0, 0, 0, 0, 0, 0], [0, 300, 0, 500, 0, 0, 200, 0],
                   [1, 2, 3, 4, 0, 0, 0, 1]):
        offs.copy_(counts_to_offs(counts))
        graph.replay()
        assert torch.equal(out, F.grouped_mm(x, w, offs=offs)), counts
        assert not out[sum(counts):].any()


@gpu
def test_compiled_grouped_mm_matches_eager_without_graph_breaks():
    assert_compiled_matches_eager([100, 0, 400, 0, 0, 150, 150, 0])  # ~100 rows per expert


@gpu
def test_custom_op_passes_opcheck_and_gives_the_activation_gradient():
    assert_opcheck_and_gradient(
        custom_ops.int4_grouped_mm_triton, [100, 200, 0, 300],
        lambda x, t, offs: custom_ops.int4_grouped_mm_triton(x, t.qdata, t.scale, t.zero_point,
                                                             offs, 128))
