"""Pure int4 quantization math: packing, group-wise min/max quantization, dequantization.

Everything here is a plain function on plain tensors (no tensor subclasses, no kernels), so it
runs on any device, under ``torch.compile`` and on the meta device.

Conventions (shared with fbgemm-gpu-genai's ``int4_row_quantize_zp`` + ``pack_int4``):

* a weight ``w`` has shape ``[..., N, K]`` and is quantized along ``K`` in groups of ``G``;
* ``q`` is a signed int4 value in ``[-8, 7]`` held in int8, ``q = u - 8`` with ``u`` in ``[0, 15]``;
* ``scale`` and ``zero_point`` have shape ``[..., K/G, N]``;
* dequantization is ``w ≈ q * scale + zero_point`` (equivalently ``u * scale + min``).
"""

from __future__ import annotations

import torch

__all__ = [
    "SUPPORTED_GROUP_SIZES",
    "pack_int4",
    "unpack_int4",
    "ZERO_POINT_DOMAINS",
    "check_group_size",
    "check_zero_point_domain",
    "grouped",
    "choose_qparams_minmax",
    "quantize_int4",
    "quantize_with_qparams",
    "dequantize_int4",
    "quantize_minmax",
    "quantize_fp8_rows",
    "round_fp8_rows",
]

#: Group sizes accepted by :class:`~int4tensor.Int4Tensor` (fbgemm's kernels take these).
SUPPORTED_GROUP_SIZES = (32, 64, 128, 256)

INT4_MIN, INT4_MAX = -8, 7


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack signed int4 values two per byte along the last dim.

    Args:
        q: int8 ``[..., K]`` with values in ``[-8, 7]``, ``K`` even.

    Returns:
        int8 ``[..., K/2]``; byte ``j`` holds element ``2j`` in its low nibble and ``2j+1`` in its
        high nibble, each as a two's-complement nibble (bit-identical to fbgemm's ``pack_int4``).
    """
    if q.dtype != torch.int8:
        raise TypeError(f"pack_int4 expects int8 values, got {q.dtype}")
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4 needs an even last dim, got shape {tuple(q.shape)}")
    low = q[..., 0::2] & 0xF
    high = q[..., 1::2] << 4  # the shift drops the sign bits above the nibble
    return (low | high).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 ``[..., K/2]`` -> int8 ``[..., K]`` in ``[-8, 7]``."""
    if packed.dtype != torch.int8:
        raise TypeError(f"unpack_int4 expects int8 packed data, got {packed.dtype}")
    # [..., K/2, 2]: element 2j is (byte << 4) >> 4 (the arithmetic shift sign-extends the low
    # nibble), element 2j+1 is byte >> 4. One broadcast op rather than a stack of two halves:
    # Inductor's CPU code for the stack (torch 2.13) read unwritten memory inside larger
    # graphs (NaN outputs under torch.compile).
    shifts = torch.tensor([4, 0], dtype=torch.int8, device=packed.device)
    return ((packed.unsqueeze(-1) << shifts) >> 4).flatten(-2)


