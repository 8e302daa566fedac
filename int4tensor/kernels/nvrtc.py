"""Compiling our CUDA C++ kernels at first use, with NVRTC through torch.

No compiler is needed at install time and importing this module compiles nothing. The entry
point is ``torch.cuda._compile_kernel`` (private to torch); where it is missing or compiling
fails, :func:`compiles` says so and the dispatcher picks another backend.
"""

from __future__ import annotations

import ctypes
import functools
import struct
import threading

import torch

#: bf16 <-> fp32 helpers shared by the kernels (bf16 held as ``unsigned short``; NVRTC sees no
#: CUDA headers)
BF16_HELPERS = r"""
typedef unsigned short bf16_t;
__device__ __forceinline__ float bf16_lo(unsigned v) { return __uint_as_float(v << 16); }
__device__ __forceinline__ float bf16_hi(unsigned v) { return __uint_as_float(v & 0xffff0000u); }
__device__ __forceinline__ float bf16_to_f(bf16_t v) { return __uint_as_float(((unsigned)v) << 16); }
__device__ __forceinline__ bf16_t f_to_bf16(float f) {  // round to nearest even, NaN kept
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
  u += 0x7fffu + ((u >> 16) & 1u);
  return (bf16_t)(u >> 16);
}
"""

#: tensor-core helpers shared by the int4 kernels: the nibble-to-bf16 conversion, one bf16
#: ``mma.m16n8k16`` with fp32 accumulators, and a uint4's j-th word
MMA_HELPERS = r"""
// nibbles at bits 0..3 and 16..19 of w (two's complement q) -> bf16x2 (136 + q): (w & m) ^ c
__device__ __forceinline__ unsigned nibbles_to_bf16x2(unsigned w) {
  unsigned r;
  asm("lop3.b32 %0, %1, %2, %3, 0x6a;" : "=r"(r) : "r"(w), "n"(0x000F000F), "n"(0x43084308));
  return r;
}
__device__ __forceinline__ void mma_bf16(float* d, unsigned a0, unsigned a1, unsigned a2,
                                         unsigned a3, unsigned b0, unsigned b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, "
      "{%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}
__device__ __forceinline__ unsigned word(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}
"""


def is_available() -> bool:
    """True where the NVRTC runtime compiler is reachable through torch (CUDA builds)."""
    return torch.cuda.is_available() and hasattr(torch.cuda, "_compile_kernel")


@functools.lru_cache(maxsize=None)
def compile_kernel(source: str, name: str, capability: tuple[int, int]):
    """The ``extern "C"`` kernel ``name`` of ``source`` for one GPU architecture (NVRTC, about
    a second, once per process and arguments)."""
    return torch.cuda._compile_kernel(
        source, name, compute_capability=f"{capability[0]}{capability[1]}")


def device_capability(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)


@functools.lru_cache(maxsize=None)
def compiles(source: str, name: str, capability: tuple[int, int]) -> bool:
    """Whether :func:`compile_kernel` succeeds for these arguments (tried once): no NVRTC
    library, an old driver or an unsupported architecture make the callers fall back."""
    try:
        compile_kernel(source, name, capability)
        return True
    except Exception:
        return False


# ---- launching ---------------------------------------------------------------------------
# torch's kernel wrapper converts every argument to a ctypes object and looks up the current
# stream on each call (~100 us of Python per launch, measured on an H200 host): more than
# the decode kernels themselves take. Here the parameters travel as one packed buffer
# (cuLaunchKernel's CU_LAUNCH_PARAM_BUFFER_POINTER), laid out once per argument signature,
# and the stream is read as a raw handle.
_PARAM_BUFFER_POINTER, _PARAM_BUFFER_SIZE, _PARAM_END = 1, 2, 0
_Extra = ctypes.c_void_p * 5


def _untyped_driver_function(name: str):
    """The CUDA driver function ``name`` as a function pointer of its own with no declared
    argument types: ctypes then passes ints as C ``int`` and ``c_void_p``/``c_size_t``/None/
    arrays as they are, without running a converter per argument (a prototype with argtypes
    costs ~0.7 us more per call, measured on the CPU machine). The callers pass each
    parameter in its C type. A pointer of its own leaves the one torch's wrapper uses (and
    its argtypes) alone."""
    library = torch.cuda._utils._get_gpu_runtime_library()
    function = library._FuncPtr(ctypes.cast(getattr(library, name), ctypes.c_void_p).value)
    function.restype = ctypes.c_int
    return function


@functools.lru_cache(maxsize=None)
def _cu_launch_kernel():
    """``cuLaunchKernel``, untyped: the function handle (``c_void_p``), seven unsigned ints
    below 2^31, the stream (:func:`_current_stream`), None and the ``extra`` array."""
    return _untyped_driver_function("cuLaunchKernel")


def _current_stream(device_index: int):
    """The current stream's raw handle as a pointer argument (None: the default stream)."""
    stream = torch._C._cuda_getCurrentRawStream(device_index)
    return ctypes.c_void_p(stream) if stream else None


