"""Int4CPUTensor: exact conversion from/to the plain layout, every compute op against the
plain layout's reference path, data movement, saving as the plain layout, compile."""

import io

import pytest
import torch
import torch.nn.functional as F

from int4tensor import (
    Int4CPUTensor,
    Int4Tensor,
    Int4WeightOnlyConfig,
    convert_model_to_packed_tensors_,
    convert_to_packed_tensor_based_on_current_hardware,
    quantize_,
)
from int4tensor.kernels import cpu
from int4tensor.serialization import load_file, save_file
from test.helpers import rel_error

pytestmark = pytest.mark.skipif(cpu.why_not_available() is not None,
                                reason=f"{cpu.why_not_available()}")

TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
#: activation rows on both sides of the dispatch threshold
ROWS = [1, 5, cpu.INT4MM_MAX_M + 3]


@pytest.fixture(autouse=True)
def avx512_row_limit(monkeypatch):
    """The AVX512 layout's row limit on any machine (AVX2 has none), so both paths run."""
    monkeypatch.setattr(cpu, "int4mm_max_m", lambda: cpu.INT4MM_MAX_M)


def pair(shape=(200, 256), group_size=64, dtype=torch.bfloat16):
    """A plain Int4Tensor and its Int4CPUTensor."""
    w = torch.randn(shape, dtype=dtype) * 0.02
    plain = Int4Tensor.from_hp(w, (1,) * (len(shape) - 1) + (group_size,))
    return plain, Int4CPUTensor.from_int4_tensor(plain)


def reference_linear(x, plain, bias=None):
    """The plain layout's reference path in float64."""
    out = x.double() @ plain.dequantize(x.dtype).double().t()
    return out + bias.double() if bias is not None else out


class TestConversion:
    @pytest.mark.parametrize("shape,group_size", [((200, 256), 64), ((128, 96), 32),
                                                  ((3, 70, 512), 128)])
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_round_trip_is_exact(self, shape, group_size, dtype):
        plain, t = pair(shape, group_size, dtype)
        assert t.shape == plain.shape and t.dtype == dtype and t.block_size == plain.block_size
        back = t.to_int4_tensor()
        assert isinstance(back, Int4Tensor) and torch.equal(back, plain)
        assert torch.equal(t.dequantize(), plain.dequantize())
        assert torch.equal(t.dequantize(torch.float32), plain.dequantize(torch.float32))

    def test_transposed_view_converts(self):
        plain, _ = pair()
        t = Int4CPUTensor.from_int4_tensor(plain.mT)
        assert t.is_transposed and t.shape == (256, 200)
        assert torch.equal(t.dequantize(), plain.dequantize().mT)
        assert torch.equal(t.to_int4_tensor().dequantize(), plain.mT.dequantize())

    def test_hardware_conversion_gives_the_cpu_layout(self):
        plain, _ = pair()
        t = convert_to_packed_tensor_based_on_current_hardware(plain)
        assert isinstance(t, Int4CPUTensor) and torch.equal(t.to_int4_tensor(), plain)

    def test_a_model_run_before_conversion_runs_the_cpu_kernels_after(self):
        """The plain weight's cached dispatch plans and fields stay with the plain weight
        (carried over to the new Parameter they kept running the reference path)."""
        import int4tensor

        model = torch.nn.Sequential(torch.nn.Linear(256, 128)).to(torch.bfloat16)
        model[0].weight.weight_loader = "kept"
        quantize_(model, Int4WeightOnlyConfig())
        x = torch.randn(2, 256, dtype=torch.bfloat16)
        with torch.no_grad():
            model(x)
        convert_model_to_packed_tensors_(model)
        weight = model[0].weight
        assert isinstance(weight, Int4CPUTensor) and weight.weight_loader == "kept"
        assert not {"_dispatch_plans", "scale", "zero_point"} & set(vars(weight))
        assert [e.backend for e in int4tensor.explain(model, x)] == ["cpu_int4mm"]

    def test_fp8_activation_weights_stay_plain(self):
        w = torch.randn(128, 256, dtype=torch.bfloat16)
        fp8 = Int4Tensor.from_hp(w, (1, 128), activation_dtype="fp8")
        assert convert_to_packed_tensor_based_on_current_hardware(fp8) is fp8
        with pytest.raises(ValueError, match="fp8 activations"):
            Int4CPUTensor.from_int4_tensor(fp8)

    def test_model_conversion(self):
        model = torch.nn.Sequential(torch.nn.Linear(256, 320), torch.nn.SiLU(),
                                    torch.nn.Linear(320, 96)).to(torch.bfloat16)
        quantize_(model, Int4WeightOnlyConfig(group_size=64))
        x = torch.randn(3, 256, dtype=torch.bfloat16)
        with torch.no_grad():
            ref = model(x)
            convert_model_to_packed_tensors_(model)
            out = model(x)
        assert all(isinstance(m.weight, Int4CPUTensor) for m in (model[0], model[2]))
        assert not model[0].weight.requires_grad
        assert rel_error(ref, out) < 2e-2


