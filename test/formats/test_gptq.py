"""GPTQ import: qweight along K, v1 (z - 1) and v2 zero points, g_idx, ragged K."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from int4tensor.formats import gptq
from test.formats.reference import dequant_reference, pack_along_first, pack_along_last, \
    random_integer_qparams


def gptq_parts(u, z, s, version="gptq", g_idx=True):
    """qweight [K/8, N] along K; qzeros [K/G, N/8] along N storing z - 1 (v1, masked) or z."""
    stored = (z - 1) & 0xF if version == "gptq" else z
    parts = {"qweight": pack_along_first(u.t()), "qzeros": pack_along_last(stored), "scales": s}
    if g_idx:
        k, g = u.shape[-1], u.shape[-1] // s.shape[-2]
        parts["g_idx"] = (torch.arange(k) // g).to(torch.int32)
    return parts


@pytest.mark.parametrize("version", ["gptq", "gptq_v2"])
def test_exact_import(version):
    u, z, s = random_integer_qparams(32, 256, 128)
    z = z.clamp(min=1) if version == "gptq" else z  # v1 cannot hold z = 0 (see below)
    t = gptq.import_weight(gptq_parts(u, z, s, version), gptq.GPTQConfig(128, version), "m")
    assert t.shape == (32, 256)
    assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))


@settings(max_examples=20, deadline=None)
@given(k8=st.integers(1, 8), n8=st.integers(1, 3), v2=st.booleans(), seed=st.integers(0, 2**16))
def test_property_v1_and_v2(k8, n8, v2, seed):
    torch.manual_seed(seed)
    k = 32 * k8
    u, z, s = random_integer_qparams(8 * n8, k, 32)
    z = z.clamp(min=1)
    version = "gptq_v2" if v2 else "gptq"
    t = gptq.import_weight(gptq_parts(u, z, s, version), gptq.GPTQConfig(32, version))
    assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))


class TestZeroConventions:
    def test_symmetric_words(self):
        u, z, s = random_integer_qparams(8, 64, 32, symmetric=True)
        v1 = gptq_parts(u, z, s, "gptq")
        v2 = gptq_parts(u, z, s, "gptq_v2")
        assert (v1["qzeros"] == 0x77777777).all() and (v2["qzeros"] == -2004318072).all()
        for parts, fmt in ((v1, "gptq"), (v2, "gptq_v2")):
            t = gptq.import_weight(parts, gptq.GPTQConfig(32, fmt))
            assert (t.zero_point == 0).all()

    def test_v2_zeros_labelled_v1_are_detected(self):
        u, z, s = random_integer_qparams(8, 64, 32, symmetric=True)
        with pytest.warns(UserWarning, match="labelled GPTQ v1 but every stored zero is 8"):
            t = gptq.import_weight(gptq_parts(u, z, s, "gptq_v2"), gptq.GPTQConfig(32, "gptq"))
        assert (t.zero_point == 0).all()

    def test_v1_zeros_labelled_v2_are_detected(self):
        u, z, s = random_integer_qparams(8, 64, 32, symmetric=True)
        with pytest.warns(UserWarning, match="labelled gptq_v2 but every stored zero is 7"):
            t = gptq.import_weight(gptq_parts(u, z, s, "gptq"), gptq.GPTQConfig(32, "gptq_v2"))
        assert (t.zero_point == 0).all()

    def test_v1_unmasked_zero_is_refused(self):
        """AutoGPTQ packed z - 1 = -1 for z = 0 unmasked: nibble 15 (z = 16) is impossible."""
        u, z, s = random_integer_qparams(8, 64, 32)
        z[0, 0] = 0
        with pytest.raises(ValueError, match=r"m.qzeros: a GPTQ v1 stored zero of 15 means "
                                             r"z = 16"):
            gptq.import_weight(gptq_parts(u, z, s, "gptq"), gptq.GPTQConfig(32, "gptq"), "m")


class TestGroups:
    def test_act_order_is_refused(self):
        u, z, s = random_integer_qparams(8, 128, 32)
        parts = gptq_parts(u, z.clamp(min=1), s)
        parts["g_idx"] = parts["g_idx"][torch.randperm(128)]
        with pytest.raises(ValueError, match=r"m.g_idx is unsorted \(act-order / desc_act\)"):
            gptq.import_weight(parts, gptq.GPTQConfig(32), "m")

    def test_sorted_but_not_trivial_g_idx(self):
        u, z, s = random_integer_qparams(8, 128, 32)
        parts = gptq_parts(u, z.clamp(min=1), s)
        parts["g_idx"] = torch.tensor([0] * 40 + [1] * 24 + [2] * 32 + [3] * 32)
        with pytest.raises(ValueError, match="g_idx is not k // group_size"):
            gptq.import_weight(parts, gptq.GPTQConfig(32), "m")

    def test_ragged_k(self):
        """K = 96 with G = 64: two groups in scales (ceil), the last one short."""
        u = torch.randint(0, 16, (8, 96))
        s = torch.rand(2, 8, dtype=torch.float16)
        parts = {"qweight": pack_along_first(u.t()), "scales": s,
                 "qzeros": pack_along_last(torch.full((2, 8), 7))}
        with pytest.raises(ValueError, match="K = 96 is not a multiple of group_size 64 "
                                             r"\(ragged last group\)"):
            gptq.import_weight(parts, gptq.GPTQConfig(64), "m")

    def test_per_channel(self):
        u, z, s = random_integer_qparams(8, 256, 256)
        z = z.clamp(min=1)
        t = gptq.import_weight(gptq_parts(u, z, s, g_idx=False), gptq.GPTQConfig(-1))
        assert t.group_size == 256
        assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))

    def test_scales_group_count_disagrees(self):
        u, z, s = random_integer_qparams(8, 128, 32)
        with pytest.raises(ValueError, match="128 / group_size 64 = 2 groups, but scales has 4"):
            gptq.import_weight(gptq_parts(u, z.clamp(min=1), s), gptq.GPTQConfig(64), "m")


class TestConfig:
    def test_parse(self):
        cfg = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False,
               "sym": True, "checkpoint_format": "gptq"}
        assert gptq.parse_config(cfg) == gptq.GPTQConfig(128, "gptq", True)

    @pytest.mark.parametrize("cfg, message", [
        ({"quant_method": "gptq", "bits": 3}, "3-bit"),
        ({"quant_method": "gptq", "checkpoint_format": "marlin"}, "'marlin'"),
        ({"quant_method": "gptq", "group_size": 0}, "group_size 0"),
    ])
    def test_unsupported(self, cfg, message):
        with pytest.raises(ValueError, match=message):
            gptq.parse_config(cfg)
