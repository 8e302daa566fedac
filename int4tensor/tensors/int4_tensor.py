"""``Int4Tensor``: int4 weights in the plain (fbgemm rowwise) layout, the checkpoint format."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from int4tensor import kernels
from int4tensor.algorithms import choose_qparams
from int4tensor.quant_primitives import (
    SUPPORTED_GROUP_SIZES,
    dequantize_int4,
    quantize_with_qparams,
)
from int4tensor.tensors.base import Int4BaseTensor

aten = torch.ops.aten

__all__ = ["Int4Tensor"]


class Int4Tensor(Int4BaseTensor):
    """A weight ``W [..., N, K]`` stored as group-wise asymmetric int4.

    Fields:
        qdata: int8 ``[..., N, K/2]``, two signed int4 values per byte along K: element ``2i``
            in the low nibble, ``2i+1`` in the high nibble (fbgemm's ``pack_int4``).
        scale: ``[..., K/G, N]`` in the weight's dtype.
        zero_point: ``[..., K/G, N]`` in the weight's dtype.
        block_size: ``(1, G)`` for a 2D weight, ``(1, 1, G)`` for a 3D one.
        shape: the logical shape ``(..., N, K)``.
        act_pre_scale: optional ``[..., K]`` per-input-channel factor (AWQ-style activation
            scaling): ``linear`` multiplies the activation by it before the int4 matmul.

    The tensor stands for ``W[..., n, k] = (q[..., n, k] * scale[..., k // G, n]
    + zero_point[..., k // G, n]) * act_pre_scale[..., k]`` (the last factor only when set);
    its ``dtype`` is the scale's dtype.
    """

    tensor_data_names = ("qdata", "scale", "zero_point")
    optional_tensor_data_names = ("act_pre_scale",)
    tensor_attribute_names = ("block_size", "shape")

    @staticmethod
    def __new__(cls, qdata, scale, zero_point, block_size, shape, act_pre_scale=None):
        return torch.Tensor._make_wrapper_subclass(
            cls, shape, dtype=scale.dtype, device=qdata.device, requires_grad=False
        )

    def __init__(self, qdata, scale, zero_point, block_size, shape, act_pre_scale=None):
        self.qdata = qdata
        self.scale = scale
        self.zero_point = zero_point
        self.act_pre_scale = act_pre_scale
        self.block_size = tuple(int(b) for b in block_size)
        # ``shape`` is not stored: the wrapper already carries it (and pickles it).

    @property
    def group_size(self) -> int:
        return self.block_size[-1]

    @classmethod
    def from_hp(
        cls,
        weight: torch.Tensor,
        block_size,
        *,
        algorithm: str = "minmax",
        zero_point_domain: str = "float",
    ) -> "Int4Tensor":
        """Quantize a high-precision weight group-wise.

        Args:
            weight: bf16/fp16/fp32 ``[N, K]`` or ``[E, N, K]``, finite.
            block_size: ``(1, G)`` or ``(1, 1, G)`` with ``G`` in ``SUPPORTED_GROUP_SIZES``.
            algorithm: how scale/zero are chosen (:data:`int4tensor.algorithms.QPARAMS_ALGORITHMS`);
                the default ``"minmax"`` with ``zero_point_domain="float"`` is fbgemm's
                ``int4_row_quantize_zp``, bit for bit.
            zero_point_domain: ``"float"``, ``"int"`` (integer zero points) or ``"none"``
                (symmetric).
        """
        group_size = _check_block_size(weight, block_size)
        _check_weight(weight, group_size)
        scale, minimum = choose_qparams(weight, group_size, algorithm, zero_point_domain)
        qdata, scale, zero_point = quantize_with_qparams(weight, scale, minimum, group_size)
        return cls(qdata, scale, zero_point, tuple(block_size), weight.shape)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight ``(q * scale + zero_point) * act_pre_scale``, ``[..., N, K]`` in
        ``dtype`` (default: this tensor's dtype)."""
        dtype = dtype or self.dtype
        if self.act_pre_scale is None:
            return self.dequantize_int4_only(dtype)
        w = self.dequantize_int4_only(torch.float32) * self.act_pre_scale.float().unsqueeze(-2)
        return w.to(dtype)

    def dequantize_int4_only(self, dtype: torch.dtype) -> torch.Tensor:
        """``q * scale + zero_point`` without ``act_pre_scale``, ``[..., N, K]`` in ``dtype``."""
        return dequantize_int4(self.qdata, self.scale, self.zero_point, self.group_size, dtype)

    def _quantize_like(self, dense: torch.Tensor) -> "Int4Tensor":
        """Quantize a dense tensor with this tensor's block size and scale dtype (``copy_``)."""
        if tuple(dense.shape) != tuple(self.shape):
            raise ValueError(
                f"copy_ into Int4Tensor: source shape {list(dense.shape)} != {list(self.shape)}"
            )
        return Int4Tensor.from_hp(dense.to(self.dtype), self.block_size)


def _check_block_size(weight: torch.Tensor, block_size) -> int:
    if weight.ndim not in (2, 3):
        raise ValueError(f"Int4Tensor holds 2D [N, K] or 3D [E, N, K] weights, got shape "
                         f"{list(weight.shape)}")
    block_size = tuple(block_size)
    if len(block_size) != weight.ndim or any(b != 1 for b in block_size[:-1]):
        expected = "(1, G)" if weight.ndim == 2 else "(1, 1, G)"
        raise ValueError(f"block_size for a {weight.ndim}D weight must be {expected}, "
                         f"got {block_size}")
    return _check_group_size(block_size[-1], weight.shape[-1])


def _check_group_size(group_size, k: int) -> int:
    if not isinstance(group_size, int) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"group size must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")
    if k % group_size:
        raise ValueError(f"K = {k} (the last dim of the weight) is not a multiple of the "
                         f"group size {group_size}")
    return group_size


def _check_weight(weight: torch.Tensor, group_size: int) -> None:
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        got = weight.dtype if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise TypeError(f"Int4Tensor quantizes floating-point weights, got {got}")
    if weight.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"Int4Tensor quantizes bf16/fp16/fp32 weights, got {weight.dtype}")
    if weight.device.type != "meta" and not bool(torch.isfinite(weight).all()):
        bad = (~torch.isfinite(weight)).sum().item()
        raise ValueError(f"weight has {bad} NaN/Inf value(s); cannot quantize it")


_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@Int4Tensor.implements([F.linear, aten.linear.default])
def _(func, args, kwargs):
    """``F.linear(x [*, K], W [N, K], bias [N] | None) -> [*, N]``."""
    x, weight = args[0], args[1]
    bias = args[2] if len(args) > 2 else kwargs.get("bias")
    if not isinstance(weight, Int4Tensor) or isinstance(x, Int4BaseTensor):
        raise NotImplementedError("Int4Tensor supports linear with the Int4Tensor as the weight "
                                  "(second argument) and a dense input")
    if weight.ndim != 2:
        raise ValueError(f"linear needs a 2D weight, got Int4Tensor of shape {list(weight.shape)}"
                         " (use torch.bmm for 3D expert weights)")
    if x.dtype not in _ACTIVATION_DTYPES:
        raise TypeError(f"linear with an Int4Tensor weight takes bf16/fp16/fp32 activations, "
                        f"got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != weight.shape[-1]:
        raise ValueError(f"linear input's last dim must be K = {weight.shape[-1]}, got input "
                         f"shape {list(x.shape)} for weight shape {list(weight.shape)}")
    return kernels.int4_linear(x, weight, bias)