class TestCompute:
    @pytest.mark.parametrize("m", ROWS)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
    def test_linear_with_leading_dims_and_bias(self, m, dtype):
        plain, t = pair()
        x = torch.randn(2, m, 256, dtype=dtype)
        bias = torch.randn(200, dtype=dtype)
        out = F.linear(x, t, bias)
        assert out.shape == (2, m, 200) and out.dtype == dtype
        assert rel_error(reference_linear(x, plain, bias), out) < TOLERANCE[dtype]

    @pytest.mark.parametrize("m", ROWS)
    def test_fp32_weight_with_bf16_activations(self, m):
        plain, t = pair(dtype=torch.float32)
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        assert rel_error(reference_linear(x, plain), F.linear(x, t)) < 1e-2

    @pytest.mark.parametrize("m", ROWS)
    def test_mm_matmul_addmm_of_the_transposed_weight(self, m):
        plain, t = pair()
        x = torch.randn(m, 256, dtype=torch.bfloat16)
        ref = reference_linear(x, plain)
        assert rel_error(ref, x @ t.t()) < 1e-2
        assert rel_error(ref, torch.mm(x, t.t())) < 1e-2
        assert rel_error(ref, torch.matmul(x, t.mT)) < 1e-2
        bias = torch.randn(200, dtype=torch.bfloat16)
        assert rel_error(ref + bias.double(), torch.addmm(bias, x, t.t())) < 1e-2

    def test_products_without_a_kernel_go_through_the_dense_value(self):
        plain, t = pair()
        y = torch.randn(256, 3, dtype=torch.bfloat16)
        assert rel_error(plain.dequantize().double() @ y.double(), t @ y) < 1e-2
        x = torch.randn(4, 200, dtype=torch.bfloat16)  # contracts over N: transposed linear
        assert rel_error(x.double() @ plain.dequantize().double(), F.linear(x, t.t())) < 1e-2

    @pytest.mark.parametrize("m", ROWS)
    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
    def test_bmm_of_3d_experts(self, m, dtype):
        plain, t = pair((4, 100, 256), 64)
        x = torch.randn(4, m, 256, dtype=dtype)
        ref = torch.bmm(x.double(), plain.dequantize(dtype).double().mT)
        assert rel_error(ref, torch.bmm(x, t.mT)) < TOLERANCE[dtype]
        assert rel_error(ref, x @ t.mT) < TOLERANCE[dtype]

    @pytest.mark.parametrize("counts", [[0, 3, 0, 0, 1, 0, 2, 0],  # decode: 3 active experts
                                        [0, 0, 0, cpu.INT4MM_MAX_M + 5, 0, 0, 0, 0],
                                        [4, 0, 0, 0, 0, 0, 0, 1]])
    def test_grouped_mm_runs_each_active_expert_once(self, counts, monkeypatch):
        """transformers' grouped_mm experts on a converted stack: torch's int4 GEMM per active
        expert (one dequantized expert above INT4MM_MAX_M rows), never the whole stack."""
        plain, t = pair((8, 96, 256), 64)
        tail = 3  # rows past offs[-1]: no expert's, 0
        x = torch.randn(sum(counts) + tail, 256, dtype=torch.bfloat16)
        offs = torch.tensor(counts, dtype=torch.int32).cumsum(0).to(torch.int32)
        dequantized = []
        real = cpu.dequantize_t
        monkeypatch.setattr(cpu, "dequantize_t",
                            lambda q, *a: dequantized.append(tuple(q.shape)) or real(q, *a))
        out = F.grouped_mm(x, t.transpose(-2, -1), offs=offs)
        assert out.shape == (x.shape[0], 96) and out.dtype == torch.bfloat16
        ref = torch._grouped_mm(x, plain.dequantize().transpose(-2, -1), offs=offs)
        used = sum(counts)
        assert rel_error(ref[:used], out[:used]) < 1e-2 and not out[used:].any()
        big = sum(c > cpu.INT4MM_MAX_M for c in counts)
        assert len(dequantized) == big and all(len(s) == 2 for s in dequantized)

    def test_grouped_mm_refuses_bad_operands_by_name(self):
        _, t = pair((4, 96, 256), 64)
        x = torch.randn(6, 256, dtype=torch.bfloat16)
        with pytest.raises(ValueError, match=r"offs must be int32 \[4\]"):
            F.grouped_mm(x, t.transpose(-2, -1), offs=torch.tensor([1, 2, 3, 6]))
        with pytest.raises(ValueError, match="K = 128, the expert weights"):
            F.grouped_mm(x[:, :128], t.transpose(-2, -1),
                         offs=torch.tensor([1, 2, 3, 6], dtype=torch.int32))

    def test_grouped_mm_applies_each_experts_pre_scale(self):
        plain, _ = pair((4, 96, 256), 64)
        pre = torch.rand(4, 256, dtype=torch.bfloat16) + 0.5
        plain = Int4Tensor(plain.qdata, plain.scale, plain.zero_point, plain.block_size,
                           plain.shape, act_pre_scale=pre)
        t = Int4CPUTensor.from_int4_tensor(plain)
        x = torch.randn(9, 256, dtype=torch.bfloat16)
        offs = torch.tensor([2, 2, 6, 9], dtype=torch.int32)
        ref = torch._grouped_mm(x, plain.dequantize().transpose(-2, -1), offs=offs)
        assert rel_error(ref, F.grouped_mm(x, t.transpose(-2, -1), offs=offs)) < 1e-2

    @pytest.mark.parametrize("m", [1, 3])
    def test_weight_first_bmm_and_mm_run_the_int4_kernels(self, m, monkeypatch):
        """``torch.bmm(W[expert_ids], x.unsqueeze(-1))`` (transformers' batched_mm experts)."""
        plain, t = pair((8, 96, 256), 64)
        ids = torch.tensor([6, 1, 6])
        calls = []
        real = cpu.cpu_bmm
        monkeypatch.setattr(cpu, "cpu_bmm", lambda x, w: calls.append(x.shape) or real(x, w))
        y = torch.randn(3, 256, m, dtype=torch.bfloat16)
        out = torch.bmm(t[ids], y)
        assert out.shape == (3, 96, m) and calls == [(3, m, 256)]
        ref = torch.bmm(plain.dequantize().double()[ids], y.double())
        assert rel_error(ref, out) < 1e-2
        y2 = torch.randn(256, m, dtype=torch.bfloat16)
        assert rel_error(plain.dequantize().double()[2] @ y2.double(), torch.mm(t[2], y2)) < 1e-2

    def test_act_pre_scale(self):
        plain, _ = pair()
        pre_scale = torch.rand(256, dtype=torch.bfloat16) + 0.5
        plain = Int4Tensor(plain.qdata, plain.scale, plain.zero_point, plain.block_size,
                           plain.shape, act_pre_scale=pre_scale)
        t = Int4CPUTensor.from_int4_tensor(plain)
        for m in ROWS:
            x = torch.randn(m, 256, dtype=torch.bfloat16)
            assert rel_error(F.linear(x, plain), F.linear(x, t)) < 1e-2
        assert rel_error(plain.dequantize(), t.dequantize()) < 1e-2
        assert torch.equal(t.to_int4_tensor().act_pre_scale, pre_scale)

    def test_bad_inputs_say_what_is_wrong(self):
        _, t = pair()
        with pytest.raises(ValueError, match="K = 256"):
            F.linear(torch.randn(2, 255, dtype=torch.bfloat16), t)
        with pytest.raises(TypeError, match="fp32/bf16/fp16 activations"):
            F.linear(torch.ones(2, 256, dtype=torch.int32), t)
        _, experts = pair((2, 64, 256), 64)
        with pytest.raises(ValueError, match="torch.bmm"):
            F.linear(torch.randn(2, 256, dtype=torch.bfloat16), experts)
        with pytest.raises(ValueError, match="batch sizes differ"):
            torch.bmm(torch.randn(3, 1, 256, dtype=torch.bfloat16), experts.mT)


