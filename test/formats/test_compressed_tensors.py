"""compressed-tensors pack-quantized: our export against the hand-written layout, round trips,
errors, and (when installed) the compressed-tensors library reading our export."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from int4tensor import Int4Tensor
from int4tensor.formats import compressed_tensors as ct
from int4tensor.formats.common import from_integer_qparams
from test.formats.reference import (
    dequant_reference,
    pack_along_first,
    pack_along_last,
    random_integer_qparams,
)


def int_tensor(shape=(40, 256), g=64, symmetric=False, dtype=torch.bfloat16):
    w = torch.randn(shape, dtype=dtype)
    return Int4Tensor.from_hp(w, (1,) * (len(shape) - 1) + (g,),
                              zero_point_domain="none" if symmetric else "int")


class TestExportLayout:
    def test_matches_hand_written_layout(self):
        n, k, g = 20, 64, 32  # N not a multiple of 8: the packed zero points are padded
        u, z, s = random_integer_qparams(n, k, g, scale_dtype=torch.bfloat16)
        t = from_integer_qparams(u, s, z, dtype=torch.bfloat16)
        out = ct.export_weight(t)
        assert set(out) == {"weight_packed", "weight_scale", "weight_zero_point", "weight_shape"}
        assert out["weight_packed"].dtype == torch.int32 and out["weight_packed"].shape == (n, 8)
        assert torch.equal(out["weight_packed"], pack_along_last(u))  # along K, linear, u = q + 8
        assert torch.equal(out["weight_scale"], s.t())  # [N, K/G]
        assert out["weight_zero_point"].shape == (3, 2)  # [ceil(N/8), K/G]
        assert torch.equal(out["weight_zero_point"], pack_along_first(z.t()))  # along N
        assert out["weight_shape"].tolist() == [n, k] and out["weight_shape"].dtype == torch.int64

    def test_symmetric_has_no_zero_point(self):
        out = ct.export_weight(int_tensor(symmetric=True))
        assert set(out) == {"weight_packed", "weight_scale", "weight_shape"}

    def test_asymmetric_all_zero_z_is_still_written(self):
        """An asymmetric zero point that happens to be 0 (z = 8 here means zp = 0) must not be
        dropped when the caller says asymmetric."""
        u, z, s = random_integer_qparams(8, 64, 32, symmetric=True)
        out = ct.export_weight(from_integer_qparams(u, s, z), symmetric=False)
        assert "weight_zero_point" in out
        assert (out["weight_zero_point"] == -2004318072).all()  # 0x88888888

    def test_identity_with_our_qdata(self):
        t = int_tensor((3, 16, 128), 32)
        out = ct.export_weight(t)
        mask = torch.tensor(0x88888888 - (1 << 32), dtype=torch.int32)
        assert torch.equal((out["weight_packed"] ^ mask).view(torch.int8).reshape(t.qdata.shape),
                           t.qdata)
        assert torch.equal(out["weight_scale"], t.scale.transpose(-1, -2))


class TestRoundTrip:
    @pytest.mark.parametrize("shape", [(40, 256), (3, 24, 128)])
    @pytest.mark.parametrize("symmetric", [False, True])
    def test_export_import_export_is_bit_exact(self, shape, symmetric):
        t = int_tensor(shape, 64, symmetric)
        out = ct.export_weight(t)
        back = ct.import_weight(out, ct.CTConfig(64, symmetric))
        assert torch.equal(back.qdata, t.qdata) and torch.equal(back.scale, t.scale.float())
        assert torch.equal(back.dequantize(torch.bfloat16), t.dequantize(torch.bfloat16)) or \
            (back.dequantize() - t.dequantize().float()).abs().max() <= \
            t.scale.float().abs().max() * 16 * 2 ** -8  # only t's bf16 zero_point rounding
        again = ct.export_weight(back.to(torch.bfloat16))
        assert out.keys() == again.keys()
        for key in out:
            assert torch.equal(out[key], again[key]), key

    @settings(max_examples=20, deadline=None)
    @given(n=st.integers(1, 20), groups=st.integers(1, 3), g=st.sampled_from([32, 64]),
           symmetric=st.booleans(), seed=st.integers(0, 2**16))
    def test_property_import_is_exact(self, n, groups, g, symmetric, seed):
        torch.manual_seed(seed)
        u, z, s = random_integer_qparams(n, groups * g, g, symmetric)
        parts = {"weight_packed": pack_along_last(u), "weight_scale": s.t().contiguous(),
                 "weight_shape": torch.tensor([n, groups * g])}
        if not symmetric:
            parts["weight_zero_point"] = pack_along_first(z.t())
        t = ct.import_weight(parts, ct.CTConfig(g, symmetric))
        assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))
        out = ct.export_weight(t, symmetric=symmetric)
        for key, v in parts.items():
            assert torch.equal(out[key], v.to(out[key].dtype)), key

    def test_float_zero_export_warns(self):
        t = Int4Tensor.from_hp(torch.randn(16, 128), (1, 64))
        with pytest.warns(UserWarning, match="re-quantizing for export"):
            ct.export_weight(t, name="layer.weight")

    def test_symmetric_export_of_asymmetric_warns(self):
        with pytest.warns(UserWarning, match="symmetric export was asked for"):
            out = ct.export_weight(int_tensor(), symmetric=True)
        assert "weight_zero_point" not in out

    def test_channel_strategy(self):
        u, z, s = random_integer_qparams(8, 256, 256)
        parts = {"weight_packed": pack_along_last(u), "weight_scale": s.t().contiguous(),
                 "weight_shape": torch.tensor([8, 256]),
                 "weight_zero_point": pack_along_first(z.t())}
        t = ct.import_weight(parts, ct.CTConfig(None, False))
        assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))


def parts_for(n=16, k=128, g=64, symmetric=False):
    return ct.export_weight(int_tensor((n, k), g, symmetric))


class TestImportErrors:
    def test_group_size_disagrees_with_tensors(self):
        with pytest.raises(ValueError, match=r"layer.weight_scale is torch.bfloat16\[16, 2\], "
                                             r"expected a float \[16, 4\] .*disagree"):
            ct.import_weight(parts_for(g=64), ct.CTConfig(32, False), "layer")

    def test_missing_zero_point(self):
        parts = parts_for()
        del parts["weight_zero_point"]
        with pytest.raises(ValueError, match="asymmetric but weight_zero_point is missing"):
            ct.import_weight(parts, ct.CTConfig(64, False))

    def test_unpacked_zero_point_of_wrong_shape(self):
        parts = parts_for()
        parts["weight_zero_point"] = torch.zeros(2, 16, dtype=torch.int32)  # [K/G, N]
        with pytest.raises(ValueError, match=r"weight_zero_point is torch.int32\[2, 16\], "
                                             r"expected packed int32\[2, 2\]"):
            ct.import_weight(parts, ct.CTConfig(64, False))

    def test_packed_shape_contradicts_weight_shape(self):
        parts = parts_for()
        parts["weight_shape"] = torch.tensor([16, 256])
        with pytest.raises(ValueError, match="weight_packed is torch.int32\\[16, 16\\], "
                                             "expected int32\\[16, 32\\]"):
            ct.import_weight(parts, ct.CTConfig(64, False))

    def test_missing_tensor(self):
        parts = parts_for()
        del parts["weight_scale"]
        with pytest.raises(ValueError, match=r"lacks \['weight_scale'\]"):
            ct.import_weight(parts, ct.CTConfig(64, False))

    def test_act_order_g_idx(self):
        parts = parts_for()
        parts["weight_g_idx"] = torch.randperm(128) // 64
        with pytest.raises(ValueError, match="g_idx is unsorted"):
            ct.import_weight(parts, ct.CTConfig(64, False))


class TestConfig:
    def test_round_trip(self):
        cfg = ct.quantization_config(128, False, ["lm_head"])
        assert cfg["config_groups"]["group_0"]["weights"]["group_size"] == 128
        assert ct.parse_config(cfg) == ct.CTConfig(128, False)
        assert ct.parse_config(ct.quantization_config(32, True)) == ct.CTConfig(32, True)

    @pytest.mark.parametrize("change, message", [
        (lambda c: c.update(format="float-quantized") or
         c["config_groups"]["group_0"].pop("format"), "format 'float-quantized'"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(num_bits=8), "int8"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(actorder="group"),
         "actorder='group'"),
        (lambda c: c["config_groups"]["group_0"]["weights"].update(strategy="tensor"),
         "strategy 'tensor'"),
        (lambda c: c["config_groups"]["group_0"].update(input_activations={"num_bits": 8}),
         "quantizes activations"),
    ])
    def test_unsupported(self, change, message):
        cfg = ct.quantization_config(128, False)
        change(cfg)
        with pytest.raises(ValueError, match=message):
            ct.parse_config(cfg)


class TestCompressedTensorsLibrary:
    """The compressed-tensors package itself reads what we write."""

    def test_pack_matches_library(self):
        helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
        t = int_tensor((3, 24, 128), 32)
        out = ct.export_weight(t)
        q = torch.stack([helpers.unpack_from_int32(out["weight_packed"][i], 4, (24, 128))
                         for i in range(3)])
        from int4tensor.quant_primitives import unpack_int4

        assert torch.equal(q, unpack_int4(t.qdata))
        assert torch.equal(helpers.pack_to_int32(unpack_int4(t.qdata[0]), 4),
                           out["weight_packed"][0])

    @pytest.mark.parametrize("symmetric", [False, True])
    def test_library_decompress_matches_our_dequantize(self, symmetric):
        pytest.importorskip("compressed_tensors")
        from compressed_tensors.compressors.pack_quantized.base import (
            PackedQuantizationCompressor,
        )
        from compressed_tensors.quantization import QuantizationConfig

        qcfg = QuantizationConfig.model_validate(ct.quantization_config(64, symmetric))
        scheme = next(iter(qcfg.config_groups.values()))
        t = int_tensor((40, 256), 64, symmetric)
        out = ct.export_weight(t)
        dense = PackedQuantizationCompressor.decompress(out, scheme)["weight"]
        ours = ct.import_weight(out, ct.parse_config(ct.quantization_config(64, symmetric)))
        assert dense.dtype == torch.bfloat16
        # both compute (q - zp) * s: the same values, up to the library's bf16 arithmetic
        assert torch.equal(ours.dequantize(torch.bfloat16), dense)
