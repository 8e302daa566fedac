"""The grouped int4 GEMV (``aten._grouped_mm`` on MoE expert stacks,
int4tensor/kernels/cuda_gemv.py) against the reference path on random routings; its dispatch
(CPU, device passed in) and its use under CUDA graphs and torch.compile (CUDA)."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4WeightOnlyConfig, kernels
from int4tensor.kernels import cuda_gemv, custom_ops, reference
from int4tensor.kernels.dispatch import decide, describe
from test.helpers import rel_error

gpu = pytest.mark.gpu
H100 = dict(device_type="cuda", capability=(9, 0), features=frozenset({"nvrtc"}))


def experts(e, n, k, g=128, device="cuda"):
    w = torch.randn(e, n, k, dtype=torch.bfloat16, device=device) * 0.02
    return w, Int4WeightOnlyConfig(group_size=g).quantize_weight(w)


def routing(tokens, e, top_k, generator=None, device="cuda"):
    """``offs`` of ``tokens`` tokens each routed to ``top_k`` distinct experts drawn uniformly."""
    choice = torch.rand(tokens, e, generator=generator).argsort(dim=1)[:, :top_k]
    counts = torch.bincount(choice.flatten(), minlength=e)
    return torch.cumsum(counts, 0).to(torch.int32).to(device)


def routed_activations(tokens, e, k, top_k):
    """``(x [rows, K], offs)`` for ``tokens`` tokens routed to ``top_k`` of ``e`` experts
    (seeded by the case)."""
    offs = routing(tokens, e, min(top_k, e), torch.Generator().manual_seed(tokens * 1000 + e))
    return torch.randn(int(offs[-1]), k, dtype=torch.bfloat16, device="cuda"), offs


def counts_to_offs(counts, device="cuda"):
    return torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32).to(device)


def assert_matches_reference(out, x, t, offs, tol=1e-2):
    """``out`` is the grouped matmul of ``x`` and stack ``t`` over ``offs``: bf16 ``[T, N]``,
    within ``tol`` of the float reference on the experts' rows, 0 on the rows of no expert."""
    ref = reference.grouped_mm_padded(x.float(), t.dequantize(torch.float32).transpose(-2, -1),
                                      offs)
    used = int(offs[-1])
    assert out.shape == (x.shape[0], t.shape[1]) and out.dtype == torch.bfloat16
    err = rel_error(ref[:used], out[:used]) if used else 0.0
    assert err < tol, err
    assert not out[used:].any()  # rows of no expert
    return out


def check(x, t, offs, tol=1e-2):
    return assert_matches_reference(F.grouped_mm(x, t.transpose(-2, -1), offs=offs), x, t, offs,
                                    tol)


# ---- dispatch (CPU) ---------------------------------------------------------------------------
def _call(tokens, e=8, n=256, k=512, g=128):
    _, t = experts(e, n, k, g, device="cpu")
    x = torch.randn(tokens, k, dtype=torch.bfloat16)
    return decide(describe("grouped_mm", x, t, **H100), "plain")


def test_decode_sized_groups_take_the_grouped_gemv():
    for tokens in (1, 2, 16, 64, 128):  # up to 16 rows per active expert of 8
        assert _call(tokens).backend == "cuda", tokens


def test_large_groups_and_unsupported_group_sizes_without_triton_take_the_reference():
    """(On a CPU the per-expert reference path takes them; on CUDA it would synchronize.)"""
    d = _call(8 * 17)
    assert d.backend == "reference" and "17 per active expert" in dict(d.refused)["cuda"]
    d = _call(4, g=64)
    assert d.backend == "reference" and "G = 64" in dict(d.refused)["cuda"]
    d = decide(describe("grouped_mm", torch.randn(4, 512, dtype=torch.bfloat16),
                        experts(8, 256, 512, device="cpu")[1]), "plain")
    assert d.backend == "cpu_experts" and "not CUDA" in dict(d.refused)["cuda"]
    assert "reads offs on the host" in dict(_call(8 * 17).refused)["cpu_experts"]


def test_rows_per_expert_assumes_tokens_spread_over_the_experts():
    assert cuda_gemv.rows_per_expert(1, 128) == 1
    assert cuda_gemv.rows_per_expert(16, 8) == 2
    assert cuda_gemv.rows_per_expert(17, 8) == 3


