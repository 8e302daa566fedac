"""Int4PreshuffledTensor (fbgemm's Hopper layout) against the plain layout and the float layer."""

import io

import pytest
import torch
import torch.nn.functional as F

from int4tensor import (
    Float8DynamicActivationInt4WeightConfig,
    Int4CPUTensor,
    Int4PreshuffledTensor,
    Int4Tensor,
    Int4WeightOnlyConfig,
    convert_model_to_packed_tensors_,
    convert_to_packed_tensor_based_on_current_hardware,
    quantize_,
)
from int4tensor import kernels
from int4tensor.kernels import fbgemm, reference
from int4tensor.quant_primitives import quantize_fp8_rows, round_fp8_rows
from test.helpers import rel_error, sqnr


def hopper_with_fbgemm():
    return (torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0)
            and fbgemm.is_available())


gpu = pytest.mark.gpu
needs_kernels = pytest.mark.skipif(not hopper_with_fbgemm(),
                                   reason="needs fbgemm-gpu-genai on an sm90+ GPU")


def plain(shape, g=128, device="cuda"):
    w = torch.randn(shape, dtype=torch.bfloat16, device=device) * 0.02
    return w, Int4Tensor.from_hp(w, (1,) * (len(shape) - 1) + (g,))


class TestFp8PlainEverywhere:
    """Float8DynamicActivationInt4WeightConfig(int4_packing_format="plain"): an Int4Tensor whose
    linear rounds activations to fp8 per row; the same function on every device."""

    def test_quantize_run_and_keep_the_flag(self):
        model = torch.nn.Linear(512, 256, dtype=torch.bfloat16)
        x = torch.randn(4, 512, dtype=torch.bfloat16)
        ref = model(x)
        quantize_(model, Float8DynamicActivationInt4WeightConfig(int4_packing_format="plain"))
        w = model.weight
        assert isinstance(w, Int4Tensor) and w.activation_dtype == "fp8"
        out = model(x)
        assert sqnr(ref, out) > 15
        # exactly: x rounded to fp8 per row, then the bf16 reference path
        xq, xs = quantize_fp8_rows(x)
        rounded = (xq.float() * xs[:, None]).to(torch.bfloat16)
        assert torch.equal(rounded, round_fp8_rows(x))
        assert torch.equal(out, F.linear(rounded, w.dequantize(), model.bias))
        assert not torch.equal(out, F.linear(x, w.dequantize(), model.bias))
        for view in (w[:128], w[:, 128:], w.t().t(), w.clone()):
            assert view.activation_dtype == "fp8"
        buf = io.BytesIO()
        torch.save(w, buf)
        buf.seek(0)
        assert torch.load(buf, weights_only=True).activation_dtype == "fp8"

    def test_copy_between_activation_dtypes_is_refused(self):
        _, bf16 = plain((256, 512), device="cpu")
        fp8 = Int4Tensor.from_hp(torch.randn(256, 512, dtype=torch.bfloat16), (1, 128),
                                 activation_dtype="fp8")
        with pytest.raises(ValueError, match="activation_dtype"):
            bf16.copy_(fp8)
        with pytest.raises(ValueError, match="activation_dtype"):
            Int4Tensor(fp8.qdata, fp8.scale, fp8.zero_point, (1, 128), (256, 512),
                       activation_dtype="int8")


