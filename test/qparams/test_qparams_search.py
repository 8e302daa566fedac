"""The data-free qparams searches ("mse", "hqq") against "minmax"."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from int4tensor import Int4Tensor, Int4WeightOnlyConfig, quantize_
from int4tensor.qparams import QPARAMS_ALGORITHMS, choose_qparams
from int4tensor.quant_primitives import grouped, quantize_int4
from test.helpers import sqnr

SEARCHES = ("mse", "hqq")
DOMAINS = ("float", "int", "none")


def outlier_weight(n=128, k=1024, frac=0.01, factor=10.0, dtype=torch.float32):
    """Gaussian weight with ``frac`` of its entries multiplied by ``factor``."""
    w = torch.randn(n, k)
    mask = torch.rand(n, k) < frac
    w[mask] *= factor
    return w.to(dtype)


def fake_quant(w, scale, minimum, g):
    u = quantize_int4(w, scale, minimum, g).float() + 8
    return (grouped(u, g) * scale.unsqueeze(-1) + minimum.unsqueeze(-1)).flatten(-2)


def group_errors(w, scale, minimum, g):
    return grouped(w.float() - fake_quant(w, scale, minimum, g), g).square().sum(-1)


def test_registered():
    assert {"minmax", "mse", "hqq"} <= set(QPARAMS_ALGORITHMS)


@pytest.mark.parametrize("algorithm", SEARCHES)
@pytest.mark.parametrize("domain", DOMAINS)
@pytest.mark.parametrize("group_size", [32, 128])
def test_never_worse_than_minmax_per_group(algorithm, domain, group_size):
    w = outlier_weight()
    ref = group_errors(w, *choose_qparams(w, group_size, "minmax", domain), group_size)
    got = group_errors(w, *choose_qparams(w, group_size, algorithm, domain), group_size)
    assert bool((got <= ref * (1 + 1e-5) + 1e-9).all())
    assert got.sum() < 0.97 * ref.sum()  # and clearly better overall


@pytest.mark.parametrize("algorithm,min_gain_db", [("mse", 0.7), ("hqq", 0.5)])
def test_sqnr_gain_on_outlier_weights(algorithm, min_gain_db):
    """Gaussian weights with 1% outliers (x10), G=128: the search buys real dB over min/max."""
    w = outlier_weight(256, 1024)
    base = sqnr(w, fake_quant(w, *choose_qparams(w, 128, "minmax"), 128))
    got = sqnr(w, fake_quant(w, *choose_qparams(w, 128, algorithm), 128))
    assert got - base >= min_gain_db, (base, got)


@pytest.mark.parametrize("algorithm", SEARCHES)
def test_gaussian_weights_improve(algorithm):
    w = torch.randn(128, 512)
    base = sqnr(w, fake_quant(w, *choose_qparams(w, 64, "minmax"), 64))
    got = sqnr(w, fake_quant(w, *choose_qparams(w, 64, algorithm), 64))
    assert got - base >= 0.3, (base, got)


@pytest.mark.parametrize("algorithm", SEARCHES)
def test_int_domain_keeps_integer_zero_points(algorithm):
    w = outlier_weight(64, 512)
    scale, minimum = choose_qparams(w, 64, algorithm, "int")
    z = -minimum / scale
    assert torch.allclose(z, z.round(), atol=1e-4)
    assert bool(((z.round() >= 0) & (z.round() <= 15)).all())
    # and in the stored tensor: zero_point = (8 - z) * scale with integer z
    t = Int4Tensor.from_hp(w, (1, 64), algorithm=algorithm, zero_point_domain="int")
    z_stored = 8 - t.zero_point / t.scale
    assert torch.allclose(z_stored, z_stored.round(), atol=1e-3)


@pytest.mark.parametrize("algorithm", SEARCHES)
def test_symmetric_domain_has_zero_zero_point(algorithm):
    w = outlier_weight(64, 512)
    scale, minimum = choose_qparams(w, 64, algorithm, "none")
    torch.testing.assert_close(minimum, -8 * scale, rtol=0, atol=0)
    t = Int4Tensor.from_hp(w, (1, 64), algorithm=algorithm, zero_point_domain="none")
    assert bool((t.zero_point == 0).all())


@pytest.mark.parametrize("algorithm", SEARCHES)
@pytest.mark.parametrize("domain", DOMAINS)
def test_quantize_and_linear(algorithm, domain):
    """Through the config and quantize_: an Int4Tensor whose F.linear beats min/max's."""
    lin = nn.Linear(512, 96, bias=True).to(torch.bfloat16)
    with torch.no_grad():
        lin.weight.copy_(outlier_weight(96, 512, dtype=torch.bfloat16) * 0.02)
    x = torch.randn(256, 512, dtype=torch.bfloat16)
    ref = F.linear(x.float(), lin.weight.float(), lin.bias.float())
    outs = {}
    for algo in ("minmax", algorithm):
        m = nn.Sequential(nn.Linear(512, 96).to(torch.bfloat16))
        m[0].load_state_dict(lin.state_dict())
        quantize_(m, Int4WeightOnlyConfig(group_size=128, int4_choose_qparams_algorithm=algo,
                                          zero_point_domain=domain))
        assert isinstance(m[0].weight, Int4Tensor)
        outs[algo] = sqnr(ref, m(x))
    assert outs[algorithm] > outs["minmax"] + 0.1, outs


@pytest.mark.parametrize("algorithm", SEARCHES)
def test_3d_weights_and_meta(algorithm):
    w = torch.randn(3, 32, 256)
    scale, minimum = choose_qparams(w, 128, algorithm)
    assert scale.shape == minimum.shape == (3, 32, 2) and scale.dtype == torch.float32
    for e in range(3):  # experts are independent
        s_e, m_e = choose_qparams(w[e], 128, algorithm)
        torch.testing.assert_close(scale[e], s_e)
    t = Int4Tensor.from_hp(torch.empty(64, 256, device="meta"), (1, 128), algorithm=algorithm)
    assert t.qdata.device.type == "meta" and t.scale.shape == (2, 64)


def test_constant_groups_are_exact():
    """Degenerate groups (all equal) must not produce NaN/zero scales."""
    w = torch.zeros(4, 256)
    w[1] = 0.5
    for algorithm in SEARCHES:
        for domain in DOMAINS:
            scale, minimum = choose_qparams(w, 128, algorithm, domain)
            assert bool(torch.isfinite(scale).all() & (scale > 0).all())
            assert torch.allclose(fake_quant(w, scale, minimum, 128), w, atol=1e-5)


def test_bad_arguments():
    w = torch.randn(8, 256)
    with pytest.raises(ValueError, match="unknown qparams algorithm 'gptq'"):
        choose_qparams(w, 128, "gptq")
    with pytest.raises(ValueError, match="zero_point_domain"):
        choose_qparams(w, 128, "mse", "asym")
    with pytest.raises(ValueError, match="not a multiple of the group size"):
        QPARAMS_ALGORITHMS["hqq"](torch.randn(8, 96), 64, "float")
    with pytest.raises(ValueError, match="int4_choose_qparams_algorithm"):
        Int4WeightOnlyConfig(int4_choose_qparams_algorithm="awq")