class TestDataMovement:
    def test_slices_along_n_and_k_are_the_plain_slices(self):
        plain, t = pair()
        for s_t, s_plain in ((t[10:150], plain[10:150]), (t[:, 64:192], plain[:, 64:192])):
            assert isinstance(s_t, Int4CPUTensor)
            assert torch.equal(s_t.to_int4_tensor().dequantize(), s_plain.dequantize())
        with pytest.raises(ValueError, match="group boundaries"):
            t[:, 10:100]

    def test_expert_indexing(self):
        plain, t = pair((4, 100, 256), 64)
        assert torch.equal(t[2].dequantize(), plain[2].dequantize()) and t[2].ndim == 2
        assert torch.equal(t[1:3].dequantize(), plain[1:3].dequantize())
        idx = torch.tensor([3, 0])
        assert torch.equal(t[idx].dequantize(), plain[idx].dequantize())
        x = torch.randn(5, 256, dtype=torch.bfloat16)
        assert rel_error(reference_linear(x, plain[2]), F.linear(x, t[2])) < 1e-2

    def test_detach_clone_dtype_and_device(self):
        plain, t = pair()
        assert torch.equal(t.detach(), t) and torch.equal(t.clone(), t)
        assert torch.equal(t.to(torch.float32).dequantize(), plain.to(torch.float32).dequantize())
        with pytest.raises(ValueError, match="to_int4_tensor"):
            t.to("meta")

    def test_copy_from_plain_dense_and_cpu_tensors(self):
        plain, t = pair()
        other_plain, other = pair()
        t.copy_(other_plain)
        assert torch.equal(t, other)
        t.copy_(plain.dequantize())  # a dense tensor is quantized like the destination
        assert rel_error(plain.dequantize(), t.dequantize()) < 5e-2
        t.copy_(Int4CPUTensor.from_int4_tensor(plain))
        assert torch.equal(t.to_int4_tensor(), plain)
        with pytest.raises(ValueError, match="source differs"):
            t.copy_(pair((128, 256))[1])


