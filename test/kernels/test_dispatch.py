"""The dispatch tables as a specification: which candidate takes a call and why the ones before
it refuse, decided on a CPU with the device passed in; decisions cached per weight and input
signature. (That the real predicates hold on a GPU is checked by the GPU tests.)"""

import io

import pytest
import torch
import torch.nn.functional as F

from int4tensor import Int4PreshuffledTensor, Int4Tensor, kernels
from int4tensor.kernels import dispatch

ALL = frozenset({"nvrtc", "fbgemm", "triton"})
H200 = dict(device_type="cuda", capability=(9, 0), features=ALL)


def weight(n=256, k=512, g=128, activation_dtype="bf16"):
    t = Int4Tensor.from_hp(torch.randn(n, k, dtype=torch.bfloat16), (1, g))
    return Int4Tensor(t.qdata, t.scale, t.zero_point, t.block_size, t.shape,
                      activation_dtype=activation_dtype)


def backend(m, w, op="linear", dtype=torch.bfloat16, **device):
    x = torch.randn(m, w.shape[-1], dtype=dtype)
    return kernels.explain_call(op, x, w, **(device or H200))


@pytest.mark.parametrize("m, name", [(1, "cuda"), (16, "cuda"), (17, "cuda_gemm"),
                                     (32, "cuda_gemm"), (33, "fbgemm"), (4095, "fbgemm"),
                                     (4096, "dense")])
def test_plain_linear_on_hopper_by_rows(m, name):
    assert backend(m, weight()).backend == name


def test_refusals_name_the_reason():
    decision = backend(64, weight())
    assert decision.backend == "fbgemm"
    reasons = dict(decision.refused)
    assert reasons["cuda"] == "M = 64 rows, it takes 1 to 16"
    assert reasons["cuda_gemm"] == "M = 64 rows, it takes 17 to 32"
    assert reasons["dense"].startswith("M = 64 < 4096")


def test_without_fbgemm_or_nvrtc():
    no_fbgemm = dict(H200, features=frozenset({"nvrtc", "triton"}))
    decision = backend(64, weight(), **no_fbgemm)
    assert decision.backend == "reference"
    assert "pip install fbgemm-gpu-genai" in dict(decision.refused)["fbgemm"]
    only_triton = dict(H200, features=frozenset({"triton"}))
    assert backend(1, weight(), **only_triton).backend == "triton"
    assert backend(8, weight(), **only_triton).backend == "triton"
    assert "NVRTC" in dict(backend(1, weight(), **only_triton).refused)["cuda"]


def test_older_gpu_and_group_size_32():
    ampere = dict(H200, capability=(8, 0))
    assert backend(64, weight(), **ampere).backend == "reference"
    assert "9.0+" in dict(backend(64, weight(), **ampere).refused)["fbgemm"]
    g32 = weight(g=32)
    assert backend(1, g32).backend == "triton"
    assert dict(backend(1, g32).refused)["cuda"] == "G = 32, it takes 128 or 256"
    assert backend(64, g32).backend == "reference"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_other_activation_dtypes_take_the_reference_path(dtype):
    decision = backend(1, weight(), dtype=dtype)
    assert decision.backend == "reference"
    assert f"activations are {dtype}" in dict(decision.refused)["cuda"]


def test_sliced_weight_is_refused_by_kernels_needing_contiguous_fields():
    w = weight()
    n_slice, k_slice = w[:128], w[:, 128:]  # views: strided scales; strided qdata
    assert backend(1, n_slice).backend == "cuda"  # our kernels take the scales' row stride
    decision = backend(64, n_slice)  # fbgemm would crash on the strided scales
    assert decision.backend == "reference" and "contiguous" in dict(decision.refused)["fbgemm"]
    for m in (1, 24, 64):
        decision = backend(m, k_slice)
        assert decision.backend == "reference", m
        reasons = dict(decision.refused)
        assert "contiguous" in reasons["fbgemm"]
        assert m != 1 or "contiguous" in reasons["cuda"]
    assert backend(64, k_slice._with_data(torch.Tensor.contiguous)).backend == "fbgemm"


