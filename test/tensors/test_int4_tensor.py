"""Int4Tensor: construction, dequantize, linear, common ops, compile, errors."""

import expecttest
import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4Tensor
from int4tensor.quant_primitives import quantize_minmax
from test.helpers import rel_error, sqnr


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


def _pickled(obj) -> bytes:
    import io

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def _unpickle(data: bytes):
    import io

    return torch.load(io.BytesIO(data), weights_only=True)


def _tampered(t, **state) -> bytes:
    """A torch.save file of ``t`` whose pickled state has ``state`` swapped in (what a
    hand-edited or hostile file holds); built through the real pickling path."""
    original = t.__reduce_ex__

    def reduce_ex(proto):
        func, (rebuild, cls, args, dict_state) = original(proto)
        dict_state = {k: v for k, v in {**dict_state, **state}.items()
                      if k not in ("__reduce_ex__", "__class__")}
        if "__class__" in state:  # the class is one memoized global in the pickle: both change
            cls, args = state["__class__"], (state["__class__"], *args[1:])
        return func, (rebuild, cls, args, dict_state)

    t.__reduce_ex__ = reduce_ex
    try:
        return _pickled(t)
    finally:
        del t.__reduce_ex__


class TestEveryRebuildIsChecked:
    """Unpickling, __tensor_unflatten__ and safetensors loading run the constructor's check."""

    @pytest.mark.parametrize("state, match", [
        ({"block_size": (1, 256)}, r"K = 128 .* not a multiple of the group size 256"),
        ({"scale": torch.ones(2, 32, dtype=torch.bfloat16)}, r"scale has shape \[2, 32\], "
                                                             r"expected \[1, 32\]"),
        ({"activation_dtype": "int2"}, "activation_dtype must be 'bf16' or 'fp8', got 'int2'"),
        ({"qdata": torch.zeros(32, 64, dtype=torch.int32)}, "qdata has dtype torch.int32"),
        ({"block_size": (1, 1, 128)}, r"block_size \(1, 1, 128\) does not fit shape"),
    ])
    def test_tampered_pickle_is_refused(self, state, match):
        _, t = make((32, 128))
        with pytest.raises(ValueError, match=match):
            _unpickle(_tampered(t, **state))

    def test_pickle_of_another_class_is_refused(self):
        from int4tensor import Int4PreshuffledTensor

        _, t = make((32, 128))
        with pytest.raises(ValueError, match="state lacks .*group_scale"):
            _unpickle(_tampered(t, __class__=Int4PreshuffledTensor))

    def test_unflatten_checks_outside_tracing(self):
        _, t = make((32, 128))
        names, attrs = t.__tensor_flatten__()
        inner = {n: getattr(t, n) for n in names}
        inner["zero_point"] = inner["zero_point"][:, :16]
        with pytest.raises(ValueError, match=r"zero_point has shape \[1, 16\]"):
            Int4Tensor.__tensor_unflatten__(inner, attrs, t.shape, t.stride())

    def test_constructor_refuses_inconsistent_fields(self):
        _, t = make((32, 128))
        with pytest.raises(ValueError, match="zero_point has dtype torch.float32, scale "
                                             "torch.bfloat16"):
            Int4Tensor(t.qdata, t.scale, t.zero_point.float(), (1, 128), (32, 128))

    def test_old_module_path_pickles_still_load(self):
        """torch.save files written before the public path pickle
        int4tensor.tensors.int4_tensor.Int4Tensor; they load (weights_only too)."""
        _, t = make((32, 128))
        Int4Tensor.__module__ = "int4tensor.tensors.int4_tensor"
        try:
            data = _pickled(t)
        finally:
            Int4Tensor.__module__ = "int4tensor"
        assert b"int4tensor.tensors.int4_tensor\nInt4Tensor" in data or \
            b"int4tensor.tensors.int4_tensor" in data
        back = _unpickle(data)
        assert type(back) is Int4Tensor and torch.equal(back.qdata, t.qdata)

    def test_public_class_path(self):
        import int4tensor

        assert Int4Tensor.__module__ == "int4tensor" and int4tensor.Int4Tensor is Int4Tensor
        assert int4tensor.Int4PreshuffledTensor.__module__ == "int4tensor"
        data = _pickled(make((32, 128))[1])
        assert b"int4tensor.tensors" not in data
        assert type(_unpickle(data)) is Int4Tensor


