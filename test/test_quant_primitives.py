"""Quantization math: bit layout and fbgemm's min/max scheme, pinned on hand-computed values."""

import pytest
import torch

from int4tensor.quant_primitives import (
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
