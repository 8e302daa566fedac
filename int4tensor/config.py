"""Quantization configs: what ``quantize_`` turns a weight into."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from int4tensor.quant_primitives import SUPPORTED_GROUP_SIZES

__all__ = ["Int4WeightOnlyConfig"]

_PACKING_FORMATS = ("plain",)


@dataclass(frozen=True)
class Int4WeightOnlyConfig:
    """Int4 weight-only quantization: bf16/fp16/fp32 activations, int4 weights.

    Args:
        group_size: ``G``, one of 32, 64, 128, 256; K must be a multiple of it.
        version: 2 (the only one): the weight becomes an :class:`~int4tensor.Int4Tensor`.
        int4_packing_format: ``"plain"``: fbgemm's rowwise layout, ``qdata [N, K/2]``.
        int4_choose_qparams_algorithm: how scale/zero are chosen, a name in
            :data:`int4tensor.algorithms.QPARAMS_ALGORITHMS` (default ``"minmax"``, fbgemm's).
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
        if self.group_size not in SUPPORTED_GROUP_SIZES:
            raise ValueError(
                f"Int4WeightOnlyConfig: group_size must be one of {SUPPORTED_GROUP_SIZES}, "
                f"got {self.group_size!r}"
            )
        if self.int4_packing_format not in _PACKING_FORMATS:
            raise ValueError(
                f"Int4WeightOnlyConfig: int4_packing_format must be one of {_PACKING_FORMATS}, "
                f"got {self.int4_packing_format!r}"
            )
        if self.k_dim not in (-1, -2):
            raise ValueError(f"Int4WeightOnlyConfig: k_dim must be -1 or -2, got {self.k_dim!r}")
        from int4tensor.algorithms import QPARAMS_ALGORITHMS
        from int4tensor.quant_primitives import ZERO_POINT_DOMAINS

        if self.int4_choose_qparams_algorithm not in QPARAMS_ALGORITHMS:
            raise ValueError(
                "Int4WeightOnlyConfig: int4_choose_qparams_algorithm must be one of "
                f"{sorted(QPARAMS_ALGORITHMS)}, got {self.int4_choose_qparams_algorithm!r}"
            )
        if self.zero_point_domain not in ZERO_POINT_DOMAINS:
            raise ValueError(
                f"Int4WeightOnlyConfig: zero_point_domain must be one of {ZERO_POINT_DOMAINS}, "
                f"got {self.zero_point_domain!r}"
            )

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
        from int4tensor.tensors import Int4Tensor

        stored = weight.transpose(-1, -2) if self.k_dim == -2 else weight
        block_size = (1,) * (weight.ndim - 1) + (self.group_size,)
        tensor = Int4Tensor.from_hp(
            stored,
            block_size,
            algorithm=self.int4_choose_qparams_algorithm,
            zero_point_domain=self.zero_point_domain,
        )
        return tensor.transpose(-1, -2) if self.k_dim == -2 else tensor