class TestOnCpu:
    """What a CPU-only machine sees: conversion gives the CPU layout (never the preshuffled
    one), preshuffled configs say why not."""

    def test_conversion_gives_the_cpu_layout_not_preshuffled(self):
        _, t = plain((256, 512), device="cpu")
        converted = convert_to_packed_tensor_based_on_current_hardware(t)
        assert not isinstance(converted, Int4PreshuffledTensor)
        if Int4CPUTensor.why_not(t) is None:
            assert isinstance(converted, Int4CPUTensor)
        else:
            assert converted is t
        dense = torch.randn(4, 4)
        assert convert_to_packed_tensor_based_on_current_hardware(dense) is dense

    def test_model_conversion_on_cpu(self):
        model = torch.nn.Linear(512, 256, dtype=torch.bfloat16)
        quantize_(model, Int4WeightOnlyConfig())
        weight = model.weight
        convert_model_to_packed_tensors_(model)
        assert not isinstance(model.weight, Int4PreshuffledTensor)
        assert torch.equal(model.weight.dequantize(), weight.dequantize())

    def test_k_not_a_multiple_of_128_is_refused_before_fbgemm_sees_it(self):
        # gpt-oss's K = 2880 with G = 64: fbgemm's shuffled kernel ended the process (H200)
        _, t = plain((4, 256, 2880), g=64, device="cpu")
        with pytest.raises(ValueError, match="K a multiple of 128, got K = 2880"):
            Int4PreshuffledTensor.from_int4_tensor(t)

    def test_model_conversion_keeps_expert_stacks_plain(self, monkeypatch):
        import int4tensor.convert as convert

        converted = []
        monkeypatch.setattr(convert, "preshuffle_supported", lambda t: True)
        monkeypatch.setattr(Int4PreshuffledTensor, "from_int4_tensor",
                            classmethod(lambda cls, t: converted.append(t.qdata.ndim) or t))
        model = torch.nn.Module()
        model.linear = torch.nn.Linear(512, 256, dtype=torch.bfloat16)
        model.experts = torch.nn.Parameter(torch.randn(4, 256, 512, dtype=torch.bfloat16))
        quantize_(model.linear, Int4WeightOnlyConfig())
        model.experts = torch.nn.Parameter(
            Int4WeightOnlyConfig().quantize_weight(model.experts.detach()), requires_grad=False)
        convert_model_to_packed_tensors_(model)
        assert converted == [2]  # the 2D weight only
        assert convert.convert_to_packed_tensor_based_on_current_hardware(model.experts) \
            is model.experts and converted == [2, 3]  # a stack on request

    def test_preshuffled_config_on_cpu_says_why(self):
        model = torch.nn.Linear(512, 256, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="needs a CUDA sm90"):
            quantize_(model, Int4WeightOnlyConfig(int4_packing_format="preshuffled"))

    def test_fp8_config_validation(self):
        with pytest.raises(ValueError, match="group_size 128 only"):
            Float8DynamicActivationInt4WeightConfig(group_size=64)
        with pytest.raises(ValueError, match="must be"):
            Float8DynamicActivationInt4WeightConfig(int4_packing_format="tiled")
        model = torch.nn.Linear(512, 256, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match="CUDA device"):
            quantize_(model, Float8DynamicActivationInt4WeightConfig())


