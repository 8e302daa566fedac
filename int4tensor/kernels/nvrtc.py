"""Compiling our CUDA C++ kernels at first use, with NVRTC through torch.

No compiler is needed at install time and importing this module compiles nothing. The entry
point is ``torch.cuda._compile_kernel`` (private to torch); where it is missing or compiling
fails, :func:`compiles` says so and the dispatcher picks another backend.
"""

from __future__ import annotations

import functools

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
