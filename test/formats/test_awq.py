"""AutoAWQ GEMM import: AWQ nibble order along N, exact values, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from int4tensor.formats import awq
from test.formats.reference import AWQ, LINEAR, dequant_reference, pack_along_last, \
    random_integer_qparams
from test.helpers import sqnr


def awq_parts(u, z, s, order=AWQ):
    """AutoAWQ's layout: qweight [K, N/8] and qzeros [K/G, N/8] packed along N."""
    return {"qweight": pack_along_last(u.t(), order), "qzeros": pack_along_last(z, order),
            "scales": s}


def test_one_word_vector():
    """qweight row 0 = 0x86427531 holds u = [1..8] for N = 8 columns."""
    u = torch.zeros(8, 32, dtype=torch.long)
    u[:, 0] = torch.arange(1, 9)
    parts = awq_parts(u, torch.full((1, 8), 8), torch.ones(1, 8, dtype=torch.float16))
    assert parts["qweight"][0, 0].item() == -2042464975
    t = awq.import_weight(parts, awq.AWQConfig(32))
    assert t.dequantize()[:, 0].tolist() == [float(x - 8) for x in range(1, 9)]


@pytest.mark.parametrize("lead", [(), (2,)])
def test_exact_import(lead):
    u, z, s = random_integer_qparams(24, 256, 64, lead=lead)
    if lead:
        parts = {k: torch.stack([awq_parts(u[i], z[i], s[i])[k] for i in range(lead[0])])
                 for k in ("qweight", "qzeros", "scales")}
    else:
        parts = awq_parts(u, z, s)
    t = awq.import_weight(parts, awq.AWQConfig(64), "m")
    assert t.shape == (*lead, 24, 256) and t.dtype == torch.float32
    assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))
    # fp16 scales are exact in float32
    assert torch.equal(t.scale, s.float())


@settings(max_examples=20, deadline=None)
@given(n8=st.integers(1, 4), groups=st.integers(1, 3), g=st.sampled_from([32, 128]),
       seed=st.integers(0, 2**16))
def test_property_exact(n8, groups, g, seed):
    torch.manual_seed(seed)
    u, z, s = random_integer_qparams(8 * n8, groups * g, g)
    t = awq.import_weight(awq_parts(u, z, s), awq.AWQConfig(g))
    assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))


def test_linear_packed_file_read_as_awq_is_garbage():
    """A file packed linearly but labelled AWQ decodes to permuted columns: verify's ~0 dB."""
    u, z, s = random_integer_qparams(64, 128, 32)
    good = awq.import_weight(awq_parts(u, z, s), awq.AWQConfig(32)).dequantize()
    bad = awq.import_weight(awq_parts(u, z, s, order=LINEAR), awq.AWQConfig(32)).dequantize()
    assert sqnr(good, bad) < 3


def test_large_group_is_regrouped():
    u, z, s = random_integer_qparams(8, 1024, 512)
    t = awq.import_weight(awq_parts(u, z, s), awq.AWQConfig(512))
    assert t.group_size == 256
    assert torch.equal(t.dequantize(torch.float64), dequant_reference(u, z, s))


class TestErrors:
    def setup_method(self):
        self.u, self.z, self.s = random_integer_qparams(16, 128, 64)
        self.parts = awq_parts(self.u, self.z, self.s)

    def test_unpacked_qzeros(self):
        self.parts["qzeros"] = self.z.to(torch.int32)  # [K/G, N], not packed
        with pytest.raises(ValueError, match=r"m.qzeros has shape \[2, 16\], expected \[2, 2\]"):
            awq.import_weight(self.parts, awq.AWQConfig(64), "m")

    def test_group_size_disagrees(self):
        with pytest.raises(ValueError, match="group_size 32 does not give the 2 groups"):
            awq.import_weight(self.parts, awq.AWQConfig(32), "m")

    def test_scales_shape(self):
        self.parts["scales"] = self.s.t()
        with pytest.raises(ValueError, match=r"m.scales is torch.float16\[16, 2\]"):
            awq.import_weight(self.parts, awq.AWQConfig(64), "m")

    def test_dtype(self):
        self.parts["qweight"] = self.parts["qweight"].to(torch.int64)
        with pytest.raises(ValueError, match="must be int32"):
            awq.import_weight(self.parts, awq.AWQConfig(64), "m")

    def test_missing(self):
        del self.parts["qzeros"]
        with pytest.raises(ValueError, match=r"m: AWQ module lacks \['qzeros'\]"):
            awq.import_weight(self.parts, awq.AWQConfig(64), "m")


class TestConfig:
    def test_gemm(self):
        cfg = {"quant_method": "awq", "version": "gemm", "bits": 4, "group_size": 128,
               "zero_point": True}
        assert awq.parse_config(cfg) == awq.AWQConfig(128)

    @pytest.mark.parametrize("cfg, message", [
        ({"quant_method": "awq", "version": "gemv", "group_size": 128}, "'gemv'"),
        ({"quant_method": "awq", "bits": 8, "group_size": 128}, "8-bit"),
        ({"quant_method": "awq", "group_size": -1}, "group_size -1"),
        ({"quant_method": "gptq", "group_size": 128}, "not an AWQ config"),
    ])
    def test_unsupported(self, cfg, message):
        with pytest.raises(ValueError, match=message):
            awq.parse_config(cfg)
