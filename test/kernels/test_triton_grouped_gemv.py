"""The Triton grouped int4 GEMV (``aten._grouped_mm`` at decode, one row per active expert,
for the group sizes the CUDA GEMV refuses; int4tensor/kernels/triton_int4.py) against the
reference path; its place in the dispatch table (CPU, device passed in) and its use under
CUDA graphs and torch.compile (CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import kernels
from int4tensor.kernels import (
    TRITON_GROUPED_GEMV_MAX_EXPERTS, TRITON_GROUPED_GEMV_MAX_ROWS, custom_ops)
from int4tensor.kernels.dispatch import decide, describe
from test.kernels.test_cuda_grouped_gemv import (
    assert_compiled_matches_eager, assert_matches_reference, assert_opcheck_and_gradient,
    counts_to_offs, experts, routed_activations)

gpu = pytest.mark.gpu
H200 = dict(device_type="cuda", capability=(9, 0), features=frozenset({"nvrtc", "triton"}))


# ---- dispatch (CPU) ---------------------------------------------------------------------------
def _decide(tokens, e=8, n=256, k=512, g=64):
    _, t = experts(e, n, k, g, device="cpu")
    x = torch.randn(tokens, k, dtype=torch.bfloat16)
    return decide(describe("grouped_mm", x, t, **H200), "plain")


def test_decode_with_groups_of_64_takes_the_triton_gemv():
    for tokens in (1, 5, 8 * TRITON_GROUPED_GEMV_MAX_ROWS):  # up to one row per expert
        d = _decide(tokens)
        assert d.backend == "triton_gemv", tokens
        assert "G = 64" in dict(d.refused)["cuda"]


def test_groups_the_cuda_gemv_takes_stay_on_it():
    assert _decide(1, g=128).backend == "cuda"
    assert _decide(8, g=256, k=1024).backend == "cuda"


def test_more_rows_per_expert_go_to_the_tensor_core_kernel():
    d = _decide(8 * TRITON_GROUPED_GEMV_MAX_ROWS + 1)
    assert d.backend == "triton"
    assert "per active expert" in dict(d.refused)["triton_gemv"]


def test_too_many_experts_for_the_offset_scan_are_refused_by_name():
    d = _decide(1, e=TRITON_GROUPED_GEMV_MAX_EXPERTS + 1, n=16, k=64)
    assert d.backend == "triton"
    assert f"{TRITON_GROUPED_GEMV_MAX_EXPERTS + 1} experts" in dict(d.refused)["triton_gemv"]


# ---- CUDA ---------------------------------------------------------------------------------------
def _gemv(x, t, offs, **config):
    from int4tensor.kernels import triton_int4

    return triton_int4.int4_grouped_gemv(x, t.qdata, t.scale, t.zero_point, offs, t.group_size,
                                         config=config or None)


def check_gemv(x, t, offs, **config):
    assert_matches_reference(_gemv(x, t, offs, **config), x, t, offs)


@gpu
@pytest.mark.parametrize("e, n, k, g", [(32, 5760, 2880, 64), (8, 200, 512, 64),
                                        (16, 328, 1024, 128), (4, 96, 1024, 256),
                                        (6, 64, 544, 32)])
@pytest.mark.parametrize("tokens, top_k", [(1, 4), (3, 2), (2, 1)])
def test_random_routings_match_reference(e, n, k, g, tokens, top_k):
    _, t = experts(e, n, k, g)
    x, offs = routed_activations(tokens, e, k, top_k)
    if g == 64:
        assert kernels.explain_call("grouped_mm", x, t).backend == "triton_gemv"
    check_gemv(x, t, offs)


@gpu
@pytest.mark.parametrize("split_k", [1, 2, 8])
@pytest.mark.parametrize("counts, extra", [
    ([0, 0, 0, 5, 0, 0, 0, 0], 0),  # one expert takes every row
    ([1, 0, 2, 0, 0, 0, 0, 1], 3),  # empty experts and rows past the last offset
    ([0] * 8, 2),                   # no expert has rows
])
def test_every_k_split_is_right_with_empty_experts_and_tail_rows(split_k, counts, extra):
    _, t = experts(8, 200, 1024, 64)
    x = torch.randn(sum(counts) + extra, 1024, dtype=torch.bfloat16, device="cuda")
    check_gemv(x, t, counts_to_offs(counts), BLOCK_N=32, GROUPS_PER_ITER=2, num_warps=2,
               num_stages=3, SPLIT_K=split_k)


@gpu
def test_cuda_graph_replays_read_new_offsets():
    _, t = experts(8, 512, 1024, 64)
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
    offs = counts_to_offs([1, 1, 1, 1, 0, 0, 0, 0])
    w = t.transpose(-2, -1)
    assert kernels.explain_call("grouped_mm", x, t).backend == "triton_gemv"
    F.grouped_mm(x, w, offs=offs)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F.grouped_mm(x, w, offs=offs)
    for counts in ([0, 0, 0, 0, 0, 0, 0, 4], [0, 1, 0, 1, 0, 0, 1, 0], [2, 0, 0, 0, 0, 0, 0, 0]):
        offs.copy_(counts_to_offs(counts))
        graph.replay()
        assert torch.equal(out, F.grouped_mm(x, w, offs=offs)), counts
        assert not out[sum(counts):].any()


@gpu
def test_compiled_grouped_mm_matches_eager_without_graph_breaks():
    assert_compiled_matches_eager([1, 0, 1, 0, 0, 1, 1, 0], g=64)


@gpu
def test_custom_op_passes_opcheck_and_gives_the_activation_gradient():
    assert_opcheck_and_gradient(
        custom_ops.int4_grouped_gemv_triton, [1, 0, 1, 1],
        lambda x, t, offs: custom_ops.int4_grouped_gemv_triton(x, t.qdata, t.scale,
                                                               t.zero_point, offs, 64), g=64)