def test_transposed_view_finds_the_stored_weights_plans():
    from int4tensor.tensors.int4_tensor import _stored

    _, t = experts(4, 64, 256, device="cpu")
    assert _stored(t.transpose(-2, -1)) is t  # plans cached on t serve every forward's view
    view = t.transpose(-2, -1).transpose(-2, -1).transpose(-2, -1)
    assert torch.equal(_stored(view).qdata, t.qdata) and not _stored(view).is_transposed


def test_cpu_bf16_grouped_mm_equals_the_dense_op_on_dequantized_weights():
    _, t = experts(4, 64, 256, device="cpu")
    x = torch.randn(10, 256, dtype=torch.bfloat16)
    offs = counts_to_offs([3, 0, 5, 2], "cpu")
    out = F.grouped_mm(x, t.transpose(-2, -1), offs=offs)
    assert torch.equal(out, torch._grouped_mm(x, t.dequantize().transpose(-2, -1), offs=offs))


@pytest.mark.parametrize("offs, match", [
    (torch.tensor([1, 2, 3, 4], dtype=torch.int64), "offs must be int32"),
    (torch.tensor([1, 2, 4], dtype=torch.int32), r"offs must be int32 \[4\]"),
])
def test_bad_offs_are_refused_by_name(offs, match):
    _, t = experts(4, 64, 256, device="cpu")
    with pytest.raises(ValueError, match=match):
        F.grouped_mm(torch.randn(4, 256, dtype=torch.bfloat16), t.transpose(-2, -1), offs=offs)


def test_wrong_k_is_refused_by_name():
    _, t = experts(4, 64, 256, device="cpu")
    with pytest.raises(ValueError, match="K = 128"):
        F.grouped_mm(torch.randn(4, 128, dtype=torch.bfloat16), t.transpose(-2, -1),
                     offs=counts_to_offs([1, 1, 1, 1], "cpu"))


# ---- CUDA ---------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("e, n, k, g", [(8, 1024, 512, 128), (16, 200, 384, 128),
                                        (4, 96, 1024, 256), (128, 1536, 256, 128)])
@pytest.mark.parametrize("tokens, top_k", [(1, 2), (3, 2), (16, 4), (37, 2)])
def test_random_routings_match_reference(e, n, k, g, tokens, top_k):
    _, t = experts(e, n, k, g)
    x, offs = routed_activations(tokens, e, k, top_k)
    rows = cuda_gemv.rows_per_expert(x.shape[0], e)
    assert kernels.explain_call("grouped_mm", x, t).backend == \
        ("cuda" if rows <= kernels.GROUPED_GEMV_MAX_ROWS else "triton")
    check(x, t, offs)
    gemv = cuda_gemv.bind_grouped(x, t.qdata, t.scale, t.zero_point, g)  # the GEMV at any size
    ref = reference.grouped_mm_padded(x.float(), t.dequantize(torch.float32).transpose(-2, -1),
                                      offs)
    assert rel_error(ref, gemv(x, offs)) < 1e-2


@gpu
@pytest.mark.parametrize("counts", [
    [0, 0, 0, 40, 0, 0, 0, 0],   # one expert takes every row (5 passes of 8 rows)
    [0, 7, 0, 0, 9, 0, 0, 1],    # empty experts first, between and last
    [33, 0, 0, 0, 0, 0, 0, 0],   # the first expert, past two 16-row tiles
    [1, 1, 1, 1, 1, 1, 1, 1],
])
def test_empty_and_crowded_experts(counts):
    _, t = experts(8, 328, 768)
    offs = counts_to_offs(counts)
    check(torch.randn(sum(counts), 768, dtype=torch.bfloat16, device="cuda"), t, offs)


def sparse_counts(e, rows_of):
    counts = [0] * e
    for expert, rows in rows_of.items():
        counts[expert] = rows
    return counts


@gpu
@pytest.mark.parametrize("rows_of, extra_rows", [
    ({3: 1, 40: 2, 69: 1}, 2),            # active experts in three 32-expert words, tail rows
    ({10: 1, 33: 1, 34: 1, 65: 1, 69: 1}, 0),  # as many active experts as grid slots
    ({69: 6}, 1),                          # only the last expert
    ({}, 3),                               # no expert has rows: all zeros
])
def test_many_experts_with_few_active_ones(rows_of, extra_rows):
    """The grid has min(E, T) expert slots, each finding its active expert from offs on the
    GPU: which experts are active must not matter."""
    _, t = experts(70, 200, 512)
    counts = sparse_counts(70, rows_of)
    x = torch.randn(sum(counts) + extra_rows, 512, dtype=torch.bfloat16, device="cuda")
    offs = counts_to_offs(counts)
    gemv = cuda_gemv.bind_grouped(x, t.qdata, t.scale, t.zero_point, 128)
    assert_matches_reference(gemv(x, offs), x, t, offs)


