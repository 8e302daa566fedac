"""quantize_ and Int4WeightOnlyConfig: which weights change, what is kept, save/load."""

import io
import subprocess
import sys

import pytest
import torch
from torch import nn

from int4tensor import Int4Tensor, Int4WeightOnlyConfig, quantize_
from test.helpers import rel_error, sqnr


class MLP(nn.Module):
    def __init__(self, dtype=torch.bfloat16):
        super().__init__()
        self.up = nn.Linear(256, 512, bias=True, dtype=dtype)
        self.down = nn.Linear(512, 256, bias=False, dtype=dtype)
        self.norm = nn.LayerNorm(256, dtype=dtype)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def weight_bytes(model):
    total = 0
    for p in model.parameters():
        if isinstance(p, Int4Tensor):
            total += sum(t.numel() * t.element_size() for t in (p.qdata, p.scale, p.zero_point))
        else:
            total += p.numel() * p.element_size()
    return total


class TestConfig:
    def test_defaults(self):
        c = Int4WeightOnlyConfig()
        assert (c.group_size, c.version, c.int4_packing_format) == (128, 2, "plain")

    def test_version_1_says_what_to_use(self):
        with pytest.raises(ValueError, match="use version=2"):
            Int4WeightOnlyConfig(version=1)

    @pytest.mark.parametrize("group_size", [16, 100, 512])
    def test_bad_group_size(self, group_size):
        with pytest.raises(ValueError, match="group_size must be one of"):
            Int4WeightOnlyConfig(group_size=group_size)

    def test_bad_packing_format(self):
        with pytest.raises(ValueError, match="int4_packing_format"):
            Int4WeightOnlyConfig(int4_packing_format="tile_packed")


class TestQuantize:
    def test_linear_weights_become_int4_and_run(self):
        model = MLP()
        x = torch.randn(2, 7, 256, dtype=torch.bfloat16)
        ref = model(x)
        assert quantize_(model, Int4WeightOnlyConfig()) is model
        for lin in (model.up, model.down):
            assert isinstance(lin.weight, nn.Parameter) and isinstance(lin.weight, Int4Tensor)
            assert not lin.weight.requires_grad
        assert not isinstance(model.norm.weight, Int4Tensor)
        assert model.up.bias.dtype == torch.bfloat16
        assert sqnr(ref, model(x)) > 18

    def test_weight_memory_is_about_a_quarter(self):
        model = nn.Linear(1024, 1024, bias=False, dtype=torch.bfloat16)
        before = weight_bytes(model)
        quantize_(model, Int4WeightOnlyConfig())
        # 4 bits + 2 x 16 bits per 128 weights = 4.25 bits/weight
        assert weight_bytes(model) / before == pytest.approx(4.25 / 16)

    def test_fp32_model(self):
        model = MLP(torch.float32)
        x = torch.randn(3, 256)
        ref = model(x)
        quantize_(model, Int4WeightOnlyConfig(group_size=64))
        assert model.up.weight.dtype == torch.float32
        assert sqnr(ref, model(x)) > 18

    def test_filter_fn(self):
        model = MLP()
        quantize_(model, Int4WeightOnlyConfig(), filter_fn=lambda m, fqn: fqn == "down")
        assert isinstance(model.down.weight, Int4Tensor)
        assert not isinstance(model.up.weight, Int4Tensor)

    def test_keeps_parameter_attributes(self):
        model = MLP()
        loader = lambda param, loaded: param.copy_(loaded)  # noqa: E731
        model.up.weight.weight_loader = loader
        model.up.weight.input_dim, model.up.weight.output_dim = 1, 0
        quantize_(model, Int4WeightOnlyConfig())
        w = model.up.weight
        assert w.weight_loader is loader and (w.input_dim, w.output_dim) == (1, 0)

    def test_k_not_multiple_of_group_is_left_with_warning(self):
        model = nn.Sequential(nn.Linear(200, 256), nn.Linear(256, 64))
        with pytest.warns(UserWarning, match=r"left 0\.weight in torch.float32: K = 200"):
            quantize_(model, Int4WeightOnlyConfig())
        assert not isinstance(model[0].weight, Int4Tensor)
        assert isinstance(model[1].weight, Int4Tensor)

    def test_idempotent(self):
        model = MLP()
        quantize_(model, Int4WeightOnlyConfig())
        qdata = model.up.weight.qdata
        quantize_(model, Int4WeightOnlyConfig())
        assert model.up.weight.qdata is qdata

    def test_meta_device(self):
        with torch.device("meta"):
            model = MLP()
        quantize_(model, Int4WeightOnlyConfig())
        assert isinstance(model.up.weight, Int4Tensor) and model.up.weight.is_meta
        assert model.up.weight.qdata.shape == (512, 128)


