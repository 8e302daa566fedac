"""Nibble packing against the checked test vectors of shared/formats/README.md."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from int4tensor.formats.common import (
    AWQ_ORDER,
    LINEAR_ORDER,
    from_integer_qparams,
    pack_nibbles,
    to_integer_qparams,
    unpack_nibbles,
)
from int4tensor.quant_primitives import pack_int4
from test.formats.reference import dequant_reference, pack_along_last, random_integer_qparams

U = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])


class TestVectors:
    def test_linear_word(self):
        assert pack_nibbles(U).item() == -2023406815  # 0x87654321

    def test_awq_word(self):
        assert pack_nibbles(U, order=AWQ_ORDER).item() == -2042464975  # 0x86427531

    def test_reverse_order_in_the_wrong_role(self):
        # AWQ_REVERSE_ORDER used as slot -> element: the classic bug, a different word
        assert pack_nibbles(U, order=(0, 4, 1, 5, 2, 6, 3, 7)).item() == -2072812975  # 0x84736251

    def test_cross_reads(self):
        awq_word = pack_nibbles(U, order=AWQ_ORDER)
        lin_word = pack_nibbles(U)
        assert unpack_nibbles(awq_word, 8).tolist() == [[1, 3, 5, 7, 2, 4, 6, 8]]
        assert unpack_nibbles(lin_word, 8, order=AWQ_ORDER).tolist() == [[1, 5, 2, 6, 3, 7, 4, 8]]
        assert unpack_nibbles(awq_word, 8, order=AWQ_ORDER).tolist() == U.tolist()

    def test_compressed_tensors_signed_vector(self):
        q = torch.tensor([[1, 2, 3, 4, 5, 6, 7, -8]])
        assert pack_nibbles(q + 8).item() == 267242409  # 0x0FEDCBA9

    def test_ours_vs_linear_word(self):
        ours = pack_int4((U - 8).to(torch.int8))
        assert ours.tolist() == [[-87, -53, -19, 15]]
        assert ours.view(torch.int32).item() == 0x0FEDCBA9 == (0x87654321 ^ 0x88888888)

    @pytest.mark.parametrize("z, word", [([8] * 8, -2004318072),  # 0x88888888
                                         ([7] * 8, 0x77777777),
                                         ([(x - 1) & 0xF for x in range(8)], 0x6543210F)])
    def test_zero_words(self, z, word):
        assert pack_nibbles(torch.tensor([z])).item() == word

    def test_layout_identity_with_ours(self):
        """ours.qdata == (linear words ^ 0x88888888) viewed as int8 (little-endian)."""
        u = torch.randint(0, 16, (5, 64))
        words = pack_nibbles(u)
        ours = pack_int4((u - 8).to(torch.int8))
        flipped = words ^ torch.tensor(0x88888888 - (1 << 32), dtype=torch.int32)
        assert torch.equal(flipped.view(torch.int8).reshape(5, 32), ours)


class TestPacking:
    @settings(max_examples=30, deadline=None)
    @given(rows=st.integers(1, 5), cols=st.integers(1, 40), awq=st.booleans(),
           dim=st.sampled_from([0, 1]), seed=st.integers(0, 2**16))
    def test_round_trip_and_reference(self, rows, cols, awq, dim, seed):
        torch.manual_seed(seed)
        order = AWQ_ORDER if awq else LINEAR_ORDER
        u = torch.randint(0, 16, (rows, cols))
        words = pack_nibbles(u, dim=dim, order=order)
        assert words.dtype == torch.int32
        assert torch.equal(unpack_nibbles(words, u.shape[dim], dim=dim, order=order).long(), u)
        ref = pack_along_last(u if dim == 1 else u.t(), list(order))
        assert torch.equal(words if dim == 1 else words.t(), ref)

    def test_out_of_range_is_refused(self):
        with pytest.raises(ValueError, match=r"values must be in \[0, 15\]"):
            pack_nibbles(torch.tensor([[16, 0, 0, 0, 0, 0, 0, 0]]))

    def test_unpack_needs_int32(self):
        with pytest.raises(TypeError, match="must be int32"):
            unpack_nibbles(torch.zeros(2, dtype=torch.int64), 8)

    def test_unpack_too_few_words(self):
        with pytest.raises(ValueError, match="fewer than the 20 expected"):
            unpack_nibbles(torch.zeros(1, 2, dtype=torch.int32), 20)


class TestIntegerBridge:
    @pytest.mark.parametrize("lead", [(), (3,)])
    @pytest.mark.parametrize("symmetric", [False, True])
    def test_exact_both_ways(self, lead, symmetric):
        u, z, s = random_integer_qparams(16, 128, 32, symmetric, lead=lead)
        t = from_integer_qparams(u, s, None if symmetric else z)
        assert t.dtype == torch.float32 and t.block_size == (*(1,) * (len(lead) + 1), 32)
        assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))
        u2, s2, z2 = to_integer_qparams(t)
        assert torch.equal(u2.long(), u) and torch.equal(z2, z)
        assert torch.equal(s2, s.float())

    def test_unsupported_group_is_regrouped_exactly(self):
        u, z, s = random_integer_qparams(8, 1024, 512)
        t = from_integer_qparams(u, s, z)
        assert t.group_size == 256 and t.scale.shape == (4, 8)
        assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))

    def test_group_that_no_supported_size_divides(self):
        u, z, s = random_integer_qparams(8, 96, 48)
        with pytest.raises(ValueError, match="group size 48 cannot be represented"):
            from_integer_qparams(u, s, z)

    def test_bf16_storage_rounds_zero_only(self):
        u, z, s = random_integer_qparams(8, 64, 32, scale_dtype=torch.bfloat16)
        t = from_integer_qparams(u, s, z, dtype=torch.bfloat16)
        assert torch.equal(t.scale, s)  # scales exact
        u2, s2, z2 = to_integer_qparams(t)  # integer zeros still recovered exactly
        assert torch.equal(z2, z) and torch.equal(u2.long(), u)

    def test_float_zero_points_are_requantized_with_a_warning(self):
        from int4tensor import Int4Tensor
        from test.helpers import sqnr

        w = torch.randn(32, 256, dtype=torch.bfloat16)
        t = Int4Tensor.from_hp(w, (1, 64))  # fbgemm float zero points
        with pytest.warns(UserWarning, match="lin: re-quantizing for export .* float zero "
                                             "points"):
            u, s, z = to_integer_qparams(t, name="lin")
        back = from_integer_qparams(u, s, z)
        direct = Int4Tensor.from_hp(w, (1, 64), zero_point_domain="int")
        # a second rounding: about 3 dB below quantizing w directly with integer zeros
        assert sqnr(w, direct.dequantize()) - 4 < sqnr(w, back.dequantize()) < \
            sqnr(w, direct.dequantize()) - 1

    def test_transposed_is_refused(self):
        from int4tensor import Int4Tensor

        t = Int4Tensor.from_hp(torch.randn(2, 32, 64), (1, 1, 32)).transpose(-1, -2)
        with pytest.raises(ValueError, match="transposed Int4Tensor"):
            to_integer_qparams(t)