class TestGarbageIsRefused:
    def test_huge_finite_weights(self):
        w = torch.full((4, 128), 3e38)
        w[:, ::2] = -3e38
        with pytest.raises(ValueError, match="too wide to quantize with torch.float32 scales"):
            Int4Tensor.from_hp(w, (1, 128))
        w = torch.full((4, 128), 1.6e38)  # the largest range that still fits is quantized
        w[:, ::2] = -1.6e38
        t = Int4Tensor.from_hp(w, (1, 128))
        assert torch.isfinite(t.scale).all() and torch.isfinite(t.dequantize()).all()

    @pytest.mark.parametrize("op", [lambda w, x: w @ x, torch.mm, torch.matmul])
    def test_integer_operand(self, op):
        _, t = make((64, 128))
        with pytest.raises(TypeError):
            op(t, torch.ones(128, 3, dtype=torch.int64))

    def test_from_hp_of_a_list(self):
        with pytest.raises(TypeError, match="quantizes a torch.Tensor, got list"):
            Int4Tensor.from_hp([[1.0] * 128], (1, 128))

    def test_k_zero(self):
        with pytest.raises(ValueError, match="K = 0"):
            Int4Tensor.from_hp(torch.randn(8, 0), (1, 128))

    def test_act_pre_scale_as_a_number(self):
        _, t = make((32, 128))
        s = Int4Tensor(t.qdata, t.scale, t.zero_point, (1, 128), (32, 128), act_pre_scale=2)
        assert s.act_pre_scale.shape == (128,)
        assert torch.equal(s.dequantize(), (t.dequantize().float() * 2).to(torch.bfloat16))
        one = Int4Tensor(t.qdata, t.scale, t.zero_point, (1, 128), (32, 128),
                         act_pre_scale=torch.tensor([2.0], dtype=torch.bfloat16))
        assert one.act_pre_scale.shape == (128,) and torch.equal(one.dequantize(), s.dequantize())

    def test_unsupported_composite_op_names_itself(self):
        _, t = make((32, 128))
        with pytest.raises(NotImplementedError, match="Int4Tensor does not support .*fft"):
            torch.fft.fft(t)

    def test_out_of_memory_in_a_supported_op_stays_out_of_memory(self):
        """Not reported as an unsupported op: the user must see that memory ran out."""
        from unittest import mock

        t = Int4Tensor.from_hp(torch.randn(4, 16, 128), (1, 1, 128))
        oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 7.00 GiB")
        with mock.patch("int4tensor.tensors.int4_tensor._replace", side_effect=oom), \
                pytest.raises(torch.OutOfMemoryError, match="Tried to allocate"):
            t[torch.tensor([0, 2])]


class TestEmptyOperands:
    """Dense torch returns empty results for empty operands; so do we (no kernel crash)."""

    def test_zero_experts_bmm(self):
        t = Int4Tensor.from_hp(torch.randn(0, 16, 128), (1, 1, 128)).mT
        out = torch.bmm(torch.randn(0, 3, 128), t)
        assert out.shape == (0, 3, 16)

    def test_k_slice_to_zero_linear(self):
        _, t = make((16, 256))
        empty = t[:, 0:0]
        out = F.linear(torch.randn(3, 0, dtype=torch.bfloat16), empty)
        assert out.shape == (3, 16) and bool((out == 0).all())

    def test_zero_rows(self):
        _, t = make((16, 256))
        assert F.linear(torch.randn(3, 256, dtype=torch.bfloat16), t[0:0]).shape == (3, 0)


