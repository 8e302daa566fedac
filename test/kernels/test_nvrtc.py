"""Compiling our CUDA kernels at first use (int4tensor/kernels/nvrtc.py): where NVRTC fails, the
kernels report they cannot run and every op falls back to torch, with the same results."""

import pytest
import torch

from int4tensor import Int4Tensor, kernels, quant_primitives
from int4tensor.kernels import cuda_dequant, cuda_fp8_rows, cuda_gemv, dispatch, nvrtc


@pytest.fixture
def broken_nvrtc(monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("nvrtc: simulated failure")

    caches = (nvrtc.compile_kernel, nvrtc.compiles, dispatch._cuda_features)  # probed once
    for cache in caches:
        cache.cache_clear()
    monkeypatch.setattr(torch.cuda, "_compile_kernel", fail, raising=False)
    yield
    for cache in caches:
        cache.cache_clear()


def test_a_failing_compile_is_reported_not_raised(broken_nvrtc):
    assert nvrtc.compiles("extern \"C\" __global__ void k() {}", "k", (9, 0)) is False


@pytest.mark.gpu
def test_ops_fall_back_to_torch_when_nvrtc_fails(broken_nvrtc):
    t = Int4Tensor.from_hp(torch.randn(256, 512, dtype=torch.bfloat16, device="cuda"), (1, 128))
    x = torch.randn(4, 512, dtype=torch.bfloat16, device="cuda")
    assert not cuda_dequant.can_run(t.qdata, t.scale, t.zero_point, torch.bfloat16)
    assert not cuda_fp8_rows.can_run(x)
    assert not cuda_gemv.can_compile(x.device.index or 0)
    assert kernels.linear_backend(x, t) != "cuda"  # the decode GEMV falls back too
    assert torch.equal(t.dequantize(), quant_primitives.dequantize_int4(
        t.qdata, t.scale, t.zero_point, 128, torch.bfloat16))
    assert torch.equal(kernels.round_fp8_rows(x), quant_primitives.round_fp8_rows(x))