class TestSaveLoad:
    def roundtrip(self, obj):
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        return torch.load(buf, weights_only=True)

    def test_state_dict_weights_only_into_meta_model(self):
        model = MLP()
        model.up.weight.weight_loader = print  # must not end up in the checkpoint
        quantize_(model, Int4WeightOnlyConfig())
        x = torch.randn(4, 256, dtype=torch.bfloat16)
        out = model(x)
        sd = self.roundtrip(model.state_dict())
        assert isinstance(sd["up.weight"], Int4Tensor)
        with torch.device("meta"):
            fresh = MLP()
        quantize_(fresh, Int4WeightOnlyConfig())
        fresh.load_state_dict(sd, assign=True)
        assert isinstance(fresh.up.weight, Int4Tensor) and not fresh.up.weight.is_meta
        assert torch.equal(fresh(x), out)

    def test_load_state_dict_copies_into_quantized_model(self):
        model = MLP()
        quantize_(model, Int4WeightOnlyConfig())
        other = MLP()
        quantize_(other, Int4WeightOnlyConfig())
        other.load_state_dict(self.roundtrip(model.state_dict()))
        x = torch.randn(4, 256, dtype=torch.bfloat16)
        assert torch.equal(other(x), model(x))

    def test_tensor_roundtrip_is_exact_2d_and_3d(self):
        for shape in [(64, 256), (3, 64, 256)]:
            t = Int4Tensor.from_hp(torch.randn(shape), (1,) * (len(shape) - 1) + (64,))
            back = self.roundtrip(t)
            assert type(back) is Int4Tensor and back.shape == t.shape
            assert back.block_size == t.block_size and back.dtype == t.dtype
            for name in t.tensor_data_names:
                assert torch.equal(getattr(back, name), getattr(t, name))