@gpu
def test_cuda_graph_replays_find_newly_active_experts():
    _, t = experts(64, 256, 512)
    x = torch.randn(4, 512, dtype=torch.bfloat16, device="cuda")
    offs = counts_to_offs(sparse_counts(64, {0: 4}))
    w = t.transpose(-2, -1)
    F.grouped_mm(x, w, offs=offs)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F.grouped_mm(x, w, offs=offs)
    for rows_of in ({63: 4}, {5: 1, 31: 1, 32: 1, 63: 1}, {40: 2, 41: 1}):
        offs.copy_(counts_to_offs(sparse_counts(64, rows_of)))
        graph.replay()
        assert_matches_reference(out, x, t, offs)


@gpu
def test_rows_past_the_last_offset_are_zero():
    _, t = experts(4, 256, 512)
    x = torch.randn(12, 512, dtype=torch.bfloat16, device="cuda")
    out = check(x, t, counts_to_offs([2, 0, 5, 1]))  # rows 8..11 belong to no expert
    assert out.shape == (12, 256)


@gpu
def test_group_size_64_runs_the_triton_kernel():
    _, t = experts(4, 256, 512, g=64)
    x = torch.randn(6, 512, dtype=torch.bfloat16, device="cuda")
    assert kernels.explain_call("grouped_mm", x, t).backend == "triton"
    check(x, t, counts_to_offs([1, 2, 0, 3]))


@gpu
def test_cuda_graph_replays_read_new_offsets():
    _, t = experts(8, 512, 1024)
    x = torch.randn(16, 1024, dtype=torch.bfloat16, device="cuda")
    offs = counts_to_offs([2, 2, 2, 2, 2, 2, 2, 2])
    w = t.transpose(-2, -1)
    F.grouped_mm(x, w, offs=offs)  # plan and compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = F.grouped_mm(x, w, offs=offs)
    for counts in ([16, 0, 0, 0, 0, 0, 0, 0], [0, 3, 0, 5, 0, 0, 8, 0], [1, 2, 3, 4, 0, 0, 0, 1]):
        offs.copy_(counts_to_offs(counts))
        graph.replay()
        ref = F.grouped_mm(x, w, offs=offs)
        assert torch.equal(out, ref), counts


def assert_compiled_matches_eager(counts, k=1024, g=128):
    """``torch.compile(fullgraph=True)`` of transformers' grouped_mm call on an int4 stack
    equals the eager call, for the routing ``counts`` (which sets the backend)."""
    _, t = experts(len(counts), 512, k, g)
    x = torch.randn(sum(counts), k, dtype=torch.bfloat16, device="cuda")
    offs = counts_to_offs(counts)

    def f(x, w, offs):
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)

    eager = f(x, t, offs)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    assert torch.equal(compiled(x, t, offs), eager)


def assert_opcheck_and_gradient(op, counts, forward, g=128):
    """``op`` (a grouped custom op) passes opcheck, and ``forward(x, t, offs)`` gives the
    activation gradient of the dense grouped matmul."""
    _, t = experts(len(counts), 256, 512, g)
    x = torch.randn(sum(counts), 512, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    offs = counts_to_offs(counts)
    args = (x.detach(), t.qdata, t.scale, t.zero_point, offs, g)
    torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))
    forward(x, t, offs).float().square().sum().backward()
    xr = x.detach().float().requires_grad_()
    reference.grouped_mm_padded(xr, t.dequantize(torch.float32).transpose(-2, -1),
                                offs).square().sum().backward()
    assert rel_error(xr.grad, x.grad) < 2e-2


@gpu
def test_compiled_grouped_mm_matches_eager_without_graph_breaks():
    assert_compiled_matches_eager([1, 0, 4, 0, 0, 3, 2, 0])


@gpu
def test_custom_op_passes_opcheck_and_gives_the_activation_gradient():
    assert_opcheck_and_gradient(custom_ops.int4_grouped_gemv_cuda, [1, 2, 0, 3],
                                lambda x, t, offs: F.grouped_mm(x, t.transpose(-2, -1),
                                                                offs=offs))


