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


_ADD = r"""extern "C" __global__ void add_value(const float* x, float* out, int n, int value) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) out[i] = x[i] + value;
}"""


@pytest.mark.gpu
def test_a_launcher_reused_across_calls_and_threads_reads_each_calls_tensors():
    """The launcher refills one parameter buffer on its own thread and builds one per call on
    others: every launch must see the tensors it was given, not an earlier call's."""
    import threading

    kernel = nvrtc.compile_kernel(_ADD, "add_value", torch.cuda.get_device_capability())
    n = 1000
    launch = nvrtc.Launcher(kernel, (4, 1, 1), (256, 1, 1), 0, 2, (n, 3), torch.cuda.current_device())
    xs = [torch.randn(n, device="cuda") for _ in range(4)]
    outs = [torch.empty(n, device="cuda") for _ in range(4)]
    for x, out in zip(xs, outs):
        launch(x, out)
    errors = []

    def other_thread():
        try:
            x, out = torch.randn(n, device="cuda"), torch.empty(n, device="cuda")
            for _ in range(50):
                launch(x, out)
            torch.cuda.synchronize()
            assert torch.equal(out, x + 3)
        except Exception as error:  # noqa: BLE001  (re-raised below)
            errors.append(error)

    thread = threading.Thread(target=other_thread)
    thread.start()
    for _ in range(50):
        for x, out in zip(xs, outs):
            launch(x, out)
    thread.join()
    torch.cuda.synchronize()
    assert not errors, errors
    for x, out in zip(xs, outs):
        assert torch.equal(out, x + 3)


@pytest.mark.parametrize("shape", [(1, 4096), (1, 1, 4096), (3, 5, 7), (1,), (1, 1), (2, 1)])
def test_the_output_allocator_gives_fresh_contiguous_tensors(shape):
    allocate = nvrtc.empty_allocator(shape, torch.bfloat16, torch.device("cpu"))
    a, b = allocate(), allocate()
    assert a.shape == shape and a.dtype == torch.bfloat16 and a.is_contiguous()
    assert a.stride() == torch.empty(shape).stride()
    assert a.data_ptr() != b.data_ptr()  # not views of one buffer


@pytest.mark.gpu
def test_launches_and_memsets_go_to_the_current_stream():
    """The raw stream handle travels as a pointer (None for the default stream): work issued
    on a side stream runs there, not behind the busy default stream."""
    kernel = nvrtc.compile_kernel(_ADD, "add_value", torch.cuda.get_device_capability())
    n = 1 << 20
    launch = nvrtc.Launcher(kernel, (n // 256, 1, 1), (256, 1, 1), 0, 2, (n, 1),
                            torch.cuda.current_device())
    x = torch.randn(n, device="cuda")
    out = torch.full((n,), 7.0, device="cuda")
    side = torch.cuda.Stream()
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)  # the default stream is busy for tens of ms
    with torch.cuda.stream(side):  # work on the side stream does not wait for it
        nvrtc.zero_async(out, torch.cuda.current_device())
        launch.launch(x.data_ptr(), out.data_ptr())
        done = torch.cuda.Event()
        done.record()
    done.synchronize()
    assert torch.equal(out, x + 1)
    nvrtc.zero_async(out, torch.cuda.current_device())  # the default stream (handle 0)
    torch.cuda.synchronize()
    assert not out.any()
