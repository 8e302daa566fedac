"""Quantization math: bit layout and fbgemm's min/max scheme, pinned on hand-computed values."""

import pytest
import torch

from int4tensor.quant_primitives import (
    _dequantize_int4_cpu_eager,
    _dequantize_int4_formula,
    dequantize_int4,
    pack_int4,
    quantize_minmax,
    unpack_int4,
)


def test_pack_int4_nibble_order_matches_the_format_test_vector():
    # shared/formats: q = u - 8 for u = [1..8] packs to bytes A9 CB ED 0F.
    q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]], dtype=torch.int8) - 8
    packed = pack_int4(q)
    assert packed.view(torch.uint8).tolist() == [[0xA9, 0xCB, 0xED, 0x0F]]
    # low nibble = element 2j, high nibble = element 2j+1
    assert packed.view(torch.int32).item() == 0x0FEDCBA9


def test_unpack_inverts_pack_for_every_value():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 2)[:, torch.randperm(32)]
    assert torch.equal(unpack_int4(pack_int4(q)), q)


def test_pack_rejects_odd_length_and_wrong_dtype():
    with pytest.raises(ValueError, match="even"):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))
    with pytest.raises(TypeError, match="int8"):
        pack_int4(torch.zeros(2, 4, dtype=torch.int32))


def test_quantize_minmax_hand_computed_example():
    # One group of 32: min 0, max 15 -> scale = 15/15 = 1, zero_point = 0 + 8*1 = 8.
    # u = round((w - 0) / 1): 2.5 -> 2 and 3.5 -> 4 (round half to even, as torch.round/fbgemm).
    w = torch.zeros(1, 32)
    w[0, :6] = torch.tensor([0.0, 15.0, 2.5, 3.5, 7.4, 7.6])
    qdata, scale, zero_point = quantize_minmax(w, 32)
    # q = u - 8 = [-8, 7, -6, -4, -1, 0, -8, ...]
    # byte0 = 0x8 | 7<<4 = 0x78; byte1 = 0xA | 0xC<<4 = 0xCA; byte2 = 0xF | 0<<4 = 0x0F;
    # the remaining 13 bytes are pairs of -8: 0x88.
    assert qdata.view(torch.uint8).tolist() == [[0x78, 0xCA, 0x0F] + [0x88] * 13]
    assert scale.tolist() == [[1.0]] and zero_point.tolist() == [[8.0]]
    assert dequantize_int4(qdata, scale, zero_point, 32, torch.float32)[0, :6].tolist() == [
        0.0, 15.0, 2.0, 4.0, 7.0, 8.0]


def test_quantize_minmax_negative_range():
    # min -4, max 11: scale 1, zero_point = -4 + 8 = 4; w = -4 -> q = -8, w = 11 -> q = 7.
    w = torch.linspace(-4, 11, 16).repeat_interleave(2).unsqueeze(0)
    qdata, scale, zero_point = quantize_minmax(w, 32)
    assert (scale.item(), zero_point.item()) == (1.0, 4.0)
    assert torch.equal(unpack_int4(qdata)[0], torch.arange(-8, 8, dtype=torch.int8).repeat_interleave(2))


def test_shapes_and_dtypes_2d_and_3d():
    for shape in [(64, 256), (3, 64, 256)]:
        w = torch.randn(shape, dtype=torch.bfloat16)
        qdata, scale, zero_point = quantize_minmax(w, 128)
        assert qdata.shape == (*shape[:-1], 128) and qdata.dtype == torch.int8
        assert scale.shape == (*shape[:-2], 2, 64) and scale.dtype == torch.bfloat16
        assert zero_point.shape == scale.shape and zero_point.dtype == torch.bfloat16


def test_3d_quantizes_each_expert_like_2d():
    w = torch.randn(4, 32, 128)
    q3, s3, z3 = quantize_minmax(w, 64)
    for e in range(4):
        q2, s2, z2 = quantize_minmax(w[e], 64)
        assert torch.equal(q3[e], q2) and torch.equal(s3[e], s2) and torch.equal(z3[e], z2)


def test_constant_group_uses_the_minimum_scale():
    w = torch.full((2, 64), 3.0)
    qdata, scale, zero_point = quantize_minmax(w, 32)
    assert torch.allclose(scale, torch.full_like(scale, 1e-6 / 15))
    assert torch.allclose(dequantize_int4(qdata, scale, zero_point, 32, torch.float32), w)


