"""What every integer-zero-point format shares: nibbles in int32 words, and the exact bridge
between ``(u, scale, z)`` (``w = (u - z) * scale``, u and z in ``[0, 15]``) and Int4Tensor.

Our Int4Tensor stores ``q = u - 8`` and a float ``zero_point``; since
``(u - z) * s = (u - 8) * s + (8 - z) * s``, an integer zero point ``z`` maps to
``zero_point = (8 - z) * s``. Both directions are written once here and work for any number of
leading dims (2D ``[N, K]`` weights and 3D ``[E, N, K]`` expert weights alike).
"""

from __future__ import annotations

import warnings

import torch

from int4tensor.quant_primitives import (
    SUPPORTED_GROUP_SIZES,
    choose_qparams_minmax,
    pack_int4,
    unpack_int4,
)
from int4tensor.tensors import Int4Tensor

__all__ = [
    "LINEAR_ORDER",
    "AWQ_ORDER",
    "pack_nibbles",
    "unpack_nibbles",
    "from_integer_qparams",
    "to_integer_qparams",
]

#: Slot -> element: the nibble at bit shift ``4 * i`` holds element ``8m + order[i]``.
LINEAR_ORDER = (0, 1, 2, 3, 4, 5, 6, 7)
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def pack_nibbles(u: torch.Tensor, dim: int = -1, order=LINEAR_ORDER) -> torch.Tensor:
    """Pack unsigned 4-bit values ``u`` (any int dtype, in ``[0, 15]``) into int32 words.

    Eight consecutive elements along ``dim`` make one word, the nibble at shift ``4 * i`` holding
    element ``order[i]`` of the eight; a length that is not a multiple of 8 is padded with 0.
    Returns int32 with ``ceil(size / 8)`` along ``dim``.
    """
    if u.is_floating_point() or u.is_complex():
        raise TypeError(f"pack_nibbles expects integer values, got {u.dtype}")
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError("pack_nibbles: values must be in [0, 15] (clamp before packing, or "
                         "a carry spills into the neighbouring nibble)")
    x = u.movedim(dim, -1).to(torch.int64)
    pad = -x.shape[-1] % 8
    if pad:
        x = torch.nn.functional.pad(x, (0, pad))
    x = x.unflatten(-1, (x.shape[-1] // 8, 8))
    words = torch.zeros(x.shape[:-1], dtype=torch.int64, device=u.device)
    for slot, element in enumerate(order):
        words |= x[..., element] << (4 * slot)
    words = torch.where(words >= 2**31, words - 2**32, words)  # two's complement int32
    return words.to(torch.int32).movedim(-1, dim).contiguous()


def unpack_nibbles(words: torch.Tensor, count: int, dim: int = -1, order=LINEAR_ORDER) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: int32 words -> uint8 values in ``[0, 15]``, ``count``
    of them along ``dim`` (padding dropped)."""
    if words.dtype != torch.int32:
        raise TypeError(f"packed int4 words must be int32, got {words.dtype}")
    x = words.movedim(dim, -1).to(torch.int64) & 0xFFFFFFFF
    slots = torch.stack([(x >> (4 * s)) & 0xF for s in range(8)], dim=-1)
    # element j sits in the slot whose order entry is j
    inverse = [order.index(j) for j in range(8)]
    values = slots[..., inverse].flatten(-2)
    if values.shape[-1] < count:
        raise ValueError(f"{words.shape[-1 if dim == -1 else dim]} int32 words along dim {dim} "
                         f"hold {values.shape[-1]} values, fewer than the {count} expected")
    return values[..., :count].to(torch.uint8).movedim(-1, dim).contiguous()


def _supported_group(group_size: int) -> int:
    """The largest supported group size that divides ``group_size`` (a group of G values can be
    stored as G/g groups of g with the same scale and zero, exactly)."""
    for g in sorted(SUPPORTED_GROUP_SIZES, reverse=True):
        if group_size % g == 0:
            return g
    raise ValueError(f"group size {group_size} cannot be represented: it is not a multiple of "
                     f"any group size Int4Tensor supports {SUPPORTED_GROUP_SIZES}")


def from_integer_qparams(
    u: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor | None,
    dtype: torch.dtype = torch.float32,
) -> Int4Tensor:
    """Build an Int4Tensor that stands for ``w = (u - z) * scale``.

    Args:
        u: unsigned values ``[..., N, K]`` in ``[0, 15]`` (any int dtype).
        scale: floating ``[..., K/G, N]``.
        zero: integer zero points ``[..., K/G, N]`` in ``[0, 15]``, or None for symmetric
            (``z = 8``, our ``zero_point = 0``).
        dtype: dtype of the scale and zero_point we store. float32 (default) is exact for
            fp16/bf16 source scales: ``(8 - z) * s`` needs up to 4 more mantissa bits than ``s``.

    A group size that Int4Tensor does not support (e.g. 512, or a whole row) is stored as
    smaller supported groups with repeated scale/zero, exactly.
    """
    *lead, n, k = u.shape
    if scale.shape[:-2] != tuple(lead) or scale.shape[-1] != n or scale.shape[-2] == 0:
        raise ValueError(f"scale has shape {list(scale.shape)}, expected [..., K/G, {n}] with "
                         f"leading dims {lead} for values of shape {list(u.shape)}")
    n_groups = scale.shape[-2]
    if k % n_groups:
        raise ValueError(f"K = {k} is not a multiple of the group count {n_groups} "
                         "(ragged last group: K not divisible by the group size)")
    group_size = k // n_groups
    if zero is None:
        zero = torch.full(scale.shape, 8, dtype=torch.int64, device=scale.device)
    elif tuple(zero.shape) != tuple(scale.shape):
        raise ValueError(f"zero points have shape {list(zero.shape)}, expected "
                         f"{list(scale.shape)} (the scale's)")
    g = _supported_group(group_size)
    if g != group_size:
        scale = scale.repeat_interleave(group_size // g, dim=-2)
        zero = zero.repeat_interleave(group_size // g, dim=-2)
    q = (u.to(torch.int16) - 8).to(torch.int8)
    s32 = scale.to(torch.float32)
    zero_point = (8 - zero.to(torch.float32)) * s32
    block_size = (1,) * (u.ndim - 1) + (g,)
    return Int4Tensor(pack_int4(q), s32.to(dtype).contiguous(), zero_point.to(dtype).contiguous(),
                      block_size, u.shape)


def _exact_integer_zero(t: Int4Tensor) -> torch.Tensor | None:
    """``z = 8 - zero_point / scale`` if it is an integer in ``[0, 15]`` for every group.

    A tolerance of 0.1 absorbs the rounding of ``(8 - z) * s`` to a 16-bit zero_point (at most
    ``16 * 2**-8``); a float-zero (fbgemm min/max) tensor misses it by up to 0.5.
    """
    if t.act_pre_scale is not None:
        return None
    s = t.scale.to(torch.float32)
    zp = t.zero_point.to(torch.float32)
    ratio = torch.where(s == 0, torch.zeros_like(s), zp / torch.where(s == 0, 1.0, s))
    if bool(((s == 0) & (zp != 0)).any()):
        return None
    z = (8 - ratio).round()
    if bool(((8 - ratio - z).abs() > 0.1).any()) or bool(((z < 0) | (z > 15)).any()):
        return None
    return z.to(torch.int64)


def to_integer_qparams(
    t: Int4Tensor, symmetric: bool | None = None, name: str = "weight"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u uint8 [..., N, K], scale [..., K/G, N] in t.dtype, z int64 [..., K/G, N])`` with
    ``t ≈ (u - z) * scale``.

    Exact (the same nibbles, scale and zero) when ``t`` has integer zero points (quantized with
    ``zero_point_domain="int"`` or ``"none"``, or imported). Otherwise (float zero points, an
    ``act_pre_scale``, or ``symmetric=True`` with a zero point other than 8) the dequantized
    weight is re-quantized with integer zero points, with a warning: that adds error.
    ``symmetric=None`` keeps whatever ``t`` has.
    """
    if getattr(t, "is_transposed", False):
        raise ValueError(f"{name}: a transposed Int4Tensor (logical [..., K, N]) cannot be "
                         "exported; checkpoint formats store [..., N, K]: export "
                         "t.transpose(-1, -2)")
    z = _exact_integer_zero(t)
    if z is not None and (not symmetric or bool((z == 8).all())):
        u = (unpack_int4(t.qdata).to(torch.int16) + 8).to(torch.uint8)
        return u, t.scale, z
    reason = ("it has float zero points" if z is None or t.act_pre_scale is not None
              else "symmetric export was asked for and it has zero points")
    warnings.warn(f"{name}: re-quantizing for export with integer zero points because {reason}"
                  " (lossy; quantize with zero_point_domain='int' or 'none' for exact export)",
                  stacklevel=2)
    return requantize_integer(t.dequantize(torch.float32), t.group_size,
                              bool(symmetric), t.dtype)


def requantize_integer(
    w: torch.Tensor, group_size: int, symmetric: bool, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max quantization of ``w [..., N, K]`` with integer zero points (8 when symmetric),
    against the scale as rounded to ``dtype``: returns ``(u, scale, z)`` as above."""
    scale, minimum = choose_qparams_minmax(w, group_size, "none" if symmetric else "int")
    stored = scale.to(dtype)
    s = stored.to(torch.float32)
    z = torch.full_like(s, 8) if symmetric else (-minimum / scale).round().clamp(0, 15)
    groups = w.to(torch.float32).unflatten(-1, (w.shape[-1] // group_size, group_size))
    u = (groups / s.unsqueeze(-1) + z.unsqueeze(-1)).round().clamp(0, 15).flatten(-2)
    return (u.to(torch.uint8), stored.transpose(-1, -2).contiguous(),
            z.transpose(-1, -2).to(torch.int64).contiguous())


def check_g_idx(g_idx: torch.Tensor | None, k: int, group_size: int, name: str) -> None:
    """Accept only the trivial group map ``g_idx[k] = k // G`` (groups of consecutive K).

    Act-order checkpoints (GPTQ ``desc_act``, compressed-tensors ``actorder="group"``) map
    input channels to groups by a permutation; our layout cannot hold that.
    """
    if g_idx is None:
        return
    expected = torch.arange(k, device=g_idx.device) // group_size
    if g_idx.numel() != k:
        raise ValueError(f"{name}.g_idx has {g_idx.numel()} entries, expected K = {k}")
    if bool((g_idx.to(torch.int64) != expected).any()):
        kind = "unsorted (act-order / desc_act)" if bool((g_idx.diff() < 0).any()) else \
            "not k // group_size"
        raise ValueError(f"{name}.g_idx is {kind}: int4tensor needs groups of {group_size} "
                         "consecutive input channels; re-quantize without act-order "
                         "(desc_act=False) or with static groups")
