"""fbgemm-gpu-genai backend (Hopper, sm90+).

fbgemm is imported lazily, the first time a CUDA bf16 input asks for it, so that
``import int4tensor`` never imports it and CPU-only machines never need it.
"""

from __future__ import annotations

import functools

import torch


@functools.cache
def is_available() -> bool:
    """True when ``fbgemm_gpu.experimental.gen_ai`` imports and registers its int4 ops."""
    try:
        import fbgemm_gpu.experimental.gen_ai  # noqa: F401  (registers torch.ops.fbgemm.*)
    except Exception:  # ImportError, or a wheel built for another torch/CUDA
        return False
    return hasattr(torch.ops.fbgemm, "bf16i4bf16_rowwise")


@functools.cache
def _is_sm90_or_newer(device_index: int) -> bool:
    return torch.cuda.get_device_capability(device_index) >= (9, 0)


def can_run_linear(x: torch.Tensor, weight) -> bool:
    """``bf16i4bf16_rowwise`` takes bf16 activations and bf16 scale/zero on sm90+ GPUs."""
    return (
        x.is_cuda
        and x.dtype == torch.bfloat16
        and weight.ndim == 2
        and weight.scale.dtype == torch.bfloat16
        and weight.zero_point.dtype == torch.bfloat16
        and x.numel() > 0
        and weight.group_size >= 64  # measured on an H200: G=32 gives wrong results
        and _is_sm90_or_newer(x.device.index if x.device.index is not None else 0)
        and is_available()
    )


def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [*, K]`` bf16 -> ``[*, N]`` bf16 through ``torch.ops.fbgemm.bf16i4bf16_rowwise``."""
    from int4tensor.kernels.custom_ops import int4_matmul_fbgemm

    x2d = x.reshape(-1, x.shape[-1]).contiguous()
    out = int4_matmul_fbgemm(x2d, weight.qdata, weight.scale, weight.zero_point,
                             weight.group_size)
    out = out.reshape(*x.shape[:-1], out.shape[-1])
    return out + bias if bias is not None else out
