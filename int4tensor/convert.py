"""After loading: move int4 weights to the fastest layout the current hardware runs."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from int4tensor import compile_support, kernels
from int4tensor.model_surgery import replace_parameter
from int4tensor.tensors import Int4CPUTensor, Int4PreshuffledTensor, Int4Tensor

__all__ = [
    "convert_to_packed_tensor_based_on_current_hardware",
    "convert_model_to_packed_tensors_",
    "preshuffle_supported",
]


def preshuffle_supported(t: Int4Tensor) -> bool:
    """Whether ``t`` converts exactly to an Int4PreshuffledTensor on its device (Hopper,
    fbgemm-gpu-genai, bf16 scales, G >= 64, K a multiple of 128, no pre-scale, bf16
    activations)."""
    return (
        t.is_cuda
        and torch.cuda.get_device_capability(t.device) >= (9, 0)
        and kernels.fbgemm.is_available()
        and t.scale.dtype == torch.bfloat16
        and t.group_size >= 64  # fbgemm's int4 kernels are wrong at G = 32 (measured)
        and t.qdata.shape[-1] % 64 == 0  # K % 128: fbgemm's shuffled kernels crashed on 2880
        and t.act_pre_scale is None
        and t.activation_dtype == "bf16"  # fp8 plain weights are asymmetric: no exact shuffle
    )


def convert_to_packed_tensor_based_on_current_hardware(tensor: torch.Tensor) -> torch.Tensor:
    """The fastest layout the tensor's device runs, for inference after loading:

    * an Int4Tensor on a Hopper GPU with fbgemm-gpu-genai becomes an Int4PreshuffledTensor
      (bf16 activations; linear outputs are bit-identical before and after);
    * an Int4Tensor on a CPU becomes an Int4CPUTensor (torch's CPU int4 GEMM layout, exact:
      ``to_int4_tensor()`` gives the same weight back; bf16 activation_dtype, a CPU whose
      torch runs its int4 GEMM in a layout int4tensor reads: AVX512 or AVX2);
    * anything else is returned unchanged.

    Never raises: a failed conversion warns and keeps the tensor.

    Kept as they are on a GPU, on purpose:

    * ``activation_dtype="fp8"`` Int4Tensors: they are asymmetric (a float zero point per
      group), and fbgemm's fp8 preshuffled kernel (``f8i4bf16_shuffled``) takes symmetric int4
      with fp8 group scales only; converting would re-quantize the weight (new rounding error)
      instead of moving it. On Hopper they already run fbgemm's ``f8i4bf16_rowwise``. Quantize
      with ``Float8DynamicActivationInt4WeightConfig()`` (preshuffled, the default) for the
      fast fp8 layout. (On a CPU they stay plain too: the reference path emulates their fp8
      activation rounding.)
    * group size 32 (fbgemm's int4 kernels are wrong there, measured), K not a multiple of
      128 (gpt-oss's 2880: fbgemm's shuffled kernel ended the process), non-bf16 scales, and weights
      with an ``act_pre_scale``.
    """
    if not isinstance(tensor, Int4Tensor):
        return tensor
    if preshuffle_supported(tensor):
        target = Int4PreshuffledTensor
    elif tensor.device.type == "cpu" and Int4CPUTensor.why_not(tensor) is None:
        target = Int4CPUTensor
    else:
        return tensor
    try:
        return target.from_int4_tensor(tensor)
    except Exception as e:  # noqa: BLE001  (a kernel library mismatch must not break loading)
        warnings.warn(f"kept the plain Int4Tensor layout: conversion to {target.__name__} "
                      f"failed ({e})", stacklevel=2)
        return tensor


def convert_model_to_packed_tensors_(model: nn.Module) -> nn.Module:
    """Apply :func:`convert_to_packed_tensor_based_on_current_hardware` to every quantized
    parameter of ``model`` in place, keeping each Parameter's attributes
    (``weight_loader``, ``input_dim``, ...) and ``requires_grad=False``. Returns ``model``.
    Weights held through :func:`~int4tensor.prepare_for_compile` are converted too and stay
    prepared, so the two calls may come in either order.

    MoE expert stacks (3D parameters) stay in the plain layout on a GPU: a Qwen3-MoE-shaped
    model's static-cache ``generate()`` took 24.3 ms per token with preshuffled stacks against
    1.94 with plain ones (H200, benchmarks/results/bench_generate_qwen3_moe.csv; the cause is
    not found yet), while the plain stacks run our grouped GEMV. Call
    :func:`convert_to_packed_tensor_based_on_current_hardware` on a stack to convert it
    anyway (``torch.bmm`` on it is faster preshuffled)."""
    for module in model.modules():
        prepared = list(getattr(type(module), "_int4_layouts", ()))
        held = [(name, getattr(module, name)) for name in prepared]
        for name, param in list(module.named_parameters(recurse=False)) + held:
            if isinstance(param, Int4Tensor) and param.qdata.ndim == 3 \
                    and preshuffle_supported(param):
                continue
            converted = convert_to_packed_tensor_based_on_current_hardware(param)
            if converted is param:
                continue
            if name in prepared:  # held through prepare_for_compile
                compile_support.replace_prepared_weight(module, name, converted)
            else:
                replace_parameter(module, name, converted)
    return model
