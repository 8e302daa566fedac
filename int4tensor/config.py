"""Quantization configs: what ``quantize_`` turns a weight into."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from int4tensor.convert import preshuffle_supported
from int4tensor.qparams import check_qparams_algorithm
from int4tensor.quant_primitives import check_group_size, check_zero_point_domain
from int4tensor.tensors import Int4PreshuffledTensor, Int4Tensor

__all__ = ["Float8DynamicActivationInt4WeightConfig", "Int4WeightOnlyConfig", "PACKING_FORMATS",
           "K_DIMS", "check_packing_format"]

#: ``int4_packing_format`` values: "plain" is Int4Tensor, "preshuffled" Int4PreshuffledTensor.
PACKING_FORMATS = ("plain", "preshuffled")
#: ``k_dim`` values: which dim of a weight is K (reduced over).
K_DIMS = (-1, -2)


def check_packing_format(value: str, where: str) -> None:
    """Raise ``ValueError`` unless ``value`` is one of :data:`PACKING_FORMATS`."""
    if value not in PACKING_FORMATS:
        raise ValueError(f"{where}: int4_packing_format must be one of {PACKING_FORMATS}, "
                         f"got {value!r}")


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """Int4 weight-only quantization: bf16/fp16/fp32 activations, int4 weights.

    Args:
        group_size: ``G``, one of 32, 64, 128, 256; K must be a multiple of it.
        version: 2 (the only one): the weight becomes an :class:`~int4tensor.Int4Tensor`.
        int4_packing_format: ``"plain"``: the portable layout, ``qdata [N, K/2]``
            (:class:`~int4tensor.Int4Tensor`); ``"preshuffled"``: fbgemm's Hopper layout
            (:class:`~int4tensor.Int4PreshuffledTensor`, CUDA with fbgemm-gpu-genai only; the
            usual flow is to save "plain" and convert after loading).
        int4_choose_qparams_algorithm: how scale/zero are chosen, a name in
            :data:`int4tensor.qparams.QPARAMS_ALGORITHMS`: ``"minmax"`` (default, fbgemm's,
            bit-identical), ``"mse"`` (clip-range search) or ``"hqq"`` (half-quadratic).
        zero_point_domain: ``"float"`` (fbgemm's, default), ``"int"`` (integer zero points,
            exportable losslessly to AWQ/GPTQ/compressed-tensors) or ``"none"`` (symmetric).
        k_dim: which dim of the weight is K, the input features that are reduced over:
            ``-1`` for ``F.linear`` weights ``[N, K]`` and Mixtral-style ``[E, N, K]``; ``-2``
            for weights used as ``torch.bmm(x, w)`` with ``w [E, K, N]`` (Llama4-style
            experts), which become transposed Int4Tensors of the same logical shape.
    """

    group_size: int = 128
    version: int = 2
    int4_packing_format: str = "plain"
    int4_choose_qparams_algorithm: str = "minmax"
    zero_point_domain: str = "float"
    k_dim: int = -1

    def __post_init__(self):
        if self.version == 1:
            raise ValueError(
                "Int4WeightOnlyConfig(version=1) (torchao's tinygemm AffineQuantizedTensor) is "
                "not supported by int4tensor; use version=2 (the default), which stores an "
                "Int4Tensor in fbgemm's plain layout"
            )
        if self.version != 2:
            raise ValueError(f"Int4WeightOnlyConfig: unknown version {self.version!r}; use 2")
        check_group_size(self.group_size, "Int4WeightOnlyConfig: group_size")
        check_packing_format(self.int4_packing_format, "Int4WeightOnlyConfig")
        if self.k_dim not in K_DIMS:
            raise ValueError(f"Int4WeightOnlyConfig: k_dim must be -1 or -2, got {self.k_dim!r}")
        check_qparams_algorithm(self.int4_choose_qparams_algorithm,
                                "Int4WeightOnlyConfig: int4_choose_qparams_algorithm")
        check_zero_point_domain(self.zero_point_domain, "Int4WeightOnlyConfig: zero_point_domain")

    def can_quantize(self, weight: torch.Tensor) -> str | None:
        """None if ``weight`` can be quantized with this config, else the reason it cannot."""
        if weight.ndim not in (2, 3):
            return f"it is {weight.ndim}D (Int4Tensor holds 2D or 3D weights)"
        if weight.shape[self.k_dim] % self.group_size:
            return (f"K = {weight.shape[self.k_dim]} (dim {self.k_dim}) is not a multiple of "
                    f"group_size {self.group_size}")
        return None

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        """The quantized tensor for a high-precision ``weight [..., N, K]``."""
        stored = weight.transpose(-1, -2) if self.k_dim == -2 else weight
        block_size = (1,) * (weight.ndim - 1) + (self.group_size,)
        tensor = Int4Tensor.from_hp(
            stored,
            block_size,
            algorithm=self.int4_choose_qparams_algorithm,
            zero_point_domain=self.zero_point_domain,
        )
        if self.int4_packing_format == "preshuffled":
            tensor = _preshuffled(tensor)
        return tensor.transpose(-1, -2) if self.k_dim == -2 else tensor


def _preshuffled(tensor):
    if tensor.is_meta:
        raise ValueError('int4_packing_format="preshuffled" cannot be built on the meta device:'
                         ' quantize with "plain", load, then call '
                         "convert_model_to_packed_tensors_(model)")
    if not preshuffle_supported(tensor):
        raise ValueError('int4_packing_format="preshuffled" needs a CUDA sm90+ GPU, '
                         "fbgemm-gpu-genai, bf16 weights and group_size >= 64; use \"plain\" "
                         "(runs everywhere)")
    return Int4PreshuffledTensor.from_int4_tensor(tensor)


@dataclass(frozen=True)
class Float8DynamicActivationInt4WeightConfig:
    """fp8 (e4m3) activations quantized per row at run time, int4 weights.

    Args:
        group_size: 128 (the only size the kernels take).
        int4_packing_format:
            ``"preshuffled"`` (default): an :class:`~int4tensor.Int4PreshuffledTensor` with
            symmetric int4, fp8 group scales and fp32 row scales (fbgemm's
            ``quantize_int4_preshuffle``), run by ``f8i4bf16_shuffled``; CUDA only.
            ``"plain"``: an :class:`~int4tensor.Int4Tensor` (asymmetric, the portable layout)
            with ``activation_dtype="fp8"``, run by ``f8i4bf16_rowwise`` on Hopper and by the
            reference path (with the same activation rounding) everywhere else. Portable, but
            slow on an H200 (0.32-0.75x bf16 measured): prefer "preshuffled" there.
    """

    group_size: int = 128
    int4_packing_format: str = "preshuffled"

    def __post_init__(self):
        if self.group_size != 128:
            raise ValueError("Float8DynamicActivationInt4WeightConfig: the fp8 x int4 kernels "
                             f"take group_size 128 only, got {self.group_size!r}")
        check_packing_format(self.int4_packing_format, "Float8DynamicActivationInt4WeightConfig")

    def can_quantize(self, weight: torch.Tensor) -> str | None:
        if weight.ndim not in (2, 3):
            return f"it is {weight.ndim}D (int4 weights are 2D or 3D)"
        if weight.shape[-1] % self.group_size:
            return f"K = {weight.shape[-1]} is not a multiple of group_size {self.group_size}"
        return None

    def quantize_weight(self, weight: torch.Tensor) -> torch.Tensor:
        if self.int4_packing_format == "plain":
            block_size = (1,) * (weight.ndim - 1) + (self.group_size,)
            return Int4Tensor.from_hp(weight, block_size, activation_dtype="fp8")
        if not weight.is_cuda:
            raise ValueError("Float8DynamicActivationInt4WeightConfig quantizes on a CUDA device "
                             "(fbgemm's fp8 kernels); move the model to the GPU first")
        return Int4PreshuffledTensor.from_hp_fp8(weight, self.group_size)
