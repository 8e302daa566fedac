"""Int4Tensor: construction, dequantize, linear, common ops, compile, errors."""

import expecttest
import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4Tensor
from int4tensor.quant_primitives import quantize_minmax
from test.helpers import sqnr


def make(shape=(256, 512), group_size=128, dtype=torch.bfloat16):
    w = torch.randn(shape, dtype=dtype) * 0.02
    block = (1,) * (len(shape) - 1) + (group_size,)
    return w, Int4Tensor.from_hp(w, block)


class TestConstruction:
    @pytest.mark.parametrize("shape", [(256, 512), (4, 64, 256)])
    def test_fields(self, shape):
        w, t = make(shape)
        assert t.shape == w.shape and t.dtype == torch.bfloat16
        assert t.qdata.shape == (*shape[:-1], shape[-1] // 2) and t.qdata.dtype == torch.int8
        assert t.scale.shape == (*shape[:-2], shape[-1] // 128, shape[-2])
        assert t.block_size == (1,) * (len(shape) - 1) + (128,)
        assert t.group_size == 128

    def test_fields_are_fbgemm_quantization(self):
        w, t = make()
        qdata, scale, zero_point = quantize_minmax(w, 128)
        assert torch.equal(t.qdata, qdata) and torch.equal(t.scale, scale)
        assert torch.equal(t.zero_point, zero_point)

    @pytest.mark.parametrize("group_size", [32, 64, 128, 256])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_dequantize_sqnr(self, group_size, dtype):
        w, t = make((128, 512), group_size, dtype)
        deq = t.dequantize()
        assert deq.dtype == dtype and deq.shape == w.shape
        assert sqnr(w, deq) > 18
        assert t.dequantize(torch.float32).dtype == torch.float32

    def test_smaller_groups_are_more_accurate(self):
        w = torch.randn(128, 512)
        errs = [sqnr(w, Int4Tensor.from_hp(w, (1, g)).dequantize()) for g in (32, 64, 128, 256)]
        assert errs == sorted(errs, reverse=True)


class TestLinear:
    @pytest.mark.parametrize("lead", [(), (5,), (2, 3), (2, 1, 3)])
    @pytest.mark.parametrize("use_bias", [False, True])
    def test_any_leading_dims(self, lead, use_bias):
        w, t = make()
        x = torch.randn(*lead, 512, dtype=torch.bfloat16)
        bias = torch.randn(256, dtype=torch.bfloat16) if use_bias else None
        out = F.linear(x, t, bias)
        assert out.shape == (*lead, 256) and out.dtype == torch.bfloat16
        assert torch.equal(out, F.linear(x, t.dequantize(), bias))  # the reference path
        assert sqnr(F.linear(x.float(), w.float(), None if bias is None else bias.float()), out) > 18

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_activation_dtypes(self, dtype):
        w, t = make(dtype=dtype)
        x = torch.randn(8, 512, dtype=dtype)
        out = F.linear(x, t)
        assert out.dtype == dtype
        assert sqnr(x.double() @ w.double().t(), out) > 18

    def test_fp32_activation_with_bf16_weight(self):
        w, t = make()
        x = torch.randn(4, 512)
        assert F.linear(x, t).dtype == torch.float32

    def test_nn_linear_module(self):
        lin = torch.nn.Linear(512, 256, dtype=torch.bfloat16)
        x = torch.randn(3, 512, dtype=torch.bfloat16)
        ref = lin(x)
        lin.weight = torch.nn.Parameter(Int4Tensor.from_hp(lin.weight.detach(), (1, 128)),
                                        requires_grad=False)
        assert sqnr(ref, lin(x)) > 18

    def test_wrong_k(self):
        _, t = make()
        with pytest.raises(ValueError, match="last dim must be K = 512"):
            F.linear(torch.randn(2, 256, dtype=torch.bfloat16), t)

    @pytest.mark.parametrize("dtype", [torch.int8, torch.float64])
    def test_unsupported_activation_dtype(self, dtype):
        _, t = make()
        with pytest.raises(TypeError, match="activations"):
            F.linear(torch.ones(2, 512, dtype=dtype), t)

    def test_3d_weight_is_not_a_linear_weight(self):
        _, t = make((2, 64, 512))
        with pytest.raises(ValueError, match="2D weight"):
            F.linear(torch.randn(2, 512, dtype=torch.bfloat16), t)


class TestCommonOps:
    def fields_equal(self, a, b):
        return all(torch.equal(getattr(a, n), getattr(b, n)) for n in a.tensor_data_names)

    def test_detach_alias_share_storage(self):
        _, t = make()
        for out in (t.detach(), torch.ops.aten.alias(t)):
            assert type(out) is Int4Tensor and out.shape == t.shape
            assert out.qdata.data_ptr() == t.qdata.data_ptr()

    def test_clone_copies(self):
        _, t = make()
        c = t.clone()
        assert self.fields_equal(c, t) and c.qdata.data_ptr() != t.qdata.data_ptr()

    def test_contiguous(self):
        _, t = make()
        assert self.fields_equal(t.contiguous(), t)

    def test_to_device_and_dtype(self):
        _, t = make()
        moved = t.to("cpu")
        assert type(moved) is Int4Tensor and self.fields_equal(moved, t)
        half = t.to(torch.float16)
        assert half.dtype == torch.float16 and half.scale.dtype == torch.float16
        assert torch.equal(half.qdata, t.qdata)
        assert sqnr(t.dequantize(torch.float32), half.dequantize(torch.float32)) > 40
        with pytest.raises(TypeError, match="floating dtype"):
            t.to(torch.int32)

    def test_copy_from_int4(self):
        _, t = make()
        _, src = make()
        dst = t.clone()
        dst.copy_(src)
        assert self.fields_equal(dst, src)

    def test_copy_from_dense_quantizes(self):
        w, t = make()
        dst = t.clone()
        dst.copy_(w * 2)
        assert self.fields_equal(dst, Int4Tensor.from_hp(w * 2, (1, 128)))

    @pytest.mark.parametrize(
        "other, message",
        [
            (lambda: make((128, 512))[1], r"shape \[128, 512\] != \[256, 512\]"),
            (lambda: make(group_size=64)[1], r"block_size \(1, 64\) != \(1, 128\)"),
            (lambda: make(dtype=torch.float16)[1], r"scale torch.float16"),
            (lambda: torch.randn(256, 256), r"source shape \[256, 256\]"),
        ],
    )
    def test_copy_mismatch_names_the_difference(self, other, message):
        _, t = make()
        with pytest.raises(ValueError, match=message):
            t.copy_(other())

    def test_unsupported_op_names_op_and_type(self):
        _, t = make()
        with pytest.raises(NotImplementedError, match=r"Int4Tensor does not support the op aten\.sin"):
            torch.sin(t)


class TestRepr(expecttest.TestCase):
    def test_repr(self):
        t = Int4Tensor.from_hp(torch.randn(64, 256, dtype=torch.bfloat16), (1, 128))
        self.assertExpectedInline(repr(t), """Int4Tensor(block_size=[1, 128], shape=[64, 256], activation_dtype='bf16', dtype=torch.bfloat16, device=cpu, qdata=int8[64, 128], scale=bfloat16[2, 64], zero_point=bfloat16[2, 64])""")


class TestBadInput:
    def test_not_floating(self):
        with pytest.raises(TypeError, match="floating-point"):
            Int4Tensor.from_hp(torch.ones(64, 128, dtype=torch.int32), (1, 128))

    @pytest.mark.parametrize("bad", [float("nan"), float("inf")])
    def test_non_finite(self, bad):
        w = torch.randn(64, 128)
        w[3, 5] = bad
        with pytest.raises(ValueError, match="1 NaN/Inf"):
            Int4Tensor.from_hp(w, (1, 128))

    @pytest.mark.parametrize("group_size", [0, 16, 48, 512, -128, 128.0])
    def test_group_size_not_supported(self, group_size):
        with pytest.raises(ValueError, match="group size must be one of"):
            Int4Tensor.from_hp(torch.randn(64, 512), (1, group_size))

    def test_k_not_multiple_of_group(self):
        with pytest.raises(ValueError, match="K = 96"):
            Int4Tensor.from_hp(torch.randn(64, 96), (1, 64))

    def test_wrong_block_size_or_rank(self):
        with pytest.raises(ValueError, match=r"must be \(1, G\)"):
            Int4Tensor.from_hp(torch.randn(64, 128), (2, 128))
        with pytest.raises(ValueError, match="2D"):
            Int4Tensor.from_hp(torch.randn(128), (128,))


class TestCompile:
    def test_compiled_model_matches_eager(self):
        from int4tensor import Int4WeightOnlyConfig, quantize_

        model = torch.nn.Sequential(
            torch.nn.Linear(256, 512), torch.nn.SiLU(), torch.nn.Linear(512, 128)
        ).to(torch.bfloat16)
        quantize_(model, Int4WeightOnlyConfig())
        x = torch.randn(4, 256, dtype=torch.bfloat16)
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
        assert torch.equal(eager, compiled)


class TestActPreScale:
    def make(self):
        w, t = make()
        pre = torch.rand(512, dtype=torch.bfloat16) + 0.5
        return w, Int4Tensor(t.qdata, t.scale, t.zero_point, t.block_size, t.shape, pre), pre

    def test_linear_and_dequantize_include_the_pre_scale(self):
        w, t, pre = self.make()
        x = torch.randn(4, 512, dtype=torch.bfloat16)
        expected = (x.double() * pre.double()) @ t.dequantize_stored(torch.float64).t()
        assert sqnr(expected, F.linear(x, t)) > 40
        assert sqnr(t.dequantize_stored(torch.float32) * pre.float(), t.dequantize()) > 40

    def test_carried_by_clone_to_copy_and_save(self):
        import io

        _, t, pre = self.make()
        for out in (t.clone(), t.to("cpu", copy=True), t.detach()):
            assert torch.equal(out.act_pre_scale, pre)
        assert t.to("cpu", copy=True).qdata.data_ptr() != t.qdata.data_ptr()
        buf = io.BytesIO()
        torch.save(t, buf)
        buf.seek(0)
        assert torch.equal(torch.load(buf, weights_only=True).act_pre_scale, pre)
        plain = make()[1]
        with pytest.raises(ValueError, match="inner tensors"):
            plain.copy_(t)
        assert "act_pre_scale=bfloat16[512]" in repr(t)

    def test_compile(self):
        _, t, _ = self.make()
        x = torch.randn(4, 512, dtype=torch.bfloat16)
        fn = torch.compile(lambda x, w: F.linear(x, w), fullgraph=True)
        assert torch.equal(fn(x, t), F.linear(x, t))


class TestAutograd:
    def test_gradient_flows_to_the_activation(self):
        w, t = make()
        x = torch.randn(3, 512, dtype=torch.float32, requires_grad=True)
        F.linear(x, t).sum().backward()
        expected = t.dequantize(torch.float32).sum(0).expand(3, -1)
        assert torch.allclose(x.grad, expected, rtol=1e-5, atol=1e-5)

    def test_custom_op_backward_matches_dense(self):
        from int4tensor.kernels.custom_ops import _backward, _setup_context

        w, t = make()

        class Ctx:
            def save_for_backward(self, *tensors):
                self.saved_tensors = tensors

        ctx = Ctx()
        x = torch.randn(3, 512, dtype=torch.bfloat16)
        _setup_context(ctx, (x, t.qdata, t.scale, t.zero_point, 128), None)
        grad = torch.randn(3, 256, dtype=torch.bfloat16)
        assert torch.equal(_backward(ctx, grad)[0], grad @ t.dequantize())