class TestLoaderPattern:
    def test_empty_constructor_never_reads_values(self):
        t = Int4Tensor.empty((96, 256), (1, 128), dtype=torch.bfloat16)
        assert t.shape == (96, 256) and t.dtype == torch.bfloat16
        assert t.qdata.shape == (96, 128) and t.scale.shape == (2, 96)
        meta = Int4Tensor.empty((4, 96, 256), (1, 1, 128), device="meta")
        assert meta.is_meta and meta.scale.shape == (4, 2, 96)
        tr = Int4Tensor.empty((4, 256, 96), (1, 1, 128), transposed=True)
        assert tr.shape == (4, 256, 96) and tr.is_transposed
        with pytest.raises(ValueError, match="not a multiple"):
            Int4Tensor.empty((8, 100), (1, 128))

    def test_vllm_style_create_narrow_copy_process(self):
        """vLLM's pre-quantized path: parameters from uninitialized memory, then each shard of
        the checkpoint copied into its slice (a fused qkv here), then
        process_weights_after_loading (our layout conversion)."""
        from int4tensor import convert_model_to_packed_tensors_

        layer = torch.nn.Linear(256, 96, bias=False, dtype=torch.bfloat16)
        full = torch.randn(96, 256, dtype=torch.bfloat16)
        shards = {"q": full[:64], "k": full[64:80], "v": full[80:]}
        param = torch.nn.Parameter(Int4Tensor.empty((96, 256), (1, 128)), requires_grad=False)
        param.scale.fill_(float("nan"))  # garbage in the uninitialized memory is harmless
        layer.weight = param
        offset = 0
        for name, shard in shards.items():
            quantized_shard = Int4Tensor.from_hp(shard, (1, 128))  # what the checkpoint holds
            layer.weight.data.narrow(0, offset, shard.shape[0]).copy_(quantized_shard)
            offset += shard.shape[0]
        convert_model_to_packed_tensors_(layer)
        ref = Int4Tensor.from_hp(full, (1, 128))
        assert torch.equal(layer.weight.dequantize(), ref.dequantize())
        x = torch.randn(2, 256, dtype=torch.bfloat16)
        if isinstance(layer.weight, Int4Tensor):
            assert torch.equal(layer(x), F.linear(x, ref))
        else:  # a CPU's layout (Int4CPUTensor): the same weight, torch's int4 GEMM's rounding
            assert rel_error(F.linear(x, ref), layer(x)) < 1e-2


class TestParameterData:
    def test_shallow_copy_compatibility(self):
        _, t = make((32, 128))
        _, same = make((32, 128))
        assert torch._has_compatible_shallow_copy_type(t, same)
        assert not torch._has_compatible_shallow_copy_type(t, t[:16])
        assert not torch._has_compatible_shallow_copy_type(t, t.dequantize())
        assert not torch._has_compatible_shallow_copy_type(t.dequantize(), t)
        assert not torch._has_compatible_shallow_copy_type(t, t.to(torch.float16))

    def test_assigning_data(self):
        _, t = make((32, 128))
        p = torch.nn.Parameter(t, requires_grad=False)
        _, new = make((32, 128))
        F.linear(torch.randn(2, 128, dtype=torch.bfloat16), p)  # may cache dispatch plans on p
        p._dispatch_cached("probe", lambda: "made for the old fields")
        p.data = new
        assert torch.equal(p.qdata, new.qdata) and torch.equal(p.dequantize(), new.dequantize())
        assert not [k for k in p.__dict__ if k.startswith("_dispatch_")]  # plans are remade
        with pytest.raises(TypeError, match=r"shape \[16, 128\] != \[32, 128\]"):
            p.data = new[:16]
        with pytest.raises(TypeError, match="cannot become the data"):
            p.data = new.dequantize()

    def test_module_to_keeps_parameters_consistent(self):
        layer = torch.nn.Linear(128, 32, bias=False)
        _, t = make((32, 128))
        layer.weight = torch.nn.Parameter(t, requires_grad=False)
        layer.to(torch.float16)
        assert layer.weight.dtype == torch.float16 and layer.weight.scale.dtype == torch.float16

    def test_dense_copy_from_int4_dequantizes(self):
        _, t = make((32, 128))
        dense = torch.zeros(32, 128)
        dense.copy_(t)
        assert torch.equal(dense, t.dequantize(torch.float32))
        model = torch.nn.Linear(128, 32, bias=False)
        model.load_state_dict({"weight": t})
        assert torch.equal(model.weight.detach(), t.dequantize(torch.float32))


class TestContiguousAndPinning:
    def test_contiguous_of_a_slice_makes_fields_contiguous(self):
        _, t = make((64, 256))
        s = t[8:24]
        assert not s.scale.is_contiguous()
        c = s.contiguous()
        assert c is not s and all(x.is_contiguous() for x in c._tensors().values())
        assert torch.equal(c.dequantize(), s.dequantize())
        assert t.contiguous() is t

    def test_is_pinned_on_cpu(self):
        _, t = make((32, 128))
        assert t.is_pinned() is False

    @pytest.mark.gpu
    def test_pin_memory(self):
        _, t = make((32, 128))
        p = t.pin_memory()
        assert p.is_pinned() and all(x.is_pinned() for x in p._tensors().values())
        assert torch.equal(p.dequantize(), t.dequantize())

    @pytest.mark.gpu
    def test_sliced_weight_linear_on_cuda(self):
        w = torch.randn(512, 1024, dtype=torch.bfloat16, device="cuda") * 0.02
        t = Int4Tensor.from_hp(w, (1, 128))
        part = t[128:384]
        x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
        ref = F.linear(x, part.dequantize())
        assert sqnr(ref, F.linear(x, part)) > 30
