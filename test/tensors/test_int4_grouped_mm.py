"""``aten._grouped_mm`` / ``F.grouped_mm`` with Int4Tensor operands: the dense op's results on
the dequantized weights (the MoE path of transformers' ``grouped_mm`` experts)."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4WeightOnlyConfig
from int4tensor.kernels.reference import grouped_mm_padded as _grouped_mm_padded
from test.helpers import rel_error

E, N, K, T = 4, 48, 64, 12
OFFS = {
    "even": [3, 6, 9, 12],
    "empty_first": [0, 5, 9, 12],
    "empty_middle": [4, 4, 4, 12],
    "one_expert": [0, 0, 12, 12],
    "tail_unused": [2, 5, 5, 9],  # rows 9.. belong to no expert
}


def _expert_stack(dtype, k_dim=-1):
    w = torch.randn(E, N, K) if k_dim == -1 else torch.randn(E, K, N)
    q = Int4WeightOnlyConfig(group_size=32, k_dim=k_dim).quantize_weight(w.to(dtype))
    return q


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("pattern", sorted(OFFS))
def test_2d_activation_with_offs_matches_dense(dtype, pattern):
    q = _expert_stack(dtype)
    x = torch.randn(T, K, dtype=dtype)
    offs = torch.tensor(OFFS[pattern], dtype=torch.int32)
    used = int(offs[-1])
    ref = torch._grouped_mm(x, q.dequantize().transpose(-2, -1), offs=offs)
    out = F.grouped_mm(x, q.transpose(-2, -1), offs=offs)
    assert out.dtype == dtype and out.shape == (T, N)
    assert torch.equal(out[:used], ref[:used])
    # each row is its expert's matmul
    ends = offs.tolist()
    for e in range(E):
        start = 0 if e == 0 else ends[e - 1]
        expect = x[start:ends[e]].float() @ q.dequantize().float()[e].T
        torch.testing.assert_close(out[start:ends[e]].float(), expect, rtol=2e-2, atol=2e-2)


def test_transposed_stack_k_dim_minus_2_as_mat_b():
    q = _expert_stack(torch.bfloat16, k_dim=-2)  # logical [E, K, N], used as is
    x = torch.randn(T, K, dtype=torch.bfloat16)
    offs = torch.tensor(OFFS["empty_middle"], dtype=torch.int32)
    out = torch._grouped_mm(x, q, offs=offs)
    assert torch.equal(out, torch._grouped_mm(x, q.dequantize(), offs=offs))


def test_bias_is_added_per_group():
    q = _expert_stack(torch.float32)
    x, bias = torch.randn(T, K), torch.randn(E, N)
    offs = torch.tensor(OFFS["empty_first"], dtype=torch.int32)
    out = torch._grouped_mm(x, q.transpose(-2, -1), offs=offs, bias=bias)
    plain = torch._grouped_mm(x, q.transpose(-2, -1), offs=offs)
    group = torch.tensor([1] * 5 + [2] * 4 + [3] * 3)
    torch.testing.assert_close(out, plain + bias[group])


def test_3d_activation_without_offs_is_a_batched_matmul():
    q = _expert_stack(torch.bfloat16)
    x = torch.randn(E, 5, K, dtype=torch.bfloat16)
    out = torch._grouped_mm(x, q.transpose(-2, -1))
    assert torch.equal(out, torch.bmm(x, q.dequantize().transpose(-2, -1)))


@pytest.mark.parametrize("pattern", sorted(OFFS))
def test_padded_reference_matches_torch_op(pattern):
    # the formulation used where torch's dense op does not take the dtype (fp16/fp32 on CUDA)
    w = torch.randn(E, K, N)
    x = torch.randn(T, K)
    offs = torch.tensor(OFFS[pattern], dtype=torch.int32)
    used = int(offs[-1])
    out = _grouped_mm_padded(x, w, offs)
    torch.testing.assert_close(out[:used], torch._grouped_mm(x, w, offs=offs)[:used])
    assert not out[used:].any()


def test_int_activation_is_refused():
    q = _expert_stack(torch.bfloat16)
    with pytest.raises(TypeError, match="grouped_mm .* bf16/fp16/fp32"):
        torch._grouped_mm(torch.ones(T, K, dtype=torch.int32), q.transpose(-2, -1),
                          offs=torch.tensor(OFFS["even"], dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_cuda_matches_dense(dtype):
    q = _expert_stack(dtype).to("cuda")
    x = torch.randn(T, K, dtype=dtype, device="cuda")
    offs = torch.tensor(OFFS["empty_middle"], dtype=torch.int32, device="cuda")
    out = F.grouped_mm(x, q.transpose(-2, -1), offs=offs)
    ref = _grouped_mm_padded(x.float(), q.dequantize(torch.float32).transpose(-2, -1), offs)
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=5e-2)


def test_eager_cpu_calls_dequantize_only_the_active_experts(monkeypatch):
    """A CPU decode step routes a token to a few experts: only theirs are dequantized."""
    from int4tensor import kernels
    from int4tensor.kernels import reference

    q = Int4WeightOnlyConfig(group_size=32).quantize_weight(
        torch.randn(16, N, K, dtype=torch.bfloat16))
    x = torch.randn(5, K, dtype=torch.bfloat16)
    offs = torch.tensor([0] * 3 + [2] * 6 + [4] * 6 + [5], dtype=torch.int32)  # experts 2, 8, 15
    assert kernels.explain_call("grouped_mm", x, q).backend == "cpu_experts"
    shapes = []
    real = reference.dequantize_int4
    monkeypatch.setattr(reference, "dequantize_int4",
                        lambda qd, *a: shapes.append(tuple(qd.shape)) or real(qd, *a))
    out = F.grouped_mm(x, q.transpose(-2, -1), offs=offs)
    assert shapes == [(N, K // 2)] * 3  # three experts, one at a time
    ref = torch._grouped_mm(x, q.dequantize().transpose(-2, -1), offs=offs)
    assert torch.equal(out, ref)


@pytest.mark.parametrize("compiled", [False, True])
def test_act_pre_scale_is_applied_per_expert(compiled):
    """An AWQ-style ``act_pre_scale [E, K]`` multiplies each row by its own expert's factors
    (the kernels read only q, scale and zero point)."""
    from int4tensor import Int4Tensor

    p = _expert_stack(torch.bfloat16)
    pre = torch.rand(E, K, dtype=torch.bfloat16) + 0.5
    q = Int4Tensor(p.qdata, p.scale, p.zero_point, p.block_size, p.shape, act_pre_scale=pre)
    x = torch.randn(T, K, dtype=torch.bfloat16)
    offs = torch.tensor(OFFS["tail_unused"], dtype=torch.int32)

    def f(x, w, offs):
        return F.grouped_mm(x, w.transpose(-2, -1), offs=offs)

    if compiled:
        torch._dynamo.reset()
        f = torch.compile(f, backend="aot_eager", fullgraph=True)
    out = f(x, q, offs)
    ref = torch._grouped_mm(x, q.dequantize().transpose(-2, -1), offs=offs)
    assert rel_error(ref[:9], out[:9]) < 1e-2  # x * pre is rounded to bf16 before the kernel
    if not compiled:  # rows of no expert: 0 from the per-expert path; torch's op leaves them
        assert not out[9:].any()
    unscaled = torch._grouped_mm(x, p.dequantize().transpose(-2, -1), offs=offs)
    assert (out[:9].float() - unscaled[:9].float()).abs().max() > 0.1  # the factor mattered