def test_fp8_activations():
    w8 = weight(activation_dtype="fp8")
    assert backend(64, w8).backend == "fbgemm_fp8"
    assert backend(1, w8).backend == "cuda"  # on the fp8-rounded activations
    assert "M = 1 < 64" in dict(backend(1, w8).refused)["fbgemm_fp8"]


def test_bmm_table():
    t = Int4Tensor.from_hp(torch.randn(4, 256, 512, dtype=torch.bfloat16), (1, 1, 128))
    for m, name in ((1, "cuda"), (32, "cuda_gemm"), (64, "fbgemm")):
        x = torch.randn(4, m, 512, dtype=torch.bfloat16)
        assert kernels.explain_call("bmm", x, t, **H200).backend == name
    x = torch.randn(4, 2, 512, dtype=torch.bfloat16)
    assert kernels.explain_call("bmm", x, t).backend == "reference"  # this CPU


def test_preshuffled_tables_on_fields_built_here():
    q = torch.zeros(256, 256, dtype=torch.int8)
    s = torch.ones(4, 256, dtype=torch.bfloat16)
    p = Int4PreshuffledTensor(q, s, (1, 128), (256, 512), "bf16", group_zero=s.clone())
    for m, name in ((1, "cuda"), (24, "cuda_gemm"), (64, "fbgemm")):
        assert backend(m, p).backend == name
    with pytest.raises(RuntimeError, match="no kernel can run linear of a preshuffled weight"):
        backend(1, p, device_type="cpu", capability=None, features=frozenset())


def test_the_tables_list_every_layout():
    names = dispatch.tables()
    assert names[("linear", "plain", "bf16")][:3] == ["cuda", "cuda_gemm", "dense"]
    assert names[("linear", "plain", "bf16")][-1] == "reference"
    assert names[("linear", "plain", "fp8")][0] == "fbgemm_fp8"
    assert set(names) >= {("bmm", "plain", "bf16"), ("linear", "preshuffled", "fp8"),
                          ("bmm", "preshuffled", "bf16")}


class TestCachedDecisions:
    def test_one_decision_per_signature(self):
        w, b = weight(), torch.randn(256, dtype=torch.bfloat16)
        x = torch.randn(3, 512, dtype=torch.bfloat16)
        ref = F.linear(x, w.dequantize(), b)
        for _ in range(3):
            assert torch.equal(F.linear(x, w, b), ref)
        assert len(w._dispatch_plans) == 1
        F.linear(torch.randn(2, 5, 512, dtype=torch.bfloat16), w)  # 10 rows: another signature
        F.linear(x.float(), w)
        assert len(w._dispatch_plans) == 3

    def test_copy_clears_them_and_pickles_leave_them_out(self):
        w, other = weight(), weight()
        x = torch.randn(3, 512, dtype=torch.bfloat16)
        F.linear(x, w)
        w.copy_(other)
        assert "_dispatch_plans" not in w.__dict__
        assert torch.equal(F.linear(x, w), F.linear(x, other))
        buf = io.BytesIO()
        torch.save(w, buf)
        buf.seek(0)
        loaded = torch.load(buf, weights_only=True)
        assert "_dispatch_plans" not in loaded.__dict__ and torch.equal(loaded.qdata, w.qdata)

    def test_a_repeated_call_finds_its_plan_and_only_then(self):
        """``cached_plan`` answers the plan made by an earlier eager call of the same weight
        and activation signature, and None for anything else: a new signature, another
        weight, an activation needing a gradient, a weight after ``copy_``."""
        w, other = weight(), weight()
        x = torch.randn(3, 512, dtype=torch.bfloat16)
        assert dispatch.cached_plan("linear", x, w) is None  # nothing planned yet
        ref = F.linear(x, w)
        plan = dispatch.cached_plan("linear", x, w)
        assert plan is not None and torch.equal(plan(x, None), ref)
        assert dispatch.cached_plan("linear", x, other) is None
        assert dispatch.cached_plan("bmm", x, w) is None
        assert dispatch.cached_plan("linear", x[:2], w) is None  # another shape
        strided = torch.randn(3, 1024, dtype=torch.bfloat16)[:, ::2]
        assert dispatch.cached_plan("linear", strided, w) is None  # other strides
        grad_x = x.clone().requires_grad_()
        assert dispatch.cached_plan("linear", grad_x, w) is None
        with torch.no_grad():
            assert dispatch.cached_plan("linear", grad_x, w) is plan
        w.copy_(other)
        assert dispatch.cached_plan("linear", x, w) is None
        assert torch.equal(F.linear(x, w), F.linear(x, other))

    def test_gradient_calls_take_the_traced_path(self):
        w = weight()
        x = torch.randn(3, 512, dtype=torch.bfloat16, requires_grad=True)
        assert not dispatch.is_eager(x)
        F.linear(x, w).sum().backward()
        assert torch.allclose(x.grad.float(), w.dequantize().float().sum(0).expand(3, -1),
                              rtol=1e-2, atol=1e-2)
        assert "_dispatch_plans" not in w.__dict__


