"""compressed-tensors ``pack-quantized`` W4A16 (llm-compressor's format; vLLM/SGLang WNA16).

Per quantized module ``prefix`` (``prefix.weight`` of the dense model):

=====================================  =======  =======================  =====================
tensor                                 dtype    shape                    content
=====================================  =======  =======================  =====================
``prefix.weight_packed``               int32    ``[..., N, ceil(K/8)]``  ``u = q + 8``, packed
                                                                         along K, linear order
``prefix.weight_scale``                float    ``[..., N, K/G]``
``prefix.weight_zero_point`` (asym.)   int32    ``[..., ceil(N/8), K/G]`` ``zp + 8``, packed
                                                                         along N, linear order
``prefix.weight_shape``                int64    ``[ndim]``               ``[..., N, K]``
=====================================  =======  =======================  =====================

Dequantization is ``w = (q - zp) * s`` with signed ``q, zp`` in ``[-8, 7]``, i.e.
``(u - z) * s`` with the stored unsigned ``z = zp + 8``; symmetric schemes store no zero point
(``zp = 0``, ``z = 8``, our ``zero_point = 0``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from int4tensor.formats.common import (
    check_g_idx,
    from_integer_qparams,
    pack_nibbles,
    to_integer_qparams,
    unpack_nibbles,
)
from int4tensor.tensors import Int4Tensor

__all__ = ["CTConfig", "quantization_config", "parse_config", "export_weight", "import_weight",
           "MARKER", "SUFFIXES"]

#: The key suffix that marks a quantized module, and all suffixes a module may have.
MARKER = "weight_packed"
SUFFIXES = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx")


@dataclass(frozen=True)
class CTConfig:
    """What we need from a ``quantization_config``: group size (None: per channel) and symmetry."""

    group_size: int | None
    symmetric: bool


def quantization_config(group_size: int, symmetric: bool, ignore=("lm_head",)) -> dict:
    """The ``quantization_config`` for config.json of a pack-quantized W4A16 group checkpoint."""
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "quantization_status": "compressed",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": 4, "type": "int", "symmetric": bool(symmetric),
                            "strategy": "group", "group_size": int(group_size),
                            "dynamic": False, "actorder": None, "observer": "minmax"},
                "input_activations": None,
                "output_activations": None,
                "format": "pack-quantized",
            }
        },
        "ignore": list(ignore),
        "kv_cache_scheme": None,
    }


def parse_config(qcfg: dict) -> CTConfig:
    """Check that ``qcfg`` describes a 4-bit int pack-quantized weight-only scheme we can read."""
    if qcfg.get("quant_method") != "compressed-tensors":
        raise ValueError(f"not a compressed-tensors config (quant_method="
                         f"{qcfg.get('quant_method')!r})")
    groups = qcfg.get("config_groups") or {}
    if not groups:
        raise ValueError("compressed-tensors config has no config_groups")
    schemes = set()
    for name, group in groups.items():
        fmt = group.get("format") or qcfg.get("format")
        if fmt != "pack-quantized":
            raise ValueError(f"compressed-tensors group {name!r} has format {fmt!r}; "
                             "int4tensor reads 'pack-quantized'")
        w = group.get("weights") or {}
        if w.get("num_bits") != 4 or w.get("type", "int") != "int":
            raise ValueError(f"compressed-tensors group {name!r}: weights are "
                             f"{w.get('type')}{w.get('num_bits')}, int4tensor reads int4")
        if group.get("input_activations"):
            raise ValueError(f"compressed-tensors group {name!r} quantizes activations; "
                             "int4tensor reads weight-only (W4A16) schemes")
        strategy = w.get("strategy")
        if strategy not in ("group", "channel"):
            raise ValueError(f"compressed-tensors group {name!r}: strategy {strategy!r}; "
                             "int4tensor reads 'group' and 'channel'")
        if w.get("actorder") == "group":
            raise ValueError(f"compressed-tensors group {name!r} uses actorder='group' (a "
                             "permuted g_idx); int4tensor needs groups of consecutive K")
        schemes.add((w.get("group_size") if strategy == "group" else None,
                     bool(w.get("symmetric", True))))
    if len(schemes) != 1:
        raise ValueError(f"compressed-tensors config mixes weight schemes {sorted(schemes, key=str)}; "
                         "int4tensor reads one scheme per checkpoint")
    return CTConfig(*schemes.pop())


def export_weight(t: Int4Tensor, symmetric: bool | None = None, name: str = "weight") -> dict:
    """Int4Tensor ``[..., N, K]`` -> ``{suffix: tensor}`` for ``prefix.{suffix}``.

    Lossless for tensors with integer zero points; otherwise re-quantized with a warning (see
    :func:`~int4tensor.formats.common.to_integer_qparams`). ``symmetric=None`` writes a zero
    point tensor unless every zero point is 8 (zero_point 0).
    """
    u, scale, z = to_integer_qparams(t, symmetric, name)
    if symmetric is None:
        symmetric = bool((z == 8).all())
    out = {
        "weight_packed": pack_nibbles(u, dim=-1),
        "weight_scale": scale.transpose(-1, -2).contiguous(),
        "weight_shape": torch.tensor(list(t.shape), dtype=torch.int64),
    }
    if not symmetric:
        out["weight_zero_point"] = pack_nibbles(z.transpose(-1, -2), dim=-2)
    return out


def import_weight(
    parts: dict, config: CTConfig, name: str = "weight", dtype: torch.dtype = torch.float32
) -> Int4Tensor:
    """``{suffix: tensor}`` of one module -> Int4Tensor (exact; see ``from_integer_qparams``)."""
    missing = [s for s in ("weight_packed", "weight_scale", "weight_shape") if s not in parts]
    if missing:
        raise ValueError(f"{name}: compressed-tensors module lacks {missing}")
    packed, scale = parts["weight_packed"], parts["weight_scale"]
    shape = [int(d) for d in parts["weight_shape"].tolist()]
    *lead, n, k = shape
    if packed.dtype != torch.int32 or list(packed.shape) != [*lead, n, -(-k // 8)]:
        raise ValueError(f"{name}.weight_packed is {packed.dtype}{list(packed.shape)}, expected "
                         f"int32{[*lead, n, -(-k // 8)]} for weight_shape {shape}")
    n_groups = 1 if config.group_size is None else k // config.group_size
    if config.group_size is not None and k % config.group_size:
        raise ValueError(f"{name}: K = {k} is not a multiple of group_size {config.group_size}")
    if list(scale.shape) != [*lead, n, n_groups] or not scale.is_floating_point():
        raise ValueError(f"{name}.weight_scale is {scale.dtype}{list(scale.shape)}, expected "
                         f"a float [{', '.join(map(str, [*lead, n, n_groups]))}] for group size "
                         f"{config.group_size} (config and tensors disagree)")
    check_g_idx(parts.get("weight_g_idx"), k, k // n_groups, name)
    u = unpack_nibbles(packed, k, dim=-1)
    zp = parts.get("weight_zero_point")
    if config.symmetric:
        if zp is not None and bool((zp != 0).any()):
            raise ValueError(f"{name}: config says symmetric but weight_zero_point is present "
                             "and nonzero")
        z = None
    elif zp is None:
        raise ValueError(f"{name}: config says asymmetric but weight_zero_point is missing")
    elif zp.dtype == torch.int32 and list(zp.shape) == [*lead, -(-n // 8), n_groups]:
        z = unpack_nibbles(zp, n, dim=-2).transpose(-1, -2)
    elif zp.dtype == torch.int8 and list(zp.shape) == [*lead, n, n_groups]:
        # older writers stored the signed zp unpacked
        z = (zp.to(torch.int16) + 8).transpose(-1, -2)
    else:
        raise ValueError(f"{name}.weight_zero_point is {zp.dtype}{list(zp.shape)}, expected "
                         f"packed int32{[*lead, -(-n // 8), n_groups]}")
    return from_integer_qparams(u, scale.transpose(-1, -2), z, dtype)