# ---- the preshuffled layout (convert_model_to_packed_tensors_ on Hopper) -----------------------
H200 = dict(device_type="cuda", capability=(9, 0), features=frozenset({"nvrtc", "fbgemm"}))


def _preshuffled_call(tokens, e=8, n=256, k=512, **device):
    from int4tensor import Int4PreshuffledTensor

    q = torch.zeros(e, n, k // 2, dtype=torch.int8)  # fields of the layout's shapes
    s = torch.ones(e, k // 128, n, dtype=torch.bfloat16)
    p = Int4PreshuffledTensor(q, s, (1, 1, 128), (e, n, k), "bf16", group_zero=s.clone())
    x = torch.randn(tokens, k, dtype=torch.bfloat16)
    return decide(describe("grouped_mm", x, p, **(device or H200)), "preshuffled")


def test_preshuffled_stacks_take_the_gemv_at_every_size():
    assert _preshuffled_call(1).backend == "cuda"
    assert _preshuffled_call(8 * 2048).backend == "cuda"  # its reference would unshuffle
    no_nvrtc = _preshuffled_call(1, **dict(H200, features=frozenset({"fbgemm"})))
    assert no_nvrtc.backend == "reference" and "NVRTC" in dict(no_nvrtc.refused)["cuda"]


def _preshuffled(e, n, k, g=128):
    from int4tensor import Int4PreshuffledTensor

    w, t = experts(e, n, k, g)
    return t, Int4PreshuffledTensor.from_int4_tensor(t)


@gpu
@pytest.mark.parametrize("e, n, k", [(8, 1024, 512), (16, 200, 384), (128, 1536, 256)])
@pytest.mark.parametrize("tokens, top_k", [(1, 2), (3, 2), (37, 2), (300, 4), (1024, 2)])
def test_preshuffled_random_routings_match_the_plain_layout(e, n, k, tokens, top_k):
    pytest.importorskip("fbgemm_gpu")
    plain, shuffled = _preshuffled(e, n, k)
    x, offs = routed_activations(tokens, e, k, top_k)
    assert kernels.explain_call("grouped_mm", x, shuffled).backend == "cuda"
    out = check(x, shuffled, offs)
    ref = F.grouped_mm(x, plain.transpose(-2, -1), offs=offs)
    assert rel_error(ref.float(), out.float()) < 1e-2


@gpu
@pytest.mark.parametrize("counts", [[0, 0, 0, 300, 0, 0, 0, 0], [0, 70, 0, 0, 90, 0, 0, 1],
                                    [1, 0, 2, 0], [2, 0, 5, 1]])
def test_preshuffled_empty_crowded_experts_and_rows_past_the_last_offset(counts):
    pytest.importorskip("fbgemm_gpu")
    _, shuffled = _preshuffled(len(counts), 256, 512)
    offs = counts_to_offs(counts)
    rows = sum(counts) + 4  # 4 rows of no expert: zeros
    check(torch.randn(rows, 512, dtype=torch.bfloat16, device="cuda"), shuffled, offs)


@gpu
def test_preshuffled_grouped_mm_compiles_and_replays_in_a_cuda_graph():
    pytest.importorskip("fbgemm_gpu")
    _, shuffled = _preshuffled(8, 512, 1024)
    for tokens in (16, 8 * 40):  # the GEMV with one and with several 16-row passes
        x = torch.randn(tokens, 1024, dtype=torch.bfloat16, device="cuda")
        offs = counts_to_offs([tokens // 8] * 8)
        w = shuffled.transpose(-2, -1)
        eager = F.grouped_mm(x, w, offs=offs)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = F.grouped_mm(x, w, offs=offs)
        offs.copy_(counts_to_offs([tokens] + [0] * 7))
        graph.replay()
        assert torch.equal(out, F.grouped_mm(x, w, offs=offs)), tokens
        offs.copy_(counts_to_offs([tokens // 8] * 8))
        torch._dynamo.reset()
        compiled = torch.compile(lambda x, w, offs: F.grouped_mm(x, w.transpose(-2, -1),
                                                                 offs=offs), fullgraph=True)
        assert rel_error(eager.float(), compiled(x, shuffled, offs).float()) < 1e-3, tokens
