"""AWQ-style scaling and GPTQ on a small model: better held-out output than min/max."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from int4tensor import Int4Tensor, Int4WeightOnlyConfig, quantize_
from int4tensor.calibration import awq_quantize_, gptq_quantize_
from int4tensor.calibration.gptq import gptq_quantize_weight
from test.helpers import sqnr


class TinyMLP(nn.Module):
    """``x [B, T, 256] -> [B, T, 256]``; the input has a few high-magnitude channels and
    correlated features, like transformer activations."""

    def __init__(self):
        super().__init__()
        self.up = nn.Linear(256, 512)
        self.down = nn.Linear(512, 256)
        self.mix = nn.Parameter(torch.eye(256) + 0.3 * torch.randn(256, 256) / 16,
                                requires_grad=False)
        gain = torch.ones(256)
        gain[torch.randperm(256)[:8]] = 20.0  # outlier input channels
        self.register_buffer("gain", gain)

    def forward(self, z):
        x = (z @ self.mix) * self.gain
        return self.down(F.gelu(self.up(x)))


def make_model(dtype=torch.float32):
    torch.manual_seed(0)
    return TinyMLP().to(dtype)


def data(n_batches, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 64, 256, generator=g).to(dtype) for _ in range(n_batches)]


def held_out_sqnr(model, ref_model, batches):
    with torch.no_grad():
        ref = torch.cat([ref_model(b).float() for b in batches])
        out = torch.cat([model(b).float() for b in batches])
    return sqnr(ref, out)


def quantized(method, config, dtype=torch.float32, **kw):
    model = make_model(dtype)
    if method == "rtn":
        quantize_(model, config)
    elif method == "awq":
        awq_quantize_(model, data(4, 1, dtype), config, progress_bar=False, **kw)
    else:
        gptq_quantize_(model, data(4, 1, dtype), config, progress_bar=False, **kw)
    return model


@pytest.mark.parametrize("method,kw,min_gain_db", [
    ("awq", {}, 1.0),
    ("gptq", {}, 1.0),
    ("gptq", {"act_order": True}, 1.0),
])
def test_beats_minmax_on_held_out_data(method, kw, min_gain_db):
    config = Int4WeightOnlyConfig(group_size=128)
    ref, test = make_model(), data(4, 2)  # different seed from the calibration batches
    base = held_out_sqnr(quantized("rtn", config), ref, test)
    model = quantized(method, config, **kw)
    for layer in (model.up, model.down):
        assert isinstance(layer.weight, Int4Tensor)
        assert layer.weight.group_size == 128
    got = held_out_sqnr(model, ref, test)
    assert got - base >= min_gain_db, (base, got)


def test_awq_sets_act_pre_scale_and_linear_matches_dequantize():
    model = quantized("awq", Int4WeightOnlyConfig(group_size=64), dtype=torch.bfloat16)
    w = model.up.weight
    assert w.act_pre_scale is not None and w.act_pre_scale.shape == (256,)
    assert w.act_pre_scale.dtype == torch.bfloat16
    assert not torch.allclose(w.act_pre_scale.float(), torch.ones(256))  # it did scale
    x = torch.randn(5, 256, dtype=torch.bfloat16) * model.gain.to(torch.bfloat16)
    ref = F.linear(x.float(), w.dequantize(torch.float32), model.up.bias.float())
    assert sqnr(ref, F.linear(x, w, model.up.bias)) > 35


@pytest.mark.parametrize("method", ["awq", "gptq"])
@pytest.mark.parametrize("algorithm,domain", [("mse", "float"), ("minmax", "int"),
                                              ("hqq", "none")])
def test_combines_with_searches_and_domains(method, algorithm, domain):
    config = Int4WeightOnlyConfig(group_size=128, int4_choose_qparams_algorithm=algorithm,
                                  zero_point_domain=domain)
    ref, test = make_model(torch.bfloat16), data(2, 2, torch.bfloat16)
    model = quantized(method, config, dtype=torch.bfloat16)
    got = held_out_sqnr(model, ref, test)
    same_rtn = held_out_sqnr(quantized("rtn", config, dtype=torch.bfloat16), ref, test)
    minmax_rtn = held_out_sqnr(quantized("rtn", Int4WeightOnlyConfig(
        group_size=128, zero_point_domain=domain), dtype=torch.bfloat16), ref, test)
    # never worse than plain quantization with the same search, clearly better than min/max
    # (AWQ on top of "mse" may find no better scale on these random weights: alpha = 0)
    assert got > same_rtn - 0.1 and got > minmax_rtn + 0.5, (got, same_rtn, minmax_rtn)
    t = model.down.weight
    if domain == "none":
        assert bool((t.zero_point == 0).all())
    if domain == "int":
        z = 8 - t.zero_point.float() / t.scale.float()
        assert torch.allclose(z, z.round(), atol=0.05)


def test_gptq_weight_reduces_layer_error():
    """On correlated inputs GPTQ's compensation beats rounding each weight to nearest."""
    k, n = 256, 64
    x = torch.randn(2048, k) @ (torch.eye(k) + torch.randn(k, k) / k ** 0.5)
    w = torch.randn(n, k)
    from int4tensor.calibration.awq import _fake_quant
    from int4tensor.qparams import choose_qparams

    rtn, _, _ = _fake_quant(w, 64, "minmax", "float", torch.float32)
    w_q, scale, minimum = gptq_quantize_weight(w, x.T @ x / x.shape[0], 64)
    ref = x @ w.T
    assert sqnr(ref, x @ w_q.T) > sqnr(ref, x @ rtn.T) + 1.0
    # the result sits on the grid its qparams describe
    u = (w_q.unflatten(-1, (4, 64)) - minimum.unsqueeze(-1)) / scale.unsqueeze(-1)
    assert torch.allclose(u, u.round(), atol=1e-3) and bool((u.round() >= 0).all())
    assert scale.shape == (n, 4)
    assert choose_qparams(w, 64)[0].shape == scale.shape


def test_bad_input():
    config = Int4WeightOnlyConfig(group_size=128)
    for fn in (awq_quantize_, gptq_quantize_):
        with pytest.raises(ValueError, match="no calibration data"):
            fn(make_model(), [], config, progress_bar=False)
        with pytest.raises(ValueError, match="no calibration data"):
            fn(make_model(), None, config, progress_bar=False)
        with pytest.raises(TypeError, match="not a single tensor"):
            fn(make_model(), torch.randn(2, 256), config, progress_bar=False)
        with pytest.raises(TypeError, match="Int4WeightOnlyConfig"):
            fn(make_model(), data(1, 0), {"group_size": 128}, progress_bar=False)
        with pytest.raises(ValueError, match="no nn.Linear layer to quantize"):
            fn(make_model(), data(1, 0), config, filter_fn=lambda m, fqn: False,
               progress_bar=False)
    unused = nn.Sequential(nn.Linear(256, 256), nn.Identity())
    unused.forward = lambda x: x  # the Linear never runs
    with pytest.raises(ValueError, match="saw no calibration input"):
        gptq_quantize_(unused, data(1, 0), config, progress_bar=False)