class Launcher:
    """One kernel with a fixed grid, block, shared memory and trailing int parameters:
    ``launcher(*tensors)`` (or ``launcher.launch(*data_pointers)``) launches it on the current
    stream of the device with the tensors' data pointers as its leading parameters
    (CUDA-graph capturable, like any launch on the current stream). The parameter buffer
    follows C's layout (pointers, then 32-bit ints), which is how the kernels declare their
    parameters."""

    def __init__(self, kernel, grid: tuple[int, int, int], block: tuple[int, int, int],
                 shared_mem: int, n_tensors: int, ints: tuple[int, ...], device_index: int):
        dims = (*grid, *block, shared_mem)
        if not all(0 <= d < 2**31 for d in dims):
            raise ValueError(f"grid/block/shared memory {dims} out of the launch's range")
        func = kernel.func
        self._func = func if isinstance(func, ctypes.c_void_p) else ctypes.c_void_p(func)
        self._dims = dims
        self._pointers = struct.Struct(f"@{n_tensors}P")
        tail = struct.pack(f"@{len(ints)}i", *ints)
        # the ints after the pointers start 8-byte aligned (pointers are 8 bytes): no padding
        self._tail = tail
        self._size = ctypes.c_size_t(self._pointers.size + len(tail))  # read-only after this
        self._size_address = ctypes.addressof(self._size)
        self._device_index = device_index
        # The creating thread refills one parameter buffer in place (cuLaunchKernel has copied
        # the parameters when it returns): ~2 us less per call than building a buffer and its
        # descriptor each time. ctypes releases the GIL during the launch, so another thread
        # could refill the buffer under it: other threads build their own.
        self._owner = threading.get_ident()
        self._params = ctypes.create_string_buffer(self._pointers.size + len(tail))
        self._params[self._pointers.size:] = tail
        self._extra = self._descriptor(self._params)
        self._pack_into = self._pointers.pack_into
        self._cu_launch = _cu_launch_kernel()

    def _descriptor(self, params):
        return _Extra(_PARAM_BUFFER_POINTER, ctypes.addressof(params), _PARAM_BUFFER_SIZE,
                      self._size_address, _PARAM_END)

    def __call__(self, *tensors: torch.Tensor) -> None:
        self.launch(*[t.data_ptr() for t in tensors])

    def launch(self, *pointers: int) -> None:
        """Launch with these device addresses as the leading parameters."""
        if threading.get_ident() == self._owner:
            self._pack_into(self._params, 0, *pointers)
            extra = self._extra
        else:
            params = ctypes.create_string_buffer(self._pointers.pack(*pointers) + self._tail)
            extra = self._descriptor(params)
        status = self._cu_launch(self._func, *self._dims, _current_stream(self._device_index),
                                 None, extra)
        if status != 0:
            raise RuntimeError(f"cuLaunchKernel failed with CUDA error {status} (grid/block/"
                               f"shared memory {self._dims})")


def empty_allocator(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device):
    """``f() -> torch.empty(shape, dtype=dtype, device=device)`` (contiguous), for the output
    of a planned launch: ``torch.empty_like`` of a one-element tensor expanded to ``shape``
    gives the same tensor with less argument parsing, ~0.4 us less per call (CPU machine):
    an expanded input is not dense, so ``preserve_format`` gives contiguous strides, and a
    one-element shape has nothing to preserve.

    The template lives as long as ``f``. Made while a CUDA graph is being captured, it would
    come from the graph's private memory pool and outlive the capture there, so then ``f`` is
    plain ``torch.empty`` (a captured call's host time is paid once)."""
    if is_capturing():
        return functools.partial(torch.empty, shape, dtype=dtype, device=device)
    template = torch.empty(1, dtype=dtype, device=device).expand(shape)
    return functools.partial(torch.empty_like, template)


def is_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (False without CUDA)."""
    return torch.cuda.is_available() and torch._C._cuda_isCurrentStreamCapturing()


@functools.lru_cache(maxsize=None)
def _cu_memset_d32_async():
    """``cuMemsetD32Async``, untyped (see :func:`_untyped_driver_function`): the address as
    ``c_void_p``, the value as an int, the word count as ``c_size_t``, the stream."""
    return _untyped_driver_function("cuMemsetD32Async")


def zero_async(t: torch.Tensor, device_index: int) -> None:
    """Zero the 4-byte words of contiguous CUDA tensor ``t`` on the current stream
    (``cuMemsetD32Async``, capturable): about a microsecond of host time, where ``torch.zeros``
    or ``zero_()`` go through the dispatcher and a fill kernel."""
    words = t.numel() * t.element_size() // 4
    status = _cu_memset_d32_async()(ctypes.c_void_p(t.data_ptr()), 0, ctypes.c_size_t(words),
                                    _current_stream(device_index))
    if status != 0:
        raise RuntimeError(f"cuMemsetD32Async failed with CUDA error {status}")


def launch(kernel, grid: tuple[int, int, int], block: tuple[int, int, int], args: list,
           shared_mem: int = 0) -> None:
    """Launch a kernel of :func:`compile_kernel` once: ``args`` are its parameters in order,
    CUDA tensors (as data pointers) first, then Python ints (as 32-bit ``int``)."""
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    ints = tuple(args[len(tensors):])
    if any(isinstance(a, torch.Tensor) for a in ints):
        raise TypeError("kernel parameters must be tensors first, then ints")
    Launcher(kernel, grid, block, shared_mem, len(tensors), ints,
             tensors[0].device.index)(*tensors)