def test_import_does_not_import_fbgemm_or_triton():
    code = (
        "import sys, int4tensor, torch.nn as nn\n"
        "m = nn.Linear(128, 64); int4tensor.quantize_(m, int4tensor.Int4WeightOnlyConfig())\n"
        "import torch; m(torch.randn(2, 128))\n"
        "bad = [k for k in sys.modules if k.split('.')[0] in ('fbgemm_gpu', 'triton')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


class TestModuleConversions:
    def test_module_to_same_device_and_dtype(self):
        model = MLP()
        quantize_(model, Int4WeightOnlyConfig())
        x = torch.randn(2, 256, dtype=torch.bfloat16)
        out = model(x)
        model.to("cpu")
        model.to(torch.bfloat16)
        assert torch.equal(model(x), out)

    def test_module_to_float16(self):
        model = MLP()
        quantize_(model, Int4WeightOnlyConfig())
        x = torch.randn(2, 256)
        ref = model(x.to(torch.bfloat16)).float()
        model.half()
        assert isinstance(model.up.weight, Int4Tensor) and model.up.weight.dtype == torch.float16
        assert sqnr(ref, model(x.half()).float()) > 30


class Experts(nn.Module):
    """Llama4-style: 3D parameters used with torch.bmm (reduced dim -2) plus a dense router."""

    def __init__(self):
        super().__init__()
        self.router = nn.Linear(256, 4, bias=False, dtype=torch.bfloat16)
        self.w_in = nn.Parameter(torch.randn(4, 256, 384, dtype=torch.bfloat16) * 0.05)
        self.w_out = nn.Parameter(torch.randn(4, 384, 256, dtype=torch.bfloat16) * 0.05)

    def forward(self, x):  # x [E, T, 256]
        return torch.bmm(torch.relu(torch.bmm(x, self.w_in)), self.w_out)


class TestQuantizeByName:
    def test_bmm_experts_with_k_dim_minus_2(self):
        model = Experts()
        x = torch.randn(4, 6, 256, dtype=torch.bfloat16)
        layer_ref = torch.bmm(x, model.w_in)
        ref = model(x)
        quantize_(model, {"re:w_(in|out)": Int4WeightOnlyConfig(k_dim=-2)})
        w_in = model.w_in
        assert isinstance(w_in, Int4Tensor) and w_in.shape == (4, 256, 384)
        assert w_in.is_transposed and w_in.qdata.shape == (4, 384, 128)  # stored [E, N, K/2]
        assert not isinstance(model.router.weight, Int4Tensor)
        assert sqnr(layer_ref, torch.bmm(x, w_in)) > 18
        assert sqnr(ref, model(x)) > 15

    def test_exact_names_none_and_unmatched(self):
        model = Experts()
        quantize_(model, {"w_in": Int4WeightOnlyConfig(k_dim=-2), "re:.*": None})
        assert isinstance(model.w_in, Int4Tensor)
        assert not isinstance(model.w_out, Int4Tensor)
        assert not isinstance(model.router.weight, Int4Tensor)
        with pytest.raises(ValueError, match=r"no parameter matches \['w_missing'\]"):
            quantize_(Experts(), {"w_missing": Int4WeightOnlyConfig()})
        with pytest.raises(ValueError, match="filter_fn"):
            quantize_(Experts(), {"w_in": Int4WeightOnlyConfig()}, filter_fn=lambda m, f: True)

    def test_wrong_k_dim_leaves_weight_with_warning(self):
        model = Experts()
        with pytest.warns(UserWarning, match=r"left w_in .* K = 384 \(dim -1\)"):
            quantize_(model, {"w_in": Int4WeightOnlyConfig(group_size=256)})
        assert not isinstance(model.w_in, Int4Tensor)

    def test_mixtral_style_module_list(self):
        experts = nn.ModuleList(nn.Linear(256, 128, bias=False, dtype=torch.bfloat16)
                                for _ in range(3))
        x = torch.randn(5, 256, dtype=torch.bfloat16)
        refs = [e(x) for e in experts]
        quantize_(experts, Int4WeightOnlyConfig())
        for e, ref in zip(experts, refs):
            assert isinstance(e.weight, Int4Tensor) and sqnr(ref, e(x)) > 18
        stacked = torch.stack([e.weight for e in experts])
        assert isinstance(stacked, Int4Tensor) and stacked.shape == (3, 128, 256)

    def test_compiled_bmm_experts_match_eager(self):
        model = Experts()
        quantize_(model, {"re:w_(in|out)": Int4WeightOnlyConfig(k_dim=-2)})
        x = torch.randn(4, 6, 256, dtype=torch.bfloat16)
        with torch.no_grad():
            # Inductor may fuse the dequantize into the matmul and skip the bf16 rounding of
            # the weight, so compiled and eager agree to bf16 precision, not bit for bit
            assert rel_error(model(x), torch.compile(model, fullgraph=True)(x)) < 1e-2

    def test_save_load_experts(self):
        model = Experts()
        quantize_(model, {"re:w_(in|out)": Int4WeightOnlyConfig(k_dim=-2)})
        buf = io.BytesIO()
        torch.save(model.state_dict(), buf)
        buf.seek(0)
        with torch.device("meta"):
            fresh = Experts()
        quantize_(fresh, {"re:w_(in|out)": Int4WeightOnlyConfig(k_dim=-2)})
        fresh.load_state_dict(torch.load(buf, weights_only=True), assign=True)
        x = torch.randn(4, 6, 256, dtype=torch.bfloat16)
        assert torch.equal(fresh(x), model(x))


class TestBadInput:
    @pytest.mark.parametrize("config", ["int4", None, 128, Int4WeightOnlyConfig])
    def test_config_must_be_a_config(self, config):
        with pytest.raises(TypeError, match="must be a config object such as "
                                            r"Int4WeightOnlyConfig\(group_size=128\)"):
            quantize_(MLP(), config)
        with pytest.raises(TypeError, match="must be a config object"):
            quantize_(MLP(), {"up.weight": config} if config is not None else {"up.weight": 1})

    def test_nan_weight_names_the_layer_and_changes_nothing(self):
        model = MLP()
        with torch.no_grad():
            model.down.weight[3, 7] = float("nan")
        before = {n: p.clone() for n, p in model.named_parameters()}
        with pytest.raises(ValueError, match=r"quantize_: cannot quantize down.weight: weight "
                                             r"has 1 NaN/Inf value\(s\)"):
            quantize_(model, Int4WeightOnlyConfig())
        # "up" comes first and is fine, but nothing was replaced
        assert not any(isinstance(p, Int4Tensor) for p in model.parameters())
        for n, p in model.named_parameters():
            torch.testing.assert_close(p, before[n], rtol=0, atol=0, equal_nan=True)

    def test_meta_and_uninitialized_memory(self):
        """quantize_ on the meta device reads no values (vLLM/transformers create models
        there); Int4Tensor.empty is the constructor for uninitialized real memory."""
        with torch.device("meta"):
            model = MLP()
        quantize_(model, Int4WeightOnlyConfig())
        assert isinstance(model.up.weight, Int4Tensor) and model.up.weight.is_meta