class TestSaving:
    def test_torch_save_writes_the_plain_layout(self):
        plain, t = pair()
        buf = io.BytesIO()
        torch.save({"w": t}, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)["w"]
        assert type(loaded) is Int4Tensor and torch.equal(loaded, plain)

    def test_save_file_writes_the_plain_layout(self, tmp_path):
        plain, t = pair()
        save_file({"w": t}, tmp_path / "w.safetensors")
        loaded = load_file(tmp_path / "w.safetensors")["w"]
        assert type(loaded) is Int4Tensor and torch.equal(loaded, plain)

    def test_plain_state_dict_loads_into_a_converted_model(self):
        model = torch.nn.Linear(256, 128, dtype=torch.bfloat16)
        quantize_(model, Int4WeightOnlyConfig())
        state = {k: v.clone() for k, v in model.state_dict().items()}
        convert_model_to_packed_tensors_(model)
        with torch.no_grad():
            model.weight.copy_(Int4CPUTensor.from_int4_tensor(pair((128, 256), 128)[0]))
        model.load_state_dict(state)
        assert isinstance(model.weight, Int4CPUTensor)
        assert torch.equal(model.weight.to_int4_tensor(), state["weight"])


@pytest.mark.parametrize("m", [2, cpu.INT4MM_MAX_M + 3])
def test_compiled_model_matches_eager(m):
    model = torch.nn.Sequential(torch.nn.Linear(256, 512), torch.nn.SiLU(),
                                torch.nn.Linear(512, 128)).to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig())
    convert_model_to_packed_tensors_(model)
    x = torch.randn(m, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = model(x)
        compiled = torch.compile(model, fullgraph=True)(x)
    assert rel_error(eager, compiled) < 1e-2


def test_explain_reports_the_cpu_tables():
    import int4tensor

    model = torch.nn.Sequential(torch.nn.Linear(256, 128)).to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig())
    convert_model_to_packed_tensors_(model)
    small = int4tensor.explain(model, torch.randn(2, 3, 256, dtype=torch.bfloat16))
    assert [(e.name, e.backend, e.refused) for e in small] == [("0.weight", "cpu_int4mm", ())]
    m = cpu.INT4MM_MAX_M + 1
    (large,) = int4tensor.explain(model[0].weight, torch.randn(m, 256, dtype=torch.bfloat16))
    assert large.backend == "cpu_dense"
    assert large.refused == (("cpu_int4mm", f"M = {m} > {cpu.INT4MM_MAX_M}: dequantize + "
                                            "dense GEMM is faster on CPU"),)


def test_every_forwards_transposed_view_uses_the_weights_one_plan():
    # transformers-style x @ w.mT on each forward: one eager plan, kept on the stored weight
    plain, t = pair((3, 64, 256), 128)
    x = torch.randn(3, 2, 256, dtype=torch.bfloat16)
    with torch.no_grad():
        first = torch.bmm(x, t.mT)
        again = torch.bmm(x, t.mT)
    assert torch.equal(first, again)
    assert len(t.__dict__.get("_dispatch_plans", {})) == 1
    assert rel_error(torch.bmm(x.double(), plain.dequantize().double().mT), first) < 1e-2