def grouped(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[..., N, K]`` -> ``[..., N, K/G, G]`` (a view)."""
    return w.unflatten(-1, (w.shape[-1] // group_size, group_size))


_grouped = grouped  # the name this module's own functions use


ZERO_POINT_DOMAINS = ("float", "int", "none")


def check_zero_point_domain(domain: str, where: str = "zero_point_domain") -> None:
    """Raise ``ValueError`` unless ``domain`` is one of :data:`ZERO_POINT_DOMAINS`."""
    if domain not in ZERO_POINT_DOMAINS:
        raise ValueError(f"{where} must be one of {ZERO_POINT_DOMAINS}, got {domain!r}")


def check_group_size(group_size: int, where: str = "group_size") -> None:
    """Raise ``ValueError`` unless ``group_size`` is one of :data:`SUPPORTED_GROUP_SIZES`."""
    if not isinstance(group_size, int) or group_size not in SUPPORTED_GROUP_SIZES:
        raise ValueError(f"{where} must be one of {SUPPORTED_GROUP_SIZES}, got {group_size!r}")


def choose_qparams_minmax(
    w: torch.Tensor, group_size: int, zero_point_domain: str = "float"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min/max parameters, computed in float32.

    Every scheme is expressed as a ``(scale, minimum)`` pair such that
    ``u = clamp(round((w - minimum) / scale), 0, 15)`` and ``w ≈ u * scale + minimum``:

    * ``"float"`` (fbgemm's): ``scale = clamp(max - min, 1e-6) / 15``, ``minimum = min``;
    * ``"int"``: the same scale over a range widened to include 0, ``minimum = -z * scale``
      with an integer zero point ``z = clamp(round(-min / scale), 0, 15)`` (AWQ/GPTQ/
      compressed-tensors style, exportable losslessly);
    * ``"none"`` (symmetric): ``minimum = -8 * scale`` (zero_point 0), with the smallest scale that
      fits the group in ``[-8, 7]``: ``scale = max(-min / 8, max / 7)``.

    Args:
        w: floating ``[..., N, K]``, ``K % group_size == 0``.

    Returns:
        ``(scale, minimum)``, both float32 ``[..., N, K/G]``.
    """
    groups = _grouped(w.to(torch.float32), group_size)
    max_val = groups.amax(dim=-1)
    min_val = groups.amin(dim=-1)
    if zero_point_domain == "float":
        scale = (max_val - min_val).clamp(min=1e-6) / 15
        return scale, min_val
    if zero_point_domain == "int":
        max_val, min_val = max_val.clamp(min=0), min_val.clamp(max=0)
        scale = (max_val - min_val).clamp(min=1e-6) / 15
        zero = (-min_val / scale).round().clamp(0, 15)
        return scale, -zero * scale
    if zero_point_domain == "none":
        scale = torch.maximum(-min_val / 8, max_val / 7).clamp(min=1e-6)
        return scale, -8 * scale
    check_zero_point_domain(zero_point_domain)
    raise AssertionError("unreachable: every domain is handled above")


def quantize_int4(
    w: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Quantize ``w [..., N, K]`` with float32 ``scale``/``minimum [..., N, K/G]``.

    Returns int8 ``q = clamp(round((w - min) / scale), 0, 15) - 8`` of shape ``[..., N, K]``.
    The divide (not a multiply by the reciprocal) and the float32 arithmetic match fbgemm exactly.
    """
    groups = _grouped(w.to(torch.float32), group_size)
    u = groups.sub(minimum.unsqueeze(-1)).div(scale.unsqueeze(-1)).round().clamp(0, 15)
    return (u - 8).to(torch.int8).flatten(-2)


def quantize_with_qparams(
    w: torch.Tensor,
    scale: torch.Tensor,
    minimum: torch.Tensor,
    group_size: int,
    qparams_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize and pack ``w [..., N, K]`` with ``(scale, minimum)`` from a ``choose_qparams_*``.

    Returns:
        ``(qdata, scale, zero_point)``: int8 ``[..., N, K/2]`` and two ``[..., K/G, N]`` tensors
        in ``qparams_dtype`` (default ``w.dtype``), ``zero_point = minimum + 8 * scale``, so that
        ``w ≈ q * scale + zero_point``.
    """
    qparams_dtype = qparams_dtype or w.dtype
    q = quantize_int4(w, scale, minimum, group_size)
    zero_point = minimum + 8 * scale
    return (
        pack_int4(q),
        scale.transpose(-1, -2).to(qparams_dtype).contiguous(),
        zero_point.transpose(-1, -2).to(qparams_dtype).contiguous(),
    )


def quantize_minmax(
    w: torch.Tensor,
    group_size: int,
    qparams_dtype: torch.dtype | None = None,
    zero_point_domain: str = "float",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Min/max quantization of ``w [..., N, K]``; with the default ``"float"`` zero point this is
    fbgemm's ``int4_row_quantize_zp`` + ``pack_int4``, bit for bit.

    Returns ``(qdata int8 [..., N, K/2], scale [..., K/G, N], zero_point [..., K/G, N])``.
    """
    scale, minimum = choose_qparams_minmax(w, group_size, zero_point_domain)
    return quantize_with_qparams(w, scale, minimum, group_size, qparams_dtype)


def dequantize_int4(
    qdata: torch.Tensor,
    scale: torch.Tensor,
    zero_point: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """``w = q * scale + zero_point``, computed in float32 and cast to ``dtype``.

    Args:
        qdata: int8 ``[..., N, K/2]`` (packed by :func:`pack_int4`).
        scale, zero_point: ``[..., K/G, N]``.

    Returns:
        ``dtype`` ``[..., N, K]``.
    """
    if qdata.device.type == "cpu" and not torch.compiler.is_compiling():
        return _dequantize_int4_cpu_eager(qdata, scale, zero_point, group_size, dtype)
    return _dequantize_int4_formula(qdata, scale, zero_point, group_size, dtype)


def _dequantize_int4_formula(qdata, scale, zero_point, group_size, dtype):
    """:func:`dequantize_int4` as one expression (any device, meta, torch.compile)."""
    q = _grouped(unpack_int4(qdata), group_size).to(torch.float32)
    s = scale.transpose(-1, -2).to(torch.float32).unsqueeze(-1)
    z = zero_point.transpose(-1, -2).to(torch.float32).unsqueeze(-1)
    return (q * s + z).flatten(-2).to(dtype)


def _unpack_int4_as_int16_pairs(packed: torch.Tensor) -> torch.Tensor:
    """:func:`unpack_int4` for eager CPU code: the same int8 ``[..., K]``, built as one int16
    per packed byte (low byte: the low nibble sign-extended, high byte: the high nibble), so
    every op runs over contiguous memory. (The broadcast shift of :func:`unpack_int4` has an
    inner dim of 2, which torch's CPU loops run element by element: 30x slower.)"""
    pairs = packed.to(torch.int16, memory_format=torch.contiguous_format)  # sign-extended
    low = pairs << 12
    low >>= 12                                  # the low nibble, sign-extended
    low &= 0xFF                                 # ... as the low byte
    pairs >>= 4                                 # the high nibble, sign-extended
    pairs <<= 8                                 # ... as the high byte
    pairs |= low
    return pairs.view(torch.int8)               # little-endian: element 2j, then 2j+1


def _dequantize_int4_cpu_eager(qdata, scale, zero_point, group_size, dtype):
    """:func:`dequantize_int4` in eager mode on a CPU, bit for bit: the same float32
    ``q * scale + zero_point`` (one multiply, one add, each rounded to float32), then the cast,
    in few in-place passes over contiguous memory (35-55 ms for a 4096² weight on the
    project's shared 2-core machine, against ~110 ms for the formula; benchmarks/bench_cpu.py).
    Few large ops rather than cache-sized chunks: on a shared machine every op's thread
    barrier can wait for a descheduled thread, which many small ops multiply. Under
    torch.compile the formula above runs instead (Inductor fuses it into one loop)."""
    w = _grouped(_unpack_int4_as_int16_pairs(qdata), group_size).to(torch.float32)
    w.mul_(scale.transpose(-1, -2).to(torch.float32).contiguous().unsqueeze(-1))
    w.add_(zero_point.transpose(-1, -2).to(torch.float32).contiguous().unsqueeze(-1))
    return w.flatten(-2).to(dtype)


# ---- fp8 activations ------------------------------------------------------------------------
FP8_E4M3_MAX = 448.0


def quantize_fp8_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row fp8 (e4m3) quantization of activations, ``x ≈ xq * x_scale[..., None]``.

    Args:
        x: ``[..., K]`` float.

    Returns:
        ``xq`` float8_e4m3fn ``[..., K]`` and ``x_scale`` fp32 ``[...]`` with
        ``x_scale = max(max_k |x|, 1e-12) * fp32(1/448)`` and
        ``xq = e4m3(clamp(x / x_scale, ±448))``. The scale is a product with the fp32
        reciprocal, not a quotient: that is what torch computes on CUDA for a tensor divided by
        a number, and it is then the same bits on every device. (The CUDA kernel in
        ``kernels/cuda_fp8_rows.py`` computes the same bits in one pass.)
    """
    x_scale = x.abs().amax(dim=-1).float().clamp(min=1e-12) * (1.0 / FP8_E4M3_MAX)
    xq = (x.float() / x_scale.unsqueeze(-1)).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX)
    return xq.to(torch.float8_e4m3fn), x_scale


def round_fp8_rows(x: torch.Tensor) -> torch.Tensor:
    """``x`` rounded through its per-row fp8 quantization and back, in ``x.dtype``:
    ``(float(xq) * x_scale).to(x.dtype)``, the activations an fp8 kernel sees."""
    xq, x_scale = quantize_fp8_rows(x)
    return (xq.float() * x_scale.unsqueeze(-1)).to(x.dtype)