@pytest.mark.parametrize("group_size", [32, 64, 128, 256])
def test_reconstruction_error_within_half_a_step(group_size):
    w = torch.randn(16, 512)
    qdata, scale, zero_point = quantize_minmax(w, group_size)
    deq = dequantize_int4(qdata, scale, zero_point, group_size, torch.float32)
    step = scale.t().repeat_interleave(group_size, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-6).all()


class TestZeroPointDomains:
    def test_int_domain_has_integer_zero_points(self):
        w = torch.randn(32, 256)
        qdata, scale, zero_point = quantize_minmax(w, 64, zero_point_domain="int")
        z = 8 - zero_point / scale  # zero_point = (8 - z) * scale
        assert torch.allclose(z, z.round(), atol=1e-4)
        assert ((z.round() >= 0) & (z.round() <= 15)).all()
        deq = dequantize_int4(qdata, scale, zero_point, 64, torch.float32)
        assert (deq - w).abs().max() <= scale.max() / 2 + 1e-5

    def test_none_domain_is_symmetric(self):
        w = torch.randn(32, 256)
        qdata, scale, zero_point = quantize_minmax(w, 64, zero_point_domain="none")
        assert torch.equal(zero_point, torch.zeros_like(zero_point))
        deq = dequantize_int4(qdata, scale, zero_point, 64, torch.float32)
        assert (deq - w).abs().max() <= scale.max() / 2 + 1e-5

    def test_all_positive_group_int_domain_keeps_zero_representable(self):
        w = torch.rand(4, 64) + 1.0  # min > 0: the range is widened down to 0, z = 0
        _, scale, zero_point = quantize_minmax(w, 64, zero_point_domain="int")
        assert torch.allclose(zero_point, 8 * scale)

    def test_unknown_domain(self):
        with pytest.raises(ValueError, match="zero_point_domain"):
            quantize_minmax(torch.randn(4, 64), 64, zero_point_domain="uint")


# ---- the eager CPU dequantize ----------------------------------------------------------------
@pytest.mark.parametrize("shape,group_size", [((72, 256), 128), ((3, 40, 96), 32),
                                              ((33, 512), 256)])
@pytest.mark.parametrize("weight_dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_eager_cpu_dequantize_is_bit_identical_to_the_formula(shape, group_size, weight_dtype,
                                                              dtype):
    w = torch.randn(shape, dtype=weight_dtype)
    qdata, scale, zero_point = quantize_minmax(w, group_size)
    formula = _dequantize_int4_formula(qdata, scale, zero_point, group_size, dtype)
    fast = _dequantize_int4_cpu_eager(qdata, scale, zero_point, group_size, dtype)
    assert fast.dtype == dtype and fast.shape == w.shape
    assert torch.equal(fast, formula)
    # the public function takes the eager path on a CPU
    assert torch.equal(dequantize_int4(qdata, scale, zero_point, group_size, dtype), formula)


def test_eager_cpu_dequantize_of_strided_views():
    """A K slice of qdata (not contiguous) and transposed-storage scales dequantize alike."""
    qdata, scale, zero_point = quantize_minmax(torch.randn(64, 512), 128)
    q, s, z = qdata[:, 64:192], scale[1:3], zero_point[1:3]
    assert not q.is_contiguous()
    assert torch.equal(_dequantize_int4_cpu_eager(q, s, z, 128, torch.bfloat16),
                       _dequantize_int4_formula(q, s, z, 128, torch.bfloat16))
    s_t = scale.t().contiguous().t()  # same values, column-major storage
    assert torch.equal(_dequantize_int4_cpu_eager(qdata, s_t, zero_point, 128, torch.float32),
                       _dequantize_int4_formula(qdata, scale, zero_point, 128, torch.float32))


def test_every_int4_value_dequantizes_exactly():
    """All 16 values of both nibbles, through the eager path: q * scale + zero_point."""
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(16)  # 256 values, both nibble positions
    q = torch.stack([q, q.roll(1)]).repeat(4, 1)  # [8, 256]
    scale = torch.full((2, 8), 0.5)
    zero_point = torch.full((2, 8), 0.25)
    out = dequantize_int4(pack_int4(q), scale, zero_point, 128, torch.float32)
    assert torch.equal(out, q.float() * 0.5 + 0.25)