def test_a_plain_weight_served_on_a_cpu_that_could_convert_it_warns_once(monkeypatch):
    """The reference path on a CPU where torch's int4 GEMM would run the weight after
    convert_model_to_packed_tensors_: a one-off forward does not warn; the same weight called
    with a second input shape (as generate() does: prefill, then decode) warns once, naming
    the call to make; other weights and shapes after that do not."""
    import warnings

    monkeypatch.setattr(kernels, "_CPU_HINT_GIVEN", False)
    monkeypatch.setattr(kernels.cpu, "why_not_available", lambda: None)
    w = weight()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        F.linear(torch.randn(1, 7, 512, dtype=torch.bfloat16), w)
        F.linear(torch.randn(1, 7, 512, dtype=torch.bfloat16), w)
    with pytest.warns(UserWarning, match=r"convert_model_to_packed_tensors_\(model\)"):
        F.linear(torch.randn(1, 1, 512, dtype=torch.bfloat16), w)
    other = weight()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in (3, 1):
            F.linear(torch.randn(m, 512, dtype=torch.bfloat16), other)


@pytest.mark.parametrize("case", ["no cpu gemm", "float32 activations", "fp8 activations"])
def test_no_conversion_hint_where_conversion_would_not_help(monkeypatch, case):
    import warnings

    monkeypatch.setattr(kernels, "_CPU_HINT_GIVEN", False)
    monkeypatch.setattr(kernels.cpu, "why_not_available",
                        lambda: "no AVX2" if case == "no cpu gemm" else None)
    w = weight(activation_dtype="fp8" if case == "fp8 activations" else "bf16")
    dtype = torch.float32 if case == "float32 activations" else torch.bfloat16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in (2, 1):
            F.linear(torch.randn(m, 512, dtype=dtype), w)
    assert not kernels._CPU_HINT_GIVEN


@pytest.mark.skipif(kernels.cpu.why_not_available() is not None,
                    reason="needs torch's CPU int4 GEMM (AVX2/AVX512)")
def test_a_converted_model_runs_without_the_hint(monkeypatch):
    import warnings

    from int4tensor import Int4WeightOnlyConfig, convert_model_to_packed_tensors_, quantize_

    monkeypatch.setattr(kernels, "_CPU_HINT_GIVEN", False)
    model = torch.nn.Sequential(torch.nn.Linear(512, 256)).to(torch.bfloat16)
    quantize_(model, Int4WeightOnlyConfig())
    convert_model_to_packed_tensors_(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for m in (2, 1):
            model(torch.randn(m, 512, dtype=torch.bfloat16))
    assert not kernels._CPU_HINT_GIVEN
