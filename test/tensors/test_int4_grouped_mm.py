"""``aten._grouped_mm`` / ``F.grouped_mm`` with Int4Tensor operands: the dense op's results on
the dequantized weights (the MoE path of transformers' ``grouped_mm`` experts)."""

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4WeightOnlyConfig
from int4tensor.kernels.reference import grouped_mm_padded as _grouped_mm_padded

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