@gpu
@needs_kernels
class TestBf16Activations:
    @pytest.mark.parametrize("n, k", [(256, 512), (4096, 4096), (200, 384), (1000, 2048)])
    @pytest.mark.parametrize("m", [1, 16, 24, 1000])
    def test_linear_matches_plain_and_reference(self, m, n, k):
        w, t = plain((n, k))
        p = Int4PreshuffledTensor.from_int4_tensor(t)
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        out = F.linear(x, p)
        assert out.shape == (m, n)
        ref = reference.linear(x, t, None)
        assert rel_error(ref, out) < 1e-2
        assert sqnr(x.double() @ w.double().t(), out) > 18
        backend = kernels.preshuffled_backend(x, p)
        if backend == "fbgemm":  # fbgemm's GEMMs on both sides: bit-identical
            assert m > 32 and torch.equal(out, fbgemm.linear(x, t, None))
        elif backend == "cuda":  # our GEMV on both layouts: the same sums up to fp32 order
            assert m <= kernels.CUDA_GEMV_MAX_M
            assert rel_error(F.linear(x, t), out) < 5e-3
        else:  # our GEMM rounds the dequantized weights to bf16 as the reference path does
            assert backend == "cuda_gemm" and 17 <= m <= 32
            assert rel_error(ref, out) < 2e-3

    def test_leading_dims_bias_and_g64_g256(self):
        for g in (64, 256):
            _, t = plain((512, 1024), g)
            p = convert_to_packed_tensor_based_on_current_hardware(t)
            assert isinstance(p, Int4PreshuffledTensor)
            x = torch.randn(2, 3, 1024, dtype=torch.bfloat16, device="cuda")
            bias = torch.randn(512, dtype=torch.bfloat16, device="cuda")
            assert rel_error(reference.linear(x, t, bias), F.linear(x, p, bias)) < 1e-2

    def test_g32_is_not_converted(self):
        _, t = plain((256, 512), g=32)
        assert convert_to_packed_tensor_based_on_current_hardware(t) is t

    def test_back_to_plain_is_exact(self):
        for shape in [(200, 512), (3, 128, 256)]:
            _, t = plain(shape)
            back = Int4PreshuffledTensor.from_int4_tensor(t).to_int4_tensor()
            for name in ("qdata", "scale", "zero_point"):
                assert torch.equal(getattr(back, name), getattr(t, name)), name
            assert torch.equal(Int4PreshuffledTensor.from_int4_tensor(t).dequantize(), t.dequantize())

    def test_bmm_experts_through_the_batched_kernel(self):
        w, t = plain((8, 1024, 2048))
        p = convert_to_packed_tensor_based_on_current_hardware(t)
        for m in (1, 5, 64):
            x = torch.randn(8, m, 2048, dtype=torch.bfloat16, device="cuda")
            out = torch.bmm(x, p.mT)
            assert out.shape == (8, m, 1024)
            assert rel_error(reference.bmm(x, t), out) < 1e-2
            assert sqnr(torch.bmm(x.double(), w.double().mT), out) > 18

    def test_slicing_along_n_and_k_and_experts(self):
        _, t = plain((4, 512, 1024))
        p = Int4PreshuffledTensor.from_int4_tensor(t)
        assert torch.equal(p[1].dequantize(), t[1].dequantize())
        assert torch.equal(p[:, 64:200].dequantize(), t[:, 64:200].dequantize())
        assert torch.equal(p[..., 256:768].dequantize(), t[..., 256:768].dequantize())
        with pytest.raises(ValueError, match="group boundaries"):
            p[..., 100:300]

    def test_save_load_clone_copy(self):
        _, t = plain((256, 512))
        p = Int4PreshuffledTensor.from_int4_tensor(t)
        buf = io.BytesIO()
        torch.save(p, buf)
        buf.seek(0)
        back = torch.load(buf, weights_only=True)
        assert type(back) is Int4PreshuffledTensor and torch.equal(back.qdata, p.qdata)
        c = p.clone()
        c.copy_(Int4PreshuffledTensor.from_int4_tensor(plain((256, 512))[1]))
        assert not torch.equal(c.qdata, p.qdata)
        assert "activation_dtype='bf16'" in repr(p)
        with pytest.raises(ValueError, match="lives on CUDA"):
            p.to("cpu")

    def test_model_conversion_keeps_outputs_and_attributes(self):
        model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.SiLU(),
                                    torch.nn.Linear(2048, 200)).to("cuda", torch.bfloat16)
        quantize_(model, Int4WeightOnlyConfig())
        model[0].weight.weight_loader = print
        x, x64 = (torch.randn(m, 1024, dtype=torch.bfloat16, device="cuda") for m in (32, 64))
        with torch.no_grad():
            before, before64 = model(x), model(x64)
            convert_model_to_packed_tensors_(model)
            after, after64 = model(x), model(x64)
        assert isinstance(model[0].weight, Int4PreshuffledTensor)
        assert model[0].weight.weight_loader is print and not model[0].weight.requires_grad
        assert torch.equal(before64, after64)  # fbgemm's GEMMs on both layouts
        assert rel_error(before, after) < 2e-3  # fbgemm's GEMM vs ours at 32 rows

    def test_quantize_directly_preshuffled(self):
        model = torch.nn.Linear(512, 256, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(4, 512, dtype=torch.bfloat16, device="cuda")
        ref = model(x)
        quantize_(model, Int4WeightOnlyConfig(int4_packing_format="preshuffled"))
        assert isinstance(model.weight, Int4PreshuffledTensor)
        assert sqnr(ref, model(x)) > 18


@gpu
@needs_kernels
class TestFp8PlainOnHopper:
    @pytest.mark.parametrize("m, n, k", [(1, 4096, 4096), (16, 512, 1024), (64, 200, 384),
                                         (128, 1024, 1024)])
    def test_matches_the_reference_emulation(self, m, n, k):
        w = torch.randn(n, k, dtype=torch.bfloat16, device="cuda") * 0.02
        t = Int4Tensor.from_hp(w, (1, 128), activation_dtype="fp8")
        x = torch.randn(m, k, dtype=torch.bfloat16, device="cuda")
        out = F.linear(x, t)
        emulated = reference.linear(round_fp8_rows(x), t, None)
        err = rel_error(emulated, out)
        print(f"fp8 plain vs reference emulation M={m} N={n} K={k}: rel err {err:.2e}")
        if m < kernels.FP8_ROWWISE_MIN_M:
            # the bf16 kernels on the fp8-rounded activations: the reference path's arithmetic
            assert err < 1e-2
        else:
            # f8i4bf16_rowwise also rounds the dequantized weights to fp8 (measured: 3.3e-2 on
            # an H200), which the reference path does not emulate
            assert err < 0.05
        assert sqnr(x.double() @ w.double().t(), out) > 15

    def test_not_converted_to_preshuffled(self):
        t = Int4Tensor.from_hp(torch.randn(256, 512, dtype=torch.bfloat16, device="cuda"),
                               (1, 128), activation_dtype="fp8")
        assert convert_to_packed_tensor_based_on_current_hardware(t) is t


@gpu
@needs_kernels
class TestFp8Activations:
    @pytest.mark.parametrize("m", [1, 16, 128, 1024])
    def test_linear_against_float(self, m):
        w = torch.randn(1024, 2048, dtype=torch.bfloat16, device="cuda") * 0.02
        p = Int4PreshuffledTensor.from_hp_fp8(w)
        x = torch.randn(m, 2048, dtype=torch.bfloat16, device="cuda")
        out = F.linear(x, p)
        assert sqnr(x.double() @ w.double().t(), out) > 15
        # against its own dense value with bf16 activations: only the fp8 rounding of x differs
        assert rel_error(x.float() @ p.dequantize(torch.float32).t(), out) < 0.06
        assert p.dequantize().shape == w.shape

    def test_unaligned_n_and_config(self):
        model = torch.nn.Linear(1024, 200, dtype=torch.bfloat16, device="cuda")
        x = torch.randn(3, 1024, dtype=torch.bfloat16, device="cuda")
        ref = model(x)
        quantize_(model, Float8DynamicActivationInt4WeightConfig())
        assert model.weight.activation_dtype == "fp8"
        assert model(x).shape == (3, 200) and sqnr(ref, model(x)) > 15


    @pytest.mark.parametrize("m", [1, 5, 64])
    def test_bmm_experts_through_the_grouped_kernel(self, m):
        w = torch.randn(4, 200, 1024, dtype=torch.bfloat16, device="cuda") * 0.02
        p = Int4PreshuffledTensor.from_hp_fp8(w)
        x = torch.randn(4, m, 1024, dtype=torch.bfloat16, device="cuda")
        out = torch.bmm(x, p.mT)
        assert out.shape == (4, m, 200)
        # one grouped kernel for all experts == one f8i4bf16_shuffled per expert, bit for bit
        per_expert = torch.stack([F.linear(x[e], p[e]) for e in range(4)])
        assert torch.equal(out, per_expert)
        assert sqnr(torch.bmm(x.double(), w.double().mT), out) > 15

    def test_parts_are_exact_and_rebuild_the_same_layout(self):
        w = torch.randn(2, 200, 512, dtype=torch.bfloat16, device="cuda") * 0.02
        p = Int4PreshuffledTensor.from_hp_fp8(w)
        q, group_scale, row_scale = fbgemm.fp8_weight_parts(p)
        assert q.dtype == torch.int8 and q.shape == (2, 208, 512)
        assert int(q.min()) >= -8 and int(q.max()) <= 7
        # the kernel's weight: the products q * s looked up in fp8 (e4m3), times the row scale
        products = q.float() * group_scale.float().repeat_interleave(128, -2).mT
        dense = products.to(torch.float8_e4m3fn).float() * row_scale[..., None]
        assert rel_error(dense[:, :200], p.dequantize(torch.float32)) < 5e-3
        rebuilt = Int4PreshuffledTensor.from_fp8_parts(q[:, :200], group_scale[..., :200],
                                                       row_scale[:, :200])
        assert torch.equal(rebuilt.qdata, p.qdata)
        assert torch.equal(rebuilt.group_scale.view(torch.uint8), p.group_scale.view(torch.uint8))
        # (rows past N: fbgemm's scales of all-zero rows are tiny, ours zero; both multiply 0)
        assert torch.equal(rebuilt.row_scale[:, :200], p.row_scale[:, :200])

    def test_slicing_along_n_and_k(self):
        w = torch.randn(320, 512, dtype=torch.bfloat16, device="cuda") * 0.02
        p = Int4PreshuffledTensor.from_hp_fp8(w)
        dense = p.dequantize()
        x = torch.randn(3, 512, dtype=torch.bfloat16, device="cuda")
        for piece, expected in [(p[64:200], dense[64:200]), (p[:, 128:384], dense[:, 128:384]),
                                (p[1::3], dense[1::3]), (p.mT[:, 16:48].mT, dense[16:48])]:
            assert piece.activation_dtype == "fp8" and piece.shape == expected.shape
            assert torch.equal(piece.dequantize(), expected)
        assert rel_error(F.linear(x, p)[:, 64:200], F.linear(x, p[64:200])) < 1e-3
        k_slice = p[:, 128:384]
        ref = x[:, 128:384].float() @ dense[:, 128:384].float().t()
        assert rel_error(ref, F.linear(x[:, 128:384], k_slice)) < 0.06
        with pytest.raises(ValueError, match="group boundaries"):
            p[:, 100:300]
        with pytest.raises(ValueError, match="N = 0"):
            p[10:10]

@gpu
@needs_kernels
def test_compiled_preshuffled_model_matches_eager():
    model = torch.nn.Sequential(torch.nn.Linear(1024, 2048), torch.nn.SiLU(),
                                torch.nn.Linear(2048, 512)).to("cuda", torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig())
    convert_model_to_packed_tensors_(model)
    assert isinstance(model[0].weight, Int4PreshuffledTensor)
    x = torch.randn(4, 1024, dtype=torch.bfloat16, device="cuda")
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert rel_error(eager, compiled) < 1e-2


@gpu
@needs_kernels
def test_compiled_bmm_experts():
    _, t = plain((4, 256, 512))
    p = Int4PreshuffledTensor.from_int4_tensor(t).mT
    x = torch.randn(4, 3, 512, dtype=torch.bfloat16, device="cuda")
    fn = torch.compile(lambda x, w: torch.bmm(x, w), fullgraph=True)
    assert rel_error(torch.bmm(x, p), fn(x, p)) < 1e-2
    fn2 = torch.compile(lambda x, w: torch.bmm(x, w), fullgraph=True)
    assert rel_error(torch.bmm(x, t.mT), fn2(x, t.mT)) < 1e-2


def _cpu_preshuffled(n=200, k=256, activation_dtype="bf16"):
    """A correctly shaped Int4PreshuffledTensor on the CPU (what ``load_file`` returns there);
    its values are arbitrary: only fbgemm could read them."""
    np_ = -(-n // 16) * 16
    q = torch.zeros(np_, k // 2, dtype=torch.int8)
    if activation_dtype == "bf16":
        s = torch.ones(k // 128, np_, dtype=torch.bfloat16)
        return Int4PreshuffledTensor(q, s, (1, 128), (n, k), "bf16", group_zero=s.clone())
    gs = torch.ones(k // 128, 8, np_).to(torch.float8_e4m3fn)
    return Int4PreshuffledTensor(q, gs, (1, 128), (n, k), "fp8",
                                 row_scale=torch.ones(np_))


class TestOnTheCpu:
    @pytest.mark.parametrize("activation_dtype", ["bf16", "fp8"])
    def test_reading_it_says_fbgemm_on_cuda_is_needed(self, activation_dtype):
        t = _cpu_preshuffled(activation_dtype=activation_dtype)
        x = torch.randn(2, 256, dtype=torch.bfloat16)
        for use in (t.dequantize, lambda: F.linear(x, t), lambda: x @ t.t(), lambda: t[:, :128]):
            with pytest.raises(NotImplementedError, match="needs fbgemm-gpu-genai on a CUDA GPU"):
                use()

    def test_layout_is_checked(self):
        t = _cpu_preshuffled()
        with pytest.raises(ValueError, match=r"group_zero is .*expected bfloat16\[2, 208\]"):
            Int4PreshuffledTensor(t.qdata, t.group_scale, (1, 128), (200, 256), "bf16",
                                  group_zero=t.group_zero[:1])
        with pytest.raises(ValueError, match="group_zero .*expected a tensor"):
            Int4PreshuffledTensor(t.qdata, t.group_scale, (1, 128), (200, 256), "bf16")
        with pytest.raises(ValueError, match="qdata is .*N padded to 16"):
            Int4PreshuffledTensor(t.qdata, t.group_scale, (1, 128), (100, 256), "bf16",
                                  group_zero=t.group_zero)

    def test_is_pinned_and_public_path(self):
        t = _cpu_preshuffled()
        assert t.is_pinned() is False
        assert Int4PreshuffledTensor.__module__ == "int4tensor"


@needs_kernels
class TestPinnedAndSliced:
    def test_pin_memory_round_trip(self):
        _, t = plain((256, 512))
        p = Int4PreshuffledTensor.from_int4_tensor(t)
        host = p.to_int4_tensor().cpu().pin_memory()
        assert host.is_pinned()
        assert torch.equal(host.to("cuda").dequantize(), t.dequantize())


def _fake_preshuffled(shape):
    """An Int4PreshuffledTensor of the right field shapes on the CPU (values unused)."""
    *lead, n, k = shape
    return Int4PreshuffledTensor.from_fields(
        {"qdata": torch.zeros(*lead, n, k // 2, dtype=torch.int8),
         "group_scale": torch.zeros(*lead, k // 128, n, dtype=torch.bfloat16),
         "group_zero": torch.zeros(*lead, k // 128, n, dtype=torch.bfloat16)},
        [(1,) * len(lead) + (1, 128), tuple(shape), "bf16"], validate=False)


@pytest.mark.parametrize("shape, x_shape, entry", [((256, 512), (3, 512), "preshuffled_linear"),
                                                    ((4, 256, 512), (4, 2, 512),
                                                     "preshuffled_bmm")])
def test_matmul_with_a_transposed_view_routes_to_the_stored_weight(monkeypatch, shape, x_shape,
                                                                   entry):
    # the routing of x @ w.T (what runs on the GPU), with the kernels and fbgemm check stubbed
    w = _fake_preshuffled(shape)
    seen = []
    monkeypatch.setattr(Int4PreshuffledTensor, "_require_fbgemm", lambda self, what: None)
    monkeypatch.setattr(kernels, entry, lambda x, stored, *bias: seen.append(stored) or
                        torch.zeros(*x.shape[:-1], stored.stored_n, dtype=x.dtype))
    x = torch.randn(x_shape, dtype=torch.bfloat16)
    for _ in range(2):  # every forward makes a new transposed view
        out = torch.matmul(x, w.transpose(-2, -1))
    assert out.shape == (*x_shape[:-1], shape[-2])
    assert seen == [w, w]  # the parameter itself: its eager plans serve every view
    with pytest.raises(ValueError, match="K = 512|cannot be multiplied"):
        torch.matmul(torch.randn(*x_shape[:-1], 256, dtype=torch.bfloat16), w.transpose(-2, -1))


def test_stored_n_is_the_unpadded_rows_of_either_orientation():
    w = _fake_preshuffled((200, 256))
    assert w.stored_n == 200 and w.t().stored_n == 200
